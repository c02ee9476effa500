"""One causal self-attention module for MHA, GQA and MQA, with three interchangeable kernels.

`n_kv_heads` picks the variant: n_heads (MHA, Vaswani et al. 2017), a divisor of n_heads (GQA, Ainslie
et al. 2023) or 1 (MQA, Shazeer 2019). Which keys a query sees is a mask pattern (masks.py), not a
subclass: causal, sliding window or strided sparse, always intersected with same-document when the
model is given document ids.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from .fusion import FusedProjections
from .masks import AttentionContext, Causal, SlidingWindow
from .position import apply_rotary
from .scores import SoftCap


class EagerKernel:
    """Reference: explicit softmax(mods(QK^T / sqrt(d)) + mask) V in float32, K/V heads repeated for GQA.

    Every kernel takes `score_mods`, a tuple of score modifiers (scores.py) applied before the mask, and
    `dropout_p`, dropout on the attention probabilities (GPT-2's attn_dropout; 0 outside training)."""

    def __call__(self, q, k, v, pattern, ctx, scale, score_mods=(), dropout_p=0.0):
        mask = ctx.cached(("dense", pattern), lambda: ctx.dense(pattern))
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        scores = (q.float() @ k.float().transpose(-2, -1)) * scale  # (B, H, Tq, Tkv)
        if score_mods:
            scores = ctx.modify_scores(scores, score_mods)
        scores = scores.masked_fill(~mask, float("-inf"))
        probs = F.dropout(scores.softmax(dim=-1), dropout_p) if dropout_p else scores.softmax(dim=-1)
        return (probs @ v.float()).to(q.dtype)


def sdpa_masked(q, k, v, mask, scale, dropout_p=0.0):
    """SDPA with a boolean or additive mask (B or 1, 1 or H, Tq, Tkv) and GQA.

    `enable_gqa` with a mask leaves CUDA only the math kernel (flash takes no mask, memory-efficient no GQA),
    which would run in float32 at O(T^2) memory. Instead the query heads of each key/value head are folded
    into the query axis, (B, Hkv, g*Tq, d), with the mask repeated to match: plain SDPA, no K/V copy."""
    B, H, T, d = q.shape
    groups = H // k.shape[1]
    if groups == 1:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, dropout_p=dropout_p)
    Hkv = k.shape[1]
    if mask.shape[1] == 1:
        mask = mask.expand(-1, groups, -1, -1)
    else:  # per-query-head bias (ALiBi): head h belongs to key/value head h // groups
        mask = mask.view(mask.shape[0], Hkv, groups, T, mask.shape[-1])
    mask = mask.reshape(mask.shape[0], -1, groups * T, mask.shape[-1])
    y = F.scaled_dot_product_attention(q.reshape(B, Hkv, groups * T, d), k, v, attn_mask=mask, scale=scale,
                                       dropout_p=dropout_p)
    return y.view(B, H, T, d)


class SDPAKernel:
    """torch's scaled_dot_product_attention (flash / memory-efficient / math backends). Plain causal
    attention takes the `is_causal` fast path; other patterns pass a dense boolean mask, and additive score
    modifiers (ALiBi) a float mask: their bias, -inf where masked, built once per call (see sdpa_masked)."""

    def __call__(self, q, k, v, pattern, ctx, scale, score_mods=(), dropout_p=0.0):
        if score_mods:
            if not all(mod.additive for mod in score_mods):  # SDPA cannot transform logits (soft-capping)
                return KERNELS["eager"](q, k, v, pattern, ctx, scale, score_mods, dropout_p)
            bias = ctx.cached(("bias", pattern, score_mods, q.shape[1], q.dtype),
                              lambda: ctx.dense_bias(pattern, score_mods, q.shape[1]).to(q.dtype))
            return sdpa_masked(q, k, v, bias, scale, dropout_p)
        plain = isinstance(pattern, Causal) and ctx.q_doc is None
        if plain and ctx.q_offset == 0 and ctx.q_len == ctx.kv_len:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True,
                                                  dropout_p=dropout_p)
        if plain and ctx.q_len == 1 and not ctx.fixed_shape:  # one new token sees the whole cache
            return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True, dropout_p=dropout_p)
        mask = ctx.cached(("dense", pattern), lambda: ctx.dense(pattern))
        return sdpa_masked(q, k, v, mask, scale, dropout_p)


