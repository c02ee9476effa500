"""Resuming a training run: where it continues from, and the command that continues it.

    train.resume=false   start fresh (a SLURM job that was requeued resumes all the same)
    train.resume=true    continue from the run directory's latest checkpoint; none there is an error that lists
                         the runs that can be resumed, each with its command
    train.resume=auto    continue if there is a checkpoint, else start (the launchers and sweep resumes)
    train.resume=PATH    continue from that run directory or checkpoint file
"""
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from runner.checkpoint import latest_checkpoint
from runner.naming import override, quote_override, run_py
from runner.runlock import live_holder


def requeued() -> bool:
    """SLURM requeued this job (preemption, time limit)."""
    return int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0


def resume_source(resume, out_dir) -> Path | None:
    """The run directory or checkpoint file to continue from, or None to start fresh."""
    if not resume and requeued():
        resume = True  # continue, whatever the launcher set
    if not resume:
        return None
    return Path(out_dir) if resume is True or resume == "auto" else Path(resume)


def task_overrides() -> list[str]:
    """This job's command-line overrides (empty outside a Hydra job)."""
    try:
        from hydra.core.hydra_config import HydraConfig
        return list(HydraConfig.get().overrides.task)
    except Exception:  # noqa: BLE001 -- called outside a Hydra job
        return []


def resume_command(out_dir, overrides: list[str] | None = None) -> str:
    """The command line that continues this run: its own overrides (a checkpoint fits only the model it was
    saved from) with train.resume=true and the run's directory."""
    overrides = task_overrides() if overrides is None else overrides
    keep = [o for o in overrides if not o.lstrip("+~").startswith(("train.resume=", "hydra.run.dir="))]
    return " ".join([f"python {run_py()}", *map(quote_override, keep), "train.resume=true",
                     override("hydra.run.dir", out_dir)])


def resumable_runs(root="outputs", limit: int = 5) -> list[tuple[Path, Path]]:
    """(run directory, latest checkpoint) of the runs under root (runs and sweep jobs), newest first."""
    found = []
    for ckpt_dir in [*Path(root).glob("runs/*/*/checkpoints"), *Path(root).glob("sweeps/*/*/*/checkpoints")]:
        latest = latest_checkpoint(ckpt_dir.parent)
        if latest is not None:
            found.append((ckpt_dir.parent, latest))
    return sorted(found, key=lambda run: run[1].stat().st_mtime, reverse=True)[:limit]


def require_checkpoint_to_resume(cfg: DictConfig, out_dir) -> None:
    """train.resume=true (or a PATH) continues a run; without a checkpoint there it would quietly train from scratch
    in a new folder. Stop, and list the runs that can be resumed with the command for each. (train.resume=auto,
    the launchers' setting, and a requeued SLURM job start from scratch when there is none yet.)"""
    resume = cfg.train.resume
    if resume is not True and not (isinstance(resume, str) and resume != "auto"):
        return
    if requeued():
        return  # a requeued job that never checkpointed: from scratch, in its own directory
    where = resume_source(resume, out_dir)
    if latest_checkpoint(where) is not None:
        return
    runs = []
    for run_dir, ckpt in resumable_runs():
        step = int(ckpt.stem.split('_')[1])
        holder = live_holder(run_dir)  # still training: not one to resume (it would be refused)
        runs.append(f"  {run_dir} (step {step}): running, pid {holder.get('pid')} on {holder.get('host')} since "
                    f"{holder.get('started_at')}" if holder else
                    f"  {run_dir} (step {step}): {resume_command(run_dir, _saved_overrides(run_dir))}")
    setting = "true" if resume is True else resume
    raise ValueError(f"train.resume={setting} but {where} holds no checkpoint: name the run to continue with "
                     f"hydra.run.dir=<its folder> (or train.resume=<its folder>). " +
                     ("Runs that can be resumed, newest first:\n" + "\n".join(runs) if runs
                      else "No run under outputs/ has a checkpoint yet."))


def _saved_overrides(run_dir: Path) -> list[str]:
    """The overrides a run was started with (Hydra's .hydra/overrides.yaml), for its resume command."""
    path = run_dir / ".hydra" / "overrides.yaml"
    return list(OmegaConf.load(path)) if path.is_file() else []
