"""The compare report's plots as PNGs (matplotlib, Agg: no display needed), for papers and READMEs.

Each function takes the report dict built by runner.report.build_report and returns the file it wrote,
or None when the runs hold nothing to plot (e.g. no benchmark numbers)."""
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import EngFormatter  # noqa: E402

from runner.report.format import FINISHED, fmt  # noqa: E402
from runner.report.telemetry import SERIES  # noqa: E402
from runner.report.trend_render import plot_ladder  # noqa: E402

STYLE = {"figure.dpi": 110, "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True,
         "grid.alpha": 0.3, "font.size": 9, "axes.titlesize": 10, "legend.fontsize": 8, "legend.frameon": False}


def write_pngs(report: dict, out: Path) -> list[Path]:
    with plt.rc_context(STYLE):
        paths = [plot_curves(report, out / "curves.png"), plot_pareto(report, out / "pareto.png"),
                 plot_memory(report, out / "memory.png"), plot_effects(report, out / "effects.png"),
                 plot_ladder(report, out / "ladder.png"), plot_telemetry(report, out / "telemetry.png")]
    return [p for p in paths if p is not None]


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_curves(report, path):
    runs = [r for r in _compared(report) if any(r["curves"].get(k) for k in ("val", "train"))]
    if not runs:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=False)
    for ax, kind in zip(axes, ("val", "train")):
        seen = set()
        for r in runs:
            pts = [p for p in r["curves"].get(kind, []) if p.get("loss") is not None]
            if not pts:
                continue
            x = [p["tokens"] if p.get("tokens") is not None else p["step"] for p in pts]
            first = r["variant_label"] not in seen
            seen.add(r["variant_label"])
            ax.plot(x, [p["loss"] for p in pts], color=report["colors"][r["variant_label"]],
                    marker="o" if len(pts) < 8 else None, markersize=3, linewidth=1.4,
                    linestyle="-" if r["status"] == FINISHED else ":", alpha=0.9,
                    label=r["variant_short"] if first else None)
        ax.set(title=f"{'validation' if kind == 'val' else 'training'} loss", xlabel="training tokens",
               ylabel="loss")
        ax.xaxis.set_major_formatter(EngFormatter(sep=""))
    axes[0].legend(loc="upper right")
    return _save(fig, path)


def plot_telemetry(report, path):
    """The "Inside training" series (runner/report/telemetry.py) against steps, one line per run: a run that
    did not finish dotted and ended with an x, so the step where it stopped shows."""
    runs = [r for r in _compared(report) if r["curves"].get("telemetry")]
    if not runs:
        return None
    fig, axes = plt.subplots(1, len(SERIES), figsize=(4.2 * len(SERIES), 3.6))
    for ax, (key, title) in zip(axes, SERIES):
        seen = set()
        for r in runs:
            pts = [p for p in r["curves"]["telemetry"] if p.get(key) is not None]
            if not pts:
                continue
            first = r["variant_label"] not in seen
            seen.add(r["variant_label"])
            color, done = report["colors"][r["variant_label"]], r["status"] == FINISHED
            ax.plot([p["step"] for p in pts], [p[key] for p in pts], color=color, linewidth=1.2, alpha=0.85,
                    linestyle="-" if done else ":", label=r["variant_short"] if first else None)
            if not done:
                ax.plot(pts[-1]["step"], pts[-1][key], marker="x", color=color, markersize=6)
        ax.set(title=title, xlabel="training step")
    axes[0].legend(loc="best")
    return _save(fig, path)


