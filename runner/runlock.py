"""One writer per run directory: task=train holds `train.lock` in its run directory while it runs.

Two processes training into one directory (a resumed job started twice, by hand or by a scheduler) would
interleave their checkpoints and results.json. So rank 0 of a training job creates the lock file atomically
(O_CREAT | O_EXCL) with its pid, host and start time before anything else is written there, and removes it
when the job ends; the other ranks of the same torchrun job share the directory under rank 0's lock.

A second process that finds the lock held by a live process stops at once with `RunDirectoryBusy`, naming
that process. It stops before the task wrapper writes results.json, so the running job's record, checkpoints
and W&B run are left alone: the refused process records nothing in a directory that is not its own (its
error goes to its own stderr and exit status), which is what a scheduler's log or a shell shows. Hydra has
already rewritten the directory's .hydra/ snapshot of the composed config by then (it does so before any
task runs); the checkpoints keep each run's own overrides.

A lock is stale, and taken over with a warning, when its process is gone: on the same host, no process has
its pid (os.kill(pid, 0)) or the pid now belongs to a process started later; under SLURM, the lock was left
by an earlier incarnation of this very job (same SLURM_JOB_ID, lower SLURM_RESTART_COUNT: a requeued job may
land on another node). A lock held from another host is never guessed stale: the error says which file to
delete once that process is known to be gone.
"""
import json
import os
import socket
import time
import warnings
from pathlib import Path

LOCK_NAME = "train.lock"


class RunDirectoryBusy(RuntimeError):
    """Another live process is training in this run directory."""


class RunLock:
    def __init__(self, path: Path, owner: dict):
        self.path, self.owner = path, owner

    @classmethod
    def take(cls, run_dir) -> "RunLock":
        """Create the lock in `run_dir`, taking over a stale one; raise RunDirectoryBusy if a live process holds it."""
        path = Path(run_dir) / LOCK_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        owner = _this_process()
        for _ in range(10):  # each round either creates the lock, fails, or removes a stale one and retries
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _read(path)
                if holder is None:
                    continue  # removed meanwhile: try again
                reason = _stale(holder, owner)
                if reason is None:
                    raise RunDirectoryBusy(
                        f"{path.parent} is in use by another training run: pid {holder.get('pid')} on host "
                        f"{holder.get('host')}, started {holder.get('started_at')} (lock {path}). Wait for it to "
                        f"finish or choose another hydra.run.dir; delete {path} only if that process is gone."
                    ) from None
                if _remove_if_unchanged(path, holder):
                    warnings.warn(f"taking over {path}: {reason}", stacklevel=2)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(owner, f)
                f.flush()
                os.fsync(f.fileno())
            return cls(path, owner)
        raise RunDirectoryBusy(f"could not take {path}: other processes keep creating it")

    def release(self) -> None:
        """Remove the lock if it is still this process's (a later process may have judged it stale)."""
        holder = _read(self.path)
        if holder is not None and holder.get("pid") == self.owner["pid"] and holder.get("host") == self.owner["host"]:
            self.path.unlink(missing_ok=True)


def live_holder(run_dir) -> dict | None:
    """Who holds `run_dir`'s lock while that process may be alive (pid, host, started_at), else None."""
    holder = _read(Path(run_dir) / LOCK_NAME)
    return holder if holder is not None and _stale(holder, _this_process()) is None else None


def _this_process() -> dict:
    pid = os.getpid()
    return {"pid": pid, "host": socket.gethostname(), "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "process_start": _process_start(pid), "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "slurm_restart_count": int(os.environ.get("SLURM_RESTART_COUNT") or 0)}


def _process_start(pid: int) -> str | None:
    """The kernel's start time of `pid` (Linux /proc; None elsewhere): tells a reused pid from its first owner."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22 (starttime), counted after the command name


def _read(path: Path) -> dict | None:
    """The lock's owner; None if the file is gone. A file still empty (its creator between O_EXCL and the
    write) is waited for; one that stays unreadable names an unknown owner, judged stale by its age."""
    for _ in range(20):
        try:
            text = path.read_text()
        except FileNotFoundError:
            return None
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            time.sleep(0.05)
    try:
        return {"unreadable": text, "mtime": path.stat().st_mtime}
    except FileNotFoundError:
        return None


def _stale(holder: dict, me: dict) -> str | None:
    """Why the lock's process is gone, or None while it may be alive."""
    if "unreadable" in holder:  # a creator that died between O_EXCL and its write
        return "its content is unreadable" if time.time() - holder["mtime"] > 5 else None
    job = holder.get("slurm_job_id")
    if job and job == me["slurm_job_id"] and (holder.get("slurm_restart_count") or 0) < me["slurm_restart_count"]:
        return f"left by SLURM job {job} before it was requeued"
    if holder.get("host") != me["host"]:
        return None
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0:  # os.kill(0, ...) would signal our own process group
        return f"it names no process (pid {pid!r})"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return f"its process {pid} (started {holder.get('started_at')}) is gone"
    except PermissionError:  # alive, another user's
        return None
    recorded, current = holder.get("process_start"), _process_start(pid)
    if recorded and current and recorded != current:
        return f"its process {pid} is gone (the pid now belongs to another process)"
    return None


def _remove_if_unchanged(path: Path, holder: dict) -> bool:
    """Remove the stale lock unless another process took it over since it was read: moved aside first (an
    atomic rename that only one contender wins), then checked, and put back if it is no longer the stale one."""
    aside = path.with_name(f"{path.name}.stale.{os.getpid()}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return False
    if _read(aside) != holder:
        try:
            os.link(aside, path)  # a fresh lock: restore it (unless yet another process holds the name now)
        except FileExistsError:
            pass
        aside.unlink(missing_ok=True)
        return False
    aside.unlink(missing_ok=True)
    return True
