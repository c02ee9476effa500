"""Rules of the CUDA path that a CPU can check: one dtype reaching every attention kernel under bf16
autocast, FlexAttention compiled once outside any trace, SDPA with a mask and GQA kept off the math kernel,
mixture-of-experts compiled without graph breaks, and one compiled decode step per shape."""
from functools import partial

import pytest
import torch
import torch.nn.functional as F

import variants.attention as attention_module
from conftest import tiny_model
from runner.decode import Decoder
from variants import (KERNELS, ALiBi, LearnedPosition, LinearScaling, LongRoPEScaling, MoE, MultiHeadLatentAttention,
                      RoPE, SinusoidalPosition)
from variants.attention import FlexKernel, sdpa_masked
from variants.masks import AttentionContext, Causal

HEAD_DIM = 8  # tiny_model: d_model 32 over 4 heads
POSITIONS = {
    "rope": RoPE,
    "rope_linear": partial(RoPE, scaling=LinearScaling(2.0)),
    "rope_longrope": partial(RoPE, scaling=LongRoPEScaling([1.0] * 4, [2.0] * 4, 16)),
    "rope_partial": partial(RoPE, partial_rotary_factor=0.5),
    "learned": LearnedPosition,
    "sinusoidal": SinusoidalPosition,
    "alibi": ALiBi,
}
CASES = [(kernel, position, qk_norm, "attention") for kernel in ("eager", "sdpa", "flex")
         for position in POSITIONS for qk_norm in (False,)]
CASES += [(kernel, "rope", True, "attention") for kernel in ("eager", "sdpa", "flex")]  # QK-norm before RoPE
CASES += [(kernel, "rope", False, "mla") for kernel in ("eager", "sdpa", "flex")]  # MLA's decoupled rope head


def _spy_dtypes(monkeypatch):
    """Record the dtypes of (q, k, v) at each kernel's entry, where a mixed triple would crash."""
    seen = []

    def record(fn):
        def spy(q, k, v, *args, **kwargs):
            seen.append((q.dtype, k.dtype, v.dtype))
            return fn(q, k, v, *args, **kwargs)
        return spy

    monkeypatch.setattr(F, "scaled_dot_product_attention", record(F.scaled_dot_product_attention))
    monkeypatch.setattr(attention_module, "flex_attention", record(attention_module.flex_attention))
    monkeypatch.setitem(KERNELS, "eager", record(KERNELS["eager"]))
    return seen


@pytest.mark.parametrize("kernel,position,qk_norm,attention", CASES)
def test_every_kernel_receives_one_dtype_under_bf16_autocast(monkeypatch, kernel, position, qk_norm, attention):
    """flex_attention on torch <= 2.10 rejects mixed dtypes; RoPE's float32 tables (and QK-norm's float32
    weights) used to promote q and k to float32 while v stayed bf16."""
    if attention == "mla":
        model = tiny_model(kernel=kernel, attention_cls=MultiHeadLatentAttention,
                           attention_options=dict(kv_lora_rank=12, rope_head_dim=HEAD_DIM))
    else:
        model = tiny_model(kernel=kernel, position=POSITIONS[position], attention_options=dict(qk_norm=qk_norm))
    seen = _spy_dtypes(monkeypatch)
    ids = torch.randint(0, 61, (2, 20), generator=torch.Generator().manual_seed(0))
    docs = torch.tensor([[0] * 8 + [1] * 12, [0] * 20])  # packed rows: the document mask path
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(ids, document_ids=docs)
    assert seen, "no kernel ran"
    assert all(q == k == v == torch.bfloat16 for q, k, v in seen), seen
    assert torch.isfinite(logits).all()


