"""This project's `model=gpt2` against nanoGPT (karpathy/nanoGPT, checked out beside it) at nanoGPT's CPU
reference config, on one character-level text, with the same train/validation split and the same batches.

    python -m runner.bench.nanogpt --nanogpt ../nanoGPT                  # the built-in corpus' text
    python -m runner.bench.nanogpt --nanogpt ../nanoGPT --text input.txt --steps 500 --rounds 5
    python -m runner.bench.nanogpt --nanogpt ../nanoGPT --profile        # where each step's time goes
    python -m runner.bench.nanogpt --nanogpt ../nanoGPT --override train.compile=true   # our side compiled
    python -m runner.bench.nanogpt --nanogpt ../nanoGPT --override train.compile=true --nanogpt-compile  # both

nanoGPT's README, "I only have a macbook": 4 layers, 4 heads, n_embd 128, block 64, batch 12, dropout 0, with
train_shakespeare_char's lr 1e-3 decaying to min_lr 1e-4, beta2 0.99, warm-up 100, weight decay 0.1, grad clip 1.
Our side is composed by Hydra from conf/ (model=gpt2 plus the matching overrides) and trained with the
project's own model builder, optimizer groups, LR schedule, batch transfer and loss (runner.train,
runner.compute; `train.compile` and `train.dtype` as the Trainer applies them), so it measures what
`python run.py` trains (a compiled side compiles in its first step: the median step time leaves it out).
nanoGPT's side uses its model.py, configure_optimizers and train.py's get_lr, as its train.py does; its CPU
reference config runs eager (`--compile=False`), and `--nanogpt-compile` applies train.py's `torch.compile(model)`.

The two train step by step in alternation (the order flipping every step), so a busy machine slows both alike:
only the per-round ratio of median step times means anything there. Validation loss is the
mean next-character NLL over every validation character (non-overlapping windows of block_size, one code
path for both models).
"""
import argparse
import importlib
import json
import math
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

from runner.build import build_model
from runner.compute import autocast_dtype, batch_loss, compile_model, resolve_compile, to_device
from runner.optim import build_optimizer
from runner.schedule import build_schedule

REFERENCE = dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12, lr=1e-3, min_lr=1e-4, beta1=0.9,
                 beta2=0.99, warmup=100, weight_decay=0.1, grad_clip=1.0, dropout=0.0)
DEFAULT_TEXT_CHARS = 1_100_000  # about tiny Shakespeare's size


def builtin_text(chars: int = DEFAULT_TEXT_CHARS) -> str:
    """The start of the built-in corpus (the running Python's standard library, files in path order)."""
    import sysconfig

    from runner.data.corpus import stdlib_documents
    parts, total = [], 0
    for _, source in stdlib_documents(Path(sysconfig.get_paths()["stdlib"])):
        parts.append(source)
        total += len(source)
        if total >= chars:
            break
    return "".join(parts)[:chars]


def char_splits(text: str):
    """nanoGPT's shakespeare_char/prepare.py: a vocabulary of the text's sorted characters, 90% / 10%."""
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    data = torch.tensor([stoi[c] for c in text], dtype=torch.long)
    n = int(0.9 * len(data))
    return data[:n], data[n:], len(chars)


