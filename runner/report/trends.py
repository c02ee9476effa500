"""Trends: does an effect hold as compute grows? (task=compare, from budget ladders)

Points. Each run gives its loss at one or more training budgets: the cooldown branches of a wsd run
(train.cooldowns, runner/cooldown.py: metrics.cooldowns) and its own final loss; runs at several budgets add
theirs. A point is (nominal budget, training FLOPs, validation loss).

Per variant: loss against compute, L(C) = E + A·(C/C0)^-α with C0 the smallest budget (a saturating power
law, fitted by least squares: linear in E and A for each α on a grid, the best α refined on a finer grid)
where the points support it: four or more budgets, A > 0, E >= 0 and α inside the grid's range; otherwise a
straight line in log C, L = a + b·log10(C), and the fit says which. Intervals: percentile bootstrap over
seeds (resample the seeds, average their points per budget, refit).

Per family: the gap to the reference, paired by seed and budget, against log10(C). Its slope per decade of
compute has a t-interval over the seeds' own slopes (as the verdicts pair by seed). The verdict:
  grows / shrinks   the slope's interval excludes zero, with the gap's sign (grows) or against it (shrinks);
  holds             the interval holds zero and is narrow: over the measured span the gap cannot have moved
                    by more than half of itself;
  cannot tell       otherwise.
Where the gap shrinks, the compute at which the line would cross zero, with a bootstrap interval over seeds;
past the largest budget it is an extrapolation, and it is refused beyond EXTRAPOLATION_LIMIT x that budget.

Many comparisons: Holm's step-down adjustment of the per-comparison p-values (paired t-tests), with the
number of comparisons made. Learning-rate sensitivity (Wortsman et al. 2023): with an lr grid, each variant's
mean excess loss over its best lr.
"""
import math
import statistics
from collections import defaultdict

import numpy as np

from runner.report.stats import t_quantile

EXTRAPOLATION_LIMIT = 10.0  # a crossover is extrapolated at most this factor past the largest measured budget
ALPHA_GRID = np.geomspace(0.01, 3.0, 300)  # α outside it: the points do not pin a power law
MIN_POWER_LAW_BUDGETS = 4  # three parameters and at least one degree of freedom
GROWS, HOLDS, SHRINKS, CANNOT_TELL = "grows", "holds", "shrinks", "cannot tell"


# -- points ---------------------------------------------------------------------------------------------------
def ladder_points(data: dict) -> list[dict]:
    """A results.json's (budget, flops, val_loss) points: its cooldowns, then its own final loss."""
    metrics = data.get("metrics") or {}
    points = [{"budget": p["budget"], "flops": p["flops"], "val_loss": p["val_loss"]}
              for p in metrics.get("cooldowns") or [] if p.get("val_loss") is not None]
    train = (data.get("config") or {}).get("train") or {}
    budget = next((train[k] for k in ("max_flops", "max_tokens", "max_steps") if train.get(k) is not None), None)
    if data.get("status") == "ok" and metrics.get("val_loss") is not None and metrics.get("train_flops"):
        points.append({"budget": budget if budget is not None else metrics["train_flops"],
                       "flops": metrics["train_flops"], "val_loss": metrics["val_loss"]})
    return points


# -- fits -----------------------------------------------------------------------------------------------------
def _power_law_sse(x: np.ndarray, y: np.ndarray, alphas: np.ndarray):
    """For each α: least-squares E, A of y = E + A·x^-α and the residual sum of squares (vectorized)."""
    z = x[None, :] ** -alphas[:, None]  # (G, n)
    zm, ym = z.mean(1, keepdims=True), y.mean()
    szz = ((z - zm) ** 2).sum(1)
    a = ((z - zm) * (y - ym)).sum(1) / np.where(szz > 0, szz, np.inf)
    e = ym - a * zm[:, 0]
    sse = ((y[None, :] - e[:, None] - a[:, None] * z) ** 2).sum(1)
    return e, a, sse


