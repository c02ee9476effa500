"""What a device can do at best: dense bf16 matmul FLOP/s and memory bandwidth, for MFU and for the
bandwidth bound on decoding.

Known GPUs come from their data sheets (dense, i.e. without 2:4 sparsity; bf16 with fp32 accumulation);
anything else is measured once per process with a large matrix product or a large copy. CPUs get None:
MFU against a CPU's peak is not a figure anyone compares.
"""
import re
import time

import torch

# (pattern on torch.cuda.get_device_name, bf16 dense FLOP/s, memory bytes/s). First match wins, so the
# more specific names come first.
KNOWN_GPUS = (
    (r"H100.*NVL", 835e12, 3.9e12),
    (r"H100.*PCIe", 756e12, 2.0e12),
    (r"H100", 989e12, 3.35e12),            # SXM5 ("NVIDIA H100 80GB HBM3")
    (r"H200.*NVL", 835e12, 4.8e12),
    (r"H200", 989e12, 4.8e12),
    (r"A100.*SXM4.*80GB", 312e12, 2.039e12),
    (r"A100.*80GB", 312e12, 1.935e12),     # "NVIDIA A100 80GB PCIe"
    (r"A100", 312e12, 1.555e12),           # 40GB, SXM4 or PCIe
    (r"\bA10\b", 125e12, 600e9),           # not the A10G (different clocks): that one is measured
    (r"\bL40S\b", 362e12, 864e9),
    (r"\bL4\b", 121e12, 300e9),
    (r"\bT4\b", 65e12, 320e9),           # no bf16: its fp16 tensor-core peak
    (r"B200", 2.25e15, 8.0e12),
    (r"RTX 4090", 165.2e12, 1008e9),
    (r"RTX 3090", 71e12, 936e9),
)

_measured: dict = {}


def _known(device) -> tuple | None:
    name = torch.cuda.get_device_name(device)
    for pattern, flops, bandwidth in KNOWN_GPUS:
        if re.search(pattern, name):
            return flops, bandwidth
    return None


def device_peak_flops(device) -> float | None:
    """Dense bf16 FLOP/s of a CUDA device (data sheet, else measured); None on CPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    known = _known(device)
    return known[0] if known else measured_matmul_flops(device)


def device_memory_bandwidth(device) -> float | None:
    """Memory bytes/s of a CUDA device (data sheet, else a measured device-to-device copy); None on CPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    known = _known(device)
    return known[1] if known else measured_copy_bandwidth(device)


def datasheet_bandwidth(device) -> float | None:
    """Data-sheet memory bytes/s of a known CUDA device; None elsewhere (see datasheet_reason)."""
    device = torch.device(device)
    known = _known(device) if device.type == "cuda" else None
    return known[1] if known else None


def datasheet_reason(device) -> str | None:
    """Why a figure against the data-sheet bandwidth is null (None when there is one)."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"no memory-bandwidth table for {device.type}"
    if _known(device) is None:
        return f"{torch.cuda.get_device_name(device)!r} is not in runner/bench/flops.py's KNOWN_GPUS"
    return None


def peak_source(device) -> str | None:
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return "datasheet" if _known(device) else "measured"


def _best_seconds(fn, device, repeats: int = 10) -> float:
    fn()  # warm-up: cuBLAS heuristics, allocator
    torch.cuda.synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def measured_matmul_flops(device, n: int = 8192) -> float:
    """Best-of-10 FLOP/s of an n x n x n bf16 matmul: 2 n^3 FLOPs. Cached per device."""
    key = ("flops", str(device))
    if key not in _measured:
        a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        _measured[key] = 2 * n ** 3 / _best_seconds(lambda: a @ b, device)
        del a, b
    return _measured[key]


def measured_copy_bandwidth(device, nbytes: int = 1 << 30) -> float:
    """Bytes/s of a 1 GiB device-to-device copy (read + write = 2 x nbytes). Cached per device."""
    key = ("bandwidth", str(device))
    if key not in _measured:
        src = torch.empty(nbytes, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        _measured[key] = 2 * nbytes / _best_seconds(lambda: dst.copy_(src), device)
        del src, dst
    return _measured[key]