def plot_pareto(report, path):
    cost = report["cost"]
    key = cost["key"]
    runs = [r for r in report["runs"] if r["status"] == FINISHED and not r["left_out"] and r["val_loss"] is not None
            and r[key] is not None]
    if not runs:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    front = sorted((r for r in runs if r["pareto"]), key=lambda r: r[key])
    ax.plot([r[key] for r in front], [r["val_loss"] for r in front], color="#333",
            linewidth=1, linestyle="--", label="Pareto front", zorder=1)
    seen = set()
    for r in runs:
        first = r["variant_label"] not in seen
        seen.add(r["variant_label"])
        ax.scatter(r[key], r["val_loss"], s=60 if r["pareto"] else 36, zorder=2,
                   color=report["colors"][r["variant_label"]], edgecolors="#111" if r["pareto"] else "none",
                   linewidths=1.2, label=r["variant_short"] if first else None)
    better = "higher" if cost["higher_is_better"] else "lower"
    ax.set(title=f"validation loss vs {cost['label']} ({better} cost axis is better)", xlabel=cost["label"],
           ylabel="validation loss")
    ax.xaxis.set_major_formatter(EngFormatter(sep=""))
    ax.legend(loc="best")
    return _save(fig, path)


def _compared(report) -> list[dict]:
    """Every plot shows the compared runs only; the others stay in the runs table."""
    return [r for r in report["runs"] if r.get("left_out") is None]


def _by_variant(report, key):
    """(mean, counted by the model rather than measured?) per variant; measured values win over computed ones."""
    values = defaultdict(lambda: ([], []))
    for r in _compared(report):
        if r[key] is not None:
            values[r["variant_label"]][bool(r.get("kv_estimated")) and key == "kv_cache_bytes_per_token"].append(r[key])
    return {v: (sum(m or e) / len(m or e), not m) for v, (m, e) in values.items()}


def plot_memory(report, path):
    panels = [(key, title, _by_variant(report, key)) for key, title in
              (("peak_memory_bytes", "peak memory"), ("kv_cache_bytes_per_token", "KV-cache bytes per token"))]
    panels = [p for p in panels if p[2]]
    if not panels:
        return None
    n = max(len(p[2]) for p in panels)
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 0.9 + 0.35 * n), squeeze=False)
    for ax, (key, title, values) in zip(axes[0], panels):
        names = list(values)[::-1]
        short = {r["variant_label"]: r["variant_short"] for r in _compared(report)}
        rows = list(range(len(names)))  # by position: two variants may share a short name
        bars = ax.barh(rows, [values[v][0] for v in names], color=[report["colors"][v] for v in names])
        ax.set_yticks(rows, [short[v] for v in names])
        labels = [fmt(key, values[v][0]) + ("*" if values[v][1] else "") for v in names]  # as on the page
        ax.bar_label(bars, labels=labels, padding=3, fontsize=8)
        ax.set_title(title + ("\n(*: counted by the model)" if any(values[v][1] for v in names) else ""))
        ax.set_xticks([])
        ax.grid(False)
        ax.margins(x=0.25)
    return _save(fig, path)


def plot_effects(report, path):
    fams = report["effects"]
    if not fams:
        return None
    from runner.report.format import family_title
    cols = min(3, len(fams))
    rows = (len(fams) + cols - 1) // cols
    height = max(len(f["choices"]) for f in fams)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, (0.8 + 0.35 * height) * rows), squeeze=False)
    for ax in axes.flat[len(fams):]:
        ax.set_visible(False)
    for ax, fam in zip(axes.flat, fams):
        choices = fam["choices"][::-1]
        y = range(len(choices))
        means = [c["val_loss"] for c in choices]
        err = [[c["val_loss"] - c["val_loss_lo"] if c["val_loss_lo"] is not None else 0 for c in choices],
               [c["val_loss_hi"] - c["val_loss"] if c["val_loss_hi"] is not None else 0 for c in choices]]
        ax.errorbar(means, y, xerr=err, fmt="o", color="#4e79a7", ecolor="#888", capsize=3)
        ax.set_yticks(list(y), [f"{'–' if c['choice'] is None else c['choice']} (n={c['runs']})" for c in choices])
        ax.set_title(family_title(fam))
        ax.set_xlabel("validation loss" + (" (95% CI over seeds)" if any(c["seeds"] > 1 for c in choices)
                                                 else ""))
        ax.margins(y=0.3)
    return _save(fig, path)
