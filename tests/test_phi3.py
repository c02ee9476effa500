"""Phi-3 checkpoints: our model against transformers' Phi3ForCausalLM on tiny random configs saved with
save_pretrained (no downloads), the fused-tensor mapping, save_hf, KV-head pooling and the errors."""
import json
import re
import warnings
from functools import partial

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from conftest import compose
from runner.build import build_model
from variants import MLP, Attention, Causal, GatedMLP, LearnedPosition, LinearScaling, LongRoPEScaling, RoPE
from variants import SlidingWindow, StridedSparse, TransformerLM
from variants.ffn import ACTIVATIONS
from variants.hf import HF_ACTIVATIONS, mean_pool_kv_heads, to_hf_model

transformers = pytest.importorskip("transformers")
from transformers import Phi3Config, Phi3ForCausalLM  # noqa: E402

warnings.filterwarnings("ignore", message=".*original_max_position_embeddings.*")
VOCAB = 128
SHORT = [1.0 + 0.1 * i for i in range(8)]  # LongRoPE factors, head_dim 16 -> 8 frequencies
LONG = [1.5 + 0.5 * i for i in range(8)]
LONGROPE = dict(original_max_position_embeddings=32,
                rope_parameters={"rope_type": "longrope", "short_factor": SHORT, "long_factor": LONG})


def phi3_config(**overrides) -> Phi3Config:
    """A tiny Phi-3; initializer_range 0.2 makes the logits peaked enough that greedy choices are not ties."""
    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=128, initializer_range=0.2, pad_token_id=None, bos_token_id=None,
                eos_token_id=None)
    return Phi3Config(**{**base, **overrides})


def save_phi3(directory, seed=0, attn_implementation="eager", **overrides):
    """A random tiny Phi3ForCausalLM saved with save_pretrained, loaded back as transformers would."""
    torch.manual_seed(seed)
    Phi3ForCausalLM(phi3_config(**overrides)).save_pretrained(directory)
    return directory, Phi3ForCausalLM.from_pretrained(directory, attn_implementation=attn_implementation).eval()


def tokens(T, B=2, seed=1):
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def max_diff(ours, hf, x):
    with torch.no_grad():
        return (ours(x) - hf(x).logits).abs().max().item()


