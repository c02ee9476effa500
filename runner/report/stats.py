"""Statistics of a comparison: t-intervals across seeds, per-family effects, the Pareto front."""
import math
import statistics
from collections import defaultdict

from runner.report.format import FINISHED
from runner.tracking import FAMILIES


def t_quantile(p: float, df: int) -> float:
    """Two-sided Student-t quantile: the t with P(|T| < t) = p for integer df >= 1 (p=0.95 → 12.71 at df=1,
    1.96 as df → ∞). Exact: bisection on the closed-form CDF (Abramowitz & Stegun 26.7.3-4)."""
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}")

    def coverage(t):
        theta = math.atan(t / math.sqrt(df))
        c2 = math.cos(theta) ** 2
        if df % 2:  # odd: (2/π)(θ + sinθ (cosθ + 2/3 cos³θ + ...))
            term, total = math.cos(theta), 0.0
            for j in range(1, df - 1, 2):
                total += term
                term *= c2 * (j + 1) / (j + 2)
            return 2 / math.pi * (theta + math.sin(theta) * total)
        term, total = 1.0, 0.0  # even: sinθ (1 + 1/2 cos²θ + 3/8 cos⁴θ + ...)
        for j in range(0, df - 1, 2):
            total += term
            term *= c2 * (j + 1) / (j + 2)
        return math.sin(theta) * total

    lo, hi = 0.0, 1.0
    while coverage(hi) < p:
        hi *= 2
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if coverage(mid) < p else (lo, mid)
    return (lo + hi) / 2


def mean_interval(values: list[float], level: float = 0.95):
    """(mean, lower, upper); the bounds are None with fewer than two values."""
    m = statistics.fmean(values)
    if len(values) < 2:
        return m, None, None
    half = t_quantile(level, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return m, m - half, m + half


# Quantities that are positive by nature (throughput, memory, ratios of them): their means and intervals are
# taken on the log scale and brought back by exp, so an interval never crosses zero (issue 26: an effect on
# tokens/s read `231 [-302, 765]`). Losses stay on their own scale: differences of losses may be negative.
LOG_SCALE = frozenset({"train_tokens_per_s", "decode_tokens_per_s", "peak_memory_bytes", "kv_cache_bytes_per_token"})


def log_mean_interval(values: list[float], level: float = 0.95):
    """(geometric mean, lower, upper) of positive values: exp of the t-interval of their logarithms (a ratio's
    interval, multiplicative around the geometric mean: always positive). Bounds None with one value."""
    m, lo, hi = mean_interval([math.log(v) for v in values], level)
    return math.exp(m), None if lo is None else math.exp(lo), None if hi is None else math.exp(hi)


def effects(runs: list[dict], metrics=("val_loss", "train_tokens_per_s")) -> list[dict]:
    """Per family with two or more choices among finished runs: per choice, each metric's mean over the
    per-seed means, and its 95% t-interval across seeds when there are several. The interval is taken on
    loss, which is roughly normal across seeds; perplexity's is its exponential (never negative). Positive
    quantities (LOG_SCALE: tokens/s) are averaged and given their interval on the log scale (geometric
    means, never a negative bound). Choices rank by validation loss."""
    done = [r for r in runs if r["status"] == FINISHED and r["val_loss"] is not None]
    out, partitions = [], {}
    for family in FAMILIES:
        by_choice = defaultdict(list)
        for r in done:
            by_choice[r["variant"].get(family)].append(r)
        if len(by_choice) < 2:
            continue
        partition = frozenset(frozenset(r["id"] for r in group) for group in by_choice.values())
        if partition in partitions:  # splits the runs exactly as an earlier family does: same numbers
            partitions[partition]["same_as"].append(family)
            continue
        rows = []
        for choice, group in by_choice.items():
            row = {"family": family, "choice": choice, "runs": len(group),
                   "seeds": len({r["seed"] for r in group})}
            for m in metrics:
                per_seed, log = defaultdict(list), m in LOG_SCALE
                for r in group:
                    if r[m] is not None and (r[m] > 0 or not log):
                        per_seed[r["seed"]].append(r[m])
                if per_seed:
                    row[m], row[m + "_lo"], row[m + "_hi"] = (
                        log_mean_interval([statistics.geometric_mean(v) for v in per_seed.values()]) if log
                        else mean_interval([statistics.fmean(v) for v in per_seed.values()]))
                else:
                    row[m] = row[m + "_lo"] = row[m + "_hi"] = None
            row["val_ppl"], row["val_ppl_lo"], row["val_ppl_hi"] = (
                None if x is None else math.exp(x) for x in (row["val_loss"], row["val_loss_lo"], row["val_loss_hi"]))
            rows.append(row)
        rows.sort(key=lambda row: row["val_loss"])
        for row in rows:
            row["delta_loss"] = row["val_loss"] - rows[0]["val_loss"]
            row["delta_ppl"] = row["val_ppl"] - rows[0]["val_ppl"]
        out.append({"family": family, "choices": rows, "same_as": []})
        partitions[partition] = out[-1]
    return out


def pareto_front(points: list[tuple[float, float]], higher_is_better: bool = True) -> list[int]:
    """Indices of the (quality, cost) points no other point beats: lower loss/perplexity, and higher second
    coordinate (throughput) or, with higher_is_better=False, lower (FLOPs, parameters, bytes).
    Sweep by the second coordinate, best first: a point is on the front if it beats all better ones."""
    sign = -1 if higher_is_better else 1
    order = sorted(range(len(points)), key=lambda i: (sign * points[i][1], points[i][0]))
    front, best = [], math.inf
    for i in order:
        if points[i][0] < best:
            front.append(i)
            best = points[i][0]
        elif front and points[i] == points[front[-1]]:  # an exact duplicate of a front point
            front.append(i)
    return sorted(front)
