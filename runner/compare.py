"""`python run.py task=compare`: which choices matter, and what do they cost?

Gathers every results.json under `compare.dirs` (default `outputs/`) and writes, into `compare.out`:
  report.html   one self-contained page (inline CSS/JS/SVG, no CDN): a sortable table of runs, loss curves,
                perplexity vs training tokens/s with the Pareto front, memory, and per-family effects
  report.md     the same table and effects as Markdown
  *.png         the plots (matplotlib, Agg) for papers and READMEs
With `compare.wandb=true` it also saves a W&B workspace for a sweep (runner/wandb_workspace.py).

Effects: for a family (norm, ffn, attention, ...) and one of its choices, the runs with that choice are
averaged per seed (which averages over the other families), then over seeds; with two or more seeds the
95% interval is mean ± t(0.975, k-1) · sd / sqrt(k) over the k per-seed means.
"""
import json
import math
import statistics
import time
from collections import defaultdict
from pathlib import Path

from omegaconf import DictConfig

# The variant fields a comparison groups by, in label order (earlier fields name a run first).
FAMILIES = ("preset", "norm", "norm_position", "ffn", "position", "attention", "n_heads", "n_kv_heads",
            "kernel", "window", "attention_schedule", "d_model", "n_layers", "seq_len")
FINISHED = "ok"
# Tableau 10: one colour per variant, shared by the HTML charts and the PNGs (seeds share their variant's).
PALETTE = ("#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7",
           "#9c755f", "#bab0ac")
# Per-run numbers shown in the table: (key, heading, where in results.json).
METRICS = (("params", "params", ("params",)),
           ("val_loss", "val loss", ("metrics", "val_loss")),
           ("val_ppl", "val ppl", ("metrics", "val_ppl")),
           ("final_train_loss", "train loss", ("metrics", "final_train_loss")),
           ("train_tokens_per_s", "train tok/s", ("metrics", "train_tokens_per_s")),
           ("mfu", "MFU", ("metrics", "mfu")),
           ("decode_tokens_per_s", "decode tok/s", ("bench", "decode_tokens_per_s")),
           ("peak_memory_bytes", "peak memory", ("bench", "peak_memory_bytes")),
           ("kv_cache_bytes_per_token", "KV bytes/token", ("bench", "kv_cache_bytes_per_token")))


def main(cfg: DictConfig):
    c = cfg.compare
    if c.get("wandb"):
        from runner.wandb_workspace import require_api_key
        require_api_key()  # before anything is read or written
    dirs = [c.dirs] if isinstance(c.dirs, str) else list(c.dirs)
    runs = gather(dirs)
    if not runs:
        raise FileNotFoundError(f"compare: no results.json under {dirs}; train something first "
                                f"(`python run.py` or `python run.py -m +experiment=attention`)")
    from runner.tracking import output_dir
    out = Path(c.out) if c.get("out") else output_dir()
    report = build_report(runs, dirs)
    written = write_report(report, out, png=c.get("png", True))
    n_ok = sum(r["status"] == FINISHED for r in runs)
    print(f"compare: {len(runs)} runs ({n_ok} ok, {len(runs) - n_ok} not) from {', '.join(map(str, dirs))}")
    for path in written:
        print(f"  wrote {path}")
    if c.get("wandb"):
        from runner.wandb_workspace import publish
        url = publish(runs, cfg)
        print(f"  W&B workspace: {url}")
    return {"runs": len(runs), "files": [str(p) for p in written]}


# ---------------------------------------------------------------------------------------------- gather

def gather(dirs) -> list[dict]:
    """One flat row per results.json under `dirs` (compare's own output is never a run)."""
    paths = sorted({p.resolve() for d in dirs for p in Path(d).rglob("results.json")})
    runs = [load_run(p) for p in paths]
    runs = [r for r in runs if r["task"] != "compare"]
    label_runs(runs)
    return runs