class FlexKernel:
    """FlexAttention (Dong et al. 2024): the mask predicate becomes a block-sparse mask, so sliding,
    strided and document masks skip whole blocks of work. Compiled on CUDA; eager elsewhere."""

    _compiled = None

    @classmethod
    def attention_fn(cls, device_type: str):
        """The flex_attention to call: inside a traced region (a compiled training step) the raw function,
        which the surrounding compile fuses; outside one on CUDA, a compiled kernel made once. It is never
        made inside a trace, where `torch.compile(fn)` returns `fn` itself and would be kept as if compiled
        (every later eager call would then run FlexAttention's unfused O(T^2) reference)."""
        if device_type != "cuda" or torch.compiler.is_compiling():
            return flex_attention
        if cls._compiled is None:
            cls._compiled = torch.compile(flex_attention)  # dynamic shapes after a first recompile (decode grows kv_len)
        return cls._compiled

    def __call__(self, q, k, v, pattern, ctx, scale, score_mods=(), dropout_p=0.0):
        if ctx.fixed_shape:  # a compiled decode step: a block mask rebuilt every step would cost more than
            return KERNELS["sdpa"](q, k, v, pattern, ctx, scale, score_mods)  # one dense row of booleans
        if dropout_p:  # Attention refuses kernel=flex with dropout; this guards a direct call
            raise ValueError("FlexAttention has no attention dropout: use model.attention.kernel=sdpa or eager")
        if q.device.type == "cpu" and q.requires_grad:
            raise RuntimeError(
                "FlexAttention has no backward pass on CPU in this torch; train with "
                "model.attention.kernel=sdpa (flex works on CPU for inference under torch.no_grad())")
        B = None if ctx.q_doc is None else q.shape[0]
        block_mask = ctx.cached(("flex", pattern), lambda: create_block_mask(
            ctx.mask_mod(pattern), B, None, ctx.q_len, ctx.kv_len, device=q.device))
        score_mod = ctx.cached(("score_mod", score_mods), lambda: ctx.score_mod(score_mods))
        return self.attention_fn(q.device.type)(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale,
                                                enable_gqa=True)


def choose_kernel(device_type: str, pattern, q_len: int, kv_len: int, has_documents: bool,
                  fixed_shape: bool = False) -> str:
    """kernel=auto's choice, a pure function of (device, pattern, shapes, documents).

    FlexAttention only on CUDA, only where its block mask skips work SDPA would need a dense mask for (a row
    packing several documents, or a pattern that is not plain causal), and only for queries longer than one
    token over more than one mask block: a one-token decoding step (with or without a cache) or a fixed-shape
    compiled step takes SDPA, whose single mask row is cheaper than building a block mask per token."""
    if device_type != "cuda" or fixed_shape or q_len == 1 or kv_len <= FLEX_BLOCK:
        return "sdpa"
    return "flex" if has_documents or not isinstance(pattern, Causal) else "sdpa"


FLEX_BLOCK = 128  # FlexAttention's default block size: a shorter key axis has no blocks to skip


class AutoKernel:
    """The default: FlexAttention on CUDA where its block mask skips work (see choose_kernel), SDPA
    otherwise (its causal fast path where it applies), so CPU runs and plain causal rows keep SDPA's flash
    kernel."""

    @staticmethod
    def choose(q, pattern, ctx, dropout_p=0.0) -> str:
        if dropout_p:  # FlexAttention has no dropout on its probabilities
            return "sdpa"
        return choose_kernel(q.device.type, pattern, ctx.q_len, ctx.kv_len, ctx.q_doc is not None, ctx.fixed_shape)

    def __call__(self, q, k, v, pattern, ctx, scale, score_mods=(), dropout_p=0.0):
        return KERNELS[self.choose(q, pattern, ctx, dropout_p)](q, k, v, pattern, ctx, scale, score_mods, dropout_p)