def batches(train, block: int, batch_size: int, steps: int, seed: int = 1337):
    """nanoGPT's get_batch (random windows), drawn once so that both models see the same batches."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        ix = torch.randint(len(train) - block, (batch_size,), generator=g)
        x = torch.stack([train[i:i + block] for i in ix])
        y = torch.stack([train[i + 1:i + 1 + block] for i in ix])
        yield x, y


# -- nanoGPT's side: its model.py, configure_optimizers and train.py's schedule --------------------------------
class NanoGPTSide:
    name = "nanoGPT"

    def __init__(self, nanogpt_dir: Path, vocab_size: int, steps: int, seed: int, compile: bool = False):
        sys.path.insert(0, str(nanogpt_dir))
        try:
            nano = importlib.import_module("model")
        finally:
            sys.path.pop(0)
        r = REFERENCE
        torch.manual_seed(seed)
        self.model = nano.GPT(nano.GPTConfig(block_size=r["block_size"], vocab_size=vocab_size, n_layer=r["n_layer"],
                                             n_head=r["n_head"], n_embd=r["n_embd"], dropout=r["dropout"]))
        self.optimizer = self.model.configure_optimizers(r["weight_decay"], r["lr"], (r["beta1"], r["beta2"]), "cpu")
        self.forward_model = torch.compile(self.model) if compile else self.model  # train.py's compile=True
        self.steps, self.it = steps, 0

    def lr(self, it: int) -> float:  # nanoGPT train.py's get_lr, lr_decay_iters = max_iters
        r = REFERENCE
        if it < r["warmup"]:
            return r["lr"] * (it + 1) / (r["warmup"] + 1)
        ratio = min(1.0, (it - r["warmup"]) / max(1, self.steps - r["warmup"]))
        return r["min_lr"] + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (r["lr"] - r["min_lr"])

    def step(self, x, y) -> torch.Tensor:
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr(self.it)
        _, loss = self.forward_model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), REFERENCE["grad_clip"])
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.it += 1
        return loss.detach()

    def logits(self, x):
        return self.model(x, x)[0]  # with targets, nanoGPT returns every position's logits


# -- our side: the config run.py composes, the Trainer's optimizer, schedule and loss ----------------------------
def our_overrides(vocab_size: int, steps: int) -> list[str]:
    r = REFERENCE
    return ["model=gpt2", f"model.vocab_size={vocab_size}", f"data.seq_len={r['block_size']}",
            f"model.d_model={r['n_embd']}", f"model.n_layers={r['n_layer']}", f"model.n_heads={r['n_head']}",
            "model.attention.bias=true", "model.ffn.bias=true", f"model.dropout={r['dropout']}",  # nanoGPT's bias=True
            f"train.batch_size={r['batch_size']}", f"train.lr={r['lr']}", f"train.min_lr_ratio={r['min_lr'] / r['lr']}",
            f"train.betas=[{r['beta1']},{r['beta2']}]", f"train.warmup_steps={r['warmup']}",
            f"train.weight_decay={r['weight_decay']}", f"train.grad_clip={r['grad_clip']}", f"train.max_steps={steps}"]


def compose_config(overrides: list[str]):
    from hydra import compose, initialize_config_dir
    conf = Path(__file__).resolve().parents[2] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        return compose("config", overrides=overrides)


class OurSide:
    name = "ours"

    def __init__(self, vocab_size: int, steps: int, seed: int, extra_overrides=()):
        self.cfg = compose_config(our_overrides(vocab_size, steps) + list(extra_overrides))
        t = self.cfg.train
        torch.manual_seed(seed)
        self.model = build_model(self.cfg.model).train()
        cpu = torch.device("cpu")
        self.dtype = autocast_dtype(t.dtype, cpu)  # train.dtype=bfloat16: autocast, as the Trainer does
        self.forward_model = compile_model(self.model, cpu) if resolve_compile(t.compile, cpu) else self.model
        self.optimizer = build_optimizer(t, self.model, cpu)  # the Trainer's
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, build_schedule(t, t.max_steps))
        self.grad_clip = t.grad_clip

    def step(self, x, y) -> torch.Tensor:
        B, T = x.shape  # a loader's batch: one document per window, positions from 0
        batch = {"input_ids": x, "labels": y, "position_ids": torch.arange(T).expand(B, T),
                 "document_ids": torch.zeros(B, T, dtype=torch.long)}
        loss = batch_loss(self.forward_model, to_device(batch, torch.device("cpu")), dtype=self.dtype)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def logits(self, x):
        return self.model(x)


@torch.no_grad()
def validation_nll(side, val, block: int, batch_size: int = 64) -> float:
    """Mean NLL (nats) of every validation character after the first, in non-overlapping windows of `block`."""
    side.model.eval()
    starts = list(range(0, len(val) - 1, block))
    full = [s for s in starts if s + block < len(val)]
    groups = [full[i:i + batch_size] for i in range(0, len(full), batch_size)]
    groups += [[s] for s in starts if s + block >= len(val)]  # the shorter last window, alone
    total, count = 0.0, 0
    for group in groups:
        n = min(block, len(val) - 1 - group[0])
        x = torch.stack([val[s:s + n] for s in group])
        y = torch.stack([val[s + 1:s + 1 + n] for s in group])
        logits = side.logits(x)
        total += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum").item()
        count += y.numel()
    side.model.train()
    return total / count


def run_rounds(sides, all_batches, rounds: int) -> list[dict]:
    """The steps split into `rounds`; within a round the two sides alternate step by step (the order flipping
    every step), so a load that comes and goes slows both alike. Each side's median step time per round."""
    per_round = len(all_batches) // rounds
    results = []
    for r in range(rounds):
        seconds = {side.name: [] for side in sides}
        for i, (x, y) in enumerate(all_batches[r * per_round:(r + 1) * per_round]):
            for side in (sides if i % 2 == 0 else sides[::-1]):
                start = time.perf_counter()
                side.step(x, y)
                seconds[side.name].append(time.perf_counter() - start)
        times = {name: statistics.median(s) for name, s in seconds.items()}
        results.append(times)
        print(f"round {r + 1}/{rounds}: median step ours {times['ours'] * 1e3:.2f} ms, nanoGPT "
              f"{times['nanoGPT'] * 1e3:.2f} ms, tokens/s ratio {times['nanoGPT'] / times['ours']:.3f}", flush=True)
    return results


