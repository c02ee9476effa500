"""Perplexity: exp(mean next-token NLL) over held-out packed rows, with document masking, counting only
real in-document targets (labels != -100)."""
import math

import torch
import torch.nn.functional as F


@torch.no_grad()
def evaluate(model, batches, device, autocast_dtype=None) -> dict:
    """batches: iterable of dicts with input_ids, labels, position_ids, document_ids (B, T)."""
    was_training = model.training
    model.eval()
    nll, tokens = 0.0, 0
    for batch in batches:
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = model(batch["input_ids"], position_ids=batch["position_ids"], document_ids=batch["document_ids"])
        labels = batch["labels"]
        nll += F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100,
                               reduction="sum").item()
        tokens += int((labels != -100).sum())
    model.train(was_training)
    if tokens == 0:
        raise ValueError("validation split has no real targets: is the corpus too small for data.seq_len?")
    loss = nll / tokens
    return {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "tokens": tokens}
