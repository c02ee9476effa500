"""The compare report as one self-contained HTML page: tables are rendered here, charts by a small inline
script into SVG (no CDN, no library: the page works offline and from file://).

Every chart is a <figure data-chart=...>; the script sets data-rendered on each one it draws, and the page
records uncaught script errors in <html data-errors>, which the browser test reads."""
import html
import json

from runner.compare import FINISHED, family_title, fmt, fmt_interval


def render_html(report: dict) -> str:
    runs = report["runs"]
    data = {
        "colors": report["colors"],
        "runs": [{k: r.get(k) for k in ("id", "label", "variant_label", "status", "pareto", "val_ppl", "val_loss",
                                         "train_tokens_per_s", "peak_memory_bytes", "kv_cache_bytes_per_token",
                                         "kv_estimated", "curves")} for r in runs],
        "effects": report["effects"],
    }
    payload = json.dumps(data, default=str).replace("</", "<\\/")
    parts = [HEAD.replace("{title}", html.escape(report["title"])), _header(report), _runs_table(report),
             _not_finished(report), CURVES, _pareto(report), MEMORY, _effects(report),
             f'<footer>Written by <code>python run.py task=compare</code> from {len(runs)} results.json files '
             f'under {", ".join(html.escape(d) for d in report["dirs"])}. Markdown summary: report.md; '
             f'PNG plots beside this file.</footer>',
             f'<script id="report-data" type="application/json">{payload}</script>',
             f"<script>{SCRIPT}</script></body></html>"]
    return "\n".join(p for p in parts if p)


def _e(x) -> str:
    return html.escape("–" if x is None else str(x))


def _header(report) -> str:
    runs = report["runs"]
    done = [r for r in runs if r["status"] == FINISHED]
    cards = []
    best = min((r for r in done if r["val_ppl"] is not None), key=lambda r: r["val_ppl"], default=None)
    if best:
        cards.append(("lowest perplexity", fmt("val_ppl", best["val_ppl"]), best["label"]))
    fast = max((r for r in done if r["train_tokens_per_s"] is not None),
               key=lambda r: r["train_tokens_per_s"], default=None)
    if fast:
        cards.append(("fastest training", fmt("train_tokens_per_s", fast["train_tokens_per_s"]) + " tok/s",
                      fast["label"]))
    small = min((r for r in runs if r["kv_cache_bytes_per_token"] is not None),
                key=lambda r: r["kv_cache_bytes_per_token"], default=None)
    if small:
        cards.append(("smallest KV cache", fmt("kv_cache_bytes_per_token", small["kv_cache_bytes_per_token"])
                      + "/token", small["label"]))
    cards.append(("runs", f"{len(done)} ok / {len(runs)}",
                  f"{len(runs) - len(done)} did not finish" if len(done) < len(runs) else "all finished"))
    common = ", ".join(f"{k}={v}" for k, v in report["common"].items())
    return (f'<header><h1>{_e(report["title"])}</h1>'
            f'<p class="meta">{len(runs)} runs from {_e(", ".join(report["dirs"]))} · generated '
            f'{_e(report["generated_at"])}</p><div class="cards">'
            + "".join(f'<div class="card"><div class="k">{_e(k)}</div><div class="v">{_e(v)}</div>'
                      f'<div class="s">{_e(s)}</div></div>' for k, v, s in cards)
            + "</div>" + (f'<p class="common">Common to all runs: {_e(common)}</p>' if common else "")
            + "</header>")


def _badge(status) -> str:
    return f'<span class="badge {_e(status)}">{_e(status)}</span>'


