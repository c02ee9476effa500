"""The GPU scripts' two Python steps (runner/bench/gpu_smoke.sh, gpu_tables.sh).

    python -m runner.bench.gpu_report versions OUT/versions.json [--require-cuda=1]
    python -m runner.bench.gpu_report summary OUT        # markdown tables from OUT/*/results.json and the log

The summary is what gets committed to the README after a GPU slot: one line per run (status, seconds, the
recompiles and graph breaks TORCH_LOGS reported during it), then the training, decode, reference and kernel
figures those runs recorded.
"""
import argparse
import json
import platform
import re
import sys
from pathlib import Path

# TORCH_LOGS=recompiles,graph_breaks lines (torch 2.9-2.13 wording)
RECOMPILE = re.compile(r"Recompiling function")
GRAPH_BREAK = re.compile(r"Graph break")


def versions(require_cuda: bool) -> dict:
    import torch
    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                    memory_gib=round(props.total_memory / 2**30, 1))
    for name in ("triton", "transformers", "hydra", "datasets"):
        try:
            info[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 -- absent or broken: recorded as missing
            info[name] = None
    if require_cuda and not torch.cuda.is_available():
        raise SystemExit(f"no CUDA device visible (torch {torch.__version__}, CUDA build {torch.version.cuda})")
    return info


def log_counts(log_text: str) -> dict[str, dict[str, int]]:
    """Recompile and graph-break lines per run, splitting the log at the scripts' `=== name (cap ...)` lines."""
    counts, name = {}, None
    for line in log_text.splitlines():
        started = re.match(r"=== (\S+) \(cap ", line)
        if started:
            name = started.group(1)
            counts[name] = {"recompiles": 0, "graph_breaks": 0}
        elif name:
            counts[name]["recompiles"] += bool(RECOMPILE.search(line))
            counts[name]["graph_breaks"] += bool(GRAPH_BREAK.search(line))
    return counts


def _f(x, fmt="{:,.0f}"):
    return "-" if x is None else fmt.format(x) if isinstance(x, (int, float)) else str(x)


def _pct(x):
    return _f(None if x is None else 100 * x, "{:.1f}%")


def run_lines(out: Path, records: dict) -> list[str]:
    steps = {}
    if (out / "steps.tsv").exists():
        for row in (out / "steps.tsv").read_text().splitlines():
            name, rc, seconds = row.split("\t")
            steps[name] = (int(rc) if rc.lstrip("-").isdigit() else rc, int(seconds))
    logs = {}
    for log in out.glob("*.log"):
        logs.update(log_counts(log.read_text(errors="replace")))
    lines = ["| run | exit | seconds | status | recompiles | graph breaks | error |", "|---|---|---|---|---|---|---|"]
    for name in sorted(set(steps) | set(records)):
        rc, seconds = steps.get(name, (None, None))
        rec, seen = records.get(name, {}), logs.get(name, {})
        error = (rec.get("error") or {}).get("message", "") if isinstance(rec.get("error"), dict) else rec.get("error") or ""
        lines.append(f"| {name} | {_f(rc)} | {_f(seconds)} | {rec.get('status', 'no results.json')} | "
                     f"{_f(seen.get('recompiles'))} | {_f(seen.get('graph_breaks'))} | {str(error)[:120]} |")
    return lines


def training_lines(records: dict) -> list[str]:
    lines = ["| run | params | compile | kernels | tokens/s | MFU | final train loss |", "|---|---|---|---|---|---|---|"]
    for name, rec in sorted(records.items()):
        metrics = rec.get("metrics") or {}
        if rec.get("task", "train") != "train" or "train_tokens_per_s" not in metrics:
            continue
        config = (rec.get("config") or {}).get("train") or {}
        kernels = ",".join(sorted({str(k) for k in rec.get("attention_kernels") or []})) or None
        lines.append(f"| {name} | {_f(rec.get('params'))} | {config.get('compile')} | {_f(kernels)} | "
                     f"{_f(metrics.get('train_tokens_per_s'))} | {_pct(metrics.get('mfu'))} | "
                     f"{_f(metrics.get('final_train_loss'), '{:.3f}')} |")
    return lines


def decode_lines(records: dict) -> list[str]:
    lines = ["| run | batch | kind | prompt | tokens/s | ms/token | fraction of bandwidth bound | bandwidth utilization |",
             "|---|---|---|---|---|---|---|---|"]
    for name, rec in sorted(records.items()):
        for p in (rec.get("bench") or {}).get("decode", []):
            kind = "compiled" if p.get("compiled") else "cache" if p.get("cache") else "no cache"
            rate = p.get("tokens_per_s") if p.get("status") == "ok" else p.get("status")
            lines.append(f"| {name} | {p.get('batch_size')} | {kind} | {p.get('prompt_length')} | {_f(rate)} | "
                         f"{_f(p.get('ms_per_token'), '{:.2f}')} | {_pct(p.get('fraction_of_bandwidth_bound'))} | "
                         f"{_pct(p.get('bandwidth_utilization'))} |")
    return lines


def reference_lines(records: dict) -> list[str]:
    lines = ["| run | max logit diff | greedy match | decode vs transformers (ours: kind) | eager vs eager | "
             "compiled vs their static+compiled |", "|---|---|---|---|---|---|"]
    for name, rec in sorted(records.items()):
        ref = (rec.get("bench") or {}).get("reference") or {}
        if "max_logit_diff" not in ref:
            if ref.get("status") not in (None, "skipped"):
                lines.append(f"| {name} | {ref.get('status')}: {str(ref.get('error', ''))[:100]} | | | | |")
            continue
        static = ref.get("decode_speed_ratio_static")
        lines.append(f"| {name} | {_f(ref['max_logit_diff'], '{:.3g}')} | {_pct(ref.get('greedy_match_fraction'))} | "
                     f"{_f(ref.get('decode_speed_ratio'), '{:.2f}x')} ({ref.get('decode_ours')}) | "
                     f"{_f(ref.get('decode_speed_ratio_eager'), '{:.2f}x')} | "
                     f"{_f(static, '{:.2f}x') if static is not None else ref.get('decode_speed_ratio_static_reason')} |")
    return lines


def kernel_lines(records: dict) -> list[str]:
    lines = ["| run | mask | seq_len | kernel | ms | tokens/s |", "|---|---|---|---|---|---|"]
    for name, rec in sorted(records.items()):
        for p in (rec.get("bench") or {}).get("kernels", []):
            ms = 1e3 * p["median_s"] if p.get("status") == "ok" else p.get("status")
            lines.append(f"| {name} | {p.get('mask')} | {p.get('seq_len')} | {p.get('kernel')} | "
                         f"{_f(ms, '{:.3f}')} | {_f(p.get('tokens_per_s'))} |")
    return lines


def summary(out: Path) -> str:
    records = {}
    for path in sorted(out.glob("*/results.json")):
        try:
            records[path.parent.name] = json.loads(path.read_text())
        except ValueError as err:
            records[path.parent.name] = {"status": f"unreadable results.json: {err}"}
    head = []
    if (out / "versions.json").exists():
        v = json.loads((out / "versions.json").read_text())
        head = [f"{v.get('device')}, torch {v.get('torch')} (CUDA {v.get('cuda')}, cuDNN {v.get('cudnn')}), "
                f"triton {v.get('triton')}, transformers {v.get('transformers')}, Python {v.get('python')}", ""]
    sections = [("Runs", run_lines(out, records)), ("Training", training_lines(records)),
                ("Decode", decode_lines(records)), ("Against transformers", reference_lines(records)),
                ("Attention kernels", kernel_lines(records))]
    body = head
    for title, lines in sections:
        if len(lines) > 2 or title == "Runs":
            body += [f"### {title}", "", *lines, ""]
    return "\n".join(body)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    v = sub.add_parser("versions")
    v.add_argument("path")
    v.add_argument("--require-cuda", type=int, default=1)
    s = sub.add_parser("summary")
    s.add_argument("out")
    args = parser.parse_args(argv)
    if args.command == "versions":
        info = versions(bool(args.require_cuda))
        Path(args.path).write_text(json.dumps(info, indent=2) + "\n")
        print(json.dumps(info))
    else:
        print(summary(Path(args.out)))


if __name__ == "__main__":
    sys.exit(main())
