"""Mixture-of-experts feed-forward: top-k token routing over SwiGLU experts.

Each token's router logits pick its `top_k` experts (Shazeer et al. 2017); their softmax probabilities,
renormalised over the chosen k (Mixtral, Jiang et al. 2024), weight the experts' outputs. An optional shared
expert sees every token (DeepSeekMoE, Dai et al. 2024). Balance comes from the Switch Transformer's
auxiliary loss (Fedus et al. 2022, eq. 4): n_experts * sum_e f_e * P_e, with f_e the fraction of routing
assignments that went to expert e and P_e its mean router probability; it is minimal (1) when both are
uniform. With `capacity_factor` set, an expert takes at most ceil(capacity_factor * tokens * k / n_experts)
tokens per call, in token order; the rest are dropped (that expert adds nothing for them) and counted.
Capacity makes a token's output depend on the other tokens of the call, later ones included, so it is not
causal and a KV-cached decode differs from the full forward: leave it null for language modelling runs.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from .ffn import GatedMLP, gated_hidden_dim


class MoE(nn.Module):
    """Args:
        d_model: model width.
        n_experts, top_k: experts, and how many each token uses.
        hidden_dim: each expert's hidden size; None = the dense SwiGLU's (2/3 * 4 * d_model, rounded) / top_k.
        shared_expert: add one always-on expert of the same size.
        capacity_factor: None = no capacity (no token is dropped).
        aux_loss_coef: weight of the load-balancing loss in `last_aux_loss` (Switch: 0.01).

    After each forward: `last_aux_loss` (scalar tensor, weighted), `last_expert_counts` (n_experts,) routing
    assignments per expert, `last_dropped` (scalar) assignments dropped for capacity; both are device tensors
    (no host sync per step).

    Compiled (training or the decode step), every expert runs on every token with a zero gate where the
    token is not routed: one graph with static shapes and the eager result, at n_experts / top_k times the
    expert FLOPs.
    """

    def __init__(self, d_model: int, n_experts: int = 8, top_k: int = 2, hidden_dim: int | None = None,
                 multiple_of: int = 32, shared_expert: bool = False, capacity_factor: float | None = None,
                 aux_loss_coef: float = 0.01, activation: str = "silu", bias: bool = False):
        super().__init__()
        if n_experts < 1 or not 1 <= top_k <= n_experts:
            raise ValueError(f"model.ffn.top_k={top_k} must be in [1, model.ffn.n_experts={n_experts}]")
        if capacity_factor is not None and capacity_factor <= 0:
            raise ValueError(f"model.ffn.capacity_factor must be > 0 or null, got {capacity_factor}")
        # default: the dense SwiGLU's hidden size split over the k active experts (fine-grained experts,
        # DeepSeekMoE), so a token uses as many parameters as in the dense FFN, plus the router
        hidden_dim = hidden_dim or -(-gated_hidden_dim(d_model, multiple_of) // top_k)
        self.n_experts, self.top_k = n_experts, top_k
        self.capacity_factor, self.aux_loss_coef = capacity_factor, aux_loss_coef
        self.router = nn.Linear(d_model, n_experts, bias=False)
        self.experts = nn.ModuleList(GatedMLP(d_model, hidden_dim, activation, bias=bias) for _ in range(n_experts))
        self.shared = GatedMLP(d_model, hidden_dim, activation, bias=bias) if shared_expert else None
        self.last_aux_loss, self.last_expert_counts, self.last_dropped = None, None, 0

    def mup_kinds(self) -> dict[str, str]:
        """µP kinds (variants/mup.py): the router maps the width to a fixed n_experts, an output; the experts'
        matrices are hidden."""
        return {"router.weight": "output"}

    def inactive_params(self) -> int:
        """Parameters a token does not use: the experts it is not routed to."""
        return (self.n_experts - self.top_k) * sum(p.numel() for p in self.experts[0].parameters())

    def forward(self, x):
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # (N, d)
        probs = self.router(flat).float().softmax(dim=-1)  # (N, E)
        weights, chosen = probs.topk(self.top_k, dim=-1)  # (N, k)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        # Routing as (N, E) tensors with no data-dependent shapes or host syncs, so it compiles in one graph.
        assigned = F.one_hot(chosen, self.n_experts).sum(dim=1)  # (N, E): 1 where the token chose the expert
        kept = assigned.bool()
        if self.capacity_factor is not None:  # each expert keeps its first `capacity` tokens, in token order
            capacity = math.ceil(self.capacity_factor * flat.shape[0] * self.top_k / self.n_experts)
            kept = kept & (assigned.cumsum(dim=0) <= capacity)
        gates = torch.zeros_like(probs).scatter(1, chosen, weights) * kept  # (N, E): 0 where not served
        gates = gates.to(x.dtype)
        if torch.compiler.is_compiling():
            out = self._dense(flat, gates)
        else:
            out = self._routed(flat, gates, kept)
        if self.shared is not None:
            out = out + self.shared(flat)
        fraction = assigned.sum(dim=0).float() / chosen.numel()  # f_e
        self.last_aux_loss = self.aux_loss_coef * self.n_experts * (fraction * probs.mean(dim=0)).sum()
        # device tensors: read them when logging, not every step
        self.last_expert_counts, self.last_dropped = assigned.sum(dim=0), assigned.sum() - kept.sum()
        return out.view(shape)

    def _routed(self, flat, gates, kept):
        """Eager: each expert runs on the tokens it serves. An expert that serves none still runs (on zero
        rows) so its parameters get a (zero) gradient: DDP sees no unused parameters."""
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            token = kept[:, e].nonzero().squeeze(1)  # in token order
            out.index_add_(0, token, expert(flat[token]) * gates[token, e, None])
        return out

    def _dense(self, flat, gates):
        """Compiled: every expert on every token, weighted by its gate (0 where not routed): static shapes,
        no graph break, the same result as `_routed`, at n_experts / top_k times the expert FLOPs."""
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            out = out + expert(flat) * gates[:, e, None]
        return out
