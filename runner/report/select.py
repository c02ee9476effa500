"""Like with like: which runs a comparison may average, and each variant at its own best learning rate.

A report lists every run it finds, but compares only runs that answer the same question: one task
(training, unless compare.tasks says otherwise), one sweep (the latest, unless compare.sweep names one or
says `all`) and one budget (steps or tokens or FLOPs or seconds, sequence length and data). Every other run
is kept with the reason it was left out.
"""
import statistics
from collections import Counter, defaultdict

from runner.report.format import FINISHED
from runner.tracking import FAMILIES

NO_SWEEP = "single runs"  # the group of runs started without -m


def select_comparable(runs: list[dict], tasks=("train",), sweep: str | None = None) -> tuple[list[dict], dict]:
    """(the runs compared, what was chosen). Sets r["left_out"] to the reason on every other run (None on
    the compared ones): another task, another sweep, another budget."""
    tasks = tuple(tasks)
    eligible = [r for r in runs if r["task"] in tasks]
    groups = {r["group"] or NO_SWEEP for r in eligible}
    if sweep in (None, "latest"):
        swept = [r for r in eligible if r["group"]]  # a sweep beats loose runs; the latest by start time
        pool = swept or eligible
        chosen_group = max(pool, key=lambda r: (r["started_at"] or "", r["group"] or ""))["group"] if pool else None
        chosen_group = chosen_group or NO_SWEEP
    elif sweep == "all":
        chosen_group = None
    else:
        if sweep not in groups:
            raise ValueError(f"compare.sweep={sweep!r} is not among the sweeps found: {sorted(groups)}")
        chosen_group = sweep
    in_group = [r for r in eligible if chosen_group is None or (r["group"] or NO_SWEEP) == chosen_group]
    budgets = Counter(r["budget"] for r in in_group if r["status"] == FINISHED)
    budget = budgets.most_common(1)[0][0] if budgets else None
    for r in runs:
        if r["task"] not in tasks:
            r["left_out"] = f"task={r['task']} (compare.tasks={list(tasks)})"
        elif chosen_group is not None and (r["group"] or NO_SWEEP) != chosen_group:
            r["left_out"] = f"another sweep ({r['group'] or NO_SWEEP})"
        elif r["status"] == FINISHED and r["budget"] != budget:
            r["left_out"] = f"another budget ({r['budget']})"
        else:
            r["left_out"] = None
    compared = [r for r in runs if r["left_out"] is None]
    return compared, {"tasks": list(tasks), "sweep": chosen_group or "all", "budget": budget,
                      "sweeps_found": sorted(groups), "other_budgets": sorted(b for b in budgets if b != budget)}


def variant_key(r: dict) -> tuple:
    """A variant is everything in FAMILIES: seed and learning rate are how it was trained, not what it is."""
    return tuple(r["variant"].get(f) for f in FAMILIES)


def best_learning_rates(runs: list[dict]) -> list[dict]:
    """Per variant (finished runs with a validation loss): the lr grid, the validation loss at each lr
    averaged over seeds, the best lr, and whether it lies at the edge of a grid of two or more."""
    losses = defaultdict(lambda: defaultdict(list))
    labels = {}
    for r in runs:
        if r["status"] == FINISHED and r["val_loss"] is not None:
            losses[variant_key(r)][r["lr"]].append(r["val_loss"])
            labels[variant_key(r)] = r["variant_label"]
    out = []
    for key, by_lr in losses.items():
        grid = sorted(by_lr, key=lambda lr: (lr is None, lr or 0))
        mean = {lr: statistics.fmean(v) for lr, v in by_lr.items()}
        best = min(grid, key=lambda lr: mean[lr])
        out.append({"key": key, "variant_label": labels[key], "grid": grid,
                    "val_loss": [mean[lr] for lr in grid], "seeds": [len(by_lr[lr]) for lr in grid],
                    "best_lr": best, "at_edge": len(grid) > 1 and best in (grid[0], grid[-1])})
    return out


def at_best_lr(runs: list[dict], tuning: list[dict]) -> list[dict]:
    """The runs each variant has at its own best learning rate (unfinished runs are dropped)."""
    best = {t["key"]: t["best_lr"] for t in tuning}
    return [r for r in runs if r["status"] == FINISHED and best.get(variant_key(r), object()) == r["lr"]]
