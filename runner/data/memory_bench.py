"""Peak memory of a cold data build against corpus size: `python -m runner.data.memory_bench --copies 1 5 25`.

Writes the standard library corpus (data=stdlib's documents) as a JSONL file repeated k times, then builds
each with `data=local` in a fresh subprocess and a fresh cache (BPE training, tokenization, cache write,
one pass deriving every row); the child reports its own peak resident memory (getrusage) after the build and
after the pass (which maps the token files: 2 bytes per token of page cache), and that of its child processes.
Used for the memory table in runner/data/BENCH.md.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = """
import json, resource, sys, time
from omegaconf import OmegaConf
from runner.data import build_data, iter_eval_batches
d = OmegaConf.load("conf/data/local.yaml")
d.update(paths=[sys.argv[1]], num_proc=int(sys.argv[3]), seq_len=128)
cfg = OmegaConf.create({"data": d, "tokenizer": OmegaConf.load("conf/tokenizer/bpe.yaml"), "cache_dir": sys.argv[2]})
data = build_data(cfg)
built_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
for split in (data.train, data.val):
    for batch in iter_eval_batches(split, 1024):
        pass
s = data.stats
print(json.dumps({"tokens": s["tokens"], "bytes_per_token": s.get("bytes_per_token"), "seconds": s["seconds"],
                  "read_seconds": time.perf_counter() - t0,
                  "build_peak_rss_kib": built_kib, "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "worker_peak_rss_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
"""


def write_copies(path: Path, copies: int) -> int:
    """The stdlib documents, `copies` times over, one {"text": ...} record per line; returns the characters."""
    from runner.data.corpus import non_empty, stdlib_documents
    import sysconfig
    docs = [t for _, t in non_empty(stdlib_documents(Path(sysconfig.get_paths()["stdlib"])), {"n": 0})]
    with open(path, "w") as f:
        for _ in range(copies):
            for text in docs:
                f.write(json.dumps({"text": text}) + "\n")
    return copies * sum(map(len, docs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, nargs="+", default=[1, 5, 25])
    parser.add_argument("--num-proc", type=int, default=1)
    parser.add_argument("--pythonpath", default=".", help="the checkout whose runner/ to measure")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="memory-bench-") as tmp:
        for k in args.copies:
            corpus = Path(tmp) / f"stdlib_x{k}.jsonl"
            chars = write_copies(corpus, k)
            t0 = time.perf_counter()
            out = subprocess.run([sys.executable, "-c", CHILD, str(corpus), str(Path(tmp) / f"cache_x{k}"),
                                  str(args.num_proc)], cwd=args.pythonpath, capture_output=True, text=True,
                                 env={**os.environ, "PYTHONPATH": args.pythonpath})
            wall = time.perf_counter() - t0
            if out.returncode:
                sys.exit(out.stderr[-3000:])
            stats = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"x{k:<3} {chars / 1e6:7.1f}M chars {sum(stats['tokens'].values()) / 1e6:7.2f}M tokens  peak RSS "
                  f"{stats['build_peak_rss_kib'] / 1024:5.0f} MiB after the build, {stats['peak_rss_kib'] / 1024:5.0f} MiB after "
                  f"reading every row (child processes {stats['worker_peak_rss_kib'] / 1024:.0f})  wall {wall:6.1f} s  build {stats['seconds']['total']:6.1f} s  "
                  f"bytes/token {stats['bytes_per_token'] or 0:.2f}  derive all rows {stats['read_seconds']:.2f} s",
                  flush=True)
            shutil.rmtree(Path(tmp) / f"cache_x{k}", ignore_errors=True)
            corpus.unlink()


if __name__ == "__main__":
    main()
