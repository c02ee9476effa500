"""`python run.py`: compose a variant, train it on packed documents, measure perplexity, benchmark it,
and record everything (results.json first, then W&B).

Read top to bottom like nanoGPT's train.py: set-up, the loop, the wrap-up. Faults are part of the job:
checkpoints are atomic, SIGTERM/Ctrl-C stop at the next step with a checkpoint, a non-finite loss stops
the run and names the step, and every outcome is written to results.json.
"""
import math
import signal
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, open_dict
from torch import nn
from tqdm import tqdm

from runner.build import build_model, check_model_config, resolve_device
from runner.checkpoint import latest_checkpoint, rng_state, save_checkpoint, set_rng_state
from runner.evaluate import evaluate
from runner.tracking import Results, is_oom, output_dir, start_logger


class Interrupted(Exception):
    """Raised at a step boundary after SIGTERM or Ctrl-C (a checkpoint has been saved)."""


class StopSignal:
    """SIGTERM / SIGINT set a flag; the loop checks it between steps, so nothing is left half-done."""

    def __init__(self):
        self.received = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (some launchers): signals stay as they were
                pass
        return self

    def _handle(self, signum, frame):
        if self.received is not None:  # a second Ctrl-C means now
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def param_groups(model: nn.Module, weight_decay: float):
    """Decay matrices only: norms, biases and embeddings are left alone (as in GPT-3, Llama)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for p in {id(p): p for p in model.parameters() if p.requires_grad}.values():
        (decay if p.ndim >= 2 and id(p) not in embeddings else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_lambda(warmup: int, max_steps: int, min_ratio: float):
    """Linear warm-up then cosine decay to min_ratio (as a multiplier of train.lr)."""
    def schedule(step):
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return schedule


def check_train_config(cfg: DictConfig):
    t = cfg.train
    if t.max_steps < 1:
        raise ValueError(f"train.max_steps must be >= 1, got {t.max_steps}")
    if t.grad_accum < 1 or t.batch_size % t.grad_accum:
        raise ValueError(f"train.grad_accum={t.grad_accum} must divide train.batch_size={t.batch_size}")
    if cfg.data.seq_len > cfg.model.max_seq_len:
        raise ValueError(f"data.seq_len={cfg.data.seq_len} exceeds model.max_seq_len={cfg.model.max_seq_len}")


def main(cfg: DictConfig):
    out_dir = output_dir()
    results = Results(cfg, out_dir, task="train")  # first, so that no outcome goes unrecorded
    logger, status, error = None, "failed", None
    try:
        check_model_config(cfg.model)  # before any data is read or weight allocated
        check_train_config(cfg)
        logger = start_logger(cfg, results)
        train(cfg, results, logger, out_dir)
        status = "ok"
    except Interrupted as err:
        status = "interrupted"
        results.data["error"] = {"type": "Interrupted", "message": str(err)}
        print(f"\n{err}")
    except BaseException as err:
        status, error = ("oom" if is_oom(err) else "failed"), err
        raise
    finally:
        results.finish(status, error)
        if logger is not None:
            logger.summary({"status": status, **results.data["metrics"]})
            logger.finish(status)
    print_summary(results.data)
    return results.data


def train(cfg: DictConfig, results: Results, logger, out_dir):
    from runner.data import BatchLoader, build_data  # imported here so that `--cfg job` stays light

    t = cfg.train
    device = resolve_device(t.device)
    use_bf16 = t.dtype == "bfloat16" or (t.dtype == "auto" and device.type == "cuda")
    autocast = torch.bfloat16 if use_bf16 else None
    torch.manual_seed(t.seed)

    data = build_data(cfg)
    if cfg.model.get("vocab_size") is None:
        with open_dict(cfg):
            cfg.model.vocab_size = data.tokenizer.vocab_size
    if cfg.model.vocab_size < data.tokenizer.vocab_size:
        raise ValueError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                         f"{data.tokenizer.vocab_size} tokens")
    results.update(data=data.stats)

    model = build_model(cfg.model, device)
    n_params = model.num_params()
    results.update(params=n_params, params_non_embedding=model.num_params(exclude_embeddings=True))
    fwd_model = torch.compile(model) if t.compile else model
    optimizer = torch.optim.AdamW(param_groups(model, t.weight_decay), lr=t.lr, betas=tuple(t.betas),
                                  fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(t.warmup_steps, t.max_steps, t.min_lr_ratio))
    micro_batch = t.batch_size // t.grad_accum
    loader = BatchLoader(data.train, micro_batch, seed=t.seed)
    tokens_per_step = t.batch_size * cfg.data.seq_len
    flops_per_token = model.flops_per_token(cfg.data.seq_len)
    peak_flops = _peak_flops(device)

    step, curves = 0, {"train": [], "val": []}
    if t.resume:
        resume_from = out_dir if t.resume is True else t.resume
        ckpt_path = latest_checkpoint(resume_from)
        if ckpt_path is None:
            print(f"train.resume: no checkpoint in {resume_from}; starting from scratch")
        else:
            ckpt = torch.load(ckpt_path, map_location=device, weights_only=False)
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            loader.load_state_dict(ckpt["loader"])
            set_rng_state(ckpt["rng"])
            step, curves = ckpt["step"], ckpt["curves"]
            print(f"resumed from {ckpt_path} at step {step}")
            results.update(resumed_from=str(ckpt_path))

    def checkpoint():
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "loader": loader.state_dict(), "rng": rng_state(),
                 "step": step, "curves": curves}
        return save_checkpoint(out_dir, step, state)

    def validate(max_batches):
        metrics = evaluate(model, data.val_batches(t.batch_size, max_batches), device, autocast)
        point = {"step": step, "tokens": step * tokens_per_step, "loss": metrics["loss"], "ppl": metrics["ppl"]}
        curves["val"].append(point)
        results.update(curves=curves)
        if logger:
            logger.log({"val/loss": metrics["loss"], "val/ppl": metrics["ppl"]}, step)
        return metrics

    model.train()
    window_time, window_loss, window_steps = 0.0, 0.0, 0
    bar = tqdm(total=t.max_steps, initial=step, desc="train", unit="step", dynamic_ncols=True, mininterval=1.0)
    with StopSignal() as stop:
        while step < t.max_steps:
            if stop.received:
                path = checkpoint()
                raise Interrupted(f"{stop.received} at step {step}: checkpoint {path}; resume with train.resume=true")
            started = time.perf_counter()
            loss_sum = torch.zeros((), device=device)
            for _ in range(t.grad_accum):
                batch = {k: v.to(device, non_blocking=True) for k, v in next(loader).items()}
                with torch.autocast(device.type, dtype=autocast) if autocast else nullcontext():
                    logits = fwd_model(batch["input_ids"], position_ids=batch["position_ids"],
                                       document_ids=batch["document_ids"])
                loss = F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)
                if t.fail_at_step is not None and step + 1 == t.fail_at_step:
                    loss = loss * float("nan")  # testing aid: a divergence at a known step
                (loss / t.grad_accum).backward()
                loss_sum += loss.detach()
            step_loss = (loss_sum / t.grad_accum).item()
            if not math.isfinite(step_loss):
                raise FloatingPointError(f"non-finite training loss ({step_loss}) at step {step + 1}; "
                                         f"lower train.lr or check the data")
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            window_time += time.perf_counter() - started
            step += 1
            window_loss, window_steps = window_loss + step_loss, window_steps + 1

            if step % t.log_every == 0 or step == t.max_steps:
                tok_s = tokens_per_step * window_steps / max(window_time, 1e-9)
                point = {"step": step, "tokens": step * tokens_per_step, "loss": window_loss / window_steps,
                         "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm), "tokens_per_s": tok_s}
                if peak_flops:
                    point["mfu"] = flops_per_token * tok_s / peak_flops
                curves["train"].append(point)
                bar.set_postfix(loss=f"{point['loss']:.3f}", tok_s=f"{tok_s:,.0f}")
                if logger:
                    logger.log({f"train/{k}": v for k, v in point.items() if k != "step"}, step)
                window_time, window_loss, window_steps = 0.0, 0.0, 0
            bar.update(1)
            if t.eval_every and step % t.eval_every == 0 and step < t.max_steps:
                validate(t.eval_batches)
            if t.checkpoint_every and step % t.checkpoint_every == 0:
                checkpoint()
    bar.close()

    final = validate(t.final_eval_batches)
    total_tokens = tokens_per_step * t.max_steps
    metrics = {
        "val_loss": final["loss"], "val_ppl": final["ppl"], "val_tokens": final["tokens"],
        "final_train_loss": curves["train"][-1]["loss"],
        "train_tokens_per_s": _median_throughput(curves["train"]),
        "train_tokens": total_tokens, "steps": step,
        "mfu": (_median_throughput(curves["train"]) * flops_per_token / peak_flops) if peak_flops else None,
    }
    results.update(metrics=metrics, curves=curves)
    if t.bench:
        from runner.bench import run_suite
        bench = run_suite(model, cfg, device=device, metrics=metrics)
        results.update(bench=bench)
        if logger:
            for key in ("prefill", "decode", "kernels"):
                logger.log_table(f"bench/{key}", bench.get(key) or [])
            logger.summary({f"bench/{k}": v for k, v in bench.items() if isinstance(v, (int, float))})


def _median_throughput(points):
    """Median of the logged windows' tokens/s: robust to the first window's warm-up."""
    values = sorted(p["tokens_per_s"] for p in points)
    return values[len(values) // 2] if values else None


def _peak_flops(device):
    try:
        from runner.bench import device_peak_flops
        return device_peak_flops(device)
    except Exception:
        return None


def print_summary(record: dict):
    m = record.get("metrics") or {}
    v = record.get("variant") or {}
    rows = [
        ("status", record.get("status")),
        ("variant", " ".join(f"{k}={v[k]}" for k in ("preset", "norm_position", "norm", "ffn", "position", "attention")
                             if v.get(k) is not None)),
        ("parameters", f"{record['params']:,}" if record.get("params") else None),
        ("final train loss", _fmt(m.get("final_train_loss"))),
        ("val loss / ppl", f"{_fmt(m.get('val_loss'))} / {_fmt(m.get('val_ppl'), 2)}  "
                           f"({m.get('val_tokens', 0):,} tokens)" if m.get("val_loss") is not None else None),
        ("train tokens/s", f"{m['train_tokens_per_s']:,.0f}" if m.get("train_tokens_per_s") else None),
        ("results", str(record.get("output_dir", "")) + "/results.json"),
    ]
    if record.get("error"):
        rows.insert(1, ("error", f"{record['error']['type']}: {record['error']['message']}"))
    width = max(len(k) for k, _ in rows)
    print("\n" + "\n".join(f"{k:<{width}}  {val}" for k, val in rows if val is not None))


def _fmt(x, digits=4):
    return None if x is None else f"{x:.{digits}f}"
