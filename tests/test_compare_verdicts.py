"""task=compare decides like with like: which runs are compared (task, sweep, budget), each variant at its
best learning rate, intervals on loss, and paired verdicts checked against scipy's t distribution."""
import itertools
import json
import math
import re
import statistics
from pathlib import Path

import pytest

from runner.report import build_report, gather, write_report
from runner.report.verdicts import BETTER, UNRESOLVED, WORSE, paired_difference, seeds_to_resolve, verdict_line


def record(run_dir, *, ffn="relu", seed=0, val_loss=4.0, lr=3e-3, steps=50, task="train", status="ok",
           started="2025-01-31T12:00:00+0000", max_flops=None):
    """A results.json with the fields compare reads (as runner/tracking.py and runner/train.py write them)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ok = status == "ok"
    rec = {
        "status": status, "task": task, "params": 1_000_000, "params_non_embedding": 800_000,
        "flops_per_token": 6e6 if ffn == "relu" else 6.3e6, "kv_cache_bytes_per_token": 4096,
        "variant": {"preset": "gqa_rope", "norm": "rmsnorm", "norm_position": "pre", "ffn": ffn, "position": "rope",
                    "attention": "gqa", "n_heads": 4, "n_kv_heads": 2, "kernel": "sdpa", "window": None,
                    "attention_schedule": None, "d_model": 128, "n_layers": 4, "seq_len": 128, "seed": seed},
        "metrics": {"val_loss": val_loss, "val_ppl": math.exp(val_loss), "train_tokens_per_s": 5000.0,
                    "steps": steps, "train_tokens": steps * 2048} if ok else {},
        "curves": {"train": [{"step": steps, "tokens": steps * 2048, "loss": val_loss + 0.1, "seconds": 9.0}],
                   "val": [{"step": steps, "tokens": steps * 2048, "loss": val_loss, "seconds": 9.0}]},
        "config": {"train": {"lr": lr, "max_steps": None if max_flops else steps, "max_flops": max_flops,
                             "batch_size": 16}, "data": {"name": "stdlib"}},
        "started_at": started, "output_dir": str(run_dir), "error": None,
    }
    (run_dir / "results.json").write_text(json.dumps(rec))


def sweep_dir(root, stamp):
    d = Path(root) / "outputs" / "sweeps" / stamp
    d.mkdir(parents=True)
    (d / "multirun.yaml").write_text("hydra: {}\n")
    return d


# ------------------------------------------------------------------------------------- like with like

@pytest.fixture
def mixed(tmp_path):
    """What a user's outputs/ holds after a while: an old sweep, the latest sweep (with two runs of a longer
    budget added to it), a single training run, and task=eval / task=bench records of random weights."""
    old = sweep_dir(tmp_path, "2025-01-30/09-00-00")
    for i, (ffn, seed) in enumerate(itertools.product(("relu", "swiglu"), (0, 1))):
        record(old / f"{i}_old", ffn=ffn, seed=seed, val_loss=2.0, started="2025-01-30T09:00:00+0000")
    new = sweep_dir(tmp_path, "2025-01-31/12-00-00")
    losses = {("relu", 0): 4.00, ("relu", 1): 3.95, ("relu", 2): 3.98,
              ("swiglu", 0): 4.05, ("swiglu", 1): 3.99, ("swiglu", 2): 4.04}
    for i, ((ffn, seed), loss) in enumerate(losses.items()):
        record(new / f"{i}_gqa_rope", ffn=ffn, seed=seed, val_loss=loss, started=f"2025-01-31T12:0{i}:00+0000")
    record(new / "6_gqa_rope", ffn="swiglu", seed=0, val_loss=3.5, steps=300, started="2025-01-31T12:07:00+0000")
    record(new / "7_gqa_rope", ffn="relu", seed=0, val_loss=3.6, steps=300, started="2025-01-31T12:08:00+0000")
    runs = Path(tmp_path) / "outputs" / "runs" / "2025-01-31"
    record(runs / "13-00-00_gqa_rope", ffn="swiglu", val_loss=3.0, steps=300, started="2025-01-31T13:00:00+0000")
    record(runs / "13-10-00_eval", task="eval", val_loss=8.35, started="2025-01-31T13:10:00+0000")
    record(runs / "13-20-00_bench", task="bench", val_loss=8.40, started="2025-01-31T13:20:00+0000")
    return tmp_path, losses


def test_compare_averages_only_like_runs(mixed):
    root, losses = mixed
    runs = gather([root / "outputs"])
    report = build_report(runs, ["outputs"])
    compared = [r for r in report["runs"] if r["left_out"] is None]
    assert sorted(r["name"] for r in compared) == [f"{i}_gqa_rope" for i in range(6)]
    reasons = {r["name"]: r["left_out"] for r in report["runs"] if r["left_out"]}
    assert reasons["6_gqa_rope"].startswith("another budget (300 steps") and reasons["7_gqa_rope"].startswith("another budget")
    assert reasons["13-10-00_eval"].startswith("task=eval") and reasons["13-20-00_bench"].startswith("task=bench")
    assert all(reasons[f"{i}_old"].startswith("another sweep (sweep-2025-01-30_09-00-00)") for i in range(4))
    assert reasons["13-00-00_gqa_rope"].startswith("another sweep (single runs)")
    # the effect of ffn is the plain mean of the like runs only
    fam = {f["family"]: f for f in report["effects"]}["ffn"]
    for c in fam["choices"]:
        assert c["val_loss"] == pytest.approx(statistics.fmean(v for (f, _), v in losses.items() if f == c["choice"]))
    assert [c["choice"] for c in fam["choices"]] == ["relu", "swiglu"]  # ranked by loss
    # every run is listed, in the Markdown and the page, with its task and budget
    out = write_report(report, root / "report", png=False)
    md, page = out[1].read_text(), out[0].read_text()
    for r in runs:
        assert f"`{r['id']}`" in md and r["name"] in page
    assert "| eval |" in md and "300 steps x 16 rows, seq_len=128, data=stdlib" in md
    # two different runs never share a label, nor a label and a colour
    assert len({r["label"] for r in runs}) == len(runs)
    assert len({(r["label"], report["colors"][r["variant_label"]]) for r in runs}) == len(runs)


def test_compare_sweep_and_tasks_choose(mixed):
    root, _ = mixed
    report = build_report(gather([root / "outputs"]), ["outputs"], sweep="sweep-2025-01-30_09-00-00")
    assert sorted(r["name"] for r in report["runs"] if r["left_out"] is None) == [f"{i}_old" for i in range(4)]
    with pytest.raises(ValueError, match="compare.sweep='nope' is not among the sweeps found"):
        build_report(gather([root / "outputs"]), ["outputs"], sweep="nope")
    report = build_report(gather([root / "outputs"]), ["outputs"], tasks=["eval", "bench"])
    assert {r["task"] for r in report["runs"] if r["left_out"] is None} == {"eval", "bench"}


def test_many_variants_get_distinct_colours(tmp_path):
    sweep = sweep_dir(tmp_path, "2025-01-31/12-00-00")
    for i in range(14):
        record(sweep / f"{i}_x", ffn=f"ffn{i}", val_loss=4 + i / 100)
    report = build_report(gather([tmp_path / "outputs"]), ["outputs"])
    assert len(set(report["colors"].values())) == 14


def test_perplexity_interval_is_positive_exp_of_loss(tmp_path):
    """Two seeds far apart: the loss interval crosses zero; perplexity's stays positive (its exponential)."""
    sweep = sweep_dir(tmp_path, "2025-01-31/12-00-00")
    for i, (ffn, seed, loss) in enumerate([("relu", 0, 0.5), ("relu", 1, 6.0), ("swiglu", 0, 4.0), ("swiglu", 1, 4.1)]):
        record(sweep / f"{i}_x", ffn=ffn, seed=seed, val_loss=loss)
    fam = build_report(gather([tmp_path / "outputs"]), ["outputs"])["effects"][0]
    relu = next(c for c in fam["choices"] if c["choice"] == "relu")
    half = 12.706204736174698 * statistics.stdev([0.5, 6.0]) / math.sqrt(2)
    assert relu["val_loss_lo"] == pytest.approx(3.25 - half) and relu["val_loss_lo"] < 0
    assert 0 < relu["val_ppl_lo"] == pytest.approx(math.exp(3.25 - half))
    assert relu["val_ppl_hi"] == pytest.approx(math.exp(3.25 + half))


