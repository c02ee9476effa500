"""Position information: absolute embeddings added to the token embeddings, or rotary (RoPE).

Every class shares the constructor shape `(d_model, head_dim, max_seq_len, **options)` and the call
`forward(x, position_ids) -> (x, rotary)`: absolute encodings return `x` with positions added and
`rotary=None`; RoPE returns `x` unchanged and `rotary=(cos, sin)` for the attention layers to apply.
A position module that biases attention scores instead (ALiBi) also has `score_mod(n_heads)`, returning a
score modifier (scores.py) that the model hands to every attention layer.
"""
import math

import torch
from torch import nn

from .scores import ALiBiBias, alibi_slopes


class NoPosition(nn.Module):
    """No explicit positions (NoPE): a causal decoder can still infer order from the mask."""

    def __init__(self, d_model: int, head_dim: int, max_seq_len: int):
        super().__init__()

    def forward(self, x, position_ids):
        return x, None


class ALiBi(NoPosition):
    """Attention with Linear Biases (Press et al. 2022): no embedding at all; every head penalises a key
    linearly in its distance from the query, with a fixed per-head slope, which lets a model trained on
    short sequences read longer ones."""

    def score_mod(self, n_heads: int):
        return ALiBiBias(tuple(alibi_slopes(n_heads)))


def check_positions(position_ids, max_seq_len: int):
    """A clear error for a position past the table, where reading it costs nothing: on CPU, outside a
    compiled graph. On an accelerator the check would be a host sync in every forward (the embedding's own
    index check still fires there, less readably)."""
    if position_ids.device.type == "cpu" and not torch.compiler.is_compiling() and position_ids.max() >= max_seq_len:
        raise ValueError(f"position {int(position_ids.max())} >= max_seq_len={max_seq_len}")


class LearnedPosition(nn.Module):
    """Learned absolute position embeddings (GPT-1/GPT-2)."""

    def __init__(self, d_model: int, head_dim: int, max_seq_len: int):
        super().__init__()
        self.max_seq_len = max_seq_len
        self.embedding = nn.Embedding(max_seq_len, d_model)

    def forward(self, x, position_ids):
        if position_ids.dim() == 2 and position_ids.shape[0] > 1 and position_ids.stride(0) == 0:
            position_ids = position_ids[:1]  # one row broadcast over the batch (the model's arange): look it up once
        check_positions(position_ids, self.max_seq_len)
        return x + self.embedding(position_ids), None


class SinusoidalPosition(nn.Module):
    """Fixed sinusoidal encodings of Vaswani et al. 2017, section 3.5."""

    def __init__(self, d_model: int, head_dim: int, max_seq_len: int, base: float = 10000.0):
        super().__init__()
        if d_model % 2:
            raise ValueError(f"sinusoidal positions need an even d_model, got model.d_model={d_model}")
        self.max_seq_len = max_seq_len
        inv_freq = torch.exp(-math.log(base) * torch.arange(0, d_model, 2).float() / d_model)
        angles = torch.arange(max_seq_len).float()[:, None] * inv_freq[None, :]
        table = torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(1)  # sin, cos interleaved
        self.register_buffer("table", table, persistent=False)  # (max_seq_len, d_model)

    def forward(self, x, position_ids):
        check_positions(position_ids, self.max_seq_len)
        return x + self.table[position_ids].to(x.dtype), None


# ---------------------------------------------------------------------------------------------------
# RoPE (Su et al. 2021) and the frequency scalings found in Phi-3 checkpoints.
# A scaling maps (theta, rotary_dim, seq_len, max_seq_len) to (inv_freq, attention_factor).


class LinearScaling:
    """Position interpolation (Chen et al. 2023): positions are divided by `factor`."""

    def __init__(self, factor: float):
        if factor <= 0:
            raise ValueError(f"rope scaling factor must be > 0, got {factor}")
        self.factor = factor

    def inv_freq(self, theta, rotary_dim, seq_len, max_seq_len):
        return default_inv_freq(theta, rotary_dim) / self.factor, 1.0


class LongRoPEScaling:
    """Phi-3's LongRoPE (Ding et al. 2024): per-frequency rescale factors, `short_factor` up to the
    pre-training context and `long_factor` beyond it, and cos/sin scaled by
    sqrt(1 + ln(s) / ln(original context)) where s = max_seq_len / original context.
    Like transformers, the factors are chosen from the largest position in the current call."""

    needs_seq_len = True

    @property
    def reencode_at(self) -> int:
        """Past this many tokens every position's frequencies change (the long factors take over): keys
        cached before are stale and the sequence must be encoded again (transformers' Phi-3 drops its cache
        there too)."""
        return self.original_max_position_embeddings

    def __init__(self, short_factor, long_factor, original_max_position_embeddings: int,
                 factor: float | None = None, attention_factor: float | None = None):
        if len(short_factor) != len(long_factor):
            raise ValueError("LongRoPE short_factor and long_factor must have the same length")
        self.short_factor = list(short_factor)
        self.long_factor = list(long_factor)
        self.original_max_position_embeddings = original_max_position_embeddings
        self.factor = factor
        self.attention_factor = attention_factor

    def inv_freq(self, theta, rotary_dim, seq_len, max_seq_len):
        if len(self.short_factor) != rotary_dim // 2:
            raise ValueError(f"LongRoPE factors have {len(self.short_factor)} entries, rotary_dim/2 is {rotary_dim // 2}")
        orig = self.original_max_position_embeddings
        factor = self.factor if self.factor is not None else max_seq_len / orig
        attention_factor = self.attention_factor
        if attention_factor is None:
            attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))
        ext = torch.tensor(self.long_factor if seq_len > orig else self.short_factor, dtype=torch.float32)
        return default_inv_freq(theta, rotary_dim) / ext, attention_factor


