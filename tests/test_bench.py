"""The benchmark suite on CPU at tiny sizes: every documented figure is there, the KV-cache size is what
the arithmetic says, an out-of-memory point does not stop the suite, task=bench writes results.json, and
our model is compared with transformers' Phi-3 on the same weights."""
import importlib.util
import json
import math
import os
import subprocess
import sys
import time

import pytest
import torch
from omegaconf import OmegaConf

import runner.bench.suite as bench_module
from conftest import CONF, ROOT, compose, tiny_model
from runner.bench import kv_cache_size, run_suite
from runner.bench.timing import guarded, time_fn

# The bench section's stable names (runner/bench/BENCH.md documents each; other tools read them).
FIELDS = ["train_tokens_per_s", "mfu", "prefill_tokens_per_s", "decode_tokens_per_s", "decode_tokens_per_s_no_cache",
          "kv_cache_speedup", "kv_cache_bytes_per_token", "kv_cache_bytes_per_token_analytic",
          "kv_cache_matches_analytic", "peak_memory_bytes", "peak_memory", "memory_kind", "device", "dtype", "torch",
          "flops_per_token", "peak_flops", "weight_bytes", "decode_fraction_of_bandwidth_bound",
          "decode_bandwidth_bound_tokens_per_s", "val_ppl", "val_loss", "val_tokens", "train", "prefill", "decode",
          "kernels", "reference", "compile", "decode_tokens_per_s_compiled", "compile_speedup",
          "decode_bandwidth_utilization", "fused_projections"]
REFERENCE_FIELDS = ["forward_time_ratio", "prefill_speed_ratio", "decode_speed_ratio", "peak_memory_ratio",
                    "max_logit_diff", "logits_agree", "greedy_match_fraction"]
# null where bench.compile is off (the default on CPU), with a reason
COMPILED_REFERENCE_FIELDS = ["decode_speed_ratio_static", "decode_speed_ratio_eager", "decode_ours"]
# Small enough that a whole suite takes a second or two on a laptop CPU.
SMALL = {"warmup": 1, "repeats": 2, "new_tokens": 8,
         "cpu": {"prompt_lengths": [8, 16], "decode_prompt_length": 8, "batch_sizes": [1, 2],
                 "no_cache_batch_sizes": [1], "kernel_seq_lens": [32], "kernel_window": 8,
                 "reference_prompt_length": 8}}
HAS_HF = importlib.util.find_spec("variants.hf") is not None


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors gain nothing from threads, and spinning threads slow a busy CI machine tenfold."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def bench_cfg(**overrides):
    bench = OmegaConf.merge(OmegaConf.load(CONF / "bench" / "default.yaml"), SMALL, overrides)
    return OmegaConf.create({"bench": bench, "data": {"seq_len": 32}, "train": {"batch_size": 2}, "model": {}})


def test_suite_runs_end_to_end_and_returns_every_documented_field():
    model = tiny_model(n_kv_heads=2)
    bench = run_suite(model, bench_cfg(), "cpu", metrics={"val_ppl": 9.5, "val_loss": 2.25})
    for key in FIELDS:
        assert key in bench, key
    points = bench["train"] + bench["prefill"] + bench["decode"] + bench["kernels"]
    assert points and all(p["status"] == "ok" for p in points), [p for p in points if p["status"] != "ok"]
    assert len(bench["kernels"]) == 3 * 3  # eager/sdpa/flex x causal/documents/sliding at one length
    for key in ("train_tokens_per_s", "prefill_tokens_per_s", "decode_tokens_per_s", "decode_tokens_per_s_no_cache",
                "kv_cache_speedup", "peak_memory_bytes"):
        assert bench[key] > 0, key
    assert bench["mfu"] is None and bench["decode_fraction_of_bandwidth_bound"] is None  # CPU
    assert bench["val_ppl"] == 9.5 and bench["dtype"] == "float32"
    assert bench["kv_cache_bytes_per_token"] == 2 * 2 * 2 * 8 * 4  # K+V x layers x kv heads x head_dim x fp32
    for p in bench["kernels"]:  # every kernel computes the same attention as the eager one
        assert p["kernel"] == "eager" or p["max_abs_diff"] < 1e-4, p
    for p in points:
        assert p["min_s"] <= p["median_s"] <= p["max_s"] and p["repeats"] == 2
    json.dumps(bench)  # results.json-ready


