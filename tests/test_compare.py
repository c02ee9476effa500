"""task=compare: the local report (from real tiny runs and from hand-written results), its statistics
checked against naive computations, and the W&B workspace built with the W&B API replaced."""
import itertools
import json
import math
import os
import random
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from runner import report as compare
from runner.report import build_report, effects, gather, mean_interval, pareto_front, t_quantile, write_report

TINY = ["model.d_model=32", "model.n_layers=1", "model.n_heads=4", "train.max_steps=3", "train.batch_size=4",
        "train.eval_every=3", "train.eval_batches=1", "train.log_every=1", "train.warmup_steps=1",
        "train.bench=false", "train.checkpoint_every=0", "data.max_documents=40", "tokenizer.vocab_size=300",
        "data.seq_len=32", "logger=none"]


def run_py(args, cwd, check=True):
    env = {**os.environ, "WANDB_SILENT": "true", "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "1"}
    out = subprocess.run([sys.executable, str(ROOT / "run.py"), *args], cwd=cwd, capture_output=True, text=True,
                         timeout=300, env=env)
    if check and out.returncode != 0:
        raise AssertionError(f"run.py {' '.join(args)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out


# ------------------------------------------------------------------------------- hand-written results

def write_results(run_dir, attention="gqa", n_kv_heads=2, ffn="swiglu", seed=0, val_ppl=20.0, tokens_per_s=5000.0,
                  status="ok", error=None, peak_memory=None):
    """A results.json as runner/tracking.py writes it (the fields compare reads)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ok = status == "ok"
    curve = [{"step": s, "tokens": 128 * s, "loss": math.log(val_ppl) + 2.0 / s, "lr": 1e-3} for s in range(1, 11)]
    record = {
        "status": status, "task": "train", "params": 50_000,
        "kv_cache_bytes_per_token": 2 * 2 * n_kv_heads * 8 * 4,  # the model's count, recorded once it is built
        "flops_per_token": 6 * (40_000 + 2_000 * n_kv_heads + (8_000 if ffn == "gelu" else 0)) + 12 * 2 * 4 * 8 * 32,
        "variant": {"preset": "gqa_rope", "norm": "rmsnorm", "norm_position": "pre", "ffn": ffn, "position": "rope",
                    "attention": attention, "n_heads": 4, "n_kv_heads": n_kv_heads, "kernel": "sdpa",
                    "window": 16 if attention == "sliding" else None, "attention_schedule": None, "d_model": 32,
                    "n_layers": 2, "seq_len": 32, "seed": seed},
        "metrics": {"val_loss": math.log(val_ppl), "val_ppl": val_ppl, "train_tokens_per_s": tokens_per_s,
                    "final_train_loss": curve[-1]["loss"]} if ok else {},
        "curves": {"train": curve if ok else curve[:2], "val": [{"step": 10, "tokens": 1280,
                                                                 "loss": math.log(val_ppl)}] if ok else []},
        "bench": {"peak_memory_bytes": peak_memory, "kv_cache_bytes_per_token": 2 * 2 * n_kv_heads * 8 * 4}
        if ok and peak_memory else None,
        "error": error, "config": {"train": {"dtype": "auto"}}, "output_dir": str(run_dir), "device": "cpu",
        "started_at": "2025-01-31T12:00:00+0000",
    }
    (run_dir / "results.json").write_text(json.dumps(record))
    return run_dir


def fixture_sweep(root) -> Path:
    """attention × ffn × 3 seeds, plus one failed and one out-of-memory run, as a Hydra multirun."""
    sweep = Path(root) / "outputs" / "sweeps" / "2025-01-31" / "12-00-00"
    sweep.mkdir(parents=True)
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    rng = random.Random(0)
    job = itertools.count()
    for seed, (attention, kv), ffn in itertools.product((0, 1, 2), (("mha", 4), ("gqa", 2), ("mqa", 1)),
                                                        ("swiglu", "gelu")):
        base = {"mha": 20.0, "gqa": 20.5, "mqa": 22.0}[attention] + (0.8 if ffn == "gelu" else 0)
        write_results(sweep / f"{next(job)}_{attention}", attention, kv, ffn, seed,
                      val_ppl=base + rng.uniform(-0.5, 0.5), tokens_per_s=4000 + 600 * (4 - kv) + rng.uniform(0, 300),
                      peak_memory=(30 + kv) * 2 ** 20)
    write_results(sweep / f"{next(job)}_bad", "gqa", 3, status="failed",
                  error={"type": "ValueError", "message": "model.attention.n_kv_heads=3 must divide n_heads=4"})
    write_results(sweep / f"{next(job)}_big", "mha", 4, seed=3, status="oom",
                  error={"type": "OutOfMemoryError", "message": "CUDA out of memory. Tried to allocate 9.00 GiB"})
    return sweep


def fixture_with_long_run(root) -> Path:
    """The sweep above plus a loose run of another budget (300 steps, a bigger model, far faster and lower loss):
    listed in the report, compared with nothing."""
    sweep = fixture_sweep(root)
    run = write_results(Path(root) / "outputs" / "runs" / "2025-01-30" / "10-00-00_long", "mha", 4, "gelu", 0,
                        val_ppl=9.0, tokens_per_s=90_000.0, peak_memory=900 * 2 ** 20)
    record = json.loads((run / "results.json").read_text())
    record["curves"] = {"train": [{"step": s, "tokens": 128 * s, "loss": math.log(9.0) + 2.0 / s} for s in range(1, 301)],
                        "val": [{"step": 300, "tokens": 128 * 300, "loss": math.log(9.0)}]}
    record["variant"].update(d_model=64, preset="mha_rope_long")
    record["config"]["train"]["max_steps"] = 300
    record["started_at"] = "2025-01-30T10:00:00+0000"
    (run / "results.json").write_text(json.dumps(record))
    return sweep


@pytest.fixture
def sweep(tmp_path):
    return fixture_sweep(tmp_path)


# ----------------------------------------------------------------------------------------- statistics

@pytest.mark.parametrize("df, expected", [(1, 12.7062), (2, 4.3027), (3, 3.1824), (4, 2.7764), (9, 2.2622),
                                          (10, 2.2281), (30, 2.0423), (1000, 1.9623)])
def test_t_quantile_matches_tables(df, expected):
    assert t_quantile(0.95, df) == pytest.approx(expected, abs=1e-4)


def test_t_quantile_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in range(1, 60):
        assert t_quantile(0.95, df) == pytest.approx(stats.t.ppf(0.975, df), rel=1e-9)


def test_pareto_front_matches_brute_force():
    rng = random.Random(1)
    for trial in range(300):
        # small integer grids make ties and duplicates common
        points = [(rng.randint(0, 6), rng.randint(0, 6)) for _ in range(rng.randint(1, 12))]
        dominated = {i for i, (ppl, tps) in enumerate(points) for (q_ppl, q_tps) in points
                     if q_ppl <= ppl and q_tps >= tps and (q_ppl, q_tps) != (ppl, tps)}
        assert pareto_front(points) == sorted(set(range(len(points))) - dominated), points


def test_effects_match_a_naive_computation(sweep):
    runs = gather([sweep.parent.parent])
    fams = {f["family"]: f for f in effects(runs)}
    # the preset, norm, ... are the same in every run: only attention, n_kv_heads (its alias), ffn vary
    assert list(fams) == ["ffn", "attention"] and fams["attention"]["same_as"] == ["n_kv_heads"]
    done = [json.loads(p.read_text()) for p in sweep.rglob("results.json")]
    done = [d for d in done if d["status"] == "ok"]
    t2 = 4.302652729911275  # t(0.975, df=2): three seeds
    for family, fam in fams.items():
        for row in fam["choices"]:
            mine = [d for d in done if d["variant"][family] == row["choice"]]
            # intervals are taken on loss (issue 15); perplexity's interval is the exponential of loss's
            per_seed = [statistics.mean(math.log(d["metrics"]["val_ppl"]) for d in mine if d["variant"]["seed"] == s)
                        for s in (0, 1, 2)]
            naive = sum(math.log(d["metrics"]["val_ppl"]) for d in mine) / len(mine)  # balanced: the plain mean
            half = t2 * statistics.stdev(per_seed) / math.sqrt(3)
            assert row["runs"] == len(mine) and row["seeds"] == 3
            assert row["val_loss"] == pytest.approx(naive, rel=1e-12)
            assert (row["val_loss_lo"], row["val_loss_hi"]) == pytest.approx((naive - half, naive + half), rel=1e-9)
            assert (row["val_ppl"], row["val_ppl_lo"], row["val_ppl_hi"]) == pytest.approx(
                (math.exp(naive), math.exp(naive - half), math.exp(naive + half)), rel=1e-9)
        assert [r["val_loss"] for r in fam["choices"]] == sorted(r["val_loss"] for r in fam["choices"])
        assert fam["choices"][0]["delta_ppl"] == 0


def test_one_seed_has_no_interval():
    assert mean_interval([3.0]) == (3.0, None, None)
    m, lo, hi = mean_interval([1.0, 3.0])
    assert (m, lo, hi) == pytest.approx((2.0, 2.0 - 12.7062, 2.0 + 12.7062), abs=1e-3)


# ------------------------------------------------------------------------------------- local report

def test_report_lists_every_run_and_failures(sweep, tmp_path):
    runs = gather([tmp_path / "outputs"])
    assert len(runs) == 20
    report = build_report(runs, ["outputs"])
    files = write_report(report, tmp_path / "report")
    assert {p.name for p in files} == {"report.html", "report.md", "curves.png", "pareto.png", "memory.png",
                                       "effects.png"}
    md = (tmp_path / "report" / "report.md").read_text()
    page = (tmp_path / "report" / "report.html").read_text()
    for r in runs:
        assert f"`{r['id']}`" in md and r["name"] in page
    assert "## Runs that did not finish" in md
    assert re.search(r"- \*\*failed\*\* ffn=swiglu attention=gqa n_kv_heads=3 .*ValueError: model.attention.n_kv", md)
    assert re.search(r"- \*\*oom\*\* ffn=swiglu attention=mha seed=3 .*OutOfMemoryError: CUDA out of memory", md)
    assert '<span class="badge oom">oom</span>' in page and '<span class="badge failed">failed</span>' in page
    front = [r for r in report["runs"] if r["pareto"]]
    assert front and all(r["status"] == "ok" for r in front)
    assert md.count("| ★ ") == len(front)
    # labels name what varies (seed included) and nothing that is implied by it
    assert {r["label"] for r in runs} >= {"ffn=swiglu attention=mha seed=0", "ffn=swiglu attention=gqa n_kv_heads=3 seed=0"}
    for png in files[2:]:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_unreadable_and_running_runs_are_listed(sweep, tmp_path):
    (sweep / "20_cut").mkdir()
    (sweep / "20_cut" / "results.json").write_text('{"status": "ok", "vari')
    write_results(sweep / "21_live", status="running")
    report = build_report(gather([tmp_path / "outputs"]), ["outputs"])
    assert {r["name"]: r["status"] for r in report["not_finished"]} == {
        "18_bad": "failed", "19_big": "oom", "20_cut": "unreadable", "21_live": "running"}
    md = compare.render_markdown(report)
    assert re.search(r"- \*\*unreadable\*\* .*20_cut`\): JSONDecodeError", md)


def test_runs_stopped_by_a_config_error_are_listed_apart(sweep, tmp_path):
    """A run whose config check failed never started: not among the runs that did not finish, in its own list."""
    write_results(sweep / "22_typo", status="failed", error={"type": "ValueError", "config_error": True,
                                                              "message": "model.n_heads=3 does not divide model.d_model=32"})
    report = build_report(gather([tmp_path / "outputs"]), ["outputs"])
    assert "22_typo" not in {r["name"] for r in report["not_finished"]}
    assert [r["name"] for r in report["config_errors"]] == ["22_typo"]
    write_report(report, tmp_path / "report", png=False)
    md, page = (tmp_path / "report" / "report.md").read_text(), (tmp_path / "report" / "report.html").read_text()
    assert "## Stopped by a config error before starting" in md and "22_typo`: ValueError: model.n_heads=3" in md
    assert 'id="config-errors"' in page and "1 stopped by a config error" in page


def test_a_config_error_is_marked_in_results_json(tmp_path, cache_dir):
    run_py([*TINY, f"cache_dir={cache_dir}", "hydra.run.dir=run", "model.n_heads=3"], tmp_path, check=False)
    error = json.loads((tmp_path / "run" / "results.json").read_text())["error"]
    assert error["config_error"] is True and "model.n_heads=3" in error["message"]


def test_html_is_self_contained(sweep, tmp_path):
    write_report(build_report(gather([tmp_path / "outputs"]), ["outputs"]), tmp_path / "r", png=False)
    page = (tmp_path / "r" / "report.html").read_text()
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page), "the page must not load anything"
    data = json.loads(re.search(r'<script id="report-data" type="application/json">(.*?)</script>', page,
                                re.S).group(1).replace("<\\/", "</"))
    assert len(data["runs"]) == 20 and {"val", "train"} <= set(data["runs"][0]["curves"])
    assert page.count('data-chart="effect"') == 2


def test_no_results_is_a_clear_error(tmp_path):
    out = run_py(["task=compare", f"compare.dirs=[{tmp_path / 'nothing'}]", f"hydra.run.dir={tmp_path / 'r'}"],
                 tmp_path, check=False)
    assert out.returncode != 0 and "no results.json under" in out.stderr


# ------------------------------------------------------------------------ the report from real runs

@pytest.fixture(scope="session")
def real_runs(tmp_path_factory):
    """A real tiny sweep (two presets × two seeds), a run that fails its config check, and an
    out-of-memory record beside them (an OOM cannot be provoked on a CPU), then `task=compare` over them.
    Built once per session, also when the browser test imports this fixture."""
    cwd = tmp_path_factory.getbasetemp() / "compare_real_runs"
    if (cwd / "compare.out").exists():
        return cwd, (cwd / "compare.out").read_text()
    cwd.mkdir()
    cache = f"cache_dir={cwd / 'cache'}"
    run_py(["-m", "model=mha_rope,gqa_rope", "train.seed=0,1", *TINY, cache,
            "hydra.sweep.dir=outputs/sweeps/2025-01-31/12-00-00"], cwd)
    bad = run_py([*TINY, cache, "model=gqa_rope", "model.attention.n_kv_heads=3",
                  "hydra.run.dir=outputs/runs/2025-01-31/12-05-00_gqa_rope"], cwd, check=False)
    assert bad.returncode != 0
    oom_dir = cwd / "outputs" / "runs" / "2025-01-31" / "12-10-00_mha_rope"
    record = json.loads(next((cwd / "outputs" / "sweeps").rglob("0_model=mha_rope,*/results.json")).read_text())
    record.update(status="oom", metrics={}, curves={"train": [], "val": []}, output_dir=str(oom_dir),
                  error={"type": "OutOfMemoryError", "message": "CUDA out of memory. Tried to allocate 4.00 GiB"})
    oom_dir.mkdir(parents=True)
    (oom_dir / "results.json").write_text(json.dumps(record))
    out = run_py(["task=compare", "hydra.run.dir=outputs/compare"], cwd).stdout
    (cwd / "compare.out").write_text(out)
    return cwd, out


@pytest.mark.slow
def test_report_from_real_tiny_runs(real_runs):
    cwd, out = real_runs
    report_dir = cwd / "outputs" / "compare"
    results = sorted((cwd / "outputs").rglob("results.json"))
    assert len(results) == 6
    for name in ("report.html", "report.md", "curves.png", "pareto.png", "effects.png"):
        assert (report_dir / name).exists(), name
        assert str(report_dir / name) in out  # it says where it wrote
    assert "6 runs (4 ok, 2 not)" in out
    md = (report_dir / "report.md").read_text()
    page = (report_dir / "report.html").read_text()
    for path in results:
        assert f"`{path.parent.relative_to(cwd)}`" in md and path.parent.name in page  # relative to the cwd
    # the run its config check stopped is listed apart, not among the runs that did not finish
    assert re.search(r"## Stopped by a config error before starting\n\n- `outputs/runs/2025-01-31/12-05-00_gqa_rope`: "
                     r".*n_kv_heads=3 must divide", md)
    assert not re.search(r"- \*\*failed\*\* preset=gqa_rope n_kv_heads=3", md)
    assert re.search(r"- \*\*oom\*\* .*OutOfMemoryError: CUDA out of memory", md)

    runs = gather([cwd / "outputs"])
    by_status = {r["status"] for r in runs}
    assert by_status == {"ok", "failed", "oom"}
    done = [r for r in runs if r["status"] == "ok"]
    assert {r["variant"]["preset"] for r in done} == {"mha_rope", "gqa_rope"} and {r["seed"] for r in done} == {0, 1}
    assert all(r["val_ppl"] > 1 and r["train_tokens_per_s"] > 0 and r["curves"]["val"] for r in done)
    assert {r["group"] for r in done} == {"sweep-2025-01-31_12-00-00"}
    fams = {f["family"]: f for f in effects(runs)}
    assert "preset" in fams  # mha_rope vs gqa_rope (attention and n_kv_heads split the runs the same way)
    for row in fams["preset"]["choices"]:
        mine = [r["val_loss"] for r in done if r["variant"]["preset"] == row["choice"]]
        assert row["runs"] == 2 and row["seeds"] == 2
        assert row["val_loss"] == pytest.approx(sum(mine) / 2)
        half = 12.706204736174698 * statistics.stdev(mine) / math.sqrt(2)  # on loss; perplexity's is its exp
        assert row["val_loss_hi"] - row["val_loss"] == pytest.approx(half, rel=1e-9)
        assert row["val_ppl_hi"] == pytest.approx(math.exp(row["val_loss"] + half), rel=1e-9)
    # the Pareto flags agree with brute force on the real numbers (the default cost: analytic FLOPs/token)
    for r in done:
        beaten = any(q["val_loss"] <= r["val_loss"] and q["flops_per_token"] <= r["flops_per_token"]
                     and (q["val_loss"], q["flops_per_token"]) != (r["val_loss"], r["flops_per_token"])
                     for q in done)
        assert f"{'★ ' if not beaten else ''}{r['label']} |" in md


# ------------------------------------------------------------------------------------ W&B workspace

class FakeApi:
    """Stands in for wandb.Api: a key, a default entity, an app URL; no network."""
    api_key = "k" * 40
    default_entity = "my-team"

    class client:
        app_url = "https://wandb.example"


@pytest.fixture
def fake_wandb(monkeypatch):
    import wandb
    internal = pytest.importorskip("wandb_workspaces.workspaces.internal")
    saved = []

    def upsert_view2(view):  # the GraphQL mutation Workspace.save() sends
        saved.append(view)
        return {"upsertView": {"view": {"name": "v1abc", "id": "VmlldzoxMjM="}}}

    monkeypatch.setattr(wandb, "Api", FakeApi)
    monkeypatch.setattr(internal, "upsert_view2", upsert_view2)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    return saved


def test_wandb_workspace_panels(sweep, tmp_path, fake_wandb, monkeypatch):
    import wandb_workspaces.reports.v2 as wr
    from runner.report import wandb_workspace
    from conftest import compose

    cfg = compose(["task=compare", f"compare.dirs=[{tmp_path / 'outputs'}]", f"compare.out={tmp_path / 'r'}",
                   "compare.wandb=true", "logger.project=proj"])
    built, real_build = [], wandb_workspace.build_workspace
    monkeypatch.setattr(wandb_workspace, "build_workspace", lambda *a, **k: built.append(real_build(*a, **k)) or built[-1])
    compare.main(cfg)
    (ws,) = built
    assert (ws.entity, ws.project, ws.name) == ("my-team", "proj", "compare sweep-2025-01-31_12-00-00")
    assert [s.name for s in ws.sections] == ["Loss curves by variant", "Perplexity vs training tokens/s", "Memory",
                                            "Effect of each choice"]
    curves, scatter, memory, effect = (s.panels for s in ws.sections)
    assert [(type(p), p.y) for p in curves] == [(wr.LinePlot, ["val/loss"]), (wr.LinePlot, ["train/loss"]),
                                                (wr.LinePlot, ["val/ppl"])]
    assert all(p.x == "step" for p in curves)
    sc, pc, rc = scatter
    assert isinstance(sc, wr.ScatterPlot) and (sc.x.name, sc.y.name) == ("train_tokens_per_s", "val_ppl")
    assert [c.metric.name for c in pc.columns] == ["variant.ffn", "variant.attention", "variant.n_kv_heads",
                                                   "val_ppl", "train_tokens_per_s"]
    assert isinstance(rc, wr.RunComparer)
    assert [p.metrics[0].name for p in memory] == ["bench/peak_memory_bytes", "bench/kv_cache_bytes_per_token"]
    assert [p.groupby.name for p in effect] == ["variant.ffn", "variant.attention", "variant.n_kv_heads"]
    assert [g.name for g in ws.runset_settings.groupby] == ["variant.ffn", "variant.attention"]
    assert "sweep-2025-01-31_12-00-00" in str(ws.runset_settings.filters)
    # it was saved once, as a W&B view spec that names the same keys
    (view,) = fake_wandb
    spec = json.dumps(view.model_dump(by_alias=True), default=str)
    for key in ("val/loss", "summary:val_ppl", "summary_metrics.bench/peak_memory_bytes", "variant.value.ffn"):
        assert key in spec
    assert (tmp_path / "r" / "report.html").exists()  # the local report is written too


def test_wandb_without_api_key_fails_first(sweep, tmp_path, monkeypatch):
    import wandb

    def no_key():
        raise wandb.errors.UsageError("No API key configured. Use `wandb login` to log in.")

    monkeypatch.setattr(wandb, "Api", no_key)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    from conftest import compose
    cfg = compose(["task=compare", f"compare.dirs=[{tmp_path / 'outputs'}]", f"compare.out={tmp_path / 'r'}",
                   "compare.wandb=true"])
    with pytest.raises(RuntimeError, match="no W&B API key is configured: run `wandb login` or set WANDB_API_KEY"):
        compare.main(cfg)
    assert not (tmp_path / "r").exists()  # nothing was written


# ------------------------------------------------------- the page shows the compared runs only (issue 26)

def _page_data(page: str) -> dict:
    return json.loads(re.search(r'<script id="report-data" type="application/json">(.*?)</script>', page,
                                re.S).group(1).replace("<\\/", "</"))


def test_charts_and_cards_show_the_compared_runs_only(tmp_path):
    """A run of another budget and sweep (faster, lower loss, 300 steps) stays in the runs table but is in no
    chart, card or plot: the cards name the best compared run by a naive search over the compared records."""
    sweep = fixture_with_long_run(tmp_path)
    report = build_report(gather([tmp_path / "outputs"]), ["outputs"])
    write_report(report, tmp_path / "r", png=True)
    page = (tmp_path / "r" / "report.html").read_text()
    records = [json.loads(p.read_text()) for p in sweep.rglob("results.json")]  # the sweep's runs: the compared
    ok = [d for d in records if d["status"] == "ok"]
    data = _page_data(page)
    assert len(data["runs"]) == len(records) and "10-00-00_long" not in json.dumps(data["runs"])
    assert "10-00-00_long" in page.split('id="runs-table"')[1].split("</table>")[0]  # still listed
    cards = dict(re.findall(r'<div class="k">([^<]*)</div><div class="v">([^<]*)</div>', page))
    assert cards["fastest training"] == f"{max(d['metrics']['train_tokens_per_s'] for d in ok):,.0f} tok/s"
    assert cards["lowest validation loss"] == f"{min(d['metrics']['val_loss'] for d in ok):.4f}"
    assert cards["compared runs"] == f"{len(ok)} ok / {len(records)}"
    fastest = max(ok, key=lambda d: d["metrics"]["train_tokens_per_s"])["variant"]
    card = page.split("fastest training")[1].split('<div class="card">')[0]
    assert f"ffn={fastest['ffn']}, attention={fastest['attention']}, seed={fastest['seed']}" in card
    assert set(data["variants"]) == {r["variant_label"] for r in report["runs"] if r["left_out"] is None}


def test_short_labels_name_the_choices_varied_among_the_compared_runs(tmp_path):
    """preset and d_model differ only in the run left out: the compared runs' names leave them out, and the
    whole variant is in the tooltip."""
    fixture_with_long_run(tmp_path)
    runs = gather([tmp_path / "outputs"])
    report = build_report(runs, ["outputs"])
    by_name = {r["name"]: r for r in report["runs"]}
    assert by_name["0_mha"]["short"] == "ffn=swiglu, attention=mha, seed=0"
    assert by_name["0_mha"]["variant_short"] == "ffn=swiglu, attention=mha"
    assert by_name["18_bad"]["short"] == "ffn=swiglu, attention=gqa, n_kv_heads=3, seed=0"  # the odd field out
    assert "preset=mha_rope_long" in by_name["10-00-00_long"]["short"]  # left out: named against every run
    assert by_name["0_mha"]["title"].startswith("preset=gqa_rope, norm=rmsnorm, norm_position=pre, ffn=swiglu")
    assert "d_model=32" in by_name["0_mha"]["title"] and "budget: 10 steps, seq_len=32" in by_name["0_mha"]["title"]
    compared = [r for r in report["runs"] if r["left_out"] is None]
    assert len({r["short"] for r in compared}) == len(compared)  # distinct
    write_report(report, tmp_path / "r", png=False)
    page = (tmp_path / "r" / "report.html").read_text()
    assert f'<span title="{by_name["0_mha"]["title"]}">ffn=swiglu, attention=mha, seed=0</span>' in page


def test_intervals_of_throughput_are_taken_on_the_log_scale():
    """Two seeds with very different tokens/s: the arithmetic t-interval crosses zero; the report's is exp of the
    t-interval of the logs (checked against a naive computation), positive and around the geometric mean."""
    t1 = 12.706204736174707  # t(0.975, df=1)

    def run(i, ffn, seed, tps):
        return {"id": str(i), "status": "ok", "val_loss": 3.0 + 0.1 * seed, "train_tokens_per_s": tps, "seed": seed,
                "variant": {"ffn": ffn, "seed": seed}}

    speeds = {"relu": (100.0, 900.0), "gelu": (400.0, 500.0)}
    runs = [run(i, ffn, seed, speeds[ffn][seed]) for i, (ffn, seed) in enumerate(itertools.product(speeds, (0, 1)))]
    rows = {row["choice"]: row for row in effects(runs)[0]["choices"]}
    for ffn, (a, b) in speeds.items():
        logs = [math.log(a), math.log(b)]
        half = t1 * statistics.stdev(logs) / math.sqrt(2)
        naive = (math.exp(statistics.mean(logs)), math.exp(statistics.mean(logs) - half),
                 math.exp(statistics.mean(logs) + half))
        row = rows[ffn]
        assert (row["train_tokens_per_s"], row["train_tokens_per_s_lo"], row["train_tokens_per_s_hi"]) == \
            pytest.approx(naive, rel=1e-9)
        assert 0 < row["train_tokens_per_s_lo"] < math.sqrt(a * b) < row["train_tokens_per_s_hi"]
    arithmetic = mean_interval(list(speeds["relu"]))
    assert arithmetic[1] < 0  # what the report showed before: `500 [-4582, 5582]`
    # losses keep their arithmetic interval (a difference of losses may be negative)
    m, lo, hi = mean_interval([3.0, 3.1])
    assert (rows["relu"]["val_loss"], rows["relu"]["val_loss_lo"], rows["relu"]["val_loss_hi"]) == pytest.approx((m, lo, hi))
