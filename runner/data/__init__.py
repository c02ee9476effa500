"""The packed-document data pipeline: corpus -> tokenizer -> token stream on disk -> rows -> batches.

    data = build_data(cfg)                    # cfg: the composed config (cfg.data, cfg.tokenizer, cfg.cache_dir)
    loader = BatchLoader(data.train, batch_size=16, seed=0)
    batch = next(loader)                      # {"input_ids", "labels", "position_ids", "document_ids"}: (B, T) int64
    for batch in data.val_batches(16): ...    # every validation row once, in order

Documents are streamed and tokenized in bounded chunks by `data.num_proc` worker processes
(runner/data/encode.py) into one flat uint16/uint32 token stream per split plus document offsets, cached under
`cache_dir/packed/` by corpus fingerprint, tokenizer fingerprint, seq_len and packing (runner/data/store.py);
rows and their labels, positions and document ids are derived per batch (runner/data/packing.py).
`python run.py task=data` prepares the run's cache (and prints its statistics); `task=data data.bench=true` is the
data benchmark: a cold build in a fresh cache, then the cached load.
"""
import hashlib
import json
import logging
import resource
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from runner.data.corpus import load_corpus, local_files
from runner.data.encode import tokenize_streams
from runner.data.sampling import SAMPLING, WindowLoader, batch_loader  # noqa: F401 (the loaders' public face)
from runner.data.packing import PACKING_MODES, PackedSplit, TokenSplit, rows_needed
from runner.data.store import SPLITS, SplitWriter, commit_entry, disk_bytes, load_entry, new_entry, token_dtype
from runner.data.tokenizer import Tokenizer, build_tokenizer, check_tokenizer_config
from runner.task import config_checks

log = logging.getLogger(__name__)
CACHE_VERSION = 2  # bump when the cached layout changes, so old cache entries are not reused (2: token streams)
VERIFY = ("size", "checksum")


@dataclass
class Data:
    tokenizer: Tokenizer
    train: TokenSplit
    val: TokenSplit
    stats: dict

    def val_batches(self, batch_size: int, max_batches: int | None = None):
        return iter_eval_batches(self.val, batch_size, max_batches)


def check_data_config(d) -> None:
    """The checks that need no data, so a bad config fails before the corpus is read."""
    if d.seq_len is None or d.seq_len < 2:
        raise ValueError(f"data.seq_len={d.seq_len} must be >= 2: a row needs a token and its next-token target")
    if d.packing not in PACKING_MODES:
        raise ValueError(f"data.packing={d.packing!r} must be one of {PACKING_MODES}")
    if int(d.get("num_proc", 1) or 0) < 1:
        raise ValueError(f"data.num_proc={d.get('num_proc')} must be >= 1 (worker processes that tokenize)")
    if d.get("max_tokens") is not None and d.max_tokens < 1:
        raise ValueError(f"data.max_tokens={d.max_tokens} must be >= 1 or null")
    if int(d.get("shard_tokens", 1) or 0) < 1:
        raise ValueError(f"data.shard_tokens={d.get('shard_tokens')} must be >= 1")
    if d.get("verify", "size") not in VERIFY:
        raise ValueError(f"data.verify={d.get('verify')!r} must be one of {VERIFY}")
    if d.get("sampling", "rows") not in SAMPLING:
        raise ValueError(f"data.sampling={d.get('sampling')!r} must be one of {SAMPLING}")
    if d.get("source") == "local":
        local_files(d)  # the files exist (globs only, nothing read)
    if d.get("source") == "tokenized":
        from runner.data.tokenized import check_tokenized_config
        check_tokenized_config(d)