def fit_power_law(x, y) -> dict | None:
    """E, A, α of y = E + A·x^-α (x: compute over C0), or None where the points do not support it."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(np.unique(x)) < MIN_POWER_LAW_BUDGETS:
        return None
    e, a, sse = _power_law_sse(x, y, ALPHA_GRID)
    i = int(np.argmin(sse))
    if i in (0, len(ALPHA_GRID) - 1):  # at the edge of the range: no interior optimum
        return None
    fine = np.geomspace(ALPHA_GRID[i - 1], ALPHA_GRID[i + 1], 101)
    e, a, sse = _power_law_sse(x, y, fine)
    j = int(np.argmin(sse))
    if not (a[j] > 0 and e[j] >= 0):
        return None
    return {"E": float(e[j]), "A": float(a[j]), "alpha": float(fine[j])}


def fit_log_line(logc, y) -> dict:
    """a, b of y = a + b·log10(C) (b: the change per decade of compute)."""
    b, a = np.polyfit(np.asarray(logc, float), np.asarray(y, float), 1)
    return {"a": float(a), "b": float(b)}


def fit_curve(flops, losses, c0: float) -> dict:
    """The power law where the points support it, else the line in log C; "kind" says which."""
    law = fit_power_law(np.asarray(flops) / c0, losses)
    if law is not None:
        return {"kind": "power law", "c0": c0, **law}
    return {"kind": "log-linear", "c0": c0, **fit_log_line(np.log10(flops), losses)}


def predict(fit: dict, flops) -> np.ndarray:
    flops = np.asarray(flops, float)
    if fit["kind"] == "power law":
        return fit["E"] + fit["A"] * (flops / fit["c0"]) ** -fit["alpha"]
    return fit["a"] + fit["b"] * np.log10(flops)


def bootstrap_fit(per_seed: dict, level=0.95, draws=200, rng=None) -> dict:
    """per_seed: seed -> {budget: (flops, loss)}. The fit of the seed-averaged points, and percentile
    intervals of its parameters from refits on seeds resampled with replacement (the same kind of fit)."""
    rng = rng or np.random.default_rng(0)
    seeds = sorted(per_seed)
    budgets = sorted(set.intersection(*(set(p) for p in per_seed.values())))
    cube = np.array([[[per_seed[s][b][0], per_seed[s][b][1]] for b in budgets] for s in seeds])  # (S, B, 2)
    flops, loss = cube[:, :, 0].mean(0), cube[:, :, 1].mean(0)
    fit = fit_curve(flops, loss, flops.min())
    fit.update(budgets=len(budgets), seeds=len(seeds), flops=flops.tolist(), loss=loss.tolist())
    keys = ("E", "A", "alpha") if fit["kind"] == "power law" else ("a", "b")
    if len(seeds) < 2:
        return fit
    samples = defaultdict(list)
    for _ in range(draws):
        pick = cube[rng.integers(0, len(seeds), len(seeds))]
        y = pick[:, :, 1].mean(0)
        again = (fit_power_law(flops / fit["c0"], y) if fit["kind"] == "power law"
                 else fit_log_line(np.log10(flops), y))
        if again is not None:
            for k in keys:
                samples[k].append(again[k])
    q = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]
    fit["intervals"] = {k: [float(v) for v in np.percentile(samples[k], q)] for k in keys if samples[k]}
    fit["failed_draws"] = draws - len(samples[keys[0]])  # resamples where the power law no longer held
    return fit


# -- gaps -----------------------------------------------------------------------------------------------------
def slope_interval(per_seed_points: dict, level=0.95) -> dict | None:
    """per_seed_points: seed -> [(log10 C, gap)]. The mean of the seeds' own least-squares slopes and its
    t-interval (None with fewer than two budgets)."""
    slopes = [fit_log_line(*zip(*pts))["b"] for pts in per_seed_points.values() if len({c for c, _ in pts}) >= 2]
    if not slopes:
        return None
    mean = statistics.fmean(slopes)
    if len(slopes) < 2:
        return {"slope": mean, "lo": None, "hi": None, "seeds": 1, "p": None}
    sd = statistics.stdev(slopes)
    half = t_quantile(level, len(slopes) - 1) * sd / math.sqrt(len(slopes))
    return {"slope": mean, "lo": mean - half, "hi": mean + half, "seeds": len(slopes),
            "p": t_pvalue(mean / (sd / math.sqrt(len(slopes))) if sd > 0 else math.inf, len(slopes) - 1)}


def trend_verdict(gap_at_largest: float, slope: dict | None, decades: float) -> str:
    """grows / holds / shrinks / cannot tell (see the module's docstring)."""
    if slope is None or slope["lo"] is None:
        return CANNOT_TELL
    if slope["lo"] > 0 or slope["hi"] < 0:
        return GROWS if (slope["slope"] > 0) == (gap_at_largest > 0) else SHRINKS
    if max(abs(slope["lo"]), abs(slope["hi"])) * decades <= 0.5 * abs(gap_at_largest):
        return HOLDS
    return CANNOT_TELL


def crossover(per_seed_points: dict, largest_flops: float, level=0.95, draws=400, rng=None) -> dict | None:
    """Where the seed-averaged gap line a + b·log10(C) crosses zero, with a percentile bootstrap interval
    over seeds. None when the line does not head for zero; "refused" past EXTRAPOLATION_LIMIT x the
    largest budget."""
    rng = rng or np.random.default_rng(0)
    seeds = sorted(per_seed_points)

    def zero(chosen):
        pooled = defaultdict(list)
        for s in chosen:
            for c, g in per_seed_points[s]:
                pooled[c].append(g)
        cs = sorted(pooled)
        if len(cs) < 2:
            return None
        line = fit_log_line(cs, [statistics.fmean(pooled[c]) for c in cs])
        gap_end = line["a"] + line["b"] * max(cs)
        if line["b"] == 0 or (line["b"] > 0) == (gap_end > 0):  # moving away from zero
            return None
        return -line["a"] / line["b"]

    at = zero(seeds)
    if at is None:
        return None
    limit = math.log10(largest_flops * EXTRAPOLATION_LIMIT)
    out = {"log10_flops": at, "flops": 10 ** at, "extrapolated": at > math.log10(largest_flops),
           "limit_flops": 10 ** limit, "refused": at > limit, "lo": None, "hi": None}
    boots = [z for z in (zero(rng.choice(seeds, len(seeds))) for _ in range(draws)) if z is not None]
    if len(seeds) >= 2 and boots:
        lo, hi = np.percentile(boots, [(1 - level) / 2 * 100, (1 + level) / 2 * 100])
        out.update(lo=float(10 ** lo), hi=float(10 ** hi), hi_beyond_limit=bool(hi > limit),
                   heads_away=1 - len(boots) / draws)  # share of resamples whose gap does not head for zero
    return out


# -- many comparisons, lr sensitivity -------------------------------------------------------------------------
def t_pvalue(t: float, df: int) -> float:
    """Two-sided p of a Student-t statistic (by bisection-free inversion: P(|T| >= |t|))."""
    if not math.isfinite(t):
        return 0.0
    lo_p, hi_p = 0.0, 1.0  # coverage(|t|) = 1 - p: find p with t_quantile(1 - p) = |t|
    for _ in range(60):
        mid = (lo_p + hi_p) / 2
        if t_quantile(1 - mid, df) > abs(t):
            lo_p = mid
        else:
            hi_p = mid
    return (lo_p + hi_p) / 2


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error), in the input's order."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    adjusted, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def lr_sensitivity(tuning: list[dict]) -> list[dict]:
    """Per variant with an lr grid of two or more: the mean excess of its seed-averaged loss over the
    grid's best (0 for a variant no lr choice affects)."""
    out = []
    for t in tuning:
        losses = [v for v in t["val_loss"] if v is not None]
        if len(losses) >= 2:
            best = min(losses)
            out.append({"variant_label": t["variant_label"], "best_lr": t["best_lr"], "best_loss": best,
                        "mean_excess": statistics.fmean(v - best for v in losses), "grid": len(losses)})
    return out


