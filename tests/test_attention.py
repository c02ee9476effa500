"""Attention: kernels, masks, head layouts and the KV cache, each against an independent reference."""
from functools import partial

import pytest
import torch

from conftest import tiny_model
from variants import (KERNELS, MLP, ALiBi, Attention, AttentionContext, Causal, DyT, MoE, MultiHeadLatentAttention,
                      SlidingWindow, StridedSparse)

PATTERNS = [Causal(), SlidingWindow(5), StridedSparse(4)]
# tiny_model arguments of each part the model-level properties (causality, documents, cache) must hold for
PARTS = {
    "base": {},
    "alibi": dict(position=ALiBi),
    "softcap": dict(attention_options=dict(softcap=1.0)),
    "qk_norm": dict(attention_options=dict(qk_norm=True)),
    "dyt": dict(norm=DyT),
    "olmo2": dict(norm_position="olmo2"),
    "relu2": dict(ffn=partial(MLP, activation="relu2")),
    "moe": dict(ffn=partial(MoE, n_experts=4, top_k=2, shared_expert=True)),
    "mla": dict(attention_cls=MultiHeadLatentAttention, attention_options=dict(kv_lora_rank=12)),
}
# every mask pattern with the base parts, the causal mask with each other part (how score modifiers and
# patterns combine is checked kernel by kernel in test_scores.py)
PATTERN_PARTS = [(p, "base") for p in PATTERNS] + [(Causal(), part) for part in PARTS if part != "base"]


def naive_allowed(pattern, q, k):
    """The masks written out by hand from their papers' definitions."""
    if isinstance(pattern, Causal):
        return k <= q
    if isinstance(pattern, SlidingWindow):
        return k <= q and q - k < pattern.window
    if isinstance(pattern, StridedSparse):
        return k <= q and (q - k < pattern.stride or (q - k) % pattern.stride == 0)
    raise AssertionError(pattern)


@pytest.mark.parametrize("pattern", PATTERNS, ids=repr)
def test_dense_mask_matches_definition(pattern):
    T = 19
    docs = torch.tensor([[0] * 7 + [1] * 5 + [2] * 7])
    mask = AttentionContext(T, T, 0, docs, docs).dense(pattern)[0, 0]
    for q in range(T):
        for k in range(T):
            expected = naive_allowed(pattern, q, k) and docs[0, q] == docs[0, k]
            assert bool(mask[q, k]) == expected, (q, k)


def _qkv(B=2, H=4, Hkv=2, T=23, D=8, grad=False):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(B, h, T, D, generator=g, requires_grad=grad) for h in (H, Hkv, Hkv)]


