"""The compare report as one self-contained HTML page: tables are rendered here, charts by a small inline
script (report.js, with report.css beside it) into SVG (no CDN, no library: the page works offline and from file://).

Every chart is a <figure data-chart=...>; the script sets data-rendered on each one it draws, and the page
records uncaught script errors in <html data-errors>, which the browser test reads.

Charts and cards show the compared runs only (runner/report/select.py: left_out is None); the others stay in
the runs table. The script's data (DATA.runs) holds only those. A new chart section is a function here that
returns a <section> with <figure class="chart" data-chart="KIND" ...> (added to `parts` in render_html, its
data to `data` if DATA lacks it) and a function KIND(fig) in report.js registered in its `draw` table; the
browser test then checks it is drawn, at least a third of the page wide, with no label clipped."""
import html
import json
from importlib import resources

from runner.report.format import FINISHED, budget_note, family_title, fmt, fmt_interval, fmt_lr
from runner.report.markdown import VERDICT_HEAD, lr_cells, verdict_rows
from runner.report.telemetry import SERIES, TELEMETRY_HEAD, telemetry_rows
from runner.report.trend_render import trends_html
from runner.report.verdicts import verdict_line


def _asset(name: str) -> str:
    """The page's stylesheet and script are package files (report.css, report.js), inlined so that the page
    stays one self-contained file."""
    return resources.files("runner.report").joinpath(name).read_text(encoding="utf-8")


def render_html(report: dict) -> str:
    runs = report["runs"]
    shown = compared(report)
    data = {
        "colors": report["colors"],
        "runs": [{k: r.get(k) for k in ("id", "label", "short", "title", "variant_label", "status", "pareto", "val_ppl",
                                         "val_loss", "train_tokens_per_s", "peak_memory_bytes",
                                         "kv_cache_bytes_per_token", "kv_estimated", "curves", "flops_per_token",
                                         "params", "train_flops", "left_out")} for r in shown],
        # a legend entry per variant: its short name, the whole variant in the tooltip
        "variants": {r["variant_label"]: {"short": r["variant_short"], "title": _variant_title(r)} for r in shown},
        "effects": report["effects"],
        "cost": report["cost"],
    }
    payload = json.dumps(data, default=str).replace("</", "<\\/")
    head = HEAD.replace("{title}", html.escape(report["title"])).replace("{style}", _asset("report.css"))
    head = head.replace("{errors}", _asset("report-errors.js"))
    parts = [head, _header(report), _verdicts(report), trends_html(report), _runs_table(report), _not_finished(report),
             _config_errors(report), CURVES, _telemetry(report), _pareto(report), MEMORY, _lr_tuning(report), _effects(report),
             _by_size(report),
             f'<footer>Written by <code>python run.py task=compare</code> from {len(runs)} results.json files '
             f'under {", ".join(html.escape(d) for d in report["dirs"])}. Markdown summary: report.md; '
             f'PNG plots beside this file.</footer>',
             f'<script id="report-data" type="application/json">{payload}</script>',
             f"<script>\n{_asset('report.js')}</script></body></html>"]
    return "\n".join(p for p in parts if p)


def _e(x) -> str:
    return html.escape("–" if x is None else str(x))


def compared(report) -> list[dict]:
    """The runs every chart and card shows: those the report compares (the others stay in the runs table)."""
    return [r for r in report["runs"] if r.get("left_out") is None]


def _variant_title(r) -> str:
    return ", ".join(f"{k}={v}" for k, v in r["variant"].items() if v is not None and k != "seed")


def _name(r) -> str:
    """A run's short name, its whole variant in the tooltip."""
    return f'<span title="{_e(r["title"])}">{_e(r["short"])}</span>'


