"""The memory-lean loss against plain F.cross_entropy (values and gradients), and activation
checkpointing against the plain backward pass."""
import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_model
from runner.compute import (CHUNK_BYTES, IGNORE, chunk_rows, chunked_cross_entropy, compile_model, logits_are_small,
                            next_token_loss, resolve_compile)
from runner.train import checkpoint_blocks


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("chunk", [1, 7, 36, 37, 64])
def test_chunked_cross_entropy_equals_the_plain_one(reduction, chunk):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 16, generator=g, requires_grad=True)
    weight = torch.randn(50, 16, generator=g, requires_grad=True)
    labels = torch.randint(0, 50, (37,), generator=g)
    labels[::5] = IGNORE
    ours = chunked_cross_entropy(hidden, weight, labels, reduction, chunk=chunk)
    plain = F.cross_entropy(hidden @ weight.t(), labels, ignore_index=IGNORE, reduction=reduction)
    torch.testing.assert_close(ours, plain)
    for a, b in zip(torch.autograd.grad(ours * 1.7, (hidden, weight)), torch.autograd.grad(plain * 1.7, (hidden, weight))):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_only_logits_that_fit_one_chunk_four_times_skip_the_chunks():
    """The whole-logits loss holds about four (N, V) float32 tensors: it is taken only when those fit in
    CHUNK_BYTES (nanoGPT's character model: 768 rows x 96), never at a GPT-2 vocabulary."""
    assert logits_are_small(768, 96) and logits_are_small(CHUNK_BYTES // 16, 1)
    assert not logits_are_small(CHUNK_BYTES // 16 + 1, 1) and not logits_are_small(64, 50304)


def test_chunks_are_small_on_cpu_and_few_on_an_accelerator():
    assert chunk_rows(16384, 50304, torch.device("cpu")) == CHUNK_BYTES // (4 * 50304)  # 166 rows, ~99 chunks
    rows = chunk_rows(16384, 50304, torch.device("cuda"))
    assert -(-16384 // rows) == 4  # GPT-2 124M, 16 x 1024 tokens: four chunks of 1 GiB or less
    assert rows * 4 * 50304 <= 2 ** 30
    assert chunk_rows(10 ** 6, 50304, torch.device("cuda")) * 4 * 50304 <= 2 ** 30  # capped, however many rows
    assert chunk_rows(3, 50304, torch.device("cuda")) == 1


@pytest.mark.parametrize("chunk", [1, 5, 40])
def test_chunked_cross_entropy_under_bf16_autocast_matches_the_autocast_linear(chunk):
    """Under autocast the head's matmuls run in bf16 (weight cast once), the softmax in float32: the loss and
    gradients of an autocast nn.Linear followed by F.cross_entropy on float32 logits."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(40, 16, generator=g, requires_grad=True)
    weight = torch.randn(30, 16, generator=g, requires_grad=True)
    labels = torch.randint(0, 30, (40,), generator=g)
    labels[::7] = IGNORE
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = chunked_cross_entropy(hidden, weight, labels, chunk=chunk)
        plain = F.cross_entropy((hidden @ weight.t()).float(), labels, ignore_index=IGNORE)
    torch.testing.assert_close(ours, plain, atol=2e-2, rtol=1e-2)
    for a, b in zip(torch.autograd.grad(ours, (hidden, weight)), torch.autograd.grad(plain, (hidden, weight))):
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a, b, atol=2e-3, rtol=3e-2)


@pytest.mark.parametrize("tie_embeddings", [False, True])
@pytest.mark.parametrize("chunk_bytes", [CHUNK_BYTES, 4 * 61 * 7])
def test_next_token_loss_and_gradients_equal_the_logits_loss(tie_embeddings, chunk_bytes, monkeypatch):
    """Through the model (hidden states + its head, tied or not) against F.cross_entropy on its logits: whole
    (the logits are small) and in chunks of 7 rows (a chunk budget of 7 rows' logits)."""
    from runner import compute

    monkeypatch.setattr(compute, "CHUNK_BYTES", chunk_bytes)
    model = tiny_model(n_kv_heads=2, tie_embeddings=tie_embeddings).train()
    ids = torch.randint(0, 61, (3, 20), generator=torch.Generator().manual_seed(1))
    labels = ids.roll(-1, dims=1)
    labels[:, -1] = IGNORE
    loss = next_token_loss(model, ids, labels)
    chunked = "_ChunkedCrossEntropy" in type(loss.grad_fn.next_functions[0][0]).__name__
    assert chunked == (chunk_bytes < CHUNK_BYTES)
    ours = torch.autograd.grad(loss, list(model.parameters()))
    logits = model(ids)
    plain = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE)
    torch.testing.assert_close(loss, plain)
    for a, b in zip(ours, torch.autograd.grad(plain, list(model.parameters()))):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_activation_checkpointing_gives_the_same_gradients():
    ids = torch.randint(0, 61, (2, 16), generator=torch.Generator().manual_seed(2))
    grads = []
    for checkpointed in (False, True):
        model = tiny_model(n_kv_heads=2).train()
        if checkpointed:
            checkpoint_blocks(model)
        next_token_loss(model, ids[:, :-1], ids[:, 1:]).backward()
        grads.append([p.grad for p in model.parameters()])
    assert list(tiny_model().state_dict()) == list(model.state_dict())  # parameter names unchanged
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_training_compiles_with_inductors_cpp_wrapper_on_a_cpu_only(monkeypatch):
    """On a CPU the compiled graph calls its kernels from C++ (3-4% of a small model's step, README "Coming
    from nanoGPT"); on CUDA inductor's default wrapper. (Compiled end to end: test_train.)"""
    calls = []
    monkeypatch.setattr(torch, "compile", lambda model, **options: calls.append(options) or model)
    model = torch.nn.Linear(2, 2)
    assert compile_model(model, "cpu") is model and compile_model(model, torch.device("cuda")) is model
    assert calls == [{"options": {"cpp_wrapper": True}}, {}]


def test_compile_auto_is_on_under_cuda_only():
    assert resolve_compile("auto", "cpu") is False and resolve_compile("auto", "cuda") is True
    assert resolve_compile(True, "cpu") is True and resolve_compile("false", "cuda") is False
    with pytest.raises(ValueError, match="compile"):
        resolve_compile("sometimes", "cpu")


def test_chunked_loss_under_no_grad_computes_no_gradients(monkeypatch):
    """Evaluation runs under no_grad while the head's weight still requires grad: the loss must not build
    gradient buffers then (it would cost a backward's work per evaluation batch)."""
    from runner import compute

    hidden, weight = torch.randn(12, 8), torch.randn(20, 8, requires_grad=True)
    labels = torch.randint(0, 20, (12,))
    made = []
    real_zeros = torch.zeros
    monkeypatch.setattr(torch, "zeros", lambda *a, **k: made.append(a) or real_zeros(*a, **k))
    with torch.no_grad():
        loss = compute.chunked_cross_entropy(hidden, weight, labels, chunk=5)
    assert not any(tuple(a[0]) == tuple(weight.shape) for a in made if a and isinstance(a[0], torch.Size))
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(hidden @ weight.T, labels))


def _naive_z_loss(logits, labels, coef):
    """coef x the mean over real targets of logsumexp(logits)^2, one row at a time (PaLM's z-loss)."""
    rows = [torch.logsumexp(logits[i], dim=0) ** 2 for i in range(len(labels)) if labels[i] != IGNORE]
    return coef * torch.stack(rows).mean()


@pytest.mark.parametrize("chunk", [1, 7, 37])
def test_chunked_z_loss_equals_its_formula_and_its_gradient_flows(chunk):
    from runner.compute import chunked_loss_and_z
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(37, 16, generator=g, requires_grad=True)
    weight = torch.randn(50, 16, generator=g, requires_grad=True)
    labels = torch.randint(0, 50, (37,), generator=g)
    labels[::5] = IGNORE
    coef = 0.03  # large enough that the z term's gradient is far above the tolerance
    objective, loss, z = chunked_loss_and_z(hidden, weight, labels, coef, chunk=chunk)
    logits = hidden @ weight.t()
    plain = F.cross_entropy(logits, labels, ignore_index=IGNORE)
    naive_z = _naive_z_loss(logits, labels, coef)
    torch.testing.assert_close(z, naive_z.detach())
    torch.testing.assert_close(loss, plain.detach())
    assert not z.requires_grad and not loss.requires_grad  # reported, not differentiated
    ours = torch.autograd.grad(objective * 1.3, (hidden, weight))
    ref = torch.autograd.grad((plain + naive_z) * 1.3, (hidden, weight), retain_graph=True)
    without_z = torch.autograd.grad(plain * 1.3, (hidden, weight))
    for a, b, c in zip(ours, ref, without_z):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        assert (a - c).abs().max() > 1e-3  # the z term's own gradient is in there


@pytest.mark.parametrize("chunkable", [True, False])
def test_training_loss_with_z_loss_matches_the_naive_full_logits(chunkable):
    from runner.compute import training_loss
    torch.manual_seed(0)
    model = tiny_model()
    if not chunkable:  # a head with a bias: the plain full-logits path
        model.lm_head.bias = torch.nn.Parameter(torch.zeros(model.vocab_size))
    ids = torch.randint(0, model.vocab_size, (2, 12))
    labels = ids.roll(-1, dims=1)
    labels[:, -1] = IGNORE
    batch = {"input_ids": ids, "labels": labels}
    objective, loss, z = training_loss(model, batch, z_loss=1e-2)
    logits = model(ids).flatten(0, 1)
    plain = F.cross_entropy(logits, labels.flatten(), ignore_index=IGNORE)
    naive_z = _naive_z_loss(logits, labels.flatten(), 1e-2)
    torch.testing.assert_close(z, naive_z.detach())
    torch.testing.assert_close(loss, plain.detach())
    params = [p for p in model.parameters()]
    ours = torch.autograd.grad(objective, params, allow_unused=True)
    ref = torch.autograd.grad(plain + naive_z, params, allow_unused=True)
    for a, b in zip(ours, ref):
        if b is not None:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    # z_loss = 0: exactly the plain batch loss, no z term
    objective, loss, z = training_loss(model, batch)
    assert z is None and torch.equal(loss, plain.detach())


def _packed_batch(docs):
    """A packed batch over document ids `docs` (B, T): positions restart at each document, as packing.py's."""
    from variants import positions_from_documents
    docs = torch.tensor(docs)
    ids = torch.randint(0, 61, docs.shape, generator=torch.Generator().manual_seed(2))
    labels = ids.roll(-1, dims=1)
    labels[:, -1] = IGNORE
    return {"input_ids": ids, "labels": labels, "position_ids": positions_from_documents(docs), "document_ids": docs}


@pytest.mark.parametrize("window", [None, 5])
def test_single_document_rows_take_the_causal_fast_path_with_the_same_loss_and_gradients(monkeypatch, window):
    from runner.compute import batch_loss, to_device
    model = tiny_model(n_kv_heads=2, window=window).train()
    batch = _packed_batch([[3] * 16, [4] * 16, [-1] * 16])  # one document per row (the last all padding)
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: (calls.append(k), sdpa(*a, **k))[1])
    fast_batch = to_device(batch, torch.device("cpu"))
    assert "document_ids" not in fast_batch and "position_ids" not in fast_batch  # positions were 0..T-1
    fast = batch_loss(model, fast_batch)
    fast_grads = torch.autograd.grad(fast, list(model.parameters()))
    if window is None:  # plain causal: no mask at all; a sliding window still needs its own dense mask
        assert calls and all(k.get("is_causal") and k.get("attn_mask") is None for k in calls)
    calls.clear()
    masked = batch_loss(model, batch)  # the same rows through the same-document mask
    assert calls and all(k.get("attn_mask") is not None for k in calls)
    torch.testing.assert_close(fast, masked)
    for a, b in zip(fast_grads, torch.autograd.grad(masked, list(model.parameters()))):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_rows_packing_several_documents_keep_their_document_ids():
    from runner.compute import to_device
    batch = _packed_batch([[3] * 16, [4] * 10 + [5] * 6])
    assert torch.equal(to_device(batch, torch.device("cpu"))["document_ids"], batch["document_ids"])
    continuing = {**_packed_batch([[3] * 16, [4] * 16]), "position_ids": torch.arange(5, 21).expand(2, 16)}
    assert torch.equal(to_device(continuing, torch.device("cpu"))["position_ids"], continuing["position_ids"])


def test_learned_positions_of_a_broadcast_row_equal_the_per_row_lookup():
    from variants import LearnedPosition
    torch.manual_seed(0)
    pos = LearnedPosition(d_model=8, head_dim=2, max_seq_len=16)
    x = torch.randn(3, 16, 8)
    broadcast, _ = pos(x, torch.arange(16).expand(3, 16))
    per_row, _ = pos(x, torch.arange(16).repeat(3, 1))
    assert torch.equal(broadcast, per_row)
    grads = [torch.autograd.grad(out.square().sum(), pos.embedding.weight)[0]
             for out in (pos(x, torch.arange(16).expand(3, 16))[0], pos(x, torch.arange(16).repeat(3, 1))[0])]
    torch.testing.assert_close(grads[0], grads[1])