def load_run(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:  # a results.json that cannot be read is still a run to list
        data = {"status": "unreadable", "error": {"type": type(err).__name__, "message": str(err)}}
    run_dir = path.parent
    if run_dir.is_relative_to(Path.cwd().resolve()):  # shown relative to where run.py was launched
        run_dir = run_dir.relative_to(Path.cwd().resolve())
    variant = {k: _hashable(v) for k, v in (data.get("variant") or {}).items()}
    row = {
        "id": str(run_dir), "name": run_dir.name, "status": data.get("status") or "unknown",
        "task": data.get("task"), "group": (data.get("wandb") or {}).get("group") or _sweep_group(run_dir),
        "variant": variant, "seed": variant.get("seed"), "started_at": data.get("started_at"),
        "device": data.get("device"), "device_name": data.get("device_name"),
        "error": _error_text(data.get("error")),
        "curves": {k: [{f: p.get(f) for f in ("step", "tokens", "loss")} for p in pts]
                   for k, pts in ((data.get("curves") or {}).items()) if isinstance(pts, list)},
    }
    for key, _, where in METRICS:
        row[key] = _number(_dig(data, where))
    if row["kv_cache_bytes_per_token"] is None:  # no benchmark: the cache size follows from the config
        row["kv_cache_bytes_per_token"] = kv_bytes_per_token(data)
        row["kv_estimated"] = row["kv_cache_bytes_per_token"] is not None
    return row


def kv_bytes_per_token(data: dict) -> int | None:
    """K and V per layer: 2 · n_layers · n_kv_heads · head_dim · bytes (fp32 on CPU, bf16 under CUDA autocast)."""
    v, cfg = data.get("variant") or {}, data.get("config") or {}
    try:
        heads = int(v["n_heads"])
        head_dim = int(v["d_model"]) // heads
        kv_heads = int(v.get("n_kv_heads") or heads)
        dtype = (cfg.get("train") or {}).get("dtype", "auto")
        size = 2 if dtype == "bfloat16" or (dtype == "auto" and data.get("device") == "cuda") else 4
        return 2 * int(v["n_layers"]) * kv_heads * head_dim * size
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None


def label_runs(runs: list[dict]) -> None:
    """Name each run by the variant fields that differ across runs, skipping fields that an earlier
    field already determines (in an attention sweep `attention=sliding` implies its window)."""
    varying = [f for f in FAMILIES if len({r["variant"].get(f) for r in runs}) > 1]
    done = [r for r in runs if r["status"] == FINISHED] or runs
    shown = []
    for f in varying:
        if not any(all(len(vals) <= 1 for vals in _values_by(done, g, f).values()) for g in shown):
            shown.append(f)
    seen = {(g, *(r["variant"].get(f) for f in shown + [g])) for r in done for g in varying}
    multi_seed = len({r["seed"] for r in runs}) > 1
    for r in runs:
        # a run (often a failed one) off the pattern of the finished ones also names the odd field out
        odd = [g for g in varying if g not in shown
               and (g, *(r["variant"].get(f) for f in shown + [g])) not in seen]
        parts = [f"{f}={_fmt_value(r['variant'].get(f))}" for f in shown + odd]
        r["variant_label"] = " ".join(parts) or r["variant"].get("preset") or r["name"]
        r["label"] = r["variant_label"] + (f" seed={r['seed']}" if multi_seed else "")
    for r in runs:
        r["varying"], r["label_fields"] = varying, shown


def _values_by(runs, key_field, value_field):
    groups = defaultdict(set)
    for r in runs:
        groups[r["variant"].get(key_field)].add(r["variant"].get(value_field))
    return groups


def _sweep_group(run_dir: Path) -> str | None:
    """A multirun's W&B group, named as runner.tracking.sweep_group names it."""
    sweep = run_dir.parent
    if (sweep / "multirun.yaml").exists():
        return "sweep-" + "_".join(sweep.parts[-2:])
    return None


def _dig(data, path):
    for key in path:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data


def _number(x):
    return x if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def _hashable(v):
    return ", ".join(map(str, v)) if isinstance(v, list) else v


def _fmt_value(v):
    return "-" if v is None else str(v)


def _error_text(err):
    if not err:
        return None
    if isinstance(err, dict):
        return f"{err.get('type', 'Error')}: {err.get('message', '')}".strip()
    return str(err)


# ------------------------------------------------------------------------------------------- statistics

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


def effects(runs: list[dict], metrics=("val_loss", "val_ppl", "train_tokens_per_s")) -> list[dict]:
    """Per family with two or more choices among finished runs: per choice, each metric's mean over the
    per-seed means, and its 95% t-interval across seeds when there are several."""
    done = [r for r in runs if r["status"] == FINISHED and r["val_ppl"] is not None]
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
                per_seed = defaultdict(list)
                for r in group:
                    if r[m] is not None:
                        per_seed[r["seed"]].append(r[m])
                if per_seed:
                    row[m], row[m + "_lo"], row[m + "_hi"] = mean_interval(
                        [statistics.fmean(v) for v in per_seed.values()])
                else:
                    row[m] = row[m + "_lo"] = row[m + "_hi"] = None
            rows.append(row)
        rows.sort(key=lambda row: row["val_ppl"])
        for row in rows:
            row["delta_ppl"] = row["val_ppl"] - rows[0]["val_ppl"]
        out.append({"family": family, "choices": rows, "same_as": []})
        partitions[partition] = out[-1]
    return out


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the (ppl, tokens/s) points no other point beats: lower perplexity, higher throughput.
    Sweep by throughput, descending: a point is on the front if its perplexity beats all faster ones."""
    order = sorted(range(len(points)), key=lambda i: (-points[i][1], points[i][0]))
    front, best = [], math.inf
    for i in order:
        if points[i][0] < best:
            front.append(i)
            best = points[i][0]
        elif front and points[i] == points[front[-1]]:  # an exact duplicate of a front point
            front.append(i)
    return sorted(front)


# ----------------------------------------------------------------------------------------------- report

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
    return {
        "title": "Variant comparison",
        "colors": {v: PALETTE[i % len(PALETTE)] for i, v in enumerate(variants)},
        "generated_at": time.strftime("%Y-%m-%d %H:%M"),
        "dirs": [str(d) for d in dirs],
        "runs": runs,
        "variant_columns": varying + (["seed"] if len({r["seed"] for r in runs}) > 1 else []),
        "metric_columns": [(k, heading) for k, heading, _ in METRICS if any(r[k] is not None for r in runs)],
        "common": common,
        "effects": effects(runs),
        "not_finished": [r for r in runs if r["status"] != FINISHED],
    }


def _run_order(r):
    ppl = r["val_ppl"] if r["status"] == FINISHED and r["val_ppl"] is not None else math.inf
    return (ppl, r["label"], r["id"])


def write_report(report: dict, out: Path, png: bool = True) -> list[Path]:
    from runner.report_html import render_html
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    images = []
    if png:
        try:
            from runner.report_png import write_pngs
            images = write_pngs(report, out)
        except ImportError as err:
            print(f"compare: no PNGs ({err}); pip install -e '.[dashboards]' for matplotlib")
    html = out / "report.html"
    html.write_text(render_html(report))
    md = out / "report.md"
    md.write_text(render_markdown(report, [p.name for p in images]))
    return [html, md, *images]


# ------------------------------------------------------------------------------------------- markdown

def fmt(key: str, x) -> str:
    """A number the way a reader wants it: bytes in KiB/MiB, throughput with thousands separators."""
    if x is None:
        return "–"
    if key.endswith("bytes") or key.endswith("bytes_per_token"):
        for unit, size in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
            if abs(x) >= size:
                return f"{x / size:.1f} {unit}"
        return f"{x:.0f} B"
    if key == "params":
        return f"{x / 1e6:.2f}M" if x >= 1e6 else f"{x / 1e3:.1f}k"
    if key == "mfu":
        return f"{100 * x:.1f}%"
    if "tokens_per_s" in key:
        return f"{x:,.0f}"
    if "ppl" in key:
        return f"{x:.2f}"
    return f"{x:.4f}" if isinstance(x, float) else str(x)


def fmt_interval(row: dict, key: str) -> str:
    if row.get(key + "_lo") is None:
        return fmt(key, row.get(key))
    return f"{fmt(key, row[key])} [{fmt(key, row[key + '_lo'])}, {fmt(key, row[key + '_hi'])}]"


def family_title(fam: dict) -> str:
    return fam["family"] + "".join(f" (= {f})" for f in fam["same_as"])


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
             *(_fmt_value(r["variant"].get(f)) for f in report["variant_columns"]),
             *(fmt(k, r[k]) + ("*" if k == "kv_cache_bytes_per_token" and r.get("kv_estimated") else "")
               for k, _ in report["metric_columns"]), f"`{r['id']}`"] for r in runs]
    lines += _md_table(head, rows)
    if any(r.get("kv_estimated") for r in runs):
        lines += ["", "\\* KV bytes/token computed from the config (the run was not benchmarked)."]
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
                               [[_fmt_value(c["choice"]), c["runs"], c["seeds"], fmt_interval(c, "val_loss"),
                                 fmt_interval(c, "val_ppl"), f"+{c['delta_ppl']:.2f}",
                                 fmt_interval(c, "train_tokens_per_s")] for c in fam["choices"]])
    if images:
        lines += ["", "## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in images]
    return "\n".join(lines) + "\n"
