"""TransformerLM: a decoder-only language model assembled from swappable parts.

    tokens -> embedding (+ absolute positions) -> n_layers x block(attention, ffn, norms) -> [final norm]
           -> LM head -> logits

Every part arrives as a factory (a class or a `functools.partial`, which is what Hydra's `_partial_: true`
produces) and the model hands it the shared sizes, so a user's own class plugs in through config.
"""
import inspect
import math

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Attention
from .block import BLOCKS
from .cache import KVCache
from .ffn import GatedMLP
from .masks import AttentionContext, CacheSlotContext
from .mup import ParamRole, check_parametrization, declared_kinds, multipliers
from .norm import DyT
from .position import RoPE, positions_from_documents


class TransformerLM(nn.Module):
    """Decoder-only transformer.

    Args:
        vocab_size, d_model, n_layers, n_heads, max_seq_len: the sizes.
        attention: factory called as attention(d_model=, n_heads=, head_dim=[, pattern=]) -> Attention.
        ffn: factory called as ffn(d_model) -> e.g. MLP or GatedMLP.
        norm: factory called as norm(d_model) -> e.g. nn.RMSNorm or nn.LayerNorm.
        position: factory called as position(d_model=, head_dim=, max_seq_len=) -> a position module.
        norm_position: "pre", "post" or "olmo2" (block.py).
        tie_embeddings: share the token embedding with the LM head.
        attention_schedule: mask patterns cycled over the layers (e.g. [Causal(), StridedSparse(16)] for
            GPT-3's alternation of dense and sparse layers); None uses the attention factory's own.
        head_dim: per-head size; None means d_model // n_heads.
        init_std: std of the normal init; residual output projections get init_std / sqrt(2 n_layers)
            (GPT-2), so the residual stream's variance does not grow with depth. A part opts in by marking
            the nn.Linear that writes into the residual stream: `self.out_proj.is_residual_projection = True`
            (Attention's o_proj and the MLPs' down_proj do), so a user's own attention or FFN can too.
        parametrization: "sp" (standard) or "mup" (variants/mup.py): µP's init, attention scale and output
            multiplier, and the lr multipliers `parameter_roles()` hands the optimizer.
        base_width: the d_model the lr was tuned at (µP's width multiplier is d_model / base_width); None:
            d_model itself.
        dropout: GPT-2's three dropouts, in training only: on the embeddings (after positions are added), on the
            attention probabilities (handed to the attention factory as `dropout=`, only when > 0, so a user's
            own attention without that argument still builds at 0) and on each sublayer's output before the
            residual add (the block's). 0 leaves the forward untouched.

    The runner uses only this public face (so a user's own block or attention class works with bench,
    inspect, generate and FSDP): `blocks` (the repeated layers), `attention_modules()`, `n_heads`,
    `n_kv_heads`, `head_dim`, `max_seq_len`, `vocab_size`, `num_params()`, `flops_per_token()`,
    `kv_cache_bytes_per_token()`, `cache_layout()`, `allocate_cache()`, `aux_loss()`, `reencode_at` and
    `parameter_roles()`.
    Defaults give the Llama block: pre-norm RMSNorm, SwiGLU, RoPE, MHA.
    """

    def __init__(self, vocab_size: int, d_model: int, n_layers: int, n_heads: int, max_seq_len: int,
                 attention=Attention, ffn=GatedMLP, norm=nn.RMSNorm, position=RoPE, norm_position: str = "pre",
                 tie_embeddings: bool = False, attention_schedule=None, head_dim: int | None = None,
                 init_std: float = 0.02, parametrization: str = "sp", base_width: int | None = None,
                 dropout: float = 0.0):
        super().__init__()
        check_parametrization(parametrization, base_width)
        for key, value in [("vocab_size", vocab_size), ("d_model", d_model), ("n_layers", n_layers),
                           ("n_heads", n_heads), ("max_seq_len", max_seq_len)]:
            if value is None or value < 1:
                raise ValueError(f"model.{key} must be a positive integer, got {value}")
        if head_dim is None and d_model % n_heads:
            raise ValueError(f"model.n_heads={n_heads} does not divide model.d_model={d_model}")
        if norm_position not in BLOCKS:
            raise ValueError(f"model.norm_position={norm_position!r} must be one of {sorted(BLOCKS)}")
        if attention_schedule is not None and len(attention_schedule) == 0:
            raise ValueError("model.attention_schedule must be null or a non-empty list of mask patterns")
        self.vocab_size, self.d_model, self.n_layers, self.n_heads = vocab_size, d_model, n_layers, n_heads
        self.max_seq_len, self.norm_position, self.init_std = max_seq_len, norm_position, init_std
        self.head_dim = head_dim or d_model // n_heads
        self.parametrization = parametrization
        self.width_mult = d_model / (base_width or d_model) if parametrization == "mup" else 1.0
        self.output_mult = 1 / self.width_mult  # µP's logits multiplier (1 under SP)
        self.dropout = dropout
        attn_dropout = _dropout_argument(attention, dropout)

        self.embed = nn.Embedding(vocab_size, d_model)
        self.position = position(d_model=d_model, head_dim=self.head_dim, max_seq_len=max_seq_len)
        score_mod = getattr(self.position, "score_mod", None)  # ALiBi: a bias on every layer's scores
        self.score_mods = (score_mod(n_heads),) if score_mod is not None else ()
        block_cls = BLOCKS[norm_position]
        blocks = []
        for i in range(n_layers):
            pattern = {} if attention_schedule is None else {"pattern": attention_schedule[i % len(attention_schedule)]}
            attn = attention(d_model=d_model, n_heads=n_heads, head_dim=self.head_dim, **pattern, **attn_dropout)
            blocks.append(block_cls(attn, ffn(d_model), norm(d_model), norm(d_model), dropout=dropout))
        self.blocks = nn.ModuleList(blocks)
        self.norm = norm(d_model) if block_cls.needs_final_norm else nn.Identity()
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        if tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.tie_embeddings = tie_embeddings
        if parametrization == "mup":  # a head size set apart from d_model does not grow with it
            for attn in self.attention_modules():
                if not hasattr(attn, "use_mup_scale"):
                    raise ValueError(f"model.parametrization=mup needs the attention class to have "
                                     f"use_mup_scale(head_width_mult) (variants/mup.py); {type(attn).__name__} has not")
                attn.use_mup_scale(self.width_mult if head_dim is None else 1.0)
        self.reset_parameters()

    # -- construction -----------------------------------------------------------------------------
    def reset_parameters(self):
        residual_std = self.init_std / math.sqrt(2 * self.n_layers)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                std = residual_std if getattr(module, "is_residual_projection", False) else self.init_std
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=self.init_std)
            elif isinstance(module, (nn.LayerNorm, nn.RMSNorm, DyT)):
                module.reset_parameters()
        if self.parametrization == "mup":  # SP's draws, rescaled per kind (variants/mup.py)
            with torch.no_grad():
                for role in self.parameter_roles():
                    if role.init_mult != 1.0:
                        role.param.mul_(role.init_mult)

    def parameter_roles(self) -> list[ParamRole]:
        """Every parameter once (a tied head is the embedding), with its µP kind, its init and lr multipliers
        (1 under SP) and whether it is a 2-D matrix inside the blocks (Muon's). The parts say their kinds
        (variants/mup.py); the head keeps its init and lr, its logits carrying the 1/width_mult instead."""
        declared = declared_kinds(self)
        roles = []
        for name, p in self.named_parameters():
            inside = name.startswith("blocks.")
            kind = declared.get(name) or ("output" if name == "lm_head.weight" else
                                          "hidden" if inside and p.ndim == 2 else "input")
            init_mult, lr_mult = multipliers(kind, self.width_mult)
            if name == "lm_head.weight" or self.parametrization == "sp":
                init_mult, lr_mult = 1.0, 1.0
            roles.append(ParamRole(name, p, kind, inside and p.ndim == 2, init_mult, lr_mult))
        return roles

    # -- the public face the runner uses ---------------------------------------------------------------
    def fuse_projections(self) -> int:
        """For inference: every part with projections of one input (q/k/v, gate/up: any module with a
        `fuse_projections` method, a user's own part too) runs them as one GEMM in eval mode, with the same
        parameters and memory (variants/fusion.py). Returns how many groups were fused."""
        return sum(m.fuse_projections() for m in self.modules() if m is not self and hasattr(m, "fuse_projections"))

    def attention_modules(self) -> list[nn.Module]:
        """The self-attention module of every layer, in order (each has n_heads, n_kv_heads, head_dim and,
        for ours, kernel and pattern)."""
        return [block.attn for block in self.blocks]

    @property
    def n_kv_heads(self) -> int:
        return self.attention_modules()[0].n_kv_heads

    @property
    def reencode_at(self) -> int | None:
        """A KV-cached sequence that grows past this many tokens must be encoded again from scratch (the
        position module decides: LongRoPE's switch to its long factors); None: never."""
        return getattr(self.position, "reencode_at", None)

    def num_params(self, exclude_embeddings: bool = False, active: bool = False) -> int:
        """Unique parameters (a tied head counts once); optionally without token/position embeddings; with
        `active`, only those one token uses (a mixture of experts' unchosen experts left out)."""
        n = sum(p.numel() for p in self.parameters())
        if active:
            n -= sum(m.inactive_params() for m in self.modules() if hasattr(m, "inactive_params"))
        if exclude_embeddings:
            n -= self.embed.weight.numel()
            n -= sum(p.numel() for p in self.position.parameters())
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward): 6 x active matmul parameters plus attention's
        QK^T and AV, 12 x n_layers x n_heads x head_dim x seq_len (PaLM, Chowdhery et al. 2022, app. B)."""
        matmul_params = (self.num_params(exclude_embeddings=True, active=True)
                         + self.lm_head.weight.numel() * self.tie_embeddings)
        return 6 * matmul_params + 12 * self.n_layers * self.n_heads * self.head_dim * seq_len

    def aux_loss(self):
        """Sum of the auxiliary losses the parts recorded in the last forward (MoE load balancing), or None."""
        losses = [m.last_aux_loss for m in self.modules() if getattr(m, "last_aux_loss", None) is not None]
        return sum(losses) if losses else None

    # -- Hugging Face Phi-3 checkpoints (variants/hf.py) ---------------------------------------------
    @classmethod
    def from_hf(cls, path_or_hub_id, **overrides) -> "TransformerLM":
        """A Phi-3 checkpoint (local directory or Hub id); overrides: see variants.hf.from_hf."""
        from .hf import from_hf
        return from_hf(path_or_hub_id, model_cls=cls, **overrides)

    def save_hf(self, directory, **kwargs):
        """Write a checkpoint that transformers loads as Phi3ForCausalLM; see variants.hf.save_hf."""
        from .hf import save_hf
        if self.parametrization != "sp":
            raise ValueError("save_hf: a model.parametrization=mup model has an output multiplier and attention "
                             "scale that Phi3ForCausalLM does not")
        return save_hf(self, directory, **kwargs)

    # -- KV cache -----------------------------------------------------------------------------------
    def cache_layout(self) -> dict:
        """What one layer caches per token, name -> (heads, dim), asked of the attention modules (a module
        without `cache_layout` caches K and V over its n_kv_heads x head_dim)."""
        layouts = [attn.cache_layout() if hasattr(attn, "cache_layout") else
                   {"k": (attn.n_kv_heads, attn.head_dim), "v": (attn.n_kv_heads, attn.head_dim)}
                   for attn in self.attention_modules()]
        if any(layout != layouts[0] for layout in layouts):
            raise ValueError("a KV cache needs every layer to cache the same layout")
        return layouts[0]

    def kv_cache_bytes_per_token(self, dtype=torch.float32) -> int:
        return KVCache.layout_bytes_per_token(self.n_layers, self.cache_layout(), dtype)

    def allocate_cache(self, batch_size: int, max_len: int | None = None, dtype=None, device=None) -> KVCache:
        ref = self.embed.weight
        return KVCache(self.n_layers, batch_size, self.n_kv_heads, self.head_dim, max_len or self.max_seq_len,
                       dtype=dtype or ref.dtype, device=device or ref.device, layout=self.cache_layout())

    # -- forward --------------------------------------------------------------------------------------
    def forward(self, input_ids, position_ids=None, document_ids=None, cache: KVCache | None = None,
                cache_slots=None, return_hidden: bool = False):
        """input_ids: (B, T) -> logits (B, T, vocab_size).

        document_ids (B, T): tokens attend only within their own document (packed rows, padding); when
        position_ids is None they restart at 0 at every document. With `cache`, the call continues the
        cached sequence: positions, masks and documents carry on from the cached tokens.
        cache_slots (T,), a tensor, with `cache`, position_ids and document_ids: the fixed-shape call of
        compiled decoding (runner/decode.py): the tokens are written at those slots and attend over the
        whole preallocated cache under a mask, so every step has the same shapes; `cache.length` is unused.
        return_hidden: the final hidden states (B, T, d_model), normed (and times µP's output multiplier),
        instead of logits (a chunked loss applies `lm_head` itself).
        """
        if cache_slots is not None:
            return self._forward_at_slots(input_ids, position_ids, document_ids, cache, cache_slots, return_hidden)
        B, T = input_ids.shape
        offset = cache.length if cache is not None else 0
        if cache is not None and document_ids is None and offset > 0 and cache.has_documents:
            document_ids = cache.document_ids[:, offset - 1:offset].expand(B, T)  # continue the last document
        if position_ids is None:
            if document_ids is not None:
                prev = (cache.document_ids[:, offset - 1], cache.position_ids[:, offset - 1]) if offset else (None, None)
                position_ids = positions_from_documents(document_ids, *prev)
            else:
                position_ids = torch.arange(offset, offset + T, device=input_ids.device).expand(B, T)
        kv_doc = document_ids
        if cache is not None and document_ids is not None:
            kv_doc = torch.cat([cache.document_ids[:, :offset], document_ids], dim=1)
        ctx = AttentionContext(T, offset + T, offset, document_ids, kv_doc, device=input_ids.device,
                               score_mods=self.score_mods)

        x = self.embed(input_ids)
        x, rotary = self.position(x, position_ids)
        if self.dropout and self.training:  # GPT-2's embedding dropout
            x = F.dropout(x, self.dropout)
        for i, block in enumerate(self.blocks):
            x = block(x, rotary, ctx, cache.layer(i) if cache is not None else None)
        x = self._scale_output(self.norm(x))
        if cache is not None:
            docs = document_ids if document_ids is not None else torch.zeros_like(input_ids)
            cache.advance(docs, position_ids, documented=document_ids is not None)
        return x if return_hidden else self.lm_head(x)

    def _forward_at_slots(self, input_ids, position_ids, document_ids, cache, slots, return_hidden):
        if cache is None or position_ids is None or document_ids is None:
            raise ValueError("a call with cache_slots needs cache, position_ids and document_ids")
        cache.record_at(slots, document_ids, position_ids)  # before the layers: the new tokens see each other
        ctx = CacheSlotContext(slots, document_ids, cache.document_ids, score_mods=self.score_mods)
        x, rotary = self.position(self.embed(input_ids), position_ids)
        for i, block in enumerate(self.blocks):
            x = block(x, rotary, ctx, cache.layer(i, slots))
        x = self._scale_output(self.norm(x))
        return x if return_hidden else self.lm_head(x)

    def _scale_output(self, x):
        """µP's 1/width_mult on the logits, applied to the normed hidden states (the same, lm_head being linear
        without bias, and a chunked loss that applies lm_head itself gets it too)."""
        return x if self.output_mult == 1.0 else x * self.output_mult

    def loss(self, input_ids, labels, position_ids=None, document_ids=None):
        """Mean cross-entropy over targets != -100 (masked document boundaries and padding)."""
        logits = self(input_ids, position_ids=position_ids, document_ids=document_ids)
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), labels.view(-1), ignore_index=-100)


def _dropout_argument(attention, dropout: float) -> dict:
    """{"dropout": p} for the attention factory when p > 0, {} at 0 (a user's own attention need not take it)."""
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"model.dropout={dropout} must be in [0, 1)")
    if not dropout:
        return {}
    try:
        params = inspect.signature(attention).parameters
    except (TypeError, ValueError):  # no signature to read: let the call decide
        return {"dropout": dropout}
    if "dropout" not in params and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        raise ValueError(f"model.dropout={dropout}: the attention factory {attention!r} takes no `dropout` argument")
    return {"dropout": dropout}
