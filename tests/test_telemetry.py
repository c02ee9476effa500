"""Training telemetry (runner/telemetry.py) against naive computations: the attention probe's max logit and
entropy against an explicit per-query softmax for every kernel, mask and score modifier; the spike counts
against a series with known spikes; telemetry off installs nothing."""
import math

import pytest
import torch

from conftest import tiny_model
from runner import telemetry
from variants import ALiBiBias, Attention, AttentionContext, Causal, SlidingWindow, StridedSparse, alibi_slopes
from variants.attention import sampled_logits

B, T, H, HKV, HD = 2, 12, 4, 2, 8
# the same patterns written out by hand, so that the reference does not use masks.py
PATTERNS = {"causal": (Causal(), lambda i, j: j <= i),
            "sliding": (SlidingWindow(3), lambda i, j: j <= i and i - j < 3),
            "strided": (StridedSparse(4), lambda i, j: j <= i and ((i - j) < 4 or (i - j) % 4 == 0))}


@torch.no_grad()
def naive_stats(module, x, visible, slopes=None, softcap=None):
    """Per (row, head, query): the max logit over visible keys and the attention entropy, one softmax at a time."""
    q = (x @ module.q_proj.weight.t()).view(B, T, H, HD)
    k = (x @ module.k_proj.weight.t()).view(B, T, HKV, HD)
    max_logit, entropy, n_visible = torch.empty(B, H, T), torch.empty(B, H, T), torch.empty(B, H, T)
    for b in range(B):
        for h in range(H):
            for i in range(T):
                keys = [j for j in range(T) if visible(b, i, j)]
                logits = []
                for j in keys:
                    s = float(q[b, i, h] @ k[b, j, h // (H // HKV)]) / math.sqrt(HD)
                    s += 0.0 if slopes is None else slopes[h] * (j - i)
                    logits.append(s if softcap is None else softcap * math.tanh(s / softcap))
                p = torch.tensor(logits).softmax(0)
                max_logit[b, h, i], entropy[b, h, i] = max(logits), float(-(p * p.log()).sum())
                n_visible[b, h, i] = len(keys)
    return max_logit, entropy, n_visible


@pytest.mark.parametrize("kernel", ["eager", "sdpa", pytest.param("flex", marks=pytest.mark.slow)])  # flex uncompiled on a CPU: seconds a case
@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("documents", [False, True])
@pytest.mark.parametrize("mods", ["none", "alibi", "softcap"])
def test_attention_probe_equals_a_naive_softmax(kernel, pattern, documents, mods):
    torch.manual_seed(0)
    mask_pattern, allowed = PATTERNS[pattern]
    softcap = 2.0 if mods == "softcap" else None
    module = Attention(H * HD, H, HKV, kernel=kernel, pattern=mask_pattern, softcap=softcap)
    x = torch.randn(B, T, H * HD) * 3  # large logits: a peaked softmax, far from uniform
    docs = torch.tensor([[0] * 5 + [1] * 7, [0] * 9 + [1] * 3]) if documents else None
    slopes = alibi_slopes(H) if mods == "alibi" else None
    ctx = AttentionContext(T, T, 0, docs, docs, score_mods=(ALiBiBias(tuple(slopes)),) if slopes else ())
    seen = []
    module.probe = lambda *args: seen.append(sampled_logits(*args, rows=B, queries=T))
    with torch.no_grad():  # flex has no CPU backward
        module(x, ctx=ctx)
    logits, visible = seen[0]
    max_logit, entropy = telemetry.attention_stats(logits, visible)
    same_doc = (lambda b, i, j: docs[b, i] == docs[b, j]) if documents else (lambda b, i, j: True)
    ref_max, ref_entropy, n_visible = naive_stats(module, x, lambda b, i, j: allowed(i, j) and same_doc(b, i, j),
                                                  slopes, softcap)
    torch.testing.assert_close(max_logit, ref_max, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(entropy, ref_entropy, atol=1e-4, rtol=1e-4)
    assert (entropy >= -1e-6).all() and (entropy <= n_visible.log() + 1e-5).all()
    if documents:  # the first token of a document sees only itself
        assert entropy[0, :, 5].abs().max() < 1e-6


def test_a_bounded_sample_of_queries_is_probed():
    torch.manual_seed(0)
    module = Attention(H * HD, H, HKV, kernel="sdpa")
    x = torch.randn(3, T, H * HD)
    seen = []
    module.probe = lambda *args: seen.append(sampled_logits(*args, rows=2, queries=4))
    module(x)
    logits, visible = seen[0]
    assert logits.shape == (2, H, 4, T)
    assert visible[0, 0].sum(-1).tolist() == [1, 5, 8, 12]  # queries 0, 4, 7, 11 (evenly spaced), causal


def _trained_telemetry(kernel="sdpa", steps=(1, 2), wrap=None, **options):
    """Telemetry of a few AdamW steps of a 3-layer model; `wrap(model)` (torch.compile) runs the forward."""
    torch.manual_seed(0)
    model = tiny_model(kernel=kernel, n_layers=3).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    probe = telemetry.build(options or True, model, optimizer, log_every=1)
    forward = wrap(model) if wrap else model
    ids = torch.randint(0, model.vocab_size, (2, 16))
    for step in steps:
        probe.arm(step)
        logits = forward(ids[:, :-1].contiguous())
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)  # clipped: record() undoes it
        optimizer.step()
        optimizer.zero_grad()
        probe.record(step, loss, grad_norm)
    return model, probe.read()


def test_a_telemetry_point_holds_every_layer_and_the_step_norms():
    model, points = _trained_telemetry()
    p = points[-1]
    assert [q["step"] for q in points] == [1, 2]
    for key in ("attn_max_logit", "attn_entropy", "resid_rms"):
        assert len(p[key]) == 3 and all(v is not None and math.isfinite(v) for v in p[key])
    assert all(0 <= e <= math.log(15) for e in p["attn_entropy"])
    # the groups' norms before clipping add up (in squares) to the step's gradient norm
    groups = list(p["grad_norm_by_group"].values())
    assert math.isclose(math.sqrt(sum(g * g for g in groups)), p["grad_norm"], rel_tol=1e-4)
    assert p["grad_norm"] > 1e-2  # far above the clipping threshold: the norms are those before it
    assert all(0 < r < 1 for r in p["update_ratio_by_group"].values())
    assert p["z_mean"] > p["logits_max"] - 1e-6 and p["logits_std"] > 0  # logsumexp >= max


def test_a_compiled_forward_records_the_same_telemetry_without_recompiling():
    """Under torch.compile the probes are traced into the graph: one graph on a telemetry step, one between them,
    none more however many telemetry steps follow (the slots are written in place; no guard sees the step), and
    the recorded values are the eager run's."""
    import torch._dynamo
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    steps = range(1, 9)
    _, eager = _trained_telemetry(steps=steps, every=2)
    _, compiled = _trained_telemetry(steps=steps, every=2, wrap=lambda m: torch.compile(m, backend=counting_backend))
    torch._dynamo.reset()
    assert len(graphs) == 2  # steps 1 (not armed) and 2 (armed); steps 3-8 reuse them
    assert [p["step"] for p in compiled] == [2, 4, 6, 8]
    for e, c in zip(eager, compiled):
        for key in ("attn_max_logit", "attn_entropy", "resid_rms"):
            assert c[key] == pytest.approx(e[key], rel=1e-4, abs=1e-5)
        assert c["z_mean"] == pytest.approx(e["z_mean"], rel=1e-5) and c["loss"] == pytest.approx(e["loss"], rel=1e-5)


def test_telemetry_off_installs_nothing():
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters())
    for setting in (False, None, {"enabled": False}):
        assert isinstance(telemetry.build(setting, model, optimizer, 10), telemetry.Off)
    assert all(m.probe is None for m in model.attention_modules())
    assert not any(m._forward_hooks for m in model.modules())
    assert not optimizer._optimizer_step_pre_hooks and not optimizer._optimizer_step_post_hooks


def test_bad_telemetry_settings_name_the_key():
    with pytest.raises(ValueError, match="train.telemetry.every"):
        telemetry.settings({"every": 0}, 10)
    with pytest.raises(ValueError, match="train.telemetry.queriez"):
        telemetry.settings({"queriez": 3}, 10)
    assert telemetry.settings({"every": None}, 10)["every"] == 10


def test_spikes_are_counted_above_k_sigma_of_the_window_and_at_non_finite_steps():
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters())
    probe = telemetry.build({"every": 10, "spike_window": 20, "spike_sigma": 6.0}, model, optimizer, 10)
    noise = torch.Generator().manual_seed(0)
    for step in range(1, 41):
        loss = 2.0 + 0.01 * torch.randn((), generator=noise)
        loss = loss + (1.0 if step == 15 else 0.0) + (float("nan") if step == 33 else 0.0)
        probe.arm(step)
        probe.record(step, loss, torch.tensor(1.0) + 0.01 * torch.randn((), generator=noise))
    points = probe.read()
    assert [p["loss_spike"] for p in points] == [0, 1, 0, 1]  # steps 15 and 33
    assert [p["grad_norm_spike"] for p in points] == [0, 0, 0, 0]


