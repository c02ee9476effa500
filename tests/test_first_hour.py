"""What a new user meets first: folder names, run.log, config errors, resume without a checkpoint, Ctrl-C
outside training, over-long prompts. Subprocess runs of run.py on tiny configs, as in test_train.py."""
import json
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from hold_phase import HeldRun
from test_train import TINY, results, run
from runner.naming import job_dirname


def test_job_dirname_reads_like_the_overrides_a_user_typed():
    # the example: +experiment names the sweep folder, the job folder names the choices
    assert job_dirname(["+experiment=attention", "model/attention=mqa", "train.seed=1"],
                       exclude_keys=["experiment"]) == "attention=mqa,seed=1"
    # group choices first; keys that would read alike keep their full name; no path separators in a name
    assert job_dirname(["train.batch_size=4", "eval.batch_size=8", "model=gpt2", "model.checkpoint=/a/b"]) == \
        "model=gpt2,checkpoint=b,eval.batch_size=8,train.batch_size=4"
    # the user's spelling, no prompts, paths by their last part, lists without brackets
    assert job_dirname(["train.bench=False", "prompt='def add(a, b):'", "data.paths=[/tmp/nc_one.txt]",
                        "bench.gpu.batch_sizes=[1,8]"]) == "batch_sizes=1_8,bench=false,paths=nc_one.txt"
    long = job_dirname([f"model.k{i}={i}" for i in range(40)], max_length=30)
    assert len(long) <= 30 + len(",+40") and long.endswith(f",+{40 - long.count('=')}")


@pytest.mark.slow
def test_sweep_folders_are_named_after_the_task_and_the_swept_choices(tmp_path, cache_dir):
    run(["-m", "model/attention=mha,mqa", "model/position=rope,learned", "train.max_steps=1", "train.eval_every=0",
         "train.checkpoint_every=0"], tmp_path, cache_dir)
    sweep, = (tmp_path / "outputs" / "sweeps").glob("*/*")
    assert re.fullmatch(r"\d\d-\d\d-\d\d_train", sweep.name)  # the task names a sweep without an experiment
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    expected = [f"{i}_attention={a},position={p}," for i, (a, p) in
                enumerate([(a, p) for a in ("mha", "mqa") for p in ("rope", "learned")])]
    assert [name[:len(prefix)] for name, prefix in zip(jobs, expected)] == expected, jobs
    assert all("cache_dir" not in name and "logger" not in name for name in jobs)
    for name, prefix in zip(jobs, expected):
        r = results(sweep / name)
        assert r["status"] == "ok" and f"attention={r['variant']['attention']}" in prefix
        assert f"position={r['variant']['position']}" in prefix


def test_a_compare_job_folder_is_named_after_the_task(tmp_path, cache_dir):
    out = run(["task=compare", f"compare.dirs=[{tmp_path / 'nothing'}]"], tmp_path, cache_dir, check=False)
    assert out.returncode != 0
    job, = (tmp_path / "outputs" / "runs").glob("*/*")
    assert re.fullmatch(r"\d\d-\d\d-\d\d_compare_.*", job.name) and "gqa_rope" not in job.name, job.name


@pytest.mark.slow
def test_a_config_error_prints_one_line_and_the_key_without_a_traceback(tmp_path, cache_dir):
    out = run(["hydra.run.dir=run", "model.attention.n_kv_heads=3"], tmp_path, cache_dir, check=False)
    text = out.stdout + out.stderr
    assert out.returncode != 0
    assert "Traceback" not in text and "hydra" not in out.stderr.lower()
    assert "config error: model.attention.n_kv_heads=3 must divide model.n_heads=2" in text
    assert "change model.attention.n_kv_heads" in text
    assert results(tmp_path / "run")["status"] == "failed"
    assert "config error:" in (tmp_path / "run" / "run.log").read_text()
    full = run(["hydra.run.dir=run2", "model.attention.n_kv_heads=3"], tmp_path, cache_dir, check=False,
               env={"HYDRA_FULL_ERROR": "1"})
    assert full.returncode != 0 and "Traceback" in full.stderr  # the whole story on request


