"""Measuring properly: warm-up runs, synchronisation, several repeats, the median and the spread; peak
memory of a block of work; and out-of-memory points recorded instead of ending the suite.

On CUDA a repeat is timed with CUDA events after a synchronize (so that no earlier queued work and no
launch overhead of earlier calls is counted); on CPU with time.perf_counter. Peak memory is the CUDA
caching allocator's max_memory_allocated (reset before the block), or on CPU the process's peak resident
set size, reset before the block through /proc/self/clear_refs where Linux allows it (else
ru_maxrss, which only ever grows).
"""
import gc
import re
import resource
import statistics
import sys
import time
import traceback

import torch

from runner.tracking import is_oom


def synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn, device, warmup: int = 1, repeats: int = 3, setup=None) -> dict:
    """Seconds per call of fn(): `warmup` untimed calls, then `repeats` timed ones. `setup()` runs
    untimed before every call (e.g. reset a KV cache and prefill the prompt before timing decode)."""
    device = torch.device(device)
    for _ in range(warmup):
        if setup is not None:
            setup()
        fn()
    times = []
    for _ in range(max(1, repeats)):
        if setup is not None:
            setup()
        synchronize(device)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)  # ms -> s
        else:
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return summarize(times)


def summarize(times: list[float]) -> dict:
    """Median and spread (min, max, interquartile range) of repeat times in seconds."""
    q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else (times[0],) * 3
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
            "iqr_s": q3 - q1, "repeats": len(times)}


def throughput(timing: dict, items: int, name: str = "tokens_per_s") -> dict:
    """items per second at the median, and at the slowest and fastest repeat."""
    return {name: items / timing["median_s"], f"{name}_min": items / timing["max_s"],
            f"{name}_max": items / timing["min_s"]}


# -- memory -------------------------------------------------------------------------------------------
def free_memory(device):
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def _rss_peak() -> int:
    """Peak resident set size of this process in bytes (VmHWM, else ru_maxrss)."""
    try:
        with open("/proc/self/status") as f:
            return int(re.search(r"VmHWM:\s+(\d+)\s+kB", f.read()).group(1)) * 1024
    except (OSError, AttributeError):
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss if sys.platform == "darwin" else rss * 1024  # bytes on macOS, kB on Linux


def _rss_now() -> int:
    try:
        with open("/proc/self/status") as f:
            return int(re.search(r"VmRSS:\s+(\d+)\s+kB", f.read()).group(1)) * 1024
    except (OSError, AttributeError):
        return 0


def _reset_rss_peak() -> bool:
    """Linux >= 4.0: writing 5 to clear_refs sets the peak RSS back to the current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def memory_kind(device) -> str:
    return "cuda_max_memory_allocated" if torch.device(device).type == "cuda" else "process_peak_rss"


class PeakMemory:
    """`with PeakMemory(device) as mem: ...` then mem.peak (bytes at the peak of the block, everything
    the process holds included), mem.baseline (bytes when the block began) and mem.delta = the
    block's own extra memory (activations, caches, optimizer state)."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.peak = self.baseline = self.delta = None

    def __enter__(self):
        free_memory(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline = torch.cuda.memory_allocated(self.device)
        else:
            self.resettable = _reset_rss_peak()
            self.baseline = _rss_now()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self.peak = _rss_peak()
        self.delta = max(0, self.peak - self.baseline) if self.baseline else None
        return False


# -- one point ----------------------------------------------------------------------------------------
def guarded(measure, device, **labels) -> dict:
    """Run measure() -> dict and return {**labels, "status": "ok", **result}. An out-of-memory error
    gives {**labels, "status": "oom"}, any other error {"status": "failed", "error": ...}; either way
    memory is freed and the suite goes on with its next point."""
    try:
        return {**labels, "status": "ok", **measure()}
    except Exception as err:  # noqa: BLE001 -- one point must not end a benchmark of many
        oom = is_oom(err) or "can't allocate memory" in str(err)  # the CPU allocator's wording
        point = {**labels, "status": "oom" if oom else "failed",
                 "error": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]}
        if point["status"] == "failed":
            print(f"bench: {labels} failed:\n{traceback.format_exc(limit=3)}", file=sys.stderr)
    free_memory(device)  # after the except block, whose traceback held the point's tensors
    return point
