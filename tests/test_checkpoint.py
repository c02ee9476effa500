"""Faults that must not lose work: a damaged checkpoint, two runs in one directory, a failed write."""
import errno
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, compose, tiny_model
from hold_phase import HeldRun
from runner.checkpoint import (RESUME_KEYS, CheckpointWriteError, NoReadableCheckpoint, list_checkpoints,
                               load_latest_readable, load_model_weights, save_checkpoint)
from runner.runlock import LOCK_NAME, RunDirectoryBusy, RunLock
from test_train import TINY, results, run, strip_timing


def full_state(model, step):
    """A checkpoint with every key a resume reads (the values need not be real for these tests)."""
    return {"model": {k: v.clone() for k, v in model.state_dict().items()}, "optimizer": {}, "scheduler": {},
            "loader": {}, "rng": {}, "step": step, "curves": {}}


def truncate(path: Path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])
    return path.read_bytes()


# -- a damaged checkpoint ------------------------------------------------------------------------------------
def test_a_truncated_newest_checkpoint_is_set_aside_and_the_older_weights_are_read(tmp_path):
    older, newer = tiny_model(seed=1), tiny_model(seed=2)
    save_checkpoint(tmp_path, 3, full_state(older, 3))
    newest = save_checkpoint(tmp_path, 6, full_state(newer, 6))
    cut = truncate(newest)
    model = tiny_model(seed=3)
    with pytest.warns(UserWarning, match=re.escape(str(newest))):
        found = load_model_weights(model, tmp_path)  # as eval.weights / generate.weights read a run
    assert found.name == "step_0000003.pt"
    for key, value in older.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    aside = newest.with_name("step_0000006.pt.damaged")
    assert not newest.exists() and aside.read_bytes() == cut  # kept aside as it was, not deleted
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000003.pt"]  # neither retried nor pruned


def test_a_checkpoint_without_what_a_resume_needs_is_skipped_for_resume_but_not_for_weights(tmp_path):
    save_checkpoint(tmp_path, 3, full_state(tiny_model(), 3))
    save_checkpoint(tmp_path, 6, {"model": tiny_model().state_dict(), "step": 6})  # no optimizer, loader, ...
    assert load_latest_readable(tmp_path, ("model",))[0].name == "step_0000006.pt"
    with pytest.warns(UserWarning, match=r"step_0000006\.pt is damaged \(incomplete: no optimizer, scheduler"):
        path, state = load_latest_readable(tmp_path, RESUME_KEYS)
    assert path.name == "step_0000003.pt" and state["step"] == 3


def test_when_every_checkpoint_is_damaged_the_error_lists_them_all_and_renames_nothing(tmp_path):
    a = save_checkpoint(tmp_path, 3, full_state(tiny_model(), 3))
    b = save_checkpoint(tmp_path, 6, full_state(tiny_model(), 6))
    truncate(a, 0.2)
    b.write_bytes(b"")
    with pytest.raises(NoReadableCheckpoint) as err:
        load_latest_readable(tmp_path, RESUME_KEYS)
    message = str(err.value)
    assert str(a) in message and str(b) in message and message.index(str(b)) < message.index(str(a))  # newest first
    assert list_checkpoints(tmp_path) == [a, b]  # a retry meets the same error, not a fresh start


def test_a_damaged_file_named_explicitly_is_refused_without_falling_back(tmp_path):
    save_checkpoint(tmp_path, 3, full_state(tiny_model(), 3))
    newest = save_checkpoint(tmp_path, 6, full_state(tiny_model(), 6))
    truncate(newest)
    with pytest.raises(NoReadableCheckpoint, match=re.escape(str(newest))):
        load_latest_readable(newest, RESUME_KEYS)
    assert newest.exists()


