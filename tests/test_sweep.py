"""A sweep stops as a whole on SIGTERM (after the running job checkpoints) and its printed command resumes it:
finished jobs kept, the interrupted one continued from its checkpoint, the rest started."""
import os
import shlex
import signal
import subprocess
import sys

import pytest

from conftest import ROOT
from hold_phase import HeldRun
from test_train import TINY, results, run


@pytest.mark.slow
def job_dir(tmp_path, num):
    """Job `num`'s folder (named after its overrides, runner/naming.py): N_..."""
    found = sorted((tmp_path / "sweep").glob(f"{num}_*"))
    return found[0] if found else tmp_path / "sweep" / f"{num}_not_started"


@pytest.mark.slow
def test_sigterm_stops_the_sweep_and_its_resume_finishes_every_job(tmp_path, cache_dir):
    run(["hydra.run.dir=warm", "train.max_steps=1"], tmp_path, cache_dir)  # data cached: jobs start fast
    steps = ["train.max_steps=60", "train.eval_every=2", "train.eval_batches=1", "train.checkpoint_every=1000"]
    args = ["-m", *TINY, f"cache_dir={cache_dir}", "train.seed=0,1,2", *steps, "hydra.sweep.dir=sweep"]
    env = {**os.environ, "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1"}
    # held after job 0's first validation (step 2): the signal lands in its training loop by construction
    held = HeldRun(tmp_path, "runner.train:Trainer.validate", args, after=True, env=env)
    held.wait_held()
    held.signal(signal.SIGTERM)
    proc, stdout, stderr = held.finish()
    assert proc.returncode == 143, stderr[-3000:]  # 128 + SIGTERM: a scheduler sees the sweep did not finish
    r0 = results(job_dir(tmp_path, 0))
    assert r0["status"] == "interrupted"
    ckpt = list((job_dir(tmp_path, 0) / "checkpoints").glob("step_*.pt"))
    assert len(ckpt) == 1
    stopped_at = int(ckpt[0].stem.split("_")[1])
    assert 0 < stopped_at < 60
    assert not (job_dir(tmp_path, 1)).exists()  # the next jobs never started

    # run.py named as it was started (here by its absolute path)
    lines = [line for line in stdout.splitlines() if line.startswith(f"python {ROOT / 'run.py'} -m")]
    assert len(lines) == 1, stdout[-2000:]
    printed = shlex.split(lines[0])
    assert "train.resume=auto" in printed and f"hydra.sweep.dir={tmp_path / 'sweep'}" in printed
    assert "train.seed=0,1,2" in printed

    out = subprocess.run([sys.executable, str(ROOT / "run.py"), *printed[2:]], cwd=tmp_path, capture_output=True,
                         text=True, timeout=400, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    for job, seed in enumerate((0, 1, 2)):
        r = results(job_dir(tmp_path, job))
        assert r["status"] == "ok" and r["metrics"]["steps"] == 60 and r["variant"]["seed"] == seed
    assert results(job_dir(tmp_path, 0))["resumed_from"].endswith(ckpt[0].name)

    # resuming once more keeps every finished job as it is
    before = {p: p.read_text() for p in (tmp_path / "sweep").glob("*/results.json")}
    again = subprocess.run([sys.executable, str(ROOT / "run.py"), *printed[2:]], cwd=tmp_path, capture_output=True,
                           text=True, timeout=400, env=env)
    assert again.returncode == 0 and again.stdout.count("kept as it is") == 3
    assert before == {p: p.read_text() for p in (tmp_path / "sweep").glob("*/results.json")}
