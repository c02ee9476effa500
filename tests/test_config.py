"""The Hydra tree: every preset composes and builds; swaps work from the command line; bad configs fail
early with a message that names the key."""
import subprocess
import sys

import pytest
import torch
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from conftest import CONF, ROOT, compose
from runner.build import build_model, check_model_config

PRESETS = sorted(p.stem for p in (CONF / "model").glob("*.yaml") if not p.stem.endswith("_shape"))
SMALL = ["tokenizer.vocab_size=97", "data.seq_len=32"]


def analytic_params(cfg) -> int:
    """Parameter count written out from the architecture, independent of the modules."""
    m = cfg.model
    d, L, H, V = m.d_model, m.n_layers, m.n_heads, m.vocab_size
    hd = m.head_dim or d // H
    kv = m.attention.n_kv_heads or m.n_heads  # null: MHA
    norm = {"RMSNorm": d, "LayerNorm": 2 * d}[m.norm._target_.rsplit(".", 1)[-1]]
    if m.ffn._target_.endswith("GatedMLP"):
        h = m.ffn.hidden_dim or -(-int(8 * d / 3) // m.ffn.multiple_of) * m.ffn.multiple_of
        ffn = 3 * d * h
    else:
        ffn = 2 * d * (m.ffn.hidden_dim or 4 * d)
    attn = 2 * d * H * hd + 2 * d * kv * hd
    pos = m.max_seq_len * d if m.position._target_.endswith("LearnedPosition") else 0
    total = V * d + pos + L * (attn + ffn + 2 * norm) + (norm if m.norm_position == "pre" else 0)
    return total + (0 if m.tie_embeddings else V * d)


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_composes_builds_and_trains_a_step(preset):
    cfg = compose([f"model={preset}", *SMALL])
    model = instantiate(cfg.model)  # the public contract: instantiate builds the model
    assert model.num_params() == analytic_params(cfg)
    x = torch.randint(0, 97, (2, 32))
    loss = model.loss(x, x.roll(-1, 1))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("overrides, check", [
    (["model/attention=mqa"], lambda m: m.blocks[0].attn.n_kv_heads == 1),
    (["model/norm=layernorm"], lambda m: isinstance(m.blocks[0].attn_norm, torch.nn.LayerNorm)),
    (["model/ffn=relu"], lambda m: type(m.blocks[0].ffn).__name__ == "MLP"),
    (["model/ffn=geglu"], lambda m: type(m.blocks[0].ffn).__name__ == "GatedMLP"),
    (["model/position=learned"], lambda m: type(m.position).__name__ == "LearnedPosition"),
    (["model/position=sinusoidal"], lambda m: type(m.position).__name__ == "SinusoidalPosition"),
    (["model.norm_position=post"], lambda m: type(m.blocks[0]).__name__ == "PostNormBlock"),
    (["model.attention.n_kv_heads=4"], lambda m: m.blocks[0].attn.n_kv_heads == 4),
    (["model.attention.kernel=eager"], lambda m: m.blocks[0].attn.kernel == "eager"),
    (["model.attention.window=8"], lambda m: m.blocks[0].attn.pattern.window == 8),
    (["model=sparse_rope"], lambda m: [type(b.attn.pattern).__name__ for b in m.blocks][:2] == ["Causal", "StridedSparse"]),
    (["model/position=alibi"], lambda m: type(m.score_mods[0]).__name__ == "ALiBiBias"),
    (["model.attention.softcap=30.0"], lambda m: m.blocks[0].attn.score_mods[0].cap == 30.0),
    (["model.attention.qk_norm=true"], lambda m: m.blocks[0].attn.q_norm.normalized_shape == (32,)),
    (["model/norm=dyt"], lambda m: type(m.blocks[0].attn_norm).__name__ == "DyT"),
    (["model.norm_position=olmo2"], lambda m: type(m.blocks[0]).__name__ == "OLMo2Block"),
    (["model/ffn=relu2"], lambda m: m.blocks[0].ffn.up_proj.out_features == 512),
    (["model/ffn=moe", "model.ffn.shared_expert=true"], lambda m: len(m.blocks[0].ffn.experts) == 8),
    (["model/attention=mla"], lambda m: m.cache_layout() == {"latent": (1, 32), "k_rope": (1, 32)}),
])
def test_command_line_swaps(overrides, check):
    cfg = compose(["model=gqa_rope", *SMALL, *overrides])
    assert check(build_model(cfg.model))


@pytest.mark.parametrize("overrides, message", [
    (["model.n_heads=3"], "model.n_heads=3 does not divide model.d_model=128"),
    (["model.attention.n_kv_heads=3"], "model.attention.n_kv_heads=3 must divide model.n_heads=4"),
    (["model.d_model=36"], "rotary dimension, got 9 .*head size model.d_model / model.n_heads"),  # head_dim 9
    (["model.attention.window=0"], "window must be >= 1"),
    (["model.attention.kernel=cuda_magic"], "model.attention.kernel='cuda_magic'"),
    (["model.norm_position=middle"], "model.norm_position='middle'"),
    (["model/ffn=relu", "model.ffn.activation=swish"], "model.ffn.activation='swish'"),
])
def test_bad_configs_fail_before_allocation(overrides, message):
    cfg = compose(["model=gqa_rope", *SMALL, *overrides])
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        check_model_config(cfg.model)


def test_partial_rotary_must_leave_an_even_dimension():
    cfg = compose(["model=gqa_rope", *SMALL, "model.position.partial_rotary_factor=0.3"])  # 32 * 0.3 = 9.6 -> 9
    with pytest.raises(ValueError, match=r"got 9 = .*: change model\.position\.partial_rotary_factor=0\.3"):
        check_model_config(cfg.model)


@pytest.mark.parametrize("overrides, message", [
    (["model/attention=gqa_typo"], "model/attention"),
    (["model=not_a_preset"], "model"),
    (["model.attention.n_kv_head=2"], "n_kv_head"),
    (["model.d_modle=64"], "d_modle"),
])
def test_unknown_names_and_misspelled_keys_fail_at_composition(overrides, message):
    with pytest.raises(ConfigCompositionException, match=message):
        compose(["model=gqa_rope", *SMALL, *overrides])


def test_config_check_allocates_nothing():
    cfg = compose(["model=gqa_rope", *SMALL, "model.d_model=4096", "model.n_layers=64"])  # ~13B params
    check_model_config(cfg.model)  # meta device: instant, no memory


def test_cli_prints_the_composed_config():
    out = subprocess.run([sys.executable, "run.py", "--cfg", "job", "model=gqa_rope", "model/attention=mqa"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    cfg = OmegaConf.create(out.stdout)
    assert cfg.model.attention.n_kv_heads == 1
    assert cfg.model.norm_position == "pre"


def _sweep_points():
    for path in sorted((CONF / "experiment").glob("*.yaml")):
        params = OmegaConf.load(path).hydra.sweeper.params
        for key, values in params.items():
            for value in str(values).split(","):
                yield path.stem, f"{key}={value}"


@pytest.mark.parametrize("experiment, override", list(_sweep_points()))
def test_every_named_sweep_point_builds(experiment, override):
    """Each job of every named sweep composes and passes the model check (meta device, nothing allocated)."""
    cfg = compose([f"+experiment={experiment}", *SMALL, override])
    check_model_config(cfg.model)