def _noisy_steps(probe, steps, spikes=(15,)):
    noise = torch.Generator().manual_seed(0)
    for step in range(1, max(steps) + 1):
        loss = 2.0 + 0.01 * torch.randn((), generator=noise) + (1.0 if step in spikes else 0.0)
        grad_norm = torch.tensor(1.0) + 0.01 * torch.randn((), generator=noise)
        if step in steps:
            probe.arm(step)
            probe.record(step, loss, grad_norm)


def test_a_resumed_probe_counts_spikes_as_the_uninterrupted_one_does(tmp_path):
    options = {"every": 10, "spike_window": 20, "spike_sigma": 6.0}
    full = telemetry.build(options, tiny_model(), torch.optim.AdamW(tiny_model().parameters()), 10)
    _noisy_steps(full, range(1, 31))
    expected = full.read()
    assert [p["loss_spike"] for p in expected] == [0, 1, 0]
    first = telemetry.build(options, tiny_model(), torch.optim.AdamW(tiny_model().parameters()), 10)
    _noisy_steps(first, range(1, 13))  # stopped after step 12's checkpoint
    points = first.read()
    torch.save(first.state_dict(), tmp_path / "state.pt")
    resumed = telemetry.build(options, tiny_model(), torch.optim.AdamW(tiny_model().parameters()), 10)
    resumed.load_state_dict(torch.load(tmp_path / "state.pt"))
    _noisy_steps(resumed, range(13, 31))  # step 15's spike needs the 14 steps before it in the window
    assert [p["loss_spike"] for p in points + resumed.read()] == [0, 1, 0]
    assert resumed.state_dict() == full.state_dict()


