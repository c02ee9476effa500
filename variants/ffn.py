"""Feed-forward layers: the two-matrix MLP (ReLU as in 2017, GELU as in GPT-2, squared ReLU as in Primer)
and the gated GLU family
(Shazeer 2020: SwiGLU in Llama/Phi-3, GeGLU).

Both take `(d_model, hidden_dim=None, ...)`. With hidden_dim unset, the MLP uses 4 * d_model and a gated
MLP uses 2/3 of that (rounded up to `multiple_of`), so that swapping ReLU for SwiGLU keeps the
parameter count (3 matrices of d x 8d/3 ~ 2 matrices of d x 4d) and a comparison is fair.
"""
import torch.nn.functional as F
from torch import nn

from .fusion import FusedProjections

ACTIVATIONS = {
    "relu": F.relu,
    "relu2": lambda x: F.relu(x).square(),  # squared ReLU (So et al. 2021, Primer)
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
}


def _activation(name):
    if name not in ACTIVATIONS:
        raise ValueError(f"model.ffn.activation={name!r} is not one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def gated_hidden_dim(d_model: int, multiple_of: int = 32) -> int:
    """Parameter-matched hidden size of a gated MLP: 2/3 * 4 * d_model rounded up to `multiple_of`."""
    hidden = int(2 * 4 * d_model / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


class MLP(nn.Module):
    """down(act(up(x))) with hidden size 4 * d_model by default."""

    def __init__(self, d_model: int, hidden_dim: int | None = None, activation: str = "relu", bias: bool = False):
        super().__init__()
        hidden_dim = hidden_dim or 4 * d_model
        self.act = _activation(activation)
        self.up_proj = nn.Linear(d_model, hidden_dim, bias=bias)
        self.down_proj = nn.Linear(hidden_dim, d_model, bias=bias)
        self.down_proj.is_residual_projection = True

    def forward(self, x):
        return self.down_proj(self.act(self.up_proj(x)))


class GatedMLP(FusedProjections, nn.Module):
    """down(act(gate(x)) * up(x)): SwiGLU with activation="silu", GeGLU with "gelu"."""

    fusable_projections = {"gate_up": ("gate_proj", "up_proj")}

    def __init__(self, d_model: int, hidden_dim: int | None = None, activation: str = "silu",
                 multiple_of: int = 32, bias: bool = False):
        super().__init__()
        hidden_dim = hidden_dim or gated_hidden_dim(d_model, multiple_of)
        self.act = _activation(activation)
        self.gate_proj = nn.Linear(d_model, hidden_dim, bias=bias)
        self.up_proj = nn.Linear(d_model, hidden_dim, bias=bias)
        self.down_proj = nn.Linear(hidden_dim, d_model, bias=bias)
        self.down_proj.is_residual_projection = True

    def forward(self, x):
        gate, up = self.project("gate_up", x)  # one GEMM once fused (variants/fusion.py)
        return self.down_proj(self.act(gate) * up)