def build_data(cfg, cache_dir=None, rebuild: bool | None = None, num_proc: int | None = None) -> Data:
    """Describe the corpus, get the tokenizer (trained once), and tokenize both splits into the cache, or load
    them from it. `num_proc` overrides data.num_proc (the benchmark compares worker counts)."""
    started = time.perf_counter()
    d = cfg.data
    check_data_config(d)
    cache_dir = Path(cache_dir if cache_dir is not None else cfg.cache_dir)
    rebuild = bool(d.get("rebuild", False)) if rebuild is None else rebuild

    with config_checks():
        check_tokenizer_config(cfg.tokenizer)
    if d.get("source") == "tokenized":  # ids made elsewhere (nanoGPT, datatrove): read where they lie
        from runner.data.tokenized import build_tokenized_data
        return build_tokenized_data(cfg, cache_dir)
    log.info(f"data: reading the {d.name} corpus")
    with config_checks():  # what the corpus itself refuses (too small to split, no documents) names the key to change
        corpus = load_corpus(d, cache_dir)
    corpus_s = time.perf_counter() - started
    tokenizer, tok_info = build_tokenizer(cfg.tokenizer, corpus.texts("train"), corpus.fingerprint, cache_dir, rebuild)
    tokenizer_s = time.perf_counter() - started - corpus_s

    key = json.dumps([CACHE_VERSION, corpus.fingerprint, tokenizer.fingerprint, d.seq_len, d.packing,
                      d.get("max_tokens")])
    path = cache_dir / "packed" / f"{d.name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    checksums = d.get("verify", "size") == "checksum"
    hit = None if rebuild else load_entry(path, CACHE_VERSION, checksums)
    if hit is None:
        log.info(f"data: tokenizing into rows of {d.seq_len} tokens (cached in {path})")
        write_entry(path, corpus, tokenizer, d, num_proc or int(d.get("num_proc", 1)))
        meta, arrays = load_entry(path, CACHE_VERSION, checksums)
    else:
        log.info(f"data: packed rows from the cache {path}")
        meta, arrays = hit
    splits = {s: TokenSplit(*arrays[s], d.seq_len, d.packing, tokenizer.pad_id) for s in SPLITS}
    seconds = time.perf_counter() - started

    on_disk = disk_bytes(meta)
    split_stats = splits_stats(splits, d, tokenizer, tok_info)
    tokens = sum(split_stats["tokens"].values())
    stats = {
        "corpus": corpus.name, **corpus.meta, "fingerprint": corpus.fingerprint, **split_stats,
        "token_dtype": meta["dtype"], "num_proc": meta["num_proc"], "shards": {s: len(arrays[s][0]) for s in SPLITS},
        "disk_bytes": on_disk, "bytes_per_token": sum(on_disk.values()) / max(1, tokens),
        "cached": hit is not None,
        "seconds": {"corpus": corpus_s, "tokenizer": tokenizer_s, "tokenize": 0.0 if hit else meta["tokenize_seconds"],
                    "pack": 0.0, "total": seconds},
        "build_seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "cache_path": str(path),
    }
    return Data(tokenizer, splits["train"], splits["val"], stats)


def write_entry(path: Path, corpus, tokenizer: Tokenizer, d, num_proc: int) -> None:
    """Tokenize the corpus into a new cache entry at `path` (atomically: see store.commit_entry)."""
    t0 = time.perf_counter()
    tmp = new_entry(path)
    try:
        dtype = token_dtype(tokenizer.vocab_size)
        shard_tokens = int(d.get("shard_tokens") or 2 ** 28)
        writers = {s: SplitWriter(tmp, s, dtype, shard_tokens) for s in SPLITS}
        tokenize_streams(corpus.streams, tokenizer, writers, tmp / "work", num_proc, d.get("max_tokens"))
        shutil.rmtree(tmp / "work", ignore_errors=True)
        splits = {s: w.close() for s, w in writers.items()}
        if splits["train"]["documents"] == 0:
            raise ValueError(f"corpus {corpus.name!r} gave no training document"
                             + (f" within data.max_tokens={d.max_tokens}" if d.get("max_tokens") else ""))
        meta = {"version": CACHE_VERSION, "dtype": dtype.name, "num_proc": num_proc, "splits": splits,
                "tokenize_seconds": time.perf_counter() - t0}
        commit_entry(tmp, path, meta)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def splits_stats(splits: dict, d, tokenizer: Tokenizer, tok_info: dict) -> dict:
    """What data.stats says of the packed splits, whatever the source: tokenizer, documents, tokens, rows and
    packing efficiency (the configured mode's, and each mode's from the document lengths)."""
    info = {s: split_info(splits[s], d.seq_len) for s in SPLITS}
    return {
        "tokenizer": {**tok_info, "vocab_size": tokenizer.vocab_size, "eot_id": tokenizer.eot_id,
                      "fingerprint": tokenizer.fingerprint},
        "seq_len": d.seq_len, "packing": d.packing,
        "documents": {s: info[s]["documents"] for s in SPLITS},
        "tokens": {s: info[s]["tokens"] for s in SPLITS},
        "rows": {s: len(splits[s]) for s in SPLITS},
        "packing_efficiency": info["train"]["packing_efficiency_by_mode"][d.packing],
        "packing_efficiency_by_mode": {m: {s: info[s]["packing_efficiency_by_mode"][m] for s in SPLITS}
                                       for m in PACKING_MODES},
    }


def split_info(split: TokenSplit, seq_len: int) -> dict:
    lengths = np.diff(np.asarray(split.offsets))  # (documents,): eot included
    n = int(lengths.sum())
    return {"documents": len(lengths), "tokens": n,
            # what the other mode would cost, from the document lengths alone
            "packing_efficiency_by_mode": {m: n / max(1, rows_needed(lengths, seq_len, m) * seq_len)
                                           for m in PACKING_MODES}}


