"""`python run.py`: compose a variant, train it on packed documents, measure perplexity, benchmark it,
and record everything (results.json first, then W&B).

Read top to bottom like nanoGPT's train.py: set-up, the loop, the wrap-up. Faults are part of the job:
checkpoints are atomic, SIGTERM/Ctrl-C stop at the next step with a checkpoint, a non-finite loss stops
the run and names the step, and every outcome is written to results.json.

Under torchrun (train.distributed=ddp|fsdp, runner/distributed.py) every rank runs this same loop on its
share of each batch; rank 0 alone writes results.json, checkpoints, W&B and the progress bar.
"""
import math
import os
import shlex
import signal
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, open_dict
from torch import nn
from tqdm import tqdm

from runner import distributed
from runner.build import build_model, check_model_config
from runner.checkpoint import latest_checkpoint, rng_state, save_checkpoint, set_rng_state
from runner.evaluate import evaluate, require_checkpoint_tokenizer
from runner.tracking import Results, is_oom, output_dir, start_logger


class Interrupted(BaseException):
    """Raised at a step boundary after SIGTERM or Ctrl-C (a checkpoint has been saved), or at once on SIGTERM
    outside the training loop. A BaseException, like KeyboardInterrupt: code that carries on past an ordinary
    error (a benchmark point, a data worker) must not swallow a stop."""

    def __init__(self, message: str, stop: "StopSignal | None" = None):
        super().__init__(message)
        self.stop = stop


class StopSignal:
    """SIGTERM / SIGINT set a flag; the loop checks it between steps, so nothing is left half-done.

    In a submitit job the cluster's time-limit/preemption signal (USR2) is caught too; after the
    checkpoint, `forward()` hands it to submitit's own handler, which requeues the job.
    """

    def __init__(self, extra=()):
        self.received = None
        self._signals = (signal.SIGTERM, signal.SIGINT, *extra)
        self._previous = {}

    def __enter__(self):
        for sig in self._signals:
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

    def forward(self):
        """Call the handler that was installed before ours for the received signal, if it was a Python one."""
        sig = signal.Signals[self.received] if self.received else None
        handler = self._previous.get(sig)
        if callable(handler) and sig not in (signal.SIGINT, signal.SIGTERM):
            handler(sig, None)


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
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if t.distributed != "none" else 1
    if t.batch_size % (world_size * t.grad_accum):
        raise ValueError(f"train.batch_size={t.batch_size} (the global batch) must be divisible by "
                         f"WORLD_SIZE={world_size} x train.grad_accum={t.grad_accum}")
    if cfg.data.seq_len > cfg.model.max_seq_len:
        raise ValueError(f"data.seq_len={cfg.data.seq_len} exceeds model.max_seq_len={cfg.model.max_seq_len}")
    require_checkpoint_tokenizer(cfg)


def task_overrides() -> list[str]:
    """This job's command-line overrides (empty outside a Hydra job)."""
    try:
        from hydra.core.hydra_config import HydraConfig
        return list(HydraConfig.get().overrides.task)
    except Exception:  # noqa: BLE001 -- called outside a Hydra job
        return []


def resume_command(out_dir, overrides: list[str] | None = None) -> str:
    """The command line that continues this run: its own overrides (a checkpoint fits only the model it was
    saved from) with train.resume=true and the run's directory."""
    overrides = task_overrides() if overrides is None else overrides
    keep = [o for o in overrides if not o.lstrip("+~").startswith(("train.resume=", "hydra.run.dir="))]
    return " ".join(["python run.py", *map(shlex.quote, keep), "train.resume=true", f"hydra.run.dir={out_dir}"])


def _sigterm_raises_interrupted():
    """Make SIGTERM raise Interrupted (as Ctrl-C raises KeyboardInterrupt), so that a run stopped before or
    after its training loop still records `interrupted`; the loop installs its own, step-boundary handler."""
    def handle(signum, frame):
        raise Interrupted("SIGTERM")
    try:
        return signal.signal(signal.SIGTERM, handle)
    except ValueError:  # not the main thread
        return None


class RankResults(Results):
    """Ranks other than 0 keep the record in memory; rank 0 alone writes results.json."""

    def write(self):
        pass


