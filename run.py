"""The one entry point: `python run.py [task=train|bench|data|generate|inspect|compare] [overrides]`.

Each task lives in its own runner module with a `main(cfg)` function; this file only composes the
config and dispatches, so that `python run.py --cfg job ...` prints a config without importing torch.
"""
import importlib

import hydra
from omegaconf import DictConfig

TASKS = {
    "train": "runner.train",
    "eval": "runner.evaluate",
    "bench": "runner.bench",
    "data": "runner.data",
    "generate": "runner.generate",
    "inspect": "runner.inspect",
    "compare": "runner.compare",
}


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig):
    if cfg.task not in TASKS:
        raise ValueError(f"task={cfg.task!r} is not a task; choose one of {sorted(TASKS)}")
    return importlib.import_module(TASKS[cfg.task]).main(cfg)


if __name__ == "__main__":
    main()