CASES = {
    "mini_4k_mha": ({}, 40),
    "gqa": ({"num_key_value_heads": 2}, 40),
    "longrope_beyond_original": (LONGROPE, 80),
    "partial_rotary_tied": ({"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                                 "partial_rotary_factor": 0.5}, "tie_word_embeddings": True}, 40),
    "sliding_window": ({"sliding_window": 8}, 40),
    "partial_rotary_geglu": ({"rope_parameters": {"rope_type": "default", "rope_theta": 500.0,
                                                  "partial_rotary_factor": 0.5}, "hidden_act": "gelu_pytorch_tanh"}, 40),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(tmp_path, case):
    overrides, T = CASES[case]
    path, hf = save_phi3(tmp_path, **overrides)
    ours = TransformerLM.from_hf(path)
    x = tokens(T)
    assert max_diff(ours, hf, x) < 1e-4
    assert not ours.training and ours.embed.weight.dtype == torch.float32


@pytest.mark.parametrize("hidden_act", sorted(HF_ACTIVATIONS))
def test_every_mapped_activation_matches_transformers(tmp_path, hidden_act):
    """Phi3MLP is down(ACT2FN[hidden_act](gate(x)) * up(x)): our GatedMLP with the mapped activation."""
    path, hf = save_phi3(tmp_path, hidden_act=hidden_act)
    ours = TransformerLM.from_hf(path)
    assert ours.blocks[0].ffn.act is ACTIVATIONS[HF_ACTIVATIONS[hidden_act]]
    assert max_diff(ours, hf, tokens(24)) < 1e-4


def test_an_activation_without_counterpart_is_refused(tmp_path):
    path, _ = save_phi3(tmp_path, hidden_act="quick_gelu")  # x * sigmoid(1.702 x): not one of ours
    with pytest.raises(ValueError, match="hidden_act='quick_gelu'.*gelu_pytorch_tanh"):
        TransformerLM.from_hf(path)


def test_the_cases_exercise_what_they_claim(tmp_path):
    """LongRoPE switched to its long factors, and the sliding window masked something."""
    path, hf = save_phi3(tmp_path / "long", **LONGROPE)
    ours, x = TransformerLM.from_hf(path), tokens(80)
    with torch.no_grad():
        assert not torch.allclose(ours(x)[:, :20], ours(x[:, :20]), atol=1e-3)  # other factors past 32 tokens
    path, hf = save_phi3(tmp_path / "window", sliding_window=8)
    windowed, full = TransformerLM.from_hf(path), TransformerLM.from_hf(path, attention_schedule=[Causal()])
    assert windowed.blocks[0].attn.pattern == SlidingWindow(8) and full.blocks[0].attn.pattern == Causal()
    with torch.no_grad():
        torch.testing.assert_close(windowed(x[:, :8]), full(x[:, :8]))  # identical within the window
        assert not torch.allclose(windowed(x[:, :40]), full(x[:, :40]), atol=1e-3)


@pytest.mark.parametrize("kernel", ["eager", "sdpa", "flex"])
def test_every_kernel_matches_with_a_sliding_window(tmp_path, kernel):
    path, hf = save_phi3(tmp_path, sliding_window=8, num_key_value_heads=2)
    assert max_diff(TransformerLM.from_hf(path, kernel=kernel), hf, tokens(40)) < 1e-4


def test_legacy_rope_scaling_su_config(tmp_path):
    """Early Phi-3-128k configs: rope_theta at the top and rope_scaling {"type": "su"} (transformers 5 itself
    rejects "su"; we read it as LongRoPE)."""
    path, hf = save_phi3(tmp_path, **LONGROPE)
    cfg = json.loads((path / "config.json").read_text())
    cfg.pop("rope_parameters")
    cfg.update(rope_theta=10000.0, rope_scaling={"type": "su", "short_factor": SHORT, "long_factor": LONG})
    (path / "config.json").write_text(json.dumps(cfg))
    ours = TransformerLM.from_hf(path)
    assert isinstance(ours.position.scaling, LongRoPEScaling)
    assert max_diff(ours, hf, tokens(80)) < 1e-4


def test_sharded_safetensors_and_bin(tmp_path):
    path, hf = save_phi3(tmp_path / "sharded", num_key_value_heads=2)
    hf.save_pretrained(path, max_shard_size="40KB")
    assert (path / "model.safetensors.index.json").is_file() and len(list(path.glob("*.safetensors"))) > 2
    assert max_diff(TransformerLM.from_hf(path), hf, tokens(24)) < 1e-4

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "config.json").write_text((path / "config.json").read_text())
    torch.save(hf.state_dict(), bin_dir / "pytorch_model.bin")
    assert max_diff(TransformerLM.from_hf(bin_dir), hf, tokens(24)) < 1e-4


def test_fused_tensors_split_by_rows(tmp_path):
    """q/k/v and gate/up are row blocks of Phi-3's fused matrices, in that order."""
    path, hf = save_phi3(tmp_path, num_key_value_heads=2)
    ours = TransformerLM.from_hf(path)
    qkv = hf.model.layers[1].self_attn.qkv_proj.weight
    attn = ours.blocks[1].attn
    torch.testing.assert_close(attn.q_proj.weight, qkv[:64])
    torch.testing.assert_close(attn.k_proj.weight, qkv[64:96])
    torch.testing.assert_close(attn.v_proj.weight, qkv[96:])
    gate_up = hf.model.layers[1].mlp.gate_up_proj.weight
    torch.testing.assert_close(ours.blocks[1].ffn.gate_proj.weight, gate_up[:96])
    torch.testing.assert_close(ours.blocks[1].ffn.up_proj.weight, gate_up[96:])


def test_dtype_choices(tmp_path):
    path, hf = save_phi3(tmp_path)
    bf16 = TransformerLM.from_hf(path, dtype="bfloat16")
    assert bf16.embed.weight.dtype == torch.bfloat16 and bf16.position.inv_freq.dtype == torch.float32
    assert TransformerLM.from_hf(path, dtype="auto").embed.weight.dtype == torch.float32  # as stored
    with pytest.raises(ValueError, match="dtype='fp8'"):
        TransformerLM.from_hf(path, dtype="fp8")


# -- save_hf ------------------------------------------------------------------------------------------------
PHI3_COMPATIBLE = {
    "mha": {},
    "gqa_window": {"attention": partial(Attention, n_kv_heads=2, window=8)},
    "longrope_tied": {"tie_embeddings": True,
                      "position": partial(RoPE, scaling=LongRoPEScaling(SHORT, LONG, 16))},
    "partial_rotary_geglu": {"position": partial(RoPE, partial_rotary_factor=0.5, theta=500.0),
                             "ffn": partial(GatedMLP, activation="gelu_tanh")},
}


@pytest.mark.parametrize("case", list(PHI3_COMPATIBLE))
def test_save_hf_round_trips(tmp_path, case):
    torch.manual_seed(0)
    model = TransformerLM(VOCAB, 64, 2, 4, 64, **PHI3_COMPATIBLE[case]).eval()
    model.save_hf(tmp_path)
    hf = Phi3ForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    activation = next(name for name, fn in ACTIVATIONS.items() if fn is model.blocks[0].ffn.act)
    assert HF_ACTIVATIONS[hf.config.hidden_act] == activation
    x = tokens(40)
    assert max_diff(model, hf, x) < 1e-4
    with torch.no_grad():
        torch.testing.assert_close(TransformerLM.from_hf(tmp_path)(x), model(x))
        torch.testing.assert_close(to_hf_model(model, attn_implementation="eager")(x).logits, hf(x).logits)


def test_save_hf_shards(tmp_path):
    model = TransformerLM(VOCAB, 64, 2, 4, 64).eval()
    model.save_hf(tmp_path, max_shard_bytes=40_000)
    assert len(json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]) == 3 + 2 * 6
    hf = Phi3ForCausalLM.from_pretrained(tmp_path).eval()
    assert max_diff(model, hf, tokens(16)) < 1e-4


@pytest.mark.parametrize("kwargs, message", [
    ({"norm": nn.LayerNorm}, "LayerNorm is not Phi-3 compatible"),
    ({"norm_position": "post"}, "norm_position='post'"),
    ({"ffn": partial(MLP, activation="relu")}, "feed-forward MLP"),
    ({"ffn": partial(MLP, activation="gelu")}, "feed-forward MLP"),
    ({"position": LearnedPosition}, "position LearnedPosition"),
    ({"position": partial(RoPE, scaling=LinearScaling(2.0))}, "RoPE scaling LinearScaling"),
    ({"attention_schedule": [Causal(), StridedSparse(4)]}, "attention schedule"),
    ({"attention": partial(Attention, bias=True)}, "bias=True"),
])
def test_save_hf_names_the_incompatible_choice(tmp_path, kwargs, message):
    model = TransformerLM(VOCAB, 32, 2, 4, 64, **kwargs)
    with pytest.raises(ValueError, match=message):
        model.save_hf(tmp_path)
    assert not (tmp_path / "config.json").exists()


# -- another attention layout -------------------------------------------------------------------------------
def test_mean_pooling_matches_the_grouped_mean(tmp_path):
    path, hf = save_phi3(tmp_path)  # 4 KV heads of 16
    pooled = TransformerLM.from_hf(path, n_kv_heads=2)
    assert pooled.n_kv_heads == 2 and pooled.blocks[1].attn.k_proj.weight.shape == (32, 64)
    qkv = hf.model.layers[1].self_attn.qkv_proj.weight.detach()
    k, v = qkv[64:128], qkv[128:]
    for ours, theirs in ((pooled.blocks[1].attn.k_proj.weight, k), (pooled.blocks[1].attn.v_proj.weight, v)):
        for head in range(2):  # new head h = mean of old heads 2h and 2h+1 (consecutive, as repeat_interleave)
            expected = (theirs[32 * head:32 * head + 16] + theirs[32 * head + 16:32 * head + 32]) / 2
            torch.testing.assert_close(ours[16 * head:16 * head + 16], expected)
    mqa = TransformerLM.from_hf(path, n_kv_heads=1)
    torch.testing.assert_close(mqa.blocks[0].attn.k_proj.weight,
                               hf.model.layers[0].self_attn.qkv_proj.weight[64:128].detach().view(4, 16, 64).mean(0))
    x = tokens(24)
    with torch.no_grad():
        for model in (pooled, mqa):
            assert torch.isfinite(model(x)).all()
        assert not torch.allclose(pooled(x), hf(x).logits, atol=1e-3)  # a different model now


def test_pooling_heads_that_are_already_equal_changes_nothing(tmp_path):
    """Independent check: when the heads of each group are identical, GQA with the pooled heads is the same
    function as the MHA checkpoint."""
    torch.manual_seed(0)
    hf = Phi3ForCausalLM(phi3_config()).eval()
    with torch.no_grad():
        for layer in hf.model.layers:
            w = layer.self_attn.qkv_proj.weight
            for start in (64, 128):  # K then V: copy head 0 -> 1 and head 2 -> 3
                w[start + 16:start + 32] = w[start:start + 16]
                w[start + 48:start + 64] = w[start + 32:start + 48]
    hf.save_pretrained(tmp_path)
    assert max_diff(TransformerLM.from_hf(tmp_path, n_kv_heads=2), hf, tokens(24)) < 1e-4


def test_pooling_refuses_more_or_uneven_heads(tmp_path):
    path, _ = save_phi3(tmp_path, num_key_value_heads=2)
    for n in (4, 3):
        with pytest.raises(ValueError, match=f"n_kv_heads={n}"):
            TransformerLM.from_hf(path, n_kv_heads=n)
    model = TransformerLM(VOCAB, 32, 1, 4, 16)
    mean_pool_kv_heads(model, 2)
    assert model(tokens(8)).shape == (2, 8, VOCAB)


def test_window_and_schedule_the_checkpoint_was_not_trained_with(tmp_path):
    path, _ = save_phi3(tmp_path / "full")
    ref_dir, hf_windowed = save_phi3(tmp_path / "windowed", sliding_window=6)  # same seed: same weights
    windowed = TransformerLM.from_hf(path, window=6)
    assert max_diff(windowed, hf_windowed, tokens(30)) < 1e-4
    mixed = TransformerLM.from_hf(path, attention_schedule=[Causal(), StridedSparse(4)])
    assert [type(b.attn.pattern).__name__ for b in mixed.blocks] == ["Causal", "StridedSparse"]
    assert torch.isfinite(mixed(tokens(30))).all()


# -- Hydra: model=phi3 model.checkpoint=... -----------------------------------------------------------------
def test_config_overrides_follow_the_documented_rule(tmp_path):
    path, hf = save_phi3(tmp_path, num_key_value_heads=2, sliding_window=16)
    base = ["model=phi3", f"model.checkpoint={path}", "tokenizer.vocab_size=97", "data.seq_len=32"]
    model = build_model(compose(base).model)  # sizes from the checkpoint, not the preset's 128-wide model
    assert (model.d_model, model.n_kv_heads, model.vocab_size, model.max_seq_len) == (64, 2, VOCAB, 128)
    assert model.blocks[0].attn.pattern == SlidingWindow(16)
    assert max_diff(model, hf, tokens(40)) < 1e-4
    assert build_model(compose(base + ["model/attention=mqa"]).model).n_kv_heads == 1
    assert build_model(compose(base + ["model.attention.n_kv_heads=1"]).model).n_kv_heads == 1
    assert build_model(compose(base + ["model.attention.window=4"]).model).blocks[1].attn.pattern == SlidingWindow(4)
    assert build_model(compose(base + ["model.attention.kernel=eager"]).model).blocks[0].attn.kernel == "eager"
    assert build_model(compose(base + ["model.dtype=bfloat16"]).model).lm_head.weight.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="n_kv_heads=8"):
        build_model(compose(base + ["model.n_heads=16", "model.attention.n_kv_heads=8"]).model)