def main(cfg: DictConfig):
    out_dir = output_dir()  # the same on every rank (run.py shares rank 0's timestamp)
    is_main = distributed.process_rank() == 0
    results = (Results if is_main else RankResults)(cfg, out_dir, task="train")  # first: no outcome unrecorded
    logger, status, error, dist, stop = None, "failed", None, None, None
    previous_sigterm = _sigterm_raises_interrupted()  # outside the loop (data, evaluation, benchmark): stop now
    try:
        check_model_config(cfg.model)  # before any data is read or weight allocated
        check_train_config(cfg)
        dist = distributed.setup(cfg.train.distributed, cfg.train.device)
        logger = start_logger(cfg, results) if is_main else None
        train(cfg, results, logger, out_dir, dist)
        status = "ok"
    except (Interrupted, KeyboardInterrupt) as err:
        status, stop = "interrupted", getattr(err, "stop", None)
        message = str(err) if stop else (f"{str(err) or 'Ctrl-C'}: stopped without a new checkpoint; latest: "
                                         f"{latest_checkpoint(out_dir)}; resume with: {resume_command(out_dir)}")
        results.data["error"] = {"type": "Interrupted", "message": message}
        if is_main:
            print(f"\n{message}")
    except BaseException as err:
        status, error = ("oom" if is_oom(err) else "failed"), err
        raise
    finally:
        results.finish(status, error)
        if logger is not None:
            logger.summary({"status": status, **results.data["metrics"]})
            logger.finish(status)
        if dist is not None:
            distributed.close(dist, ok=status in ("ok", "interrupted"))
        if previous_sigterm is not None:
            signal.signal(signal.SIGTERM, previous_sigterm)
    if is_main:
        print_summary(results.data)
    if stop is not None:
        stop.forward()  # submitit's requeue, after the checkpoint and the record
    return results.data


