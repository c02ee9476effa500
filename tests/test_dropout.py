"""GPT-2's three dropouts (model.dropout): embedding, attention probabilities, residual; off in evaluation."""
import math
from functools import partial

import pytest
import torch
from torch import nn

from conftest import compose, tiny_model
from runner.build import build_model
from variants import Attention, Causal, LearnedPosition, TransformerLM
from variants.attention import KERNELS, choose_kernel
from variants.mla import MultiHeadLatentAttention as MLA
from variants.masks import AttentionContext

P = 0.3


@pytest.mark.parametrize("norm_position", ["pre", "post", "olmo2"])
@pytest.mark.parametrize("kernel", ["eager", "sdpa", "auto"])
def test_dropout_is_off_in_eval(norm_position, kernel):
    plain = tiny_model(kernel=kernel, norm_position=norm_position, position=LearnedPosition)
    dropped = tiny_model(kernel=kernel, norm_position=norm_position, position=LearnedPosition, dropout=P)
    dropped.load_state_dict(plain.state_dict())
    ids = torch.randint(0, 61, (2, 20))
    docs = torch.tensor([[0] * 8 + [1] * 12, [0] * 20])
    with torch.no_grad():
        assert torch.equal(dropped.eval()(ids), plain.eval()(ids))
        assert torch.equal(dropped(ids, document_ids=docs), plain(ids, document_ids=docs))
        assert not torch.equal(dropped.train()(ids), plain.train()(ids))  # and on in training


def _zero_fraction_and_scale(kept_or_zero, reference):
    """Fraction of zeroed elements, and the kept elements' ratio to the undropped reference."""
    zero = kept_or_zero == 0
    ratio = kept_or_zero[~zero] / reference[~zero]
    return zero.float().mean().item(), ratio


def test_residual_dropout_zeroes_a_fraction_p_of_each_sublayer_output():
    model = tiny_model(d_model=64, dropout=P).train()
    block = model.blocks[0]
    seen = {}
    block.register_forward_pre_hook(lambda m, args: seen.__setitem__("x", args[0].detach()))
    block.attn.register_forward_hook(lambda m, args, out: seen.__setitem__("attn", out.detach()))
    block.ffn_norm.register_forward_pre_hook(lambda m, args: seen.__setitem__("mid", args[0].detach()))
    model(torch.randint(0, 61, (8, 64)))
    added = seen["mid"] - seen["x"]  # what the attention branch added to the residual stream
    fraction, ratio = _zero_fraction_and_scale(added, seen["attn"])
    n = added.numel()
    assert abs(fraction - P) < 5 * math.sqrt(P * (1 - P) / n)
    torch.testing.assert_close(ratio, torch.full_like(ratio, 1 / (1 - P)), rtol=1e-3, atol=1e-3)


def test_embedding_dropout_zeroes_a_fraction_p_of_the_embeddings():
    model = tiny_model(d_model=64, dropout=P, position=LearnedPosition).train()
    ids = torch.randint(0, 61, (8, 64))
    seen = {}
    model.blocks[0].register_forward_pre_hook(lambda m, args: seen.__setitem__("x", args[0].detach()))
    model(ids)
    embedded = model.embed.weight[ids] + model.position.embedding.weight[torch.arange(64)]
    fraction, ratio = _zero_fraction_and_scale(seen["x"], embedded.detach())
    assert abs(fraction - P) < 5 * math.sqrt(P * (1 - P) / ids.numel() / 64)
    torch.testing.assert_close(ratio, torch.full_like(ratio, 1 / (1 - P)), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("kernel", ["eager", "sdpa"])
@pytest.mark.parametrize("documents", [False, True])
@pytest.mark.parametrize("n_kv_heads", [4, 2])
def test_attention_dropout_drops_a_fraction_p_of_the_probabilities(kernel, documents, n_kv_heads):
    """With V the identity (one one-hot value per key), the output is the dropped probability matrix itself,
    which is compared with a naive softmax(QK^T / sqrt(d)) under the same mask."""
    B, H, T = 4, 4, 48
    q, k = torch.randn(B, H, T, T), torch.randn(B, n_kv_heads, T, T)
    v = torch.eye(T).expand(B, n_kv_heads, T, T)
    doc = torch.tensor([0] * 20 + [1] * 28).expand(B, T) if documents else None
    ctx = AttentionContext(T, T, 0, doc, doc)
    out = KERNELS[kernel](q, k, v, Causal(), ctx, 1 / math.sqrt(T), (), dropout_p=P)
    kk = k.repeat_interleave(H // n_kv_heads, dim=1)
    mask = torch.ones(T, T).tril().bool()
    if documents:
        mask = mask & (doc[0][:, None] == doc[0][None, :])
    probs = (q @ kk.transpose(-2, -1) / math.sqrt(T)).masked_fill(~mask, float("-inf")).softmax(-1)
    allowed = mask.expand(B, H, T, T)
    fraction, ratio = _zero_fraction_and_scale(out[allowed], probs[allowed])
    n = allowed.sum().item()
    assert abs(fraction - P) < 5 * math.sqrt(P * (1 - P) / n)
    torch.testing.assert_close(ratio, torch.full_like(ratio, 1 / (1 - P)), rtol=1e-3, atol=1e-3)
    assert (out[~allowed] == 0).all()  # masked keys stay unseen


def test_flex_refuses_attention_dropout_and_auto_takes_sdpa():
    with pytest.raises(ValueError, match="kernel=sdpa"):
        Attention(32, 4, kernel="flex", dropout=0.1)
    with pytest.raises(ValueError, match="model.dropout"):
        Attention(32, 4, dropout=1.0)
    q = torch.randn(1, 4, 300, 8, device="meta")
    ctx = AttentionContext(300, 300, 0, torch.zeros(1, 300), torch.zeros(1, 300), device="meta")
    assert KERNELS["auto"].choose(q, Causal(), ctx, dropout_p=0.1) == "sdpa"
    assert choose_kernel("cuda", Causal(), 300, 300, True) == "flex"  # what dropout overrides


def test_a_users_attention_without_dropout_builds_at_zero_and_is_named_above():
    class Mine(Attention):
        def __init__(self, d_model, n_heads, head_dim=None):
            super().__init__(d_model, n_heads, head_dim=head_dim, kernel="sdpa")

    TransformerLM(61, 32, 1, 4, 16, attention=Mine)
    with pytest.raises(ValueError, match=r"model.dropout=0.1: the attention factory .* takes no `dropout`"):
        TransformerLM(61, 32, 1, 4, 16, attention=Mine, dropout=0.1)
    mla = TransformerLM(61, 32, 1, 4, 16, attention=partial(MLA, kernel="sdpa"), dropout=0.1)
    assert mla.blocks[0].attn.dropout == 0.1


def test_config_key_reaches_every_part():
    assert compose(["model=gpt2"]).model.dropout == 0.0
    model = build_model(compose(["model=gpt2", "model.dropout=0.2"]).model)
    assert model.dropout == 0.2
    assert all(b.dropout == 0.2 and b.attn.dropout == 0.2 for b in model.blocks)
    assert not any(isinstance(m, nn.Dropout) for m in model.modules())  # plain F.dropout, no extra modules
