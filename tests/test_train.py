"""The main job end to end on tiny configs, in subprocesses exactly as users run it."""
import json
import math
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT
from hold_phase import HeldRun

TINY = ["model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.attention.n_kv_heads=1",
        "train.max_steps=6", "train.batch_size=4", "train.eval_every=3", "train.eval_batches=2",
        "train.log_every=1", "train.warmup_steps=2", "train.bench=false", "data.max_documents=60",
        "tokenizer.vocab_size=300", "data.seq_len=32", "logger=none"]


def run(args, cwd, cache_dir, check=True, env=None, **kwargs):
    flags = [a for a in args if a.startswith("-")]  # Hydra's flags (-m) go before the overrides
    cmd = [sys.executable, str(ROOT / "run.py"), *flags, *TINY, f"cache_dir={cache_dir}",
           *[a for a in args if not a.startswith("-")]]
    full_env = {**os.environ, "WANDB_SILENT": "true", **(env or {})}
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300, env=full_env, **kwargs)
    if check and out.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out


def results(run_dir) -> dict:
    return json.loads((Path(run_dir) / "results.json").read_text())


def test_results_json_holds_the_run(tmp_path, cache_dir):
    out = run(["hydra.run.dir=run"], tmp_path, cache_dir)
    r = results(tmp_path / "run")
    assert r["status"] == "ok"
    assert r["variant"]["preset"] == "gqa_rope" and r["variant"]["attention"] == "gqa"
    assert r["variant"]["n_kv_heads"] == 1 and r["variant"]["norm"] == "rmsnorm"
    assert r["params"] > 0
    m = r["metrics"]
    for key in ("val_loss", "val_ppl", "final_train_loss", "train_tokens_per_s", "val_tokens"):
        assert m[key] is not None and m[key] > 0, key
    assert m["val_ppl"] == pytest.approx(math.exp(m["val_loss"]), rel=1e-9)
    assert [p["step"] for p in r["curves"]["train"]] == [1, 2, 3, 4, 5, 6]
    assert [p["step"] for p in r["curves"]["val"]] == [3, 6]
    assert r["config"]["model"]["d_model"] == 32 and r["versions"]["torch"]
    assert "val loss / ppl" in out.stdout  # the summary table


@pytest.mark.slow
def test_moe_run_trains_and_reports_the_balance_loss_and_active_parameters(tmp_path, cache_dir):
    run(["hydra.run.dir=run", "model/ffn=moe", "model.ffn.n_experts=4", "model.ffn.top_k=1"], tmp_path, cache_dir)
    r = results(tmp_path / "run")
    assert r["status"] == "ok" and r["variant"]["ffn"] == "moe"
    aux = [p["aux_loss"] for p in r["curves"]["train"]]
    # Switch loss x coef 0.01, one layer: about 1 when balanced, at most n_experts when one expert takes all
    assert len(aux) == 6 and all(0.005 < a <= 0.04 for a in aux)
    assert r["params_active"] < r["params"]


@pytest.mark.slow
def test_resume_reproduces_the_uninterrupted_run_exactly(tmp_path, cache_dir):
    # log_every=2 with a checkpoint at step 3: the logged point at step 4 averages a step from each side
    run(["hydra.run.dir=run", "train.checkpoint_every=3", "train.log_every=2"], tmp_path, cache_dir)
    full = results(tmp_path / "run")["curves"]
    ckpts = sorted((tmp_path / "run" / "checkpoints").glob("step_*.pt"))
    assert [c.name for c in ckpts] == ["step_0000003.pt", "step_0000006.pt"]
    ckpts[-1].unlink()  # as if the run had died after step 3's checkpoint
    (tmp_path / "run" / "checkpoints" / ".tmp_step_0000005.pt").write_bytes(b"half-written")  # never loaded
    run(["hydra.run.dir=run", "train.checkpoint_every=3", "train.log_every=2", "train.resume=true"], tmp_path,
        cache_dir)
    resumed = results(tmp_path / "run")
    assert resumed["resumed_from"].endswith("step_0000003.pt")
    assert [p["step"] for p in full["train"]] == [2, 4, 6]
    assert strip_timing(resumed["curves"]["train"]) == strip_timing(full["train"])  # bit-for-bit on CPU
    assert resumed["curves"]["val"] == full["val"]
    assert resumed["curves"]["telemetry"] == full["telemetry"]  # spike windows included