@pytest.mark.parametrize("pattern", PATTERNS, ids=repr)
@pytest.mark.parametrize("with_docs", [False, True])
def test_kernels_agree_values(pattern, with_docs):
    q, k, v = _qkv()
    T = q.shape[2]
    docs = torch.tensor([[0] * 9 + [1] * 14, [0] * 3 + [1] * 10 + [2] * 10]) if with_docs else None
    outs = {}
    with torch.no_grad():  # FlexAttention has no CPU backward; values are compared here, gradients below
        for name, kernel in KERNELS.items():
            outs[name] = kernel(q, k, v, pattern, AttentionContext(T, T, 0, docs, docs), 8 ** -0.5)
    torch.testing.assert_close(outs["sdpa"], outs["eager"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs["flex"], outs["eager"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pattern", PATTERNS, ids=repr)
def test_kernels_agree_gradients(pattern):
    docs = torch.tensor([[0] * 9 + [1] * 14, [0] * 3 + [1] * 10 + [2] * 10])
    kernels = ["eager", "sdpa"] + (["flex"] if torch.cuda.is_available() else [])
    grads = {}
    for name in kernels:
        device = "cuda" if name == "flex" else "cpu"
        q, k, v = [t.detach().to(device).requires_grad_() for t in _qkv()]
        T = q.shape[2]
        out = KERNELS[name](q, k, v, pattern, AttentionContext(T, T, 0, docs.to(device), docs.to(device),
                                                               device=device), 8 ** -0.5)
        (out * torch.arange(out.numel(), device=device).view_as(out).sin()).sum().backward()
        grads[name] = [t.grad.cpu() for t in (q, k, v)]
    for name in kernels[1:]:
        for a, b in zip(grads[name], grads["eager"]):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_flex_refuses_cpu_training_clearly():
    q, k, v = _qkv(grad=True)
    with pytest.raises(RuntimeError, match="kernel=sdpa"):
        KERNELS["flex"](q, k, v, Causal(), AttentionContext(23, 23), 1.0)


def test_gqa_with_all_heads_equals_torch_multihead_attention():
    torch.manual_seed(0)
    d, H, T = 32, 4, 11
    ours = Attention(d, H, n_kv_heads=H, kernel="eager")
    ref = torch.nn.MultiheadAttention(d, H, bias=False, batch_first=True)
    with torch.no_grad():
        ref.in_proj_weight.copy_(torch.cat([ours.q_proj.weight, ours.k_proj.weight, ours.v_proj.weight]))
        ref.out_proj.weight.copy_(ours.o_proj.weight)
    x = torch.randn(2, T, d)
    causal = torch.ones(T, T, dtype=torch.bool).triu(1)  # True = masked, torch's convention
    expected, _ = ref(x, x, x, attn_mask=causal, need_weights=False)
    torch.testing.assert_close(ours(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n_kv_heads", [1, 2])
def test_grouped_heads_equal_mha_with_shared_kv_weights(n_kv_heads):
    """GQA (MQA when n_kv_heads=1) = MHA whose K/V projections repeat each shared head for its group."""
    torch.manual_seed(0)
    d, H, T, hd = 32, 4, 9, 8
    gqa = Attention(d, H, n_kv_heads=n_kv_heads)
    mha = Attention(d, H, n_kv_heads=H)
    group = H // n_kv_heads
    with torch.no_grad():
        mha.q_proj.weight.copy_(gqa.q_proj.weight)
        mha.o_proj.weight.copy_(gqa.o_proj.weight)
        for proj in ("k_proj", "v_proj"):
            w = getattr(gqa, proj).weight.view(n_kv_heads, hd, d)
            getattr(mha, proj).weight.copy_(w.repeat_interleave(group, dim=0).reshape(H * hd, d))
    x = torch.randn(2, T, d)
    torch.testing.assert_close(gqa(x), mha(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("qk_norm", [True, False])
def test_qk_norm_gives_unit_rms_queries_and_keys_per_head(qk_norm, monkeypatch):
    """What reaches the kernel (before the 1/sqrt(d) scale) has RMS 1 over head_dim in every head and token."""
    seen = {}

    def record(q, k, v, *args):
        seen.update(q=q, k=k)
        return v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    monkeypatch.setitem(KERNELS, "eager", record)
    attn = Attention(32, 4, n_kv_heads=2, kernel="eager", qk_norm=qk_norm)
    with torch.no_grad():
        attn(torch.randn(2, 7, 32) * 5)
    for t in (seen["q"], seen["k"]):
        rms = t.pow(2).mean(-1).sqrt()  # (B, heads, T)
        assert torch.allclose(rms, torch.ones_like(rms), atol=1e-4) == qk_norm


def test_kv_parameter_counts_shrink_with_fewer_kv_heads():
    d, H, hd = 64, 8, 8
    for n_kv in (8, 4, 2, 1):
        attn = Attention(d, H, n_kv_heads=n_kv)
        kv = attn.k_proj.weight.numel() + attn.v_proj.weight.numel()
        assert kv == 2 * d * n_kv * hd
        assert sum(p.numel() for p in attn.parameters()) == 2 * d * H * hd + 2 * d * n_kv * hd


# packed rows of several documents; position 13 is inside a document in row 0 and a document's first token in row 1
PACKED_DOCS = torch.tensor([[0] * 5 + [1] * 10 + [2] * 9, [0] * 13 + [1] * 11])


@pytest.mark.parametrize("kernel", ["eager", "sdpa", "flex"])
@pytest.mark.parametrize("pattern,part", PATTERN_PARTS, ids=lambda x: x if isinstance(x, str) else repr(x))
@pytest.mark.parametrize("docs", [None, PACKED_DOCS], ids=["one_document", "packed_documents"])
def test_model_is_causal(kernel, pattern, docs, part):
    model = tiny_model(kernel=kernel, attention_schedule=[pattern], **PARTS[part])
    x = torch.randint(0, 61, (2, 24))
    t = 13
    y = x.clone()
    y[:, t + 1:] = torch.randint(0, 61, (2, 24 - t - 1))
    with torch.no_grad():  # FlexAttention has no CPU backward; the forward is all this needs
        out_x, out_y = model(x, document_ids=docs), model(y, document_ids=docs)
    torch.testing.assert_close(out_x[:, :t + 1], out_y[:, :t + 1], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out_x[:, t + 1:], out_y[:, t + 1:])


@pytest.mark.parametrize("kernel", ["eager", "sdpa", "flex"])
@pytest.mark.parametrize("pattern,part", PATTERN_PARTS, ids=lambda x: x if isinstance(x, str) else repr(x))
def test_packed_documents_see_only_themselves(kernel, pattern, part):
    """Each document of a packed row gets the logits it gets alone: the documents before and after it are
    invisible, and its positions restart at 0."""
    model = tiny_model(kernel=kernel, attention_schedule=[pattern], **PARTS[part])
    x = torch.randint(0, 61, (2, 24))
    with torch.no_grad():
        packed = model(x, document_ids=PACKED_DOCS)
        for b, row in enumerate(PACKED_DOCS):
            for doc in row.unique():
                cols = (row == doc).nonzero().squeeze(1)  # one contiguous run
                alone = model(x[b:b + 1, cols])[0]
                torch.testing.assert_close(packed[b, cols], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kernel", ["eager", "sdpa", "flex"])
def test_sliding_window_ignores_tokens_beyond_the_window(kernel):
    """One layer, window w: the logit at position t depends on tokens t-w+1..t only."""
    w, T, t = 4, 20, 15
    model = tiny_model(n_layers=1, kernel=kernel, window=w)
    x = torch.randint(0, 61, (1, T))
    far, near = x.clone(), x.clone()
    far[0, : t - w + 1] = (far[0, : t - w + 1] + 1) % 61  # every token outside the window changes
    near[0, t - w + 1] = (near[0, t - w + 1] + 1) % 61  # the oldest token inside it changes
    with torch.no_grad():
        torch.testing.assert_close(model(far)[0, t], model(x)[0, t], atol=1e-5, rtol=1e-5)
        assert not torch.allclose(model(near)[0, t], model(x)[0, t])


def test_strided_layer_sees_strided_tokens():
    stride, t = 4, 17
    model = tiny_model(n_layers=1, attention_schedule=[StridedSparse(stride)])
    x = torch.randint(0, 61, (1, 20))
    with torch.no_grad():
        base = model(x)[0, t]
        for k in range(t + 1):
            y = x.clone()
            y[0, k] = (y[0, k] + 1) % 61
            changed = not torch.allclose(model(y)[0, t], base, atol=1e-6)
            assert changed == naive_allowed(StridedSparse(stride), t, k), k


CACHE_CASES = [
    dict(n_kv_heads=None), dict(n_kv_heads=2), dict(n_kv_heads=1), dict(n_kv_heads=2, window=5),
    dict(n_kv_heads=2, attention_schedule=[Causal(), StridedSparse(3)]),
] + [dict(n_kv_heads=2, **options) for part, options in PARTS.items() if part != "base"]


@pytest.mark.parametrize("kernel", ["eager", "sdpa", "flex"])
@pytest.mark.parametrize("case", CACHE_CASES, ids=lambda c: "-".join(f"{k}={getattr(v, '__name__', v)}"
                                                                    for k, v in c.items()))
def test_kv_cache_decoding_reproduces_full_forward(kernel, case):
    model = tiny_model(kernel=kernel, **case)
    x = torch.randint(0, 61, (2, 21))
    with torch.no_grad():
        full = model(x)
        cache = model.allocate_cache(batch_size=2, max_len=32)
        steps = [model(x[:, :9], cache=cache)]  # prefill, then one token at a time
        steps += [model(x[:, i:i + 1], cache=cache) for i in range(9, 21)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kernel", ["eager", "sdpa"])
def test_kv_cache_with_left_padded_prompts(kernel):
    """Padding is its own document: the padded row decodes exactly like the unpadded prompt alone."""
    model = tiny_model(kernel=kernel, n_kv_heads=2)
    prompt = torch.randint(0, 61, (1, 6))
    cont = torch.randint(0, 61, (1, 4))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), prompt], dim=1)
    docs = torch.tensor([[-1] * 3 + [0] * 6])
    with torch.no_grad():
        alone = model(torch.cat([prompt, cont], dim=1))[:, 6:]
        cache = model.allocate_cache(1, 16)
        model(padded, document_ids=docs, cache=cache)
        steps = [model(cont[:, i:i + 1], cache=cache) for i in range(4)]
    torch.testing.assert_close(torch.cat(steps, dim=1), alone, atol=1e-5, rtol=1e-5)


def test_kv_cache_bytes_match_allocation():
    for n_kv in (4, 2, 1):
        model = tiny_model(n_kv_heads=n_kv)
        cache = model.allocate_cache(batch_size=3, max_len=40)
        per_token = 2 * model.n_layers * n_kv * model.head_dim * 4
        assert model.kv_cache_bytes_per_token() == per_token
        assert cache.nbytes == per_token * 3 * 40
