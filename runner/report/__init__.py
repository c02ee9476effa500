"""`python run.py task=compare`: which choices matter, and what do they cost?

Gathers every results.json under `compare.dirs` (default `outputs/`) and writes, into `compare.out`:
  report.html   one self-contained page (inline CSS/JS/SVG, no CDN): a sortable table of runs, loss curves,
                perplexity vs training tokens/s with the Pareto front, memory, and per-family effects
  report.md     the same table and effects as Markdown
  *.png         the plots (matplotlib, Agg) for papers and READMEs
With `compare.wandb=true` it also saves a W&B workspace for a sweep (runner/report/wandb_workspace.py).

Like with like (runner/report/select.py): every run found is listed, but only training runs
(compare.tasks) of one sweep (compare.sweep: the latest by default) with one budget are compared; the
others carry the reason they were left out. A learning-rate grid in the sweep is resolved first: each
variant is compared at its own best lr (lowest validation loss averaged over seeds).

Effects: for a family (norm, ffn, attention, ...) and one of its choices, the runs with that choice are
averaged per seed (which averages over the other families), then over seeds; with two or more seeds the
95% interval is mean ± t(0.975, k-1) · sd / sqrt(k) over the k per-seed means, on loss (perplexity's is
its exponential; tokens/s's is taken on the log scale, so it stays positive). Charts and cards show the
compared runs only, named by the choices varied among them (runner/report/runs.py short_labels). Verdicts (runner/report/verdicts.py): each choice against a reference, paired by seed.
"""
from pathlib import Path

from omegaconf import DictConfig

from runner.report.build import build_report, write_report
from runner.report.format import FINISHED
from runner.report.markdown import render_markdown
from runner.report.runs import gather, load_run
from runner.report.stats import effects, mean_interval, pareto_front, t_quantile
from runner.report.verdicts import paired_verdicts, verdict_line
from runner.task import config_checks

__all__ = ["main", "gather", "load_run", "build_report", "write_report", "render_markdown", "effects",
           "mean_interval", "pareto_front", "t_quantile", "paired_verdicts"]


def main(cfg: DictConfig):
    c = cfg.compare
    if c.get("wandb"):
        from runner.report.wandb_workspace import require_api_key
        require_api_key()  # before anything is read or written
    dirs = [c.dirs] if isinstance(c.dirs, str) else list(c.dirs)
    runs = gather(dirs)
    with config_checks():  # one line, as a config error: the folders to compare are the user's input
        if not runs:
            raise FileNotFoundError(f"compare.dirs={dirs}: no results.json under them; train something first "
                                    f"(`python run.py` or `python run.py -m +experiment=attention`)")
    from runner.tracking import output_dir
    out = Path(c.out) if c.get("out") else output_dir()
    tasks = [c.tasks] if isinstance(c.get("tasks", "train"), str) else list(c.tasks)
    reference = dict(c.get("reference") or {})
    report = build_report(runs, dirs, tasks=tasks, sweep=c.get("sweep"), reference=reference,
                          cost=c.get("cost", "flops"))
    written = write_report(report, out, png=c.get("png", True))
    n_ok = sum(r["status"] == FINISHED for r in runs)
    print(f"compare: {len(runs)} runs ({n_ok} ok, {len(runs) - n_ok} not) from {', '.join(map(str, dirs))}")
    for path in written:
        print(f"  wrote {path}")
    from runner.report.format import budget_note
    print(budget_note(report))
    for t in report["lr_tuning"]:
        if t["at_edge"]:
            print(f"warning: {t['variant_label']}: the best lr {t['best_lr']:g} is at the edge of the grid "
                  f"{[f'{lr:g}' for lr in t['grid'] if lr is not None]}; widen train.lr")
    print("verdicts (Δ val loss vs the reference, paired by seed, 95% interval):")
    for v in report["verdicts"]:
        print(f"  {verdict_line(v)}")
    if not report["verdicts"]:
        print("  none: no family has two choices among the compared runs")
    from runner.report.trends import trend_line
    for g in (report.get("trends") or {}).get("gaps", []):  # as compute grows (budget ladders)
        print(f"  trend: {trend_line(g)}")
    if c.get("wandb"):
        from runner.report.wandb_workspace import publish
        url = publish(runs, cfg)
        print(f"  W&B workspace: {url}")
    return {"runs": len(runs), "files": [str(p) for p in written]}
