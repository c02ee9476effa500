"""Corpora tokenized elsewhere, read where they lie: memory-mapped, never copied (`data=tokenized`).

  data.format=nanogpt    nanoGPT's prepare scripts: `train.bin` / `val.bin`, a raw array of token ids (uint16;
                         data.token_size=4 for uint32). Documents end at data.separator_id (or the tokenizer's
                         eot id) when one is given, the eot belonging to the document before it; otherwise a file
                         is one document (rows then cut it every seq_len tokens, as nanoGPT does).
  data.format=datatrove  datatrove's DocumentTokenizer output: `<name>.ds`, the token ids (little-endian, 2 or 4
                         bytes: the token size is the last `|` field of the first line of `<name>.ds.metadata`,
                         else data.token_size), and `<name>.ds.index`, uint64 document ends (in tokens).

Each file is a shard of the split's stream; the document offsets (8 bytes a document) are the only thing held
in memory, so the packing, the loader and the evaluation read these files exactly as they read the project's
own cache (runner/data/packing.py TokenSplit). One pass over a nanoGPT file finds its separators and its largest
id; it is cached under `cache_dir/tokenized/` by the file's path, size and modification time.
"""
import hashlib
import json
import logging
import os
import time
from pathlib import Path

import numpy as np

from runner.data.corpus import local_files
from runner.data.packing import TokenSplit
from runner.data.store import SPLITS

log = logging.getLogger(__name__)
FORMATS = ("nanogpt", "datatrove")
TOKENIZER_KINDS = ("ids", "hf")  # the ids are given: a tokenizer trained on text (bpe, char) would not match them
SCAN_CHUNK = 1 << 24  # tokens read at a time while looking for separators


def check_tokenized_config(d) -> None:
    """The checks that need neither the tokenizer nor a token read (check_data_config runs them)."""
    if d.get("format") not in FORMATS:
        raise ValueError(f"data.format={d.get('format')!r} must be one of {FORMATS} for data=tokenized")
    if int(d.get("token_size", 2)) not in (2, 4):
        raise ValueError(f"data.token_size={d.get('token_size')} must be 2 (uint16) or 4 (uint32)")
    local_files(d)
    local_files(d, "val_paths")


def check_tokenizer_fits(tok_cfg) -> None:
    if tok_cfg.kind not in TOKENIZER_KINDS:
        raise ValueError(f"tokenizer.kind={tok_cfg.kind!r} cannot describe ids tokenized elsewhere; with data=tokenized "
                         f"use tokenizer=ids tokenizer.vocab_size=N (tokenizer.eot_id=...) or tokenizer=hf with the "
                         f"tokenizer the corpus was made with")


def split_files(d) -> dict[str, list[str]]:
    return {"train": local_files(d), "val": local_files(d, "val_paths")}


def build_tokenized_data(cfg, cache_dir: Path):
    """The Data of a pre-tokenized corpus: the tokenizer from config, both splits memory-mapped."""
    from runner.data import Data, build_tokenizer, splits_stats  # here: runner.data imports this module lazily
    from runner.task import config_checks

    started = time.perf_counter()
    d = cfg.data
    with config_checks():
        check_tokenized_config(d)
        check_tokenizer_fits(cfg.tokenizer)
        files = split_files(d)
        tokenizer, tok_info = build_tokenizer(cfg.tokenizer, iter(()), "", cache_dir)
    separator = d.get("separator_id")
    separator = tokenizer.eot_id if separator is None else int(separator)
    arrays, largest, fingerprint = {}, {}, hashlib.sha256()
    for split in SPLITS:
        shards, offsets, largest[split] = read_split(files[split], d, separator, Path(cache_dir))
        arrays[split] = (shards, offsets)
        for f in files[split]:
            fingerprint.update(json.dumps([split, os.path.realpath(f), os.path.getsize(f)]).encode())
    with config_checks():
        for split in SPLITS:
            if largest[split] >= tokenizer.vocab_size:
                raise ValueError(f"tokenizer.vocab_size={tokenizer.vocab_size} is not above the largest token id "
                                 f"{largest[split]} of the {split} files {files[split][:3]}: set the vocabulary the "
                                 f"corpus was tokenized with")
        if not arrays["train"][0]:
            raise ValueError(f"data.paths={files['train'][:3]} hold no token")
    splits = {s: TokenSplit(*arrays[s], d.seq_len, d.packing, tokenizer.pad_id) for s in SPLITS}
    seconds = time.perf_counter() - started
    on_disk = {s: sum(os.path.getsize(f) for f in files[s]) for s in SPLITS}
    split_stats = splits_stats(splits, d, tokenizer, tok_info)
    tokens = sum(split_stats["tokens"].values())
    stats = {
        "corpus": d.name, "source": "tokenized", "format": d.format, "files": files,
        "fingerprint": fingerprint.hexdigest()[:16], "separator_id": separator, **split_stats,
        "token_dtype": arrays["train"][0][0].dtype.name, "shards": {s: len(arrays[s][0]) for s in SPLITS},
        "disk_bytes": on_disk, "bytes_per_token": sum(on_disk.values()) / max(1, tokens), "cached": True,
        "seconds": {"total": seconds}, "build_seconds": seconds, "tokens_per_s": tokens / max(seconds, 1e-9),
        "cache_path": None,
    }
    log.info(f"data: {d.format} token files, {stats['tokens']['train']:,} training / {stats['tokens']['val']:,} "
             f"validation tokens in {stats['documents']['train']:,} / {stats['documents']['val']:,} documents")
    return Data(tokenizer, splits["train"], splits["val"], stats)


