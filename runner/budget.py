"""What a training run may spend: optimizer steps, tokens, analytic FLOPs or seconds (exactly one).

Equal compute across a sweep: with train.max_tokens or train.max_flops each variant gets as many steps as
its budget buys, so a model that is cheaper per token (MQA, a smaller FFN) takes more steps, and every run
spends the same tokens or FLOPs to within one step's worth (the step count is rounded down: a run never
spends more than it was given). Training FLOPs are analytic, model.flops_per_token(seq_len) x tokens (the
MFU formula: 6 x matmul parameters + attention's QK^T and AV), so the budget does not depend on the machine.

train.max_seconds gives each run the same wall time in optimizer steps (evaluation and checkpoints are not
counted). The number of steps is then unknown in advance, so the learning-rate schedule runs on the fraction
of the time spent instead of the fraction of steps; such a run is not reproducible step for step (a busy
machine takes fewer steps), which is why tokens and FLOPs are the budgets to compare variants on.
"""
import math

from omegaconf import DictConfig

BUDGETS = ("max_steps", "max_tokens", "max_flops", "max_seconds")


def check_budget(t: DictConfig) -> str:
    """The one budget key that is set; a clear error naming the keys otherwise."""
    given = [k for k in BUDGETS if t.get(k) is not None]
    if len(given) != 1:
        hint = (f"set the others to null, e.g. train.{given[-1]}=... train.max_steps=null" if given
                else "set one of them")
        raise ValueError(f"exactly one training budget, got {len(given)}: "
                         f"{', '.join(f'train.{k}={t.get(k)}' for k in given) or 'none'}; "
                         f"choose one of {', '.join('train.' + k for k in BUDGETS)} ({hint})")
    key = given[0]
    value = t.get(key)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
        raise ValueError(f"train.{key} must be a positive number, got {value!r}")
    if key == "max_steps" and int(value) != value:
        raise ValueError(f"train.max_steps must be a whole number of steps, got {value}")
    return key


def steps_for_budget(t: DictConfig, tokens_per_step: int, flops_per_token: float) -> int | None:
    """The optimizer steps the budget buys; None for train.max_seconds (the clock decides)."""
    key = check_budget(t)
    if key == "max_steps":
        return int(t.max_steps)
    if key == "max_seconds":
        return None
    per_step = tokens_per_step * (flops_per_token if key == "max_flops" else 1)
    steps = math.floor(float(t.get(key)) / per_step)
    if steps < 1:
        raise ValueError(f"train.{key}={t.get(key):.4g} buys less than one step ({per_step:.4g} per step of "
                         f"train.batch_size x data.seq_len tokens); raise it")
    return steps


def spent(steps: int, tokens_per_step: int, flops_per_token: float, seconds: float) -> dict:
    """results.json metrics: what the run actually spent."""
    tokens = steps * tokens_per_step
    return {"steps": steps, "train_tokens": tokens, "train_flops": tokens * flops_per_token, "train_seconds": seconds}
