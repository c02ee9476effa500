"""Swappable parts of a decoder-only transformer. Import them into your own code:

    from variants import TransformerLM, Attention, RoPE, GatedMLP
"""
from .attention import KERNELS, Attention
from .block import OLMo2Block, PostNormBlock, PreNormBlock
from .cache import KVCache
from .ffn import MLP, GatedMLP, gated_hidden_dim
from .masks import AttentionContext, Causal, SlidingWindow, StridedSparse
from .model import TransformerLM
from .mla import MultiHeadLatentAttention
from .moe import MoE
from .norm import DyT, LayerNorm, RMSNorm
from .scores import ALiBiBias, SoftCap, alibi_slopes
from .position import (ALiBi, LearnedPosition, LinearScaling, LongRoPEScaling, NoPosition, RoPE, SinusoidalPosition,
                       apply_rotary, positions_from_documents)

__all__ = [
    "TransformerLM", "Attention", "KERNELS", "PreNormBlock", "PostNormBlock", "KVCache", "MLP", "GatedMLP",
    "gated_hidden_dim", "AttentionContext", "Causal", "SlidingWindow", "StridedSparse", "LayerNorm", "RMSNorm",
    "NoPosition", "LearnedPosition", "SinusoidalPosition", "RoPE", "LinearScaling", "LongRoPEScaling",
    "apply_rotary", "positions_from_documents", "ALiBi", "ALiBiBias", "SoftCap", "alibi_slopes", "DyT", "OLMo2Block",
    "MoE", "MultiHeadLatentAttention",
]