def _header(report) -> str:
    runs, mine = report["runs"], compared(report)
    done = [r for r in mine if r["status"] == FINISHED]  # the cards name compared runs only
    cards = []
    best = min((r for r in done if r["val_loss"] is not None), key=lambda r: r["val_loss"], default=None)
    if best:
        cards.append(("lowest validation loss", fmt("val_loss", best["val_loss"]), best))
    fast = max((r for r in done if r["train_tokens_per_s"] is not None),
               key=lambda r: r["train_tokens_per_s"], default=None)
    if fast:
        cards.append(("fastest training", fmt("train_tokens_per_s", fast["train_tokens_per_s"]) + " tok/s", fast))
    small = min((r for r in mine if r["kv_cache_bytes_per_token"] is not None),
                key=lambda r: r["kv_cache_bytes_per_token"], default=None)
    if small:
        cards.append(("smallest KV cache", fmt("kv_cache_bytes_per_token", small["kv_cache_bytes_per_token"])
                      + "/token", small))
    unfinished, config = len(report["not_finished"]), len(report.get("config_errors", []))
    left_out = len(runs) - len(mine)
    cards.append(("compared runs", f"{len(done)} ok / {len(mine)}", ", ".join(
        [f"{left_out} more listed, not compared"] * bool(left_out) + [f"{unfinished} did not finish"] * bool(unfinished)
        + [f"{config} stopped by a config error"] * bool(config)) or "all finished"))
    common = ", ".join(f"{k}={v}" for k, v in report["common"].items())
    return (f'<header><h1>{_e(report["title"])}</h1>'
            f'<p class="meta">{len(runs)} runs from {_e(", ".join(report["dirs"]))} · generated '
            f'{_e(report["generated_at"])}</p><div class="cards">'
            + "".join(f'<div class="card"><div class="k">{_e(k)}</div><div class="v">{_e(v)}</div>'
                      f'<div class="s">{_name(s) if isinstance(s, dict) else _e(s)}</div></div>' for k, v, s in cards)
            + "</div>" + f'<p class="common">{_e(budget_note(report))}</p>'
            + (f'<p class="common">Common to all runs: {_e(common)}</p>' if common else "")
            + "</header>")


def _badge(status) -> str:
    return f'<span class="badge {_e(status)}">{_e(status)}</span>'


def _runs_table(report) -> str:
    mcols = report["metric_columns"]  # the varied choices are in the run's name (Markdown has a column each)
    head = ('<tr><th data-type="text" class="label">run</th><th data-type="text">status</th><th data-type="text">task</th>'
            '<th data-type="text">budget</th><th data-type="text">compared</th>'
            + "".join(f'<th data-type="num" class="num">{_e(h)}</th>' for _, h in mcols) + "</tr>")
    body = []
    for r in report["runs"]:
        star = '<span class="star" title="on the Pareto front">★</span> ' if r["pareto"] else ""
        cells = [f'<td class="label" data-v="{_e(r["short"])}">{star}<span class="swatch" style="background:'
                 f'{report["colors"][r["variant_label"]]}"></span>{_name(r)}'
                 f'<div class="path" title="{_e(r["id"])}">{_e(r["name"])}</div></td>',
                 f'<td data-v="{_e(r["status"])}">{_badge(r["status"])}</td>',
                 f'<td>{_e(r["task"])}</td><td class="wrap">{_e(r["budget"])}</td>'
                 f'<td class="wrap">{_e(r["left_out"] or "yes")}</td>']
        for k, _ in mcols:
            est = k == "kv_cache_bytes_per_token" and r.get("kv_estimated") and r[k] is not None
            cells.append(f'<td class="num" data-v="{"" if r[k] is None else r[k]}"'
                         f'{" title=computed&#32;from&#32;the&#32;config" if est else ""}>'
                         f'{_e(fmt(k, r[k]))}{"*" if est else ""}</td>')
        body.append(f'<tr class="{"" if r["status"] == FINISHED else "dnf"}">' + "".join(cells) + "</tr>")
    note = ('<p class="hint">* counted by the model (the run was not benchmarked).</p>'
            if any(r.get("kv_estimated") for r in report["runs"]) else "")
    return ('<section id="runs"><h2>Runs</h2><p class="hint">Click a heading to sort. ★ marks the front of '
            f'validation loss against {_e(report["cost"]["label"])}: no other compared run is better on both.</p>'
            f'<div class="table-wrap" id="runs-wrap"><table class="sortable" id="runs-table"><thead>{head}</thead>'
            f'<tbody>{"".join(body)}</tbody></table></div>{note}</section>')


def _not_finished(report) -> str:
    if not report["not_finished"]:
        return ""
    items = "".join(f'<li>{_badge(r["status"])} <b>{_name(r)}</b> <span class="path">{_e(r["id"])}</span>'
                    f'<pre>{_e(r["error"] or "no error recorded")}</pre></li>' for r in report["not_finished"])
    return (f'<section id="not-finished"><h2>Runs that did not finish ({len(report["not_finished"])})</h2>'
            f'<ul class="dnf-list">{items}</ul></section>')