@pytest.mark.slow
def test_resume_without_a_checkpoint_stops_and_lists_the_runs_that_can_be_resumed(tmp_path, cache_dir):
    old = "outputs/runs/2026-01-01/10-00-00_train"
    run([f"hydra.run.dir={old}", "train.checkpoint_every=3", "model.d_model=48"], tmp_path, cache_dir)
    run(["hydra.run.dir=outputs/runs/2026-01-01/11-00-00_train", "train.checkpoint_every=0", "train.max_steps=1"],
        tmp_path, cache_dir)
    before = set((tmp_path / "outputs" / "runs").glob("*/*"))
    out = run(["train.resume=true"], tmp_path, cache_dir, check=False)
    text = out.stdout + out.stderr
    assert out.returncode != 0 and "Traceback" not in text
    fresh, = set((tmp_path / "outputs" / "runs").glob("*/*")) - before  # the folder this run made, whatever the hour
    assert results(fresh)["status"] == "failed" and not (fresh / "checkpoints").exists()  # nothing trained
    listed = sorted({line for line in text.splitlines() if "train.resume=true hydra.run.dir=" in line})
    assert len(listed) == 1 and old in listed[0]  # the run without a checkpoint is not offered
    command = shlex.split(listed[0].split(": ", 1)[1])
    assert "model.d_model=48" in command  # the run's own overrides: its checkpoint fits
    resumed = subprocess.run([sys.executable, str(ROOT / "run.py"), *command[2:]], cwd=tmp_path,
                             capture_output=True, text=True, timeout=300, env={**os.environ, "WANDB_SILENT": "true"})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert results(tmp_path / old)["resumed_from"].endswith("step_0000006.pt")


def run_held(tmp_path, cache, target: str, args, after: bool = False):
    """run.py with `target` (module:function) held on its first call until SIGINT has been sent, so the signal
    lands inside that phase whatever the machine's speed (tests/hold_phase.py)."""
    held = HeldRun(tmp_path, target, [*TINY, f"cache_dir={cache}", "hydra.run.dir=run", *args], after=after)
    held.wait_held()
    held.signal(signal.SIGINT)
    return held.finish()


@pytest.mark.parametrize("task, args, target", [
    # interrupted while the corpus is read (a cold cache), while the suite times, while decoding
    ("eval", ["task=eval"], "runner.data:load_corpus"),
    ("bench", ["task=bench"], "runner.bench.suite:time_fn"),
    ("generate", ["task=generate", "generate.max_new_tokens=8"], "runner.generate:sample_next"),
])
@pytest.mark.slow
def test_ctrl_c_outside_training_records_interrupted_in_one_line(tmp_path, cache_dir, task, args, target):
    cache = cache_dir if task != "eval" else tmp_path / "cold"
    proc, stdout, stderr = run_held(tmp_path, cache, target, args)
    assert proc.returncode == 130, stderr[-3000:]  # 128 + SIGINT, as a shell reports a Ctrl-C'd command
    assert "Traceback" not in stdout + stderr
    r = results(tmp_path / "run")
    assert r["status"] == "interrupted" and r["task"] == task
    assert r["error"]["type"] == "Interrupted" and "\n" not in r["error"]["message"]
    assert f"Ctrl-C: {task} stopped before it finished" in stdout


@pytest.mark.slow
def test_ctrl_c_while_the_task_wrapper_records_a_finished_task_is_not_lost(tmp_path, cache_dir):
    # the body has finished and results.json is being written: the record completes, says what the body
    # did, and the Ctrl-C is acknowledged in one line (a sweep would stop there: test_sweep.py)
    proc, stdout, stderr = run_held(tmp_path, cache_dir, "runner.tracking:Results.finish", ["task=eval"], after=True)
    assert proc.returncode == 0, stderr[-3000:]
    assert "Traceback" not in stdout + stderr
    r = results(tmp_path / "run")
    assert r["status"] == "ok" and r["metrics"]["val_loss"] > 0
    assert "Ctrl-C after eval finished: its results are recorded" in stdout


@pytest.mark.parametrize("position", ["rope", "learned"])
def test_an_over_long_prompt_is_cropped_alike_for_every_position_type(tmp_path, monkeypatch, capsys, position):
    """Past model.max_seq_len generation goes on over the last max_seq_len tokens (issue 27; nanoGPT's crop), and
    says so on stderr; the cropping itself is checked against a naive forward in test_generate.py."""
    from conftest import compose
    from runner.generate import main
    from test_generate import save_tiny_tokenizer
    monkeypatch.chdir(tmp_path)  # results.json: the cwd outside Hydra
    tok = save_tiny_tokenizer(tmp_path / "tok")
    cfg = compose(["task=generate", f"model/position={position}", "tokenizer=hf", f"tokenizer.name_or_path={tok}",
                   "data.seq_len=16", "generate.max_new_tokens=8", "prompt='" + "x = 1 + 2; " * 4 + "'", "logger=none"])
    result = main(cfg)
    assert len(result["prompt_ids"][0]) > 16 and 1 <= len(result["tokens"][0]) <= 8
    assert "pass model.max_seq_len=16: each new token sees only the last 16 tokens" in capsys.readouterr().err
    r = json.loads((tmp_path / "results.json").read_text())
    assert r["status"] == "ok"


