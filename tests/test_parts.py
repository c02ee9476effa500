"""Norms, blocks and feed-forward parts beyond the classic ones, each against its paper's definition."""
import math
from functools import partial

import pytest
import torch
from torch import nn

from conftest import tiny_model
from variants import MLP, DyT, GatedMLP, MoE


def test_dyt_is_weight_tanh_alpha_x_plus_bias():
    torch.manual_seed(0)
    dyt = DyT(16, alpha_init=0.5)
    assert dyt.alpha.item() == 0.5 and bool((dyt.weight == 1).all()) and bool((dyt.bias == 0).all())
    with torch.no_grad():
        dyt.alpha.fill_(0.7)
        dyt.weight.normal_()
        dyt.bias.normal_()
    x = torch.randn(3, 5, 16) * 4
    z = (0.7 * x).double()
    tanh = (torch.exp(2 * z) - 1) / (torch.exp(2 * z) + 1)  # tanh written out
    expected = dyt.weight.double() * tanh + dyt.bias.double()
    torch.testing.assert_close(dyt(x).double(), expected, atol=1e-6, rtol=1e-6)


def test_dyt_model_trains_every_parameter():
    model = tiny_model(norm=DyT).train()
    x = torch.randint(0, 61, (2, 16))
    model.loss(x, x.roll(-1, 1)).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_olmo2_block_normalises_each_sublayer_output_inside_the_residual():
    """x1 = x + norm(attn(x)), out = x1 + norm(ffn(x1)): with RMSNorm (weight 1) each branch adds a unit-RMS
    vector to the residual stream, which itself is never normalised; a final norm precedes the head."""
    model = tiny_model(norm_position="olmo2", init_std=0.5)  # sublayer outputs well above the norm eps
    block = model.blocks[0]
    seen = {}
    block.ffn.register_forward_pre_hook(lambda module, args: seen.update(x1=args[0]))
    x = model.embed(torch.randint(0, 61, (2, 9))) * 10
    with torch.no_grad():
        out = block(x)
    rms = lambda t: t.pow(2).mean(-1).sqrt()
    torch.testing.assert_close(rms(seen["x1"] - x), torch.ones(2, 9), atol=1e-3, rtol=0)
    torch.testing.assert_close(rms(out - seen["x1"]), torch.ones(2, 9), atol=1e-3, rtol=0)
    assert rms(out).mean() > 5  # the stream keeps its scale
    assert isinstance(model.norm, nn.RMSNorm)


def test_relu2_mlp_squares_the_relu():
    torch.manual_seed(0)
    mlp = MLP(8, activation="relu2")
    x = torch.randn(4, 8)
    h = x @ mlp.up_proj.weight.T
    expected = (h.clamp(min=0) * h.clamp(min=0)) @ mlp.down_proj.weight.T
    torch.testing.assert_close(mlp(x), expected)


def test_unknown_norm_position_names_the_key():
    with pytest.raises(ValueError, match="model.norm_position"):
        tiny_model(norm_position="sandwich")


def _naive_moe(moe, x, capacity=None):
    """Token by token: softmax the router, take the k largest, renormalise, add those experts' outputs; with a
    capacity, an expert serves only the first `capacity` tokens (in order) routed to it."""
    out, served = torch.zeros_like(x), [0] * moe.n_experts
    for n in range(x.shape[0]):
        probs = (moe.router.weight @ x[n]).softmax(0)
        top = sorted(range(moe.n_experts), key=lambda e: -probs[e].item())[:moe.top_k]
        total = sum(probs[e] for e in top)
        for e in top:
            served[e] += 1
            if capacity is None or served[e] <= capacity:
                out[n] += probs[e] / total * moe.experts[e](x[n:n + 1])[0]
    return out, served


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_moe_sends_each_token_to_exactly_k_experts(top_k):
    torch.manual_seed(0)
    moe = MoE(16, n_experts=4, top_k=top_k, hidden_dim=24)
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        out = moe(x)
        expected, served = _naive_moe(moe, x.view(10, 16))
    torch.testing.assert_close(out.view(10, 16), expected, atol=1e-5, rtol=1e-5)
    assert moe.last_expert_counts.tolist() == served and sum(served) == 10 * top_k
    assert moe.last_dropped == 0


