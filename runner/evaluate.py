"""Perplexity: exp(mean next-token NLL) over held-out packed rows, with document masking, counting only
real in-document targets (labels != -100).

    evaluate(model, batches, device)   the training loop's validation; -> {"loss", "ppl", "tokens"}
    python run.py task=eval            the same over the validation split, for the model cfg.model describes:
                                       random weights, model.checkpoint=<Phi-3 directory or Hub id>, or a
                                       training run's weights (eval.weights=<run directory or step_*.pt>)

task=bench measures perplexity through `validation_perplexity` too (bench.perplexity), so that a benchmark
row holds the speed and the quality of one model.
"""
import logging
import math

import torch
from omegaconf import DictConfig, open_dict
from tqdm import tqdm

from runner.build import build_model, check_model_config, record_model, resolve_device
from runner.checkpoint import load_model_weights
from runner.compute import IGNORE, autocast_dtype, batch_loss, to_device
from runner.task import config_checks, task_run

log = logging.getLogger(__name__)


@torch.no_grad()
def evaluate(model, batches, device, autocast_dtype=None) -> dict:
    """batches: iterable of dicts with input_ids, labels, position_ids, document_ids (B, T)."""
    was_training = model.training
    model.eval()
    # summed on the device and read once at the end: no host sync per batch
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # (nll sum, real targets)
    # a bar only for an evaluation that lasts (delay): the final one over the whole split, task=eval
    for batch in tqdm(batches, desc="evaluate", unit="batch", delay=3, leave=False, dynamic_ncols=True):
        batch = to_device(batch, torch.device(device))
        totals[0] += batch_loss(model, batch, reduction="sum", dtype=autocast_dtype).to(totals.dtype)
        totals[1] += (batch["labels"] != IGNORE).sum()
    model.train(was_training)
    nll, tokens = totals.tolist()
    tokens = int(tokens)
    if tokens == 0:
        raise ValueError("validation split has no real targets: is the corpus too small for data.seq_len?")
    loss = nll / tokens
    return {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "tokens": tokens}


# -- the model and data of an evaluation (task=eval, task=bench) -------------------------------------------
def require_checkpoint_tokenizer(cfg: DictConfig) -> None:
    """Weights from a checkpoint read the ids of the tokenizer they were trained with (train, eval, bench)."""
    checkpoint = cfg.model.get("checkpoint")
    if checkpoint and cfg.tokenizer.kind != "hf":
        raise ValueError(f"model.checkpoint={checkpoint!r} needs the tokenizer its weights were trained with: a fresh "
                         f"BPE's ids mean nothing to it; add tokenizer=hf tokenizer.name_or_path={checkpoint} "
                         f"(or tokenizer=phi3)")


def check_eval_config(cfg: DictConfig) -> None:
    """The checks that need no data or weights, so that a bad request fails before any work."""
    require_checkpoint_tokenizer(cfg)
    check_model_config(cfg.model)


def load_eval_model(cfg: DictConfig, device, tokenizer_vocab_size: int | None = None):
    """The model cfg.model describes (random weights from cfg.seed, or model.checkpoint), with eval.weights
    (a training run's) loaded over it. A null model.vocab_size takes the tokenizer's; the model's own, once
    built (a checkpoint's comes from its config.json), must cover every token id.
    Returns (model, a line saying where the weights came from)."""
    checkpoint = cfg.model.get("checkpoint")
    if not checkpoint and cfg.model.get("vocab_size") is None and tokenizer_vocab_size is not None:
        with open_dict(cfg):
            cfg.model.vocab_size = tokenizer_vocab_size
    torch.manual_seed(cfg.get("seed") or 0)  # random weights as the training run starts from
    model = build_model(cfg.model, device)
    if tokenizer_vocab_size is not None and model.vocab_size < tokenizer_vocab_size:
        raise ValueError(f"the model has {model.vocab_size} token embeddings, the tokenizer {tokenizer_vocab_size} "
                         f"tokens: ids past the embedding would fail or be scored as other tokens")
    source = f"checkpoint {checkpoint}" if checkpoint else "random weights (no model.checkpoint or eval.weights)"
    weights = (cfg.get("eval") or {}).get("weights")
    if weights:
        source = f"training checkpoint {load_model_weights(model, weights, device)}"
    return model.eval(), source


def validation_perplexity(model, data, cfg: DictConfig, device, max_batches: int | None) -> dict:
    """The `metrics` of a record: loss and perplexity over the first max_batches validation batches (None: all)."""
    seq_len = cfg.data.seq_len
    if seq_len > model.max_seq_len:
        raise ValueError(f"data.seq_len={seq_len} exceeds the model's max_seq_len={model.max_seq_len}")
    batch_size = (cfg.get("eval") or {}).get("batch_size") or cfg.train.batch_size
    dtype = autocast_dtype((cfg.get("train") or {}).get("dtype"), device, next(model.parameters()).dtype)
    log.info(f"evaluating over {'all' if max_batches is None else max_batches} validation batches of {batch_size}")
    m = evaluate(model, data.val_batches(batch_size, max_batches), device, dtype)  # as the training loop evaluates
    rows = len(data.val) if max_batches is None else min(len(data.val), max_batches * batch_size)
    return {"val_loss": m["loss"], "val_ppl": m["ppl"], "val_tokens": m["tokens"], "val_rows": rows,
            "val_batch_size": batch_size}


def model_and_perplexity(cfg: DictConfig, device, max_batches: int | None):
    """Data, model and its validation perplexity (check_eval_config first). Returns (model, metrics, data,
    source)."""
    from runner.data import build_data  # here, so that importing evaluate() stays light

    data = build_data(cfg)
    model, source = load_eval_model(cfg, device, data.tokenizer.vocab_size)
    return model, validation_perplexity(model, data, cfg, device, max_batches), data, source


# -- task=eval ------------------------------------------------------------------------------------------------
def main(cfg: DictConfig):
    with task_run(cfg, "eval", print_summary=print_summary) as run:
        with config_checks():  # before the logger, the data and the weights
            check_eval_config(cfg)
        e = cfg.eval
        device = resolve_device(e.get("device") or cfg.train.get("device", "auto"))
        run.start_logger()
        model, metrics, data, source = model_and_perplexity(cfg, device, e.get("batches"))
        record_model(run.results, model)
        run.results.update(data=data.stats, weights=source, metrics=metrics)
    return run.results.data


def print_summary(record: dict) -> None:
    m = record.get("metrics") or {}
    lines = [f"eval       {record.get('status')}  {record.get('weights') or ''}"]
    if record.get("error"):
        lines.append(f"error      {record['error']['type']}: {record['error']['message']}")
    if m.get("val_loss") is not None:
        lines.append(f"val loss   {m['val_loss']:.4f}  ppl {m['val_ppl']:.2f}  ({m['val_tokens']:,} tokens, "
                     f"{m['val_rows']:,} rows)")
    lines.append(f"results    {record.get('output_dir', '')}/results.json")
    print("\n".join(lines))
