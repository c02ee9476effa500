"""Several processes on CPU with gloo, launched as users launch them: torchrun for DDP and FSDP2, and a
sweep through submitit's local launcher. Tiny sizes (test_train's TINY); each run is a subprocess."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, compose
from test_train import TINY, results, run

TIMING = ("tokens_per_s", "mfu", "seconds")


def torchrun(args, cwd, cache_dir, nproc=2, stagger_s=0.0, check=True):
    """`torchrun --standalone --nproc_per_node=2 run.py ...`; stagger_s starts rank r r*stagger_s seconds late."""
    script = ROOT / "run.py"
    if stagger_s:
        script = Path(cwd) / "staggered_run.py"
        script.write_text("import os, runpy, sys, time\n"
                          f"time.sleep({stagger_s} * int(os.environ['RANK']))\n"
                          f"sys.argv[0] = {str(ROOT / 'run.py')!r}\n"
                          f"runpy.run_path(sys.argv[0], run_name='__main__')\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(script),
           *TINY, f"cache_dir={cache_dir}", *args]
    env = {k: v for k, v in os.environ.items() if k != "VARIANTS_RUN_STAMP"}
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300,
                         env={**env, "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"})
    if check and out.returncode != 0:
        raise AssertionError(f"torchrun {' '.join(args)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}")
    return out


def strip(points):
    return [{k: v for k, v in p.items() if k not in TIMING} for p in points]


def assert_curves_close(a, b, rel):
    assert [p["step"] for p in a] == [p["step"] for p in b]
    for p, q in zip(strip(a), strip(b)):
        assert p == pytest.approx(q, rel=rel), (p, q)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, cache_dir):
    """Two DDP ranks, rank 1 started 1.2 s after rank 0, with no hydra.run.dir: Hydra's timestamped default."""
    cwd = tmp_path_factory.mktemp("ddp")
    run(["hydra.run.dir=warm", "train.max_steps=1"], cwd, cache_dir)  # data cached: ranks start alike
    out = torchrun(["train.distributed=ddp", "train.checkpoint_every=3"], cwd, cache_dir, stagger_s=1.2)
    (cwd / "stdout.txt").write_text(out.stdout)
    return cwd


@pytest.mark.slow
def test_ddp_on_two_ranks_matches_one_process_with_twice_the_accumulation(ddp_run, cache_dir):
    run(["hydra.run.dir=single", "train.grad_accum=2"], ddp_run, cache_dir)  # same global batch of 4 rows
    single = results(ddp_run / "single")
    (ddp_dir,) = (ddp_run / "outputs" / "runs").glob("*/*")
    ddp = results(ddp_dir)
    assert single["status"] == ddp["status"] == "ok"
    # rank r's micro-batch is the single process's r-th: same rows, so loss, grad norm and lr agree
    assert_curves_close(ddp["curves"]["train"], single["curves"]["train"], rel=1e-4)
    assert_curves_close(ddp["curves"]["val"], single["curves"]["val"], rel=1e-4)  # sharded evaluation
    assert ddp["metrics"]["val_tokens"] == single["metrics"]["val_tokens"]  # every validation row once
    assert ddp["curves"]["train"][-1]["loss"] < ddp["curves"]["train"][0]["loss"]


@pytest.mark.slow
def test_only_rank_zero_writes_and_every_rank_shares_the_output_directory(ddp_run):
    runs = sorted((ddp_run / "outputs" / "runs").glob("*/*"))
    assert len(runs) == 1, runs  # rank 1 composed its config 1.2 s later, yet chose rank 0's directory
    assert list((ddp_run / "outputs").rglob("results.json")) == [runs[0] / "results.json"]
    assert [c.name for c in sorted((runs[0] / "checkpoints").iterdir())] == ["step_0000003.pt", "step_0000006.pt"]
    r = results(runs[0])
    assert r["distributed"] == {"mode": "ddp", "world_size": 2} and r["metrics"]["steps"] == 6
    assert (ddp_run / "stdout.txt").read_text().count("val loss / ppl") == 1  # one summary, rank 0's