@pytest.mark.slow
def test_resume_skips_a_truncated_newest_checkpoint_and_ends_as_the_uninterrupted_run(tmp_path, cache_dir):
    args = ["hydra.run.dir=run", "train.checkpoint_every=3", "train.log_every=2"]
    run(args, tmp_path, cache_dir)
    full = results(tmp_path / "run")
    newest = tmp_path / "run" / "checkpoints" / "step_0000006.pt"
    truncate(newest)  # as a failing disk or a copy cut short leaves it
    out = run([*args, "train.resume=true"], tmp_path, cache_dir)
    resumed = results(tmp_path / "run")
    assert resumed["resumed_from"].endswith("step_0000003.pt")
    assert str(newest) in out.stderr and "damaged" in out.stderr
    assert (tmp_path / "run" / "checkpoints" / "step_0000006.pt.damaged").exists()
    assert resumed["metrics"]["final_train_loss"] == full["metrics"]["final_train_loss"]  # bit-for-bit on CPU
    assert strip_timing(resumed["curves"]["train"]) == strip_timing(full["curves"]["train"])


# -- a failed write ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fails", ["torch.save", "os.replace"])
def test_a_failed_checkpoint_write_leaves_the_older_one_and_no_temporary_file(tmp_path, monkeypatch, fails):
    import runner.checkpoint as checkpoint
    model = tiny_model(seed=1)
    older = save_checkpoint(tmp_path, 3, full_state(model, 3))

    def disk_full(*args, **kwargs):
        if fails == "torch.save":
            args[1].write(b"partial bytes")  # the failure comes part-way through the file
        raise OSError(errno.ENOSPC, "No space left on device")

    target = checkpoint.torch if fails == "torch.save" else checkpoint.os
    monkeypatch.setattr(target, fails.split(".")[1], disk_full)
    with pytest.raises(CheckpointWriteError) as err:
        save_checkpoint(tmp_path, 6, full_state(tiny_model(seed=2), 6))
    monkeypatch.undo()
    message = str(err.value)
    assert "step_0000006.pt" in message and "No space left on device" in message
    assert re.search(r"[\d.,]+ (B|KiB|MiB|GiB|TiB) free", message)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_0000003.pt"]  # no .tmp_*
    path, state = load_latest_readable(tmp_path, RESUME_KEYS)
    assert path == older and all(torch.equal(state["model"][k], v) for k, v in model.state_dict().items())


def test_a_failed_checkpoint_write_stops_the_run_and_results_say_failed(tmp_path, cache_dir, monkeypatch):
    import runner.checkpoint as checkpoint
    import runner.train as train_module
    real = checkpoint.torch.save

    def step_6_fails(obj, f, *args, **kwargs):
        if "step_0000006" in f.name:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", step_6_fails)
    (tmp_path / "run").mkdir()
    monkeypatch.chdir(tmp_path / "run")  # results.json and checkpoints: the cwd outside Hydra
    with pytest.raises(CheckpointWriteError):
        train_module.main(compose([*TINY, f"cache_dir={cache_dir}", "train.checkpoint_every=3"]))
    r = results(tmp_path / "run")
    assert r["status"] == "failed" and r["error"]["type"] == "CheckpointWriteError"
    assert "step_0000006.pt" in r["error"]["message"] and " free " in r["error"]["message"]
    folder = tmp_path / "run" / "checkpoints"
    assert [p.name for p in folder.iterdir()] == ["step_0000003.pt"]
    monkeypatch.undo()
    assert load_latest_readable(tmp_path / "run", RESUME_KEYS)[1]["step"] == 3
    assert not (tmp_path / "run" / LOCK_NAME).exists()  # released when the run ended