def test_wandb_fields_are_grouped_per_layer():
    fields = telemetry.wandb_fields({"step": 3, "attn_max_logit": [1.0, 2.0], "z_mean": 4.0,
                                     "grad_norm_by_group": {"0": 0.5}, "logits_max": None})
    assert fields == {"telemetry/layer_0/attn_max_logit": 1.0, "telemetry/layer_1/attn_max_logit": 2.0,
                      "telemetry/z_mean": 4.0, "telemetry/group_0/grad_norm": 0.5}


def add_telemetry(results_path, diverged=False):
    """Give a fixture run's results.json a telemetry curve of 2 layers: logits growing 1, 2, 3 ...; the last
    point non-finite (null) when diverged."""
    import json
    record = json.loads(results_path.read_text())
    points = [{"step": s, "attn_max_logit": [float(s), s / 2], "attn_entropy": [2.0 - s / 10, 1.5],
               "resid_rms": [1.0, 1.0], "z_mean": 4.0 + s} for s in (2, 4, 6)]
    if diverged:
        points[-1].update(attn_max_logit=[None, None], attn_entropy=[None, None], z_mean=None)
    record["curves"]["telemetry"] = points
    results_path.write_text(json.dumps(record))


def test_compare_report_shows_each_runs_telemetry(tmp_path):
    from test_compare import fixture_sweep
    from runner.report import build_report, gather, write_report
    from runner.report.telemetry import telemetry_points
    sweep = fixture_sweep(tmp_path)
    files = sorted(sweep.rglob("results.json"))
    add_telemetry(files[0])
    add_telemetry(files[1], diverged=True)
    runs = gather([tmp_path / "outputs"])
    written = write_report(build_report(runs, ["outputs"]), tmp_path / "report", png=True)
    chart = tmp_path / "report" / "telemetry.png"  # three panels, the two runs with telemetry
    assert chart in written and chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and chart.stat().st_size > 5000
    md = (tmp_path / "report" / "report.md").read_text()
    table = md.split("## Inside training")[1].split("\n## ")[0]
    rows = [line for line in table.splitlines() if line.startswith("| ") and "peak max logit" not in line]
    assert len(rows) == 2
    cells = sorted(row.rstrip(" |").split(" | ")[2:] for row in rows)  # last step, peak, last max logit, entropy, z
    assert cells == [["6", "4", "4", "1.5", "8"], ["6", "6", "6", "1.4", "10"]]
    html = (tmp_path / "report" / "report.html").read_text()
    assert html.count('data-kind="telemetry"') == 3 and 'id="telemetry"' in html
    # the reduction a chart draws: max over layers, lowest layer's entropy, tokens from the training curve
    curves = {"train": [{"step": 1, "tokens": 128}], "telemetry": [{"step": 4, "attn_max_logit": [1.0, 3.0, None],
                                                                    "attn_entropy": [0.5, 0.2], "z_mean": 7.0}]}
    assert telemetry_points(curves) == [{"step": 4, "tokens": 512.0, "attn_max_logit": 3.0, "attn_entropy": 0.2,
                                         "z_mean": 7.0}]