@pytest.mark.slow
def test_run_log_holds_the_job_log_and_the_summary_is_printed_last(tmp_path, cache_dir):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}  # as a user meets W&B: no settings
    out = subprocess.run([sys.executable, str(ROOT / "run.py"), *TINY, f"cache_dir={cache_dir}", "hydra.run.dir=run",
                          "logger=wandb", "train.max_steps=2", "train.log_every=1", "train.eval_every=1"],
                         cwd=tmp_path, capture_output=True, text=True,
                         timeout=300, env={**env, "HOME": str(tmp_path)})  # no key, no netrc: offline
    assert out.returncode == 0, out.stderr[-3000:]
    log = (tmp_path / "run" / "run.log").read_text()
    for phase in ("data:", "training", "final evaluation", "W&B offline run"):
        assert phase in log, phase
    assert log.count("W&B") == 1 and "wandb:" not in out.stdout + out.stderr  # W&B itself says nothing
    assert out.stdout.rstrip().splitlines()[-1].startswith("results ")  # the run's summary comes last
    assert "training" in out.stderr and "training" not in out.stdout  # the log on stderr, stdout for results
    # the losses as they are logged, in run.log alone (the terminal has the progress bar)
    losses = [line for line in log.splitlines() if "train loss" in line or "val loss" in line]
    assert [re.search(r"step \d+", line).group() for line in losses] == ["step 1"] * 2 + ["step 2"] * 2, losses
    assert "train loss" not in out.stderr and "val loss" not in out.stderr


@pytest.mark.slow
def test_a_requeued_slurm_job_without_a_checkpoint_starts_from_scratch_even_with_resume_true(tmp_path, cache_dir):
    run(["hydra.run.dir=run", "train.resume=true", "train.max_steps=1"], tmp_path, cache_dir,
        env={"SLURM_RESTART_COUNT": "1"})
    r = results(tmp_path / "run")
    assert r["status"] == "ok" and "resumed_from" not in r and r["metrics"]["steps"] == 1


def test_timings_on_a_busy_machine_say_so(capsys):
    from runner.bench import print_table
    from runner.train import print_summary
    bench = {"device": "cpu", "dtype": "float32", "torch": "2", "date": "2026-12-02", "repeats": 3, "warmup": 1,
             "train": [], "prefill": [], "decode": [], "kernels": [], "memory_kind": "rss"}
    for load, busy in [(0.5, False), (2.0, False), (2.5, True)]:  # 2 cores in use: busy past a load of 2
        print_table({**bench, "cpu_load_average": load, "cpu_threads": 2})
        print_summary({"status": "ok", "cpu_load_average": load, "cpu_threads": 2, "output_dir": "x"})
        out = capsys.readouterr().out
        assert out.count(f"busy machine (load average {load:.1f} on 2 cores in use)") == (2 if busy else 0)


def test_a_misspelled_choice_names_the_closest_presets_in_one_line(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "run.py"), "model=gqa_rpoe"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    (line,) = out.stderr.strip().splitlines()
    assert "model=gqa_rpoe" in line and "did you mean model=gqa_rope" in line
    assert "base" not in line.split("choose from", 1)[1]  # what presets build on is not a choice
    assert not (tmp_path / "outputs").exists()  # nothing composed, no run folder


def test_choice_check_covers_nested_groups_and_sweeps_and_leaves_hydra_syntax_alone():
    from runner.choices import unknown_choice
    conf = ROOT / "conf"
    assert unknown_choice(["model=gqa_rope", "model/attention=mla", "train.lr=1e-3", "data=stdlib"], conf) is None
    assert "model/attention=gqq" in unknown_choice(["model/attention=gqq"], conf)
    assert "model=mha_rpe" in unknown_choice(["-m", "model=gqa_rope,mha_rpe"], conf)  # each name of a sweep
    assert unknown_choice(["model=glob(*_rope)", "model/size=null", "hydra/launcher=submitit_slurm",
                           "+experiment=attention"], conf) is None


