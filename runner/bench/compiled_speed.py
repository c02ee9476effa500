"""The README's compiled-decoding figures: greedy generate() eager vs compiled vs transformers' generate, with
interleaved repeats (medians and spread), training-step tokens/s eager vs compiled, and the peak memory of one
training step with the chunked loss vs whole-batch logits (each in its own process: ru_maxrss only grows).

    python -m runner.bench.compiled_speed decode      # the decode table and the training rates
    python -m runner.bench.compiled_speed train       # the training rates alone
    python -m runner.bench.compiled_speed chunked     # peak RSS of one step, chunked LM head + cross-entropy
    python -m runner.bench.compiled_speed full        # the same with whole-batch float32 logits
    python -m runner.bench.compiled_speed fusion      # decode tokens/s with q/k/v and gate/up fused vs separate
"""
import json
import resource
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch

from runner.generate import generate
from variants import Attention, TransformerLM

def default_preset():
    """The default preset's shape (gqa_rope: d 128, 4 layers, 4 heads / 2 KV heads, vocab 4096)."""
    return TransformerLM(4096, 128, 4, 4, 256, attention=partial(Attention, n_kv_heads=2))

def timeit(fn, n):
    t = time.perf_counter(); fn(); return n / (time.perf_counter() - t)

def decode_table(name, model, hf=None, new=100, repeats=5):
    prompt = torch.randint(1, model.vocab_size, (16,), generator=torch.Generator().manual_seed(0)).tolist()
    t0 = time.perf_counter(); generate(model, prompt, max_new_tokens=new, compile=True); warm = time.perf_counter() - t0
    generate(model, prompt, max_new_tokens=new)
    runs = {"eager": lambda: generate(model, prompt, max_new_tokens=new),
            "compiled": lambda: generate(model, prompt, max_new_tokens=new, compile=True)}
    if hf is not None:
        ids = torch.tensor([prompt])
        kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new, min_new_tokens=new, pad_token_id=0)
        hf.generate(ids, **kw)
        runs["transformers"] = lambda: hf.generate(ids, **kw)
    out = {k: [] for k in runs}
    with torch.no_grad():  # generate's own mode: the compiled graphs' grad-mode guard holds
        for _ in range(repeats):
            for k, fn in runs.items():
                out[k].append(timeit(fn, new))
    row = {k: statistics.median(v) for k, v in out.items()}
    row.update(name=name, params=model.num_params(), compile_warmup_s=round(warm, 1),
               spread={k: [round(min(v)), round(max(v))] for k, v in out.items()})
    print(json.dumps(row), flush=True)
    return row

def train_rates(model, repeats=7, steps=10, B=16, T=128):
    """Training tokens/s eager, compiled as train.compile=true compiles on a CPU (inductor's C++ wrapper), and
    compiled with inductor's default Python wrapper, the three interleaved in each repeat."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    from runner.compute import compile_model, next_token_loss
    models = {"eager": model, "compiled": compile_model(model, "cpu"), "compiled_python_wrapper": torch.compile(model)}
    def step(m):
        ids = torch.randint(0, model.vocab_size, (B, T))
        loss = next_token_loss(m, ids, ids); loss.backward(); opt.step(); opt.zero_grad()
    warm = {}
    for k, m in models.items():
        t0 = time.perf_counter(); step(m); warm[k] = round(time.perf_counter() - t0, 1)
    out = {k: [] for k in models}
    for _ in range(repeats):
        for k, m in models.items():
            out[k].append(timeit(lambda: [step(m) for _ in range(steps)], steps * B * T))
    row = {k: statistics.median(v) for k, v in out.items()}
    row.update(first_step_s=warm, spread={k: [round(min(v)), round(max(v))] for k, v in out.items()})
    print(json.dumps({"train": row}), flush=True)

def fusion_table(name, model, new=64, repeats=7):
    """Greedy generate() of the same weights with separate and fused projections (variants/fusion.py),
    eager and compiled, the four interleaved in each repeat."""
    import copy
    fused = copy.deepcopy(model)
    groups = fused.fuse_projections()
    prompt = torch.randint(1, model.vocab_size, (16,), generator=torch.Generator().manual_seed(0)).tolist()
    runs = {f"{kind}_{mode}": partial(generate, m, prompt, max_new_tokens=new, compile=mode == "compiled")
            for kind, m in (("separate", model), ("fused", fused)) for mode in ("eager", "compiled")}
    with torch.no_grad():
        for fn in runs.values():  # compile and warm up
            fn()
        assert runs["fused_eager"]() == runs["separate_eager"]()  # the same tokens
        out = {k: [] for k in runs}
        for _ in range(repeats):
            for k, fn in runs.items():
                out[k].append(timeit(fn, new))
    row = {k: round(statistics.median(v)) for k, v in out.items()}
    row.update(name=name, params=model.num_params(), fused_groups=groups,
               fused_over_separate={mode: round(row[f"fused_{mode}"] / row[f"separate_{mode}"], 3)
                                    for mode in ("eager", "compiled")},
               spread={k: [round(min(v)), round(max(v))] for k, v in out.items()})
    print(json.dumps(row), flush=True)
    return row


if __name__ == "__main__":
    torch.manual_seed(0)
    what = sys.argv[1]
    if what == "decode":
        from runner.bench.reference import build_reference
        default = default_preset().eval()
        decode_table("default preset (gqa_rope, vocab 4096)", default)
        from hydra import compose, initialize_config_dir
        from runner.build import build_model
        for vocab in (4096, 32064):
            with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[2] / "conf"), version_base="1.3"):
                cfg = compose("config", overrides=["model=phi3", f"model.vocab_size={vocab}"])
            m = build_model(cfg.model, torch.device("cpu")).eval()
            decode_table(f"phi3 preset, vocab {vocab}", m, build_reference(m, torch.float32, "cpu"))
        train_rates(default_preset().train())
    elif what == "train":
        train_rates(default_preset().train())
    elif what == "fusion":
        fusion_table("default preset shape (gqa_rope, d 128, 4 layers, vocab 4096)",
                     default_preset().eval())
        fusion_table("wider (MHA, d 1024, 4 layers, vocab 4096)", TransformerLM(4096, 1024, 4, 16, 256).eval())
    else:  # memory: one training step at vocab 32064, 2 x 1024 tokens; chunked (default) or full logits
        import runner.compute as compute
        model = TransformerLM(32064, 128, 4, 4, 1024, attention=partial(Attention, n_kv_heads=2)).train()
        if what == "full":
            compute._chunkable_model = lambda m: None
        ids = torch.randint(0, 32064, (2, 1024))
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        compute.next_token_loss(model, ids, ids).backward()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({"loss": what, "peak_rss_mib": peak / 1024, "above_start_mib": (peak - base) / 1024}))