def profile(sides, all_batches, steps: int = 20, rows: int = 25):
    """torch.profiler over `steps` training steps of each side (after a few warm-up steps)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile
    for side in sides:
        for x, y in all_batches[:5]:
            side.step(x, y)
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for x, y in all_batches[5:5 + steps]:
                side.step(x, y)
        print(f"\n=== {side.name}: {steps} steps ===")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nanogpt", required=True, type=Path, help="a nanoGPT checkout (its model.py is imported)")
    p.add_argument("--text", type=Path, help="a text file (default: the built-in corpus' first ~1.1M characters)")
    p.add_argument("--steps", type=int, default=500, help="training steps per side (the LR schedule's length)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds the steps are split into")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--profile", action="store_true", help="profile 20 steps of each side instead of training")
    p.add_argument("--json", type=Path, help="write the result here as JSON")
    p.add_argument("--override", action="append", default=[], help="an extra Hydra override for our side")
    p.add_argument("--nanogpt-compile", action="store_true",
                   help="compile nanoGPT's model as its train.py does with compile=True (its CPU config does not)")
    args = p.parse_args(argv)
    if not (args.nanogpt / "model.py").is_file():
        p.error(f"--nanogpt {args.nanogpt}: no model.py there (clone https://github.com/karpathy/nanoGPT)")
    if args.threads:
        torch.set_num_threads(args.threads)
    text = args.text.read_text(encoding="utf-8") if args.text else builtin_text()
    train, val, vocab = char_splits(text)
    r = REFERENCE
    all_batches = list(batches(train, r["block_size"], r["batch_size"], args.steps, args.seed))
    sides = [OurSide(vocab, args.steps, args.seed, args.override),
             NanoGPTSide(args.nanogpt, vocab, args.steps, args.seed, args.nanogpt_compile)]
    print(f"{len(text):,} characters, vocabulary {vocab}; {args.steps} steps of {r['batch_size']} x {r['block_size']}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    if args.profile:
        profile(sides, all_batches)
        return None
    rounds = run_rounds(sides, all_batches, args.rounds)
    ratios = [t["nanoGPT"] / t["ours"] for t in rounds]
    losses = {side.name: validation_nll(side, val, r["block_size"]) for side in sides}
    result = {
        "tokens_per_s_ratio_median": statistics.median(ratios), "tokens_per_s_ratio_min": min(ratios),
        "tokens_per_s_ratio_max": max(ratios), "ratios": ratios,
        "step_ms": {name: statistics.median(t[name] for t in rounds) * 1e3 for name in ("ours", "nanoGPT")},
        "val_nll": losses, "overrides": args.override, "nanogpt_compiled": args.nanogpt_compile, "seed": args.seed,
        "steps": args.steps, "rounds": args.rounds,
        "characters": len(text), "vocab": vocab,
        "text": str(args.text) if args.text else "built-in corpus (stdlib)", "torch": torch.__version__,
        "threads": torch.get_num_threads(), "machine": platform.platform(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
    }
    print(f"tokens/s ours / nanoGPT: median {result['tokens_per_s_ratio_median']:.3f} "
          f"(rounds {min(ratios):.3f}-{max(ratios):.3f}); validation NLL ours {losses['ours']:.4f}, "
          f"nanoGPT {losses['nanoGPT']:.4f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