def test_suite_leaves_the_model_as_it_was():
    model = tiny_model().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    run_suite(model, bench_cfg(dtype="bfloat16", run={"kernels": False}), "cpu")
    assert model.training and all(p.grad is None for p in model.parameters())
    after = model.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())


def test_bfloat16_inference_on_cpu():
    bench = run_suite(tiny_model(), bench_cfg(dtype="bfloat16", run={"kernels": False, "train": False}), "cpu")
    assert bench["dtype"] == "bfloat16" and bench["train"] == []
    assert bench["kv_cache_bytes_per_token"] == 2 * 2 * 4 * 8 * 2  # bf16: 2 bytes
    assert all(p["status"] == "ok" for p in bench["prefill"] + bench["decode"])


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_cache_size_matches_the_analytic_size(n_kv_heads, dtype):
    model = tiny_model(n_heads=4, d_model=32, n_layers=3, n_kv_heads=n_kv_heads)
    size = kv_cache_size(model, dtype, batch_size=2, max_len=16)
    analytic = 2 * 3 * n_kv_heads * 8 * dtype.itemsize  # K+V x layers x kv heads x head_dim x bytes
    assert size["kv_cache_bytes_per_token"] == size["kv_cache_bytes_per_token_analytic"] == analytic
    assert size["kv_cache_matches_analytic"] and size["kv_cache_allocated_bytes"] == analytic * 2 * 16
    assert analytic == model.kv_cache_bytes_per_token(dtype)


def test_out_of_memory_point_is_recorded_and_the_suite_goes_on(monkeypatch):
    measure = bench_module.measure_decode

    def fake(model, batch_size, prompt_length, new_tokens, use_cache, *args):
        if not use_cache:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")
        return measure(model, batch_size, prompt_length, new_tokens, use_cache, *args)

    monkeypatch.setattr(bench_module, "measure_decode", fake)
    bench = run_suite(tiny_model(), bench_cfg(), "cpu")
    no_cache = [p for p in bench["decode"] if not p["cache"]]
    assert [p["status"] for p in no_cache] == ["oom"] and no_cache[0]["batch_size"] == 1
    assert all(p["status"] == "ok" for p in bench["decode"] if p["cache"])
    assert bench["decode_tokens_per_s"] > 0 and bench["decode_tokens_per_s_no_cache"] is None
    assert bench["kv_cache_speedup"] is None
    assert bench["kernels"] and all(p["status"] == "ok" for p in bench["kernels"])  # later parts still ran


def test_guarded_tells_oom_from_other_failures():
    def cpu_oom():
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes")

    def bug():
        raise ValueError("shapes do not match")

    oom = guarded(cpu_oom, "cpu", seq_len=8)
    assert oom["status"] == "oom" and oom["seq_len"] == 8 and "can't allocate" in oom["error"]
    failed = guarded(bug, "cpu")
    assert failed["status"] == "failed" and "shapes do not match" in failed["error"]


def test_timing_excludes_setup_and_reports_the_spread():
    timing = time_fn(lambda: None, "cpu", warmup=1, repeats=5, setup=lambda: time.sleep(0.02))
    assert timing["repeats"] == 5 and timing["max_s"] < 0.02
    assert timing["min_s"] <= timing["median_s"] <= timing["max_s"] and timing["iqr_s"] >= 0


def test_device_peaks_are_null_on_cpu():
    from runner.bench import device_peak_flops
    from runner.bench.flops import device_memory_bandwidth
    assert device_peak_flops("cpu") is None and device_memory_bandwidth("cpu") is None


def test_every_field_is_documented():
    doc = (ROOT / "runner" / "bench" / "BENCH.md").read_text()
    for key in FIELDS + REFERENCE_FIELDS + COMPILED_REFERENCE_FIELDS:
        assert f"`{key}`" in doc, key


