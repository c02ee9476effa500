"""How a batch becomes a loss, under one precision rule.

The training step, the evaluation (one process or sharded over ranks) and the benchmark's train step all
call these two, so that a loss or a dtype means the same thing wherever it is reported.
"""
from contextlib import nullcontext

import torch
import torch.nn.functional as F

IGNORE = -100  # labels that are not targets: document boundaries and padding (runner/data/packing.py)


def autocast_dtype(setting: str | None, device: torch.device, param_dtype=torch.float32) -> torch.dtype | None:
    """train.dtype -> the autocast dtype, or None for none. auto: bf16 over fp32 weights on CUDA, fp32 on CPU;
    bfloat16: always bf16; float32: never. Weights already stored in low precision run as they are."""
    setting = setting or "auto"
    if setting not in ("auto", "float32", "bfloat16"):
        raise ValueError(f"train.dtype={setting!r} must be auto, float32 or bfloat16")
    if param_dtype != torch.float32:
        return None
    if setting == "bfloat16" or (setting == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def autocast(device: torch.device, dtype: torch.dtype | None):
    """torch.autocast for `dtype`; a no-op context for None."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def to_device(batch: dict, device: torch.device) -> dict:
    """A batch's tensors on the device. To CUDA through pinned memory: a copy from pageable memory waits for
    the stream first (a host sync per step); pinned, it is queued and the host runs ahead (nanoGPT's pin_memory).
    Rows of one document each lose their document ids first (without_single_documents)."""
    batch = without_single_documents(batch)
    if device.type != "cuda":
        return {k: v.to(device) for k, v in batch.items()}
    return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}


def without_single_documents(batch: dict) -> dict:
    """The batch without document_ids when every row holds one document: its same-document mask is then all
    true, so the model takes the plain causal path (SDPA's is_causal fast path, no dense mask built per call,
    FlexAttention left for packed rows) with the same result; position_ids go too when they are 0..T-1 in every
    row (the model's default), and stay otherwise.
    Decided on the host, where the loader builds batches (a tensor already on an accelerator is kept as it is:
    reading it would wait for the device)."""
    docs = batch.get("document_ids")
    if docs is None or docs.device.type != "cpu" or docs.dim() != 2 or docs.shape[1] == 0:
        return batch
    if not torch.equal(docs, docs[:, :1].expand_as(docs)):  # a host-side comparison, no device read
        return batch
    drop = {"document_ids"}
    pos = batch.get("position_ids")
    if pos is not None and pos.shape == docs.shape and torch.equal(pos, torch.arange(pos.shape[1], dtype=pos.dtype).expand_as(pos)):
        drop.add("position_ids")  # the model's own 0..T-1, one row broadcast (a learned table looked up once)
    return {k: v for k, v in batch.items() if k not in drop}


def resolve_compile(setting, device) -> bool:
    """train.compile, generate.compile, bench.compile: true, false or auto = on CUDA only. There compiled
    graphs (and for decoding, CUDA graphs) remove per-op launch overhead; on CPU the compile time (tens of
    seconds per shape) outweighs what a short run or a small model gains."""
    setting = str(setting if setting is not None else "auto").lower()
    if setting not in ("auto", "true", "false"):
        raise ValueError(f"compile={setting!r} must be auto, true or false")
    return setting == "true" or (setting == "auto" and torch.device(device).type == "cuda")


def compile_model(model, device):
    """torch.compile(model) as training runs it. On a CPU with inductor's C++ wrapper: the generated graph
    calls its kernels and the ATen GEMMs from C++, not from a Python wrapper, which is 3-4% of a small
    model's training step there (runner/bench/nanogpt.py, README "Coming from nanoGPT"). On CUDA inductor's
    default (Python) wrapper, as the GPU scripts expect: the C++ wrapper has not been tried on a GPU here."""
    if torch.device(device).type == "cpu":
        return torch.compile(model, options={"cpp_wrapper": True})
    return torch.compile(model)


def next_token_loss(model, input_ids, labels, position_ids=None, document_ids=None, reduction: str = "mean",
                    dtype: torch.dtype | None = None):
    """Cross-entropy of the model's next-token logits against `labels` (B, T), skipping IGNORE targets.
    reduction: "mean" over real targets (training) or "sum" (evaluation adds up over batches and ranks).
    The logits are float32 for the softmax (bf16 logits lose the small probabilities), a chunk of rows at a
    time (chunked_cross_entropy) when the model hands out its hidden states and a plain LM head."""
    inner = _chunkable_model(model)
    with autocast(input_ids.device, dtype):
        out = model(input_ids, position_ids=position_ids, document_ids=document_ids,
                    **({"return_hidden": True} if inner is not None else {}))
        if inner is not None:
            return chunked_cross_entropy(out.flatten(0, 1), head_weight(inner), labels.flatten(), reduction)
    return F.cross_entropy(out.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction=reduction)


def _chunkable_model(model):
    """The TransformerLM inside the model's wrappers (DDP, FSDP2, torch.compile) when its LM head is a plain
    bias-free Linear that chunked_cross_entropy can stand in for; else None."""
    from variants import TransformerLM

    inner = getattr(model, "_orig_mod", model)
    inner = getattr(inner, "module", inner)  # DDP
    inner = getattr(inner, "_orig_mod", inner)
    if not isinstance(inner, TransformerLM) or inner.lm_head.bias is not None:
        return None
    return inner


def head_weight(inner) -> torch.Tensor:
    """The LM head's weight (V, d), read after the model's forward: under FSDP2 the root module (embeddings,
    final norm, head) keeps its parameters gathered from its forward until backward, so this is the full
    weight, and its gradient is reduce-scattered with the root's. Should it still be a shard (a DTensor), its
    differentiable all-gather."""
    weight = inner.lm_head.weight
    return weight.full_tensor() if hasattr(weight, "full_tensor") else weight


CHUNK_BYTES = 32 * 2 ** 20  # float32 logits held at once by chunked_cross_entropy on a CPU
ACCELERATOR_CHUNK_BYTES = 2 ** 30  # on a GPU: at most 1 GiB of logits per chunk, and about four chunks
ACCELERATOR_CHUNKS = 4


def chunk_rows(n_rows: int, vocab: int, device: torch.device) -> int:
    """Rows of logits per chunk. On a CPU, CHUNK_BYTES' worth (the memory figure in the README). On a GPU
    a few large chunks: each chunk is two GEMMs and a read-modify-write of the (V, d) weight gradient, and
    ~100 chunks of ~166 rows (32 MiB at V=50,304) cost about half of a 124M model's step there."""
    per_row = 4 * vocab
    if torch.device(device).type == "cpu":
        return max(1, CHUNK_BYTES // per_row)
    return max(1, min(-(-n_rows // ACCELERATOR_CHUNKS), ACCELERATOR_CHUNK_BYTES // per_row))


class _ChunkedCrossEntropy(torch.autograd.Function):
    """LM head + cross-entropy a chunk of rows at a time, the gradients computed in the same pass (as
    Liger's fused linear cross-entropy does): what is saved for backward is d(hidden) and d(weight), never
    the (N, V) logits. hidden (N, d), weight (V, d), labels (N,) -> the summed loss over real targets.
    `dtype`: the matmuls' dtype (autocast's, or the hidden states'); the weight is cast to it once."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk: int, needs_grad: bool, dtype: torch.dtype, z_loss: float = 0.0):
        with torch.autocast(hidden.device.type, enabled=False):  # the casts below are explicit
            total, squared_z = _ChunkedCrossEntropy._forward(ctx, hidden, weight, labels, chunk, needs_grad, dtype,
                                                             z_loss)
        ctx.mark_non_differentiable(squared_z)
        return total, squared_z

    @staticmethod
    def _forward(ctx, hidden, weight, labels, chunk, needs_grad, dtype, z_loss):
        """-> (the summed loss, plus z_loss x the summed squared log-partitions; the summed squared
        log-partitions alone), both over real targets."""
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        squared_z = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if needs_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if needs_grad else None
        w = weight.to(dtype)  # once, not per chunk
        for start in range(0, hidden.shape[0], chunk):
            h, y = hidden[start:start + chunk].to(dtype), labels[start:start + chunk]
            logits = (h @ w.t()).float()  # (c, V), the only logits alive
            valid = y != IGNORE
            target = y.clamp(min=0)
            lse = logits.logsumexp(dim=-1)
            total += ((lse - logits.gather(1, target[:, None]).squeeze(1)) * valid).sum()
            squared_z += (lse.square() * valid).sum()
            if needs_grad:  # d loss / d logits = softmax - one_hot(target), zero for ignored rows
                probs = (logits - lse[:, None]).exp_()
                if z_loss:  # d (z_loss lse^2) / d logits = 2 z_loss lse softmax
                    probs *= 1 + 2 * z_loss * lse[:, None]
                probs[torch.arange(len(y), device=y.device), target] -= 1
                probs *= valid[:, None]
                grad_hidden[start:start + chunk] = (probs.to(dtype) @ w).to(hidden.dtype)
                if dtype == torch.float32:
                    grad_weight.addmm_(probs.t(), h)  # accumulated inside the GEMM: no (V, d) temporary
                else:
                    grad_weight += (probs.t().to(dtype) @ h).float()
        if needs_grad:
            ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        return (total + z_loss * squared_z if z_loss else total), squared_z

    @staticmethod
    def backward(ctx, grad_total, grad_squared_z):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (grad_hidden * grad_total.to(grad_hidden.dtype), grad_weight * grad_total.to(grad_weight.dtype),
                None, None, None, None, None)


def logits_are_small(n_rows: int, vocab: int) -> bool:
    """Whether the unchunked loss fits in one CPU chunk's budget: it holds about four (N, V) float32 tensors
    (the logits, the log-probabilities and their gradients). Then chunking saves no memory, and its ~25 small
    operations per step are 2% of the step at nanoGPT's CPU reference size (V = 96, 768 rows)."""
    return 4 * 4 * n_rows * vocab <= CHUNK_BYTES


def chunked_cross_entropy(hidden, weight, labels, reduction: str = "mean", chunk: int | None = None):
    """F.cross_entropy(hidden @ weight.T, labels, ignore_index=IGNORE) with float32 logits, computed
    `chunk` rows at a time (default: chunk_rows for the device) so the whole batch's never exist at once; by
    default, logits small enough for logits_are_small go through F.cross_entropy whole. Under autocast the
    head's matmuls run in autocast's dtype, as an autocast nn.Linear would."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction={reduction!r} must be mean or sum")
    device_type = hidden.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
    if chunk is None and logits_are_small(hidden.shape[0], weight.shape[0]):
        logits = (hidden.to(dtype) @ weight.to(dtype).t()).float()
        return F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction=reduction)
    chunk = chunk or chunk_rows(hidden.shape[0], weight.shape[0], hidden.device)
    # decided out here: inside forward grad mode is always off, and an evaluation under no_grad (whose
    # weight still requires grad) must not pay for gradients
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    total, _ = _ChunkedCrossEntropy.apply(hidden, weight, labels, chunk, needs_grad, dtype)
    # mean over real targets; 0/0 = nan with no targets, as F.cross_entropy gives
    return total / (labels != IGNORE).sum() if reduction == "mean" else total


def chunked_loss_and_z(hidden, weight, labels, z_loss: float, chunk: int | None = None):
    """chunked_cross_entropy's mean loss plus the z-loss term, z_loss x mean(logsumexp(logits)^2) over real
    targets, in the same pass over the logits: (their sum, to differentiate; the loss; the z-loss term),
    the last two detached."""
    chunk = chunk or chunk_rows(hidden.shape[0], weight.shape[0], hidden.device)
    device_type = hidden.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    total, squared_z = _ChunkedCrossEntropy.apply(hidden, weight, labels, chunk, needs_grad, dtype, z_loss)
    n = (labels != IGNORE).sum()
    z_term = z_loss * squared_z / n
    return total / n, (total.detach() / n - z_term), z_term


def batch_loss(model, batch: dict, reduction: str = "mean", dtype: torch.dtype | None = None):
    """next_token_loss on a packed batch (input_ids, labels, position_ids, document_ids)."""
    return next_token_loss(model, batch["input_ids"], batch["labels"], batch.get("position_ids"),
                           batch.get("document_ids"), reduction=reduction, dtype=dtype)


def training_loss(model, batch: dict, dtype: torch.dtype | None = None, z_loss: float = 0.0):
    """The training step's loss of a packed batch: (what to differentiate, the cross-entropy, the z-loss term
    or None), the last two detached. z_loss > 0 adds z_loss x mean(logsumexp(logits)^2) over real targets
    (PaLM, Chowdhery et al. 2022; Wortsman et al. 2023): it keeps the output logits' log-partition near 0."""
    if not z_loss:
        loss = batch_loss(model, batch, dtype=dtype)
        return loss, loss.detach(), None
    labels = batch["labels"].flatten()
    inner = _chunkable_model(model)
    with autocast(labels.device, dtype):
        out = model(batch["input_ids"], position_ids=batch.get("position_ids"), document_ids=batch.get("document_ids"),
                    **({"return_hidden": True} if inner is not None else {}))
        if inner is not None:
            return chunked_loss_and_z(out.flatten(0, 1), head_weight(inner), labels, z_loss)
    logits = out.float().flatten(0, 1)
    valid = labels != IGNORE
    loss = F.cross_entropy(logits, labels, ignore_index=IGNORE)
    z_term = z_loss * (logits.logsumexp(dim=-1).square() * valid).sum() / valid.sum()
    return loss + z_term, loss.detach(), z_term.detach()


def aux_loss(model):
    """Sum of the auxiliary losses the model's parts recorded in their last forward (a mixture of experts'
    load balancing), or None when it has none; found by walking the modules, so a wrapped model works too."""
    losses = [m.last_aux_loss for m in model.modules() if getattr(m, "last_aux_loss", None) is not None]
    return sum(losses) if losses else None