def peak_rss_bytes() -> dict:
    """Peak resident memory of this process and of its largest finished child (Linux reports KiB)."""
    return {"self": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "children": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}


def to_batch(split: PackedSplit, index) -> dict[str, torch.Tensor]:
    return {name: torch.from_numpy(np.ascontiguousarray(arr, dtype=np.int64)) for name, arr in split.rows(index).items()}


class BatchLoader:
    """An endless stream of (batch_size, seq_len) batches, epoch after epoch.

    Each epoch is a fresh permutation of the rows drawn from (seed, epoch), so the order depends on nothing
    else. With world_size > 1 every rank takes every world_size-th row of that permutation (disjoint, equal
    shards, like DistributedSampler); rows that do not fill a whole batch on every rank are left out of that
    epoch only. state_dict() is (epoch, batches already served in it): load it and the next batch is exactly
    the one that would have come next.
    """

    def __init__(self, split: PackedSplit, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        self.split, self.batch_size, self.seed, self.rank, self.world_size = split, batch_size, seed, rank, world_size
        self.batches_per_epoch = len(split) // world_size // batch_size
        if self.batches_per_epoch == 0:
            raise ValueError(f"the split has {len(split)} rows, fewer than batch_size={batch_size} x "
                             f"world_size={world_size}; use a bigger corpus, a smaller batch or a shorter data.seq_len")
        self.epoch, self.position = 0, 0
        self._order_epoch, self._order = None, None

    def epoch_order(self, epoch: int) -> np.ndarray:
        """This rank's rows for `epoch`, in the order they are served."""
        if self._order_epoch != epoch:
            perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.split))
            used = self.batches_per_epoch * self.batch_size * self.world_size
            self._order, self._order_epoch = perm[:used][self.rank::self.world_size], epoch
        return self._order

    def __iter__(self):
        return self

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.position == self.batches_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        b = self.position * self.batch_size
        index = self.epoch_order(self.epoch)[b:b + self.batch_size]
        self.position += 1
        return to_batch(self.split, index)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        if state.get("sampling", "rows") != "rows":
            raise ValueError("the checkpoint's loader drew random windows; resume it with data.sampling=windows")
        if not 0 <= state["position"] <= self.batches_per_epoch:
            raise ValueError(f"loader state position={state['position']} does not fit an epoch of "
                             f"{self.batches_per_epoch} batches: was it saved with another batch size or corpus?")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def iter_eval_batches(split: PackedSplit, batch_size: int, max_batches: int | None = None, rank: int = 0,
                      world_size: int = 1):
    """Every row (of this rank's share) once, in stored order; the last batch may be smaller."""
    rows = np.arange(len(split))[rank::world_size]
    n_batches = -(-len(rows) // batch_size)
    for b in range(n_batches if max_batches is None else min(max_batches, n_batches)):
        yield to_batch(split, rows[b * batch_size:(b + 1) * batch_size])


# ---------------------------------------------------------------------------------------------------- task=data

def main(cfg):
    """`python run.py task=data`: prepare the run's data in its own cache (what train, eval and bench then
    load: the tokenizer trained, both splits tokenized), print the corpus statistics, write data_stats.json.
    `task=data data.bench=true` is the data benchmark instead (see benchmark())."""
    from runner.tracking import atomic_write_json, output_dir

    with config_checks():
        check_data_config(cfg.data)
        check_tokenizer_config(cfg.tokenizer)
    if cfg.data.get("bench", False):
        return benchmark(cfg)
    stats = build_data(cfg).stats
    how = "already cached" if stats["cached"] else f"built in {stats['build_seconds']:.1f} s"
    print(format_table(stats) + f"\nready in {stats.get('cache_path') or stats.get('files')} ({how})")
    path = output_dir() / "data_stats.json"
    atomic_write_json(path, stats)
    print(f"wrote {path}")
    return stats


def benchmark(cfg):
    """`python run.py task=data data.bench=true`: build the data cold (in a fresh cache directory, tokenizer
    training included) with one tokenizing process, tokenize again with N worker processes (data.num_proc, or every
    core when it is 1), load the result from the cache and derive every row once; print the corpus
    statistics and write data_stats.json. The run's own cache is left as it was."""
    import os

    from runner.tracking import atomic_write_json, output_dir

    if cfg.data.get("source") == "tokenized":
        with config_checks():
            raise ValueError("data.bench=true measures tokenizing, and data=tokenized has nothing to tokenize")
    cache_root = Path(cfg.cache_dir)
    cache_root.mkdir(parents=True, exist_ok=True)
    workers = int(cfg.data.get("num_proc", 1)) if int(cfg.data.get("num_proc", 1)) > 1 else max(2, os.cpu_count() or 1)
    with tempfile.TemporaryDirectory(dir=cache_root, prefix="data-bench-") as fresh:
        cold = build_data(cfg, cache_dir=fresh, rebuild=True, num_proc=1).stats
        shutil.rmtree(cold["cache_path"])  # keep the tokenizer, tokenize again
        parallel = build_data(cfg, cache_dir=fresh, num_proc=workers).stats
        cached_data = build_data(cfg, cache_dir=fresh)
        cached = cached_data.stats
        t0 = time.perf_counter()  # the memory map reads lazily: derive every row once, as training would
        for split in (cached_data.train, cached_data.val):
            for batch in iter_eval_batches(split, 1024):
                batch["input_ids"].sum()
        cached["read_seconds"] = time.perf_counter() - t0
        del cached_data  # release the memory maps before the temporary cache is removed
    stats = {**cold, "cache_path": None, "cold": summary(cold), "parallel": summary(parallel),
             "cached_load": summary(cached), "peak_rss_bytes": peak_rss_bytes()}
    print(format_stats(stats))
    path = output_dir() / "data_stats.json"
    atomic_write_json(path, stats)
    print(f"wrote {path}")
    return stats


def summary(s: dict) -> dict:
    tokens = s["tokens"]["train"] + s["tokens"]["val"]
    tokenize_s = s["seconds"]["tokenize"] + s["seconds"]["pack"]
    return {"seconds": s["seconds"], "tokens_per_s": s["tokens_per_s"], "read_seconds": s.get("read_seconds"),
            "num_proc": s["num_proc"], "tokenize_pack_tokens_per_s": tokens / tokenize_s if tokenize_s else None}


def format_table(s: dict) -> str:
    """The corpus, its tokenizer and the split's documents, tokens, rows, packing and bytes on disk."""
    tok, eff = s["tokenizer"], s["packing_efficiency_by_mode"]
    other = [m for m in PACKING_MODES if m != s["packing"]][0]
    lines = [
        f"corpus {s['corpus']} ({s['source']}, Python {s.get('python_version', '-')}, fingerprint {s['fingerprint']})",
        f"tokenizer {tok['kind']} (vocab {tok['vocab_size']}), seq_len {s['seq_len']}, packing {s['packing']}",
        "",
        f"{'':<28}{'train':>12}{'val':>12}",
    ]
    for key in ("documents", "tokens", "rows"):
        lines.append(f"{key:<28}{s[key]['train']:>12,}{s[key]['val']:>12,}")
    lines += [
        f"{'packing efficiency':<28}{eff[s['packing']]['train']:>12.1%}{eff[s['packing']]['val']:>12.1%}"
        f"   (share of non-pad tokens)",
        f"{'  with packing=' + other:<28}{eff[other]['train']:>12.1%}{eff[other]['val']:>12.1%}",
        f"{'on disk (bytes)':<28}{s['disk_bytes']['train']:>12,}{s['disk_bytes']['val']:>12,}"
        f"   ({s['bytes_per_token']:.2f} bytes/token, {s['token_dtype']} ids + int64 document offsets)",
    ]
    return "\n".join(lines) + "\n"


def format_stats(s: dict) -> str:
    cold, parallel, cached = s["cold"], s["parallel"], s["cached_load"]
    mib = 2 ** 20
    lines = [
        format_table(s),
        f"cold build    {cold['seconds']['total']:7.2f} s  {cold['tokens_per_s']:>12,.0f} tokens/s   (corpus "
        f"{cold['seconds']['corpus']:.2f} s, tokenizer {cold['seconds']['tokenizer']:.2f} s, tokenize "
        f"{cold['seconds']['tokenize']:.2f} s = {cold['tokenize_pack_tokens_per_s'] or 0:,.0f} tokens/s with 1 process)",
        f"tokenize      {parallel['seconds']['tokenize']:7.2f} s  {parallel['tokenize_pack_tokens_per_s'] or 0:>12,.0f}"
        f" tokens/s   with {parallel['num_proc']} worker processes (data.num_proc)",
        f"cached load   {cached['seconds']['total']:7.2f} s  {cached['tokens_per_s']:>12,.0f} tokens/s   "
        f"(memory-mapped; deriving every row once takes {cached['read_seconds']:.3f} s more)",
        f"peak memory   {s['peak_rss_bytes']['self'] / mib:7.0f} MiB resident (this process, imports included); "
        f"largest worker {s['peak_rss_bytes']['children'] / mib:.0f} MiB",
    ]
    return "\n".join(lines) + "\n"