def test_flex_kernel_is_compiled_once_outside_any_trace(monkeypatch):
    """Inside a traced region `torch.compile(fn)` returns fn itself: the kernel kept there would be the
    raw, unfused FlexAttention for every later eager call."""
    monkeypatch.setattr(FlexKernel, "_compiled", None)
    inside = []

    def traced(x):
        inside.append(FlexKernel.attention_fn("cuda"))
        return x * 2

    torch.compile(traced, backend="eager", fullgraph=True)(torch.ones(3))
    assert inside == [attention_module.flex_attention]  # the surrounding compile fuses the raw function
    assert FlexKernel._compiled is None  # nothing was kept from inside the trace
    outside = FlexKernel.attention_fn("cuda")
    assert outside is not attention_module.flex_attention and callable(outside)
    assert getattr(outside, "_torchdynamo_orig_callable", None) is attention_module.flex_attention
    assert FlexKernel.attention_fn("cuda") is outside  # made once
    assert FlexKernel.attention_fn("cpu") is attention_module.flex_attention  # eager elsewhere


def _naive_attention(q, k, v, mask, scale):
    """softmax(QK^T * scale + mask) V with K/V heads repeated for GQA, in float64."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1).double(), v.repeat_interleave(groups, 1).double()
    scores = q.double() @ k.transpose(-2, -1) * scale
    scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.double()
    return (scores.softmax(-1) @ v).float()


@pytest.mark.parametrize("mask_kind", ["bool", "bool_per_row", "bias_per_head"])
@pytest.mark.parametrize("n_kv_heads", [1, 2, 6])
def test_sdpa_with_a_mask_folds_query_groups_instead_of_enable_gqa(monkeypatch, mask_kind, n_kv_heads):
    """With a mask, `enable_gqa=True` leaves CUDA only SDPA's math kernel; the query heads of each key/value
    head are folded into the query axis instead. Same attention as the naive computation."""
    g = torch.Generator().manual_seed(0)
    B, H, T, S, d = 2, 6, 5, 9, 8
    q = torch.randn(B, H, T, d, generator=g)
    k, v = torch.randn(B, n_kv_heads, S, d, generator=g), torch.randn(B, n_kv_heads, S, d, generator=g)
    causal = torch.arange(T)[:, None] + (S - T) >= torch.arange(S)[None, :]
    if mask_kind == "bool":
        mask = causal[None, None]  # (1, 1, T, S)
    elif mask_kind == "bool_per_row":
        mask = causal[None, None] & (torch.rand(B, 1, T, S, generator=g) > 0.3)
        mask[..., 0] = True  # every query sees one key
    else:
        mask = torch.randn(1, H, T, S, generator=g).masked_fill(~causal, float("-inf"))
    calls = []
    original = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append(kwargs.get("enable_gqa", False))
        return original(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    out = sdpa_masked(q, k, v, mask, 0.3)
    assert calls == [False]
    torch.testing.assert_close(out, _naive_attention(q, k, v, mask, 0.3), atol=1e-5, rtol=1e-5)


def test_sdpa_kernel_passes_document_masks_without_enable_gqa(monkeypatch):
    calls = []
    original = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(k.get("enable_gqa", False) and "attn_mask" in k) or original(*a, **k))
    model = tiny_model(n_kv_heads=2)
    ids = torch.randint(0, 61, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(ids, document_ids=torch.tensor([[0] * 5 + [1] * 7, [0] * 12]))
    assert calls and not any(calls)


# -- mixture of experts, compiled ------------------------------------------------------------------------

def _moe_model(**ffn):
    return tiny_model(ffn=partial(MoE, n_experts=4, top_k=2, hidden_dim=16, **ffn), max_seq_len=64)


def _graph_breaks():
    from torch._dynamo.utils import counters
    return sum(counters["graph_break"].values())


@pytest.mark.parametrize("capacity_factor", [None, 0.75])
def test_moe_compiled_training_step_matches_eager_without_graph_breaks(capacity_factor):
    torch._dynamo.reset()
    eager, compiled = _moe_model(capacity_factor=capacity_factor), _moe_model(capacity_factor=capacity_factor)
    compiled.load_state_dict(eager.state_dict())
    eager.train(), compiled.train()
    ids = torch.randint(0, 61, (2, 16), generator=torch.Generator().manual_seed(0))

    def loss_of(model, forward):
        logits = forward(ids[:, :-1])
        aux = sum(m.last_aux_loss for m in model.modules() if isinstance(m, MoE))
        return F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()) + aux

    breaks = _graph_breaks()
    step = torch.compile(compiled, backend="aot_eager", fullgraph=True)  # fullgraph: a graph break raises
    loss_c, loss_e = loss_of(compiled, step), loss_of(eager, eager)
    loss_c.backward(), loss_e.backward()
    assert _graph_breaks() == breaks
    torch.testing.assert_close(loss_c, loss_e, atol=1e-5, rtol=1e-5)
    for (name, p_e), p_c in zip(eager.named_parameters(), compiled.parameters()):
        assert p_c.grad is not None, name
        torch.testing.assert_close(p_c.grad, p_e.grad, atol=1e-5, rtol=1e-4, msg=name)
    counts = [m.last_expert_counts for m in compiled.modules() if isinstance(m, MoE)]
    assert all(c.sum().item() == 2 * 15 * 2 for c in counts)  # every token went to top_k experts


def test_moe_expert_without_tokens_still_gets_a_gradient():
    """Under DDP a parameter without a gradient is an error (unused parameters): an expert no token chose
    still runs, on zero rows."""
    moe = MoE(16, n_experts=4, top_k=1, hidden_dim=8)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0] = 1.0  # every token with a positive sum picks expert 0
    x = torch.rand(1, 6, 16)
    moe(x).sum().backward()
    assert moe.last_expert_counts.tolist() == [6, 0, 0, 0]
    for expert in moe.experts[1:]:
        assert all(p.grad is not None and not p.grad.any() for p in expert.parameters())


@pytest.mark.slow
def test_moe_compiled_decode_step_matches_eager():
    """runner/decode.py compiles its step with fullgraph=True; MoE's routing used to raise there
    (GuardOnDataDependentSymNode)."""
    from test_decode import assert_same_decoding, eager_greedy, fixed_shape_greedy, left_padded
    model = _moe_model()
    ids, docs = left_padded([[3, 1, 4, 1, 5, 9, 2, 6], [5, 3, 5]])
    breaks = _graph_breaks()
    with torch.no_grad():
        ours = fixed_shape_greedy(model, ids, docs, 8, compile=True)
        reference = eager_greedy(model, ids, docs, 8)
    assert _graph_breaks() == breaks
    assert_same_decoding(ours, reference)


# -- one compiled step per shape ---------------------------------------------------------------------------

@pytest.mark.slow
def test_two_decoders_of_one_shape_compile_the_step_once():
    """Every bench point and every generate() makes a new Decoder: it must not recompile the step (torch 2.9
    guarded each static buffer's address), nor re-record its CUDA graph (the cache is reused). The second one
    runs under torch.inference_mode, as the transformers comparison does: inference tensors carry other
    dispatch keys, which the step's guards saw (one more compile of the whole model per caller's mode)."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    model = tiny_model(n_kv_heads=2)
    ids = torch.tensor([[3, 1, 4, 1, 5], [9, 2, 6, 5, 3]])
    tokens = []
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            decoder = Decoder(model, 2, 12, compile=True)
            token = decoder.prefill(ids.clone()).argmax(-1)
            for _ in range(3):
                token = decoder.step(token).argmax(-1)
            tokens.append(token)
        if len(tokens) == 1:
            graphs = counters["stats"]["unique_graphs"]
    assert graphs == 2  # the prefill and the step, each compiled once
    assert counters["stats"]["unique_graphs"] == graphs  # the second decoder compiled nothing
    assert torch.equal(tokens[0], tokens[1])
    assert decoder.cache.k._dynamo_static_input_type == "unguarded"
    assert not decoder.cache.k.is_inference() and not decoder.slot.is_inference()


