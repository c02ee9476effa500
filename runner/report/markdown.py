"""The compare report as Markdown (report.md): the runs table, the runs that did not finish, the effects."""
from pathlib import Path

from runner.report.format import FINISHED, family_title, fmt, fmt_interval, fmt_value


def _md_cell(x) -> str:
    return str(x).replace("|", "\\|").replace("\n", " ")


def _md_table(head, rows) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
            *("| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows)]


def render_markdown(report: dict, images: list[str] = ()) -> str:
    runs = report["runs"]
    n_ok = sum(r["status"] == FINISHED for r in runs)
    lines = [f"# {report['title']}", "",
             f"{len(runs)} runs ({n_ok} ok, {len(runs) - n_ok} not finished) from "
             f"{', '.join(f'`{d}`' for d in report['dirs'])}, {report['generated_at']}."]
    if report["common"]:
        lines += ["", "Common to all runs: " + ", ".join(f"{k}={v}" for k, v in report["common"].items()) + "."]
    lines += ["", "## Runs", "", "Sorted by validation perplexity; ★ marks the Pareto front "
              "(no run has both lower perplexity and higher training throughput).", ""]
    head = ["run", "status", *report["variant_columns"], *(h for _, h in report["metric_columns"]), "directory"]
    rows = [[("★ " if r["pareto"] else "") + r["label"], r["status"],
             *(fmt_value(r["variant"].get(f)) for f in report["variant_columns"]),
             *(fmt(k, r[k]) + ("*" if k == "kv_cache_bytes_per_token" and r.get("kv_estimated") else "")
               for k, _ in report["metric_columns"]), f"`{r['id']}`"] for r in runs]
    lines += _md_table(head, rows)
    if any(r.get("kv_estimated") for r in runs):
        lines += ["", "\\* KV bytes/token counted by the model (the run was not benchmarked, so no cache was allocated)."]
    if report["not_finished"]:
        lines += ["", "## Runs that did not finish", ""]
        lines += [f"- **{r['status']}** {r['label']} (`{r['id']}`): "
                  + " ".join((r["error"] or "no error recorded").split()) for r in report["not_finished"]]
    if report["effects"]:
        lines += ["", "## Effect of each choice", "",
                  "Mean over the finished runs with that choice (averaged per seed, then over seeds); "
                  "[95% t-interval across seeds] when there are several seeds. Δ ppl is against the "
                  "family's best choice."]
        for fam in report["effects"]:
            lines += ["", f"### {family_title(fam)}", ""]
            lines += _md_table(["choice", "runs", "seeds", "val loss", "val ppl", "Δ ppl", "train tok/s"],
                               [[fmt_value(c["choice"]), c["runs"], c["seeds"], fmt_interval(c, "val_loss"),
                                 fmt_interval(c, "val_ppl"), f"+{c['delta_ppl']:.2f}",
                                 fmt_interval(c, "train_tokens_per_s")] for c in fam["choices"]])
    if images:
        lines += ["", "## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in images]
    return "\n".join(lines) + "\n"
