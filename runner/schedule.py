"""The learning-rate schedule (train.schedule), as a multiplier of train.lr for torch's LambdaLR.

cosine (the default): linear warm-up, then cosine decay to train.min_lr_ratio at the end of the budget.
wsd (warmup-stable-decay; Hägele et al. 2024, "Scaling Laws and Compute-Optimal Training Beyond Fixed Training
Durations"): linear warm-up, a constant lr, then a decay to train.min_lr_ratio over the last
train.decay_fraction of the steps, linear or 1-sqrt (train.decay_shape; 1-sqrt is the paper's best). The
stable phase does not depend on where the run ends, which is what lets cooldown branches (runner/cooldown.py)
give the loss at several budgets from one run.
"""
import math

from omegaconf import DictConfig

SCHEDULES = ("cosine", "wsd")
DECAY_SHAPES = ("linear", "1-sqrt")


def lr_lambda(warmup: int, max_steps: int | None, min_ratio: float, fraction_spent=None):
    """Linear warm-up then cosine decay to min_ratio (as a multiplier of train.lr). The decay follows the
    steps, or with fraction_spent (a callable: the share of a train.max_seconds budget spent) the clock."""
    def schedule(step):
        if step < warmup:
            return (step + 1) / warmup
        if fraction_spent is not None:
            progress = min(1.0, fraction_spent())
        else:
            progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return schedule


def decay_factor(progress: float, min_ratio: float, shape: str) -> float:
    """The lr multiplier a share `progress` (0..1) into a decay from 1 to min_ratio."""
    progress = min(1.0, max(0.0, progress))
    drop = progress if shape == "linear" else 1 - math.sqrt(1 - progress)  # 1-sqrt: stays high longer
    return 1 - (1 - min_ratio) * drop


def wsd_lambda(warmup: int, decay_start: int, decay_steps: int, min_ratio: float, shape: str):
    """Warm-up, constant, then decay over steps decay_start .. decay_start + decay_steps - 1 (the last one at
    min_ratio). A cooldown branch is this schedule with its own decay_start."""
    def schedule(step):
        if step < warmup:
            return (step + 1) / warmup
        if step < decay_start:
            return 1.0
        return decay_factor((step - decay_start + 1) / max(1, decay_steps), min_ratio, shape)
    return schedule


def decay_steps(steps: int, fraction: float) -> int:
    """The steps of a decay that takes `fraction` of a run of `steps` (at least one)."""
    return max(1, round(steps * fraction))


def build_schedule(t: DictConfig, max_steps: int | None, fraction_spent=None):
    """The lr multiplier for train.schedule over a run of max_steps (None: train.max_seconds, cosine only)."""
    if t.get("schedule", "cosine") == "cosine":
        return lr_lambda(t.warmup_steps, max_steps, t.min_lr_ratio, fraction_spent)
    decay = decay_steps(max_steps, t.decay_fraction)
    return wsd_lambda(t.warmup_steps, max_steps - decay, decay, t.min_lr_ratio, t.decay_shape)


def check_schedule_config(t: DictConfig, budget_key: str) -> None:
    """train.schedule and its keys, one-line errors naming the key (before any data is read)."""
    schedule = t.get("schedule", "cosine")
    if schedule not in SCHEDULES:
        raise ValueError(f"train.schedule={schedule!r}: choose one of {', '.join(SCHEDULES)}")
    if schedule == "wsd":
        if budget_key == "max_seconds":
            raise ValueError("train.schedule=wsd needs a budget known in advance (train.max_steps, max_tokens or "
                             "max_flops), not train.max_seconds")
        if not 0 < t.decay_fraction <= 1:
            raise ValueError(f"train.decay_fraction={t.decay_fraction} must be in (0, 1]")
        if t.decay_shape not in DECAY_SHAPES:
            raise ValueError(f"train.decay_shape={t.decay_shape!r}: choose one of {', '.join(DECAY_SHAPES)}")
