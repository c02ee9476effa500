"""TransformerLM as a whole: positions, document isolation, parameter counts."""
import math

import pytest
import torch
from torch import nn

from conftest import tiny_model
from variants import (MLP, ALiBi, GatedMLP, LearnedPosition, LinearScaling, RoPE, SinusoidalPosition, apply_rotary,
                      gated_hidden_dim, positions_from_documents)

POSITIONS = {
    "rope": RoPE,
    "learned": LearnedPosition,
    "sinusoidal": SinusoidalPosition,
    "alibi": ALiBi,
}


def test_positions_restart_at_each_document():
    docs = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2], [5, 5, 5, 5, 5, 5, 7, 7, 7]])
    expected = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 0, 1, 2]])
    assert torch.equal(positions_from_documents(docs), expected)
    # continuing from a cache whose last token was document 2 at position 3
    cont = positions_from_documents(torch.tensor([[2, 2, 3]]), torch.tensor([2]), torch.tensor([3]))
    assert cont.tolist() == [[4, 5, 0]]


@pytest.mark.parametrize("position", list(POSITIONS))
@pytest.mark.parametrize("kernel", ["eager", "sdpa", "flex"])
def test_packed_documents_match_running_each_alone(position, kernel):
    model = tiny_model(kernel=kernel, position=POSITIONS[position], n_kv_heads=2)
    lengths = [7, 12, 5]
    docs = [torch.randint(0, 61, (1, n)) for n in lengths]
    packed = torch.cat(docs, dim=1)
    doc_ids = torch.cat([torch.full((1, n), i) for i, n in enumerate(lengths)], dim=1)
    with torch.no_grad():
        together = model(packed, document_ids=doc_ids)
        alone = torch.cat([model(d) for d in docs], dim=1)
        torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
        # changing the middle document leaves the other two untouched
        changed = packed.clone()
        changed[0, 7:19] = torch.randint(0, 61, (12,))
        out = model(changed, document_ids=doc_ids)
        torch.testing.assert_close(out[:, :7], together[:, :7], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out[:, 19:], together[:, 19:], atol=1e-5, rtol=1e-5)


def _rotated_scores(rope, q, k, pos_q, pos_k):
    _, (cq, sq) = rope(q, pos_q)
    _, (ck, sk) = rope(k, pos_k)
    return (apply_rotary(q, cq, sq) * apply_rotary(k, ck, sk)).sum(-1)


@pytest.mark.parametrize("kwargs", [{}, {"partial_rotary_factor": 0.5}, {"scaling": LinearScaling(4.0)},
                                    {"theta": 500000.0}])
def test_rope_scores_depend_only_on_relative_offset(kwargs):
    rope = RoPE(d_model=64, head_dim=16, max_seq_len=4096, **kwargs)
    q, k = torch.randn(1, 1, 10, 16), torch.randn(1, 1, 10, 16)
    pos_q = torch.arange(10, 20)[None]
    pos_k = torch.arange(0, 10)[None]
    base = _rotated_scores(rope, q, k, pos_q, pos_k)
    for shift in (1, 37, 1000):
        torch.testing.assert_close(_rotated_scores(rope, q, k, pos_q + shift, pos_k + shift), base,
                                   atol=1e-4, rtol=1e-4)
    # and they do depend on the offset
    assert not torch.allclose(_rotated_scores(rope, q, k, pos_q + 1, pos_k), base, atol=1e-3)


def test_rope_rotation_matches_complex_multiplication():
    """Reference: RoPE as complex multiplication of (x_i, x_{i+d/2}) pairs by e^{i m theta_i}."""
    d, theta = 8, 10000.0
    rope = RoPE(d_model=8, head_dim=d, max_seq_len=64, theta=theta)
    x = torch.randn(1, 1, 5, d)
    pos = torch.tensor([[0, 3, 7, 11, 40]])
    _, (cos, sin) = rope(x, pos)
    ours = apply_rotary(x, cos, sin)
    freqs = theta ** (-torch.arange(0, d, 2).double() / d)
    z = torch.complex(x[..., : d // 2].double(), x[..., d // 2:].double())
    z = z * torch.polar(torch.ones_like(freqs), pos[0, :, None].double() * freqs)
    ref = torch.cat([z.real, z.imag], dim=-1).float()
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_sinusoidal_table_matches_the_paper():
    pe = SinusoidalPosition(d_model=16, head_dim=4, max_seq_len=50)
    pos, i = 17, 3
    assert math.isclose(pe.table[pos, 2 * i].item(), math.sin(pos / 10000 ** (2 * i / 16)), abs_tol=1e-6)
    assert math.isclose(pe.table[pos, 2 * i + 1].item(), math.cos(pos / 10000 ** (2 * i / 16)), abs_tol=1e-6)


def test_gated_mlp_default_keeps_the_mlp_parameter_count():
    for d in (64, 96, 128, 512):
        mlp = sum(p.numel() for p in MLP(d).parameters())
        glu = sum(p.numel() for p in GatedMLP(d).parameters())
        assert 0 <= glu - mlp < 3 * d * 32  # differs only by rounding the hidden size up to a multiple of 32
    assert gated_hidden_dim(128) == 352
    assert GatedMLP(64, hidden_dim=100).gate_proj.out_features == 100  # explicit size wins


def test_post_norm_block_normalises_the_residual_stream():
    model = tiny_model(norm_position="post", norm=nn.LayerNorm)
    x = model.embed(torch.randint(0, 61, (1, 8)))
    out = model.blocks[0](x)
    torch.testing.assert_close(out.mean(-1), torch.zeros(1, 8), atol=1e-5, rtol=0)
    assert isinstance(model.norm, nn.Identity)  # no final norm after post-norm blocks


def test_backward_reaches_every_parameter():
    model = tiny_model(n_kv_heads=2).train()
    x = torch.randint(0, 61, (2, 16))
    model.loss(x, x.roll(-1, 1)).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_tied_embeddings_share_one_tensor():
    model = tiny_model(tie_embeddings=True)
    assert model.lm_head.weight is model.embed.weight
    untied = tiny_model(tie_embeddings=False)
    assert untied.num_params() - model.num_params() == 61 * 32


def test_rope_frequencies_stay_float32_when_the_model_is_cast():
    model = tiny_model().to(torch.bfloat16)
    assert model.position.inv_freq.dtype == torch.float32
    torch.testing.assert_close(model.position.inv_freq, RoPE(32, 8, 64).inv_freq)
    assert model.embed.weight.dtype == torch.bfloat16