def holm_verdicts(verdicts: list[dict], level: float = 0.95) -> dict:
    """Adds to each paired verdict its p-value ("p"), Holm's adjusted one ("p_holm") and the verdict at the
    family-wise level ("verdict_holm"); returns {"comparisons": m}."""
    for v in verdicts:
        v["p"] = (t_pvalue(v["mean"] / (v["sd"] / math.sqrt(v["n"])) if v["sd"] else math.inf, v["n"] - 1)
                  if v.get("sd") is not None else None)
    tested = [v for v in verdicts if v["p"] is not None]
    for v, p in zip(tested, holm([v["p"] for v in tested])):
        v["p_holm"] = p
        v["verdict_holm"] = (("better" if v["mean"] < 0 else "worse") if p < 1 - level
                             else "not distinguishable after Holm")
    return {"comparisons": len(tested)}


# -- the report's section -------------------------------------------------------------------------------------
def variant_series(runs: list[dict]) -> dict:
    """variant label -> seed -> budget -> (flops, loss), averaged over runs that repeat a (seed, budget)."""
    acc = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for r in runs:
        for p in r.get("ladder") or []:
            acc[r["variant_label"]][r["seed"]][p["budget"]].append((p["flops"], p["val_loss"]))
    return {v: {s: {b: tuple(np.mean(pts, axis=0)) for b, pts in by_b.items()} for s, by_b in by_s.items()}
            for v, by_s in acc.items()}


