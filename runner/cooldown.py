"""Cooldown branches (train.cooldowns): the loss at several budgets from one warmup-stable-decay run.

Hägele et al. 2024 show that a short decay branched off the constant-lr phase matches a full run of that
length. At each budget B in train.cooldowns (in the run's own budget unit: steps, tokens or FLOPs) the run
branches at the step where a decay of train.cooldown_fraction x B's steps would begin, trains that decay, is
validated (over train.final_eval_batches, like the run's final loss) and is then put back exactly as it was:
weights, optimizer, lr schedule, data position and RNG. The main run goes on as if the branch never ran, so its
own loss is the same with and without cooldowns. Each point is recorded in curves["cooldown"] (checkpointed:
a resumed run keeps its points and does not redo them), in results.json metrics.cooldowns and in W&B.
"""
import copy
import logging
import time

from omegaconf import DictConfig

from runner import distributed
from runner.checkpoint import rng_state, set_rng_state
from runner.evaluate import evaluate
from runner.schedule import decay_steps, wsd_lambda

log = logging.getLogger(__name__)
UNITS = {"max_steps": "steps", "max_tokens": "tokens", "max_flops": "FLOPs"}


def check_cooldown_config(t: DictConfig, budget_key: str) -> None:
    """train.cooldowns against the run's budget, from the config alone (before any data is read)."""
    budgets = list(t.get("cooldowns") or [])
    if not budgets:
        return
    if t.get("schedule", "cosine") != "wsd":
        raise ValueError("train.cooldowns need train.schedule=wsd (a cooldown branches off a constant lr)")
    if budget_key not in UNITS:
        raise ValueError(f"train.cooldowns are budgets in the run's unit; train.{budget_key} has none that "
                         f"fixes a step in advance: use train.max_steps, max_tokens or max_flops")
    if not 0 < t.cooldown_fraction < 1:
        raise ValueError(f"train.cooldown_fraction={t.cooldown_fraction} must be in (0, 1)")
    total, unit = float(t.get(budget_key)), UNITS[budget_key]
    for b in budgets:
        where = f"train.cooldowns: {b!r} (in the run's unit, {unit}, as train.{budget_key}={t.get(budget_key):g})"
        if not isinstance(b, (int, float)) or isinstance(b, bool) or not b > 0:
            raise ValueError(f"{where} must be a positive number")
        if budget_key == "max_steps" and int(b) != b:
            raise ValueError(f"{where} must be a whole number of steps")
        if b >= total:
            raise ValueError(f"{where} is not below the run's budget")
        if b * (1 - t.cooldown_fraction) > total * (1 - t.decay_fraction):
            raise ValueError(f"{where} would branch after the run's own decay begins (train.decay_fraction="
                             f"{t.decay_fraction}); lower it or the fractions")
        if budget_key != "max_steps" and b < total * 1e-3:
            raise ValueError(f"{where} is below a thousandth of the run's budget: a budget in the wrong unit?")


