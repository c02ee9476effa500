"""`python run.py task=bench`: speed, memory and perplexity of one model (runner/bench/BENCH.md).

    suite.py      the suite (train step, prefill, decode with/without the KV cache, memory) and the task
    timing.py     warm-up, synchronisation, repeats (median and spread), peak memory, OOM-guarded points
    kernels.py    eager vs SDPA vs FlexAttention on the same masks
    reference.py  the same weights in transformers' Phi3ForCausalLM
    flops.py      analytic FLOPs' denominators: device peak FLOP/s and memory bandwidth
"""
from runner.bench.flops import device_memory_bandwidth, device_peak_flops
from runner.bench.suite import kv_cache_size, main, print_table, run_suite, wants_perplexity

__all__ = ["run_suite", "main", "kv_cache_size", "print_table", "wants_perplexity", "device_peak_flops",
           "device_memory_bandwidth"]
