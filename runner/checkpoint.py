"""Checkpoints that are never half-written: save to a temporary file, fsync, then rename.

A checkpoint holds everything needed to continue bit-for-bit: model, optimizer, LR schedule, data-loader
position, RNG states, the step, and the curves so far.
"""
import os
import re
from pathlib import Path

import torch

PATTERN = re.compile(r"^step_(\d+)\.pt$")


def checkpoint_dir(out_dir) -> Path:
    return Path(out_dir) / "checkpoints"


def save_checkpoint(out_dir, step: int, state: dict, keep: int = 2) -> Path:
    folder = checkpoint_dir(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step_{step:07d}.pt"
    tmp = folder / f".tmp_step_{step:07d}.pt"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)  # atomic on POSIX: readers see the old set of files or the new one
    for old in list_checkpoints(out_dir)[:-keep]:
        old.unlink(missing_ok=True)
    return final


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


def load_model_weights(model, path, device="cpu") -> Path:
    """A training run's model weights (`path`: its directory, whose latest step_*.pt is read, or the file)
    into `model`, which must be built from the same model config. Returns the file read."""
    found = latest_checkpoint(path)
    if found is None:
        raise FileNotFoundError(f"{str(path)!r}: no step_*.pt checkpoint there")
    state = torch.load(found, map_location=device, weights_only=False)
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