def read_split(files: list[str], d, separator: int | None, cache_dir: Path):
    """(shards, offsets, largest id) of one split's files: shards memory-mapped, offsets (documents + 1,) int64."""
    shards, ends, largest, start = [], [np.zeros(1, dtype=np.int64)], -1, 0
    for f in files:
        if d.format == "datatrove":
            tokens, doc_ends = read_datatrove(f, d)
            top = scan(f, tokens, None, cache_dir)[1]
        else:
            tokens = memmap_tokens(f, int(d.get("token_size", 2)), "data.paths")
            doc_ends, top = scan(f, tokens, separator, cache_dir)
        if len(tokens) == 0:
            continue
        shards.append(tokens)
        ends.append(start + doc_ends)
        start += len(tokens)
        largest = max(largest, top)
    return shards, np.concatenate(ends), largest


def memmap_tokens(path: str, token_size: int, key: str) -> np.ndarray:
    size = os.path.getsize(path)
    if size % token_size:
        raise ValueError(f"{key}: {path} has {size} bytes, not a whole number of {token_size}-byte token ids "
                         f"(data.token_size={token_size})")
    if size == 0:
        return np.zeros(0, dtype=np.uint16)
    return np.memmap(path, dtype="<u2" if token_size == 2 else "<u4", mode="r", shape=(size // token_size,))


def scan(path: str, tokens: np.ndarray, separator: int | None, cache_dir: Path):
    """(document ends, largest id) of a token file: ends after each separator, and at the file's end."""
    stat = os.stat(path)
    key = json.dumps([os.path.realpath(path), stat.st_size, stat.st_mtime_ns, tokens.dtype.str, separator])
    cached = cache_dir / "tokenized" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"
    if cached.exists():
        with np.load(cached) as z:
            return z["ends"], int(z["largest"])
    ends, largest = [], -1
    for lo in range(0, len(tokens), SCAN_CHUNK):  # a chunk at a time: a 9B-token file needs no 9 GB mask
        chunk = np.asarray(tokens[lo:lo + SCAN_CHUNK])
        largest = max(largest, int(chunk.max()))
        if separator is not None:
            ends.append(lo + 1 + np.flatnonzero(chunk == separator))
    ends = np.concatenate(ends).astype(np.int64) if ends else np.zeros(0, dtype=np.int64)
    if len(tokens) and (not len(ends) or ends[-1] != len(tokens)):
        ends = np.append(ends, len(tokens))  # the text after the last separator is a document too
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_name(f".tmp_{os.getpid()}_{cached.name}")
    with open(tmp, "wb") as f:
        np.savez(f, ends=ends, largest=largest)
    os.replace(tmp, cached)
    return ends, largest


def read_datatrove(path: str, d):
    """(tokens, document ends) of a datatrove `.ds` file and its `.ds.index`."""
    token_size = int(d.get("token_size", 2))
    meta = Path(f"{path}.metadata")
    if meta.exists():  # "<tokenizer name>|<token size>", then the token count
        token_size = int(meta.read_text().splitlines()[0].rsplit("|", 1)[1])
    tokens = memmap_tokens(path, token_size, "data.paths")
    index = Path(f"{path}.index")
    if not index.exists():
        raise FileNotFoundError(f"data.paths: {path} has no {index.name} (datatrove's document ends); give the "
                                f".ds files that DocumentTokenizer wrote with their index")
    ends = np.fromfile(index, dtype="<u8").astype(np.int64)
    if len(ends) and ends[-1] != len(tokens) or (not len(ends) and len(tokens)) or np.any(np.diff(ends) < 0):
        raise ValueError(f"data.paths: {index} does not index {path} ({len(tokens)} tokens; its document ends "
                         f"{'end at ' + str(ends[-1]) if len(ends) else 'are empty'}, or do not increase)")
    return tokens, ends