def _runs_table(report) -> str:
    vcols, mcols = report["variant_columns"], report["metric_columns"]
    head = ('<tr><th data-type="text">run</th><th data-type="text">status</th>'
            + "".join(f'<th data-type="text">{_e(c)}</th>' for c in vcols)
            + "".join(f'<th data-type="num" class="num">{_e(h)}</th>' for _, h in mcols) + "</tr>")
    body = []
    for r in report["runs"]:
        star = '<span class="star" title="on the Pareto front">★</span> ' if r["pareto"] else ""
        cells = [f'<td data-v="{_e(r["label"])}">{star}<span class="swatch" style="background:'
                 f'{report["colors"][r["variant_label"]]}"></span>{_e(r["label"])}'
                 f'<div class="path" title="{_e(r["id"])}">{_e(r["name"])}</div></td>',
                 f'<td data-v="{_e(r["status"])}">{_badge(r["status"])}</td>']
        cells += [f'<td>{_e(r["variant"].get(c))}</td>' for c in vcols]
        for k, _ in mcols:
            est = k == "kv_cache_bytes_per_token" and r.get("kv_estimated") and r[k] is not None
            cells.append(f'<td class="num" data-v="{"" if r[k] is None else r[k]}"'
                         f'{" title=computed&#32;from&#32;the&#32;config" if est else ""}>'
                         f'{_e(fmt(k, r[k]))}{"*" if est else ""}</td>')
        body.append(f'<tr class="{"" if r["status"] == FINISHED else "dnf"}">' + "".join(cells) + "</tr>")
    note = ('<p class="hint">* computed from the config (the run was not benchmarked).</p>'
            if any(r.get("kv_estimated") for r in report["runs"]) else "")
    return ('<section id="runs"><h2>Runs</h2><p class="hint">Click a heading to sort. ★ marks the Pareto '
            'front: no other run has both lower perplexity and higher training throughput.</p>'
            f'<div class="table-wrap"><table class="sortable" id="runs-table"><thead>{head}</thead>'
            f'<tbody>{"".join(body)}</tbody></table></div>{note}</section>')


def _not_finished(report) -> str:
    if not report["not_finished"]:
        return ""
    items = "".join(f'<li>{_badge(r["status"])} <b>{_e(r["label"])}</b> <span class="path">{_e(r["id"])}</span>'
                    f'<pre>{_e(r["error"] or "no error recorded")}</pre></li>' for r in report["not_finished"])
    return (f'<section id="not-finished"><h2>Runs that did not finish ({len(report["not_finished"])})</h2>'
            f'<ul class="dnf-list">{items}</ul></section>')


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
            f'<td class="num">{"best" if c["delta_ppl"] == 0 else "+" + format(c["delta_ppl"], ".2f")}</td>'
            f'<td class="num">{_e(fmt_interval(c, "train_tokens_per_s"))}</td></tr>' for c in fam["choices"])
        blocks.append(
            f'<div class="effect"><h3>{_e(family_title(fam))}</h3><div class="grid2">'
            '<table class="effects"><thead><tr><th>choice</th><th class="num">runs</th><th class="num">seeds'
            '</th><th class="num">val loss</th><th class="num">val ppl</th><th class="num">Δ ppl</th>'
            f'<th class="num">train tok/s</th></tr></thead><tbody>{rows}</tbody></table>'
            f'<figure class="chart small" data-chart="effect" data-index="{i}"></figure></div></div>')
    return ('<section id="effects"><h2>Effect of each choice</h2><p class="hint">For each family, the mean '
            'over the finished runs with that choice (averaged per seed, then across seeds, so the other '
            'families are averaged out); with several seeds, [95% t-interval across seeds]. Δ ppl is '
            'against the family\'s best choice.</p>' + "".join(blocks) + "</section>")


CURVES = """<section id="curves"><h2>Loss curves</h2><p class="hint">Against training tokens; one colour per
variant (seeds share it; dotted: did not finish). Click a legend entry to hide or show it; hover for values.</p>
<div class="grid2">
<figure class="chart" data-chart="curves" data-kind="val"><figcaption>validation loss</figcaption></figure>
<figure class="chart" data-chart="curves" data-kind="train"><figcaption>training loss</figcaption></figure>
</div></section>"""

MEMORY = """<section id="memory"><h2>Memory</h2><p class="hint">By variant (mean over its runs). Hatched and
starred: computed from the config, because no run of that variant was benchmarked.</p><div class="grid2">
<figure class="chart" data-chart="bars" data-key="peak_memory_bytes"><figcaption>peak memory</figcaption></figure>
<figure class="chart" data-chart="bars" data-key="kv_cache_bytes_per_token"><figcaption>KV-cache bytes per token
</figcaption></figure></div></section>"""