TINY = ["model.d_model=32", "model.n_layers=1", "model.n_heads=2", "data.seq_len=32", "tokenizer.vocab_size=300",
        "logger=none", "bench.repeats=2", "bench.new_tokens=8", "bench.cpu.prompt_lengths=[8,16]",
        "bench.cpu.decode_prompt_length=8", "bench.cpu.kernel_seq_lens=[32]", "bench.cpu.kernel_window=8",
        "bench.cpu.reference_prompt_length=8", "train.batch_size=2", "train.device=cpu"]


@pytest.mark.slow
def test_bench_task_writes_results_json_with_every_field(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "run.py"), "task=bench", *TINY, "hydra.run.dir=run"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    record = json.loads((tmp_path / "run" / "results.json").read_text())
    assert record["status"] == "ok" and record["task"] == "bench" and record["params"] > 0
    for key in FIELDS:
        assert key in record["bench"], key
    assert record["bench"]["reference"]["status"] == "skipped"  # gqa_rope is not a Phi-3 preset
    assert record["bench"]["perplexity"]["status"] == "skipped" and record["bench"]["val_ppl"] is None  # random
    assert "KV cache speed-up" in out.stdout and "attention kernels" in out.stdout  # the printed table
    assert "perplexity skipped: random weights" in out.stdout


# Perplexity through task=eval's path; only the cheap parts of the suite run.
QUICK = ["model.d_model=32", "model.n_layers=1", "model.n_heads=2", "data.seq_len=32", "data.max_documents=60",
         "tokenizer.vocab_size=300", "train.batch_size=4", "logger=none", "bench.reference=false",
         "bench.eval_batches=3", *[f"bench.run.{part}=false" for part in ("train", "prefill", "decode", "kernels")]]


def test_bench_perplexity_of_a_training_checkpoint_is_task_evals(tmp_path, cache_dir, monkeypatch, capsys):
    """bench.perplexity=auto is on for eval.weights, and scores what task=eval scores on as many batches."""
    from runner.bench import main as bench_main
    from runner.build import build_model
    from runner.checkpoint import save_checkpoint
    from runner.evaluate import main as eval_main
    monkeypatch.chdir(tmp_path)  # results.json: the cwd outside Hydra
    overrides = [*QUICK, "model.attention.n_kv_heads=1", f"cache_dir={cache_dir}", f"eval.weights={tmp_path}"]
    torch.manual_seed(7)
    save_checkpoint(tmp_path, 5, {"model": build_model(compose(overrides).model).state_dict()})
    record = bench_main(compose(["task=bench", *overrides]))
    bench = record["bench"]
    assert record["status"] == "ok" and bench["perplexity"]["status"] == "ok"
    assert bench["val_ppl"] == pytest.approx(math.exp(bench["val_loss"]), rel=1e-12)
    assert bench["val_loss"] == record["metrics"]["val_loss"] and record["metrics"]["val_rows"] == 3 * 4
    assert "perplexity" in capsys.readouterr().out
    evaluated = eval_main(compose(["task=eval", *overrides, "eval.batches=3"]))["metrics"]
    assert (bench["val_loss"], bench["val_tokens"]) == (evaluated["val_loss"], evaluated["val_tokens"])
    assert record["weights"].endswith("step_0000005.pt")


@pytest.mark.parametrize("preset", ["phi3", "gqa_rope"])
def test_bench_perplexity_of_random_weights_on_request(preset, tmp_path, cache_dir, monkeypatch):
    """bench.perplexity=true on random weights; model=phi3 takes its vocabulary from tokenizer.vocab_size."""
    from runner.bench import main as bench_main
    monkeypatch.chdir(tmp_path)
    record = bench_main(compose(["task=bench", f"model={preset}", *QUICK, f"cache_dir={cache_dir}",
                                 "bench.perplexity=true"]))
    bench = record["bench"]
    assert record["status"] == "ok" and bench["perplexity"]["status"] == "ok"
    assert math.log(300) - 0.5 < bench["val_loss"] < math.log(300) + 1.0  # random weights: ~ uniform over 300 ids
    assert bench["val_tokens"] > 0 and record["metrics"]["val_ppl"] == bench["val_ppl"]


