"""Gathering runs: one flat row per results.json, labelled by the variant fields that differ."""
import json
import math
from collections import defaultdict
from pathlib import Path

from runner.report.format import FINISHED, fmt_value
from runner.report.telemetry import telemetry_points
from runner.report.trends import ladder_points
from runner.tracking import FAMILIES, stability_fields, sweep_group_name

# Tableau 10: one colour per variant, shared by the HTML charts and the PNGs (seeds share their variant's);
# past ten variants, colour() spreads further hues so that no two variants share one.
PALETTE = ("#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7",
           "#9c755f", "#bab0ac")
# Per-run numbers shown in the table: (key, heading, where in results.json).
METRICS = (("params", "params", ("params",)),
           ("steps", "steps", ("metrics", "steps")),
           ("val_loss", "val loss", ("metrics", "val_loss")),
           ("val_ppl", "val ppl", ("metrics", "val_ppl")),
           ("final_train_loss", "train loss", ("metrics", "final_train_loss")),
           ("train_tokens_per_s", "train tok/s", ("metrics", "train_tokens_per_s")),
           ("mfu", "MFU", ("metrics", "mfu")),
           ("decode_tokens_per_s", "decode tok/s", ("bench", "decode_tokens_per_s")),
           ("peak_memory_bytes", "peak memory", ("bench", "peak_memory_bytes")),
           ("kv_cache_bytes_per_token", "KV bytes/token", ("bench", "kv_cache_bytes_per_token")),
           ("flops_per_token", "FLOPs/token", ("flops_per_token",)))
# Recorded numbers the report uses without a column of their own.
EXTRA = (("params_non_embedding", ("params_non_embedding",)), ("train_tokens", ("metrics", "train_tokens")),
         ("train_flops", ("metrics", "train_flops")), ("train_seconds", ("metrics", "train_seconds")))
# Training settings that name a budget; exactly one is set in a run (runner/train.py).
BUDGET_KEYS = (("max_flops", "FLOPs"), ("max_tokens", "tokens"), ("max_seconds", "s"), ("max_steps", "steps"))


def gather(dirs) -> list[dict]:
    """One flat row per results.json under `dirs` (compare's own output is never a run)."""
    paths = sorted({p.resolve() for d in dirs for p in Path(d).rglob("results.json")})
    runs = [load_run(p) for p in paths]
    runs = [r for r in runs if r["task"] != "compare"]
    label_runs(runs)
    return runs


def colour(i: int) -> str:
    """The i-th variant's colour: Tableau 10, then golden-angle hues (distinct, never repeating)."""
    if i < len(PALETTE):
        return PALETTE[i]
    import colorsys
    r, g, b = colorsys.hls_to_rgb((i * 0.618033988749895) % 1.0, 0.45, 0.55)
    return f"#{round(r * 255):02x}{round(g * 255):02x}{round(b * 255):02x}"