def family_gaps(runs: list[dict], family: str, choice, ref, others: list[str]) -> dict:
    """seed -> [(log10 C, gap)] for choice vs ref, paired on (the other families' choices, seed, budget)."""
    by_key = defaultdict(dict)
    for r in runs:
        key = (tuple(r["variant"].get(g) for g in others), r["seed"])
        by_key[key].setdefault(r["variant"].get(family), []).append(r)
    pooled = defaultdict(lambda: defaultdict(list))  # seed -> budget -> [(flops, gap)]
    for (_, seed), by_choice in by_key.items():
        if choice not in by_choice or ref not in by_choice:
            continue
        mine, theirs = (_points_by_budget(by_choice[c]) for c in (choice, ref))
        for b in set(mine) & set(theirs):
            pooled[seed][b].append(((mine[b][0] + theirs[b][0]) / 2, mine[b][1] - theirs[b][1]))
    return {s: [(math.log10(np.mean([f for f, _ in v])), float(np.mean([g for _, g in v]))) for v in by_b.values()]
            for s, by_b in pooled.items()}


def _points_by_budget(runs) -> dict:
    acc = defaultdict(list)
    for r in runs:
        for p in r.get("ladder") or []:
            acc[p["budget"]].append((p["flops"], p["val_loss"]))
    return {b: tuple(np.mean(v, axis=0)) for b, v in acc.items()}


def build_trends(runs: list[dict], effects: list[dict], reference=None) -> dict:
    """The report's trends: fits per variant, gap trends per family choice with Holm-adjusted slopes.
    Empty when no variant has points at two or more budgets."""
    from runner.report.verdicts import paired_difference, reference_choice
    series = variant_series(runs)
    if not any(len(set.intersection(*(set(b) for b in s.values()))) >= 2 for s in series.values() if s):
        return {}
    fits = {v: bootstrap_fit(s) for v, s in series.items() if len(set.intersection(*(set(b) for b in s.values()))) >= 2}
    varying = [f["family"] for f in effects]
    gaps = []
    for fam in effects:
        family, choices = fam["family"], [c["choice"] for c in fam["choices"]]
        ref = reference_choice(runs, family, choices, reference)
        others = [g for g in varying if g != family and g not in fam["same_as"]]
        for choice in choices:
            per_seed = family_gaps(runs, family, choice, ref, others) if choice != ref else {}
            logs = sorted({c for pts in per_seed.values() for c, _ in pts})
            if len(logs) < 2:
                continue
            at_largest = [g for pts in per_seed.values() for c, g in pts if c == max(c2 for c2, _ in pts)]
            gap = paired_difference(at_largest)
            at_smallest = [g for pts in per_seed.values() for c, g in pts if c == min(c2 for c2, _ in pts)]
            slope = slope_interval(per_seed)
            decades = logs[-1] - logs[0]
            verdict = trend_verdict(gap["mean"], slope, decades)
            row = {"family": family, "choice": choice, "reference": ref, "largest_flops": 10 ** logs[-1],
                   "smallest_flops": 10 ** logs[0], "budgets": len(logs), "gap": gap, "slope": slope,
                   "trend": verdict, "crossover": None, "gap_at_smallest": statistics.fmean(at_smallest),
                   "points": {str(s): pts for s, pts in per_seed.items()}}
            if verdict == SHRINKS:
                row["crossover"] = crossover(per_seed, 10 ** logs[-1])
            gaps.append(row)
    tested = [g for g in gaps if g["slope"] and g["slope"].get("p") is not None]
    for g, p in zip(tested, holm([g["slope"]["p"] for g in tested])):
        g["slope"]["p_holm"] = p
    return {"fits": fits, "gaps": gaps, "comparisons": len(tested)}


