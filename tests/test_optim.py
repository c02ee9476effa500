"""Optimizers as config parts (runner/optim.py, conf/train/optimizer/): the groups each optimizer gets, checkpoints
with Muon, sweeps over the optimizer."""
import copy
from functools import partial

import pytest
import torch
from omegaconf import OmegaConf

from conftest import compose, tiny_model
from runner.distributed import full_state_dicts, load_full_state_dicts
from runner.optim import Combined, build_optimizer
from test_train import results, run, strip_timing
from variants import MoE, MultiHeadLatentAttention


def names_of(model, params) -> set[str]:
    by_id = {id(p): n for n, p in model.named_parameters()}
    return {by_id[id(p)] for p in params}


def hidden_weights_by_hand(model) -> set[str]:
    """The attention and feed-forward matrices, spelled out from the module tree: every nn.Linear weight under
    a block's `attn` or `ffn`."""
    return {f"blocks.{i}.{part}.{name}.weight" for i, block in enumerate(model.blocks) for part in ("attn", "ffn")
            for name, m in getattr(block, part).named_modules() if isinstance(m, torch.nn.Linear)}


@pytest.mark.parametrize("ffn", ["swiglu", "moe"])
def test_muon_gets_exactly_the_hidden_matrices_and_adamw_the_rest(ffn):
    options = {"ffn": partial(MoE, n_experts=2, top_k=1)} if ffn == "moe" else {}
    model = tiny_model(**options).train()
    opt = build_optimizer(compose(["train/optimizer=muon"]).train, model, "cpu")
    muon, adamw = opt.optimizers
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    in_muon = names_of(model, [p for g in muon.param_groups for p in g["params"]])
    assert in_muon == hidden_weights_by_hand(model)
    in_adamw = names_of(model, [p for g in adamw.param_groups for p in g["params"]])
    assert in_adamw == {n for n, _ in model.named_parameters()} - in_muon
    assert {"embed.weight", "lm_head.weight"} <= in_adamw
    assert all(muon_group["lr"] == 0.01 for muon_group in muon.param_groups)  # muon_lr; adamw_lr = train.lr
    assert all(g["lr"] == 3e-3 for g in adamw.param_groups)


def test_muon_covers_mla_matrices():
    model = tiny_model(attention_cls=MultiHeadLatentAttention).train()
    opt = build_optimizer(compose(["train/optimizer=muon"]).train, model, "cpu")
    assert names_of(model, opt.optimizers[0].param_groups[0]["params"]) == hidden_weights_by_hand(model)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("decay_embeddings", [False, True])
def test_adamw_decays_matrices_and_embeddings_only_when_asked(tied, decay_embeddings):
    model = tiny_model(tie_embeddings=tied).train()
    cfg = compose([f"train.decay_embeddings={decay_embeddings}"])
    opt = build_optimizer(cfg.train, model, "cpu")
    assert isinstance(opt, torch.optim.AdamW) and len(opt.param_groups) == 2  # as before: decayed, not
    decayed = names_of(model, opt.param_groups[0]["params"])
    by_hand = {n for n, p in model.named_parameters() if p.ndim == 2 and (decay_embeddings or n != "embed.weight")}
    assert decayed == by_hand and opt.param_groups[0]["weight_decay"] == 0.1
    assert opt.param_groups[1]["weight_decay"] == 0.0
    assert ("embed.weight" in decayed) == decay_embeddings
    if tied:  # the head is the embedding matrix: one parameter, decayed with it or not at all
        assert "lm_head.weight" not in {n for n, _ in model.named_parameters()}


def test_a_users_optimizer_plugs_in_by_target():
    cfg = compose()
    cfg.train.optimizer = OmegaConf.create({"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.5,
                                            "momentum": 0.9})
    opt = build_optimizer(cfg.train, tiny_model().train(), "cpu")
    assert isinstance(opt, torch.optim.SGD) and {g["lr"] for g in opt.param_groups} == {0.5}
    assert {g["weight_decay"] for g in opt.param_groups} == {0.1, 0.0}