def load_run(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:  # a results.json that cannot be read is still a run to list
        data = {"status": "unreadable", "error": {"type": type(err).__name__, "message": str(err)}}
    run_dir = path.parent
    if run_dir.is_relative_to(Path.cwd().resolve()):  # shown relative to where run.py was launched
        run_dir = run_dir.relative_to(Path.cwd().resolve())
    variant = {k: _hashable(v) for k, v in (data.get("variant") or {}).items()}
    if data.get("variant") and "qk_norm" not in variant:  # recorded before they were fields: from its config
        config = data.get("config") or {}
        variant.update(stability_fields(config.get("model"), config.get("train")))
    row = {
        "id": str(run_dir), "name": run_dir.name, "status": data.get("status") or "unknown",
        "task": data.get("task"), "group": (data.get("wandb") or {}).get("group") or _sweep_group(run_dir),
        "variant": variant, "seed": variant.get("seed"), "started_at": data.get("started_at"),
        "lr": _number(_dig(data, ("config", "train", "lr"))), "budget": _budget(data),
        "device": data.get("device"), "device_name": data.get("device_name"),
        "error": _error_text(data.get("error")),
        "config_error": isinstance(data.get("error"), dict) and bool(data["error"].get("config_error")),
        "curves": {k: [{f: p.get(f) for f in ("step", "tokens", "loss", "seconds")} for p in pts]
                   for k, pts in ((data.get("curves") or {}).items()) if isinstance(pts, list)},
    }
    row["curves"]["telemetry"] = telemetry_points(data.get("curves") or {})  # three series, not every layer
    _time_val_points(row["curves"])
    row["ladder"] = ladder_points(data)  # (budget, FLOPs, val loss): cooldowns and the final loss (trends.py)
    for key, _, where in METRICS:
        row[key] = _number(_dig(data, where))
    for task, scores in ((data.get("metrics") or {}).get("lm_eval") or {}).items():  # task=lm_eval: one per metric
        for name, value in scores.items():
            if not name.endswith("_stderr"):
                row[f"lm_eval/{task}/{name}"] = _number(value)
    for key, where in EXTRA:
        row[key] = _number(_dig(data, where))
    if row["train_flops"] is None and row["flops_per_token"] and row["train_tokens"]:
        row["train_flops"] = row["flops_per_token"] * row["train_tokens"]
    if row["kv_cache_bytes_per_token"] is None:  # no benchmark: the model's own count, recorded by every task
        row["kv_cache_bytes_per_token"] = _number(data.get("kv_cache_bytes_per_token"))
        row["kv_estimated"] = row["kv_cache_bytes_per_token"] is not None
    return row


def _time_val_points(curves: dict) -> None:
    """Validation points carry no clock (a resumed curve must equal an uninterrupted one): their training
    seconds are interpolated between the logged training points around their step."""
    train = [(p["step"], p["seconds"]) for p in curves.get("train", []) if p.get("seconds") is not None]
    for p in curves.get("val", []):
        if p.get("seconds") is not None or not train or p.get("step") is None:
            continue
        before = [(s, t) for s, t in [(0, 0.0), *train] if s <= p["step"]][-1]
        after = next(((s, t) for s, t in train if s >= p["step"]), None)
        if after is None:
            continue
        p["seconds"] = before[1] if after[0] == before[0] else (
            before[1] + (after[1] - before[1]) * (p["step"] - before[0]) / (after[0] - before[0]))


def _budget(data: dict) -> str | None:
    """What a training run was given to spend, with what it was spent on: "2e+12 FLOPs, seq_len=128, data=stdlib"
    (or "300 steps x 16 rows"). Runs with different budgets are never averaged together."""
    if data.get("task") not in (None, "train"):
        return None
    train = _dig(data, ("config", "train")) or {}
    spec = next((f"{train[k]:.3g} {unit}" for k, unit in BUDGET_KEYS[:3] if train.get(k) is not None), None)
    steps = train.get("max_steps")
    if spec is None and steps is None and data.get("status") == "ok":  # a record without its config
        steps = (data.get("metrics") or {}).get("steps") or max(
            (p.get("step") or 0 for p in (data.get("curves") or {}).get("train") or []), default=None)
    if spec is None and steps is not None:
        spec = f"{steps} steps" + (f" x {train['batch_size']} rows" if train.get("batch_size") else "")
    if spec is None:
        return None
    data_name = _dig(data, ("config", "data", "name"))
    seq_len = (data.get("variant") or {}).get("seq_len")
    return spec + (f", seq_len={seq_len}" if seq_len else "") + (f", data={data_name}" if data_name else "")


def label_runs(runs: list[dict]) -> None:
    """Name each run by the variant fields that differ across runs, skipping fields that an earlier
    field already determines (in an attention sweep `attention=sliding` implies its window); then the
    learning rate, budget and task where they differ. Two different runs never share a label: a clash is
    told apart by the sweep, then by the directory."""
    varying, shown, parts = _varied_parts(runs)
    multi_seed = len({r["seed"] for r in runs}) > 1
    for r, named in zip(runs, parts):
        extra = [f"{k}={fmt_value(r.get(k))}" for k in ("task", "budget")
                 if r.get(k) is not None and len({q.get(k) for q in runs if q.get(k) is not None}) > 1]
        r["variant_label"] = " ".join(named + extra) or r["variant"].get("preset") or r["name"]
        lr = f" lr={r['lr']:g}" if r["lr"] is not None and len({q["lr"] for q in runs} - {None}) > 1 else ""
        r["label"] = r["variant_label"] + lr + (f" seed={r['seed']}" if multi_seed else "")
    _tell_apart(runs, "label")
    for r in runs:
        r["varying"], r["label_fields"] = varying, shown


def short_labels(runs: list[dict], compared: list[dict]) -> None:
    """Names for the charts, cards and tables: what varies among the compared runs only, comma-separated
    ("ffn=swiglu, seed=1"): r["short"] per run, r["variant_short"] without seed and lr (a legend entry: seeds
    share their variant's colour), r["title"] the whole variant (the tooltip). A run left out of the
    comparison keeps its label (it names what differs across every run found)."""
    _, _, parts = _varied_parts(compared)
    multi_seed, multi_lr = len({r["seed"] for r in compared}) > 1, len({r["lr"] for r in compared} - {None}) > 1
    for r, named in zip(compared, parts):
        r["variant_short"] = ", ".join(named) or r["variant_label"]
        lr = [f"lr={r['lr']:g}"] if multi_lr and r["lr"] is not None else []
        r["short"] = ", ".join(named + lr + [f"seed={r['seed']}"] * multi_seed) or r["label"]
    _tell_apart(compared, "short")
    for r in runs:
        if r.get("left_out") is not None:
            r["short"] = r["variant_short"] = r["label"]
        r["title"] = ", ".join(f"{k}={fmt_value(v)}" for k, v in r["variant"].items() if v is not None) + "".join(
            f", {k}={v:g}" if k == "lr" else f", {k}: {v}" for k, v in (("lr", r["lr"]), ("budget", r["budget"]))
            if v is not None)


def _varied_parts(runs: list[dict]) -> tuple[list, list, list[list[str]]]:
    """(the fields that vary across `runs`, those a label shows, each run's "field=value" parts): a field an
    earlier shown field determines is skipped, except in a run (often a failed one) off the finished runs'
    pattern, which also names the odd field out."""
    varying = [f for f in FAMILIES if len({r["variant"].get(f) for r in runs}) > 1]
    done = [r for r in runs if r["status"] == FINISHED] or runs
    shown = []
    for f in varying:
        if not any(all(len(vals) <= 1 for vals in _values_by(done, g, f).values()) for g in shown):
            shown.append(f)
    seen = {(g, *(r["variant"].get(f) for f in shown + [g])) for r in done for g in varying}
    parts = []
    for r in runs:
        odd = [g for g in varying if g not in shown
               and (g, *(r["variant"].get(f) for f in shown + [g])) not in seen]
        parts.append([f"{f}={fmt_value(r['variant'].get(f))}" for f in shown + odd])
    return varying, shown, parts


def _tell_apart(runs: list[dict], field: str) -> None:
    """Two different runs never share a name: a clash is told apart by the sweep, then by the directory."""
    for key in ("group", "name", "id"):
        counts = defaultdict(int)
        for r in runs:
            counts[r[field]] += 1
        for r in runs:
            if counts[r[field]] > 1 and r.get(key):
                r[field] += f" [{r[key]}]"


def _values_by(runs, key_field, value_field):
    groups = defaultdict(set)
    for r in runs:
        groups[r["variant"].get(key_field)].add(r["variant"].get(value_field))
    return groups


def _sweep_group(run_dir: Path) -> str | None:
    """A multirun's W&B group, named as runner.tracking.sweep_group names it."""
    sweep = run_dir.parent
    if (sweep / "multirun.yaml").exists():
        return sweep_group_name(sweep)
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


def _error_text(err):
    if not err:
        return None
    if isinstance(err, dict):
        return f"{err.get('type', 'Error')}: {err.get('message', '')}".strip()
    return str(err)


