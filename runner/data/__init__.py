"""The packed-document data pipeline: corpus -> tokenizer -> packed rows -> batches.

    data = build_data(cfg)                    # cfg: the composed config (cfg.data, cfg.tokenizer, cfg.cache_dir)
    loader = BatchLoader(data.train, batch_size=16, seed=0)
    batch = next(loader)                      # {"input_ids", "labels", "position_ids", "document_ids"}: (B, T) int64
    for batch in data.val_batches(16): ...    # every validation row once, in order

Row conventions (labels, positions, document ids) are in runner/data/packing.py. Tokenized and packed splits are
cached under `cache_dir/packed/` by corpus fingerprint, tokenizer fingerprint, seq_len and packing mode.
`python run.py task=data` is the data benchmark: a cold build in a fresh cache, then the cached load.
"""
import hashlib
import json
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from runner.data.corpus import load_corpus
from runner.data.packing import FIELDS, PACKING_MODES, PackedSplit, load_packed, pack, rows_needed, save_packed
from runner.data.tokenizer import Tokenizer, build_tokenizer

log = logging.getLogger(__name__)
CACHE_VERSION = 1  # bump when the packed layout changes, so old cache entries are not reused


@dataclass
class Data:
    tokenizer: Tokenizer
    train: PackedSplit
    val: PackedSplit
    stats: dict

    def val_batches(self, batch_size: int, max_batches: int | None = None):
        return iter_eval_batches(self.val, batch_size, max_batches)


def check_data_config(d) -> None:
    """The checks that need no data, so a bad config fails before the corpus is read."""
    if d.seq_len is None or d.seq_len < 2:
        raise ValueError(f"data.seq_len={d.seq_len} must be >= 2: a row needs a token and its next-token target")
    if d.packing not in PACKING_MODES:
        raise ValueError(f"data.packing={d.packing!r} must be one of {PACKING_MODES}")


def build_data(cfg, cache_dir=None, rebuild: bool | None = None) -> Data:
    """Load the corpus, get the tokenizer (trained once), and pack both splits, or load them from the cache."""
    started = time.perf_counter()
    d = cfg.data
    check_data_config(d)
    cache_dir = Path(cache_dir if cache_dir is not None else cfg.cache_dir)
    rebuild = bool(d.get("rebuild", False)) if rebuild is None else rebuild

    log.info(f"data: reading the {d.name} corpus")
    corpus = load_corpus(d, cache_dir)
    corpus_s = time.perf_counter() - started
    log.info(f"data: {len(corpus.train):,} train / {len(corpus.val):,} validation documents ({corpus_s:.1f} s); "
             f"tokenizer {cfg.tokenizer.kind}")
    tokenizer, tok_info = build_tokenizer(cfg.tokenizer, corpus.train, corpus.fingerprint, cache_dir, rebuild)
    tokenizer_s = time.perf_counter() - started - corpus_s

    key = json.dumps([CACHE_VERSION, corpus.fingerprint, tokenizer.fingerprint, d.seq_len, d.packing])
    path = cache_dir / "packed" / f"{d.name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    hit = None if rebuild else load_packed(path)
    if hit is not None:
        splits, meta = hit
        log.info(f"data: packed rows from the cache {path}")
    else:
        log.info(f"data: tokenizing and packing rows of {d.seq_len} tokens (cached in {path})")
        splits, meta = {}, {"tokenize_seconds": 0.0, "pack_seconds": 0.0}
        for split, texts in (("train", corpus.train), ("val", corpus.val)):
            t0 = time.perf_counter()
            docs = tokenize(tokenizer, texts)
            t1 = time.perf_counter()
            splits[split] = pack(docs, tokenizer.eot_id, tokenizer.pad_id, d.seq_len, d.packing)
            meta["tokenize_seconds"] += t1 - t0
            meta["pack_seconds"] += time.perf_counter() - t1
            lengths = [len(doc) + 1 for doc in docs]
            meta[split] = {
                "documents": len(docs), "tokens": int(sum(lengths)), "rows": len(splits[split]),
                # what the other mode would cost, from the document lengths alone
                "packing_efficiency_by_mode": {m: sum(lengths) / max(1, rows_needed(lengths, d.seq_len, m) * d.seq_len)
                                               for m in PACKING_MODES},
            }
        save_packed(path, splits, meta)
    seconds = time.perf_counter() - started

    tokens = meta["train"]["tokens"] + meta["val"]["tokens"]
    stats = {
        "corpus": corpus.name, **corpus.meta, "fingerprint": corpus.fingerprint,
        "tokenizer": {**tok_info, "vocab_size": tokenizer.vocab_size, "eot_id": tokenizer.eot_id,
                      "fingerprint": tokenizer.fingerprint},
        "seq_len": d.seq_len, "packing": d.packing,
        "documents": {s: meta[s]["documents"] for s in ("train", "val")},
        "tokens": {s: meta[s]["tokens"] for s in ("train", "val")},
        "rows": {s: meta[s]["rows"] for s in ("train", "val")},
        "packing_efficiency": meta["train"]["packing_efficiency_by_mode"][d.packing],
        "packing_efficiency_by_mode": {m: {s: meta[s]["packing_efficiency_by_mode"][m] for s in ("train", "val")}
                                       for m in PACKING_MODES},
        "cached": hit is not None,
        "seconds": {"corpus": corpus_s, "tokenizer": tokenizer_s, "tokenize": 0.0 if hit else meta["tokenize_seconds"],
                    "pack": 0.0 if hit else meta["pack_seconds"], "total": seconds},
        "build_seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "cache_path": str(path),
    }
    return Data(tokenizer, splits["train"], splits["val"], stats)


