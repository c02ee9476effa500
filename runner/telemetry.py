"""Training telemetry (train.telemetry): what happens inside the model, read at log steps.

After Meta Lingua's probe (per-layer activation statistics, attention entropy), OLMo-core's stability monitor
(loss and gradient-norm spikes) and Wortsman et al. 2023 ("Small-scale proxies for large-scale Transformer
training instabilities": attention-logit growth and output-logit divergence, cured by QK-norm and z-loss).

At a telemetry step (every `every` steps) the forward records, on the device:
  * per layer, the attention's maximum pre-softmax logit and its mean entropy over a bounded sample of queries,
    computed from q and k under the layer's own mask and score modifiers (variants.attention.sampled_logits),
    whichever kernel runs;
  * the residual stream's RMS after each block;
  * the output logits' mean, std and max and their log-partition z = logsumexp(logits), over sampled rows;
and the optimizer step records each parameter group's gradient norm (before clipping) and update/weight ratio
||w_after - w_before|| / ||w_after||. Every step adds its loss and gradient norm for the spike counts: a step is
a spike when its value is more than `spike_sigma` standard deviations above the mean of the `spike_window` steps
before it (as OLMo-core scores them), or not finite. Nothing reaches the host until `read_into`, at a log step:
one transfer. The hooks stay installed and return at once between telemetry steps; the forward's write in place
into the same slot tensors at every telemetry step, so a compiled step keeps two graphs (armed, not armed) and
never recompiles for a new step. With telemetry off (`build` returns Off) there are no hooks. With gradient
accumulation the step's last micro-batch speaks for the forward's statistics.
Under FSDP the per-group norms are of this rank's shards.
"""
import math
import time
from collections import deque
from functools import partial

import torch

from variants.attention import sampled_logits

KEYS = ("every", "rows", "queries", "spike_window", "spike_sigma")
LAYER_KEYS = ("attn_max_logit", "attn_entropy", "resid_rms")


def settings(setting, log_every: int) -> dict | None:
    """train.telemetry -> Telemetry's keyword arguments, or None for off; a bad key or value raises naming it.
    setting: false/None = off; true = the defaults; a mapping of KEYS (and `enabled: false` = off)."""
    if setting is None or setting is False:
        return None
    options = {} if setting is True else dict(setting)
    if not options.pop("enabled", True):
        return None
    unknown = set(options) - set(KEYS)
    if unknown:
        raise ValueError(f"train.telemetry.{sorted(unknown)[0]} is not one of {', '.join(KEYS)} (or enabled)")
    options["every"] = log_every if options.get("every") is None else options["every"]
    for key in ("every", "rows", "queries", "spike_window"):
        if key in options and not (isinstance(options[key], int) and options[key] >= 1):
            raise ValueError(f"train.telemetry.{key}={options[key]!r} must be a positive integer")
    return options


def build(setting, model, optimizer, log_every: int):
    """A Telemetry on `model` (the unwrapped TransformerLM) and `optimizer`, or Off (no hooks at all)."""
    options = settings(setting, log_every)
    return Off() if options is None else Telemetry(model, optimizer, **options)


class Off:
    """train.telemetry=false: nothing installed, nothing recorded."""

    def arm(self, step):
        pass

    def record(self, step, loss, grad_norm):
        pass

    def read_into(self, curves, results, logger) -> float:
        return 0.0

    def state_dict(self):
        return None

    def load_state_dict(self, state):
        pass


