"""`python run.py`: compose a variant, train it on packed documents, measure perplexity, benchmark it,
and record everything (results.json first, then W&B).

Read top to bottom like nanoGPT's train.py: set-up, the loop, the wrap-up. Faults are part of the job:
checkpoints are atomic, SIGTERM/Ctrl-C stop at the next step with a checkpoint, a non-finite loss stops
the run and names the step, resume skips a damaged checkpoint, one process at a time trains in a run
directory (runner/runlock.py), and every outcome is written to results.json.

Under torchrun (train.distributed=ddp|fsdp, runner/distributed.py) every rank runs this same loop on its
share of each batch; rank 0 alone writes results.json, checkpoints, W&B and the progress bar.
"""
import logging
import math
import os
import time

import torch
from omegaconf import DictConfig, open_dict
from torch import nn
from tqdm import tqdm

from runner import distributed, telemetry
from runner.budget import check_budget, spent, steps_for_budget
from runner.sweep import finished_record
from runner.build import build_model, check_model_config, record_model
from runner.checkpoint import (RESUME_KEYS, latest_checkpoint, load_latest_readable, rng_state, save_checkpoint,
                               set_rng_state)
from runner.cooldown import Cooldowns, check_cooldown_config
from runner.compute import autocast_dtype, aux_loss, compile_model, resolve_compile, to_device, training_loss
from runner.evaluate import evaluate, require_checkpoint_tokenizer
from runner.optim import build_optimizer, check_optimizer_config
from runner.task import Interrupted, StopSignal, config_checks, task_run
from runner.formatting import format_bytes
from runner.schedule import build_schedule, check_schedule_config
from runner.resume import require_checkpoint_to_resume, resume_command, resume_source, task_overrides
from runner.runlock import RunLock
from runner.tracking import PART_FAMILIES, Results, busy_machine_warning, machine_load, output_dir

log = logging.getLogger(__name__)
progress = logging.getLogger("runner.progress")  # run.log only (conf/config.yaml): the terminal shows the bar


def check_train_config(cfg: DictConfig):
    t = cfg.train
    budget_key = check_budget(t)  # exactly one of max_steps, max_tokens, max_flops, max_seconds
    check_schedule_config(t, budget_key)  # train.schedule (cosine | wsd) and train.cooldowns (runner/cooldown.py)
    check_cooldown_config(t, budget_key)
    if t.grad_accum < 1 or t.batch_size % t.grad_accum:
        raise ValueError(f"train.grad_accum={t.grad_accum} must divide train.batch_size={t.batch_size}")
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if t.distributed != "none" else 1
    if t.batch_size % (world_size * t.grad_accum):
        raise ValueError(f"train.batch_size={t.batch_size} (the global batch) must be divisible by "
                         f"WORLD_SIZE={world_size} x train.grad_accum={t.grad_accum}")
    if cfg.data.seq_len > cfg.model.max_seq_len:
        raise ValueError(f"data.seq_len={cfg.data.seq_len} exceeds model.max_seq_len={cfg.model.max_seq_len}")
    if not t.get("z_loss", 0.0) >= 0:
        raise ValueError(f"train.z_loss={t.z_loss} must be >= 0 (0 = off)")
    telemetry.settings(t.get("telemetry"), t.log_every)  # train.telemetry's keys and values
    resolve_compile(t.compile, "cpu")  # train.compile: auto | true | false, checked before any work
    check_optimizer_config(t)  # train/optimizer (runner/optim.py)
    require_checkpoint_tokenizer(cfg)


