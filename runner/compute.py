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


def next_token_loss(model, input_ids, labels, position_ids=None, document_ids=None, reduction: str = "mean",
                    dtype: torch.dtype | None = None):
    """Cross-entropy of the model's next-token logits against `labels` (B, T), skipping IGNORE targets.
    reduction: "mean" over real targets (training) or "sum" (evaluation adds up over batches and ranks).
    The logits are upcast to float32 for the softmax: bf16 logits lose the small probabilities."""
    with autocast(input_ids.device, dtype):
        logits = model(input_ids, position_ids=position_ids, document_ids=document_ids)
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction=reduction)


def batch_loss(model, batch: dict, reduction: str = "mean", dtype: torch.dtype | None = None):
    """next_token_loss on a packed batch (input_ids, labels, position_ids, document_ids)."""
    return next_token_loss(model, batch["input_ids"], batch["labels"], batch.get("position_ids"),
                           batch.get("document_ids"), reduction=reduction, dtype=dtype)


def aux_loss(model):
    """Sum of the auxiliary losses the model's parts recorded in their last forward (a mixture of experts'
    load balancing), or None when it has none; found by walking the modules, so a wrapped model works too."""
    losses = [m.last_aux_loss for m in model.modules() if getattr(m, "last_aux_loss", None) is not None]
    return sum(losses) if losses else None
