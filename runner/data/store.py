"""The on-disk token cache: per split, one flat stream of token ids in shards plus a document-offsets index.

    cache_dir/packed/<corpus>-<key>/
        meta.json                        sizes and sha256 of every file below, counts, timings (written last)
        train.tokens.00000.bin, ...      uint16 ids (uint32 when the vocabulary has more than 65,536), raw
        train.offsets.bin                int64, documents + 1 entries: where each document starts, then the end
        val.tokens.00000.bin, val.offsets.bin

The layout of nanoGPT's and OLMo's token files (a raw array anyone can np.memmap), so a token costs 2 bytes
(4 with a big vocabulary) plus 8 per document. An entry is written into a temporary directory renamed at
the end, so a reader (or a concurrent sweep job) never sees half of one; on load every file's size is
checked against meta.json (and, with data.verify=checksum, its sha256), and a damaged entry is rebuilt.
"""
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)
SPLITS = ("train", "val")


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2 ** 16 else np.uint32)


class SplitWriter:
    """Appends documents' tokens to `<split>.tokens.NNNNN.bin` files of shard_tokens each, and their ends to
    `<split>.offsets.bin`, hashing as it writes; memory holds one appended piece at a time."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.directory, self.split, self.dtype, self.shard_tokens = Path(directory), split, np.dtype(dtype), shard_tokens
        self.shards, self.documents, self.tokens = [], 0, 0
        self._file = self._hash = None
        self._offsets = open(self.directory / f"{split}.offsets.bin", "wb")
        self._offsets_hash = hashlib.sha256()
        self._write_offsets(np.zeros(1, dtype=np.int64))

    def _write_offsets(self, values: np.ndarray) -> None:
        data = values.astype(np.int64).tobytes()
        self._offsets.write(data)
        self._offsets_hash.update(data)

    def add(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Whole documents: `tokens` is their concatenation (eots included), `lengths` their sizes."""
        tokens = np.asarray(tokens)
        if tokens.size and int(tokens.max()) > np.iinfo(self.dtype).max:
            raise ValueError(f"token id {int(tokens.max())} does not fit {self.dtype.name}")
        self._write_offsets(self.tokens + np.cumsum(lengths, dtype=np.int64))
        self.documents += len(lengths)
        tokens = tokens.astype(self.dtype, copy=False)
        while tokens.size:
            if self._file is None or self.shards[-1]["tokens"] == self.shard_tokens:
                self._open_shard()
            room = self.shard_tokens - self.shards[-1]["tokens"]
            piece, tokens = tokens[:room], tokens[room:]
            data = piece.tobytes()
            self._file.write(data)
            self._hash.update(data)
            self.shards[-1]["tokens"] += len(piece)
            self.tokens += len(piece)

    def _open_shard(self) -> None:
        self._close_shard()
        name = f"{self.split}.tokens.{len(self.shards):05d}.bin"
        self._file, self._hash = open(self.directory / name, "wb"), hashlib.sha256()
        self.shards.append({"file": name, "tokens": 0})

    def _close_shard(self) -> None:
        if self._file is not None:
            self._file.close()
            self.shards[-1].update(bytes=self.shards[-1]["tokens"] * self.dtype.itemsize, sha256=self._hash.hexdigest())
            self._file = None

    def close(self) -> dict:
        self._close_shard()
        self._offsets.close()
        return {"documents": self.documents, "tokens": self.tokens, "dtype": self.dtype.name, "shards": self.shards,
                "offsets": {"file": f"{self.split}.offsets.bin", "bytes": 8 * (self.documents + 1),
                            "sha256": self._offsets_hash.hexdigest()}}


def new_entry(path: Path) -> Path:
    """A temporary directory beside `path` to write an entry into (see commit_entry)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=path.parent, prefix=f".tmp_{path.name}_"))


def commit_entry(tmp: Path, path: Path, meta: dict) -> None:
    """Write meta.json last and rename the directory into place: readers see a whole entry or none."""
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    if path.exists():  # data.rebuild=true or a damaged entry: replace it (open memmaps keep their files)
        shutil.rmtree(path, ignore_errors=True)
    try:
        os.rename(tmp, path)
    except OSError:  # another process finished the same entry first; theirs is identical
        shutil.rmtree(tmp, ignore_errors=True)


def files_of(split_meta: dict) -> list[dict]:
    return [*split_meta["shards"], split_meta["offsets"]]


def damage(path: Path, meta: dict, checksums: bool) -> str | None:
    """What is wrong with the entry's files (missing, a size, a checksum), or None when they match meta.json."""
    for split in SPLITS:
        for f in files_of(meta["splits"][split]):
            p = path / f["file"]
            if not p.exists():
                return f"{f['file']} is missing"
            if p.stat().st_size != f["bytes"]:
                return f"{f['file']} has {p.stat().st_size} bytes, meta.json says {f['bytes']}"
            if checksums and file_sha256(p) != f["sha256"]:
                return f"{f['file']} does not match its sha256 in meta.json"
    return None


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def load_entry(path: Path, version: int, checksums: bool = False):
    """(meta, {split: (shards, offsets)}) memory-mapped, or None on a miss or a damaged entry (logged)."""
    path = Path(path)
    if not (path / "meta.json").exists():
        return None
    meta = json.loads((path / "meta.json").read_text())
    if meta.get("version") != version:
        return None
    problem = damage(path, meta, checksums)
    if problem is not None:
        log.warning("cache entry %s is damaged (%s); rebuilding it", path, problem)
        return None
    arrays = {}
    for split in SPLITS:
        m = meta["splits"][split]
        shards = [np.memmap(path / s["file"], dtype=m["dtype"], mode="r", shape=(s["tokens"],)) for s in m["shards"]]
        offsets = np.memmap(path / m["offsets"]["file"], dtype=np.int64, mode="r", shape=(m["documents"] + 1,))
        arrays[split] = (shards, offsets)
    return meta, arrays


def disk_bytes(meta: dict) -> dict:
    """Bytes on disk per split (shards + offsets)."""
    return {split: sum(f["bytes"] for f in files_of(meta["splits"][split])) for split in SPLITS}