def main(cfg: DictConfig):
    out_dir = output_dir()  # the same on every rank (run.py shares rank 0's timestamp)
    is_main = distributed.process_rank() == 0
    if cfg.train.resume == "auto" and (done := finished_record(out_dir, cfg)) is not None:
        if is_main:  # a resumed sweep's finished job: nothing left to spend
            print(f"{out_dir}: finished with this budget before; kept as it is")
        return done
    lock = RunLock.take(out_dir) if is_main else None  # before results.json: a refused run writes nothing here
    with task_run(cfg, "train", print_summary=print_summary, is_main=is_main, out_dir=out_dir) as run:
        if lock is not None:
            run.on_close(lambda status: lock.release())
        run.interrupt_hint = lambda err: (f"{str(err) or 'Ctrl-C'}: stopped without a new checkpoint; latest: "
                                          f"{latest_checkpoint(out_dir)}; resume with: {resume_command(out_dir)}")
        with config_checks():  # before any data is read, weight allocated or W&B run started
            check_model_config(cfg.model)
            check_train_config(cfg)
            from runner.data import check_data_config, check_tokenizer_config
            check_data_config(cfg.data)
            check_tokenizer_config(cfg.tokenizer)
            if is_main:  # rank 0 holds the checkpoints
                require_checkpoint_to_resume(cfg, out_dir)
        dist = distributed.setup(cfg.train.distributed, cfg.train.device, cfg.train.get("data_wait_timeout_s", 7200))
        run.on_close(lambda status: distributed.close(dist, ok=status in ("ok", "interrupted")))
        run.start_logger()
        trainer = Trainer(cfg, run.results, run.logger, out_dir, dist)
        trainer.resume()
        trainer.fit()
        trainer.wrap_up()
        if cfg.train.bench:
            benchmark_trained_model(trainer)
    return run.results.data