def test_qk_norm_and_z_loss_are_variant_fields_even_for_runs_recorded_before_them(tmp_path):
    """A QK-norm or z-loss run is a variant of its own in a comparison: from results.json's variant, or, for a run
    recorded before these were fields, from its config; runs that set neither stay one variant."""
    import json
    from test_compare import write_results
    from conftest import compose
    from runner.report import build_report, gather
    from runner.tracking import variant_fields
    fields = variant_fields(compose(["model.attention.qk_norm=true", "train.z_loss=1e-4"]))
    assert (fields["qk_norm"], fields["z_loss"]) == (True, 1e-4)
    assert (variant_fields(compose())["qk_norm"], variant_fields(compose())["z_loss"]) == (False, 0.0)
    root = tmp_path / "outputs" / "sweeps" / "s"
    for i, (qk, z) in enumerate([(None, None), (True, None), (None, 1e-4)]):
        for seed in (0, 1):
            path = write_results(root / f"{i}_{seed}", seed=seed) / "results.json"
            record = json.loads(path.read_text())
            record["config"].update(model={"attention": {"qk_norm": qk}}, train={"z_loss": z})
            path.write_text(json.dumps(record))
    report = build_report(gather([tmp_path / "outputs"]), ["outputs"])
    labels = {r["variant_label"] for r in report["runs"]}
    assert labels == {"qk_norm=False z_loss=0.0", "qk_norm=True z_loss=0.0", "qk_norm=False z_loss=0.0001"}
    assert {v["family"] for v in report["verdicts"]} == {"qk_norm", "z_loss"}
