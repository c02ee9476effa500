"""One training run over many processes, with PyTorch's own parts: DistributedDataParallel and FSDP2.

    torchrun --nproc_per_node=8 run.py train.distributed=ddp     # or fsdp; one process per GPU

torchrun (or a multi-task submitit/SLURM job) starts one process per GPU and sets RANK, LOCAL_RANK and
WORLD_SIZE; `setup` turns them into a process group (NCCL for CUDA tensors, gloo for CPU ones) and a
device, `wrap` wraps the model, and the rest are the few collectives the training loop needs. Every rank
runs the same loop; only rank 0 writes results.json, checkpoints and W&B.

Checkpoints are full (unsharded) state dicts gathered to rank 0 through torch.distributed.checkpoint's
get/set_*_state_dict, with parameter names as keys: one file, loaded by rank 0 and broadcast. With the data
loader's position counted in steps (runner/train.py), a run saved on N ranks resumes on N ranks, or on any
number that divides the batch, or in one process.
"""
import math
import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

MODES = ("none", "ddp", "fsdp")


@dataclass
class Dist:
    """Where this process stands in the run. world_size == 1 means a plain single-process run."""
    mode: str = "none"
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    wait_group: object = None  # a gloo group with a long timeout, for waiting on rank 0's data build

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def export_submitit_env() -> None:
    """In a submitit job with several tasks (one per GPU, hydra.launcher.tasks_per_node), SLURM numbers
    the tasks; export them as torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT)."""
    if "RANK" in os.environ or not os.environ.get("SUBMITIT_EXECUTOR"):
        return
    import submitit
    if submitit.JobEnvironment().num_tasks > 1:
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def process_rank() -> int:
    """This process's global rank (0 outside torchrun), known before any process group exists."""
    export_submitit_env()
    return int(os.environ.get("RANK", 0))


def init_process_group() -> None:
    """Join the run's process group from torchrun's variables (env://), once. With CUDA the group has NCCL
    for CUDA tensors and gloo for CPU ones, so small CPU objects (a timestamp, a path) can be broadcast too."""
    if dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
        dist.init_process_group("cpu:gloo,cuda:nccl")
    else:
        dist.init_process_group("gloo")


def setup(mode: str, device: str = "auto", wait_timeout_s: float = 7200) -> Dist:
    """The process group and this rank's device, from torchrun's environment and train.distributed.

    train.distributed=ddp|fsdp in a single process (no torchrun) runs as a plain single-process job, with a
    notice; several processes with train.distributed=none is an error (each would train its own copy).
    """
    if mode not in MODES:
        raise ValueError(f"train.distributed={mode!r} must be one of {MODES}")
    export_submitit_env()
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size > 1 and mode == "none":
        raise RuntimeError(f"{world_size} processes were launched (WORLD_SIZE={world_size}) but "
                           f"train.distributed=none: set train.distributed=ddp or fsdp, or launch one process")
    if world_size <= 1:
        if mode != "none":
            print(f"train.distributed={mode}: one process (not launched by torchrun with WORLD_SIZE > 1); "
                  f"training without {mode.upper()}")
        from runner.build import resolve_device
        return Dist(device=resolve_device(device))

    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0))
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is visible")
    if device in ("auto", "cuda") and torch.cuda.is_available():
        # one GPU per process; local_rank modulo the count also covers clusters that bind one GPU per task
        torch_device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(torch_device)
    else:
        torch_device = torch.device(device if device != "auto" else "cpu")
    init_process_group()
    # NCCL's collectives time out after 10 minutes: too short for rank 0 tokenizing a large corpus while the
    # others wait. They wait in a barrier of their own gloo group instead (wait_for_main), whose timeout is
    # train.data_wait_timeout_s; training's collectives keep NCCL's default, which catches real hangs.
    wait_group = dist.new_group(backend="gloo", timeout=timedelta(seconds=wait_timeout_s))
    return Dist(mode, rank, local_rank, world_size, torch_device, wait_group)


def wrap(model: nn.Module, d: Dist, compute_dtype: torch.dtype | None = None) -> nn.Module:
    """DDP: a full replica per rank, gradients all-reduced in backward. FSDP2: parameters sharded across
    ranks, one all-gather per transformer block (then the root for embeddings, final norm and head).
    compute_dtype (train.dtype's autocast dtype, bf16 on CUDA): FSDP2 all-gathers the parameters in it and
    reduce-scatters gradients in float32 (without a policy both would move float32, twice the bytes)."""
    if not d.enabled:
        return model
    if d.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel
        return DistributedDataParallel(model, device_ids=[d.device.index] if d.device.type == "cuda" else None)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32 if compute_dtype else None)
    for block in model.blocks:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The model itself (DDP keeps it as .module; FSDP2 shards it in place)."""
    return getattr(model, "module", model)


@contextmanager
def gradient_sync(model: nn.Module, sync: bool):
    """Skip the gradient all-reduce / reduce-scatter on micro-steps that are not the last of a step."""
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(sync)
    with model.no_sync() if isinstance(model, DistributedDataParallel) and not sync else nullcontext():
        yield


def all_reduce_sum(values: torch.Tensor, d: Dist) -> torch.Tensor:
    """Sum over ranks (gloo has no AVG); a no-op in one process."""
    if d.enabled:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def broadcast(obj, d: Dist):
    """Rank 0's picklable `obj`, on every rank."""
    if not d.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=torch.device("cpu"))
    return box[0]