# ------------------------------------------------------------------------------- tuned learning rates

def lr_sweep(root):
    """ffn x lr x 3 seeds; the losses are chosen so that the best lr is clear by hand:
    relu   1e-3: 4.10 4.20 4.15 (4.15)   3e-3: 3.90 4.00 3.95 (3.95)   1e-2: 4.50 4.40 4.45 (4.45)  -> 3e-3
    swiglu 1e-3: 4.20 4.20 4.20 (4.20)   3e-3: 4.00 4.10 4.05 (4.05)   1e-2: 3.80 3.95 3.86 (3.87)  -> 1e-2, edge"""
    table = {("relu", 1e-3): (4.10, 4.20, 4.15), ("relu", 3e-3): (3.90, 4.00, 3.95), ("relu", 1e-2): (4.50, 4.40, 4.45),
             ("swiglu", 1e-3): (4.20, 4.20, 4.20), ("swiglu", 3e-3): (4.00, 4.10, 4.05),
             ("swiglu", 1e-2): (3.80, 3.95, 3.86)}
    sweep = sweep_dir(root, "2025-01-31/12-00-00")
    job = itertools.count()
    for (ffn, lr), losses in table.items():
        for seed, loss in enumerate(losses):
            n = next(job)
            record(sweep / f"{n}_x", ffn=ffn, lr=lr, seed=seed, val_loss=loss, started=f"2025-01-31T12:{n:02d}:00+0000")
    return table