def tokenize(tokenizer: Tokenizer, texts: list[str], chunk: int = 1024) -> list[list[int]]:
    """Batch encoding (parallel inside `tokenizers`), in chunks so memory stays bounded on big corpora."""
    out = []
    for i in range(0, len(texts), chunk):
        out += tokenizer.encode_batch(texts[i:i + chunk])
    return out


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


# ---------------------------------------------------------------------------------------------------- benchmark

def main(cfg):
    """`python run.py task=data`: build the data cold (in a fresh cache directory, tokenizer training
    included), load it again from that cache, print the corpus statistics and write data_stats.json."""
    from runner.tracking import atomic_write_json, output_dir

    cache_root = Path(cfg.cache_dir)
    cache_root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_root, prefix="data-bench-") as fresh:
        cold = build_data(cfg, cache_dir=fresh, rebuild=True).stats
        cached_data = build_data(cfg, cache_dir=fresh)
        cached = cached_data.stats
        t0 = time.perf_counter()  # the memory map reads lazily: touch every row once for an honest figure
        for split in (cached_data.train, cached_data.val):
            for name in FIELDS:
                np.asarray(getattr(split, name)).sum()
        cached["read_seconds"] = time.perf_counter() - t0
        del cached_data  # release the memory maps before the temporary cache is removed
    stats = {**cold, "cache_path": None, "cold": summary(cold), "cached_load": summary(cached)}
    print(format_stats(stats))
    path = output_dir() / "data_stats.json"
    atomic_write_json(path, stats)
    print(f"wrote {path}")
    return stats


def summary(s: dict) -> dict:
    tokens = s["tokens"]["train"] + s["tokens"]["val"]
    tokenize_s = s["seconds"]["tokenize"] + s["seconds"]["pack"]
    return {"seconds": s["seconds"], "tokens_per_s": s["tokens_per_s"], "read_seconds": s.get("read_seconds"),
            "tokenize_pack_tokens_per_s": tokens / tokenize_s if tokenize_s else None}


def format_stats(s: dict) -> str:
    tok, eff = s["tokenizer"], s["packing_efficiency_by_mode"]
    cold, cached = s["cold"], s["cached_load"]
    other = [m for m in PACKING_MODES if m != s["packing"]][0]
    lines = [
        f"corpus {s['corpus']} ({s['source']}, Python {s['python_version']}, fingerprint {s['fingerprint']})",
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
        "",
        f"cold build    {cold['seconds']['total']:7.2f} s  {cold['tokens_per_s']:>12,.0f} tokens/s   (corpus "
        f"{cold['seconds']['corpus']:.2f} s, tokenizer {cold['seconds']['tokenizer']:.2f} s, tokenize "
        f"{cold['seconds']['tokenize']:.2f} s, pack {cold['seconds']['pack']:.2f} s; tokenize+pack "
        f"{cold['tokenize_pack_tokens_per_s'] or 0:,.0f} tokens/s)",
        f"cached load   {cached['seconds']['total']:7.2f} s  {cached['tokens_per_s']:>12,.0f} tokens/s   "
        f"(memory-mapped; reading every row once takes {cached['read_seconds']:.3f} s more)",
    ]
    return "\n".join(lines) + "\n"
