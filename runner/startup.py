"""Ctrl-C before the task wrapper takes over (torch importing, Hydra composing, the task module loading): one
line, exit status 130, and no run folder left without a results.json. Light: no torch.

run.py calls `guard()` first thing and `hand_over()` just before the task's main, whose wrapper (runner/task.py)
records any later Ctrl-C as `interrupted`. Sweeps install their own handler (runner/sweep.py) over this one.
"""
import shutil
import signal
import sys
from pathlib import Path

HYDRA_OWN = {".hydra", "run.log"}  # what Hydra writes into a job's folder before the task runs


def interrupted_at_start_up(signum, frame):
    folder = _job_folder()
    removed = folder is not None and remove_if_bare(folder)
    print(f"\nCtrl-C while starting up: nothing ran{f', {folder} removed' if removed else ''}", file=sys.stderr)
    raise SystemExit(128 + signum)


def guard() -> None:
    signal.signal(signal.SIGINT, interrupted_at_start_up)


def hand_over() -> None:
    """Ctrl-C raises KeyboardInterrupt again (the task wrapper records it), unless a sweep installed its own."""
    if signal.getsignal(signal.SIGINT) is interrupted_at_start_up:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def remove_if_bare(folder: Path) -> bool:
    """Remove a job folder holding only what Hydra wrote as the job started; anything else (a resumed run's
    record and checkpoints) means the folder is not this start's to remove."""
    if not folder.is_dir() or {p.name for p in folder.iterdir()} - HYDRA_OWN:
        return False
    shutil.rmtree(folder, ignore_errors=True)
    return True


def _job_folder() -> Path | None:
    try:
        from hydra.core.hydra_config import HydraConfig
        return Path(HydraConfig.get().runtime.output_dir)
    except Exception:  # noqa: BLE001 -- before Hydra has made the job's folder
        return None