def strip_timing(points):
    """A train curve without its wall-clock fields: loss, lr, grad norm and tokens must match exactly."""
    return [{k: v for k, v in p.items() if k not in ("tokens_per_s", "mfu", "seconds")} for p in points]


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_resume_continues_the_same_curve(tmp_path, cache_dir):
    run(["hydra.run.dir=warm", "train.max_steps=1"], tmp_path, cache_dir)  # data cached: the next start is fast
    # a constant LR after warm-up (min_lr_ratio=1), so that the schedule does not depend on max_steps and the
    # stopped run can be compared with an uninterrupted one of a different length
    same = ["train.eval_every=0", "train.log_every=4", "train.min_lr_ratio=1.0"]
    held = HeldRun(tmp_path, "runner.train:Trainer.log_train_point", [  # held at the first logged step
        *TINY, f"cache_dir={cache_dir}", "hydra.run.dir=run", "train.max_steps=100000",
        "train.checkpoint_every=1000000", *same], after=True)
    held.wait_held()
    held.signal(signal.SIGTERM)  # inside the loop by construction: it stops at the next step boundary
    proc, stdout, stderr = held.finish()
    assert proc.returncode == 143, stderr[-3000:]  # 128 + SIGTERM: interrupted, not finished
    r = results(tmp_path / "run")
    assert r["status"] == "interrupted"
    ckpts = list((tmp_path / "run" / "checkpoints").glob("step_*.pt"))
    assert len(ckpts) == 1
    stopped_at = int(ckpts[0].stem.split("_")[1])
    assert stopped_at > 0
    # the printed command resumes it as it is (the run's own overrides, train.resume=true, its directory)
    printed = shlex.split(r["error"]["message"].split("resume with: ")[1])
    assert printed[:2] == ["python", str(ROOT / "run.py")]  # run.py as it was started: here by its absolute path
    assert printed[-1] == f"hydra.run.dir={tmp_path / 'run'}"
    resumed = subprocess.run([sys.executable, str(ROOT / "run.py"), *printed[2:], f"train.max_steps={stopped_at + 6}"],
                             cwd=tmp_path, capture_output=True, text=True, timeout=300,
                             env={**os.environ, "WANDB_SILENT": "true"})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    r = results(tmp_path / "run")
    assert r["status"] == "ok" and r["metrics"]["steps"] == stopped_at + 6
    run(["hydra.run.dir=straight", f"train.max_steps={stopped_at + 6}", *same], tmp_path, cache_dir)
    assert strip_timing(r["curves"]["train"]) == strip_timing(results(tmp_path / "straight")["curves"]["train"])


@pytest.mark.slow
def test_sigterm_after_the_loop_records_interrupted_with_the_final_checkpoint(tmp_path, cache_dir):
    """SIGTERM while the benchmark runs (after training): no traceback, `interrupted`, resumable."""
    run(["hydra.run.dir=warm", "train.max_steps=1"], tmp_path, cache_dir)
    held = HeldRun(tmp_path, "runner.bench.suite:time_fn", [  # held at the benchmark's first timing
        *TINY, f"cache_dir={cache_dir}", "hydra.run.dir=run", "train.max_steps=5", "train.checkpoint_every=3",
        "train.bench=true"])
    held.wait_held()
    held.signal(signal.SIGTERM)
    proc, stdout, stderr = held.finish()
    assert proc.returncode == 143, stderr[-3000:]
    r = results(tmp_path / "run")
    assert r["status"] == "interrupted" and r["metrics"]["steps"] == 5
    assert "step_0000005.pt" in r["error"]["message"]  # the final weights were checkpointed before evaluation


