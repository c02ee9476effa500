"""Multi-head latent attention (DeepSeek-V2) against a naive computation from the paper's equations."""
import math

import torch

from conftest import tiny_model
from variants import MultiHeadLatentAttention, RoPE


def naive_mla(attn, x, cos, sin):
    """DeepSeek-V2 eqs. 9-19 one head at a time: c = RMSNorm(W_dkv x); k_h = [W_uk_h c ; RoPE(W_kr x)],
    v_h = W_uv_h c; q_h = [W_q_h x ; RoPE(W_qr_h x)]; causal softmax(q k^T / sqrt(d_h + d_r)) v; W_o."""
    B, T, _ = x.shape
    H, hd, rd = attn.n_heads, attn.head_dim, attn.rope_head_dim

    def rope(t):  # t (..., T, rd); rotate-half layout: pairs (i, i + rd/2)
        a, b = t[..., : rd // 2], t[..., rd // 2:]
        c, s = cos[..., : rd // 2], sin[..., : rd // 2]
        return torch.cat([a * c - b * s, b * c + a * s], dim=-1)

    h = attn.kv_down.weight @ x.unsqueeze(-1)  # (B, T, r, 1)
    h = h.squeeze(-1)
    c = h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * attn.kv_norm.weight
    k_rope = rope(x @ attn.k_rope_proj.weight.T)  # (B, T, rd), shared by every head
    w_q = attn.q_proj.weight.view(H, hd + rd, -1)
    w_up = attn.kv_up.weight.view(H, 2 * hd, -1)
    heads = []
    for i in range(H):
        q = x @ w_q[i].T
        q = torch.cat([q[..., :hd], rope(q[..., hd:])], dim=-1)
        k = torch.cat([c @ w_up[i, :hd].T, k_rope], dim=-1)
        v = c @ w_up[i, hd:].T
        scores = q @ k.transpose(-2, -1) / math.sqrt(hd + rd)
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        heads.append(scores.softmax(-1) @ v)
    return torch.cat(heads, dim=-1) @ attn.o_proj.weight.T


def test_mla_forward_equals_the_naive_reference():
    torch.manual_seed(0)
    attn = MultiHeadLatentAttention(32, 4, head_dim=8, kv_lora_rank=12, rope_head_dim=4, kernel="eager")
    x = torch.randn(2, 10, 32)
    _, (cos, sin) = RoPE(32, 8, 64, partial_rotary_factor=0.5)(x, torch.arange(10).expand(2, 10))
    with torch.no_grad():
        expected = naive_mla(attn, x, cos, sin)
        for kernel in ("eager", "sdpa", "flex"):
            attn.kernel = kernel
            torch.testing.assert_close(attn(x, (cos, sin)), expected, atol=1e-5, rtol=1e-5, msg=kernel)


def test_mla_cache_holds_only_the_latent_and_the_rotary_key():
    model = tiny_model(attention_cls=MultiHeadLatentAttention, attention_options=dict(kv_lora_rank=12))
    cache = model.allocate_cache(batch_size=3, max_len=20)
    assert {name: tuple(b.shape) for name, b in cache.buffers.items()} == {
        "latent": (2, 3, 1, 20, 12), "k_rope": (2, 3, 1, 20, 8)}
    assert model.kv_cache_bytes_per_token() == 2 * (12 + 8) * 4 < 2 * 2 * 4 * 8 * 4  # vs MHA's K and V
    assert cache.nbytes == model.kv_cache_bytes_per_token() * 3 * 20
    x = torch.randint(0, 61, (3, 5))
    with torch.no_grad():
        model(x, cache=cache)
        attn = model.blocks[0].attn
        latent = attn.kv_norm(attn.kv_down(model.blocks[0].attn_norm(model.embed(x))))  # layer 0 sees the embeddings
    torch.testing.assert_close(cache.buffers["latent"][0, :, 0, :5], latent)


def test_mla_kv_cache_size_in_bench_matches_the_layout():
    from runner.bench import kv_cache_size
    model = tiny_model(attention_cls=MultiHeadLatentAttention, attention_options=dict(kv_lora_rank=12))
    kv = kv_cache_size(model, torch.float32, batch_size=2, max_len=8)
    assert kv["kv_cache_bytes_per_token"] == kv["kv_cache_bytes_per_token_analytic"] == 2 * (12 + 8) * 4