def test_moe_with_one_expert_equals_the_dense_swiglu():
    torch.manual_seed(0)
    dense, moe = GatedMLP(16, 40), MoE(16, n_experts=1, top_k=1, hidden_dim=40)
    moe.experts[0].load_state_dict(dense.state_dict())
    x = torch.randn(3, 7, 16)
    torch.testing.assert_close(moe(x), dense(x))


def test_moe_capacity_drops_and_counts_overflowing_tokens():
    torch.manual_seed(0)
    moe = MoE(16, n_experts=4, top_k=2, hidden_dim=24, capacity_factor=0.5)
    x = torch.randn(1, 12, 16)
    capacity = math.ceil(0.5 * 12 * 2 / 4)
    with torch.no_grad():
        out = moe(x)
        expected, served = _naive_moe(moe, x[0], capacity)
    assert moe.last_dropped == sum(max(0, s - capacity) for s in served) > 0
    torch.testing.assert_close(out[0], expected, atol=1e-5, rtol=1e-5)


def test_moe_shared_expert_is_added_for_every_token():
    torch.manual_seed(0)
    moe = MoE(16, n_experts=4, top_k=1, hidden_dim=24, shared_expert=True)
    x = torch.randn(1, 6, 16)
    with torch.no_grad():
        routed, _ = _naive_moe(moe, x[0])
        torch.testing.assert_close(moe(x)[0], routed + moe.shared(x[0]), atol=1e-5, rtol=1e-5)


def test_moe_balance_loss_is_one_times_coef_for_a_uniform_router():
    """Switch eq. 4: n_experts * sum_e f_e P_e = 1 when every P_e = 1/n, whatever the assignments."""
    moe = MoE(16, n_experts=4, top_k=2, hidden_dim=24, aux_loss_coef=0.01)
    nn.init.zeros_(moe.router.weight)
    moe(torch.randn(2, 5, 16))
    assert moe.last_aux_loss.item() == pytest.approx(0.01)
    nn.init.normal_(moe.router.weight, std=3.0)  # a skewed router costs more
    moe(torch.randn(2, 5, 16))
    assert moe.last_aux_loss.item() > 0.01


def test_moe_active_parameters_and_flops():
    dense = tiny_model(ffn=partial(GatedMLP, hidden_dim=64))
    moe = tiny_model(ffn=partial(MoE, n_experts=4, top_k=1, hidden_dim=64))
    expert = 3 * 32 * 64
    router = 32 * 4
    assert moe.num_params() == dense.num_params() + dense.n_layers * (3 * expert + router)
    assert moe.num_params(active=True) == dense.num_params() + dense.n_layers * router
    assert moe.flops_per_token(16) - dense.flops_per_token(16) == 6 * dense.n_layers * router
    # the default expert size splits the dense SwiGLU over the k active experts: equal active parameters
    d = 96  # dense hidden 256
    dense_ffn = sum(p.numel() for p in GatedMLP(d).parameters())
    routed = MoE(d, n_experts=8, top_k=2)
    assert sum(p.numel() for p in routed.parameters()) - routed.inactive_params() == dense_ffn + d * 8


def test_moe_model_reports_and_trains_the_balance_loss():
    model = tiny_model(ffn=partial(MoE, n_experts=4, top_k=2)).train()
    x = torch.randint(0, 61, (2, 16))
    model.loss(x, x.roll(-1, 1))
    aux = model.aux_loss()
    assert aux is not None and aux.requires_grad
    aux.backward()
    assert all(block.ffn.router.weight.grad.abs().sum() > 0 for block in model.blocks)
    assert tiny_model().aux_loss() is None