@pytest.mark.slow
def test_a_two_rank_checkpoint_resumes_in_one_process(ddp_run, cache_dir):
    """Checkpoints hold full tensors keyed by name and a loader position counted in steps: they fit any split."""
    (ddp_dir,) = (ddp_run / "outputs" / "runs").glob("*/*")
    step3 = ddp_dir / "checkpoints" / "step_0000003.pt"
    run(["hydra.run.dir=from_ddp", "train.grad_accum=2", f"train.resume='{step3}'"], ddp_run, cache_dir)
    resumed = results(ddp_run / "from_ddp")
    assert resumed["resumed_from"] == str(step3) and resumed["distributed"]["world_size"] == 1
    assert_curves_close(resumed["curves"]["train"], results(ddp_dir)["curves"]["train"], rel=1e-4)


@pytest.mark.slow
def test_fsdp_on_two_ranks_checkpoints_and_resumes(ddp_run, cache_dir):
    cwd = ddp_run
    # each rank in its own directory here, to see what rank 1 writes: Hydra's files, no results, no checkpoints
    # (rank 0 alone reads the checkpoint on resume and broadcasts it)
    args = ["hydra.run.dir=fsdp/rank_${oc.env:RANK}", "train.distributed=fsdp", "train.checkpoint_every=3"]
    torchrun(args, cwd, cache_dir)
    full = results(cwd / "fsdp" / "rank_0")
    assert full["status"] == "ok" and full["distributed"] == {"mode": "fsdp", "world_size": 2}
    assert sorted(p.name for p in (cwd / "fsdp" / "rank_1").iterdir()) == [".hydra", "run.log"]
    # FSDP2 shards the weights but computes what DDP computes
    (ddp_dir,) = (cwd / "outputs" / "runs").glob("*/*")
    assert_curves_close(full["curves"]["train"], results(ddp_dir)["curves"]["train"], rel=1e-4)

    ckpts = sorted((cwd / "fsdp" / "rank_0" / "checkpoints").glob("step_*.pt"))
    assert [c.name for c in ckpts] == ["step_0000003.pt", "step_0000006.pt"]
    saved = torch.load(ckpts[0], map_location="cpu", weights_only=False)
    # one file with full (unsharded) tensors keyed by parameter name
    assert sum(v.numel() for v in saved["model"].values()) == full["params"]
    assert saved["model"]["embed.weight"].shape[1] == 32 and saved["step"] == 3

    ckpts[-1].unlink()  # as if the run had died after step 3's checkpoint
    torchrun([*args, "train.resume=true"], cwd, cache_dir)
    resumed = results(cwd / "fsdp" / "rank_0")
    assert resumed["status"] == "ok" and resumed["resumed_from"].endswith("step_0000003.pt")
    assert_curves_close(resumed["curves"]["train"], full["curves"]["train"], rel=1e-6)
    assert_curves_close(resumed["curves"]["val"], full["curves"]["val"], rel=1e-6)


@pytest.mark.slow
def test_sweep_through_submitit_local_writes_every_result(tmp_path, cache_dir):
    """Two jobs, each with two tasks that are its DDP ranks (as on SLURM: ranks from submitit, no torchrun)."""
    out = run(["-m", "launcher=local", "hydra.sweep.dir=sweep", "train.seed=0,1", "hydra.launcher.tasks_per_node=2",
               "train.distributed=ddp"], tmp_path, cache_dir, env={"OMP_NUM_THREADS": "1"})
    found = {r["config"]["train"]["seed"]: r for r in map(lambda p: json.loads(p.read_text()),
                                                         (tmp_path / "sweep").glob("*/results.json"))}
    assert sorted(found) == [0, 1], out.stderr[-3000:]
    assert all(r["status"] == "ok" and r["distributed"] == {"mode": "ddp", "world_size": 2} for r in found.values())
    assert all(r["config"]["train"]["resume"] == "auto" for r in found.values())  # launcher=local's overlay
    assert list((tmp_path / "sweep" / ".submitit").iterdir())  # the jobs ran as submitit jobs


