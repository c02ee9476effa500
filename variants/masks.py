"""Attention mask patterns as small predicates over (query index, key index).

A pattern is a frozen dataclass whose `__call__(q_idx, kv_idx)` returns a boolean (tensor): True where the
query may attend to the key. Indices are absolute positions in the sequence (a KV cache offsets the query
indices), and the same function is used two ways:
  * as a FlexAttention `mask_mod` (scalar tensors, traced into a block mask);
  * evaluated by broadcasting (q_idx[:, None], kv_idx[None, :]) into a dense boolean mask for SDPA/eager.
Same-document masking for packed rows is added on top by `AttentionContext`, for every pattern. Score
modifiers (scores.py: ALiBi, soft-capping) are built and cached by the same context.
"""
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Causal:
    """Dense causal attention: every earlier token and itself."""

    def __call__(self, q_idx, kv_idx):
        return q_idx >= kv_idx


@dataclass(frozen=True)
class SlidingWindow:
    """Local attention to the last `window` tokens, itself included (Mistral, Phi-3's `sliding_window`)."""

    window: int

    def __post_init__(self):
        if self.window < 1:
            raise ValueError(f"sliding window must be >= 1, got model.attention.window={self.window}")

    def __call__(self, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < self.window)


@dataclass(frozen=True)
class StridedSparse:
    """Strided sparse attention of Child et al. 2019 (Sparse Transformers), its two heads' patterns
    merged: the last `stride` tokens, plus every earlier token a multiple of `stride` back."""

    stride: int

    def __post_init__(self):
        if self.stride < 1:
            raise ValueError(f"strided sparse attention needs stride >= 1, got {self.stride}")

    def __call__(self, q_idx, kv_idx):
        offset = q_idx - kv_idx
        return (offset >= 0) & ((offset < self.stride) | (offset % self.stride == 0))


class AttentionContext:
    """What every attention layer of one forward call shares: query/key document ids, the cache offset,
    and masks already built for a (kernel, pattern), so a block mask is built once per call, not per layer.

    q_doc: (B, Tq) or None; kv_doc: (B, Tkv) or None; q_offset: absolute index of the first query.
    score_mods: modifiers every layer applies in this call (the position module's, e.g. ALiBi); a layer
    adds its own after them (Attention's soft-capping).
    """

    fixed_shape = False  # True: the keys are a whole preallocated cache (CacheSlotContext)

    def __init__(self, q_len: int, kv_len: int, q_offset: int = 0, q_doc=None, kv_doc=None, device="cpu",
                 score_mods: tuple = ()):
        self.q_len, self.kv_len, self.q_offset = q_len, kv_len, q_offset
        self.q_doc, self.kv_doc, self.device = q_doc, kv_doc, device
        self.score_mods = tuple(score_mods)
        self._built = {}

    def q_index(self, q_idx):
        """The absolute (cache) index of query row q_idx (a tensor)."""
        return q_idx + self.q_offset

    def mask_mod(self, pattern):
        """FlexAttention mask_mod(b, h, q_idx, kv_idx) for `pattern` plus same-document."""
        where, q_doc, kv_doc = self.q_index, self.q_doc, self.kv_doc
        if q_doc is None:
            return lambda b, h, q_idx, kv_idx: pattern(where(q_idx), kv_idx)
        return lambda b, h, q_idx, kv_idx: pattern(where(q_idx), kv_idx) & (q_doc[b, q_idx] == kv_doc[b, kv_idx])

    def dense(self, pattern):
        """Boolean mask (B or 1, 1, Tq, Tkv), True = attend."""
        q_idx = self.q_index(torch.arange(self.q_len, device=self.device))[:, None]
        kv_idx = torch.arange(self.kv_len, device=self.device)[None, :]
        mask = pattern(q_idx, kv_idx)[None, None]
        if self.q_doc is not None:
            mask = mask & (self.q_doc[:, None, :, None] == self.kv_doc[:, None, None, :])
        return mask

    def score_mod(self, mods: tuple):
        """FlexAttention score_mod(score, b, h, q_idx, kv_idx) applying `mods` in order; None for none."""
        if not mods:
            return None
        fns = [self.cached(("score", mod), lambda mod=mod: mod.build(self.device)) for mod in mods]
        where = self.q_index

        def score_mod(score, b, h, q_idx, kv_idx):
            for fn in fns:
                score = fn(score, b, h, where(q_idx), kv_idx)
            return score
        return score_mod

    def modify_scores(self, scores, mods: tuple):
        """Apply `mods` to dense scores (B, H, Tq, Tkv) by broadcasting index grids."""
        B, H = scores.shape[:2]
        fn = self.score_mod(mods)
        b = torch.arange(B, device=scores.device)[:, None, None, None]
        h = torch.arange(H, device=scores.device)[None, :, None, None]
        q_idx = torch.arange(self.q_len, device=scores.device)[None, None, :, None]
        kv_idx = torch.arange(self.kv_len, device=scores.device)[None, None, None, :]
        return fn(scores, b, h, q_idx, kv_idx)

    def dense_bias(self, pattern, mods: tuple, n_heads: int):
        """Float mask (B or 1, H, Tq, Tkv) for SDPA: the additive modifiers' bias, -inf where masked."""
        zeros = torch.zeros(1, n_heads, self.q_len, self.kv_len, device=self.device)
        bias = self.modify_scores(zeros, mods)
        return bias.masked_fill(~self.cached(("dense", pattern), lambda: self.dense(pattern)), float("-inf"))

    def cached(self, key, build):
        if key not in self._built:
            self._built[key] = build()
        return self._built[key]


class CacheSlotContext(AttentionContext):
    """Fixed-shape attention over a whole preallocated KV cache (gpt-fast's decoding): the queries sit at
    cache slots `q_slots` (T,), a tensor, and attend over all max_len slots; slots after the query's (not yet
    written, or stale from an earlier generation) are masked whatever the pattern (_WrittenSlots), so the
    shapes are the same at every step and a compiled step never recompiles.

    q_doc: (B, T); kv_doc: (B, max_len), the cache's document ids with the new tokens' already recorded.
    """

    fixed_shape = True

    def __init__(self, q_slots, q_doc, kv_doc, score_mods: tuple = ()):
        super().__init__(q_slots.shape[0], kv_doc.shape[1], 0, q_doc, kv_doc, device=q_slots.device,
                         score_mods=score_mods)
        self.q_slots = q_slots

    def q_index(self, q_idx):
        return self.q_slots[q_idx]

    def mask_mod(self, pattern):
        return super().mask_mod(_WrittenSlots(pattern))

    def dense(self, pattern):
        return super().dense(_WrittenSlots(pattern))


@dataclass(frozen=True)
class _WrittenSlots:
    """A pattern restricted to cache slots at or before the query's: later slots hold stale keys (an earlier
    generation's) or none yet, whatever the pattern says."""

    pattern: object

    def __call__(self, q_idx, kv_idx):
        return self.pattern(q_idx, kv_idx) & (kv_idx <= q_idx)