class Trainer:
    """The training job as named steps: set-up (__init__), resume, fit (the loop of optimizer steps, with
    logging, evaluation and checkpoints between them), wrap_up (final checkpoint and evaluation)."""

    def __init__(self, cfg: DictConfig, results: Results, logger, out_dir, dist: distributed.Dist):
        self.cfg, self.t, self.results, self.logger, self.out_dir, self.dist = cfg, cfg.train, results, logger, out_dir, dist
        t, device = cfg.train, dist.device
        self.device = device
        torch.manual_seed(t.seed)  # the same on every rank: identical initial weights

        self.data = self.load_data()

        model = build_model(cfg.model, device)
        if model.vocab_size < self.data.tokenizer.vocab_size:  # the built model's: a checkpoint has its own size
            raise ValueError(f"the model has {model.vocab_size} token embeddings (model.vocab_size), fewer than the "
                             f"tokenizer's {self.data.tokenizer.vocab_size} tokens")
        record_model(results, model)
        self.autocast = autocast_dtype(t.dtype, device, next(model.parameters()).dtype)
        self.flops_per_token = model.flops_per_token(cfg.data.seq_len)
        results.update(flops_per_token=self.flops_per_token)
        self.model = distributed.wrap(model, dist, self.autocast)  # DDP or FSDP2 under torchrun; the model itself otherwise
        if t.get("activation_checkpointing"):
            checkpoint_blocks(model)
        compiled = resolve_compile(t.compile, device)  # auto: on CUDA
        self.forward_model = compile_model(self.model, device) if compiled else self.model
        self.optimizer = build_optimizer(t, self.model, device)  # train/optimizer=adamw|muon (runner/optim.py)
        # the budget in steps (tokens and FLOPs buy a whole number of them); None: train.max_seconds, the clock
        self.tokens_per_step = t.batch_size * cfg.data.seq_len
        self.max_steps = steps_for_budget(t, self.tokens_per_step, self.flops_per_token)
        self.train_seconds = 0.0  # time in optimizer steps: what train.max_seconds counts (checkpointed)
        time_share = (lambda: self.train_seconds / t.max_seconds) if self.max_steps is None else None
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, build_schedule(t, self.max_steps, time_share))
        self.cooldowns = Cooldowns(t, check_budget(t), self.tokens_per_step, self.flops_per_token)
        # train.telemetry: probes inside the model and the optimizer step, read at log steps (runner/telemetry.py)
        self.telemetry = telemetry.build(t.get("telemetry"), model, self.optimizer, t.log_every)
        self.loaders = self.micro_batch_loaders()
        peak = _peak_flops(device)
        self.peak_flops = peak * dist.world_size if peak else None
        self.step, self.curves = 0, {"train": [], "val": []}
        # the steps since the last logged train point: checkpointed, so a resumed curve averages the same steps
        self.window = {"time": 0.0, "loss": 0.0, "steps": 0}
        # (step, loss, {"aux_loss"/"z_loss": term}), on the device, not yet read: read at log steps and checkpoints, so
        # the host never waits for the device inside a step
        self.pending_losses = []

    def load_data(self):
        """The run's data (rank 0 tokenizes and fills the cache first; the other ranks then read it); the model's
        vocabulary defaults to the tokenizer's."""
        from runner.data import build_data  # imported here so that `--cfg job` stays light
        cfg, dist = self.cfg, self.dist
        if not dist.is_main:
            distributed.wait_for_main(dist)
        data = build_data(cfg)
        if dist.is_main:
            distributed.wait_for_main(dist)
        if cfg.model.get("vocab_size") is None:
            with open_dict(cfg):
                cfg.model.vocab_size = data.tokenizer.vocab_size
        self.results.update(data=data.stats, distributed={"mode": dist.mode, "world_size": dist.world_size})
        return data

    def micro_batch_loaders(self) -> list:
        """One loader per micro-step. A step takes batch_size rows of the epoch's permutation, cut into world_size
        x grad_accum interleaved shards; rank r's micro-step a takes shard r * grad_accum + a. Which rows a step and
        each micro-batch hold does not depend on how the work is split: one process with grad_accum=2 computes
        exactly what two ranks with grad_accum=1 compute, and a checkpoint's loader position fits any split."""
        from runner.data import batch_loader
        t, dist = self.t, self.dist
        shards = dist.world_size * t.grad_accum
        return [batch_loader(self.data.train, t.batch_size // shards, seed=t.seed, rank=dist.rank * t.grad_accum + a,
                             world_size=shards, sampling=self.cfg.data.get("sampling", "rows"))
                for a in range(t.grad_accum)]

    # -- resume ---------------------------------------------------------------------------------------------
    def resume(self):
        """train.resume=true|auto (or a path, or a requeued SLURM job): continue from the latest checkpoint."""
        t, dist = self.t, self.dist
        resume_from = resume_source(t.resume, self.out_dir)
        if resume_from is None:
            return
        # rank 0 reads the newest readable checkpoint (a damaged one is set aside); the path, the weights and
        # the optimizer state reach the other ranks by broadcast
        loaded = load_latest_readable(resume_from, RESUME_KEYS) if dist.is_main else None
        ckpt_path = distributed.broadcast(loaded and loaded[0], dist)
        if ckpt_path is None:
            if dist.is_main:
                log.info(f"train.resume: no checkpoint in {resume_from} yet; starting from scratch")
            return
        ckpt = loaded[1] if dist.is_main else {}
        try:
            distributed.load_full_state_dicts(self.model, self.optimizer, ckpt.get("model", {}),
                                              ckpt.get("optimizer", {}), dist)
        except RuntimeError as err:  # e.g. size mismatch: resumed without the run's own overrides
            raise RuntimeError(f"{ckpt_path} does not fit this model config; resume with the overrides it was "
                               f"saved with: {resume_command(self.out_dir, ckpt.get('overrides', []))}\n{err}") from None
        ckpt = distributed.broadcast({k: v for k, v in ckpt.items() if k not in ("model", "optimizer")}, dist)
        self.scheduler.load_state_dict(ckpt["scheduler"])
        for loader in self.loaders:
            loader.load_state_dict(ckpt["loader"])
        set_rng_state(ckpt["rng"])
        self.step, self.curves = ckpt["step"], ckpt["curves"]
        self.train_seconds = ckpt.get("train_seconds", 0.0)
        self.window.update(ckpt.get("log_window", {}))
        self.telemetry.load_state_dict(ckpt.get("telemetry"))  # the spike windows go on where they were
        if dist.is_main:
            log.info(f"resumed from {ckpt_path} at step {self.step}")
        self.results.update(resumed_from=str(ckpt_path))

    # -- the loop ---------------------------------------------------------------------------------------------
    def fit(self):
        dist = self.dist
        if dist.is_main:
            budget = f"{self.max_steps - self.step} steps" if self.max_steps else "the time budget, in steps"
            log.info(f"training {self.results.data['params']:,} parameters for {budget} of "
                     f"{self.tokens_per_step:,} tokens on {self.device}; run directory {self.out_dir}")
        self.model.train()
        bar = tqdm(total=self.max_steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True,
                   mininterval=1.0, disable=not dist.is_main)
        vote = distributed.StepVote(dist)  # across ranks: every rank must stop at the same step
        with StopSignal(distributed.cluster_signals()) as stop:
            while True:
                signalled, time_up = vote.read(stop.received is not None, self.time_spent())
                if self.steps_spent() or time_up:
                    break
                if signalled:
                    path = self.checkpoint()
                    raise Interrupted(f"{stop.received or 'a signal to another rank'} at step {self.step}: checkpoint "
                                      f"{path}; resume with: {resume_command(self.out_dir)}", stop)
                started = time.perf_counter()
                self.telemetry.arm(self.step + 1)
                step_loss, extras, grad_norm = self.optimizer_step(stop, vote)
                self.step += 1  # the loss of step `self.step` (1-based), as a non-finite loss's error names it
                self.telemetry.record(self.step, step_loss, grad_norm)
                self.train_seconds += time.perf_counter() - started
                self.window["time"] += time.perf_counter() - started
                self.pending_losses.append((self.step, step_loss, extras))
                self.window["steps"] += 1
                self.cooldowns.branch_if_due(self, stop, vote)  # train.cooldowns: a decay branch, then back
                self.between_steps(grad_norm, bar)
                bar.update(1)
        if self.window["steps"]:  # a time budget ends between log steps: its last window
            self.log_train_point(grad_norm, bar)
        bar.close()

    def steps_spent(self) -> bool:
        """The step budget (train.max_steps, or the steps max_tokens / max_flops buy) is spent."""
        return self.max_steps is not None and self.step >= self.max_steps

    def time_spent(self) -> bool:
        """train.max_seconds of optimizer steps on this rank's clock (under torchrun rank 0's decides for all,
        through distributed.StepVote, one step late)."""
        return self.max_steps is None and self.train_seconds >= self.t.max_seconds

    def optimizer_step(self, stop: StopSignal, vote) -> tuple[torch.Tensor, dict, torch.Tensor]:
        """One optimizer step over grad_accum micro-batches. Returns (the step's mean loss and its extra terms,
        {"aux_loss": MoE balancing, "z_loss": train.z_loss's term} where present, on the device: they are read
        at log steps; the gradient norm before clipping). Under torchrun the
        step's all-reduce also carries this rank's stop and time flags to `vote` (distributed.StepVote)."""
        t, dist, device = self.t, self.dist, self.device
        loss_sum, extras = torch.zeros((), device=device), {}
        for a, loader in enumerate(self.loaders):
            batch = to_device(next(loader), device)
            with distributed.gradient_sync(self.model, sync=a == len(self.loaders) - 1):  # all-reduce once per step
                objective, loss, z = training_loss(self.forward_model, batch, self.autocast, t.get("z_loss", 0.0))
                aux = aux_loss(self.model)  # MoE load balancing: trained, reported apart from the loss
                ((objective if aux is None else objective + aux) / t.grad_accum).backward()
            loss_sum += loss
            for name, term in (("aux_loss", aux), ("z_loss", z)):
                if term is not None:
                    extras[name] = term.detach() + extras.get(name, 0)
        if dist.enabled:  # the mean loss over all ranks' micro-batches, and whether any rank was signalled
            flags = vote.flags(stop.received is not None, self.train_seconds >= (t.max_seconds or float("inf")))
            reduced = distributed.all_reduce_sum(torch.cat([loss_sum[None], flags]), dist)
            loss_sum = reduced[0] / dist.world_size
            vote.record(reduced[1:])
        step_loss = loss_sum / t.grad_accum
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip)
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor
            grad_norm = grad_norm.full_tensor()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return step_loss, {name: term / t.grad_accum for name, term in extras.items()}, grad_norm

    def read_losses(self):
        """Read the pending steps' losses from the device (one transfer) into the window. A non-finite loss
        stops the run naming its step and the window read: the steps after it ran on non-finite weights and
        are not saved (a checkpoint reads first)."""
        if not self.pending_losses:
            return
        started = time.perf_counter()
        steps = [s for s, _, _ in self.pending_losses]
        values = torch.stack([loss for _, loss, _ in self.pending_losses]).tolist()
        extras = [e for _, _, e in self.pending_losses]
        self.pending_losses = []
        waited = time.perf_counter() - started  # the device finishing the window's steps: training time
        self.window["time"] += waited
        self.train_seconds += waited
        for step, value in zip(steps, values):
            if not math.isfinite(value):
                raise FloatingPointError(f"non-finite training loss ({value}) at step {step} (read at step "
                                         f"{steps[-1]}, window {steps[0]}-{steps[-1]}); lower train.lr or check the data")
        self.window["loss"] += sum(values)
        for name in {name for e in extras for name in e}:  # aux_loss, z_loss
            self.window[name] = self.window.get(name, 0.0) + float(torch.stack([e[name] for e in extras if name in e]).sum())

    def between_steps(self, grad_norm, bar):
        """Log the window, evaluate and checkpoint at their intervals."""
        t, step = self.t, self.step
        last = self.steps_spent()  # a time budget's last step is known only after it (StepVote)
        if step % t.log_every == 0 or last:
            self.log_train_point(grad_norm, bar)
        if t.eval_every and step % t.eval_every == 0 and not last:
            self.validate(t.eval_batches)
        if t.checkpoint_every and step % t.checkpoint_every == 0:
            self.checkpoint()

    def read_telemetry(self):
        """The telemetry points since the last read into the curves and results.json (runner/telemetry.py)."""
        waited = self.telemetry.read_into(self.curves, self.results, self.logger)
        self.window["time"] += waited  # the device finishing the window's steps: training time, as in read_losses
        self.train_seconds += waited

    def log_train_point(self, grad_norm, bar):
        self.read_telemetry()  # first: a diverged run keeps it
        self.read_losses()  # waits for the device: the window's last steps end here
        w = self.window
        tok_s = self.tokens_per_step * w["steps"] / max(w["time"], 1e-9)
        point = {"step": self.step, "tokens": self.step * self.tokens_per_step, "loss": w["loss"] / w["steps"],
                 "lr": self.scheduler.get_last_lr()[0], "grad_norm": float(grad_norm), "tokens_per_s": tok_s,
                 "seconds": self.train_seconds}
        if self.peak_flops:
            point["mfu"] = self.flops_per_token * tok_s / self.peak_flops
        for name in ("aux_loss", "z_loss"):
            if name in w:
                point[name] = w[name] / w["steps"]
                w[name] = 0.0
        self.curves["train"].append(point)
        bar.set_postfix(loss=f"{point['loss']:.3f}", tok_s=f"{tok_s:,.0f}")
        progress.info(f"step {self.step}: train loss {point['loss']:.4f}, lr {point['lr']:.3g}, grad norm "
                      f"{point['grad_norm']:.3g}, {tok_s:,.0f} tokens/s")
        if self.logger:
            self.logger.log({f"train/{k}": v for k, v in point.items() if k != "step"}, self.step)
        w.update(time=0.0, loss=0.0, steps=0)

    def validate(self, max_batches) -> dict:
        t, dist = self.t, self.dist
        if dist.enabled:  # each rank its share of the rows; DDP's own module, as its wrapper syncs buffers
            metrics = distributed.evaluate_sharded(distributed.unwrap(self.model), self.data.val, t.batch_size,
                                                   max_batches, dist, self.autocast)
        else:
            metrics = evaluate(self.model, self.data.val_batches(t.batch_size, max_batches), self.device,
                               self.autocast)
        point = {"step": self.step, "tokens": self.step * self.tokens_per_step, "loss": metrics["loss"],
                 "ppl": metrics["ppl"]}
        self.curves["val"].append(point)
        self.results.update(curves=self.curves)
        progress.info(f"step {self.step}: val loss {metrics['loss']:.4f}, ppl {metrics['ppl']:.2f}")
        if self.logger:
            self.logger.log({"val/loss": metrics["loss"], "val/ppl": metrics["ppl"]}, self.step)
        return metrics

    def checkpoint(self):
        self.read_telemetry()  # the spike windows saved below hold every step up to this one
        self.read_losses()  # a non-finite loss stops the run before its weights are saved
        model_state, optimizer_state = distributed.full_state_dicts(self.model, self.optimizer)  # every rank
        if not self.dist.is_main:
            return None
        state = {"model": model_state, "optimizer": optimizer_state, "scheduler": self.scheduler.state_dict(),
                 "loader": self.loaders[0].state_dict(), "rng": rng_state(), "step": self.step, "curves": self.curves,
                 "log_window": dict(self.window), "overrides": task_overrides(), "train_seconds": self.train_seconds,
                 "telemetry": self.telemetry.state_dict()}
        return save_checkpoint(self.out_dir, self.step, state)

    # -- wrap-up ----------------------------------------------------------------------------------------------
    def wrap_up(self):
        """The final weights checkpointed (for task=generate/eval, and a longer run that resumes), then the
        final evaluation over final_eval_batches and the run's metrics."""
        t = self.t
        if t.checkpoint_every and self.step % t.checkpoint_every:
            self.checkpoint()
        if self.dist.is_main:
            log.info(f"final evaluation over {'all' if t.final_eval_batches is None else t.final_eval_batches} "
                     f"validation batches")
        final = self.validate(t.final_eval_batches)
        throughput = _median_throughput(self.curves["train"])
        metrics = {
            "val_loss": final["loss"], "val_ppl": final["ppl"], "val_tokens": final["tokens"],
            "final_train_loss": self.curves["train"][-1]["loss"],
            "train_tokens_per_s": throughput,
            **spent(self.step, self.tokens_per_step, self.flops_per_token, self.train_seconds),
            "mfu": (throughput * self.flops_per_token / self.peak_flops) if self.peak_flops and throughput else None,
            **self.cooldowns.metrics(self.curves),
        }
        # what each layer's attention ran (model.attention.kernel=auto decides per call; the final evaluation's
        # forward is uncompiled and sees the same packed rows as training)
        kernels = [getattr(m, "ran", None) or getattr(m, "kernel", None)
                   for m in distributed.unwrap(self.model).attention_modules()]
        self.results.update(metrics=metrics, curves=self.curves, attention_kernels=kernels,
                            **machine_load())  # the load while it trained


