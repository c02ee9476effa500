"""Fused projections (variants/fusion.py): one GEMM for q/k/v and for gate/up in eval mode, the same result as
the separate Linears, the same parameters and memory, and no stale weights after training steps or moves."""
import copy

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import tiny_model
from variants import Attention, GatedMLP

MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
           torch.ops.aten.baddbmm.default}


class CountMatmuls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func in MATMULS
        return func(*args, **(kwargs or {}))


def matmuls(fn) -> int:
    with CountMatmuls() as counter:
        fn()
    return counter.count


def storage_bytes(module: nn.Module) -> int:
    """Bytes of the distinct storages behind the module's parameters and buffers."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in list(module.parameters()) + list(module.buffers())}
    return sum(storages.values())


@pytest.mark.parametrize("n_kv_heads, bias, qk_norm", [(4, False, False), (2, True, False), (1, False, True)])
def test_fused_attention_is_one_gemm_with_the_same_output(n_kv_heads, bias, qk_norm):
    torch.manual_seed(0)
    attn = Attention(32, 4, n_kv_heads=n_kv_heads, bias=bias, qk_norm=qk_norm, kernel="eager").double().eval()
    reference = copy.deepcopy(attn)
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    params, keys = [id(p) for p in attn.parameters()], list(attn.state_dict())
    before = storage_bytes(attn)
    assert attn.fuse_projections() == 1
    torch.testing.assert_close(attn(x), reference(x), rtol=0, atol=1e-12)
    # q, k, v, o: four GEMMs separately (eager attention's two bmm besides); q/k/v fused: two
    assert matmuls(lambda: reference(x)) - matmuls(lambda: attn(x)) == 2
    assert [id(p) for p in attn.parameters()] == params and list(attn.state_dict()) == keys
    assert storage_bytes(attn) == before  # the Linears' weights are slices of the fused buffer: no copy
    for name, tensor in reference.state_dict().items():
        torch.testing.assert_close(attn.state_dict()[name], tensor, rtol=0, atol=0)


def test_fused_gated_mlp_is_one_gemm_with_the_same_output():
    torch.manual_seed(0)
    ffn = GatedMLP(32, 64).double().eval()
    reference = copy.deepcopy(ffn)
    x = torch.randn(3, 32, dtype=torch.float64)
    assert ffn.fuse_projections() == 1
    torch.testing.assert_close(ffn(x), reference(x), rtol=0, atol=1e-12)
    assert matmuls(lambda: reference(x)) == 3 and matmuls(lambda: ffn(x)) == 2


def test_training_a_fused_model_updates_what_the_fused_gemm_reads():
    """Training mode runs the separate Linears (same gradients); the optimizer's in-place updates land in the
    fused buffer, so the next eval forward is not stale."""
    model, reference = tiny_model(n_kv_heads=2).double(), tiny_model(n_kv_heads=2).double()
    model.fuse_projections()
    ids = torch.randint(0, 61, (2, 9))
    for m in (model, reference):
        m.train()
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
        for _ in range(2):
            m(ids).logsumexp(-1).mean().backward()
            opt.step()
            opt.zero_grad()
        m.eval()
    torch.testing.assert_close(model(ids), reference(ids), rtol=0, atol=1e-10)


def test_moving_a_fused_model_fuses_again_and_replaced_weights_fall_back():
    model = tiny_model(n_kv_heads=2)
    reference = copy.deepcopy(model).double()
    model.fuse_projections()
    model.double()  # .to(dtype): the weights and the buffer would be converted apart
    attn = model.blocks[0].attn
    assert attn.fused_qkv_weight.dtype == torch.float64
    assert attn.q_proj.weight.data_ptr() == attn.fused_qkv_weight.data_ptr()
    ids = torch.randint(0, 61, (2, 7))
    torch.testing.assert_close(model(ids), reference(ids), rtol=0, atol=1e-12)
    # weights replaced behind its back (load_state_dict(assign=True)): the separate Linears, the new weights
    torch.manual_seed(1)
    fresh = tiny_model(n_kv_heads=2, seed=1).double()
    model.load_state_dict(fresh.state_dict(), assign=True)
    torch.testing.assert_close(model(ids), fresh(ids), rtol=0, atol=1e-12)


@pytest.mark.slow
def test_compiled_decoding_of_a_fused_model_matches_eager_unfused():
    from test_decode import assert_same_decoding, eager_greedy, fixed_shape_greedy, left_padded
    model = tiny_model(n_kv_heads=2)
    fused = copy.deepcopy(model)
    assert fused.fuse_projections() == 2 * len(model.blocks)
    ids, docs = left_padded([[3, 1, 4, 1, 5, 9, 2, 6], [5, 3, 5]])
    with torch.no_grad():
        ours = fixed_shape_greedy(fused, ids, docs, 6, compile=True)
        reference = eager_greedy(model, ids, docs, 6)
    assert_same_decoding(ours, reference)


def test_a_users_own_part_takes_part_in_fusion():
    calls = []

    class MyFFN(nn.Module):
        def __init__(self, d_model):
            super().__init__()
            self.proj = nn.Linear(d_model, d_model)

        def forward(self, x):
            return self.proj(x)

        def fuse_projections(self):
            calls.append(self)
            return 1

    model = tiny_model(ffn=MyFFN)
    assert model.fuse_projections() == 2 + 2  # its two attention modules' qkv, and its own parts
    assert len(calls) == 2


@pytest.mark.parametrize("bias", [False, True])
def test_training_runs_each_group_as_one_gemm_with_the_same_gradients(bias):
    """In training q/k/v run as one GEMM over the concatenated weights; the loss and every parameter's gradient
    equal those of the Linears run one by one (forced here by a hook, which also keeps them separate)."""
    model = tiny_model(n_kv_heads=2, attention_options={"bias": bias}).double().train()
    attn = model.blocks[0].attn
    x = torch.randn(2, 9, 32, dtype=torch.double)
    assert matmuls(lambda: attn(x)) == 2  # qkv and the output projection
    ids = torch.randint(0, 61, (2, 9))
    fused_loss = model(ids).logsumexp(-1).mean()
    fused = torch.autograd.grad(fused_loss, list(model.parameters()))
    seen = []
    for block in model.blocks:  # a hook on a Linear: the projections run one by one, the hook sees its call
        block.attn.q_proj.register_forward_hook(lambda m, args, out: seen.append(out.shape))
    assert matmuls(lambda: attn(x)) == 4
    separate_loss = model(ids).logsumexp(-1).mean()
    torch.testing.assert_close(fused_loss, separate_loss, rtol=0, atol=1e-12)
    for a, b in zip(fused, torch.autograd.grad(separate_loss, list(model.parameters()))):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert len(seen) == 1 + len(model.blocks)
