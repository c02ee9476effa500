"""The one entry point: `python run.py [task=train|eval|bench|data|generate|inspect|compare|lm_eval] [overrides]`.

Each task lives in its own runner module with a `main(cfg)` function; this file only composes the
config and dispatches, so that `python run.py --cfg job ...` prints a config without importing torch.
"""
import importlib
import os
import sys
import time

import hydra
from omegaconf import DictConfig

from runner import sweep  # light: no torch

TASKS = {
    "train": "runner.train",
    "eval": "runner.evaluate",
    "bench": "runner.bench",
    "data": "runner.data",
    "generate": "runner.generate",
    "inspect": "runner.inspect",
    "compare": "runner.report",
    "lm_eval": "runner.lm_eval",
}


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig):
    if cfg.task not in TASKS:
        raise ValueError(f"task={cfg.task!r} is not a task; choose one of {sorted(TASKS)}")
    sweep.job_started()
    return importlib.import_module(TASKS[cfg.task]).main(cfg)


def share_run_stamp():
    """Under torchrun every rank composes the config, and hydra.run.dir holds the time: ranks started a
    second apart would write to two directories. Rank 0's clock names it for all (VARIANTS_RUN_STAMP,
    read by conf/config.yaml); set it yourself to name the directory."""
    if int(os.environ.get("WORLD_SIZE", 1)) <= 1 or "VARIANTS_RUN_STAMP" in os.environ:
        return
    import torch.distributed as dist
    from runner.distributed import init_process_group
    init_process_group()  # kept for the job (runner/distributed.py reuses it)
    stamp = [time.strftime("%Y-%m-%d/%H-%M-%S")]
    dist.broadcast_object_list(stamp, src=0, device="cpu")
    os.environ["VARIANTS_RUN_STAMP"] = stamp[0]


if __name__ == "__main__":
    share_run_stamp()
    if {"-m", "--multirun"} & set(sys.argv[1:]):
        sweep.stop_between_jobs()
    try:
        main()
    except sweep.SweepInterrupted as stop:  # a sweep stopped by Ctrl-C/SIGTERM: one line resumes it (runner/sweep.py)
        print(stop.hint())