def test_non_finite_loss_stops_the_run_and_names_the_step(tmp_path, cache_dir, monkeypatch):
    """A divergence injected from here, at a known step: the loss of the second step is NaN."""
    import runner.train as train_module
    from conftest import compose
    real, calls = train_module.training_loss, []

    def diverging(*args, **kwargs):
        calls.append(1)
        objective, loss, z = real(*args, **kwargs)
        return (objective * float("nan"), loss * float("nan"), z) if len(calls) == 2 else (objective, loss, z)

    monkeypatch.setattr(train_module, "training_loss", diverging)
    (tmp_path / "run").mkdir()
    monkeypatch.chdir(tmp_path / "run")  # results.json: the cwd outside Hydra
    with pytest.raises(FloatingPointError):  # the run stops with an error (a non-zero exit under run.py)
        train_module.main(compose([*TINY, f"cache_dir={cache_dir}"]))
    r = results(tmp_path / "run")
    assert r["status"] == "failed"
    assert r["error"]["type"] == "FloatingPointError" and "at step 2" in r["error"]["message"]


def test_a_training_step_never_reads_the_device_from_python(tmp_path, cache_dir, monkeypatch):
    """No host synchronisation inside a step: while Trainer.optimizer_step runs (MoE's auxiliary loss
    included), no code of ours calls .item(), .tolist(), float(), int() or bool() on a tensor; the losses are
    read at log steps (train.log_every=3 here) and still reach the curve, every step counted once."""
    import runner.train as train_module
    from conftest import compose

    ours = (str(ROOT / "runner"), str(ROOT / "variants"))
    inside, reads = [False], []

    def counting(name):
        real = getattr(torch.Tensor, name)

        def read(self, *args):
            caller = sys._getframe(1).f_code.co_filename
            if inside[0] and caller.startswith(ours):
                reads.append(f"{name} at {caller}:{sys._getframe(1).f_lineno}")
            return real(self, *args)
        return read

    for name in ("item", "tolist", "__float__", "__int__", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    monkeypatch.setattr(train_module.Trainer, "optimizer_step", watched(inside, train_module.Trainer.optimizer_step))
    for name in ("arm", "record"):  # telemetry's calls around the step record on the device too
        monkeypatch.setattr(train_module.telemetry.Telemetry, name,
                            watched(inside, getattr(train_module.telemetry.Telemetry, name)))
    (tmp_path / "run").mkdir()
    monkeypatch.chdir(tmp_path / "run")
    train_module.main(compose([*TINY, "train.log_every=3", "model/ffn=moe", "train.telemetry.every=1",
                               f"cache_dir={cache_dir}"]))
    assert reads == []
    r = results(tmp_path / "run")
    curve = r["curves"]["train"]
    assert [p["step"] for p in curve] == [3, 6] and all(math.isfinite(p["loss"]) for p in curve)
    assert all(math.isfinite(p["aux_loss"]) for p in curve)
    probes = r["curves"]["telemetry"]  # every step's telemetry, read at the log steps
    assert [p["step"] for p in probes] == [1, 2, 3, 4, 5, 6] and all(math.isfinite(p["z_mean"]) for p in probes)


def watched(inside, real):
    """`real`, a method, with inside[0] set while it runs."""
    def method(self, *args):
        inside[0] = True
        try:
            return real(self, *args)
        finally:
            inside[0] = False
    return method


def test_bad_config_writes_a_failed_result_before_reading_data(tmp_path, cache_dir):
    out = run(["hydra.run.dir=run", "model.attention.n_kv_heads=3", f"cache_dir={tmp_path / 'empty'}"],
              tmp_path, cache_dir, check=False)
    assert out.returncode != 0
    r = results(tmp_path / "run")
    assert r["status"] == "failed" and "n_kv_heads=3" in r["error"]["message"]
    assert not (tmp_path / "empty").exists()  # failed before any data was read or cached


@pytest.mark.slow
def test_wandb_offline_run_is_created_without_a_key(tmp_path, cache_dir):
    env = {"WANDB_API_KEY": "", "WANDB_MODE": "", "HOME": str(tmp_path)}  # no key, no netrc
    run(["hydra.run.dir=run", "logger=wandb"], tmp_path, cache_dir, env=env)
    r = results(tmp_path / "run")
    assert r["status"] == "ok" and r["wandb"]["mode"] == "offline"
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].glob("*.wandb"))  # the run's log, ready for `wandb sync`