def test_each_variant_at_its_best_lr(tmp_path):
    table = lr_sweep(tmp_path)
    report = build_report(gather([tmp_path / "outputs"]), ["outputs"])
    tuning = {t["variant_label"]: t for t in report["lr_tuning"]}
    assert tuning["ffn=relu"]["grid"] == [1e-3, 3e-3, 1e-2]
    assert tuning["ffn=relu"]["best_lr"] == 3e-3 and not tuning["ffn=relu"]["at_edge"]
    assert tuning["ffn=swiglu"]["best_lr"] == 1e-2 and tuning["ffn=swiglu"]["at_edge"]
    assert tuning["ffn=relu"]["val_loss"] == pytest.approx([4.15, 3.95, 4.45])
    # effects and verdicts use each variant at its own best lr: swiglu@1e-2 vs relu@3e-3, paired by seed
    v = report["verdicts"][0]
    diffs = [a - b for a, b in zip(table[("swiglu", 1e-2)], table[("relu", 3e-3)])]
    assert (v["choice"], v["reference"], v["n"]) == ("swiglu", "relu", 3)
    assert v["mean"] == pytest.approx(statistics.fmean(diffs))
    md = write_report(report, tmp_path / "r", png=False)[1].read_text()
    assert "## Learning rates" in md and "1e-02 (edge of the grid: widen it)" not in md
    assert "0.01 (edge of the grid: widen it)" in md
    assert "ffn=swiglu lr=0.01 seed=2" in md


# ------------------------------------------------------------------------------------ paired verdicts

KNOWN = [-0.045, -0.105, -0.048, -0.03, -0.07]


def test_paired_interval_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    for diffs in (KNOWN, [0.02, -0.01, 0.03], [0.2, 0.25], [-0.3, 0.1, 0.05, -0.02, 0.0, 0.04, -0.01]):
        d = paired_difference(diffs)
        lo, hi = stats.t.interval(0.95, len(diffs) - 1, loc=statistics.fmean(diffs), scale=stats.sem(diffs))
        assert (d["lo"], d["hi"]) == pytest.approx((lo, hi), rel=1e-9)
        assert d["verdict"] == (BETTER if hi < 0 else WORSE if lo > 0 else UNRESOLVED)
        assert stats.ttest_1samp(diffs, 0).pvalue < 0.05 if d["verdict"] != UNRESOLVED else True


def test_seeds_to_resolve_matches_scipy_by_brute_force():
    stats = pytest.importorskip("scipy.stats")
    for mean, sd in ((0.01, 0.03), (0.05, 0.02), (-0.004, 0.05), (0.3, 0.2), (0.01, 0.1)):
        n = seeds_to_resolve(mean, sd)
        brute = next(k for k in range(2, 10**7) if stats.t.ppf(0.975, k - 1) * sd / math.sqrt(k) < abs(mean))
        assert n == brute, (mean, sd)
    assert seeds_to_resolve(0.0, 0.1) is None and seeds_to_resolve(1e-4, 1.0) is None  # over 100,000 seeds


def test_verdict_line_reads_as_a_sentence():
    d = paired_difference(KNOWN)
    line = verdict_line({"family": "ffn", "choice": "swiglu", "reference": "relu", **d})
    assert re.fullmatch(r"swiglu vs relu: -0\.060 ± 0\.0\d\d val loss, better \[5 seeds\]", line), line
    d = paired_difference([0.02, -0.01, 0.03])
    line = verdict_line({"family": "ffn", "choice": "gelu", "reference": "relu", **d})
    assert "not distinguishable at this budget (about" in line and "seeds would resolve +0.013" in line
    line = verdict_line({"family": "qk_norm", "choice": True, "reference": False, **d})  # a flag names its field
    assert line.startswith("qk_norm=True vs qk_norm=False: +0.013")


def test_reference_choice_from_config(mixed):
    root, _ = mixed
    report = build_report(gather([root / "outputs"]), ["outputs"], reference={"ffn": "swiglu"})
    (v,) = report["verdicts"]
    assert (v["choice"], v["reference"]) == ("relu", "swiglu") and v["verdict"] == BETTER
    with pytest.raises(ValueError, match=r"compare.reference.ffn='geglu' is not among the choices"):
        build_report(gather([root / "outputs"]), ["outputs"], reference={"ffn": "geglu"})
