"""Attention kernels side by side: eager vs SDPA vs FlexAttention on the same q, k, v and the same masks
(causal, packed documents, sliding window), at several sequence lengths.

Each point times one forward call of the kernel as the model calls it, `KERNELS[name](q, k, v, pattern,
ctx, scale)`, with the model's head counts and head size. The mask (dense boolean or Flex block mask) is
built in the warm-up call and reused, as the model reuses it across its layers. Outputs are checked
against the first kernel that ran (eager when it fits): `max_abs_diff`.
"""
import math
import warnings

import torch

from runner.bench.timing import guarded, throughput, time_fn
from variants.attention import KERNELS
from variants.masks import AttentionContext, Causal, SlidingWindow


def mask_case(name: str, seq_len: int, batch: int, window: int, documents: int, device):
    """(pattern, q_doc/kv_doc) for a named mask: causal, documents (seq_len split into `documents`
    equal documents, causal within each) or sliding (causal, last `window` tokens)."""
    if name == "causal":
        return Causal(), None
    if name == "documents":
        doc_len = max(1, math.ceil(seq_len / documents))
        docs = (torch.arange(seq_len, device=device) // doc_len).expand(batch, seq_len)
        return Causal(), docs
    if name == "sliding":
        return SlidingWindow(window), None
    raise ValueError(f"bench.kernels.masks: unknown mask {name!r}; choose causal, documents or sliding")


def attention_flops(mask: torch.Tensor, batch: int, n_heads: int, head_dim: int) -> float:
    """Forward FLOPs the mask needs: QK^T and AV, 2 FLOPs x head_dim each, per attended (query, key) pair.
    mask: (B or 1, 1, Tq, Tkv) boolean, True = attend."""
    pairs = mask.sum().item() * (batch if mask.shape[0] == 1 else 1)
    return 4.0 * pairs * n_heads * head_dim


def kernel_points(n_heads: int, n_kv_heads: int, head_dim: int, seq_lens, masks, kernels, window: int,
                  documents: int, batch: int, dtype, device, warmup: int, repeats: int) -> list[dict]:
    # On CUDA FlexAttention is compiled once per shape and mask: allow more recompilations than dynamo's
    # default of 8, past which it would silently run uncompiled.
    limit = max(torch._dynamo.config.recompile_limit, 2 * len(seq_lens) * len(masks) + 8)
    with torch._dynamo.config.patch(recompile_limit=limit):
        return _kernel_points(n_heads, n_kv_heads, head_dim, seq_lens, masks, kernels, window, documents, batch,
                              dtype, device, warmup, repeats)


def _kernel_points(n_heads, n_kv_heads, head_dim, seq_lens, masks, kernels, window, documents, batch, dtype,
                   device, warmup, repeats) -> list[dict]:
    points = []
    scale = 1.0 / math.sqrt(head_dim)
    gen = torch.Generator(device="cpu").manual_seed(0)
    for seq_len in seq_lens:
        def qkv(heads):
            return torch.randn(batch, heads, seq_len, head_dim, generator=gen).to(device=device, dtype=dtype)
        try:
            q, k, v = qkv(n_heads), qkv(n_kv_heads), qkv(n_kv_heads)  # (B, H|Hkv, T, hd)
        except torch.OutOfMemoryError:
            points += [{"kernel": kn, "mask": m, "seq_len": seq_len, "batch_size": batch, "status": "oom"}
                       for m in masks for kn in kernels]
            continue
        for mask_name in masks:
            pattern, docs = mask_case(mask_name, seq_len, batch, window, documents, device)
            reference = {}

            def measure(kernel_name):
                ctx = AttentionContext(seq_len, seq_len, 0, docs, docs, device=device)
                call = lambda: KERNELS[kernel_name](q, k, v, pattern, ctx, scale)  # noqa: E731
                with warnings.catch_warnings():  # flex without torch.compile on CPU warns; expected here
                    warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile")
                    timing = time_fn(call, device, warmup, repeats)
                    out = call()
                dense = ctx.dense(pattern)
                flops = attention_flops(dense, batch, n_heads, head_dim)
                point = {**timing, **throughput(timing, batch * seq_len),
                         "tflops": flops / timing["median_s"] / 1e12, "mask_density": dense.float().mean().item()}
                if reference:
                    point["max_abs_diff"] = (out.float() - reference["out"]).abs().max().item()
                    point["compared_with"] = reference["kernel"]
                else:
                    reference.update(out=out.float(), kernel=kernel_name)
                return point

            with torch.inference_mode():
                for kernel_name in kernels:
                    points.append(guarded(lambda: measure(kernel_name), device, kernel=kernel_name,
                                          mask=mask_name, seq_len=seq_len, batch_size=batch))
            reference.clear()
    return points