@pytest.mark.slow
def test_multirun_writes_one_result_per_job_and_survives_a_failing_job(tmp_path, cache_dir):
    out = run(["-m", "model.attention.n_kv_heads=1,3,2", "hydra.sweep.dir=sweep"], tmp_path, cache_dir,
              check=False)
    found = {r["config"]["model"]["attention"]["n_kv_heads"]: r
             for r in map(lambda p: json.loads(p.read_text()), (tmp_path / "sweep").glob("*/results.json"))}
    assert sorted(found) == [1, 2, 3], out.stderr[-2000:]
    assert found[1]["status"] == "ok" and found[2]["status"] == "ok"  # the job after the failure still ran
    assert found[3]["status"] == "failed"


@pytest.mark.slow
def test_two_presets_sweep(tmp_path, cache_dir):
    run(["-m", "model=mha_rope,gqa_rope", "hydra.sweep.dir=sweep"], tmp_path, cache_dir)
    statuses = sorted((json.loads(p.read_text())["variant"]["preset"], json.loads(p.read_text())["status"])
                      for p in (tmp_path / "sweep").glob("*/results.json"))
    assert statuses == [("gqa_rope", "ok"), ("mha_rope", "ok")]


def test_perplexity_counts_only_real_in_document_targets():
    """evaluate() against a token-by-token loop over each document run on its own."""
    import torch
    from conftest import tiny_model
    from runner.evaluate import evaluate
    model = tiny_model(n_kv_heads=2)
    ids = torch.randint(0, 61, (2, 12))
    docs = torch.tensor([[0] * 5 + [1] * 7, [0] * 9 + [-1] * 3])  # row 2 ends in padding
    pos = torch.tensor([list(range(5)) + list(range(7)), list(range(9)) + list(range(3))])
    labels = ids.roll(-1, 1).clone()
    labels[0, 4] = labels[0, 11] = labels[1, 8] = -100  # last token of each document predicts nothing
    labels[1, 9:] = -100  # padding
    got = evaluate(model, [{"input_ids": ids, "labels": labels, "position_ids": pos, "document_ids": docs}],
                   torch.device("cpu"))
    nll, n = 0.0, 0
    with torch.no_grad():
        for row, start, end in [(0, 0, 5), (0, 5, 12), (1, 0, 9)]:
            logp = model(ids[row:row + 1, start:end]).log_softmax(-1)[0]
            for t in range(end - start - 1):
                nll -= logp[t, ids[row, start + t + 1]].item()
                n += 1
    assert got["tokens"] == n == 4 + 6 + 8
    assert got["loss"] == pytest.approx(nll / n, rel=1e-5)
    assert got["ppl"] == pytest.approx(math.exp(nll / n), rel=1e-5)


@pytest.mark.slow
def test_trains_with_a_hugging_face_tokenizer_sizing_the_model_from_it(tmp_path, cache_dir):
    from test_generate import save_tiny_tokenizer
    tok_dir = save_tiny_tokenizer(tmp_path / "tok")
    from transformers import AutoTokenizer
    n_tokens = len(AutoTokenizer.from_pretrained(tok_dir))
    run(["hydra.run.dir=run", "tokenizer=hf", f"tokenizer.name_or_path={tok_dir}", "tokenizer.vocab_size=null",
         "train.max_steps=2"], tmp_path, cache_dir)
    r = results(tmp_path / "run")
    assert r["status"] == "ok"
    assert r["params"] - r["params_non_embedding"] == n_tokens * 32  # one embedding row per id (d_model=32)


