"""How training batches are drawn from a split (`data.sampling`):

  rows     epochs of rows: each epoch a seeded permutation of the packed rows (runner.data.BatchLoader)
  windows  nanoGPT's sampling: every batch holds seq_len-token windows of the training stream at uniformly random
           offsets (a window may start inside a document and span several; positions and document ids follow
           the packing conventions, so attention still stays inside each document). The offsets of batch k are
           drawn from (seed, k) alone, so state_dict() is just k and a resumed run draws the same batches.
"""
import numpy as np
import torch

SAMPLING = ("rows", "windows")


def batch_loader(split, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1, sampling: str = "rows"):
    """The training loader data.sampling names, with BatchLoader's arguments and state_dict contract."""
    from runner.data import BatchLoader  # runner.data imports this module
    if sampling not in SAMPLING:
        raise ValueError(f"data.sampling={sampling!r} must be one of {SAMPLING}")
    cls = WindowLoader if sampling == "windows" else BatchLoader
    return cls(split, batch_size, seed=seed, rank=rank, world_size=world_size)


class WindowLoader:
    """An endless stream of (batch_size, seq_len) batches of random windows of a TokenSplit's stream. With
    world_size > 1 the step's batch_size x world_size windows are drawn once and rank r takes every
    world_size-th, so which windows a step holds does not depend on how the work is split."""

    def __init__(self, split, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        self.n_starts = split.n_tokens - split.seq_len  # a window and the label after it fit
        if self.n_starts < 1:
            raise ValueError(f"the split holds {split.n_tokens} tokens, too few for a window of data.seq_len="
                             f"{split.seq_len} and its next-token label; use a bigger corpus or a shorter data.seq_len")
        self.split, self.batch_size, self.seed, self.rank, self.world_size = split, batch_size, seed, rank, world_size
        self.position = 0  # batches served

    def starts(self, k: int) -> np.ndarray:
        """This rank's window offsets for batch k."""
        drawn = np.random.default_rng([self.seed, k]).integers(0, self.n_starts, self.batch_size * self.world_size)
        return drawn[self.rank::self.world_size]

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        rows = self.split.windows(self.starts(self.position))
        self.position += 1
        return {name: torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)) for name, a in rows.items()}

    def state_dict(self) -> dict:
        return {"sampling": "windows", "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        if state.get("sampling") != "windows":
            raise ValueError("the checkpoint's loader drew epochs of rows; resume it with data.sampling=rows")
        self.position = int(state["position"])