def test_bench_of_a_checkpoint_without_its_tokenizer(tmp_path, monkeypatch):
    """auto skips perplexity (the benchmark itself needs no tokenizer); true refuses before any work."""
    from runner.bench import main as bench_main, wants_perplexity
    cfg = compose(["task=bench", "model=phi3", f"model.checkpoint={tmp_path / 'never-read'}", *QUICK])
    run, reason = wants_perplexity(cfg)
    assert not run and "tokenizer=hf" in reason
    monkeypatch.chdir(tmp_path)
    cfg.bench.perplexity = True
    with pytest.raises(ValueError, match="tokenizer=hf"):
        bench_main(cfg)
    assert json.loads((tmp_path / "results.json").read_text())["status"] == "failed"


@pytest.mark.skipif(not HAS_HF, reason="variants/hf.py (the Phi-3 mapping) has not landed yet")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_reference_comparison_against_transformers_phi3(dtype):
    from runner.build import build_model
    cfg = compose(["model=phi3", "model.d_model=32", "model.n_layers=2", "model.n_heads=4", "data.seq_len=32",
                   "tokenizer.vocab_size=300", "logger=none"])
    cfg.bench = bench_cfg(dtype=dtype, run={"train": False, "prefill": False, "decode": False, "kernels": False}).bench
    bench = run_suite(build_model(cfg.model, "cpu"), cfg, "cpu")  # reference=auto: model=phi3 is Phi-3
    ref = bench["reference"]
    assert ref["status"] == "ok", ref
    for key in REFERENCE_FIELDS:
        assert ref[key] is not None and ref[key] >= 0, key
    assert ref["logits_agree"] and ref["greedy_match_fraction"] == 1.0
    if dtype == "float32":
        assert ref["max_logit_diff"] < 1e-4
    assert ref["attn_implementation"] == "sdpa" and ref["new_tokens"] == 8
    assert ref["decode_ours"] == "eager" and ref["decode_speed_ratio"] == ref["decode_speed_ratio_eager"]
    assert ref["decode_speed_ratio_static"] is None and "bench.compile" in ref["decode_speed_ratio_static_reason"]


def test_compile_speedup_and_bandwidth_utilization_from_the_points(monkeypatch):
    """The headline figures from hand-made points: compiled / eager at batch 1, and bytes read per step
    (weights + each row's cache so far) x steps/s over a data-sheet bandwidth; null with a reason without one."""
    model = tiny_model(n_kv_heads=2)  # KV cache: 2 x 2 layers x 2 heads x 8 x 4 bytes = 256 bytes/token
    point = dict(status="ok", prompt_length=8, new_tokens=8, cache=True, peak_memory_bytes=1)
    bench = {"train": [], "prefill": [], "kernels": [], "weight_bytes": 10_000, "dtype": "float32",
             "decode": [{**point, "batch_size": 1, "compiled": False, "tokens_per_s": 100.0},
                        {**point, "batch_size": 2, "compiled": False, "tokens_per_s": 150.0},
                        {**point, "batch_size": 1, "compiled": True, "tokens_per_s": 250.0}]}
    bench_module.summarize_suite(bench, model, 32, "cpu")
    assert bench["decode_tokens_per_s_compiled"] == 250.0 and bench["compile_speedup"] == 2.5
    assert bench["decode_bandwidth_utilization"] is None and "cpu" in bench["decode_bandwidth_utilization_reason"]
    monkeypatch.setattr(bench_module, "datasheet_bandwidth", lambda device: 1e7)
    bench_module.summarize_suite(bench, model, 32, "cpu")
    step_bytes = 10_000 + 1 * (8 + 4) * 256  # weights + one row's cache, 12 tokens on average
    assert bench["decode_bandwidth_utilization"] == pytest.approx(step_bytes * 250.0 / 1e7)
    assert bench["decode"][1]["bandwidth_utilization"] == pytest.approx((10_000 + 2 * 12 * 256) * 75.0 / 1e7)