def _pareto(report) -> str:
    front = sorted((r for r in report["runs"] if r["pareto"]), key=lambda r: r["val_ppl"])
    rows = "".join(f'<tr><td><span class="swatch" style="background:{report["colors"][r["variant_label"]]}">'
                   f'</span>{_e(r["label"])}</td><td class="num">{_e(fmt("val_ppl", r["val_ppl"]))}</td>'
                   f'<td class="num">{_e(fmt("train_tokens_per_s", r["train_tokens_per_s"]))}</td></tr>'
                   for r in front)
    table = ('<table class="front"><thead><tr><th>Pareto front</th><th class="num">val ppl</th>'
             f'<th class="num">train tok/s</th></tr></thead><tbody>{rows}</tbody></table>' if front else "")
    return ('<section id="pareto"><h2>Quality vs speed</h2><p class="hint">Validation perplexity against '
            'training throughput; the dashed line joins the Pareto front (ringed points): each is the '
            'lowest perplexity at its speed or faster. Lower right is better.</p><div class="grid2 wide-left">'
            '<figure class="chart" data-chart="pareto"><figcaption>perplexity vs training tokens/s</figcaption>'
            f'</figure>{table}</div></section>')


HEAD = """<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1"><title>{title}</title>
<script>window.reportErrors = [];
window.addEventListener("error", function (e) {
  window.reportErrors.push(String(e.message || e));
  document.documentElement.setAttribute("data-errors", JSON.stringify(window.reportErrors));
});</script>
<style>
:root { --fg: #1f2328; --muted: #656d76; --line: #d8dee4; --bg: #f6f8fa; --accent: #4e79a7; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       color: var(--fg); margin: 0 auto; max-width: 1320px; padding: 24px 28px 40px; }
h1 { font-size: 26px; margin: 0 0 4px; } h2 { font-size: 19px; margin: 34px 0 6px; border-bottom: 1px solid
var(--line); padding-bottom: 4px; } h3 { font-size: 15px; margin: 18px 0 6px; }
.meta, .hint, .common, .path, figcaption { color: var(--muted); } .hint { margin: 2px 0 10px; font-size: 13px; }
.cards { display: flex; gap: 12px; flex-wrap: wrap; margin: 14px 0 8px; }
.card { flex: 1 1 200px; border: 1px solid var(--line); border-radius: 8px; padding: 10px 14px; background: var(--bg); }
.card .k { font-size: 12px; text-transform: uppercase; letter-spacing: .04em; color: var(--muted); }
.card .v { font-size: 22px; font-weight: 600; } .card .s { font-size: 12px; color: var(--muted); }
.table-wrap { overflow-x: auto; border: 1px solid var(--line); border-radius: 8px; }
table { border-collapse: collapse; width: 100%; font-size: 13px; font-variant-numeric: tabular-nums; }
th, td { padding: 5px 8px; border-bottom: 1px solid var(--line); text-align: left; white-space: nowrap; vertical-align: top; }
th { background: var(--bg); font-weight: 600; position: sticky; top: 0; white-space: normal; vertical-align: bottom; }
#runs-table { font-size: 12.5px; } #runs-table th.num { min-width: 64px; }
.sortable th { cursor: pointer; user-select: none; } .sortable th:hover { background: #eaeef2; }
th[aria-sort=ascending]::after { content: " ▲"; font-size: 10px; } th[aria-sort=descending]::after { content: " ▼"; font-size: 10px; }
.num { text-align: right; } tbody tr:hover { background: #f3f6f9; } tr.dnf td { color: var(--muted); }
.path { font-size: 11px; } .star { color: #b8860b; } .swatch { display: inline-block; width: 10px; height: 10px;
  border-radius: 2px; margin-right: 6px; vertical-align: -1px; }
.badge { display: inline-block; padding: 0 7px; border-radius: 10px; font-size: 12px; font-weight: 600;
  background: #ddd; color: #333; } .badge.ok { background: #dafbe1; color: #116329; }
.badge.failed, .badge.unreadable { background: #ffebe9; color: #a40e26; } .badge.oom { background: #fff1e5; color: #953800; }
.badge.interrupted { background: #eaeef2; color: #424a53; } .badge.running { background: #ddf4ff; color: #0550ae; }
.dnf-list { list-style: none; padding: 0; } .dnf-list li { margin: 0 0 10px; }
.dnf-list pre { margin: 4px 0 0; padding: 6px 10px; background: var(--bg); border-radius: 6px; white-space: pre-wrap;
  font-size: 12px; max-height: 7em; overflow: auto; }
.grid2 { display: grid; grid-template-columns: 1fr 1fr; gap: 18px; align-items: start; }
.grid2.wide-left { grid-template-columns: 3fr 2fr; } .effect .grid2 { grid-template-columns: 3fr 2fr; }
@media (max-width: 860px) { .grid2, .grid2.wide-left, .effect .grid2 { grid-template-columns: 1fr; } }
figure.chart { margin: 0; border: 1px solid var(--line); border-radius: 8px; padding: 8px 10px 6px; }
figcaption { font-size: 13px; font-weight: 600; color: var(--fg); }
figure svg { width: 100%; height: auto; display: block; } svg text { font: 11px system-ui, sans-serif; fill: #555; }
svg .grid line { stroke: #eceff2; } svg .axis line, svg .axis path { stroke: #aab; }
.legend { display: flex; flex-wrap: wrap; gap: 4px 12px; font-size: 12px; margin-top: 4px; }
.legend span { cursor: pointer; } .legend span.off { opacity: .35; text-decoration: line-through; }
.empty { color: var(--muted); font-size: 13px; padding: 30px 0; text-align: center; }
table.effects, table.front { border: 1px solid var(--line); }
footer { margin-top: 40px; color: var(--muted); font-size: 12px; }
</style></head><body>"""

