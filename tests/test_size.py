"""The size ladder (conf/model/size/): model/size=xs|s|m gives any preset about 1M, 6M, 25M non-embedding
parameters, applied after the preset's own sizes, with its training defaults."""
import pytest
import torch
from omegaconf import open_dict

from conftest import compose
from runner.build import build_model

PRESETS = ["gqa_rope", "mha_rope", "mqa_rope", "gpt2", "gpt_original", "sliding_rope", "sparse_rope"]
TARGETS = {"xs": 1e6, "s": 6e6, "m": 25e6}


@pytest.mark.parametrize("size", TARGETS)
@pytest.mark.parametrize("preset", PRESETS)
def test_size_ladder_counts(preset, size):
    cfg = compose([f"model={preset}", f"model/size={size}"])
    with open_dict(cfg):
        cfg.model.vocab_size = 4096
    model = build_model(cfg.model, torch.device("meta"))
    # counted independently of num_params: every parameter minus the token and position embeddings
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    n = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values() if id(p) not in embeddings)
    assert n == model.num_params(exclude_embeddings=True)
    assert 0.75 * TARGETS[size] < n < 1.35 * TARGETS[size], f"{preset} {size}: {n / 1e6:.2f}M"


def test_size_overrides_the_preset_and_sets_training_defaults():
    cfg = compose(["model=gpt2", "model/size=s", "+experiment=activation"])
    assert (cfg.model.d_model, cfg.model.n_layers, cfg.model.n_heads) == (256, 8, 8)
    assert cfg.train.max_steps == 400 and cfg.train.lr == 2e-3
    cfg = compose(["model/size=m", "train.max_steps=5"])  # the command line still wins
    assert cfg.train.max_steps == 5 and cfg.model.d_model == 512


def test_xxs_is_the_rung_below_xs_for_cpu_ladders():
    """xxs (conf/model/size/xxs.yaml): about 0.37M non-embedding parameters for gqa_rope, under a third of
    xs's FLOPs per token (a FLOPs budget buys it over 3x the steps)."""
    models = {}
    for size in ("xxs", "xs"):
        cfg = compose(["model=gqa_rope", f"model/size={size}"])
        with open_dict(cfg):
            cfg.model.vocab_size = 4096
        models[size] = build_model(cfg.model, torch.device("meta"))
    assert 0.3e6 < models["xxs"].num_params(exclude_embeddings=True) < 0.45e6
    assert models["xs"].flops_per_token(128) > 3 * models["xxs"].flops_per_token(128)