class Cooldowns:
    """The planned branches (budget, its steps, the step it branches at) and the points recorded so far."""

    def __init__(self, t: DictConfig, budget_key: str, tokens_per_step: int, flops_per_token: float):
        self.t, self.tokens_per_step, self.flops_per_token = t, tokens_per_step, flops_per_token
        per_step = {"max_steps": 1, "max_tokens": tokens_per_step,
                    "max_flops": tokens_per_step * flops_per_token}.get(budget_key)
        self.plans = []
        for b in sorted(t.get("cooldowns") or []):
            steps = int(b // per_step)
            start = steps - decay_steps(steps, t.cooldown_fraction)
            if start < t.warmup_steps:
                raise ValueError(f"train.cooldowns: {b:g} buys {steps} steps of {per_step:.4g} {UNITS[budget_key]} "
                                 f"and would branch at step {start}, inside the warm-up (train.warmup_steps="
                                 f"{t.warmup_steps}): raise it (the cooldowns are in the run's unit, "
                                 f"{UNITS[budget_key]})")
            self.plans.append({"budget": b, "steps": steps, "start": start})

    def branch_if_due(self, trainer, stop, vote) -> None:
        """Between steps: run the branches that start at this step and are not recorded yet (a resumed run's
        points came back with its curves)."""
        if not self.plans:
            return
        points = trainer.curves.setdefault("cooldown", [])
        done = {p["budget"] for p in points}
        for plan in self.plans:
            if plan["start"] == trainer.step and plan["budget"] not in done:
                points.append(self.branch(trainer, plan, stop, vote))
                trainer.results.update(curves=trainer.curves)
                if trainer.logger:
                    trainer.logger.log({f"cooldown/{k}": v for k, v in points[-1].items()}, trainer.step)

    def branch(self, trainer, plan: dict, stop, vote) -> dict:
        """Train the decay from this step to the budget's, validate, then restore the run exactly."""
        t, started = self.t, time.perf_counter()
        saved = snapshot(trainer)
        factor = wsd_lambda(t.warmup_steps, plan["start"], plan["steps"] - plan["start"], t.min_lr_ratio,
                            t.decay_shape)
        groups = trainer.optimizer.param_groups
        base = [g["initial_lr"] for g in groups]
        for step in range(plan["start"], plan["steps"]):
            for g, lr in zip(groups, base):  # the step's own scheduler.step() resets it; the restore undoes that
                g["lr"] = lr * factor(step)
            trainer.optimizer_step(stop, vote)
        metrics = validation(trainer, t.final_eval_batches)
        restore(trainer, saved)
        tokens = plan["steps"] * self.tokens_per_step
        point = {"budget": plan["budget"], "steps": plan["steps"], "tokens": tokens,
                 "flops": tokens * self.flops_per_token, "val_loss": metrics["loss"],
                 "branched_at": plan["start"], "seconds": time.perf_counter() - started}
        if trainer.dist.is_main:
            log.info(f"cooldown to {plan['budget']:g} ({plan['steps']} steps, from step {plan['start']}): "
                     f"val loss {metrics['loss']:.4f}")
        return point

    def metrics(self, curves: dict) -> dict:
        """results.json metrics.cooldowns (only for a run that has them: other runs' records are unchanged)."""
        return {"cooldowns": list(curves.get("cooldown", []))} if self.plans else {}


def validation(trainer, max_batches) -> dict:
    """The validation loss as Trainer.validate measures it, without recording a curve point."""
    t, dist = trainer.t, trainer.dist
    if dist.enabled:
        return distributed.evaluate_sharded(distributed.unwrap(trainer.model), trainer.data.val, t.batch_size,
                                            max_batches, dist, trainer.autocast)
    return evaluate(trainer.model, trainer.data.val_batches(t.batch_size, max_batches), trainer.device,
                    trainer.autocast)


def snapshot(trainer) -> dict:
    """Everything a training step changes, copied in memory."""
    return {"model": {k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
            "optimizer": copy.deepcopy(trainer.optimizer.state_dict()),
            "scheduler": copy.deepcopy(trainer.scheduler.state_dict()),
            "loaders": [copy.deepcopy(loader.state_dict()) for loader in trainer.loaders],
            "rng": rng_state(), "window": dict(trainer.window), "pending_losses": list(trainer.pending_losses),
            "train_seconds": trainer.train_seconds}


def restore(trainer, saved: dict) -> None:
    trainer.model.load_state_dict(saved["model"])  # copies into the same parameters the optimizer holds
    trainer.optimizer.load_state_dict(saved["optimizer"])
    trainer.scheduler.load_state_dict(saved["scheduler"])
    for loader, state in zip(trainer.loaders, saved["loaders"]):
        loader.load_state_dict(state)
    set_rng_state(saved["rng"])
    trainer.window, trainer.pending_losses = saved["window"], saved["pending_losses"]
    trainer.train_seconds = saved["train_seconds"]