def _descendants(pid: int) -> list[int]:
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


@pytest.mark.slow
def test_preempted_submitit_job_checkpoints_requeues_and_resumes(tmp_path, cache_dir):
    """USR2 (what SLURM sends before the time limit or on preemption) reaches a job of a launcher=local
    sweep mid-training: it checkpoints, submitit requeues it, and the new start resumes and finishes."""
    cmd = [sys.executable, str(ROOT / "run.py"), "-m", *TINY, f"cache_dir={cache_dir}", "launcher=local",
           "hydra.sweep.dir=sweep", "train.max_steps=2000", "train.checkpoint_every=500", "train.eval_every=0",
           "train.log_every=100"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not list((tmp_path / "sweep").glob("0_*/checkpoints/step_0000500.pt")):
            time.sleep(0.02)
        job_dir, = (tmp_path / "sweep").glob("0_*")  # named after the job's overrides
        tasks = [pid for pid in _descendants(proc.pid)
                 if b"submitit.core._submit" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        assert len(tasks) == 1, tasks
        os.kill(tasks[0], signal.SIGUSR2)
        stdout, stderr = proc.communicate(timeout=180)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    r = results(job_dir)
    assert r["status"] == "ok" and r["metrics"]["steps"] == 2000
    resumed_at = int(Path(r["resumed_from"]).stem.split("_")[1])
    assert 500 <= resumed_at < 2000  # the checkpoint saved on the signal
    assert [p["step"] for p in r["curves"]["train"]] == list(range(100, 2001, 100))  # one run, continued
    logs = "".join(p.read_text() for p in (tmp_path / "sweep" / ".submitit").rglob("*_log.*"))
    assert "Requeued job" in logs


# --------------------------------------------------------------------------- set-up errors, in-process

def test_several_processes_need_a_distributed_mode(monkeypatch):
    from runner import distributed
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(RuntimeError, match="WORLD_SIZE=2.*train.distributed=none"):
        distributed.setup("none", "cpu")
    with pytest.raises(ValueError, match="train.distributed='dpp'"):
        distributed.setup("dpp", "cpu")


def test_ddp_without_torchrun_trains_in_one_process_with_a_notice(monkeypatch, capsys):
    from runner import distributed
    for name in ("WORLD_SIZE", "RANK", "SUBMITIT_EXECUTOR"):
        monkeypatch.delenv(name, raising=False)
    d = distributed.setup("ddp", "cpu")
    assert not d.enabled and d.is_main and d.device == torch.device("cpu")
    assert "one process" in capsys.readouterr().out


def test_global_batch_must_split_over_ranks_and_micro_steps(monkeypatch):
    from runner.train import check_train_config
    monkeypatch.setenv("WORLD_SIZE", "3")
    cfg = compose(["train.distributed=ddp", "train.batch_size=4"])
    with pytest.raises(ValueError, match="batch_size=4.*WORLD_SIZE=3"):
        check_train_config(cfg)
    check_train_config(compose(["train.distributed=ddp", "train.batch_size=6"]))


def test_cluster_signal_is_handed_to_the_launcher_after_the_checkpoint(monkeypatch):
    """In a submitit job USR2 means "time limit or preemption": the loop stops like on SIGTERM, and
    afterwards submitit's own handler (which requeues the job) gets the signal."""
    from runner import distributed
    from runner.train import StopSignal
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    assert distributed.cluster_signals() == [signal.SIGUSR2]
    calls = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: calls.append(signum))
    try:
        with StopSignal(distributed.cluster_signals()) as stop:
            os.kill(os.getpid(), signal.SIGUSR2)
            assert stop.received == "SIGUSR2" and calls == []  # ours, not submitit's, while training
        stop.forward()
        assert calls == [signal.SIGUSR2]
    finally:
        signal.signal(signal.SIGUSR2, previous)


def test_launcher_configs_compose():
    """launcher=slurm / local select the submitit plugin's launcher with our settings, and resume on requeue."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from conftest import CONF
    for name, target in [("slurm", "SlurmLauncher"), ("local", "LocalLauncher")]:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = hydra_compose("config", overrides=[f"launcher={name}"], return_hydra_config=True)
        assert cfg.hydra.launcher._target_.endswith(target) and cfg.train.resume == "auto"
    assert cfg.hydra.launcher.tasks_per_node == 1
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = hydra_compose("config", overrides=["launcher=slurm", "hydra.launcher.gpus_per_node=4"],
                            return_hydra_config=True)
    assert cfg.hydra.launcher.tasks_per_node == 4  # one process per GPU


def test_ranks_wait_for_rank_0s_data_on_a_gloo_group_with_the_configured_timeout(monkeypatch):
    """NCCL's 10-minute default would kill a job whose rank 0 tokenizes a large corpus: the wait is a barrier
    on a gloo group of its own, with train.data_wait_timeout_s."""
    from datetime import timedelta
    from runner import distributed
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(distributed, "init_process_group", lambda: None)
    groups, barriers = [], []
    monkeypatch.setattr(distributed.dist, "new_group", lambda **kw: groups.append(kw) or "the wait group")
    monkeypatch.setattr(distributed.dist, "barrier", lambda group=None: barriers.append(group))
    d = distributed.setup("ddp", "cpu", wait_timeout_s=5400)
    assert groups == [{"backend": "gloo", "timeout": timedelta(seconds=5400)}]
    distributed.wait_for_main(d)
    assert barriers == ["the wait group"]
    assert compose([]).train.data_wait_timeout_s >= 3600  # the default outlasts a long corpus build


def test_step_vote_reads_each_steps_sums_one_step_late_and_the_same_on_every_rank():
    """No host sync per step: the flags summed in step s's all-reduce are read at the start of step s + 2, so
    every rank (reading the same sums) stops at the same step; only rank 0's clock counts for the time budget;
    one process reads its own signal and clock at once."""
    from runner import distributed
    ranks = [distributed.StepVote(distributed.Dist("ddp", r, r, 2)) for r in range(2)]
    signalled_at, rank1_clock_out = 3, 2  # rank 1 receives SIGTERM during step 3; its clock (ignored) runs out first
    stopped = {}
    for step in range(1, 8):
        for r, vote in enumerate(ranks):
            signalled, time_up = vote.read(r == 1 and step > signalled_at, False)
            assert not time_up
            if r not in stopped and signalled:
                stopped[r] = step
        flags = [vote.flags(r == 1 and step >= signalled_at, r == 1 and step >= rank1_clock_out)
                 for r, vote in enumerate(ranks)]
        for vote in ranks:
            vote.record(sum(flags))  # what the all-reduce hands every rank
    assert stopped == {0: signalled_at + 2, 1: signalled_at + 2}

    ranks = [distributed.StepVote(distributed.Dist("ddp", r, r, 2)) for r in range(2)]
    ended = {}
    for step in range(1, 8):
        for r, vote in enumerate(ranks):
            if vote.read(False, r == 0 and step > 4)[1] and r not in ended:
                ended[r] = step
        flags = [vote.flags(False, step >= 4) for vote in ranks]
        for vote in ranks:
            vote.record(sum(flags))
    assert ended == {0: 6, 1: 6}  # rank 0's clock ran out in step 4: every rank ends before step 6

    single = distributed.StepVote(distributed.Dist())
    assert single.read(True, False) == (True, False) and single.read(False, True) == (False, True)


@pytest.mark.slow
def test_fsdp_training_loss_takes_the_chunked_head_with_one_process_gradients():
    """Under FSDP2 the head's weight is a shard outside forward: the loss reads it after the forward (the root
    keeps it gathered until backward). Loss and every gradient equal one process's whole-batch cross-entropy
    (tests/fsdp_loss_probe.py, on two gloo ranks)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "fsdp_loss_probe.py")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    assert out.stdout.count("ok chunked=1") == 2