def test_any_explicit_n_kv_heads_pools_even_when_it_equals_the_presets_n_heads(tmp_path):
    path, _ = save_phi3(tmp_path, num_attention_heads=8)  # MHA: 8 key/value heads; the preset has n_heads=4
    base = ["model=phi3", f"model.checkpoint={path}", "tokenizer.vocab_size=97", "data.seq_len=32"]
    assert build_model(compose(base).model).n_kv_heads == 8  # the MHA default: the checkpoint's own
    assert build_model(compose(base + ["model/attention=mha"]).model).n_kv_heads == 8
    assert build_model(compose(base + ["model.attention.n_kv_heads=4"]).model).n_kv_heads == 4


def test_random_init_from_the_same_preset():
    cfg = compose(["model=phi3", "tokenizer.vocab_size=97", "data.seq_len=32", "model/attention=gqa"])
    model = build_model(cfg.model)
    assert model.d_model == 128 and model.n_kv_heads == 2  # the group choice survives the preset


# -- errors ---------------------------------------------------------------------------------------------------
def _edit_weights(path, edit):
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_missing_and_unexpected_tensors_are_listed(tmp_path):
    path, _ = save_phi3(tmp_path)
    _edit_weights(path, lambda t: (t.pop("model.layers.1.mlp.down_proj.weight"),
                                   t.__setitem__("model.layers.0.self_attn.q_norm.weight", torch.ones(4))))
    with pytest.raises(ValueError) as err:
        TransformerLM.from_hf(path)
    assert "missing tensors: model.layers.1.mlp.down_proj.weight" in str(err.value)
    assert "unexpected tensors: model.layers.0.self_attn.q_norm.weight" in str(err.value)