@pytest.mark.slow
def test_a_checkpoint_without_its_tokenizer_is_refused_before_any_data(tmp_path, cache_dir):
    out = run(["hydra.run.dir=run", "model=phi3", f"model.checkpoint={tmp_path / 'phi3'}",
               f"cache_dir={tmp_path / 'empty'}"], tmp_path, cache_dir, check=False)
    r = results(tmp_path / "run")
    assert out.returncode != 0 and r["status"] == "failed" and "tokenizer=hf" in r["error"]["message"]
    assert not (tmp_path / "empty").exists()


@pytest.mark.slow
def test_a_requeued_slurm_job_resumes_without_being_told(tmp_path, cache_dir):
    run(["hydra.run.dir=run", "train.checkpoint_every=3", "train.max_steps=3"], tmp_path, cache_dir)
    run(["hydra.run.dir=run", "train.checkpoint_every=3"], tmp_path, cache_dir, env={"SLURM_RESTART_COUNT": "1"})
    r = results(tmp_path / "run")
    assert r["status"] == "ok" and r["resumed_from"].endswith("step_0000003.pt") and r["metrics"]["steps"] == 6


@pytest.mark.slow
def test_resuming_with_another_model_config_says_which_overrides_to_use(tmp_path, cache_dir):
    run(["hydra.run.dir=run", "train.checkpoint_every=3", "model.d_model=48"], tmp_path, cache_dir)
    out = run(["hydra.run.dir=run", "train.resume=true"], tmp_path, cache_dir, check=False)
    assert out.returncode != 0
    message = results(tmp_path / "run")["error"]["message"]
    assert "does not fit this model config" in message and "model.d_model=48" in message


def test_z_loss_is_trained_and_logged_apart_from_the_loss(tmp_path, cache_dir, monkeypatch):
    """train.z_loss: the term is in every logged point, apart from the cross-entropy (which stays the loss
    that perplexity is read from); 0 (the default) logs none."""
    import runner.train as train_module
    from conftest import compose
    (tmp_path / "run").mkdir()
    monkeypatch.chdir(tmp_path / "run")
    train_module.main(compose([*TINY, "train.z_loss=1e-2", "train.max_steps=2", f"cache_dir={cache_dir}"]))
    curve = results(tmp_path / "run")["curves"]["train"]
    # log(vocab)^2 ~ 33 at init: a term of about 1e-2 x 33, far from 0
    assert all(0.05 < p["z_loss"] < 1.0 and 4 < p["loss"] < 7 for p in curve)
    assert "z_loss" not in compose(TINY).train or compose(TINY).train.z_loss == 0


def test_telemetry_leaves_the_loss_curve_bit_identical(tmp_path, cache_dir, monkeypatch):
    """Telemetry reads, it never changes what trains: with train.telemetry=false (nothing installed), at its default
    cadence and at every step, the training and validation losses are the same to the last bit."""
    import runner.train as train_module
    from conftest import compose
    curves = {}
    for name, setting in [("off", "train.telemetry=false"), ("default", "train.telemetry.every=3"),
                          ("every", "train.telemetry.every=1")]:
        (tmp_path / name).mkdir()
        monkeypatch.chdir(tmp_path / name)
        train_module.main(compose([*TINY, setting, "train.max_steps=4", "train.checkpoint_every=0",
                                   f"cache_dir={cache_dir}"]))
        r = results(tmp_path / name)
        curves[name] = ([p["loss"] for p in r["curves"]["train"]], [p["loss"] for p in r["curves"]["val"]],
                        r["curves"].get("telemetry"))
    assert curves["off"][2] is None and [p["step"] for p in curves["default"][2]] == [3]
    assert curves["off"][:2] == curves["default"][:2] == curves["every"][:2]