def test_reference_is_skipped_for_other_presets_unless_asked():
    cfg = compose(["model=gqa_rope", "data.seq_len=32", "tokenizer.vocab_size=300", "logger=none"])
    cfg.bench = bench_cfg(run={"train": False, "prefill": False, "decode": False, "kernels": False}).bench
    assert run_suite(tiny_model(), cfg, "cpu")["reference"]["status"] == "skipped"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_suite_on_cuda_reports_mfu_and_the_bandwidth_bound():
    model = tiny_model(n_kv_heads=2).cuda()
    bench = run_suite(model, bench_cfg(profile="cpu"), "cuda")
    points = bench["train"] + bench["prefill"] + bench["decode"] + bench["kernels"]
    assert all(p["status"] == "ok" for p in points), [p for p in points if p["status"] != "ok"]
    assert bench["dtype"] == "bfloat16" and bench["memory_kind"] == "cuda_max_memory_allocated"
    assert bench["mfu"] > 0 and bench["peak_flops"] > 0 and bench["decode_fraction_of_bandwidth_bound"] > 0
    assert bench["train"][0]["autocast"] == "bfloat16"
    assert next(model.parameters()).dtype == torch.float32 and next(model.parameters()).is_cuda  # restored


GPU_SCRIPTS = ("gpu_smoke.sh", "gpu_tables.sh")


def gpu_script_runs(script: str, tiny: bool) -> dict[str, list[str]]:
    """The `python3 run.py` overrides each run of a GPU script makes, as the script prints them with GPU_CHECK=1."""
    env = {**os.environ, "GPU_CHECK": "1", "GPU_TINY": "1" if tiny else "0"}
    out = subprocess.run(["bash", str(ROOT / "runner" / "bench" / script)], env=env, capture_output=True, text=True,
                         check=True).stdout
    return {line.split("\t")[0]: line.split("\t")[1:] for line in out.splitlines()}


@pytest.mark.parametrize("tiny", [False, True], ids=["gpu_sizes", "tiny"])
@pytest.mark.parametrize("script", GPU_SCRIPTS)
def test_gpu_scripts_compose_and_pass_the_pre_run_checks(script, tiny):
    """Every run of runner/bench/gpu_smoke.sh and gpu_tables.sh composes (keys exist, values parse) and passes
    the checks its task makes before any work, at the GPU sizes too: a typo must not cost a GPU slot."""
    from conftest import compose
    from runner.build import check_model_config
    from runner.compute import resolve_compile
    from runner.train import check_train_config

    runs = gpu_script_runs(script, tiny)
    expected = {"gpu_smoke.sh": {"default_train", "phi3_decode", "moe_compiled", "gpt2_124m_step"},
                "gpu_tables.sh": {"phi3_mini_decode", "gpt2_124m_train_compile_false", "gpt2_124m_train_compile_true",
                                  "attention_kernels"}}[script]
    assert set(runs) == expected
    for name, overrides in runs.items():
        cfg = compose(overrides)
        check_model_config(cfg.model)
        assert cfg.train.device == ("auto" if tiny else "cuda"), name  # a GPU run must not measure a CPU quietly
        if cfg.task == "train":
            check_train_config(cfg)
        else:
            assert cfg.task == "bench", name
            resolve_compile(cfg.bench.compile, "cpu")
            assert cfg.model.get("vocab_size") is not None, name
    if script == "gpu_tables.sh":  # eager and compiled training: the same model and vocabulary, only compile differs
        eager, compiled = (compose(runs[f"gpt2_124m_train_compile_{c}"]) for c in ("false", "true"))
        assert eager.model == compiled.model and eager.train.compile is False and compiled.train.compile is True
        if not tiny:
            assert eager.model.vocab_size == 50304 and eager.model.d_model == 768 and eager.data.seq_len == 1024


