"""The lr schedules (runner/schedule.py) and cooldown branches (runner/cooldown.py)."""
import math

import pytest
import torch
from omegaconf import OmegaConf

from runner.cooldown import check_cooldown_config
from runner.schedule import build_schedule, check_schedule_config
from test_train import TINY, results, run


def train_cfg(**kw):
    base = dict(schedule="wsd", warmup_steps=2, min_lr_ratio=0.1, decay_fraction=0.25, decay_shape="linear",
                cooldowns=[], cooldown_fraction=0.2, max_steps=None, max_tokens=None, max_flops=None,
                max_seconds=None)
    return OmegaConf.create({**base, **kw})


def test_cosine_is_the_default_warmup_then_half_cosine():
    t = train_cfg(schedule="cosine", warmup_steps=3, max_steps=13)
    f = build_schedule(t, 13)
    assert [f(s) for s in range(3)] == pytest.approx([1 / 3, 2 / 3, 1.0])
    for s in range(3, 13):  # hand formula: 0.1 + 0.9 * (1 + cos(pi * (s - 3) / 10)) / 2
        assert f(s) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * (s - 3) / 10)))


def test_wsd_is_constant_then_decays_over_the_last_fraction():
    f = build_schedule(train_cfg(max_steps=20), 20)  # decay over the last 5 steps, linear to 0.1
    assert [f(s) for s in range(2)] == pytest.approx([0.5, 1.0])
    assert [f(s) for s in range(2, 15)] == [1.0] * 13
    assert [f(s) for s in range(15, 20)] == pytest.approx([1 - 0.9 * k / 5 for k in range(1, 6)])
    g = build_schedule(train_cfg(max_steps=20, decay_shape="1-sqrt"), 20)
    assert [g(s) for s in range(15, 20)] == pytest.approx([1 - 0.9 * (1 - math.sqrt(1 - k / 5)) for k in range(1, 6)])
    assert g(16) > f(16)  # 1-sqrt keeps the lr higher early in the decay


@pytest.mark.parametrize("kw, match", [
    (dict(schedule="linear", max_steps=10), "train.schedule"),
    (dict(max_seconds=5), "max_seconds"),
    (dict(max_steps=10, decay_shape="cubic"), "train.decay_shape"),
])
def test_schedule_config_errors_name_the_key(kw, match):
    t = train_cfg(**kw)
    with pytest.raises(ValueError, match=match):
        check_schedule_config(t, next(k for k in ("max_steps", "max_seconds") if t.get(k)))


@pytest.mark.parametrize("kw, key, match", [
    (dict(max_flops=1e13, cooldowns=[2e13]), "max_flops", "not below the run's budget"),
    (dict(max_flops=1e13, cooldowns=[1e13]), "max_flops", "not below the run's budget"),
    (dict(max_flops=1e13, cooldowns=[100, 200]), "max_flops", "wrong unit"),  # steps given for a FLOPs budget
    (dict(max_steps=100, cooldowns=[50.5]), "max_steps", "whole number"),
    (dict(max_steps=100, cooldowns=[95]), "max_steps", "after the run's own decay"),
    (dict(max_steps=100, cooldowns=[50], schedule="cosine"), "max_steps", "schedule=wsd"),
    (dict(max_steps=100, cooldowns=[50], cooldown_fraction=1.0), "max_steps", "cooldown_fraction"),
])
def test_cooldown_config_errors_name_the_key(kw, key, match):
    with pytest.raises(ValueError, match=match) as err:
        check_cooldown_config(train_cfg(**kw), key)
    assert "train.cooldown" in str(err.value)


def test_a_cooldown_inside_the_warmup_is_refused_naming_the_unit():
    from runner.cooldown import Cooldowns
    t = train_cfg(max_flops=1e13, warmup_steps=30, cooldowns=[5e11])
    with pytest.raises(ValueError, match="inside the warm-up.*FLOPs"):
        Cooldowns(t, "max_flops", tokens_per_step=2048, flops_per_token=1e7)  # 5e11 buys 24 steps: branch at 19
    assert Cooldowns(train_cfg(max_flops=1e13, warmup_steps=30, cooldowns=[2e12]), "max_flops", 2048, 1e7).plans == [
        {"budget": 2e12, "steps": 97, "start": 97 - 19}]


WSD = ["train.max_steps=12", "train.schedule=wsd", "train.decay_fraction=0.25", "train.decay_shape=linear",
       "train.cooldown_fraction=0.4", "train.eval_every=4", "train.log_every=2"]


def final_weights(run_dir):
    ckpt = sorted((run_dir / "checkpoints").glob("step_*.pt"))[-1]
    return torch.load(ckpt, weights_only=False)


@pytest.mark.slow
def test_cooldowns_leave_the_main_run_exactly_as_without_them(tmp_path, cache_dir):
    run(["hydra.run.dir=plain", *WSD], tmp_path, cache_dir)
    run(["hydra.run.dir=branched", *WSD, "train.cooldowns=[5,10]"], tmp_path, cache_dir)
    plain, branched = results(tmp_path / "plain"), results(tmp_path / "branched")
    assert branched["metrics"]["val_loss"] == plain["metrics"]["val_loss"]  # bit-for-bit on CPU
    strip = lambda pts: [{k: v for k, v in p.items() if k not in ("tokens_per_s", "mfu", "seconds")} for p in pts]
    assert strip(branched["curves"]["train"]) == strip(plain["curves"]["train"])
    assert branched["curves"]["val"] == plain["curves"]["val"]
    a, b = final_weights(tmp_path / "plain"), final_weights(tmp_path / "branched")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["loader"] == b["loader"] and torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    points = branched["metrics"]["cooldowns"]
    assert [(p["budget"], p["steps"], p["branched_at"]) for p in points] == [(5, 5, 3), (10, 10, 6)]
    assert "cooldowns" not in plain["metrics"]
    # the independent reference: a cooldown point is the loss of a full wsd run of that budget whose decay
    # is the cooldown's (Hägele et al.'s claim, here exact by construction of the branch)
    run(["hydra.run.dir=short", *WSD, "train.max_steps=5", "train.decay_fraction=0.4"], tmp_path, cache_dir)
    assert points[0]["val_loss"] == results(tmp_path / "short")["metrics"]["val_loss"]


@pytest.mark.slow
def test_a_resumed_run_keeps_its_cooldown_points_and_does_not_redo_them(tmp_path, cache_dir):
    args = ["hydra.run.dir=run", *WSD, "train.cooldowns=[5,10]", "train.checkpoint_every=4"]
    run(args, tmp_path, cache_dir)
    full = results(tmp_path / "run")
    (tmp_path / "run" / "checkpoints" / "step_0000012.pt").unlink()  # died after step 8: both points recorded
    run([*args, "train.resume=true"], tmp_path, cache_dir)
    resumed = results(tmp_path / "run")
    assert resumed["resumed_from"].endswith("step_0000008.pt")
    # the same points, timings included: a redone branch would have measured its own seconds
    assert resumed["metrics"]["cooldowns"] == full["metrics"]["cooldowns"]
    assert resumed["metrics"]["val_loss"] == full["metrics"]["val_loss"]


@pytest.mark.parametrize("experiment", ["ffn_ladder", "positions_ladder"])
def test_the_ladder_presets_pass_the_schedule_checks(experiment):
    from conftest import compose
    from runner.budget import check_budget
    t = compose([f"+experiment={experiment}"]).train
    key = check_budget(t)
    check_schedule_config(t, key)
    check_cooldown_config(t, key)
    assert key == "max_flops" and t.schedule == "wsd" and min(t.cooldowns) * 10 <= t.max_flops * 1.0001