def default_inv_freq(theta: float, rotary_dim: int) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim))


class RoPE(nn.Module):
    """Rotary position embedding, in the rotate-half layout of GPT-NeoX, Llama and Phi-3.

    `partial_rotary_factor` < 1 rotates only the first fraction of each head's dimensions (Phi-4-mini).
    `scaling` is None, LinearScaling or LongRoPEScaling.
    """

    def __init__(self, d_model: int, head_dim: int, max_seq_len: int, theta: float = 10000.0,
                 partial_rotary_factor: float = 1.0, scaling=None):
        super().__init__()
        self.rotary_dim = int(head_dim * partial_rotary_factor)
        if self.rotary_dim % 2 or self.rotary_dim == 0:
            raise ValueError(
                f"RoPE needs an even, non-zero rotary dimension, got {self.rotary_dim} = int(head_dim {head_dim} x "
                f"{partial_rotary_factor}): change model.position.partial_rotary_factor={partial_rotary_factor}, "
                f"or the head size model.d_model / model.n_heads (d_model={d_model}, head_dim={head_dim}), "
                f"or model.head_dim where it is set")
        self.theta, self.max_seq_len, self.scaling = theta, max_seq_len, scaling
        self._per_call = getattr(scaling, "needs_seq_len", False)
        if scaling is None:
            inv_freq, self.attention_factor = default_inv_freq(theta, self.rotary_dim), 1.0
        else:
            inv_freq, self.attention_factor = scaling.inv_freq(theta, self.rotary_dim, 0, max_seq_len)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        if self._per_call:
            long_inv, _ = scaling.inv_freq(theta, self.rotary_dim, scaling.original_max_position_embeddings + 1,
                                           max_seq_len)
            self.register_buffer("long_inv_freq", long_inv, persistent=False)

    @property
    def reencode_at(self) -> int | None:
        """A cached sequence that grows past this many tokens must be encoded again (LongRoPE switching to
        its long factors); None: cached keys stay valid at any length."""
        return getattr(self.scaling, "reencode_at", None)

    def _apply(self, fn, *args, **kwargs):
        # Casting the model to bf16/fp16 must not round the frequencies: keep them float32, move device only.
        kept = {n: b for n, b in self._buffers.items() if n.endswith("inv_freq") and b is not None}
        super()._apply(fn, *args, **kwargs)
        for name, original in kept.items():
            self._buffers[name] = original.to(device=self._buffers[name].device, dtype=torch.float32)
        return self

    def forward(self, x, position_ids):
        inv_freq = self.inv_freq
        if self._per_call:  # chosen on the device (no host sync; one graph for both factors when compiled)
            is_long = position_ids.max() + 1 > self.scaling.original_max_position_embeddings
            inv_freq = torch.where(is_long, self.long_inv_freq, self.inv_freq)
        freqs = position_ids[..., None].float() * inv_freq.float()  # (B, T, rotary_dim/2)
        emb = torch.cat([freqs, freqs], dim=-1)
        cos, sin = emb.cos() * self.attention_factor, emb.sin() * self.attention_factor
        return x, (cos.to(x.dtype), sin.to(x.dtype))


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x, cos, sin):
    """x: (B, H, T, head_dim); cos, sin: (B, T, rotary_dim). Dimensions past rotary_dim pass through."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    d = cos.shape[-1]
    x_rot, x_pass = x[..., :d], x[..., d:]
    # in x's dtype: float32 tables times bf16 q/k (autocast) would otherwise promote q and k, not v
    return torch.cat([(x_rot * cos + rotate_half(x_rot) * sin).to(x.dtype), x_pass], dim=-1)


def positions_from_documents(document_ids, prev_document=None, prev_position=None):
    """Positions that restart at 0 where the document id changes along each row.

    document_ids: (B, T). With a KV cache, `prev_document`/`prev_position` (B,) describe the last cached
    token, so that a document continuing from the cache keeps counting.
    """
    B, T = document_ids.shape
    idx = torch.arange(T, device=document_ids.device).expand(B, T)
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    if prev_document is not None:
        starts[:, 0] = document_ids[:, 0] != prev_document
    run_start = torch.cummax(torch.where(starts, idx, torch.zeros_like(idx)), dim=1).values
    positions = idx - run_start
    if prev_document is not None:
        continuing = torch.cummax(starts.long(), dim=1).values == 0  # no start seen yet in this row
        positions = positions + continuing * (prev_position[:, None] + 1)
    return positions