def checkpoint_blocks(model: nn.Module):
    """train.activation_checkpointing: each block's activations are recomputed in the backward pass instead
    of kept (torch.utils.checkpoint, non-reentrant): memory per layer drops to its input, for ~1/3 more
    compute. The blocks' forward is wrapped in place, so parameter names and checkpoints are unchanged."""
    from torch.utils.checkpoint import checkpoint

    for block in model.blocks:
        forward = block.forward
        block.forward = lambda *args, _forward=forward: checkpoint(_forward, *args, use_reentrant=False)


def benchmark_trained_model(trainer: Trainer):
    """train.bench: the benchmark suite on the trained weights (rank 0; not under FSDP, whose weights are
    sharded: task=bench on the checkpoint measures them)."""
    dist = trainer.dist
    if dist.mode == "fsdp" and dist.enabled:
        if dist.is_main:
            log.info("train.bench: skipped under FSDP (the weights are sharded); run task=bench on the checkpoint")
        return
    if dist.is_main:  # one replica is enough (DDP's module)
        from runner.bench import run_suite
        log.info("benchmark of the trained model (train.bench=false skips it)")
        bench = run_suite(distributed.unwrap(trainer.model), trainer.cfg, device=trainer.device,
                          metrics=trainer.results.data["metrics"])
        trainer.results.update(bench=bench)


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
        ("variant", " ".join(f"{k}={v[k]}" for k in PART_FAMILIES if v.get(k) is not None)),
        ("parameters", f"{record['params']:,}" if record.get("params") else None),
        ("final train loss", _fmt(m.get("final_train_loss"))),
        ("val loss / ppl", f"{_fmt(m.get('val_loss'))} / {_fmt(m.get('val_ppl'), 2)}  "
                           f"({m.get('val_tokens', 0):,} tokens)" if m.get("val_loss") is not None else None),
        ("train tokens/s", f"{m['train_tokens_per_s']:,.0f}" if m.get("train_tokens_per_s") else None),
        ("decode tokens/s", f"{b['decode_tokens_per_s']:,.0f} with KV cache, {b['decode_tokens_per_s_no_cache']:,.0f} "
                            f"without ({b['kv_cache_speedup']:.1f}x)" if b.get("kv_cache_speedup") else None),
        ("peak memory", format_bytes(b["peak_memory_bytes"]) if b.get("peak_memory_bytes") else None),
        ("warning", busy_machine_warning(record) and busy_machine_warning(record).removeprefix("warning: ")),
        ("results", str(record.get("output_dir", "")) + "/results.json"),
    ]
    if record.get("error"):
        rows.insert(1, ("error", f"{record['error']['type']}: {record['error']['message']}"))
    width = max(len(k) for k, _ in rows)
    print("\n" + "\n".join(f"{k:<{width}}  {val}" for k, val in rows if val is not None))


def _fmt(x, digits=4):
    return None if x is None else f"{x:.{digits}f}"