def trend_line(g: dict) -> str:
    """"swiglu vs relu: at the largest budget (2e+12 FLOPs) +0.015 ± 0.051, not distinguishable; as compute
    grows the gap shrinks (-0.05 per decade, 95% [-0.08, -0.02]); it would cross zero near 3e+13 FLOPs ...\""""
    gap, s = g["gap"], g["slope"]
    half = f" ± {gap['half']:.3f}" if gap.get("half") is not None else ""
    line = (f"{g['choice']} vs {g['reference']}: at the largest budget ({g['largest_flops']:.2g} FLOPs) "
            f"{gap['mean']:+.3f}{half} val loss, {gap['verdict']}; as compute grows ")
    if s is None or s["lo"] is None:
        return line + f"cannot tell (one seed: no interval) [{g['budgets']} budgets]"
    said = "cannot tell whether the gap grows, holds or shrinks" if g["trend"] == CANNOT_TELL else f"the gap {g['trend']}"
    line += (f"{said} (slope {s['slope']:+.3f} per decade of FLOPs, 95% [{s['lo']:+.3f}, {s['hi']:+.3f}]"
             + (f", Holm p {s['p_holm']:.2g}" if s.get("p_holm") is not None else "") + ")")
    if g.get("gap_at_smallest") is not None and g["gap_at_smallest"] * gap["mean"] < 0:
        line += f"; the mean gap changed sign within the measured budgets (from {g['gap_at_smallest']:+.3f})"
    x = g.get("crossover")
    if x:
        if x["refused"]:
            line += (f"; a crossover lies beyond {EXTRAPOLATION_LIMIT:g}x the largest budget "
                     f"({x['limit_flops']:.2g} FLOPs): not extrapolated")
        else:
            ci = f" (95% {x['lo']:.2g} to {x['hi']:.2g}" + (", beyond the limit" if x.get("hi_beyond_limit") else "") + ")" \
                if x.get("lo") is not None else ""
            line += (f"; it would cross zero near {x['flops']:.2g} FLOPs{ci}"
                     + (", an extrapolation" if x["extrapolated"] else ""))
    return line + f" [{g['budgets']} budgets, {s['seeds']} seeds]"


def fit_line(label: str, fit: dict) -> str:
    """"relu: power law L = 3.1 + 1.2·(C/2e+11)^-0.45 (95%: E 2.9-3.3, α 0.3-0.6) from 4 budgets x 3 seeds\""""
    iv = fit.get("intervals", {})
    rng = lambda k, d=3: f" {k if k != 'alpha' else 'α'} {iv[k][0]:.{d}g} to {iv[k][1]:.{d}g}" if k in iv else ""
    if fit["kind"] == "power law":
        body = (f"power law L = {fit['E']:.3f} + {fit['A']:.3f}·(C/{fit['c0']:.2g})^-{fit['alpha']:.3f}"
                + (f" (95%:{rng('E')},{rng('A')},{rng('alpha')})" if iv else ""))
    else:
        body = (f"a line in log C: L = {fit['a']:.3f} {fit['b']:+.3f}·log10(C)"
                + (f" (95%:{rng('b')} per decade)" if iv else "")
                + " (too few budgets or no interior optimum for a power law)")
    coarse = " (under 5 seeds: the bootstrap has few distinct resamples and its intervals run narrow)" \
        if iv and fit["seeds"] < 5 else ""
    return f"{label}: {body} from {fit['budgets']} budgets x {fit['seeds']} seeds{coarse}"
