"""A sweep behaves as a whole: Ctrl-C or SIGTERM during `python run.py -m ...` stops the sweep, not only the
running job, and says how to resume it.

Hydra's basic launcher runs the jobs one after another in this process, and catches a job's Exception to go
on with the next. The task wrapper (runner/task.py) records the interrupted job (the training loop has
checkpointed it), then raises SweepInterrupted, a BaseException that Hydra does not catch: the remaining jobs
never start, and run.py prints one command that resumes the sweep in the same directory with
train.resume=auto (continue where a checkpoint is, else start). There, jobs that finished are kept as they
are (their results.json says ok), the
interrupted one continues from its checkpoint and the others start.

Launchers that run each job in its own process (submitit: launcher=local|slurm) are left alone: there a
signal reaches one job, and train.resume=true with SLURM's requeue already continues it.
"""
import json
import signal
import sys
from pathlib import Path

from omegaconf import OmegaConf

from runner.exitcode import note_stop
from runner.naming import override, quote_override, run_py


class SweepInterrupted(BaseException):
    """The sweep was stopped by a signal during one of its jobs (which recorded `interrupted`)."""

    def __init__(self, sweep_dir: str, job_dir: str):
        super().__init__(f"sweep stopped during {job_dir}")
        self.sweep_dir, self.job_dir = sweep_dir, job_dir

    def hint(self, argv: list[str] | None = None) -> str:
        if self.sweep_dir is None:
            return "\nThe sweep was stopped before its first job started; run the same command again."
        where = f"during {self.job_dir} (checkpointed)" if self.job_dir else "between two jobs"
        return (f"\nThe sweep was stopped {where}; the jobs after it did not start. Resume the sweep (finished "
                f"jobs are kept, an interrupted one continues from its checkpoint) with:\n"
                f"{resume_sweep_command(self.sweep_dir, argv)}")


_current = {"sweep_dir": None}  # the in-process sweep this process runs, once its first job has started


def job_started() -> None:
    """Called as each job starts (run.py): remembers the sweep, for a signal that comes between two jobs."""
    _current["sweep_dir"] = in_process_sweep_dir() or _current["sweep_dir"]


def stop_between_jobs() -> None:
    """`python run.py -m`: SIGTERM or Ctrl-C outside a job (Hydra setting up the next one) stops the sweep too.
    Inside a job, the task wrapper and the training loop install their own handlers and restore this one."""
    def handle(signum, frame):
        note_stop(signal.Signals(signum).name)
        raise SweepInterrupted(_current["sweep_dir"], None)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handle)


def in_process_sweep_dir() -> str | None:
    """The sweep directory when this job is one of a multirun under Hydra's basic (in-process) launcher."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode
        hc = HydraConfig.get()
    except Exception:  # noqa: BLE001 -- outside a Hydra job
        return None
    if hc.mode != RunMode.MULTIRUN or "BasicLauncher" not in str(hc.launcher.get("_target_", "")):
        return None
    return str(Path(hc.sweep.dir).resolve())  # chdir is off: relative to where run.py was launched


def resume_sweep_command(sweep_dir: str, argv: list[str] | None = None) -> str:
    """`python run.py -m <the sweep's own arguments> train.resume=auto hydra.sweep.dir=<its directory>`."""
    argv = sys.argv[1:] if argv is None else argv
    keep = [a for a in argv if a not in ("-m", "--multirun")
            and not a.lstrip("+~").startswith(("train.resume=", "hydra.sweep.dir="))]
    return " ".join([f"python {run_py()} -m", *map(quote_override, keep), "train.resume=auto",
                     override("hydra.sweep.dir", sweep_dir)])


def finished_record(out_dir, cfg) -> dict | None:
    """The results.json of a training run that already finished (status ok) with this same config (but for
    train.resume) and whose latest checkpoint, if any, is its last step: a resumed sweep keeps it as it is.
    A larger budget or another config is not finished: train.resume=true then trains on (or says why not)."""
    path = Path(out_dir) / "results.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if data.get("status") != "ok" or data.get("task") != "train":
        return None
    try:
        now = OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # noqa: BLE001 -- an unresolvable config is not a finished run's
        return None
    if _without_resume(data.get("config")) != _without_resume(now):
        return None
    # imported here: run.py imports this module without torch
    from runner.checkpoint import NoReadableCheckpoint, load_latest_readable
    try:  # the newest readable checkpoint (a damaged one is set aside): behind the recorded steps, not finished
        latest = load_latest_readable(out_dir, required_keys=("step",))
    except NoReadableCheckpoint:
        return None  # the resume says which files it tried
    if latest is not None and latest[1]["step"] != (data.get("metrics") or {}).get("steps"):
        return None
    return data


def _without_resume(config) -> dict:
    config = dict(config or {})
    config["train"] = {k: v for k, v in (config.get("train") or {}).items() if k != "resume"}
    return config