SCRIPT = r"""
(function () {
  "use strict";
  var DATA = JSON.parse(document.getElementById("report-data").textContent);
  var NS = "http://www.w3.org/2000/svg", WIDTH = 560, HEIGHT = 320, M = {l: 58, r: 16, t: 12, b: 40};

  function el(tag, attrs, parent, text) {
    var node = document.createElementNS(NS, tag);
    for (var k in attrs) node.setAttribute(k, attrs[k]);
    if (text !== undefined) node.textContent = text;
    if (parent) parent.appendChild(node);
    return node;
  }
  function fmt(x) {
    var a = Math.abs(x);
    if (a >= 1e9) return (x / 1e9).toFixed(1) + "G";
    if (a >= 1e6) return (x / 1e6).toFixed(1) + "M";
    if (a >= 1e4) return (x / 1e3).toFixed(0) + "k";
    if (a >= 1e3) return (x / 1e3).toFixed(1) + "k";
    if (a >= 100 || a === 0) return x.toFixed(0);
    if (a >= 10) return x.toFixed(1);
    return x.toFixed(a >= 1 ? 2 : 3);
  }
  function fmtBytes(x) {
    var units = [["GiB", 1073741824], ["MiB", 1048576], ["KiB", 1024]];
    for (var i = 0; i < units.length; i++) if (x >= units[i][1]) return (x / units[i][1]).toFixed(1) + " " + units[i][0];
    return x.toFixed(0) + " B";
  }
  function ticks(lo, hi, n) {
    var span = hi - lo || Math.abs(hi) || 1, step = Math.pow(10, Math.floor(Math.log10(span / n)));
    var err = n / span * step;
    if (err <= 0.15) step *= 10; else if (err <= 0.35) step *= 5; else if (err <= 0.75) step *= 2;
    var out = [];
    for (var v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(+v.toFixed(12));
    out.step = step;
    return out;
  }
  // Tick labels with as many decimals as the tick step needs (0.01 → "5.62", 50 → "350", 500 → "1.5k").
  function tickLabel(t, step) {
    var scale = Math.abs(step) >= 1e6 || Math.abs(t) >= 1e6 ? [1e6, "M"] : Math.abs(step) >= 100 && Math.abs(t) >= 1e3 ? [1e3, "k"] : [1, ""];
    var digits = Math.max(0, -Math.floor(Math.log10(step / scale[0]) + 1e-9));
    return (t / scale[0]).toFixed(Math.min(digits, 6)) + scale[1];
  }
  function extent(values, pad) {
    var lo = Math.min.apply(null, values), hi = Math.max.apply(null, values);
    if (lo === hi) { lo -= Math.abs(lo) * 0.05 || 1; hi += Math.abs(hi) * 0.05 || 1; }
    var p = (hi - lo) * pad;
    return [lo - p, hi + p];
  }
  // Axes and grid for numeric x and y; returns scales and the plot group.
  function frame(fig, xd, yd, xLabel, yLabel, size) {
    var W = (size || [WIDTH, HEIGHT])[0], H = (size || [WIDTH, HEIGHT])[1];
    var svg = el("svg", {viewBox: "0 0 " + W + " " + H, role: "img"});
    fig.appendChild(svg);
    var x = function (v) { return M.l + (v - xd[0]) / (xd[1] - xd[0]) * (W - M.l - M.r); };
    var y = function (v) { return H - M.b - (v - yd[0]) / (yd[1] - yd[0]) * (H - M.t - M.b); };
    var grid = el("g", {"class": "grid"}, svg), axis = el("g", {"class": "axis"}, svg);
    var xt = ticks(xd[0], xd[1], 6), yt = ticks(yd[0], yd[1], 5);
    xt.forEach(function (t) {
      el("line", {x1: x(t), x2: x(t), y1: M.t, y2: H - M.b}, grid);
      el("text", {x: x(t), y: H - M.b + 15, "text-anchor": "middle"}, axis, tickLabel(t, xt.step));
    });
    yt.forEach(function (t) {
      el("line", {x1: M.l, x2: W - M.r, y1: y(t), y2: y(t)}, grid);
      el("text", {x: M.l - 6, y: y(t) + 4, "text-anchor": "end"}, axis, tickLabel(t, yt.step));
    });
    el("path", {d: "M" + M.l + "," + M.t + "V" + (H - M.b) + "H" + (W - M.r), fill: "none"}, axis);
    el("text", {x: (M.l + W - M.r) / 2, y: H - 6, "text-anchor": "middle"}, axis, xLabel);
    el("text", {x: 14, y: (M.t + H - M.b) / 2, "text-anchor": "middle",
                transform: "rotate(-90 14 " + (M.t + H - M.b) / 2 + ")"}, axis, yLabel);
    return {svg: svg, x: x, y: y, plot: el("g", {"class": "plot"}, svg)};
  }
  // Legend entries toggle every SVG element tagged with their variant.
  function legend(fig, svg, labels) {
    var box = document.createElement("div");
    box.className = "legend";
    labels.forEach(function (label) {
      var item = document.createElement("span");
      item.innerHTML = '<i class="swatch"></i>';
      item.firstChild.style.background = DATA.colors[label];
      item.appendChild(document.createTextNode(label));
      item.addEventListener("click", function () {
        var off = item.classList.toggle("off");
        svg.querySelectorAll("[data-variant]").forEach(function (node) {
          if (node.getAttribute("data-variant") === label) node.style.display = off ? "none" : "";
        });
      });
      box.appendChild(item);
    });
    fig.appendChild(box);
  }
  function empty(fig, message) {
    var p = document.createElement("div");
    p.className = "empty";
    p.textContent = message;
    fig.appendChild(p);
    fig.setAttribute("data-rendered", "empty");
  }
  function unique(list) { return list.filter(function (v, i) { return list.indexOf(v) === i; }); }

  function curves(fig) {
    var kind = fig.getAttribute("data-kind"), series = [];
    DATA.runs.forEach(function (r) {
      var pts = ((r.curves || {})[kind] || []).filter(function (p) { return p.loss !== null && p.loss !== undefined; });
      if (pts.length) series.push({run: r, pts: pts.map(function (p) {
        return [p.tokens !== null && p.tokens !== undefined ? p.tokens : p.step, p.loss, p.step]; })});
    });
    if (!series.length) return empty(fig, "no " + kind + " curves recorded");
    var xs = [], ys = [];
    series.forEach(function (s) { s.pts.forEach(function (p) { xs.push(p[0]); ys.push(p[1]); }); });
    var f = frame(fig, [Math.min(0, Math.min.apply(null, xs)), Math.max.apply(null, xs)], extent(ys, 0.06),
                  "training tokens", kind === "val" ? "validation loss" : "training loss");
    series.forEach(function (s) {
      var color = DATA.colors[s.run.variant_label], g = el("g", {"data-variant": s.run.variant_label}, f.plot);
      var d = s.pts.map(function (p, i) { return (i ? "L" : "M") + f.x(p[0]).toFixed(1) + "," + f.y(p[1]).toFixed(1); }).join("");
      var line = el("path", {d: d, fill: "none", stroke: color, "stroke-width": 1.8, "class": "series",
                             "stroke-dasharray": s.run.status === "ok" ? "" : "4 3"}, g);
      el("title", {}, line, s.run.label + " (" + s.run.status + ")");
      if (s.pts.length <= 30) s.pts.forEach(function (p) {
        var c = el("circle", {cx: f.x(p[0]), cy: f.y(p[1]), r: 2.6, fill: color}, g);
        el("title", {}, c, s.run.label + "\nstep " + p[2] + " · " + fmt(p[0]) + " tokens · loss " + p[1].toFixed(4));
      });
    });
    legend(fig, f.svg, unique(series.map(function (s) { return s.run.variant_label; })));
    fig.setAttribute("data-rendered", "true");
  }

  function pareto(fig) {
    var runs = DATA.runs.filter(function (r) { return r.status === "ok" && r.val_ppl !== null && r.train_tokens_per_s !== null; });
    if (!runs.length) return empty(fig, "no finished run has both perplexity and throughput");
    var f = frame(fig, extent(runs.map(function (r) { return r.train_tokens_per_s; }), 0.08),
                  extent(runs.map(function (r) { return r.val_ppl; }), 0.08), "training tokens/s", "validation perplexity",
                  [620, 360]);
    var front = runs.filter(function (r) { return r.pareto; }).sort(function (a, b) { return a.train_tokens_per_s - b.train_tokens_per_s; });
    el("path", {d: front.map(function (r, i) { return (i ? "L" : "M") + f.x(r.train_tokens_per_s) + "," + f.y(r.val_ppl); }).join(""),
                fill: "none", stroke: "#333", "stroke-width": 1.2, "stroke-dasharray": "5 4", "class": "front-line"}, f.plot);
    runs.forEach(function (r) {
      var c = el("circle", {cx: f.x(r.train_tokens_per_s), cy: f.y(r.val_ppl), r: r.pareto ? 6 : 4.5, "class": "point",
                            fill: DATA.colors[r.variant_label], stroke: r.pareto ? "#111" : "#fff", "stroke-width": r.pareto ? 1.8 : 1,
                            "data-variant": r.variant_label}, f.plot);
      el("title", {}, c, r.label + "\nppl " + r.val_ppl.toFixed(2) + " · " + fmt(r.train_tokens_per_s) + " tok/s" + (r.pareto ? "\nPareto front" : ""));
    });
    legend(fig, f.svg, unique(runs.map(function (r) { return r.variant_label; })));
    fig.setAttribute("data-rendered", "true");
  }

  function bars(fig) {
    // mean per variant; a variant's measured values win over values computed from its config
    var key = fig.getAttribute("data-key"), sums = {}, counts = {}, est = {}, order = [], W = WIDTH;
    DATA.runs.forEach(function (r) {
      if (r[key] === null || r[key] === undefined) return;
      var v = r.variant_label, estimated = key === "kv_cache_bytes_per_token" && !!r.kv_estimated;
      if (!(v in sums)) { order.push(v); est[v] = true; }
      if (est[v] && !estimated) { sums[v] = 0; counts[v] = 0; est[v] = false; }
      if (est[v] !== estimated) return;
      sums[v] = (sums[v] || 0) + r[key]; counts[v] = (counts[v] || 0) + 1;
    });
    if (!order.length) return empty(fig, "not measured (runs without a benchmark: train.bench=false)");
    var rowH = 26, labelW = 190, h = M.t + rowH * order.length + 8, max = 0;
    order.forEach(function (v) { max = Math.max(max, sums[v] / counts[v]); });
    var svg = el("svg", {viewBox: "0 0 " + W + " " + h, role: "img"});
    fig.appendChild(svg);
    var defs = el("defs", {}, svg), pat = el("pattern", {id: "hatch-" + key, width: 6, height: 6,
      patternUnits: "userSpaceOnUse", patternTransform: "rotate(45)"}, defs);
    el("rect", {width: 6, height: 6, fill: "#fff", "fill-opacity": 0.0}, pat);
    el("line", {x1: 0, y1: 0, x2: 0, y2: 6, stroke: "#fff", "stroke-width": 2, "stroke-opacity": 0.55}, pat);
    order.forEach(function (v, i) {
      var value = sums[v] / counts[v], y = M.t + i * rowH, w = (W - labelW - 90) * value / (max || 1);
      var g = el("g", {"class": "bar", "data-variant": v}, svg);
      el("text", {x: labelW - 8, y: y + rowH / 2 + 4, "text-anchor": "end"}, g, v.length > 30 ? v.slice(0, 29) + "…" : v);
      var rect = el("rect", {x: labelW, y: y + 4, width: Math.max(w, 1), height: rowH - 8, rx: 2, fill: DATA.colors[v]}, g);
      if (est[v]) el("rect", {x: labelW, y: y + 4, width: Math.max(w, 1), height: rowH - 8, fill: "url(#hatch-" + key + ")"}, g);
      el("title", {}, rect, v + ": " + fmtBytes(value) + (est[v] ? " (computed from the config)" : ""));
      el("text", {x: labelW + w + 6, y: y + rowH / 2 + 4}, g, fmtBytes(value) + (est[v] ? "*" : ""));
    });
    fig.setAttribute("data-rendered", "true");
  }

  // Forest plot: each choice's mean perplexity with its 95% interval across seeds.
  function effect(fig) {
    var fam = DATA.effects[+fig.getAttribute("data-index")], cs = fam.choices;
    var values = [];
    cs.forEach(function (c) { values.push(c.val_ppl); if (c.val_ppl_lo !== null) values.push(c.val_ppl_lo, c.val_ppl_hi); });
    var W = 380, rowH = 26, labelW = 110, h = M.t + rowH * cs.length + 40, d = extent(values, 0.1);
    var svg = el("svg", {viewBox: "0 0 " + W + " " + h, role: "img"});
    fig.appendChild(svg);
    var x = function (v) { return labelW + (v - d[0]) / (d[1] - d[0]) * (W - labelW - 20); };
    var axis = el("g", {"class": "axis"}, svg), grid = el("g", {"class": "grid"}, svg);
    var dt = ticks(d[0], d[1], 5);
    dt.forEach(function (t) {
      el("line", {x1: x(t), x2: x(t), y1: M.t, y2: h - 32}, grid);
      el("text", {x: x(t), y: h - 18, "text-anchor": "middle"}, axis, tickLabel(t, dt.step));
    });
    cs.forEach(function (c, i) {
      var y = M.t + i * rowH + rowH / 2, g = el("g", {"class": "effect-row"}, svg), name = String(c.choice === null ? "–" : c.choice);
      el("text", {x: labelW - 8, y: y + 4, "text-anchor": "end"}, g, name.length > 18 ? name.slice(0, 17) + "…" : name);
      if (c.val_ppl_lo !== null) {
        el("line", {x1: x(c.val_ppl_lo), x2: x(c.val_ppl_hi), y1: y, y2: y, stroke: "#888", "stroke-width": 1.5}, g);
        [c.val_ppl_lo, c.val_ppl_hi].forEach(function (v) { el("line", {x1: x(v), x2: x(v), y1: y - 5, y2: y + 5, stroke: "#888"}, g); });
      }
      var dot = el("circle", {cx: x(c.val_ppl), cy: y, r: 5, fill: i === 0 ? "#59a14f" : "#4e79a7"}, g);
      el("title", {}, dot, name + ": ppl " + c.val_ppl.toFixed(2) + (c.val_ppl_lo !== null ? " [" + c.val_ppl_lo.toFixed(2) + ", " +
         c.val_ppl_hi.toFixed(2) + "]" : "") + " · " + c.runs + " runs, " + c.seeds + " seeds");
    });
    el("text", {x: (labelW + W) / 2, y: h - 3, "text-anchor": "middle"}, axis, "validation perplexity");
    fig.setAttribute("data-rendered", "true");
  }

  // Sortable tables: click a heading; numbers sort numerically, blanks last.
  function sortable(table) {
    var heads = table.querySelectorAll("thead th");
    heads.forEach(function (th, col) {
      th.addEventListener("click", function () {
        var asc = th.getAttribute("aria-sort") !== "ascending", num = th.getAttribute("data-type") === "num";
        heads.forEach(function (h) { h.removeAttribute("aria-sort"); });
        th.setAttribute("aria-sort", asc ? "ascending" : "descending");
        var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
        var key = function (row) {
          var cell = row.cells[col], v = cell.hasAttribute("data-v") ? cell.getAttribute("data-v") : cell.textContent.trim();
          return num ? (v === "" ? null : parseFloat(v)) : (v === "–" ? null : v.toLowerCase());
        };
        rows.sort(function (a, b) {
          var ka = key(a), kb = key(b);
          if (ka === null || kb === null) return ka === kb ? 0 : ka === null ? 1 : -1;
          var c = num ? ka - kb : ka.localeCompare(kb, undefined, {numeric: true});
          return asc ? c : -c;
        });
        rows.forEach(function (row) { body.appendChild(row); });
      });
    });
  }

  var draw = {curves: curves, pareto: pareto, bars: bars, effect: effect};
  document.querySelectorAll("figure[data-chart]").forEach(function (fig) { draw[fig.getAttribute("data-chart")](fig); });
  document.querySelectorAll("table.sortable").forEach(sortable);
  document.documentElement.setAttribute("data-ready", "true");
})();
"""