def _config_errors(report) -> str:
    """Runs a config check stopped before they started: listed apart, one line each, not as failures."""
    if not report.get("config_errors"):
        return ""
    items = "".join(f'<li><span class="path">{_e(r["id"])}</span>: {_e(r["error"] or "")}</li>'
                    for r in report["config_errors"])
    return (f'<section id="config-errors"><h2>Stopped by a config error before starting '
            f'({len(report["config_errors"])})</h2><ul class="dnf-list">{items}</ul></section>')


def _effects(report) -> str:
    if not report["effects"]:
        return ('<section id="effects"><h2>Effect of each choice</h2><p class="hint">No family has two '
                'choices among the finished runs.</p></section>')
    blocks = []
    for i, fam in enumerate(report["effects"]):
        rows = "".join(
            f'<tr><td>{_e(c["choice"])}</td><td class="num">{c["runs"]}</td><td class="num">{c["seeds"]}</td>'
            f'<td class="num">{_e(fmt_interval(c, "val_loss"))}</td>'
            f'<td class="num">{_e(fmt_interval(c, "val_ppl"))}</td>'
            f'<td class="num">{"best" if c["delta_loss"] == 0 else "+" + format(c["delta_loss"], ".4f")}</td>'
            f'<td class="num">{_e(fmt_interval(c, "train_tokens_per_s"))}</td></tr>' for c in fam["choices"])
        blocks.append(
            f'<div class="effect"><h3>{_e(family_title(fam))}</h3><div class="grid2">'
            '<table class="effects"><thead><tr><th>choice</th><th class="num">runs</th><th class="num">seeds'
            '</th><th class="num">val loss</th><th class="num">val ppl</th><th class="num">Δ loss</th>'
            f'<th class="num">train tok/s</th></tr></thead><tbody>{rows}</tbody></table>'
            f'<figure class="chart small" data-chart="effect" data-index="{i}"></figure></div></div>')
    return ('<section id="effects"><h2>Effect of each choice</h2><p class="hint">For each family, the mean '
            'over the compared finished runs with that choice (averaged per seed, then across seeds, so the other '
            'families are averaged out); with several seeds, [95% t-interval across seeds] on loss, and '
            'perplexity\'s as its exponential; tokens/s is a geometric mean with its interval on the log scale '
            '(never below zero). Ranked by validation loss; Δ loss is against the family\'s best '
            'choice.</p>' + "".join(blocks) + "</section>")


