"""Rows of seq_len derived from one flat token stream plus document offsets, and their conventions.

A split is stored as one stream of token ids (each document followed by its end-of-text token) and the
offsets where documents start (runner/data/store.py). The four arrays of a row are computed per batch:
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
import math
from dataclasses import dataclass

import numpy as np

FIELDS = ("input_ids", "labels", "position_ids", "document_ids")
PACKING_MODES = ("documents", "none")
IGNORE = -100  # the label F.cross_entropy skips
PAD_DOC = -1


@dataclass
class PackedSplit:
    """Four int64 arrays of shape (N, seq_len) held in memory: a hand-made split (tests); the pipeline's
    splits are TokenSplits, which offer the same len / seq_len / rows / efficiency."""
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


class TokenSplit:
    """A split as a flat token stream (one array, or shards read as one) and document offsets; rows of
    seq_len are derived on demand, so memory holds a batch, never the split's (N, seq_len) arrays.

    offsets: (documents + 1,) int64; document d is stream[offsets[d]:offsets[d + 1]], its eot included.
    """

    def __init__(self, shards, offsets, seq_len: int, packing: str, pad_id: int):
        if seq_len < 2:
            raise ValueError(f"data.seq_len={seq_len} must be >= 2: a row needs a token and its next-token target")
        if packing not in PACKING_MODES:
            raise ValueError(f"data.packing={packing!r} must be one of {PACKING_MODES}")
        self.shards = [s for s in shards if len(s)]
        self.shard_starts = np.cumsum([0] + [len(s) for s in self.shards])  # (shards + 1,)
        self.offsets = offsets
        self.n_tokens = int(offsets[-1])
        if self.n_tokens != int(self.shard_starts[-1]):
            raise ValueError(f"the offsets index ends at {self.n_tokens} tokens, the shards hold {self.shard_starts[-1]}")
        self.packing, self.pad_id, self._seq_len = packing, pad_id, seq_len
        if packing == "documents":
            self.n_rows = math.ceil(self.n_tokens / seq_len)
        else:  # each document starts a row: the first row of each, from the lengths (O(documents) memory)
            doc_rows = -(-np.diff(np.asarray(offsets, dtype=np.int64)) // seq_len)
            self.first_row = np.cumsum(doc_rows) - doc_rows
            self.n_rows = int(doc_rows.sum())

    def __len__(self) -> int:
        return self.n_rows

    @property
    def seq_len(self) -> int:
        return self._seq_len

    def efficiency(self) -> float:
        """The share of slots that hold a real token (a document's token or its eot), not padding."""
        return self.n_tokens / (self.n_rows * self.seq_len) if self.n_rows else 0.0

    def take(self, pos: np.ndarray) -> np.ndarray:
        """Stream tokens at global positions `pos` (any shape), as int64, from whichever shards hold them."""
        if len(self.shards) == 1:
            return self.shards[0][pos].astype(np.int64)
        out = np.empty(pos.shape, dtype=np.int64)
        shard = np.searchsorted(self.shard_starts, pos, side="right") - 1
        for k in np.flatnonzero(np.bincount(shard.ravel(), minlength=len(self.shards))):
            m = shard == k
            out[m] = self.shards[k][pos[m] - self.shard_starts[k]]
        return out

    def rows(self, index) -> dict[str, np.ndarray]:
        """The four (len(index), seq_len) int64 arrays of these rows (an int gives (seq_len,) arrays)."""
        scalar = np.ndim(index) == 0 and not isinstance(index, slice)
        if isinstance(index, slice):
            r = np.arange(*index.indices(len(self)), dtype=np.int64)
        else:
            r = np.atleast_1d(np.asarray(index, dtype=np.int64))
            r = np.where(r < 0, r + len(self), r)
            if r.size and (r.min() < 0 or r.max() >= len(self)):
                raise IndexError(f"row index out of range for a split of {len(self)} rows")
        T, offsets = self.seq_len, self.offsets
        if self.packing == "documents":  # row r is the stream's slots [r*T, r*T + T)
            start = r * T
            end = np.minimum(start + T, self.n_tokens)
        else:  # row r is piece k of document d
            d = np.searchsorted(self.first_row, r, side="right") - 1
            start = offsets[d] + (r - self.first_row[d]) * T
            end = np.minimum(start + T, offsets[d + 1])
        out = self.slots(start, end)
        return {k: v[0] for k, v in out.items()} if scalar else out

    def windows(self, starts) -> dict[str, np.ndarray]:
        """The four (len(starts), seq_len) arrays of windows of the stream starting at any token (nanoGPT's
        random offsets), whatever data.packing says; a document cut by a window's start has positions from 0."""
        start = np.asarray(starts, dtype=np.int64)
        if start.size and (start.min() < 0 or start.max() > self.n_tokens - self.seq_len - 1):
            raise IndexError(f"a window of {self.seq_len} tokens and its last label must fit the {self.n_tokens} tokens")
        return self.slots(start, start + self.seq_len)

    def slots(self, start: np.ndarray, end: np.ndarray) -> dict[str, np.ndarray]:
        """Rows of the stream's slots [start, end), padded to seq_len: the packing conventions above."""
        T, offsets = self.seq_len, self.offsets
        s = start[:, None] + np.arange(T + 1)                  # (B, T + 1): the slots and one more for labels
        real = s[:, :T] < end[:, None]                           # (B, T)
        g = self.take(np.minimum(s, max(self.n_tokens - 1, 0))) if self.n_tokens else np.zeros(s.shape, np.int64)
        doc = np.searchsorted(offsets, s[:, :T], side="right") - 1  # (B, T), wrong on padding: masked below
        doc = np.minimum(doc, len(offsets) - 2)
        doc_start, doc_end = offsets[doc], offsets[doc + 1]
        input_ids = np.where(real, g[:, :T], self.pad_id)
        labels = np.where(real & (s[:, 1:] < doc_end), g[:, 1:], IGNORE)  # the eot's next slot is another document
        position_ids = np.where(real, s[:, :T] - np.maximum(doc_start, start[:, None]), 0)
        document_ids = np.where(real, doc, PAD_DOC)
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "document_ids": document_ids}

    # The whole split's arrays, materialized: for tests and small corpora only (training reads rows()).
    input_ids = property(lambda self: self.rows(slice(None))["input_ids"])
    labels = property(lambda self: self.rows(slice(None))["labels"])
    position_ids = property(lambda self: self.rows(slice(None))["position_ids"])
    document_ids = property(lambda self: self.rows(slice(None))["document_ids"])


def pack(docs: list[list[int]], eot_id: int, pad_id: int, seq_len: int, packing: str = "documents") -> TokenSplit:
    """Documents (token id lists, no separators) as an in-memory TokenSplit; see the module docstring."""
    lengths = np.array([len(d) + 1 for d in docs], dtype=np.int64)  # + 1: the eot
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    stream = np.concatenate([np.append(np.asarray(d, dtype=np.int64), eot_id) for d in docs]) if docs else \
        np.zeros(0, dtype=np.int64)
    return TokenSplit([stream], offsets, seq_len, packing, pad_id)


def rows_needed(lengths, seq_len: int, packing: str) -> int:
    """Rows that documents of these lengths (eot included) take in a packing mode, without packing them."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if packing == "documents":
        return math.ceil(int(lengths.sum()) / seq_len)
    return int((-(-lengths // seq_len)).sum())