KERNELS = {"eager": EagerKernel(), "sdpa": SDPAKernel(), "flex": FlexKernel(), "auto": AutoKernel()}


def sampled_logits(q, k, pattern, ctx, scale, score_mods=(), rows: int = 4, queries: int = 64):
    """The pre-softmax logits of a bounded sample of queries, computed from q and k apart from any kernel (what
    training telemetry reads, runner/telemetry.py): the first `rows` rows, `queries` query positions spread
    evenly over each (all of them when T <= queries), every head, against every key.
    q: (B, H, T, d), k: (B, Hkv, Tkv, d) -> (logits (b, H, n, Tkv) float32, score modifiers applied;
    visible (b, 1, n, Tkv) boolean, the layer's mask predicate and same-document, as every kernel applies them)."""
    B, H, T, _ = q.shape
    b, Tkv = min(B, rows), k.shape[2]
    q_rows = torch.linspace(0, T - 1, min(T, queries), device=q.device).round().long()  # distinct: step >= 1
    k = k[:b].float().repeat_interleave(H // k.shape[1], dim=1)
    logits = (q[:b, :, q_rows].float() @ k.transpose(-2, -1)) * scale  # (b, H, n, Tkv)
    b_idx = torch.arange(b, device=q.device)[:, None, None, None]
    h_idx = torch.arange(H, device=q.device)[None, :, None, None]
    q_idx, kv_idx = q_rows[None, None, :, None], torch.arange(Tkv, device=q.device)[None, None, None, :]
    if score_mods:
        logits = ctx.score_mod(score_mods)(logits, b_idx, h_idx, q_idx, kv_idx)
    visible = ctx.mask_mod(pattern)(b_idx, h_idx[:, :1], q_idx, kv_idx)
    return logits, visible.expand(b, 1, len(q_rows), Tkv)


def check_dropout(dropout: float, kernel: str) -> None:
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"model.dropout={dropout} must be in [0, 1)")
    if dropout and kernel == "flex":
        raise ValueError("FlexAttention has no attention dropout: with model.dropout > 0 use "
                         "model.attention.kernel=sdpa, eager or auto")


def attend(module, q, k, v, ctx, scale):
    """Run `module.kernel` on (q, k, v) with its pattern and the call's and its own score modifiers, and
    note in `module.ran` the kernel that ran (what results.json records per layer under kernel=auto).
    A module's `probe`, when set (training telemetry), is shown q and k first: probe(q, k, pattern, ctx, scale,
    score_mods); it reads them without changing them, whichever kernel then runs. A module's `dropout`
    (attention-probability dropout) applies in training only."""
    kernel = KERNELS[module.kernel]
    dropout_p = getattr(module, "dropout", 0.0) if module.training else 0.0
    dropout_p = dropout_p if isinstance(dropout_p, (int, float)) else 0.0  # a user's part may hold an nn.Dropout there
    # One dtype for every kernel: under autocast the projections give bf16 but RoPE's float32 tables or
    # QK-norm's float32 weights can promote q and k (flex_attention on torch <= 2.10 rejects mixed dtypes).
    q, k = q.to(v.dtype), k.to(v.dtype)
    if not torch.compiler.is_compiling():  # an attribute write inside a compiled step would re-trace it
        module.ran = kernel.choose(q, module.pattern, ctx, dropout_p) if isinstance(kernel, AutoKernel) else module.kernel
    score_mods = ctx.score_mods + module.score_mods
    if getattr(module, "probe", None) is not None:
        module.probe(q, k, module.pattern, ctx, scale, score_mods)
    return kernel(q, k, v, module.pattern, ctx, scale, score_mods, dropout_p)


