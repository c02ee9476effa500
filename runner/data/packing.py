"""Packing tokenized documents into rows of seq_len, and the on-disk cache of the result.

Conventions (every row of every split):
  input_ids     each document's tokens followed by its end-of-text token; the eot belongs to the document
                before it. `packing=documents` concatenates documents and cuts the stream every seq_len tokens,
                so a long document continues in the next row; `packing=none` starts every document on a new
                row and pads the rest of its last row with pad_id.
  labels        the next token of the same document, or -100: at the eot (it would predict the next
                document's first token), on padding, and on the last real token of the whole split. The last
                position of a row predicts the first token of the next row when the document continues there.
  position_ids  0, 1, 2, ... from the start of each document, and again from 0 where a document continues
                in a new row: the model never sees more than seq_len tokens of it at once, and its
                max_seq_len is seq_len. Padding has position 0.
  document_ids  the document's index in the split (0, 1, ...); it changes exactly after each eot, and is the
                same in both rows a long document spans. Padding is -1.
"""
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FIELDS = ("input_ids", "labels", "position_ids", "document_ids")
PACKING_MODES = ("documents", "none")
IGNORE = -100  # the label F.cross_entropy skips
PAD_DOC = -1


@dataclass
class PackedSplit:
    """Four int64 arrays of shape (N, seq_len); memory-mapped when loaded from the cache."""
    input_ids: np.ndarray
    labels: np.ndarray
    position_ids: np.ndarray
    document_ids: np.ndarray

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    def rows(self, index) -> dict[str, np.ndarray]:
        return {name: np.asarray(getattr(self, name)[index]) for name in FIELDS}

    def efficiency(self) -> float:
        """The share of slots that hold a real token (a document's token or its eot), not padding."""
        return float((self.document_ids >= 0).mean()) if len(self) else 0.0


def pack(docs: list[list[int]], eot_id: int, pad_id: int, seq_len: int, packing: str = "documents") -> PackedSplit:
    """Lay documents (token id lists, no separators) out in rows; see the module docstring for conventions."""
    if seq_len < 2:
        raise ValueError(f"data.seq_len={seq_len} must be >= 2: a row needs a token and its next-token target")
    if packing not in PACKING_MODES:
        raise ValueError(f"data.packing={packing!r} must be one of {PACKING_MODES}")
    T = seq_len
    lengths = np.array([len(d) + 1 for d in docs], dtype=np.int64)  # + 1: the eot
    ends = np.cumsum(lengths)
    starts = ends - lengths
    n = int(ends[-1]) if len(docs) else 0
    stream = np.empty(n, dtype=np.int64)
    is_eot = np.zeros(n, dtype=bool)
    is_eot[ends - 1] = True
    stream[~is_eot] = np.concatenate([np.asarray(d, dtype=np.int64) for d in docs]) if n else []
    stream[is_eot] = eot_id
    doc_of = np.repeat(np.arange(len(docs), dtype=np.int64), lengths)

    # Where each stream token sits in the flat (rows * T) grid.
    if packing == "documents":
        slot = np.arange(n, dtype=np.int64)
        n_rows = math.ceil(n / T)
    else:
        doc_rows = -(-lengths // T)  # ceil
        first_row = np.cumsum(doc_rows) - doc_rows
        slot = first_row[doc_of] * T + (np.arange(n, dtype=np.int64) - starts[doc_of])
        n_rows = int(doc_rows.sum())

    size = n_rows * T
    input_ids = np.full(size, pad_id, dtype=np.int64)
    document_ids = np.full(size, PAD_DOC, dtype=np.int64)
    input_ids[slot] = stream
    document_ids[slot] = doc_of

    # A label is the next slot's token when that slot holds the same document; the eot is followed by
    # another document or by padding, so it is masked by the same rule.
    labels = np.full(size, IGNORE, dtype=np.int64)
    same = (document_ids[1:] == document_ids[:-1]) & (document_ids[:-1] >= 0)
    labels[:-1][same] = input_ids[1:][same]

    # Positions count from the last run start: a new document or a new row.
    idx = np.arange(size, dtype=np.int64)
    run_start = (idx % T == 0)
    run_start[1:] |= document_ids[1:] != document_ids[:-1]
    position_ids = idx - np.maximum.accumulate(np.where(run_start, idx, 0))
    position_ids[document_ids == PAD_DOC] = 0

    shape = (n_rows, T)
    return PackedSplit(input_ids.reshape(shape), labels.reshape(shape), position_ids.reshape(shape),
                       document_ids.reshape(shape))


def rows_needed(lengths, seq_len: int, packing: str) -> int:
    """Rows that documents of these lengths (eot included) take in a packing mode, without packing them."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if packing == "documents":
        return math.ceil(int(lengths.sum()) / seq_len)
    return int((-(-lengths // seq_len)).sum())


# ---------------------------------------------------------------------------------------------------- cache

def save_packed(path: Path, splits: dict[str, PackedSplit], meta: dict) -> None:
    """Write every split's arrays as .npy plus meta.json, into a temporary directory renamed at the end, so
    a reader (or a concurrent sweep job building the same entry) never sees a half-written cache entry."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".tmp_{path.name}_"))
    try:
        for split, packed in splits.items():
            for name in FIELDS:
                np.save(tmp / f"{split}.{name}.npy", getattr(packed, name))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        if path.exists():  # data.rebuild=true: replace the old entry (open memmaps keep their files)
            shutil.rmtree(path, ignore_errors=True)
        try:
            os.rename(tmp, path)
        except OSError:  # another process finished the same entry first; theirs is identical
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_packed(path: Path, splits=("train", "val")) -> tuple[dict[str, PackedSplit], dict] | None:
    """The cached splits, memory-mapped (reading is lazy, so this takes milliseconds); None on a miss."""
    path = Path(path)
    if not (path / "meta.json").exists():
        return None
    meta = json.loads((path / "meta.json").read_text())
    loaded = {s: PackedSplit(**{n: np.load(path / f"{s}.{n}.npy", mmap_mode="r") for n in FIELDS}) for s in splits}
    return loaded, meta