class Telemetry:
    def __init__(self, model, optimizer, every: int, rows: int = 4, queries: int = 64, spike_window: int = 100,
                 spike_sigma: float = 6.0):
        self.every, self.rows, self.queries, self.sigma = every, rows, queries, spike_sigma
        self.n_layers, self.device = len(model.blocks), next(model.parameters()).device
        self.groups = [str(g.get("name", i)) for i, g in enumerate(optimizer.param_groups)]
        self.armed, self.current, self.points, self.steps, self.before = False, None, [], [], None
        # what the forward records, written in place (NaN, read as null: not recorded this step)
        self.slots = {key: torch.full((self.n_layers,), math.nan, device=self.device) for key in LAYER_KEYS}
        self.slots["logits"] = torch.full((4,), math.nan, device=self.device)  # mean, std, max, z mean
        self.windows = {"loss": deque(maxlen=spike_window), "grad_norm": deque(maxlen=spike_window)}
        self.spikes = {"loss": 0, "grad_norm": 0}  # since the last point
        for i, attn in enumerate(model.attention_modules()):
            attn.probe = partial(self._attention, i)
        for i, block in enumerate(model.blocks):
            block.register_forward_hook(partial(self._residual, i))
        if hasattr(model, "norm") and hasattr(model, "lm_head"):  # the final hidden states, before the head
            model.norm.register_forward_hook(partial(self._logits, model.lm_head))
        optimizer.register_step_pre_hook(self._before_update)
        optimizer.register_step_post_hook(self._after_update)

    # -- inside a step: device tensors only -------------------------------------------------------------------
    def arm(self, step: int):
        """Before optimizer step `step` (1-based): record during it if it is a telemetry step."""
        self.armed = step % self.every == 0
        if self.armed:
            for slot in self.slots.values():
                slot.fill_(math.nan)
            self.current = {"step": step}
            self.points.append(self.current)

    @torch.no_grad()
    def _attention(self, layer, q, k, pattern, ctx, scale, score_mods):
        if self.armed:
            logits, visible = sampled_logits(q, k, pattern, ctx, scale, score_mods, self.rows, self.queries)
            max_logit, entropy = attention_stats(logits, visible)
            self.slots["attn_max_logit"][layer].copy_(max_logit.amax())
            self.slots["attn_entropy"][layer].copy_(entropy.mean())

    @torch.no_grad()
    def _residual(self, layer, module, args, output):
        if self.armed and isinstance(output, torch.Tensor):
            self.slots["resid_rms"][layer].copy_(output.detach().float().square().mean().sqrt())

    @torch.no_grad()
    def _logits(self, lm_head, module, args, hidden):
        if self.armed:
            B, T, _ = hidden.shape
            rows = torch.linspace(0, T - 1, min(T, self.queries), device=hidden.device).round().long()
            logits = lm_head(hidden[:self.rows, rows].detach()).float()  # (b, n, V)
            self.slots["logits"].copy_(torch.stack([logits.mean(), logits.std(), logits.amax(),
                                                    logits.logsumexp(dim=-1).mean()]))

    @torch.no_grad()
    def _before_update(self, optimizer, args, kwargs):
        if self.armed and "group_grad" not in self.current:  # after clipping: record() rescales to the norms before it
            self.current["group_grad"] = torch.stack([_norm([p.grad for p in g["params"] if p.grad is not None],
                                                            self.device)
                                                      for g in optimizer.param_groups])
            self.before = [[_local(p).detach().clone() for p in g["params"]] for g in optimizer.param_groups]

    @torch.no_grad()
    def _after_update(self, optimizer, args, kwargs):
        if self.before is not None:
            ratios = []
            for group, before in zip(optimizer.param_groups, self.before):
                after = [_local(p).detach() for p in group["params"]]
                ratios.append(_norm(torch._foreach_sub(after, before), self.device) /
                              _norm(after, self.device).clamp_min(1e-12))
            self.current["group_update"], self.before = torch.stack(ratios), None

    def record(self, step: int, loss, grad_norm):
        """After optimizer step `step`: its loss and gradient norm (before clipping), for the spike counts."""
        self.steps.append((step, torch.stack([loss.detach().float(), grad_norm.detach().float()])))
        if self.armed:
            self.current.update({key: slot.clone() for key, slot in self.slots.items()})  # device copies, no sync
            self.current.update(loss=loss.detach(), grad_norm=grad_norm.detach())
            if "group_grad" in self.current:  # clipping scaled every group alike: undo it
                clipped = self.current["group_grad"]
                self.current["group_grad"] = clipped * (grad_norm / clipped.norm().clamp_min(1e-12))
        self.armed = False

    # -- at a log step: one transfer --------------------------------------------------------------------------
    def read_into(self, curves: dict, results, logger) -> float:
        """The points recorded since the last read, appended to curves["telemetry"] and written to results.json
        (before the Trainer reads its losses: a run that diverged keeps its telemetry), and sent to W&B.
        Returns the seconds spent waiting for the device (the steps still running: training time)."""
        started = time.perf_counter()
        points = self.read()
        waited = time.perf_counter() - started
        if not points:
            return waited
        curves.setdefault("telemetry", []).extend(points)
        results.update(curves=curves)
        if logger:
            for point in points:
                logger.log(wandb_fields(point), point["step"])
        return waited

    def read(self) -> list[dict]:
        steps = [step for step, _ in self.steps]
        host = _to_host([values for _, values in self.steps] + [self.points])
        series, points = host[:-1], host[-1]
        self.steps, self.points = [], []
        by_step = {p["step"]: p for p in points}
        for step, (loss, grad_norm) in zip(steps, series):
            for name, value in (("loss", loss), ("grad_norm", grad_norm)):
                self.spikes[name] += self._spike(name, value)
            if step in by_step:
                by_step[step].update(loss_spike=self.spikes["loss"], grad_norm_spike=self.spikes["grad_norm"])
                self.spikes = {"loss": 0, "grad_norm": 0}
        return [self._json_point(p) for p in points]

    def state_dict(self) -> dict:
        """The spike windows and the counts since the last point, for a checkpoint (after read(): every
        recorded step is in them), so that a resumed run counts spikes as the uninterrupted one does."""
        return {"windows": {name: list(w) for name, w in self.windows.items()}, "spikes": dict(self.spikes)}

    def load_state_dict(self, state: dict | None):
        """A checkpoint's state_dict(); None (saved without telemetry) starts empty windows."""
        if state is None:
            return
        for name, values in state["windows"].items():
            self.windows[name].clear()
            self.windows[name].extend(values)  # a deque keeps its maxlen: a smaller spike_window keeps the newest
        self.spikes = dict(state["spikes"])

    def _spike(self, name: str, value: float) -> bool:
        """More than sigma standard deviations above the window's mean (once it holds 10 steps), or not finite."""
        if value is None:  # non-finite, read as None
            return True
        window, spike = self.windows[name], False
        if len(window) >= 10:
            mean = sum(window) / len(window)
            std = math.sqrt(sum((x - mean) ** 2 for x in window) / (len(window) - 1))
            spike = value > mean + self.sigma * std
        window.append(value)
        return spike

    def _json_point(self, p: dict) -> dict:
        logits = p.pop("logits", None) or [None] * 4
        point = {**p, **dict(zip(("logits_mean", "logits_std", "logits_max", "z_mean"), logits))}
        for key, name in (("group_grad", "grad_norm_by_group"), ("group_update", "update_ratio_by_group")):
            values = point.pop(key, None)
            if values is not None:
                point[name] = dict(zip(self.groups, values))
        return point