def test_resume_listing_marks_a_run_that_a_live_process_holds_as_running(tmp_path, monkeypatch):
    """A run still training (its train.lock held by a live process) is not offered for resuming: it is marked
    running, with the process that holds it; the free one keeps its command."""
    from omegaconf import OmegaConf

    from runner.checkpoint import save_checkpoint
    from runner.resume import require_checkpoint_to_resume
    from runner.runlock import RunLock
    monkeypatch.chdir(tmp_path)
    busy, free = (Path("outputs/runs/2026-01-01") / name for name in ("a_train", "b_train"))
    for run_dir in (busy, free):
        save_checkpoint(run_dir, 3, {"model": {}})
    lock = RunLock.take(busy)  # this test's own process: alive
    try:
        with pytest.raises(ValueError) as err:
            require_checkpoint_to_resume(OmegaConf.create({"train": {"resume": True}}), tmp_path / "new")
    finally:
        lock.release()
    lines = {line.split(" (step")[0].strip(): line for line in str(err.value).splitlines()[1:]}
    assert f"running, pid {os.getpid()}" in lines[str(busy)] and "train.resume=" not in lines[str(busy)]
    assert "train.resume=true hydra.run.dir=" in lines[str(free)]


@pytest.mark.parametrize("folder, word", [
    ("/tmp/runs/plain", "hydra.run.dir=/tmp/runs/plain"),                                    # nothing to quote
    ("/tmp/10-00-00_train_attention=mqa,seed=1", "\"hydra.run.dir='/tmp/10-00-00_train_attention=mqa,seed=1'\""),
])
def test_printed_overrides_are_quoted_no_more_than_the_shell_and_hydra_need(folder, word):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from runner.naming import override
    assert override("hydra.run.dir", folder) == word
    (parsed,) = OverridesParser.create().parse_overrides([shlex.split(word)[0]])  # what Hydra reads back
    assert parsed.value() == folder


def test_resume_command_names_run_py_as_it_was_invoked(monkeypatch):
    from runner.resume import resume_command
    monkeypatch.setattr(sys, "argv", ["/home/me/llm-variants/run.py", "model=mqa_rope"])
    command = resume_command("/tmp/runs/a", ["model=mqa_rope", "prompt='def f(x):'"])
    assert command == ("python /home/me/llm-variants/run.py model=mqa_rope \"prompt='def f(x):'\" train.resume=true "
                       "hydra.run.dir=/tmp/runs/a")


@pytest.mark.parametrize("resumed", [False, True], ids=["fresh", "existing_run"])
def test_ctrl_c_while_starting_up_is_one_line_and_leaves_no_folder_without_a_record(tmp_path, cache_dir, resumed):
    """Held where Hydra has made the job's folder but no task wrapper runs yet: exit 130, one line, no
    traceback; a fresh folder (only Hydra's files) is removed, an existing run's folder is left as it was."""
    if resumed:
        (tmp_path / "run").mkdir()
        (tmp_path / "run" / "results.json").write_text('{"status": "interrupted"}')
    held = HeldRun(tmp_path, "runner.sweep:job_started", [*TINY, f"cache_dir={cache_dir}", "hydra.run.dir=run"])
    held.wait_held()
    held.signal(signal.SIGINT)
    proc, stdout, stderr = held.finish()
    assert proc.returncode == 130 and "Traceback" not in stdout + stderr, stderr[-3000:]
    assert "Ctrl-C while starting up: nothing ran" in stderr
    if resumed:
        assert (tmp_path / "run" / "results.json").read_text() == '{"status": "interrupted"}'
    else:
        assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args, key", [
    (["data=local", "data.paths=[missing/*.txt]", "logger=wandb"], "data.paths"),  # before W&B starts
    (["task=compare", "compare.dirs=[empty]"], "compare.dirs"),
])
def test_input_errors_are_one_line_naming_the_key(tmp_path, cache_dir, args, key):
    (tmp_path / "empty").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    out = subprocess.run([sys.executable, str(ROOT / "run.py"), *TINY, f"cache_dir={cache_dir}", "hydra.run.dir=run",
                          *args], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={**env, "HOME": str(tmp_path)})
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if "config error:" in line]
    assert len(errors) == 1 and f"{key}=" in errors[0] and f"change {key}" in out.stderr
    assert "W&B" not in (tmp_path / "run" / "run.log").read_text()  # no W&B run was opened for it


def test_a_hub_dataset_without_network_fails_fast_in_one_line(tmp_path, cache_dir):
    """No retries with back-off when the Hub cannot be reached (here: an endpoint on a closed local port, so
    that a machine with network downloads nothing either): one short attempt, then the offline caches only."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "WANDB_"))}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"), WANDB_SILENT="true")
    out = subprocess.run([sys.executable, str(ROOT / "run.py"), *TINY, f"cache_dir={cache_dir}", "hydra.run.dir=run",
                          "data=tinystories"], cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if "config error:" in line]
    assert len(errors) == 1 and "roneneldan/TinyStories" in errors[0] and "Retrying" not in out.stderr
    assert results(tmp_path / "run")["status"] == "failed"
