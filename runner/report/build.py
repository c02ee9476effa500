"""The report's data (build_report) and its files (write_report: HTML, Markdown, PNGs)."""
import math
import time
from pathlib import Path

from runner.report.format import FINISHED
from runner.report.markdown import render_markdown
from runner.report.runs import METRICS, PALETTE
from runner.report.stats import effects, pareto_front
from runner.tracking import FAMILIES


def build_report(runs: list[dict], dirs) -> dict:
    done = [r for r in runs if r["status"] == FINISHED and r["val_ppl"] is not None
            and r["train_tokens_per_s"] is not None]
    front = pareto_front([(r["val_ppl"], r["train_tokens_per_s"]) for r in done])
    for r in runs:
        r["pareto"] = False
    for i in front:
        done[i]["pareto"] = True
    varying = runs[0]["varying"] if runs else []
    common = {f: runs[0]["variant"].get(f) for f in FAMILIES
              if f not in varying and runs[0]["variant"].get(f) is not None}
    runs = sorted(runs, key=_run_order)
    variants = list(dict.fromkeys(r["variant_label"] for r in runs))
    harness = sorted({k for r in runs for k in r if k.startswith("lm_eval/")})  # task=lm_eval's scores
    for r in runs:
        r.update({k: r.get(k) for k in harness})
    return {
        "title": "Variant comparison",
        "colors": {v: PALETTE[i % len(PALETTE)] for i, v in enumerate(variants)},
        "generated_at": time.strftime("%Y-%m-%d %H:%M"),
        "dirs": [str(d) for d in dirs],
        "runs": runs,
        "variant_columns": varying + (["seed"] if len({r["seed"] for r in runs}) > 1 else []),
        "metric_columns": [(k, heading) for k, heading, _ in METRICS if any(r[k] is not None for r in runs)]
                          + [(k, k.removeprefix("lm_eval/").replace("/", " ")) for k in harness],
        "common": common,
        "effects": effects(runs),
        "not_finished": [r for r in runs if r["status"] != FINISHED],
    }


def _run_order(r):
    ppl = r["val_ppl"] if r["status"] == FINISHED and r["val_ppl"] is not None else math.inf
    return (ppl, r["label"], r["id"])


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


