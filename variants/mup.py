"""µP, the maximal-update parametrization (Yang et al. 2022, "Tensor Programs V", Tables 3 and 8), as a
property of the parts: an lr tuned at `base_width` carries over to other widths.

Every parameter is one of three kinds, by how its dims grow with the width (d_model):
    input    fan-in fixed: embeddings, norm gains, biases, a projection out of a fixed-size latent (MLA's kv_up)
    hidden   both dims grow: the attention and feed-forward matrices
    output   fan-in grows, fan-out fixed: the LM head, a MoE router, MLA's down-projection to its latent
A part whose parameters are not "2-D weights are hidden, the rest input" says so with a `mup_kinds()` method
(local parameter name -> kind), as MoE and MultiHeadLatentAttention do; a user's part can too.

With m = d_model / base_width, Table 3 for Adam (and used for Muon's lr as well):
              init std           lr
    input     unchanged          unchanged
    hidden    std / sqrt(m)      lr / m
    output    std / m            lr / m
The LM head takes Table 8's equivalent form instead (the `mup` package's MuReadout): its init and lr unchanged
and its logits multiplied by 1/m, so a tied head can share the embedding's rules. Attention scores are scaled
by 1/d_head instead of 1/sqrt(d_head) (as sqrt(base d_head) / d_head, which is SP's at the base width). At
m = 1 µP is SP exactly.
"""
import math
from dataclasses import dataclass

from torch import nn

PARAMETRIZATIONS = ("sp", "mup")


@dataclass(frozen=True)
class ParamRole:
    """One parameter as the optimizer builder sees it (runner/optim.py)."""
    name: str
    param: nn.Parameter
    kind: str  # input | hidden | output
    hidden_matrix: bool  # a 2-D weight inside the blocks: what Muon updates
    init_mult: float  # its init std over SP's
    lr_mult: float  # its lr over the configured one


def multipliers(kind: str, width_mult: float) -> tuple[float, float]:
    """(init std multiplier, lr multiplier) of a kind under µP at width_mult (Table 3)."""
    if kind == "hidden":
        return 1 / math.sqrt(width_mult), 1 / width_mult
    if kind == "output":
        return 1 / width_mult, 1 / width_mult
    return 1.0, 1.0


def declared_kinds(model: nn.Module) -> dict[str, str]:
    """Full parameter name -> kind, for the parts that declare theirs (`mup_kinds()`)."""
    kinds = {}
    for prefix, module in model.named_modules():
        if module is not model and hasattr(module, "mup_kinds"):
            kinds.update({f"{prefix}.{name}": kind for name, kind in module.mup_kinds().items()})
    return kinds


def check_parametrization(parametrization: str, base_width: int | None) -> None:
    if parametrization not in PARAMETRIZATIONS:
        raise ValueError(f"model.parametrization={parametrization!r} must be one of {list(PARAMETRIZATIONS)}")
    if base_width is not None and base_width < 1:
        raise ValueError(f"model.base_width={base_width} must be a positive integer or null (= model.d_model)")