@pytest.mark.slow
def test_inductor_compiled_training_records_the_eager_runs_telemetry(tmp_path, cache_dir):
    """train.compile=true (inductor on a CPU) with telemetry every other step: no graph break, one recompile (the
    armed step), and the same telemetry as the uncompiled run to float tolerance."""
    common = ["train.max_steps=8", "train.log_every=4", "train.eval_every=0", "train.telemetry.every=2"]
    run(["hydra.run.dir=eager", *common], tmp_path, cache_dir)
    out = run(["hydra.run.dir=compiled", "train.compile=true", *common], tmp_path, cache_dir,
              env={"TORCH_LOGS": "graph_breaks,recompiles"})
    logs = out.stdout + out.stderr
    assert "graph break" not in logs.lower() and logs.count("Recompiling function forward") == 1
    eager, compiled = (results(tmp_path / name)["curves"]["telemetry"] for name in ("eager", "compiled"))
    assert [p["step"] for p in compiled] == [2, 4, 6, 8]
    for e, c in zip(eager, compiled):
        for key in ("attn_max_logit", "attn_entropy", "resid_rms", "z_mean", "loss"):
            assert c[key] == pytest.approx(e[key], rel=1e-3, abs=1e-4), key


def test_a_diverged_run_keeps_its_telemetry(tmp_path, cache_dir, monkeypatch):
    """A learning rate far too large: the loss becomes non-finite, the run fails, and results.json keeps the
    telemetry of every step up to the last one read, the last point showing the blow-up."""
    import runner.train as train_module
    from conftest import compose
    (tmp_path / "run").mkdir()
    monkeypatch.chdir(tmp_path / "run")
    with pytest.raises(FloatingPointError):
        train_module.main(compose([*TINY, "train.lr=1e4", "train.warmup_steps=1", "train.max_steps=30",
                                   "train.eval_every=0", "train.checkpoint_every=0", f"cache_dir={cache_dir}"]))
    r = results(tmp_path / "run")
    failed_at = int(r["error"]["message"].split(" at step ")[1].split()[0])
    probes = r["curves"]["telemetry"]
    assert r["status"] == "failed" and [p["step"] for p in probes] == list(range(1, failed_at + 1))
    assert probes[-1]["loss"] is None and probes[-1]["loss_spike"] >= 1  # non-finite: JSON null, and a spike
    assert all(v is not None for v in probes[0]["attn_max_logit"] + probes[0]["resid_rms"])


def test_the_optimizer_is_fused_on_a_cpu_and_steps_as_the_loop_does(monkeypatch):
    """runner.optim.adamw: the fused kernel on a CPU outside torchrun, the per-parameter loop under it; three
    steps of each land where torch's reference loop does."""
    from conftest import tiny_model
    from runner.optim import adamw, param_groups
    models = [tiny_model(seed=3).train() for _ in range(3)]
    optimizers = [adamw(param_groups(models[0], 0.1), lr=1e-2, betas=(0.9, 0.99), device="cpu")]
    with monkeypatch.context() as m:  # as under torchrun: the loop
        m.setattr(torch.distributed, "is_initialized", lambda: True)
        optimizers.append(adamw(param_groups(models[1], 0.1), lr=1e-2, betas=(0.9, 0.99), device="cpu"))
    optimizers.append(torch.optim.AdamW(param_groups(models[2], 0.1), lr=1e-2, betas=(0.9, 0.99), foreach=False))
    assert optimizers[0].defaults["fused"] and not optimizers[1].defaults["fused"]
    ids = torch.randint(0, 61, (2, 12))
    for model, opt in zip(models, optimizers):
        for _ in range(3):
            model(ids).logsumexp(-1).mean().backward()
            opt.step()
            opt.zero_grad()
    for a, b, ref in zip(*(m.parameters() for m in models)):
        torch.testing.assert_close(a, ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b, ref, rtol=1e-5, atol=1e-6)