def test_a_decoder_whose_shared_cache_was_taken_refuses_to_step():
    model = tiny_model()
    first, second = Decoder(model, 1, 8), Decoder(model, 1, 8)
    with torch.no_grad():
        token = first.prefill(torch.tensor([[1, 2, 3]])).argmax(-1)
        second.prefill(torch.tensor([[4, 5]]))
        with pytest.raises(RuntimeError, match="another Decoder"):
            first.step(token)
        second.step(token)  # the owner steps on


def test_one_token_with_a_cache_takes_plain_sdpa_in_eager_decoding(monkeypatch):
    """The model no longer invents document ids for a cached call when none were ever given, so a decoding
    step carries no document mask (kernel=auto on CUDA would have built a block mask per token)."""
    model = tiny_model(kernel="auto")
    cache = model.allocate_cache(1, 10)
    contexts = []
    original = attention_module.AutoKernel.choose
    monkeypatch.setattr(attention_module.AutoKernel, "choose",
                        staticmethod(lambda q, p, ctx, *rest: contexts.append(ctx) or original(q, p, ctx, *rest)))
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]), cache=cache)
        model(torch.tensor([[4]]), cache=cache)
    assert contexts[-1].q_doc is None and contexts[-1].q_len == 1
    assert attention_module.choose_kernel("cuda", Causal(), 1, 4, contexts[-1].q_doc is not None) == "sdpa"


