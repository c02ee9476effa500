"""Gathering runs: one flat row per results.json, labelled by the variant fields that differ."""
import json
import math
from collections import defaultdict
from pathlib import Path

from runner.report.format import FINISHED, fmt_value
from runner.tracking import FAMILIES, sweep_group_name

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
    for task, scores in ((data.get("metrics") or {}).get("lm_eval") or {}).items():  # task=lm_eval: one per metric
        for name, value in scores.items():
            if not name.endswith("_stderr"):
                row[f"lm_eval/{task}/{name}"] = _number(value)
    if row["kv_cache_bytes_per_token"] is None:  # no benchmark: the model's own count, recorded by every task
        row["kv_cache_bytes_per_token"] = _number(data.get("kv_cache_bytes_per_token"))
        row["kv_estimated"] = row["kv_cache_bytes_per_token"] is not None
    return row


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
        parts = [f"{f}={fmt_value(r['variant'].get(f))}" for f in shown + odd]
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


