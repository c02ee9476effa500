"""Score modifiers (ALiBi, soft-capping) on every kernel, against references written from their papers."""
import math

import pytest
import torch
from torch import nn

from conftest import tiny_model
from variants import (KERNELS, ALiBi, ALiBiBias, AttentionContext, Causal, NoPosition, SlidingWindow, SoftCap,
                      StridedSparse, alibi_slopes)

PATTERNS = [Causal(), SlidingWindow(5), StridedSparse(4)]
H = 6  # not a power of two: ALiBi's interleaved slopes
MODS = {
    "alibi": (ALiBiBias(tuple(alibi_slopes(H))),),
    "softcap": (SoftCap(1.5),),
    "alibi+softcap": (ALiBiBias(tuple(alibi_slopes(H))), SoftCap(1.5)),
}
DOCS = torch.tensor([[0] * 9 + [1] * 14, [0] * 3 + [1] * 10 + [2] * 10])


def _qkv(B=2, Hq=H, Hkv=2, T=23, D=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, h, T, D, generator=g) * 2 for h in (Hq, Hkv, Hkv)]


def naive_attention(q, k, v, pattern, docs, scale, slopes=None, cap=None, q_offset=0):
    """One (batch, head, query) at a time, from the papers: logit = q.k * scale, minus slope_h * (i - j)
    (ALiBi, eq. in section 3), then cap * tanh(logit / cap) (Gemma 2), softmax over the allowed keys."""
    B, Hq, Tq, _ = q.shape
    groups = Hq // k.shape[1]
    out = torch.zeros_like(q, dtype=torch.float64)
    for b in range(B):
        for h in range(Hq):
            for i in range(Tq):
                qi = i + q_offset
                logits, values = [], []
                for j in range(k.shape[2]):
                    if not bool(pattern(torch.tensor(qi), torch.tensor(j))):
                        continue
                    if docs is not None and docs[b, qi] != docs[b, j]:
                        continue
                    s = float(q[b, h, i].double() @ k[b, h // groups, j].double()) * scale
                    if slopes is not None:
                        s -= slopes[h] * (qi - j)
                    if cap is not None:
                        s = cap * math.tanh(s / cap)
                    logits.append(s)
                    values.append(v[b, h // groups, j].double())
                p = torch.tensor(logits, dtype=torch.float64).softmax(0)
                out[b, h, i] = (p[:, None] * torch.stack(values)).sum(0)
    return out


def test_alibi_slopes_are_the_papers():
    # power of two: 2^(-8/n), 2^(-16/n), ...  (section 3); otherwise the paper's code interleaves
    assert alibi_slopes(8) == [2.0 ** -i for i in range(1, 9)]
    assert alibi_slopes(4) == [2.0 ** -(2 * i) for i in range(1, 5)]
    assert alibi_slopes(6) == [2.0 ** -2, 2.0 ** -4, 2.0 ** -6, 2.0 ** -8, 2.0 ** -1, 2.0 ** -3]


@pytest.mark.parametrize("n_heads", [1, 4, 6, 12, 16, 20])
def test_alibi_slopes_match_huggingface_bloom(n_heads):
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor
    alibi = build_alibi_tensor(torch.ones(1, 3), n_heads, torch.float32)  # (H, 1, 3): slope_h * position
    torch.testing.assert_close(torch.tensor(alibi_slopes(n_heads)), alibi[:, 0, 1])


def test_alibi_bias_is_minus_slope_times_distance():
    T, slopes = 11, alibi_slopes(H)
    ctx = AttentionContext(T, T, 0, device="cpu")
    bias = ctx.dense_bias(Causal(), (ALiBiBias(tuple(slopes)),), H)[0]  # (H, T, T)
    for h in range(H):
        for i in range(T):
            for j in range(T):
                expected = -slopes[h] * (i - j) if j <= i else float("-inf")
                assert bias[h, i, j].item() == pytest.approx(expected), (h, i, j)


@pytest.mark.parametrize("mods", list(MODS))
@pytest.mark.parametrize("pattern", PATTERNS, ids=repr)
@pytest.mark.parametrize("with_docs", [False, True])
def test_kernels_agree_with_the_naive_reference(mods, pattern, with_docs):
    q, k, v = _qkv()
    T, docs, scale = q.shape[2], DOCS if with_docs else None, 8 ** -0.5
    slopes = alibi_slopes(H) if "alibi" in mods else None
    cap = 1.5 if "softcap" in mods else None
    expected = naive_attention(q, k, v, pattern, docs, scale, slopes, cap).float()
    with torch.no_grad():  # FlexAttention has no CPU backward; values here, gradients below
        for name, kernel in KERNELS.items():
            out = kernel(q, k, v, pattern, AttentionContext(T, T, 0, docs, docs), scale, MODS[mods])
            torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5, msg=name)


@pytest.mark.parametrize("mods", list(MODS))
def test_kernels_agree_with_a_cache_offset(mods):
    """Decoding: 4 queries at absolute positions 19..22 over 23 keys; the bias uses absolute distances."""
    q, k, v = _qkv()
    q = q[:, :, -4:]
    slopes = alibi_slopes(H) if "alibi" in mods else None
    cap = 1.5 if "softcap" in mods else None
    expected = naive_attention(q, k, v, Causal(), None, 0.3, slopes, cap, q_offset=19).float()
    with torch.no_grad():
        for name, kernel in KERNELS.items():
            out = kernel(q, k, v, Causal(), AttentionContext(4, 23, 19), 0.3, MODS[mods])
            torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5, msg=name)


@pytest.mark.parametrize("mods", list(MODS))
@pytest.mark.parametrize("pattern", PATTERNS, ids=repr)
def test_kernels_agree_gradients(mods, pattern):
    kernels = ["eager", "sdpa"] + (["flex"] if torch.cuda.is_available() else [])
    grads = {}
    for name in kernels:
        device = "cuda" if name == "flex" else "cpu"
        q, k, v = [t.to(device).requires_grad_() for t in _qkv()]
        T = q.shape[2]
        ctx = AttentionContext(T, T, 0, DOCS.to(device), DOCS.to(device), device=device)
        out = KERNELS[name](q, k, v, pattern, ctx, 8 ** -0.5, MODS[mods])
        (out * torch.arange(out.numel(), device=device).view_as(out).sin()).sum().backward()
        grads[name] = [t.grad.cpu() for t in (q, k, v)]
    for name in kernels[1:]:
        for a, b in zip(grads[name], grads["eager"]):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_softcap_bounds_the_logits(kernel):
    """With v = identity the output rows are the attention probabilities; capped logits lie in (-c, c), so
    any two allowed keys' probabilities differ by a factor below e^(2c), however large q.k gets."""
    cap, T = 2.0, 8
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, T, 8, generator=g) * 100, torch.randn(1, 2, T, 8, generator=g) * 100
    v = torch.eye(T).expand(1, 2, T, T)
    with torch.no_grad():
        capped = KERNELS[kernel](q, k, v, Causal(), AttentionContext(T, T), 1.0, (SoftCap(cap),))
        plain = KERNELS[kernel](q, k, v, Causal(), AttentionContext(T, T), 1.0)
    allowed = torch.ones(T, T, dtype=torch.bool).tril()
    for probs, bounded in ((capped, True), (plain, False)):
        logp = probs[0].log()
        log_ratio = logp.masked_fill(~allowed, -math.inf).amax(-1) - logp.masked_fill(~allowed, math.inf).amin(-1)
        assert bool((log_ratio < 2 * cap + 1e-4).all()) == bounded


def test_softcap_rejects_a_non_positive_cap():
    with pytest.raises(ValueError, match="model.attention.softcap"):
        SoftCap(0.0)


def _running_sum_batch(g, batch, length, vocab=8):
    """x[t] = (x[t-1] + x[t-2]) mod vocab: each next token depends on the two before it, at any length."""
    x = torch.randint(0, vocab, (batch, length), generator=g)
    for t in range(2, length):
        x[:, t] = (x[:, t - 1] + x[:, t - 2]) % vocab
    return x


def _loss_past_training_length(position, train_len=16, test_len=64, steps=100):
    model = tiny_model(vocab_size=8, d_model=32, n_layers=2, n_heads=4, max_seq_len=128, position=position,
                       seed=0).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = _running_sum_batch(g, 32, train_len + 1)
        loss = model.loss(x[:, :-1], x[:, 1:].contiguous())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    x = _running_sum_batch(torch.Generator().manual_seed(1), 16, test_len + 1)
    with torch.no_grad():
        logits = model(x[:, :-1])[:, train_len:]  # only positions the model never saw in training
        return nn.functional.cross_entropy(logits.flatten(0, 1), x[:, train_len + 1:].flatten()).item()


@pytest.mark.slow
def test_alibi_extrapolates_past_the_training_length_at_least_as_well_as_no_positions():
    alibi, nope = _loss_past_training_length(ALiBi), _loss_past_training_length(NoPosition)
    assert alibi <= nope, (alibi, nope)
