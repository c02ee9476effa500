"""Normalisation layers.

We use torch's own `nn.LayerNorm` (Ba et al. 2016) and `nn.RMSNorm` (Zhang & Sennrich 2019), and DyT. Their
yaml files build them as partials, so the model calls `norm(d_model)`; any class with that constructor shape
plugs in the same way. Where the norm sits (pre-, post-norm, OLMo 2) is the block's business, see block.py.
"""
import torch
from torch import nn
from torch.nn import LayerNorm, RMSNorm

__all__ = ["LayerNorm", "RMSNorm", "DyT"]


class DyT(nn.Module):
    """Dynamic Tanh (Zhu et al. 2025, "Transformers without Normalization"): weight * tanh(alpha * x) + bias,
    element-wise, with one learnable scalar alpha (initialised to `alpha_init`) in place of the statistics a
    norm computes over d_model."""

    def __init__(self, d_model: int, alpha_init: float = 0.5):
        super().__init__()
        self.alpha_init = alpha_init
        self.alpha = nn.Parameter(torch.empty(1))
        self.weight = nn.Parameter(torch.empty(d_model))
        self.bias = nn.Parameter(torch.empty(d_model))
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.constant_(self.alpha, self.alpha_init)
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)

    def forward(self, x):
        return self.weight * torch.tanh(self.alpha * x) + self.bias
