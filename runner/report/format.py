"""How the report writes a number, an interval and a family's name (HTML, Markdown and PNG alike)."""
from runner.formatting import format_bytes

FINISHED = "ok"


def fmt(key: str, x) -> str:
    """A number the way a reader wants it: bytes in KiB/MiB, throughput with thousands separators."""
    if x is None:
        return "–"
    if key.endswith("bytes") or key.endswith("bytes_per_token"):
        return format_bytes(x)
    if key == "params":
        return f"{x / 1e6:.2f}M" if x >= 1e6 else f"{x / 1e3:.1f}k"
    if key in ("flops_per_token", "train_flops"):
        return f"{x:.3g}"
    if key == "mfu":
        return f"{100 * x:.1f}%"
    if "tokens_per_s" in key:  # a small bound of a log-scale interval keeps its digits (never shown as 0)
        return f"{x:,.0f}" if x >= 10 else f"{x:.2g}"
    if "ppl" in key:
        return f"{x:.2f}"
    return f"{x:.4f}" if isinstance(x, float) else str(x)


def fmt_interval(row: dict, key: str) -> str:
    if row.get(key + "_lo") is None:
        return fmt(key, row.get(key))
    return f"{fmt(key, row[key])} [{fmt(key, row[key + '_lo'])}, {fmt(key, row[key + '_hi'])}]"


def fmt_lr(lr) -> str:
    return "–" if lr is None else f"{lr:g}"


def budget_note(report: dict) -> str:
    """One sentence: what was compared, and what was left out and why."""
    c = report["chosen"]
    text = (f"Compared: {report['compared']} runs of task {'/'.join(c['tasks'])}, sweep {c['sweep']}, budget "
            f"{c['budget'] or '–'}.")
    if report["left_out"]:
        text += (f" {len(report['left_out'])} finished runs are listed but left out of the effects and verdicts "
                 f"(another task, sweep or budget: never averaged together; see the 'compared' column).")
    return text


def family_title(fam: dict) -> str:
    return fam["family"] + "".join(f" (= {f})" for f in fam["same_as"])



def fmt_value(v) -> str:
    return "-" if v is None else str(v)