def attention_stats(logits, visible):
    """Per query: the maximum logit over its visible keys and the entropy of its attention distribution, in nats
    (within [0, log(visible keys)]). logits (..., Tkv), visible broadcastable to it -> two (...) tensors."""
    masked = logits.masked_fill(~visible, float("-inf"))
    return masked.amax(dim=-1), torch.special.entr(masked.softmax(dim=-1)).sum(dim=-1)


def wandb_fields(point: dict) -> dict:
    """One telemetry point as W&B keys grouped per layer: telemetry/layer_0/attn_max_logit, telemetry/z_mean, ..."""
    fields = {}
    for key, value in point.items():
        if key == "step":
            continue
        if isinstance(value, list):
            fields.update({f"telemetry/layer_{i}/{key}": v for i, v in enumerate(value) if v is not None})
        elif isinstance(value, dict):
            fields.update({f"telemetry/group_{g}/{key.removesuffix('_by_group')}": v for g, v in value.items()})
        elif value is not None:
            fields[f"telemetry/{key}"] = value
    return fields


def _local(tensor):
    """A DTensor's local shard (FSDP2), else the tensor."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _norm(tensors, device):
    """The L2 norm of a list of tensors taken together, in float32 (0 for none)."""
    if not tensors:
        return torch.zeros((), device=device)
    return torch.linalg.vector_norm(torch.stack([n.float() for n in torch._foreach_norm([_local(t) for t in tensors])]))


def _to_host(tree):
    """`tree` (lists, dicts, device tensors, numbers, None) with every tensor read in one transfer; each
    tensor becomes a float (a 1-element tensor) or a list of floats, non-finite values None (JSON has none)."""
    tensors = []

    def collect(node):
        if isinstance(node, torch.Tensor):
            tensors.append(node.detach().float().flatten())
        elif isinstance(node, dict):
            for value in node.values():
                collect(value)
        elif isinstance(node, list):
            for value in node:
                collect(value)
    collect(tree)
    flat = torch.cat(tensors).tolist() if tensors else []
    sizes, position = [t.numel() for t in tensors], [0, 0]  # (tensor index, offset into flat)

    def rebuild(node):
        if isinstance(node, torch.Tensor):
            size = sizes[position[0]]
            values = [v if math.isfinite(v) else None for v in flat[position[1]:position[1] + size]]
            position[0] += 1
            position[1] += size
            return values[0] if node.dim() == 0 else values
        if isinstance(node, dict):
            return {key: rebuild(value) for key, value in node.items()}
        if isinstance(node, list):
            return [rebuild(value) for value in node]
        return node
    return rebuild(tree)
