"""Multi-head latent attention (DeepSeek-V2, DeepSeek-AI 2024, section 2.1).

Keys and values of every head are expanded from one compressed latent per token, c = RMSNorm(W_dkv x) of
size `kv_lora_rank`; RoPE cannot pass through that expansion, so position goes into a separate key part of
`rope_head_dim` shared by all heads (decoupled RoPE). The cache holds only c and the rotated shared key:
(kv_lora_rank + rope_head_dim) numbers per token and layer, against 2 x n_kv_heads x head_dim for GQA.

    q_h = [W_uq_h x ; RoPE(W_qr_h x)]               (n_heads, head_dim + rope_head_dim)
    k_h = [W_uk_h c ; RoPE(W_kr x)],  v_h = W_uv_h c (the rotary part of k is the same for every head)
    out = W_o [softmax(q_h k_h^T / sqrt(head_dim + rope_head_dim)) v_h]_h

Queries are not compressed here (DeepSeek-V2-Lite does the same). The cache expands keys and values on
every call rather than absorbing W_uk into the queries: simpler, the same numbers.
"""
import math

import torch
from torch import nn

from .attention import KERNELS, attend, check_dropout
from .masks import AttentionContext, Causal, SlidingWindow
from .position import apply_rotary
from .scores import SoftCap


class MultiHeadLatentAttention(nn.Module):
    """Args (the model passes d_model, n_heads, head_dim and, with a schedule, pattern):
        kv_lora_rank: size of the cached latent.
        rope_head_dim: size of the decoupled rotary part of q and k; None = head_dim. Must equal the
            position module's rotary width (RoPE's head_dim x partial_rotary_factor).
        n_kv_heads: unused (every head has its own keys, expanded from the latent); accepted so that the
            attention yamls share their keys.
        kernel, window, pattern, softcap, dropout: as for Attention.
    `probe`: as for Attention (training telemetry).
    """

    probe = None

    def __init__(self, d_model: int, n_heads: int, head_dim: int | None = None, kv_lora_rank: int = 32,
                 rope_head_dim: int | None = None, n_kv_heads: int | None = None, kernel: str = "auto",
                 window: int | None = None, pattern=None, bias: bool = False, softcap: float | None = None,
                 qk_norm: bool = False, dropout: float = 0.0):
        super().__init__()
        check_dropout(dropout, kernel)
        head_dim = head_dim or d_model // n_heads
        rope_head_dim = rope_head_dim or head_dim
        if kv_lora_rank < 1 or rope_head_dim % 2:
            raise ValueError(f"model.attention.kv_lora_rank={kv_lora_rank} must be >= 1 and "
                             f"model.attention.rope_head_dim={rope_head_dim} even")
        if kernel not in KERNELS:
            raise ValueError(f"model.attention.kernel={kernel!r} is not one of {sorted(KERNELS)}")
        if qk_norm:
            raise ValueError("model.attention.qk_norm is not implemented for model/attention=mla")
        if pattern is not None and window is not None:
            raise ValueError("set either model.attention.window or a per-layer attention schedule, not both")
        self.pattern = pattern if pattern is not None else (SlidingWindow(window) if window is not None else Causal())
        self.n_heads, self.head_dim, self.rope_head_dim = n_heads, head_dim, rope_head_dim
        self.kv_lora_rank = kv_lora_rank
        self.n_kv_heads, self.kernel = n_heads, kernel  # every head's keys are distinct (what the cache holds is not)
        self.ran, self.dropout = None, dropout  # dropout on the attention probabilities, as Attention's
        self.q_proj = nn.Linear(d_model, n_heads * (head_dim + rope_head_dim), bias=bias)
        self.kv_down = nn.Linear(d_model, kv_lora_rank, bias=bias)  # W_dkv
        self.kv_norm = nn.RMSNorm(kv_lora_rank, eps=1e-6)
        self.k_rope_proj = nn.Linear(d_model, rope_head_dim, bias=bias)  # W_kr, one head shared by all
        self.kv_up = nn.Linear(kv_lora_rank, n_heads * 2 * head_dim, bias=False)  # W_uk and W_uv
        self.o_proj = nn.Linear(n_heads * head_dim, d_model, bias=bias)
        self.o_proj.is_residual_projection = True
        self.score_mods = (SoftCap(softcap),) if softcap is not None else ()
        self.softmax_scale = 1.0 / math.sqrt(head_dim + rope_head_dim)

    def use_mup_scale(self, head_width_mult: float):
        """µP: scores scaled by 1/(query width), as for Attention.use_mup_scale."""
        self.softmax_scale = 1.0 / math.sqrt((self.head_dim + self.rope_head_dim) * head_width_mult)

    def mup_kinds(self) -> dict[str, str]:
        """µP kinds (variants/mup.py) where they are not 'hidden': the latent has a fixed size (kv_lora_rank), so
        the projection into it is an output and the one out of it an input."""
        return {"kv_down.weight": "output", "kv_up.weight": "input"}

    def cache_layout(self) -> dict:
        """Per cached token: name -> (heads, dim). The latent and the shared rotary key, nothing per head."""
        return {"latent": (1, self.kv_lora_rank), "k_rope": (1, self.rope_head_dim)}

    def forward(self, x, rotary=None, ctx=None, cache=None):
        """x: (B, T, d_model); rotary: (cos, sin) of width rope_head_dim, or None; cache: a LayerCache."""
        B, T, _ = x.shape
        H, hd, rd = self.n_heads, self.head_dim, self.rope_head_dim
        q = self.q_proj(x).view(B, T, H, hd + rd).transpose(1, 2)  # (B, H, T, hd + rd)
        q_nope, q_rope = q.split([hd, rd], dim=-1)
        latent = self.kv_norm(self.kv_down(x))[:, None]  # (B, 1, T, r)
        k_rope = self.k_rope_proj(x)[:, None]  # (B, 1, T, rd)
        if rotary is not None:
            if rotary[0].shape[-1] != rd:
                raise ValueError(f"model.attention.rope_head_dim={rd} must equal the rotary width "
                                 f"{rotary[0].shape[-1]} (head_dim x model.position.partial_rotary_factor)")
            q_rope, k_rope = apply_rotary(q_rope, *rotary), apply_rotary(k_rope, *rotary)
        if cache is not None:
            latent, k_rope = cache.update(latent, k_rope)  # every token so far, (B, 1, Tkv, .)
        Tkv = latent.shape[2]
        kv = self.kv_up(latent[:, 0]).view(B, Tkv, H, 2 * hd).transpose(1, 2)  # (B, H, Tkv, 2 hd)
        k_nope, v = kv.split([hd, hd], dim=-1)
        q = torch.cat([q_nope, q_rope], dim=-1)
        k = torch.cat([k_nope, k_rope.expand(B, H, Tkv, rd)], dim=-1)
        if ctx is None:
            ctx = AttentionContext(T, Tkv, Tkv - T, device=x.device)
        # v is zero-padded to q's width so every kernel sees one head size; the padding is cut off after
        v = nn.functional.pad(v, (0, rd))
        y = attend(self, q, k, v, ctx, self.softmax_scale)[..., :hd]
        return self.o_proj(y.transpose(1, 2).reshape(B, T, H * hd))
