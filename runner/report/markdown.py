"""The compare report as Markdown (report.md): the verdicts, the runs table, the runs that did not finish,
the learning-rate grid, the effects, the effects by size."""
from pathlib import Path

from runner.report.format import (FINISHED, budget_note, family_title, fmt, fmt_interval, fmt_lr, fmt_value)
from runner.report.telemetry import TELEMETRY_HEAD, telemetry_rows
from runner.report.trend_render import trends_markdown
from runner.report.verdicts import verdict_line


def _md_cell(x) -> str:
    return str(x).replace("|", "\\|").replace("\n", " ")


def _md_table(head, rows) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
            *("| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows)]


def verdict_rows(verdicts) -> list[list]:
    return [[v["family"], f"{fmt_value(v['choice'])} vs {fmt_value(v['reference'])}",
             f"{v['mean']:+.4f}" + (f" ± {v['half']:.4f}" if v["half"] is not None else ""), v["n"], v["verdict"],
             v["seeds_needed"] or "–"] for v in verdicts]


def lr_cells(tuning: dict, grid: list, best_fmt: str) -> list[str]:
    """A variant's mean validation loss at each lr of the whole grid ("–" where it has no run); best marked."""
    cells = {lr: f"{loss:.4f}" for lr, loss in zip(tuning["grid"], tuning["val_loss"])}
    cells[tuning["best_lr"]] = best_fmt.format(cells[tuning["best_lr"]])
    return [cells.get(lr, "–") for lr in grid]


VERDICT_HEAD = ["family", "choice vs reference", "Δ val loss (95% CI)", "seeds", "verdict", "seeds to resolve"]


def telemetry_lines(report: dict) -> list[str]:
    """The runs' training telemetry in brief (runner/report/telemetry.py); nothing when no run recorded any."""
    rows = telemetry_rows(report["runs"])
    if not rows:
        return []
    return ["", "## Inside training", "", "train.telemetry: the largest pre-softmax attention logit over the layers, "
            "the lowest layer's attention entropy (nats) and the output logits' mean log-partition z; a run that did "
            "not finish shows its telemetry up to its last step. Curves: report.html.", ""] + _md_table(
        TELEMETRY_HEAD, [[f"{c:.3g}" if isinstance(c, float) else fmt_value(c) for c in row] for row in rows])


def render_markdown(report: dict, images: list[str] = ()) -> str:
    lines = (_header_lines(report) + _verdict_lines(report) + trends_markdown(report) + _runs_lines(report)
             + _unfinished_lines(report) + telemetry_lines(report) + _lr_lines(report) + _effects_lines(report)
             + _by_size_lines(report))
    if images:
        lines += ["", "## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in images]
    return "\n".join(lines) + "\n"


def _header_lines(report) -> list[str]:
    runs = report["runs"]
    n_ok = sum(r["status"] == FINISHED for r in runs)
    lines = [f"# {report['title']}", "",
             f"{len(runs)} runs ({n_ok} ok, {len(runs) - n_ok} not finished) from "
             f"{', '.join(f'`{d}`' for d in report['dirs'])}, {report['generated_at']}.", "", budget_note(report)]
    if report["common"]:
        lines += ["", "Common to all runs: " + ", ".join(f"{k}={v}" for k, v in report["common"].items()) + "."]
    return lines


def _verdict_lines(report) -> list[str]:
    lines = ["", "## Verdicts", ""]
    if not report["verdicts"]:
        return lines + ["No family has two choices among the compared runs."]
    lines += ["Each choice against the reference choice, paired by seed (each variant at its best learning "
              "rate): mean difference in validation loss with its 95% t-interval; negative is better.", ""]
    lines += [f"- {verdict_line(v)}" for v in report["verdicts"]]
    return lines + [""] + _md_table(VERDICT_HEAD, verdict_rows(report["verdicts"]))


def _runs_lines(report) -> list[str]:
    runs, cost = report["runs"], report["cost"]
    lines = ["", "## Runs", "", f"Compared runs first, by validation loss; ★ marks the front of validation loss "
             f"against {cost['label']} (compare.cost={cost['name']}).", ""]
    head = ["run", "status", "task", "budget", "compared", *report["variant_columns"],
            *(h for _, h in report["metric_columns"]), "directory"]
    rows = [[("★ " if r["pareto"] else "") + r["label"], r["status"], fmt_value(r["task"]), fmt_value(r["budget"]),
             r["left_out"] or "yes",
             *(fmt_lr(r["lr"]) if f == "lr" else fmt_value(r["variant"].get(f)) for f in report["variant_columns"]),
             *(fmt(k, r[k]) + ("*" if k == "kv_cache_bytes_per_token" and r.get("kv_estimated") else "")
               for k, _ in report["metric_columns"]), f"`{r['id']}`"] for r in runs]
    lines += _md_table(head, rows)
    if any(r.get("kv_estimated") for r in runs):
        lines += ["", "\\* KV bytes/token counted by the model (the run was not benchmarked, so no cache was allocated)."]
    return lines


def _unfinished_lines(report) -> list[str]:
    lines = []
    if report["not_finished"]:
        lines += ["", "## Runs that did not finish", ""]
        lines += [f"- **{r['status']}** {r['label']} (`{r['id']}`): "
                  + " ".join((r["error"] or "no error recorded").split()) for r in report["not_finished"]]
    if report.get("config_errors"):
        lines += ["", "## Stopped by a config error before starting", ""]
        lines += [f"- `{r['id']}`: " + " ".join((r["error"] or "").split()) for r in report["config_errors"]]
    return lines


def _lr_lines(report) -> list[str]:
    if not report["lr_tuning"]:
        return []
    lines = ["", "## Learning rates", "", "Validation loss averaged over seeds at each learning rate; each "
             "variant is compared at its best (**bold**).", ""]
    grid = sorted({lr for t in report["lr_tuning"] for lr in t["grid"] if lr is not None})
    rows = [[t["variant_label"], *lr_cells(t, grid, "**{}**"),
             fmt_lr(t["best_lr"]) + (" (edge of the grid: widen it)" if t["at_edge"] else "")]
            for t in report["lr_tuning"]]
    return lines + _md_table(["variant", *map(fmt_lr, grid), "best lr"], rows)


def _effects_lines(report) -> list[str]:
    if not report["effects"]:
        return []
    lines = ["", "## Effect of each choice", "",
             "Mean over the compared finished runs with that choice (averaged per seed, then over seeds); "
             "[95% t-interval across seeds] on loss when there are several seeds; perplexity's interval is "
             "the exponential of loss's. Ranked by validation loss; Δ is against the family's best choice."]
    for fam in report["effects"]:
        lines += ["", f"### {family_title(fam)}", ""]
        lines += _md_table(["choice", "runs", "seeds", "val loss", "val ppl", "Δ loss", "train tok/s"],
                           [[fmt_value(c["choice"]), c["runs"], c["seeds"], fmt_interval(c, "val_loss"),
                             fmt_interval(c, "val_ppl"), f"+{c['delta_loss']:.4f}",
                             fmt_interval(c, "train_tokens_per_s")] for c in fam["choices"]])
    return lines


def _by_size_lines(report) -> list[str]:
    if not report["by_size"]:
        return []
    lines = ["", "## Effects by model size", ""]
    for s in report["by_size"]:
        size = " ".join(f"{k}={v}" for k, v in s["size"].items())
        params = f" ({fmt('params', s['params_non_embedding'])} non-embedding parameters)" \
            if s["params_non_embedding"] else ""
        lines += ["", f"### {size}{params}", ""] + (_md_table(VERDICT_HEAD, verdict_rows(s["verdicts"]))
                                                    if s["verdicts"] else ["No pairs at this size."])
    return lines