def train(cfg: DictConfig, results: Results, logger, out_dir, dist: distributed.Dist):
    from runner.data import BatchLoader, build_data  # imported here so that `--cfg job` stays light

    t = cfg.train
    device = dist.device
    use_bf16 = t.dtype == "bfloat16" or (t.dtype == "auto" and device.type == "cuda")
    autocast = torch.bfloat16 if use_bf16 else None
    torch.manual_seed(t.seed)  # the same on every rank: identical initial weights

    if not dist.is_main:
        distributed.barrier(dist)  # rank 0 tokenizes and fills the data cache first; the others read it
    data = build_data(cfg)
    if dist.is_main:
        distributed.barrier(dist)
    if cfg.model.get("vocab_size") is None:
        with open_dict(cfg):
            cfg.model.vocab_size = data.tokenizer.vocab_size
    results.update(data=data.stats, distributed={"mode": dist.mode, "world_size": dist.world_size})

    model = build_model(cfg.model, device)
    if model.vocab_size < data.tokenizer.vocab_size:  # the built model's: a checkpoint has its own size
        raise ValueError(f"the model has {model.vocab_size} token embeddings (model.vocab_size), fewer than the "
                         f"tokenizer's {data.tokenizer.vocab_size} tokens")
    n_params = model.num_params()
    results.update(params=n_params, params_non_embedding=model.num_params(exclude_embeddings=True))
    flops_per_token = model.flops_per_token(cfg.data.seq_len)
    model = distributed.wrap(model, dist)  # DDP or FSDP2 under torchrun; the model itself otherwise
    fwd_model = torch.compile(model) if t.compile else model
    optimizer = torch.optim.AdamW(param_groups(model, t.weight_decay), lr=t.lr, betas=tuple(t.betas),
                                  fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(t.warmup_steps, t.max_steps, t.min_lr_ratio))
    # A step takes batch_size rows of the epoch's permutation, cut into world_size x grad_accum interleaved
    # shards; rank r's micro-step a takes shard r * grad_accum + a. Which rows a step and each micro-batch
    # hold does not depend on how the work is split: one process with grad_accum=2 computes exactly what
    # two ranks with grad_accum=1 compute, and a checkpoint's loader position fits any split.
    shards = dist.world_size * t.grad_accum
    loaders = [BatchLoader(data.train, t.batch_size // shards, seed=t.seed, rank=dist.rank * t.grad_accum + a,
                           world_size=shards) for a in range(t.grad_accum)]
    tokens_per_step = t.batch_size * cfg.data.seq_len
    peak_flops = _peak_flops(device)
    if peak_flops:
        peak_flops *= dist.world_size

    step, curves = 0, {"train": [], "val": []}
    # the steps since the last logged train point: checkpointed, so a resumed curve averages the same steps
    window = {"time": 0.0, "loss": 0.0, "steps": 0}
    resume = t.resume
    if not resume and int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0:
        resume = True  # SLURM requeued this job (preemption, time limit): continue, whatever the launcher set
    if resume:
        resume_from = out_dir if resume is True else resume
        ckpt_path = distributed.broadcast(latest_checkpoint(resume_from) if dist.is_main else None, dist)
        if ckpt_path is None:
            if dist.is_main:
                print(f"train.resume: no checkpoint in {resume_from}; starting from scratch")
        else:
            # rank 0 reads the file; the weights and optimizer state reach the other ranks by broadcast
            ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False) if dist.is_main else {}
            try:
                distributed.load_full_state_dicts(model, optimizer, ckpt.get("model", {}), ckpt.get("optimizer", {}),
                                                  dist)
            except RuntimeError as err:  # e.g. size mismatch: resumed without the run's own overrides
                raise RuntimeError(f"{ckpt_path} does not fit this model config; resume with the overrides it was "
                                   f"saved with: {resume_command(out_dir, ckpt.get('overrides', []))}\n{err}") from None
            ckpt = distributed.broadcast({k: v for k, v in ckpt.items() if k not in ("model", "optimizer")}, dist)
            scheduler.load_state_dict(ckpt["scheduler"])
            for loader in loaders:
                loader.load_state_dict(ckpt["loader"])
            set_rng_state(ckpt["rng"])
            step, curves = ckpt["step"], ckpt["curves"]
            window.update(ckpt.get("log_window", {}))
            if dist.is_main:
                print(f"resumed from {ckpt_path} at step {step}")
            results.update(resumed_from=str(ckpt_path))

    def checkpoint():
        model_state, optimizer_state = distributed.full_state_dicts(model, optimizer)  # every rank takes part
        if not dist.is_main:
            return None
        state = {"model": model_state, "optimizer": optimizer_state,
                 "scheduler": scheduler.state_dict(), "loader": loaders[0].state_dict(), "rng": rng_state(),
                 "step": step, "curves": curves, "log_window": dict(window), "overrides": task_overrides()}
        return save_checkpoint(out_dir, step, state)

    def validate(max_batches):
        if dist.enabled:  # each rank its share of the rows; DDP's own module, as its wrapper syncs buffers
            metrics = distributed.evaluate_sharded(distributed.unwrap(model), data.val, t.batch_size, max_batches,
                                                   dist, autocast)
        else:
            metrics = evaluate(model, data.val_batches(t.batch_size, max_batches), device, autocast)
        point = {"step": step, "tokens": step * tokens_per_step, "loss": metrics["loss"], "ppl": metrics["ppl"]}
        curves["val"].append(point)
        results.update(curves=curves)
        if logger:
            logger.log({"val/loss": metrics["loss"], "val/ppl": metrics["ppl"]}, step)
        return metrics

    model.train()
    bar = tqdm(total=t.max_steps, initial=step, desc="train", unit="step", dynamic_ncols=True, mininterval=1.0,
               disable=not dist.is_main)
    stop_seen = False  # across ranks: every rank must stop at the same step (checkpointing is collective)
    with StopSignal(distributed.cluster_signals()) as stop:
        while step < t.max_steps:
            stopping = stop_seen if dist.enabled else stop.received
            if stopping:
                path = checkpoint()
                raise Interrupted(f"{stop.received or 'a signal to another rank'} at step {step}: checkpoint {path}; "
                                  f"resume with: {resume_command(out_dir)}", stop)
            started = time.perf_counter()
            loss_sum = torch.zeros((), device=device)
            for a, loader in enumerate(loaders):
                batch = {k: v.to(device, non_blocking=True) for k, v in next(loader).items()}
                with distributed.gradient_sync(model, sync=a == len(loaders) - 1):  # all-reduce once per step
                    with torch.autocast(device.type, dtype=autocast) if autocast else nullcontext():
                        logits = fwd_model(batch["input_ids"], position_ids=batch["position_ids"],
                                           document_ids=batch["document_ids"])
                    loss = F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)
                    if t.fail_at_step is not None and step + 1 == t.fail_at_step:
                        loss = loss * float("nan")  # testing aid: a divergence at a known step
                    (loss / t.grad_accum).backward()
                loss_sum += loss.detach()
            if dist.enabled:  # the mean loss over all ranks' micro-batches, and whether any rank was signalled
                reduced = distributed.all_reduce_sum(torch.stack([loss_sum, torch.tensor(
                    float(stop.received is not None), device=device)]), dist)
                loss_sum, stop_seen = reduced[0] / dist.world_size, bool(reduced[1] > 0)
            step_loss = (loss_sum / t.grad_accum).item()
            if not math.isfinite(step_loss):
                raise FloatingPointError(f"non-finite training loss ({step_loss}) at step {step + 1}; "
                                         f"lower train.lr or check the data")
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
            if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor
                grad_norm = grad_norm.full_tensor()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            step += 1
            window["time"] += time.perf_counter() - started
            window["loss"] += step_loss
            window["steps"] += 1

            if step % t.log_every == 0 or step == t.max_steps:
                tok_s = tokens_per_step * window["steps"] / max(window["time"], 1e-9)
                point = {"step": step, "tokens": step * tokens_per_step, "loss": window["loss"] / window["steps"],
                         "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm), "tokens_per_s": tok_s}
                if peak_flops:
                    point["mfu"] = flops_per_token * tok_s / peak_flops
                curves["train"].append(point)
                bar.set_postfix(loss=f"{point['loss']:.3f}", tok_s=f"{tok_s:,.0f}")
                if logger:
                    logger.log({f"train/{k}": v for k, v in point.items() if k != "step"}, step)
                window.update(time=0.0, loss=0.0, steps=0)
            bar.update(1)
            if t.eval_every and step % t.eval_every == 0 and step < t.max_steps:
                validate(t.eval_batches)
            if t.checkpoint_every and step % t.checkpoint_every == 0:
                checkpoint()
    bar.close()
    if t.checkpoint_every and step % t.checkpoint_every:
        checkpoint()  # the final weights, for task=generate/eval and for a longer run that resumes

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
    if t.bench and dist.mode == "fsdp" and dist.enabled:
        if dist.is_main:
            print("train.bench: skipped under FSDP (the weights are sharded); run task=bench on the checkpoint")
    elif t.bench and dist.is_main:  # one replica is enough (DDP's module)
        from runner.bench import run_suite
        bench = run_suite(distributed.unwrap(model), cfg, device=device, metrics=metrics)
        results.update(bench=bench)
        if logger:
            for key in ("train", "prefill", "decode", "kernels"):
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
    b = record.get("bench") or {}
    rows = [
        ("status", record.get("status")),
        ("variant", " ".join(f"{k}={v[k]}" for k in ("preset", "norm_position", "norm", "ffn", "position", "attention")
                             if v.get(k) is not None)),
        ("parameters", f"{record['params']:,}" if record.get("params") else None),
        ("final train loss", _fmt(m.get("final_train_loss"))),
        ("val loss / ppl", f"{_fmt(m.get('val_loss'))} / {_fmt(m.get('val_ppl'), 2)}  "
                           f"({m.get('val_tokens', 0):,} tokens)" if m.get("val_loss") is not None else None),
        ("train tokens/s", f"{m['train_tokens_per_s']:,.0f}" if m.get("train_tokens_per_s") else None),
        ("decode tokens/s", f"{b['decode_tokens_per_s']:,.0f} with KV cache, {b['decode_tokens_per_s_no_cache']:,.0f} "
                            f"without ({b['kv_cache_speedup']:.1f}x)" if b.get("kv_cache_speedup") else None),
        ("peak memory", f"{b['peak_memory_bytes'] / 2**20:,.0f} MiB" if b.get("peak_memory_bytes") else None),
        ("results", str(record.get("output_dir", "")) + "/results.json"),
    ]
    if record.get("error"):
        rows.insert(1, ("error", f"{record['error']['type']}: {record['error']['message']}"))
    width = max(len(k) for k, _ in rows)
    print("\n" + "\n".join(f"{k:<{width}}  {val}" for k, val in rows if val is not None))


def _fmt(x, digits=4):
    return None if x is None else f"{x:.{digits}f}"
