"""Normalisation layers.

We use torch's own `nn.LayerNorm` (Ba et al. 2016) and `nn.RMSNorm` (Zhang & Sennrich 2019). Their yaml
files build them as partials, so the model calls `norm(d_model)`; any class with that constructor shape
plugs in the same way. Where the norm sits (pre- or post-norm) is the block's business, see block.py.
"""
from torch.nn import LayerNorm, RMSNorm

__all__ = ["LayerNorm", "RMSNorm"]
