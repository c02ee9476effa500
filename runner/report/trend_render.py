"""The trends section of the compare report (runner/report/trends.py's numbers) in Markdown, HTML (with a
log-log ladder chart drawn here as inline SVG: no script needed) and PNG."""
import html
import math

import numpy as np

from runner.report.trends import EXTRAPOLATION_LIMIT, fit_line, predict, trend_line

INTRO = ("Validation loss against training compute, from each run's cooldown points (train.cooldowns) and final "
         "loss. Fits per variant: L = E + A·(C/C0)^-α where four or more budgets support it, else a line in "
         "log C; 95% intervals by bootstrap over seeds. Per family: the gap to the reference, paired by seed "
         "and budget; its slope per decade of FLOPs with a 95% t-interval over the seeds' own slopes; a "
         f"crossover is an extrapolation past the largest budget and refused beyond {EXTRAPOLATION_LIMIT:g}x it.")


def _holm_note(report) -> str:
    h, t = report.get("holm") or {}, report.get("trends") or {}
    parts = []
    if h.get("comparisons"):
        parts.append(f"{h['comparisons']} comparisons at the compared budget")
    if t.get("comparisons"):
        parts.append(f"{t['comparisons']} trend slopes")
    return ("Holm-adjusted (family-wise 5%) over " + " and over ".join(parts) + ".") if parts else ""


def holm_lines(report) -> list[str]:
    """Per-comparison verdicts beside their Holm-adjusted ones."""
    return [f"{v['choice']} vs {v['reference']} ({v['family']}): p {v['p']:.3g}, Holm p {v['p_holm']:.3g}: "
            f"{v['verdict_holm']} (per comparison: {v['verdict']})"
            for v in report["verdicts"] if v.get("p_holm") is not None]


def sensitivity_lines(report) -> list[str]:
    return [f"{s['variant_label']}: best loss {s['best_loss']:.4f} at lr {s['best_lr']:g}; mean excess over "
            f"its best across {s['grid']} learning rates {s['mean_excess']:+.4f}" for s in report.get("lr_sensitivity") or []]


def trends_markdown(report) -> list[str]:
    t = report.get("trends") or {}
    lines = []
    if t:
        lines += ["", "## Trends as compute grows", "", INTRO, ""]
        lines += [f"- {trend_line(g)}" for g in t["gaps"]] or ["- no family has pairs at two or more budgets"]
        lines += ["", "Fits:", ""] + [f"- {fit_line(v, f)}" for v, f in t["fits"].items()]
    if holm_lines(report):
        lines += ["", "## Many comparisons", "", _holm_note(report), ""] + [f"- {x}" for x in holm_lines(report)]
    if sensitivity_lines(report):
        lines += ["", "## Learning-rate sensitivity", "", "Mean excess loss over each variant's best lr across the "
                  "grid (Wortsman et al. 2023): lower is more robust.", ""]
        lines += [f"- {x}" for x in sensitivity_lines(report)]
    return lines


def trends_html(report) -> str:
    t = report.get("trends") or {}
    e = html.escape
    out = []
    if t:
        out.append('<section id="trends"><h2>Trends as compute grows</h2><p class="hint">' + e(INTRO) + "</p>"
                   + '<ul class="verdicts">' + "".join(f"<li>{e(trend_line(g))}</li>" for g in t["gaps"]) + "</ul>"
                   + '<figure class="chart" data-chart="ladder" data-rendered="server"><figcaption>validation loss '
                   'vs training FLOPs (log-log): seed means and fits</figcaption>' + ladder_svg(report) + "</figure>"
                   + "<ul>" + "".join(f"<li>{e(fit_line(v, f))}</li>" for v, f in t["fits"].items()) + "</ul></section>")
    if holm_lines(report):
        out.append('<section id="holm"><h2>Many comparisons</h2><p class="hint">' + e(_holm_note(report)) + "</p><ul>"
                   + "".join(f"<li>{e(x)}</li>" for x in holm_lines(report)) + "</ul></section>")
    if sensitivity_lines(report):
        out.append('<section id="lr-sensitivity"><h2>Learning-rate sensitivity</h2><ul>'
                   + "".join(f"<li>{e(x)}</li>" for x in sensitivity_lines(report)) + "</ul></section>")
    return "\n".join(out)


def _curve(fit, lo, hi, n=40):
    xs = np.geomspace(lo, hi, n)
    return xs, predict(fit, xs)


def ladder_svg(report, width=640, height=340, pad=(56, 16, 20, 40)) -> str:
    """Log-log axes; per variant its seed-mean points and its fitted curve, in the variant's colour."""
    fits = report["trends"]["fits"]
    xs = [x for f in fits.values() for x in f["flops"]]
    ys = [y for f in fits.values() for y in f["loss"]]
    lx0, lx1 = math.log10(min(xs)) - 0.05, math.log10(max(xs)) + 0.05
    ly0, ly1 = math.log10(min(ys)) - 0.01, math.log10(max(ys)) + 0.01
    left, right, top, bottom = pad
    sx = lambda x: left + (math.log10(x) - lx0) / (lx1 - lx0) * (width - left - right)
    sy = lambda y: top + (ly1 - math.log10(max(y, 1e-9))) / (ly1 - ly0) * (height - top - bottom)
    parts = [f'<svg viewBox="0 0 {width} {height}" role="img" aria-label="loss vs compute">',
             f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" stroke="#999"/>',
             f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" stroke="#999"/>']
    for e10 in range(math.ceil(lx0 * 2), math.floor(lx1 * 2) + 1):  # ticks every half decade
        x = 10 ** (e10 / 2)
        parts.append(f'<text x="{sx(x):.1f}" y="{height - bottom + 14}" text-anchor="middle">{x:.1g}</text>')
    for y in np.linspace(10 ** ly0, 10 ** ly1, 5):
        parts.append(f'<text x="{left - 4}" y="{sy(y) + 4:.1f}" text-anchor="end">{y:.2f}</text>')
    parts.append(f'<text x="{(left + width - right) / 2}" y="{height - 4}" text-anchor="middle">training FLOPs</text>')
    for i, (label, f) in enumerate(fits.items()):
        colour = report["colors"].get(label, "#555")
        cx, cy = _curve(f, min(f["flops"]), max(f["flops"]))
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in zip(cx, cy))
        parts.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="1.5"/>')
        parts += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3.5" fill="{colour}"/>'
                  for x, y in zip(f["flops"], f["loss"])]
        parts.append(f'<text x="{width - right - 4}" y="{top + 12 + 14 * i}" text-anchor="end" style="fill:{colour}">'
                     f'{html.escape(label)} ({f["kind"]})</text>')
    return "".join(parts) + "</svg>"


def plot_ladder(report, path):
    """ladder.png: the same chart with matplotlib (log-log)."""
    t = report.get("trends") or {}
    if not t.get("fits"):
        return None
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for label, f in t["fits"].items():
        colour = report["colors"].get(label, "#555")
        cx, cy = _curve(f, min(f["flops"]), max(f["flops"]))
        ax.plot(cx, cy, color=colour, linewidth=1.4, label=f"{label} ({f['kind']})")
        ax.plot(f["flops"], f["loss"], "o", color=colour, markersize=4)
    ax.set(xscale="log", yscale="log", xlabel="training FLOPs", ylabel="validation loss",
           title="loss vs compute: seed means and fits")
    from matplotlib.ticker import FormatStrFormatter
    ax.yaxis.set_major_formatter(FormatStrFormatter("%.1f"))  # loss values, not powers of ten
    ax.yaxis.set_minor_formatter(FormatStrFormatter("%.1f"))
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
