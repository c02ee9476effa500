"""The one entry point: `python run.py [task=train|eval|bench|data|generate|inspect|compare|lm_eval|coordcheck] [overrides]`.

Each task lives in its own runner module with a `main(cfg)` function; this file only composes the
config and dispatches, so that `python run.py --cfg job ...` prints a config without importing torch.
"""
from runner import startup  # light, first: a Ctrl-C from here until the task wrapper is one line, exit 130

startup.guard()

import importlib  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from runner import sweep  # noqa: E402 -- light: no torch
from runner import naming  # noqa: E402 -- registers ${variants.dirname:...}: the run and sweep folder names
from runner.exitcode import exit_code  # noqa: E402
from runner.task import config_checks, config_key, is_config_error  # noqa: E402

log = logging.getLogger(__name__)

TASKS = {
    "train": "runner.train",
    "eval": "runner.evaluate",
    "bench": "runner.bench",
    "data": "runner.data",
    "generate": "runner.generate",
    "inspect": "runner.inspect",
    "compare": "runner.report",
    "lm_eval": "runner.lm_eval",
    "coordcheck": "runner.coordcheck",
}


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig):
    naming.register()  # named here so that a submitit job, unpickling main() in a fresh process, imports it too
    try:
        with config_checks():
            if cfg.task not in TASKS:
                raise ValueError(f"task={cfg.task!r} is not a task; choose one of {sorted(TASKS)}")
        sweep.job_started()
        task = importlib.import_module(TASKS[cfg.task])
        startup.hand_over()
        return task.main(cfg)
    except Exception as err:  # noqa: BLE001 -- only the config and input errors are reported here; all re-raise
        if is_config_error(err):
            report_config_error(err)
        raise


def report_config_error(err: Exception):
    """One line and the key to change; a single run then exits with status 1 without Hydra's traceback (a
    sweep goes on to its next job, and Hydra reports the failure at the end)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    key = config_key(err)
    log.error(f"config error: {err}")
    if key:
        log.error(f"change {key} (python run.py ... {key}=<value>; `python run.py --cfg job ...` shows the config)")
    if os.environ.get("HYDRA_FULL_ERROR") != "1" and HydraConfig.get().mode == RunMode.RUN:
        raise SystemExit(1)


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
    from runner.choices import unknown_choice
    if (problem := unknown_choice(sys.argv[1:], Path(__file__).resolve().parent / "conf")) is not None:
        sys.exit(problem)  # one line on stderr, status 1, before Hydra (whose message lists every file)
    share_run_stamp()
    if {"-m", "--multirun"} & set(sys.argv[1:]):
        sweep.stop_between_jobs()
    try:
        main()
    except sweep.SweepInterrupted as stop:  # a sweep stopped by Ctrl-C/SIGTERM: one line resumes it (runner/sweep.py)
        print(stop.hint())
        sys.exit(exit_code() or 130)
    if exit_code():  # stopped by a signal: 130 after Ctrl-C, 143 after SIGTERM, as a shell reports it
        sys.exit(exit_code())
