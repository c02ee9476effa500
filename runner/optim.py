"""The optimizer, chosen by `train/optimizer=adamw|muon` (conf/train/optimizer/), built by one call:

    optimizer = build_optimizer(cfg.train, model, device)

Parameter groups come from the model's own description of its parameters (`TransformerLM.parameter_roles()`,
variants/mup.py): which are 2-D matrices inside the blocks (what Muon updates) and each one's learning-rate
multiplier (1 under standard parametrization, µP's otherwise). Weight decay falls on matrices only, not on
norms, biases or embeddings (as in GPT-3, Llama); `train.decay_embeddings=true` decays the embeddings (and a
tied head) too.

A yaml under conf/train/optimizer/ names a factory with `_target_` and `_partial_: true`; the factory is called
with a list of torch parameter groups, so `_target_: torch.optim.SGD` plugs in as it is. Each group carries two
extra keys torch optimizers keep and ignore: `hidden_matrix` and `lr_mult`; after construction every group's lr
is multiplied by its `lr_mult` (the scheduler then scales each group from there).
"""
import inspect

import torch
from hydra.utils import instantiate
from torch import nn


def build_optimizer(t, model: nn.Module, device) -> torch.optim.Optimizer:
    """The optimizer train.optimizer names, over `model`'s parameter groups, with µP's lr multipliers applied."""
    factory = instantiate(t.optimizer)
    groups = param_groups(model, t.weight_decay, t.get("decay_embeddings", False))
    wants_device = "device" in inspect.signature(getattr(factory, "func", factory)).parameters
    optimizer = factory(groups, **({"device": torch.device(device)} if wants_device else {}))
    for group in optimizer.param_groups:
        group["lr"] = group["lr"] * group.get("lr_mult", 1.0)
    return optimizer


def check_optimizer_config(t) -> None:
    """Before any work: an optimizer that cannot run in this set-up, named by its key."""
    target = str(t.optimizer.get("_target_", ""))
    if target.endswith(".muon") and t.get("distributed") == "fsdp":
        raise ValueError("train/optimizer=muon needs whole matrices and train.distributed=fsdp shards them: "
                         "use train.distributed=ddp or train/optimizer=adamw")
    if not t.optimizer.get("_partial_", False):
        raise ValueError(f"train.optimizer._partial_ must be true (the optimizer is built with the model's "
                         f"parameter groups), got {t.optimizer.get('_partial_')}")


def param_groups(model: nn.Module, weight_decay: float, decay_embeddings: bool = False) -> list[dict]:
    """Groups of parameters that share (decayed, lr multiplier, hidden matrix): decayed groups first, each in the
    order of model.parameters(). Decay matrices only: norms, biases and (unless decay_embeddings) embeddings
    and a head tied to them are left alone."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    roles = _roles(model)
    groups: dict[tuple, dict] = {}
    for p in {id(p): p for p in model.parameters() if p.requires_grad}.values():
        decay = p.ndim >= 2 and (decay_embeddings or id(p) not in embeddings)
        lr_mult, hidden = roles.get(id(p), (1.0, False))
        key = (not decay, lr_mult, hidden)
        group = groups.setdefault(key, {"params": [], "weight_decay": weight_decay if decay else 0.0,
                                        "lr_mult": lr_mult, "hidden_matrix": hidden})
        group["params"].append(p)
    return [groups[key] for key in sorted(groups, key=lambda k: k[0])]  # a stable sort: decayed first


def _roles(model: nn.Module) -> dict[int, tuple[float, bool]]:
    """id(param) -> (lr multiplier, is a hidden matrix), from the model's parameter_roles() (variants/mup.py);
    a model without it: multipliers 1, and the 2-D weights inside its `blocks` are its hidden matrices."""
    inner = getattr(model, "module", model)  # DDP
    if hasattr(inner, "parameter_roles"):
        return {id(r.param): (r.lr_mult, r.hidden_matrix) for r in inner.parameter_roles()}
    return {id(p): (1.0, p.ndim == 2 and name.startswith("blocks.")) for name, p in inner.named_parameters()}


def merge_groups(groups: list[dict], keep=("weight_decay", "lr_mult")) -> list[dict]:
    """Groups that agree on the `keep` keys merged, in order (AdamW does not care which matrices are hidden)."""
    merged: dict[tuple, dict] = {}
    for group in groups:
        key = tuple(group[k] for k in keep)
        target = merged.setdefault(key, {**{k: group[k] for k in keep}, "params": []})
        target["params"] += group["params"]
    return list(merged.values())


# -- the factories conf/train/optimizer/*.yaml name ------------------------------------------------------------
def adamw(groups: list[dict], lr: float, betas=(0.9, 0.95), eps: float = 1e-8, device=None) -> torch.optim.AdamW:
    """AdamW (Loshchilov & Hutter 2019) over every group. The fused kernel (no Python loop over parameters) on
    CUDA, and on a CPU outside torchrun (4x faster than the loop for a small model's many small tensors; sharded
    DTensor parameters keep the loop there)."""
    kind = torch.device(device).type if device is not None else None
    fused = kind == "cuda" or (kind == "cpu" and not torch.distributed.is_initialized())
    return torch.optim.AdamW(merge_groups(groups), lr=lr, betas=tuple(betas), eps=eps, fused=fused)


def muon(groups: list[dict], muon_lr: float, adamw_lr: float, betas=(0.9, 0.95), momentum: float = 0.95,
         nesterov: bool = True, ns_steps: int = 5, adjust_lr_fn: str | None = None, device=None) -> "Combined":
    """Muon (Jordan et al. 2024; torch.optim.Muon) for the 2-D matrices inside the blocks (attention, FFN),
    AdamW for embeddings, head, norms and biases, as modded-nanogpt splits them; each with its own lr. The
    groups' weight decay applies to both (Muon's is decoupled, lr x weight_decay, like AdamW's)."""
    hidden = [g for g in groups if g["hidden_matrix"]]
    rest = [g for g in groups if not g["hidden_matrix"]]
    if not hidden:
        raise ValueError("train.optimizer=muon: the model has no 2-D matrices inside its blocks for Muon")
    parts = [torch.optim.Muon([{**g, "lr": muon_lr} for g in hidden], lr=muon_lr, momentum=momentum,
                              nesterov=nesterov, ns_steps=ns_steps, adjust_lr_fn=adjust_lr_fn)]
    if rest:
        parts.append(adamw(rest, lr=adamw_lr, betas=betas, device=device))
    return Combined(parts)


class Combined(torch.optim.Optimizer):
    """Several optimizers over disjoint parameters, stepped as one: `param_groups` and `state` are theirs (the
    same dicts), so an lr scheduler, `state_dict()` / `load_state_dict()` and the distributed checkpoint helpers
    (runner/distributed.py full_state_dicts) see one ordinary optimizer."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        super().__init__([p for o in optimizers for g in o.param_groups for p in g["params"]], {})
        self.optimizers = optimizers
        self.param_groups = [g for o in optimizers for g in o.param_groups]
        self._link()

    def _link(self):
        """Point the parts at this optimizer's group dicts (in order) and at one state keyed by parameter."""
        start = 0
        for o in self.optimizers:
            n = len(o.param_groups)
            o.param_groups, o.state = self.param_groups[start:start + n], self.state
            start += n

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for o in self.optimizers:
            o.step()
        return loss

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        self._link()