@pytest.mark.slow
@pytest.mark.parametrize("script", GPU_SCRIPTS)
def test_gpu_scripts_run_end_to_end_at_tiny_sizes(script, tmp_path, cache_dir):
    """The whole script on this machine's device at tiny sizes: every run succeeds, each results.json reaches
    OUT, the log holds TORCH_LOGS' output, and the summary has the tables a GPU slot would commit."""
    out = tmp_path / "out"
    env = {**os.environ, "GPU_TINY": "1", "OUT": str(out), "GPU_WORK": str(tmp_path / "work"), "PY": sys.executable,
           "VARIANTS_CACHE_DIR": str(cache_dir)}
    done = subprocess.run(["bash", str(ROOT / "runner" / "bench" / script)], env=env, capture_output=True, text=True,
                          timeout=1200)
    name = script.removesuffix(".sh")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:] + (out / f"{name}.log").read_text()[-5000:]
    runs = set(gpu_script_runs(script, tiny=True))
    for run in runs:
        record = json.loads((out / run / "results.json").read_text())
        assert record["status"] == "ok", (run, record.get("error"))
    steps = [row.split("\t") for row in (out / "steps.tsv").read_text().splitlines()]
    assert {row[0] for row in steps} == runs and all(row[1] == "0" for row in steps)
    assert json.loads((out / "versions.json").read_text())["torch"] == torch.__version__
    summary = (out / "summary.md").read_text()
    assert all(f"| {run} | 0 |" in summary for run in runs)
    sections = {"gpu_smoke.sh": ["### Training", "### Decode", "### Against transformers"],
                "gpu_tables.sh": ["### Training", "### Decode", "### Against transformers", "### Attention kernels"]}
    assert all(section in summary for section in sections[script])


@pytest.mark.parametrize("overrides, expected", [
    (["task=bench", "model=phi3"], True),                         # compared with transformers: compiled
    (["task=bench"], False),                                       # the default preset on CPU: eager only
    (["model=phi3"], False),                                       # the benchmark after training: eager on CPU
    (["task=bench", "model=phi3", "bench.compile=false"], False),
    (["task=bench", "bench.compile=true"], True),
])
def test_bench_compile_auto(overrides, expected):
    from conftest import compose
    assert bench_module.bench_compiles(compose(overrides), torch.device("cpu")) is expected


def test_gpu_report_counts_recompiles_and_graph_breaks_per_run():
    """Lines as TORCH_LOGS=recompiles,graph_breaks prints them (torch 2.13), attributed to the run whose
    `=== name (cap ...)` header precedes them."""
    from runner.bench.gpu_report import log_counts
    log = "\n".join([
        "=== default_train (cap 150s): python3 run.py train.max_steps=40",
        "V1204 17:56:04.242000 6438 torch/_dynamo/guards.py:5396] [0/1] [__recompiles] Recompiling function "
        "_flex_attention_hop_wrapper in torch/nn/attention/flex_attention.py:2497",
        "V1204 17:56:04.242000 6438 torch/_dynamo/guards.py:5396] [0/1] [__recompiles]     triggered by the "
        "following guard failure(s):",
        "=== default_train: exit 0 in 23s",
        "=== moe_compiled (cap 120s): python3 run.py model/ffn=moe",
        "V1204 17:59:10.356000 7190 torch/_dynamo/symbolic_convert.py:610] [1/0] [__graph_breaks] Graph break in "
        "user code at variants/moe.py:91",
        "V1204 17:59:11.356000 7190 torch/_dynamo/symbolic_convert.py:610] [2/0] [__graph_breaks] Graph break in "
        "user code at variants/moe.py:91",
    ])
    assert log_counts(log) == {"default_train": {"recompiles": 1, "graph_breaks": 0},
                               "moe_compiled": {"recompiles": 0, "graph_breaks": 2}}


@pytest.mark.slow
def test_gpu_script_past_its_deadline_skips_the_remaining_runs_and_fails(tmp_path):
    """GPU_DEADLINE_S bounds a script whatever its compiles cost: runs that would start past it are skipped,
    recorded as such, and the script exits non-zero (the summary is still written)."""
    out = tmp_path / "out"
    env = {**os.environ, "GPU_TINY": "1", "GPU_DEADLINE_S": "0", "OUT": str(out), "GPU_WORK": str(tmp_path / "w"),
           "PY": sys.executable}
    done = subprocess.run(["bash", str(ROOT / "runner" / "bench" / "gpu_smoke.sh"), "default", "phi3"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stdout + done.stderr
    rows = [row.split("\t") for row in (out / "steps.tsv").read_text().splitlines()]
    assert rows == [["default_train", "skipped", "0"], ["phi3_decode", "skipped", "0"]]  # only the sections asked
    assert "| default_train | skipped |" in (out / "summary.md").read_text()
    assert not (tmp_path / "w" / "default_train").exists()
