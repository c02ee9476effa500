"""Paired verdicts: does a choice change validation loss, against a reference choice, at this budget?

For a family (ffn, attention, ...) and a choice c, each run with c is paired with the run that has the
reference choice r and everything else equal (the other families' choices and the seed; each variant at its
own best learning rate when the sweep tuned one). Per seed, the paired differences val_loss(c) - val_loss(r)
are averaged (over the other families' choices); over the k seeds,

    mean ± t(0.975, k-1) · sd / sqrt(k)

is the 95% interval of the difference. Its sign gives the verdict: below zero, c is better; above, worse;
across zero, not distinguishable at this budget. Pairing removes what a seed does to both runs (the data
order, the initial weights), which unpaired intervals count twice.
"""
import math
import statistics
from collections import defaultdict

from runner.report.stats import t_quantile

BETTER, WORSE, UNRESOLVED = "better", "worse", "not distinguishable at this budget"
MAX_SEEDS = 100_000


def seeds_to_resolve(mean: float, sd: float, level: float = 0.95) -> int | None:
    """The smallest n >= 2 with t(level, n-1) · sd / sqrt(n) < |mean|: how many seeds would exclude zero
    if the difference and its spread stayed as measured. None when the mean is zero (no n does) or the
    answer exceeds MAX_SEEDS."""
    if mean == 0 or not math.isfinite(mean):
        return None
    if sd == 0:
        return 2
    if (1.959963984540054 * sd / mean) ** 2 > MAX_SEEDS:  # t > z: the answer is at least the normal one
        return None
    n = 2
    while t_quantile(level, n - 1) * sd / math.sqrt(n) >= abs(mean):  # the half-width falls monotonically
        n = n * 2 if n < 64 else n + max(1, n // 8)
        if n > MAX_SEEDS:
            return None
    lo = max(2, n // 2)
    while lo < n:  # the smallest such n between the last failure and the first success
        mid = (lo + n) // 2
        if t_quantile(level, mid - 1) * sd / math.sqrt(mid) < abs(mean):
            n = mid
        else:
            lo = mid + 1
    return n


def paired_difference(diffs: list[float], level: float = 0.95) -> dict:
    """The mean of paired differences, its t-interval and the verdict (lower loss is better)."""
    k = len(diffs)
    mean = statistics.fmean(diffs)
    out = {"n": k, "mean": mean, "sd": None, "half": None, "lo": None, "hi": None, "seeds_needed": None}
    if k < 2:
        out["verdict"] = "one seed: no interval"
        return out
    sd = statistics.stdev(diffs)
    half = t_quantile(level, k - 1) * sd / math.sqrt(k)
    out.update(sd=sd, half=half, lo=mean - half, hi=mean + half)
    if out["hi"] < 0:
        out["verdict"] = BETTER
    elif out["lo"] > 0:
        out["verdict"] = WORSE
    else:
        out["verdict"] = UNRESOLVED
        out["seeds_needed"] = seeds_to_resolve(mean, sd, level)
    return out


def reference_choice(runs: list[dict], family: str, choices, reference: dict | None = None):
    """compare.reference.<family> when given, else the choice of the earliest run (the sweep's first choice,
    which for an experiment's sweep is the first value listed, e.g. relu in relu,gelu,swiglu,geglu)."""
    wanted = (reference or {}).get(family)
    if wanted is not None:
        match = [c for c in choices if str(c) == str(wanted)]
        if not match:
            raise ValueError(f"compare.reference.{family}={wanted!r} is not among the choices "
                             f"{[str(c) for c in choices]}")
        return match[0]
    first = min(runs, key=lambda r: (r["started_at"] or "", r["id"]))
    return first["variant"].get(family)


def paired_verdicts(runs: list[dict], effects: list[dict], reference: dict | None = None) -> list[dict]:
    """One verdict per (family, choice other than the reference), for the families `effects` found.
    `runs`: finished runs, each variant at its best learning rate (runner.report.select.at_best_lr)."""
    out = []
    varying = [fam["family"] for fam in effects]
    for fam in effects:
        family = fam["family"]
        choices = [c["choice"] for c in fam["choices"]]
        ref = reference_choice(runs, family, choices, reference)
        # pair on the other families, except those the family itself decides (attention=mha decides n_kv_heads)
        aliases = set(fam["same_as"]) | {g for g in varying if g != family and _decided_by(runs, family, g)}
        others = [g for g in varying if g != family and g not in aliases]
        by_key = defaultdict(dict)  # (other choices, seed) -> choice -> [val_loss]
        for r in runs:
            key = (tuple(r["variant"].get(g) for g in others), r["seed"])
            by_key[key].setdefault(r["variant"].get(family), []).append(r["val_loss"])
        for choice in choices:
            if choice == ref:
                continue
            per_seed = defaultdict(list)
            for (_, seed), losses in by_key.items():
                if choice in losses and ref in losses:
                    per_seed[seed].append(statistics.fmean(losses[choice]) - statistics.fmean(losses[ref]))
            if not per_seed:
                continue
            diff = paired_difference([statistics.fmean(v) for v in per_seed.values()])
            out.append({"family": family, "choice": choice, "reference": ref, **diff})
    return out


def _decided_by(runs, family, other) -> bool:
    """Whether each choice of `family` comes with a single value of `other` (sliding decides its window)."""
    seen = defaultdict(set)
    for r in runs:
        seen[r["variant"].get(family)].add(r["variant"].get(other))
    return all(len(v) == 1 for v in seen.values())


def _named(family: str, value) -> str:
    """A choice as a verdict names it: a part's name as it is (swiglu), a flag or number with its field
    (qk_norm=True, n_kv_heads=2), which alone would not say what was varied."""
    return value if isinstance(value, str) else f"{family}={value}"


def verdict_line(v: dict) -> str:
    """"swiglu vs relu: -0.060 ± 0.020 val loss, better" (the headline's sentence)."""
    diff = f"{v['mean']:+.3f}" + (f" ± {v['half']:.3f}" if v["half"] is not None else "")
    choice, reference = _named(v["family"], v["choice"]), _named(v["family"], v["reference"])
    line = f"{choice} vs {reference}: {diff} val loss, {v['verdict']}"
    if v["verdict"] == UNRESOLVED:
        need = v["seeds_needed"]
        line += (f" (about {need} seeds would resolve {v['mean']:+.3f} at this spread)" if need
                 else " (no number of seeds would resolve a zero difference)" if v["mean"] == 0
                 else f" (more than {MAX_SEEDS} seeds would be needed)")
    return line + f" [{v['n']} seed{'s' if v['n'] != 1 else ''}]"