def test_wrong_shape_names_the_tensor_and_both_shapes(tmp_path):
    path, _ = save_phi3(tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "num_key_value_heads": 2}))
    message = ("model.layers.0.self_attn.qkv_proj.weight: (192, 64) in the checkpoint, the model needs (128, 64) = "
               "q_proj 64 + k_proj 32 + v_proj 32 rows")
    with pytest.raises(ValueError, match=re.escape(message)):
        TransformerLM.from_hf(path)


def test_non_phi3_checkpoints_are_refused(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM
    LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=4, pad_token_id=None)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="'llama' checkpoint \\(LlamaForCausalLM\\), not Phi-3"):
        TransformerLM.from_hf(tmp_path)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        TransformerLM.from_hf(tmp_path / "..")


def test_hub_ids_fail_clearly_offline(monkeypatch):
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(RuntimeError, match="cannot fetch 'nobody/no-such-phi3' from the Hugging Face Hub.*local"):
        TransformerLM.from_hf("nobody/no-such-phi3")
    with pytest.raises(FileNotFoundError, match="not a directory"):
        TransformerLM.from_hf("./no/such/dir")


@pytest.mark.parametrize("preset, config", [
    ("phi3_mini_shape", {}),  # Phi3Config's defaults are Phi-3-mini-4k
    ("phi3_medium_shape", dict(hidden_size=5120, num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=10,
                               intermediate_size=17920)),
])
def test_shape_presets_are_the_real_shapes(preset, config):
    """On the meta device: no memory. Every Phi-3 tensor maps onto the preset with the right shape."""
    from variants.hf import phi3_to_ours
    with torch.device("meta"):
        ours = build_model(compose([f"model={preset}"]).model, device="meta")
        theirs = Phi3ForCausalLM(Phi3Config(**config))
    assert ours.num_params() == theirs.num_parameters()
    shapes = {k: v.shape for k, v in ours.state_dict().items()}
    assert phi3_to_ours(theirs.state_dict(), shapes, ours.n_layers, ours.tie_embeddings).keys() == shapes.keys()
