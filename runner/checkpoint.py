"""Checkpoints that are never half-written: save to a temporary file, fsync, then rename.

A checkpoint holds everything needed to continue bit-for-bit: model, optimizer, LR schedule, data-loader
position, RNG states, the step, and the curves so far.

Faults: a write that fails (disk full, permissions) removes its temporary file, leaves the older checkpoints
as they were and raises `CheckpointWriteError` naming the path and the free space. A checkpoint that cannot
be read (truncated by a failing disk or a copy cut short, or lacking the keys its reader needs) is set aside
as step_*.pt.damaged, with a warning, and the next older one is read (`load_latest_readable`).
"""
import os
import re
import shutil
import warnings
from pathlib import Path

import torch

from runner.formatting import format_bytes

PATTERN = re.compile(r"^step_(\d+)\.pt$")
RESUME_KEYS = ("model", "optimizer", "scheduler", "loader", "rng", "step", "curves")  # what Trainer.resume reads
WEIGHT_KEYS = ("model",)  # eval.weights, generate.weights


class CheckpointWriteError(OSError):
    """A checkpoint could not be written; the older ones are intact."""


class NoReadableCheckpoint(RuntimeError):
    """Every checkpoint tried was damaged; the message lists them with what was wrong."""


def checkpoint_dir(out_dir) -> Path:
    return Path(out_dir) / "checkpoints"


def save_checkpoint(out_dir, step: int, state: dict, keep: int = 2) -> Path:
    folder = checkpoint_dir(out_dir)
    final = folder / f"step_{step:07d}.pt"
    tmp = folder / f".tmp_step_{step:07d}.pt"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)  # atomic on POSIX: readers see the old set of files or the new one
    except (OSError, RuntimeError) as err:  # torch's zip writer reports some failed writes as RuntimeError
        tmp.unlink(missing_ok=True)
        raise CheckpointWriteError(f"could not write checkpoint {final} ({_free_space(folder)}): {err}") from err
    for old in list_checkpoints(out_dir)[:-keep]:
        old.unlink(missing_ok=True)
    return final


def _free_space(folder: Path) -> str:
    try:
        return f"{format_bytes(shutil.disk_usage(folder).free)} free on its filesystem"
    except OSError as err:
        return f"free space unknown: {err.strerror or err}"


def list_checkpoints(out_dir) -> list[Path]:
    """Complete checkpoints, oldest first (temporary files are ignored)."""
    folder = checkpoint_dir(out_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := PATTERN.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(path) -> Path | None:
    """`path` is a run directory or a checkpoint file."""
    path = Path(path)
    if path.is_file():
        return path
    found = list_checkpoints(path)
    return found[-1] if found else None


def load_latest_readable(path, required_keys=RESUME_KEYS, map_location="cpu") -> tuple[Path, dict] | None:
    """The newest checkpoint that loads and holds `required_keys`: (its path, its state), or None when there
    is no step_*.pt at all. `path` is a run directory or one checkpoint file.

    In a directory a damaged checkpoint is warned about by name, renamed to step_*.pt.damaged (kept for a
    look, never deleted; no longer listed, so neither retried nor counted by the pruning in save_checkpoint)
    and the next older one is tried. When none is readable nothing is renamed (a retry meets the same error,
    not a silent fresh start) and `NoReadableCheckpoint` lists every file with its fault. A file named
    explicitly is the one wanted: it is read or refused, with no fall-back."""
    path = Path(path)
    candidates = [path] if path.is_file() else list_checkpoints(path)[::-1]
    damaged = []
    for candidate in candidates:
        try:
            state = torch.load(candidate, map_location=map_location, weights_only=False)
        except FileNotFoundError:  # pruned by a training run writing there while we read
            continue
        except Exception as err:  # noqa: BLE001 -- torch reports a damaged file as many exception types
            first = (str(err).splitlines() or [""])[0].split(". ")[0]  # torch adds paragraphs of advice
            damaged.append((candidate, f"unreadable: {type(err).__name__}: {first}"))
            continue
        missing = [k for k in required_keys if not isinstance(state, dict) or k not in state]
        if missing:
            damaged.append((candidate, f"incomplete: no {', '.join(missing)}"))
            continue
        for bad, fault in damaged:
            warnings.warn(f"checkpoint {bad} is damaged ({fault}); {_set_aside(bad)}; using {candidate} instead",
                          stacklevel=2)
        return candidate, state
    if damaged:
        raise NoReadableCheckpoint(f"no readable checkpoint in {path}; tried, newest first:\n" +
                                   "\n".join(f"  {bad}: {fault}" for bad, fault in damaged))
    return None


def _set_aside(path: Path) -> str:
    """step_N.pt -> step_N.pt.damaged (.damaged.1, ... if that exists); a read-only directory keeps it."""
    target, n = path.with_name(path.name + ".damaged"), 0
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.damaged.{n}")
    try:
        path.rename(target)
    except OSError as err:
        return f"left in place (could not rename it: {err})"
    return f"set aside as {target.name}"


def load_model_weights(model, path, device="cpu") -> Path:
    """A training run's model weights (`path`: its directory, whose newest readable step_*.pt is read, or the
    file) into `model`, which must be built from the same model config. Returns the file read."""
    loaded = load_latest_readable(path, WEIGHT_KEYS, map_location=device)
    if loaded is None:
        raise FileNotFoundError(f"{str(path)!r}: no step_*.pt checkpoint there")
    found, state = loaded
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:  # a size mismatch: the model config differs from the training run's
        saved = " ".join(state.get("overrides") or []) or "(see the run's .hydra/overrides.yaml)"
        raise RuntimeError(f"{found} does not fit this model config: use the training run's model, data and "
                           f"tokenizer overrides: {saved}\n{err}") from None
    return found


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