# -- one writer per run directory ------------------------------------------------------------------------------
def write_lock(run_dir: Path, **owner):
    run_dir.mkdir(parents=True, exist_ok=True)
    holder = {"pid": 1, "host": socket.gethostname(), "started_at": "2026-01-01T00:00:00+0000", **owner}
    (run_dir / LOCK_NAME).write_text(json.dumps(holder))


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # reaped: no process has this pid (until the system reuses it, long after this test)
    return proc.pid


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path):
    write_lock(tmp_path, pid=dead_pid())
    with pytest.warns(UserWarning, match="is gone"):
        lock = RunLock.take(tmp_path)
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_lock_whose_pid_now_belongs_to_a_later_process_is_stale(tmp_path):
    write_lock(tmp_path, pid=os.getpid(), process_start="1")  # this pid, but not this process's start time
    if not Path("/proc/self/stat").exists():
        pytest.skip("process start times come from /proc")
    with pytest.warns(UserWarning, match="belongs to another process"):
        RunLock.take(tmp_path).release()


def test_a_live_holder_is_named_and_a_remote_one_is_never_guessed_stale(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        write_lock(tmp_path / "a", pid=sleeper.pid)
        with pytest.raises(RunDirectoryBusy, match=rf"pid {sleeper.pid} on host {re.escape(socket.gethostname())}, "
                                                   r"started 2026-01-01T00:00:00\+0000"):
            RunLock.take(tmp_path / "a")
    finally:
        sleeper.kill()
        sleeper.wait()
    write_lock(tmp_path / "b", pid=dead_pid(), host="another-node")  # its pid means nothing here
    with pytest.raises(RunDirectoryBusy, match="another-node"):
        RunLock.take(tmp_path / "b")
    lock = RunLock.take(tmp_path / "c")
    with pytest.raises(RunDirectoryBusy):  # even this process may not take its own directory twice
        RunLock.take(tmp_path / "c")
    lock.release()


def test_a_requeued_slurm_job_takes_over_the_lock_of_its_earlier_run_on_another_node(tmp_path, monkeypatch):
    write_lock(tmp_path, host="another-node", slurm_job_id="77", slurm_restart_count=0)
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    with pytest.warns(UserWarning, match="SLURM job 77"):
        RunLock.take(tmp_path).release()
    write_lock(tmp_path, host="another-node", slurm_job_id="77", slurm_restart_count=1)  # the same incarnation
    with pytest.raises(RunDirectoryBusy):
        RunLock.take(tmp_path)


@pytest.mark.slow
def test_a_second_run_into_a_live_run_directory_stops_at_once(tmp_path, cache_dir):
    env = {**os.environ, "WANDB_SILENT": "true"}
    cmd = [sys.executable, str(ROOT / "run.py"), *TINY, f"cache_dir={cache_dir}", "hydra.run.dir=run",
           "train.max_steps=100000", "train.checkpoint_every=1000000", "train.eval_every=0"]
    # the first run is held in its training loop (after its first logged step) while the second tries
    held = HeldRun(tmp_path, "runner.train:Trainer.log_train_point", cmd[2:], after=True)
    first = held.proc
    try:
        held.wait_held()
        assert (tmp_path / "run" / LOCK_NAME).exists()
        started = time.time()
        second = subprocess.run([*cmd[:-3], "train.resume=true"], cwd=tmp_path, capture_output=True, text=True,
                                timeout=120, env=env)
        assert second.returncode != 0 and time.time() - started < 60  # interpreter start-up included
        assert "RunDirectoryBusy" in second.stderr and "resumed from" not in second.stdout
        assert f"pid {first.pid} on host {socket.gethostname()}" in second.stderr
        assert results(tmp_path / "run")["status"] == "running"  # the first run's record, untouched
        assert first.poll() is None
    finally:
        held.signal(signal.SIGTERM)  # stop the first at its next step: checkpoint, record, exit 143
        _, stdout, stderr = held.finish()
    assert first.returncode == 143, stderr[-3000:]
    r = results(tmp_path / "run")
    assert r["status"] == "interrupted" and "step_" in r["error"]["message"]
    assert not (tmp_path / "run" / LOCK_NAME).exists()  # released: the directory is free for the resume
