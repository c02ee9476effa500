"""Training budgets (runner/budget.py): steps, tokens, analytic FLOPs or seconds; equal compute across a sweep."""
import math

import pytest
from omegaconf import OmegaConf

from runner.budget import check_budget, steps_for_budget
from test_train import results, run

B, T = 4, 32  # test_train's TINY: train.batch_size, data.seq_len


def train_cfg(**budget):
    return OmegaConf.create({"max_steps": None, "max_tokens": None, "max_flops": None, "max_seconds": None,
                             **budget})


def test_steps_bought_by_each_budget():
    assert steps_for_budget(train_cfg(max_steps=7), 128, 1e6) == 7
    assert steps_for_budget(train_cfg(max_tokens=1000), 128, 1e6) == 7  # 7 x 128 = 896 <= 1000 < 1024
    assert steps_for_budget(train_cfg(max_flops=2.5e9), 128, 1e6) == 19  # 1.28e8 per step: 19 x 1.28e8 = 2.43e9
    assert steps_for_budget(train_cfg(max_seconds=5), 128, 1e6) is None


@pytest.mark.parametrize("budget, message", [
    ({"max_steps": 10, "max_flops": 1e9}, "exactly one training budget, got 2: train.max_steps=10, train.max_flops"),
    ({}, "exactly one training budget, got 0"),
    ({"max_tokens": -5}, "train.max_tokens must be a positive number"),
    ({"max_steps": 2.5}, "train.max_steps must be a whole number"),
])
def test_bad_budgets_fail_naming_the_keys(budget, message):
    with pytest.raises(ValueError) as err:
        check_budget(train_cfg(**budget))
    assert message in str(err.value)


def test_a_budget_below_one_step_is_refused():
    with pytest.raises(ValueError, match="train.max_tokens=100 buys less than one step"):
        steps_for_budget(train_cfg(max_tokens=100), 128, 1e6)


@pytest.mark.slow
def test_equal_flops_across_attention_variants(tmp_path, cache_dir):
    """MHA and MQA given the same analytic FLOPs: MQA is cheaper per token, so it takes more steps; both spend
    the budget to within one step's worth, never more; FLOPs/token match the PaLM formula from the recorded
    parameter count."""
    budget = 5.0e8
    run(["-m", "model.n_heads=4", "model.attention.n_kv_heads=4,1",  # MHA, MQA (after TINY's n_kv_heads=1)
         f"train.max_flops={budget}", "train.max_steps=null", "train.checkpoint_every=0", "train.eval_every=0", "hydra.sweep.dir=sweep"],
        tmp_path, cache_dir)
    records = {{4: "mha", 1: "mqa"}[r["variant"]["n_kv_heads"]]: r
               for r in map(results, sorted((tmp_path / "sweep").glob("*_*")))}
    assert set(records) == {"mha", "mqa"}
    for r in records.values():
        m = r["metrics"]
        per_token = 6 * r["params_non_embedding"] + 12 * 1 * 4 * 8 * T  # n_layers=1, n_heads=4, head_dim=8
        assert r["flops_per_token"] == pytest.approx(per_token)
        assert m["train_tokens"] == m["steps"] * B * T and m["steps"] == r["curves"]["train"][-1]["step"]
        assert m["train_flops"] == pytest.approx(m["train_tokens"] * per_token)
        assert budget - per_token * B * T < m["train_flops"] <= budget  # within one step's worth, never over
        assert m["train_seconds"] > 0
    assert records["mqa"]["flops_per_token"] < records["mha"]["flops_per_token"]
    assert records["mqa"]["metrics"]["steps"] > records["mha"]["metrics"]["steps"]


@pytest.mark.slow
def test_token_budget_and_schedule_follow_it(tmp_path, cache_dir):
    run(["hydra.run.dir=run", "train.max_tokens=1000", "train.max_steps=null", "train.min_lr_ratio=0.1",
         "train.lr=1e-3"], tmp_path, cache_dir)
    r = results(tmp_path / "run")
    steps = 1000 // (B * T)
    assert r["metrics"]["steps"] == steps and r["metrics"]["train_tokens"] == steps * B * T
    # the cosine reaches lr x min_lr_ratio at the step the budget buys
    assert r["curves"]["train"][-1]["lr"] == pytest.approx(1e-3 * 0.1)


@pytest.mark.slow
def test_time_budget_decays_with_the_clock(tmp_path, cache_dir):
    run(["hydra.run.dir=run", "train.max_seconds=3", "train.max_steps=null", "train.min_lr_ratio=0.1",
         "train.lr=1e-3", "train.eval_every=0", "train.log_every=1", "train.checkpoint_every=0"], tmp_path, cache_dir)
    r = results(tmp_path / "run")
    m, curve = r["metrics"], r["curves"]["train"]
    assert m["train_seconds"] >= 3 and m["steps"] == curve[-1]["step"] > 2
    assert all(a["seconds"] <= b["seconds"] for a, b in zip(curve, curve[1:]))
    # after warm-up (2 steps) the lr follows the share of the 3 s spent before the point's last step, which
    # began after the previous point: f(seconds / 3) <= lr <= f(previous seconds / 3), f the cosine
    f = lambda share: 1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, share))))
    for prev, p in zip(curve, curve[1:]):
        if prev["step"] >= 2:
            assert f(p["seconds"] / 3) - 1e-12 <= p["lr"] <= f(prev["seconds"] / 3) + 1e-12, (prev, p)
    assert curve[-1]["lr"] < f(curve[-2]["seconds"] / 3) + 1e-12 < 1e-3


@pytest.mark.slow
def test_time_budget_logs_its_last_window_between_log_steps(tmp_path, cache_dir):
    """A time budget's last step is known only after it (under torchrun the ranks learn it a step late): the
    steps since the last log point still make a final point of the training curve."""
    run(["hydra.run.dir=run", "train.max_seconds=2", "train.max_steps=null", "train.eval_every=0",
         "train.log_every=100000", "train.checkpoint_every=0"], tmp_path, cache_dir)
    r = results(tmp_path / "run")
    assert r["status"] == "ok" and r["curves"]["train"][-1]["step"] == r["metrics"]["steps"] > 0