def test_combined_state_round_trips_through_the_checkpoint_helpers():
    """Two steps, a checkpoint, a fresh model and optimizer loaded from it: one more step on each gives the
    same weights bit for bit (Muon's momentum and AdamW's moments both restored)."""
    cfg = compose(["train/optimizer=muon"]).train
    x = torch.randint(0, 61, (2, 16))

    def setup():
        model = tiny_model().train()
        opt = build_optimizer(cfg, model, "cpu")
        return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / (s + 1))

    def step(model, opt, sched):
        model.loss(x, x).backward()
        opt.step(), sched.step(), opt.zero_grad()

    model, opt, sched = setup()
    for _ in range(2):
        step(model, opt, sched)
    model_state, opt_state = full_state_dicts(model, opt)
    model_state, opt_state = copy.deepcopy(model_state), copy.deepcopy(opt_state)  # as a file holds them
    sched_state = sched.state_dict()
    step(model, opt, sched)

    fresh, fresh_opt, fresh_sched = setup()
    load_full_state_dicts(fresh, fresh_opt, model_state, opt_state, type("D", (), {"enabled": False})())
    fresh_sched.load_state_dict(sched_state)
    assert isinstance(fresh_opt, Combined) and fresh_opt.optimizers[0].state is fresh_opt.state
    step(fresh, fresh_opt, fresh_sched)
    for (name, a), b in zip(model.named_parameters(), fresh.parameters()):
        assert torch.equal(a, b), name


def test_the_optimizer_is_a_config_group_the_sweeps_can_vary():
    assert compose().train.optimizer._target_ == "runner.optim.adamw"
    muon = compose(["train/optimizer=muon", "train.lr=1e-3"]).train.optimizer
    assert muon._target_ == "runner.optim.muon" and muon.adamw_lr == 1e-3  # train.lr still sets AdamW's lr


@pytest.mark.slow
def test_resume_with_muon_reproduces_the_uninterrupted_run_exactly(tmp_path, cache_dir):
    args = ["hydra.run.dir=run", "train/optimizer=muon", "train.checkpoint_every=3", "train.log_every=2"]
    run(args, tmp_path, cache_dir)
    full = results(tmp_path / "run")
    (tmp_path / "run" / "checkpoints" / "step_0000006.pt").unlink()
    run([*args, "train.resume=true"], tmp_path, cache_dir)
    resumed = results(tmp_path / "run")
    assert resumed["resumed_from"].endswith("step_0000003.pt")
    assert strip_timing(resumed["curves"]["train"]) == strip_timing(full["curves"]["train"])  # bit-for-bit on CPU
    assert resumed["curves"]["val"] == full["curves"]["val"]
    assert full["variant"]["optimizer"] == "muon"


@pytest.mark.slow
def test_a_sweep_over_optimizers_names_each_job(tmp_path, cache_dir):
    run(["-m", "hydra.sweep.dir=sweep", "train/optimizer=adamw,muon", "train.max_steps=2"], tmp_path, cache_dir)
    jobs = sorted((tmp_path / "sweep").glob("*optimizer=*"))
    assert [j.name.split(",")[0] for j in jobs] == ["0_optimizer=adamw", "1_optimizer=muon"]  # choices first
    assert [results(j)["variant"]["optimizer"] for j in jobs] == ["adamw", "muon"]
    assert all(results(j)["status"] == "ok" for j in jobs)


def test_muon_under_fsdp_and_an_unpartial_optimizer_are_config_errors():
    from runner.optim import check_optimizer_config
    with pytest.raises(ValueError, match=r"train/optimizer=muon .* train.distributed=fsdp"):
        check_optimizer_config(compose(["train/optimizer=muon", "train.distributed=fsdp"]).train)
    with pytest.raises(ValueError, match=r"train.optimizer._partial_ must be true"):
        check_optimizer_config(compose(["train.optimizer._partial_=false"]).train)
    check_optimizer_config(compose(["train/optimizer=muon", "train.distributed=ddp"]).train)
