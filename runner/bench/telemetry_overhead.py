"""The README's telemetry overhead: training tokens/s of the default model and batch with train.telemetry off, at
its default cadence (every log_every = 10 steps) and at every step, in interleaved blocks of steps (so a busy
machine's load shifts all three alike), reported as medians with their spread.

    python -m runner.bench.telemetry_overhead                 # the default preset, train/default.yaml's batch
    python -m runner.bench.telemetry_overhead --repeats 7 --steps 20 model.n_layers=2   # Hydra overrides after

Each block is `steps` optimizer steps as the Trainer takes them (forward with the chunked loss, backward,
clipping, AdamW), with telemetry's calls around each step and its read at every log_every-th step; the first
block of each setting is a warm-up and is not counted.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from omegaconf import open_dict

from runner import telemetry
from runner.build import build_model
from runner.compute import training_loss

SETTINGS = {"off": False, "default": {}, "every step": {"every": 1}}


class Null:
    """Stands in for results.json and the logger: the benchmark keeps nothing."""

    def update(self, **fields):
        pass

    def __bool__(self):
        return False


def compose(overrides):
    from hydra import compose as hydra_compose, initialize_config_dir
    conf = Path(__file__).resolve().parents[2] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides))


def trainer_parts(cfg, setting):
    """A fresh model, optimizer and telemetry for one setting, seeded alike."""
    torch.manual_seed(0)
    model = build_model(cfg.model, "cpu").train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, betas=tuple(cfg.train.betas))
    return model, optimizer, telemetry.build(setting, model, optimizer, cfg.train.log_every)


def block(parts, batch, cfg, first_step, steps) -> float:
    """`steps` training steps from step `first_step`; their tokens/s."""
    model, optimizer, probe = parts
    t, curves = cfg.train, {}
    started = time.perf_counter()
    for step in range(first_step, first_step + steps):
        probe.arm(step)
        objective, loss, _ = training_loss(model, batch)
        objective.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        probe.record(step, loss, grad_norm)
        if step % t.log_every == 0:
            probe.read_into(curves, Null(), Null())
            float(loss)  # the Trainer reads its losses here too
    return steps * batch["input_ids"].numel() / (time.perf_counter() - started)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20, help="steps per block (a multiple of log_every is fair)")
    args, overrides = parser.parse_known_args(argv)
    cfg = compose(overrides)
    with open_dict(cfg):
        cfg.model.vocab_size = cfg.model.get("vocab_size") or cfg.tokenizer.vocab_size
        cfg.model.max_seq_len = max(cfg.model.max_seq_len, cfg.data.seq_len)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.model.vocab_size, (cfg.train.batch_size, cfg.data.seq_len + 1), generator=gen)
    batch = {"input_ids": ids[:, :-1].contiguous(), "labels": ids[:, 1:].contiguous()}
    parts = {name: trainer_parts(cfg, setting) for name, setting in SETTINGS.items()}
    rates, step = {name: [] for name in SETTINGS}, {name: 1 for name in SETTINGS}
    for repeat in range(args.repeats + 1):  # interleaved; the first round warms up
        for name in SETTINGS:
            rate = block(parts[name], batch, cfg, step[name], args.steps)
            step[name] += args.steps
            if repeat:
                rates[name].append(rate)
    off = statistics.median(rates["off"])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; batch {cfg.train.batch_size} x "
          f"{cfg.data.seq_len}, {sum(p.numel() for p in parts['off'][0].parameters()):,} parameters; "
          f"{args.repeats} x {args.steps} steps per setting")
    print(f"{'telemetry':<12} {'tokens/s (median)':>18} {'min-max':>16} {'vs off':>8}")
    for name, values in rates.items():
        median = statistics.median(values)
        print(f"{name:<12} {median:>18,.0f} {min(values):>7,.0f}-{max(values):<8,.0f} {median / off - 1:>+8.1%}")


if __name__ == "__main__":
    main(sys.argv[1:])