class Attention(FusedProjections, nn.Module):
    """Multi-head self-attention with `n_kv_heads` key/value heads.

    Args:
        d_model: model width.
        n_heads: query heads.
        n_kv_heads: key/value heads; None means n_heads (MHA). Must divide n_heads.
        head_dim: per-head size; None means d_model // n_heads.
        kernel: "auto" (flex for packed or masked rows on CUDA, else sdpa; see AutoKernel), "eager", "sdpa"
            or "flex". `ran` holds the kernel the last call ran.
        window: if set and no `pattern` is given, sliding-window attention over the last `window` tokens.
        pattern: a mask predicate from masks.py (the model passes one per layer for dense/sparse schedules).
        bias: biases on the q/k/v/o projections.
        softcap: if set, logits become softcap * tanh(logits / softcap) (Gemma 2), after the position
            module's score modifiers (ALiBi) and before the mask.
        qk_norm: RMSNorm over head_dim on every query and key head before RoPE (OLMo 2, Gemma 3), so the
            logits cannot grow with the weights.
        dropout: dropout on the attention probabilities in training (GPT-2's attn_dropout; SDPA's dropout_p,
            the eager kernel's F.dropout; FlexAttention has none, so kernel=flex refuses it and auto takes SDPA).
    `probe`: None, or a callable that `attend` shows each call's q and k (training telemetry sets it).
    """

    probe = None

    fusable_projections = {"qkv": ("q_proj", "k_proj", "v_proj")}

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int | None = None, head_dim: int | None = None,
                 kernel: str = "auto", window: int | None = None, pattern=None, bias: bool = False,
                 softcap: float | None = None, qk_norm: bool = False, dropout: float = 0.0):
        super().__init__()
        check_dropout(dropout, kernel)
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        if n_heads < 1 or n_kv_heads < 1:
            raise ValueError(f"model.n_heads={n_heads} and model.attention.n_kv_heads={n_kv_heads} must be >= 1")
        if head_dim is None:
            if d_model % n_heads:
                raise ValueError(f"model.n_heads={n_heads} does not divide model.d_model={d_model}")
            head_dim = d_model // n_heads
        if n_heads % n_kv_heads:
            raise ValueError(
                f"model.attention.n_kv_heads={n_kv_heads} must divide model.n_heads={n_heads} "
                f"(each key/value head serves a whole group of query heads)")
        if kernel not in KERNELS:
            raise ValueError(f"model.attention.kernel={kernel!r} is not one of {sorted(KERNELS)}")
        if pattern is not None and window is not None:
            raise ValueError("set either model.attention.window or a per-layer attention schedule, not both")
        self.pattern = pattern if pattern is not None else (SlidingWindow(window) if window is not None else Causal())
        self.n_heads, self.n_kv_heads, self.head_dim, self.kernel = n_heads, n_kv_heads, head_dim, kernel
        self.ran, self.dropout = None, dropout
        self.q_proj = nn.Linear(d_model, n_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(n_heads * head_dim, d_model, bias=bias)
        self.o_proj.is_residual_projection = True  # scaled init, see TransformerLM.reset_parameters
        self.score_mods = (SoftCap(softcap),) if softcap is not None else ()
        self.softmax_scale = 1.0 / math.sqrt(head_dim)
        if qk_norm:
            self.q_norm, self.k_norm = nn.RMSNorm(head_dim, eps=1e-6), nn.RMSNorm(head_dim, eps=1e-6)

    def use_mup_scale(self, head_width_mult: float):
        """µP (variants/mup.py): scores scaled by 1/d_head, as sqrt(base d_head) / d_head = 1/sqrt(d_head x m):
        query-key products of aligned vectors grow like d_head, not its square root."""
        self.softmax_scale = 1.0 / math.sqrt(self.head_dim * head_width_mult)

    def cache_layout(self) -> dict:
        """Per cached token: name -> (heads, dim); the model sizes its KVCache from this."""
        return {"k": (self.n_kv_heads, self.head_dim), "v": (self.n_kv_heads, self.head_dim)}

    def forward(self, x, rotary=None, ctx=None, cache=None):
        """x: (B, T, d_model); rotary: (cos, sin) or None; ctx: AttentionContext; cache: a LayerCache."""
        B, T, _ = x.shape
        q, k, v = self.project("qkv", x)  # one GEMM once fused (variants/fusion.py)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        if cache is not None:
            k, v = cache.update(k, v)  # all keys/values so far, (B, Hkv, Tkv, hd)
        if ctx is None:
            ctx = AttentionContext(T, k.shape[2], k.shape[2] - T, device=x.device)
        y = attend(self, q, k, v, ctx, self.softmax_scale)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))