def wait_for_main(d: Dist) -> None:
    """A barrier that rank 0 reaches after a long job of its own (building the data cache): on the gloo
    wait group, so it lasts up to train.data_wait_timeout_s instead of NCCL's 10 minutes."""
    if d.enabled:
        dist.barrier(group=d.wait_group)


class StepVote:
    """What every rank must agree on before a step, without a host sync per step: whether any rank was
    signalled (Ctrl-C, SIGTERM, SLURM's warning) and whether rank 0's clock has spent train.max_seconds.
    Each step adds both flags to its loss all-reduce (`flags`, a device tensor), and the sums are read one
    step later (`read`), when the device has finished that step. Every rank reads the same step's sums, so all
    stop at the same step (checkpointing is collective), one step after the signal or the time budget.
    One process: its own signal and clock, at once."""

    def __init__(self, d: Dist):
        self.d, self.pending = d, []

    def flags(self, received: bool, time_up: bool) -> torch.Tensor:
        """(2,): this rank's signal flag and, from rank 0 only, its time-budget flag."""
        # made on the device (fills, not a host-to-device copy, which would wait for the queue)
        return torch.stack([(torch.ones if on else torch.zeros)((), device=self.d.device)
                            for on in (received, time_up and self.d.is_main)])

    def record(self, reduced_flags: torch.Tensor) -> None:
        self.pending.append(reduced_flags)

    def read(self, received: bool, time_up: bool) -> tuple[bool, bool]:
        """(any rank signalled, rank 0's time budget spent)."""
        if not self.d.enabled:
            return received, time_up
        if len(self.pending) < 2:  # the last step's sums may still be in flight: read the one before it
            return False, False
        signalled, spent = self.pending.pop(0).tolist()
        return signalled > 0, spent > 0


def close(d: Dist, ok: bool) -> None:
    """Leave the process group. On success wait for every rank first (rank 0 may still be writing, and a
    gloo peer that leaves early can abort the others); after a failure, leave at once: torchrun stops the
    remaining ranks."""
    if not dist.is_initialized():
        return
    if ok:
        dist.barrier()
    dist.destroy_process_group()


# --------------------------------------------------------------------------------------------- checkpoints

def full_state_dicts(model: nn.Module, optimizer) -> tuple[dict, dict]:
    """Unsharded model and optimizer state keyed by parameter name, on rank 0's CPU (a collective under
    FSDP: every rank calls it; ranks other than 0 get empty dicts)."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    options = StateDictOptions(full_state_dict=True, cpu_offload=dist.is_initialized())
    return get_model_state_dict(model, options=options), get_optimizer_state_dict(model, optimizer, options=options)


def load_full_state_dicts(model: nn.Module, optimizer, model_state: dict, optimizer_state: dict, d: Dist) -> None:
    """The inverse of full_state_dicts: rank 0 holds the loaded file, the others pass empty dicts and
    receive their part (their shard under FSDP) by broadcast."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=d.enabled)
    set_model_state_dict(model, model_state, options=options)
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)


# --------------------------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate_sharded(model: nn.Module, split, batch_size: int, max_batches: int | None, d: Dist,
                     autocast_dtype=None) -> dict:
    """Perplexity over the same rows one process would read (the first max_batches x batch_size), each rank
    taking every world_size-th row; (nll sum, target count) is summed over ranks, so the result equals the
    single-process one up to summation order. Every rank runs the same number of forward passes (FSDP
    all-gathers in each): a rank whose share is shorter runs its first batch again with no targets."""
    from runner.compute import IGNORE, batch_loss
    from runner.data import iter_eval_batches
    local = max(1, batch_size // d.world_size)
    batches = list(iter_eval_batches(split, local, max_batches, rank=d.rank, world_size=d.world_size))
    n_max = _all_max(len(batches), d)
    was_training = model.training
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=d.device)  # (nll sum, real targets)
    if len(batches) < n_max:  # a filler: any row, no targets
        row = batches[0] if batches else next(iter_eval_batches(split, 1, 1))
        batches += [{**row, "labels": torch.full_like(row["labels"], -100)}] * (n_max - len(batches))
    for batch in batches:
        batch = {k: v.to(d.device, non_blocking=True) for k, v in batch.items()}
        totals[0] += batch_loss(model, batch, reduction="sum", dtype=autocast_dtype).double()
        totals[1] += (batch["labels"] != IGNORE).sum()
    model.train(was_training)
    nll, tokens = all_reduce_sum(totals, d).tolist()
    if tokens == 0:
        raise ValueError("validation split has no real targets: is the corpus too small for data.seq_len?")
    loss = nll / tokens
    return {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "tokens": int(tokens)}


def _all_max(value: int, d: Dist) -> int:
    if not d.enabled:
        return value
    t = torch.tensor([value], device=d.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


# ------------------------------------------------------------------------------------------------ signals

def cluster_signals() -> list:
    """The signal a submitit job receives before its time limit or on preemption (USR2 unless
    SUBMITIT_PREEMPT_SIGNAL says otherwise): the trainer checkpoints on it, then hands it to submitit,
    which requeues the job."""
    if not os.environ.get("SUBMITIT_EXECUTOR"):
        return []
    import signal
    sig = getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"), None)
    return [sig] if sig is not None else []
