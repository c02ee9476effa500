"""Score modifiers: functions of an attention logit and its (batch, head, query index, key index).

A modifier is a frozen dataclass (hashable, so a context caches what it builds from it) whose
`build(device)` returns `fn(score, b, h, q_idx, kv_idx) -> score`. Like a mask predicate (masks.py), the
same `fn` serves two ways:
  * as FlexAttention's `score_mod` (scalar tensors);
  * broadcast over (B, H, Tq, Tkv) index grids, on the scores (eager) or, for an `additive` modifier, on
    zeros to give a float bias that SDPA adds to its logits.
Modifiers apply to the scaled logits QK^T / sqrt(d), before the mask, in the order they are listed.
"""
import math
from dataclasses import dataclass

import torch


def alibi_slopes(n_heads: int) -> list[float]:
    """Per-head slopes of ALiBi (Press et al. 2022), as in the paper's code: for a power of two n, the
    geometric sequence 2^(-8/n), 2^(-16/n), ...; otherwise the slopes of the closest lower power of two
    followed by every other slope of twice that power (interleaving)."""
    def power_of_two(n):
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start ** i for i in range(n)]
    if math.log2(n_heads).is_integer():
        return power_of_two(n_heads)
    closest = 2 ** math.floor(math.log2(n_heads))
    return power_of_two(closest) + alibi_slopes(2 * closest)[0::2][: n_heads - closest]


@dataclass(frozen=True)
class ALiBiBias:
    """score - slope_h * (q_idx - kv_idx): a linear penalty on distance, one slope per query head."""

    slopes: tuple[float, ...]
    additive = True

    def build(self, device):
        slopes = torch.tensor(self.slopes, dtype=torch.float32, device=device)
        return lambda score, b, h, q_idx, kv_idx: score + slopes[h] * (kv_idx - q_idx)


@dataclass(frozen=True)
class SoftCap:
    """cap * tanh(score / cap) (Gemma 2): logits stay within (-cap, cap) with a smooth gradient."""

    cap: float
    additive = False

    def __post_init__(self):
        if not self.cap > 0:
            raise ValueError(f"model.attention.softcap must be > 0 (or null), got {self.cap}")

    def build(self, device):
        cap = self.cap
        return lambda score, b, h, q_idx, kv_idx: cap * torch.tanh(score / cap)
