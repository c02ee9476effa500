"""The report's data (build_report) and its files (write_report: HTML, Markdown, PNGs)."""
import math
import time
from pathlib import Path

from runner.report.format import FINISHED
from runner.report.markdown import render_markdown
from runner.report.runs import METRICS, colour, short_labels
from runner.report.select import at_best_lr, best_learning_rates, select_comparable
from runner.report.stats import effects, pareto_front
from runner.report.trends import build_trends, holm_verdicts, lr_sensitivity
from runner.report.verdicts import paired_verdicts
from runner.tracking import FAMILIES

# compare.cost: the cost axis of the quality-vs-cost front -> (run key, heading, higher is better).
# The analytic ones do not move with a busy machine; measured throughput does.
COSTS = {"flops": ("flops_per_token", "training FLOPs/token", False),
         "params": ("params", "parameters", False),
         "kv_bytes": ("kv_cache_bytes_per_token", "KV-cache bytes/token", False),
         "train_flops": ("train_flops", "training FLOPs spent", False),
         "tokens_per_s": ("train_tokens_per_s", "training tokens/s (measured)", True)}
SIZE_FIELDS = ("d_model", "n_layers")


def build_report(runs: list[dict], dirs, tasks=("train",), sweep=None, reference=None, cost="flops") -> dict:
    if cost not in COSTS:
        raise ValueError(f"compare.cost={cost!r}: choose one of {sorted(COSTS)}")
    compared, chosen = select_comparable(runs, tasks, sweep)
    short_labels(runs, compared)  # what the charts, cards and tables call each run
    tuning = best_learning_rates(compared)
    tuned = at_best_lr(compared, tuning)
    cost_key, cost_label, higher = COSTS[cost]
    done = [r for r in tuned if r["val_loss"] is not None and r[cost_key] is not None]
    for r in runs:
        r["pareto"] = False
    for i in pareto_front([(r["val_loss"], r[cost_key]) for r in done], higher_is_better=higher):
        done[i]["pareto"] = True
    base = compared or runs
    varying = [f for f in FAMILIES if len({r["variant"].get(f) for r in base}) > 1]
    common = {f: base[0]["variant"].get(f) for f in FAMILIES
              if f not in varying and base and base[0]["variant"].get(f) is not None}
    runs = sorted(runs, key=_run_order)
    variants = list(dict.fromkeys(r["variant_label"] for r in runs))
    harness = sorted({k for r in runs for k in r if k.startswith("lm_eval/")})  # task=lm_eval's scores
    for r in runs:
        r.update({k: r.get(k) for k in harness})
    fams = effects(tuned)
    show_lr = len({r["lr"] for r in compared}) > 1
    verdicts = paired_verdicts(tuned, fams, reference)
    return {
        "title": "Variant comparison",
        "colors": {v: colour(i) for i, v in enumerate(variants)},
        "generated_at": time.strftime("%Y-%m-%d %H:%M"),
        "dirs": [str(d) for d in dirs],
        "runs": runs,
        "chosen": chosen,
        "compared": len(compared),
        "variant_columns": varying + (["lr"] if show_lr else [])
        + (["seed"] if len({r["seed"] for r in runs}) > 1 else []),
        "metric_columns": [(k, heading) for k, heading, _ in METRICS if any(r[k] is not None for r in runs)]
                          + [(k, k.removeprefix("lm_eval/").replace("/", " ")) for k in harness],
        "common": common,
        "cost": {"name": cost, "key": cost_key, "label": cost_label, "higher_is_better": higher},
        "lr_tuning": tuning if show_lr else [],
        "effects": fams,
        "verdicts": verdicts,
        "holm": holm_verdicts(verdicts),  # p, Holm-adjusted p and verdict on each verdict; the number of them
        "trends": build_trends(tuned, fams, reference),  # loss vs compute (runner/report/trends.py)
        "lr_sensitivity": lr_sensitivity(tuning) if show_lr else [],
        "by_size": _by_size(tuned, reference),
        "not_finished": [r for r in runs if r["status"] != FINISHED and not r.get("config_error")],
        "config_errors": [r for r in runs if r["status"] != FINISHED and r.get("config_error")],  # never started
        "left_out": [r for r in runs if r["left_out"] and r["status"] == FINISHED],
    }


def _by_size(runs: list[dict], reference) -> list[dict]:
    """With several model sizes (d_model x n_layers) among the compared runs: the verdicts at each size, so
    a reader sees whether a choice's gain grows or shrinks with scale."""
    sizes = sorted({tuple(r["variant"].get(f) for f in SIZE_FIELDS) for r in runs}, key=lambda s: tuple(x or 0 for x in s))
    if len(sizes) < 2:
        return []
    out = []
    for size in sizes:
        mine = [r for r in runs if tuple(r["variant"].get(f) for f in SIZE_FIELDS) == size]
        fams = [f for f in effects(mine) if f["family"] not in SIZE_FIELDS]
        params = sorted(r["params_non_embedding"] for r in mine if r.get("params_non_embedding"))
        out.append({"size": dict(zip(SIZE_FIELDS, size)), "params_non_embedding": params[len(params) // 2] if params else None,
                    "verdicts": paired_verdicts(mine, fams, reference)})
    return out


def _run_order(r):
    """Compared runs first, by validation loss; then the rest."""
    loss = r["val_loss"] if r["status"] == FINISHED and r["val_loss"] is not None else math.inf
    return (r.get("left_out") is not None, loss, r["label"], r["id"])


def write_report(report: dict, out: Path, png: bool = True) -> list[Path]:
    from runner.report.html import render_html
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    images = []
    if png:
        try:
            from runner.report.png import write_pngs
            images = write_pngs(report, out)
        except ImportError as err:
            print(f"compare: no PNGs ({err}); pip install -e '.[dashboards]' for matplotlib")
    html = out / "report.html"
    html.write_text(render_html(report))
    md = out / "report.md"
    md.write_text(render_markdown(report, [p.name for p in images]))
    return [html, md, *images]