def _table(head, rows) -> str:
    return ("<table class=\"effects\"><thead><tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr></thead><tbody>"
            + "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows) + "</tbody></table>")


def _verdicts(report) -> str:
    if not report["verdicts"]:
        return ('<section id="verdicts"><h2>Verdicts</h2><p class="hint">No family has two choices among the '
                'compared runs.</p></section>')
    items = "".join(f"<li>{_e(verdict_line(v))}</li>" for v in report["verdicts"])
    return ('<section id="verdicts"><h2>Verdicts</h2><p class="hint">Each choice against the reference choice, '
            'paired by seed (each variant at its best learning rate): mean difference in validation loss with its '
            f'95% t-interval; negative is better.</p><ul class="verdicts">{items}</ul>'
            + _table(VERDICT_HEAD, verdict_rows(report["verdicts"])) + "</section>")


def _lr_tuning(report) -> str:
    if not report["lr_tuning"]:
        return ""
    grid = sorted({lr for t in report["lr_tuning"] for lr in t["grid"] if lr is not None})
    rows = [[t["variant_label"], *lr_cells(t, grid, "{} (best)"), fmt_lr(t["best_lr"])
             + (" ⚠ edge of the grid: widen it" if t["at_edge"] else "")] for t in report["lr_tuning"]]
    return ('<section id="lr"><h2>Learning rates</h2><p class="hint">Validation loss averaged over seeds at each '
            'learning rate; each variant is compared at its own best.</p>'
            + _table(["variant", *map(fmt_lr, grid), "best lr"], rows) + "</section>")


def _by_size(report) -> str:
    if not report["by_size"]:
        return ""
    blocks = []
    for s in report["by_size"]:
        size = " ".join(f"{k}={v}" for k, v in s["size"].items())
        params = f" ({fmt('params', s['params_non_embedding'])} non-embedding)" if s["params_non_embedding"] else ""
        blocks.append(f"<h3>{_e(size + params)}</h3>" + (_table(VERDICT_HEAD, verdict_rows(s["verdicts"]))
                                                         if s["verdicts"] else '<p class="hint">No pairs.</p>'))
    return ('<section id="by-size"><h2>Effects by model size</h2><p class="hint">The paired verdicts at each '
            'size: does a gain grow or shrink with scale?</p>' + "".join(blocks) + "</section>")


def _telemetry(report) -> str:
    """Per variant, the telemetry series over training (runner/report/telemetry.py), drawn by report.js's
    loss-curve chart on another field; dotted: a run that did not finish, its telemetry up to its last step."""
    rows = telemetry_rows(report["runs"])
    if not rows:
        return ""
    figures = "".join(f'<figure class="chart" data-chart="curves" data-kind="telemetry" data-field="{key}" '
                      f'data-ylabel="{_e(label)}" data-axes="tokens"><figcaption>{_e(label)}</figcaption></figure>'
                      for key, label in SERIES)
    table = _table(TELEMETRY_HEAD, [[_e(c) if not isinstance(c, float) else f"{c:.3g}" for c in row] for row in rows])
    return ('<section id="telemetry"><h2>Inside training</h2><p class="hint">train.telemetry: the largest '
            'pre-softmax attention logit, the lowest layer\'s attention entropy and the output logits\' log-partition '
            'z, at each telemetry step (Wortsman et al. 2023: a growing attention logit or z precedes divergence; '
            'QK-norm and train.z_loss bound them). Dotted: did not finish.</p>'
            f'<div class="grid2">{figures}</div>{table}</section>')


CURVES = """<section id="curves"><h2>Loss curves</h2><p class="hint">Against training tokens, training FLOPs
(analytic: FLOPs/token x tokens) or training time (the buttons above the validation chart); one colour per variant (seeds share it; dotted: did not
finish). Click a legend entry to hide or show it; hover for values.</p>
<div class="grid2">
<figure class="chart" data-chart="curves" data-kind="val" data-axes="tokens flops seconds"><figcaption>validation
loss</figcaption></figure>
<figure class="chart" data-chart="curves" data-kind="train"><figcaption>training loss</figcaption></figure>
</div></section>"""

MEMORY = """<section id="memory"><h2>Memory</h2><p class="hint">By variant (mean over its compared runs). Hatched and
starred: counted by the model, because no run of that variant was benchmarked.</p><div class="grid2">
<figure class="chart" data-chart="bars" data-key="peak_memory_bytes"><figcaption>peak memory</figcaption></figure>
<figure class="chart" data-chart="bars" data-key="kv_cache_bytes_per_token"><figcaption>KV-cache bytes per token
</figcaption></figure></div></section>"""


def _pareto(report) -> str:
    cost = report["cost"]
    front = sorted((r for r in report["runs"] if r["pareto"]), key=lambda r: r["val_loss"])
    rows = "".join(f'<tr><td class="label"><span class="swatch" style="background:{report["colors"][r["variant_label"]]}">'
                   f'</span>{_name(r)}</td><td class="num">{_e(fmt("val_loss", r["val_loss"]))}</td>'
                   f'<td class="num">{_e(fmt(cost["key"], r[cost["key"]]))}</td></tr>'
                   for r in front)
    table = ('<div class="table-wrap"><table class="front"><thead><tr><th>Pareto front</th><th class="num">val loss</th>'
             f'<th class="num">{_e(cost["label"])}</th></tr></thead><tbody>{rows}</tbody></table></div>' if front else "")
    better = "higher" if cost["higher_is_better"] else "lower"
    return ('<section id="pareto"><h2>Quality vs cost</h2><p class="hint">Validation loss of the compared runs '
            f'(each variant at its best learning rate) against {_e(cost["label"])} (compare.cost={_e(cost["name"])}; '
            f'{better} is better); the dashed line joins the Pareto front (ringed points). Analytic costs '
            '(flops, params, kv_bytes) do not move with a busy machine; measured tokens/s does.</p>'
            '<div class="grid2 wide-left"><figure class="chart" data-chart="pareto"><figcaption>validation loss vs '
            f'{_e(cost["label"])}</figcaption></figure>{table}</div></section>')


HEAD = """<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1"><title>{title}</title>
<script>{errors}</script>
<style>
{style}</style></head><body>"""

