"""Training telemetry in the compare report: a run's curves.telemetry (runner/telemetry.py) reduced to the three
series a stability diagnosis starts from (Wortsman et al. 2023): the largest attention logit over the layers,
the lowest layer's mean attention entropy (a collapsing layer shows there first) and the output logits' mean
log-partition z, against training steps and tokens."""

SERIES = (("attn_max_logit", "max attention logit (over layers)"),
          ("attn_entropy", "attention entropy, nats (lowest layer)"),
          ("z_mean", "output-logit z = logsumexp (mean)"))


def telemetry_points(curves: dict) -> list[dict]:
    """curves.telemetry of a results.json -> [{step, tokens, attn_max_logit, attn_entropy, z_mean}]; tokens from
    the training curve's tokens per step (None without one); a value not recorded or not finite is None."""
    train = [p for p in curves.get("train") or [] if p.get("step") and p.get("tokens") is not None]
    per_step = train[0]["tokens"] / train[0]["step"] if train else None
    points = []
    for p in curves.get("telemetry") or []:
        logits = [v for v in p.get("attn_max_logit") or [] if v is not None]
        entropy = [v for v in p.get("attn_entropy") or [] if v is not None]
        points.append({"step": p.get("step"), "tokens": per_step and p.get("step", 0) * per_step,
                       "attn_max_logit": max(logits, default=None), "attn_entropy": min(entropy, default=None),
                       "z_mean": p.get("z_mean")})
    return points


def telemetry_rows(runs: list[dict]) -> list[list]:
    """Per run with telemetry: [label, status, points, peak max logit, last max logit, lowest entropy,
    last z mean] (None where not recorded)."""
    rows = []
    for r in runs:
        pts = (r.get("curves") or {}).get("telemetry") or []
        if not pts:
            continue
        logits = [p["attn_max_logit"] for p in pts if p["attn_max_logit"] is not None]
        entropy = [p["attn_entropy"] for p in pts if p["attn_entropy"] is not None]
        z = [p["z_mean"] for p in pts if p["z_mean"] is not None]
        rows.append([r["label"], r["status"], pts[-1]["step"], max(logits, default=None),
                     logits[-1] if logits else None, min(entropy, default=None), z[-1] if z else None])
    return rows


TELEMETRY_HEAD = ["run", "status", "last step", "peak max logit", "last max logit", "lowest entropy", "last z mean"]