def test_sdpa_masked_is_what_a_documented_context_runs():
    """The SDPA kernel's masked path equals the naive attention with the same dense mask."""
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 4, 6, 8, generator=g), torch.randn(2, 2, 6, 8, generator=g), torch.randn(2, 2, 6, 8, generator=g)
    docs = torch.tensor([[0, 0, 1, 1, 1, 2], [0] * 6])
    ctx = AttentionContext(6, 6, 0, docs, docs)
    out = KERNELS["sdpa"](q, k, v, Causal(), ctx, 0.35)
    torch.testing.assert_close(out, _naive_attention(q, k, v, ctx.dense(Causal()), 0.35), atol=1e-5, rtol=1e-5)


def test_batches_reach_cuda_through_pinned_memory(monkeypatch):
    """A host-to-device copy from pageable memory waits for the stream (a sync per step); pinned, it is queued.
    Recorded with a stand-in device type: the rule, not the copy, is under test."""
    from runner.compute import to_device
    calls = []

    class Recorded(torch.Tensor):
        def pin_memory(self):
            calls.append("pin")
            return self

        def to(self, *args, **kwargs):
            calls.append(("to", kwargs.get("non_blocking", False)))
            return torch.Tensor.to(torch.Tensor(self), "cpu")

    batch = {"input_ids": torch.zeros(2, 3, dtype=torch.long).as_subclass(Recorded)}
    out = to_device(batch, torch.device("cuda"))
    assert calls == ["pin", ("to", True)] and type(out["input_ids"]) is torch.Tensor
    calls.clear()
    to_device(batch, torch.device("cpu"))
    assert calls == [("to", False)]  # no pinning on a CPU run


def test_random_weights_are_drawn_on_the_target_device(monkeypatch):
    """build_model on an accelerator initializes there, not on the CPU and then copies (3.8B parameters take a
    CPU tens of seconds). The meta device stands in for CUDA: every init call must see its tensors there."""
    from conftest import compose
    from runner.build import build_model
    seen = []
    normal = torch.nn.init.normal_
    def recorded(*args, **kwargs):
        seen.append((args[0] if args else kwargs["tensor"]).device.type)
        return normal(*args, **kwargs)

    monkeypatch.setattr(torch.nn.init, "normal_", recorded)
    model = build_model(compose(["model.vocab_size=64"]).model, "meta")
    assert seen and "cpu" not in seen and next(model.parameters()).is_meta  # (the config check runs on meta too)
    seen.clear()
    build_model(compose(["model.vocab_size=64"]).model, "cpu")
    assert "cpu" in seen
