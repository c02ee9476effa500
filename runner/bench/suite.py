"""`python run.py task=bench`: speed, memory and perplexity of one model, side by side.

    run_suite(model, cfg, device, metrics) -> the `bench` section of results.json

measures, with warm-up, synchronisation and several repeats (median and spread, runner/bench/timing.py):
  train      one optimizer step (forward, backward, clipping, AdamW) on random tokens: tokens/s and MFU
  prefill    a prompt through the model into a static KV cache, at several prompt lengths
  decode     greedy generation of `new_tokens` tokens at several batch sizes, with the KV cache and
             without it (then every step re-runs the whole sequence)
  memory     peak memory of every point; KV-cache bytes per token measured from an allocated cache and
             checked against 2 x layers x kv_heads x head_dim x bytes
  kernels    eager vs SDPA vs FlexAttention on the same masks (runner/bench/kernels.py)
  reference  Phi-3 configurations against transformers' Phi3ForCausalLM (runner/bench/reference.py)
  quality    task=bench: validation perplexity as task=eval measures it (bench.perplexity, runner/evaluate.py)
A point that runs out of memory is recorded as {"status": "oom"} and the suite goes on.
runner/bench/BENCH.md documents every figure.
"""
import copy
import logging
import platform
import time
from contextlib import contextmanager

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from runner.bench.flops import (datasheet_bandwidth, datasheet_reason, device_memory_bandwidth, device_peak_flops,
                                peak_source)
from runner.bench.kernels import kernel_points
from runner.bench.reference import reference_comparison, wants_reference
from runner.bench.timing import PeakMemory, free_memory, guarded, memory_kind, throughput, time_fn
from runner.build import record_model, resolve_device
from runner.compute import autocast_dtype, next_token_loss, resolve_compile
from runner.decode import Decoder
from runner.formatting import dtype_name, format_bytes
from runner.task import config_checks, task_run
from runner.tracking import busy_machine_warning, machine_load
from variants.hf import DTYPES

log = logging.getLogger(__name__)

__all__ = ["run_suite", "main", "device_peak_flops", "kv_cache_size", "print_table"]


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"bench.dtype={name!r} is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def profile_settings(bc: DictConfig, device: torch.device) -> tuple[str, dict]:
    """The sizes under bench.cpu or bench.gpu (bench.profile=auto picks by device)."""
    name = bc.profile if bc.profile != "auto" else ("gpu" if device.type == "cuda" else "cpu")
    if name not in ("cpu", "gpu"):
        raise ValueError(f"bench.profile={bc.profile!r} must be auto, cpu or gpu")
    return name, OmegaConf.to_container(bc[name], resolve=True)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def random_ids(vocab_size: int, batch_size: int, length: int, device, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch_size, length), generator=gen).to(device)


@contextmanager
def inference_model(model, dtype, device):
    """The model with its parameters in `dtype`, in eval mode. If they already are, the model itself;
    else a cast copy, and on CUDA the original waits on the host meanwhile, so that memory figures count
    one model. Only parameters are cast: buffers such as rotary frequencies keep their precision."""
    was_training = model.training
    if all(p.dtype == dtype for p in model.parameters()):
        try:
            yield model.eval()
        finally:
            model.train(was_training)
        return
    park = device.type == "cuda"
    if park:
        model.to("cpu")
    cast = copy.deepcopy(model)
    for p in cast.parameters():
        p.data = p.data.to(dtype)
    try:
        yield cast.to(device).eval()
    finally:
        del cast
        free_memory(device)
        if park:
            model.to(device)


# -- the parts: each returns one point's figures --------------------------------------------------------
def measure_train(model, batch_size: int, seq_len: int, device, autocast, timer, train_step=None) -> dict:
    """One full training step on random tokens. AdamW runs with lr=0: the same work, the weights untouched.
    `train_step`, when given, is the caller's own step (a callable with no arguments) and is timed instead."""
    was_training = model.training
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=0.0, fused=device.type in ("cuda", "cpu"))  # as the Trainer (runner.train.adamw)
    ids = random_ids(model.vocab_size, batch_size, seq_len + 1, device)
    x, y = ids[:, :-1], ids[:, 1:]  # (B, T) inputs and next-token targets

    def step():
        loss = next_token_loss(model, x, y, dtype=autocast)  # the training loop's loss and precision
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    model.train()
    try:
        with PeakMemory(device) as mem:
            timing = timer(train_step or step)
    finally:
        optimizer.zero_grad(set_to_none=True)
        model.train(was_training)
    return {**timing, **throughput(timing, batch_size * seq_len), "peak_memory_bytes": mem.peak}


@torch.inference_mode()
def measure_prefill(model, batch_size: int, prompt_length: int, dtype, device, timer) -> dict:
    """The prompt through the model, writing the KV cache (reset, untimed, before every call)."""
    prompt = random_ids(model.vocab_size, batch_size, prompt_length, device)
    with PeakMemory(device) as mem:
        cache = model.allocate_cache(batch_size, prompt_length, dtype, device)
        timing = timer(lambda: model(prompt, cache=cache), setup=cache.reset)
    return {**timing, **throughput(timing, batch_size * prompt_length), "peak_memory_bytes": mem.peak}


@torch.inference_mode()
def measure_decode(model, batch_size: int, prompt_length: int, new_tokens: int, use_cache: bool, dtype,
                   device, timer, compiled: bool = False) -> dict:
    """Greedy generation of `new_tokens` tokens after a prompt. With the cache, the prompt is prefilled
    untimed before every repeat and each timed step feeds one token; without it, each step runs the whole
    sequence so far (prompt_length, prompt_length + 1, ...) through the model. compiled: the fixed-shape,
    torch.compile'd decoder of runner/decode.py (compiled in the untimed warm-up)."""
    prompt = random_ids(model.vocab_size, batch_size, prompt_length, device)
    with PeakMemory(device) as mem:
        if compiled:
            decoder = Decoder(model, batch_size, prompt_length + new_tokens, dtype, device, compile=True)
            state = {}

            def setup():
                state["next"] = decoder.prefill(prompt).argmax(-1)  # (B,)

            def generate():
                token = state["next"]
                for _ in range(new_tokens):
                    token = decoder.step(token).argmax(-1)

            timing = timer(generate, setup=setup)
        elif use_cache:
            cache = model.allocate_cache(batch_size, prompt_length + new_tokens, dtype, device)
            state = {}

            def setup():
                cache.reset()
                state["next"] = model(prompt, cache=cache)[:, -1:].argmax(-1)  # (B, 1)

            def generate():
                token = state["next"]
                for _ in range(new_tokens):
                    token = model(token, cache=cache)[:, -1:].argmax(-1)

            timing = timer(generate, setup=setup)
        else:
            def generate():
                ids = prompt
                for _ in range(new_tokens):
                    ids = torch.cat([ids, model(ids)[:, -1:].argmax(-1)], dim=1)

            timing = timer(generate)
    return {**timing, **throughput(timing, batch_size * new_tokens), "ms_per_token": 1e3 * timing["median_s"] / new_tokens,
            "peak_memory_bytes": mem.peak}


@torch.inference_mode()
def kv_cache_size(model, dtype, device="cpu", batch_size: int = 1, max_len: int | None = None) -> dict:
    """Bytes per cached token: measured from the storage of an allocated cache, and analytic."""
    max_len = max_len or model.max_seq_len
    cache = model.allocate_cache(batch_size, max_len, dtype, device)
    allocated = sum(t.untyped_storage().nbytes() for t in cache.buffers.values())
    itemsize = torch.empty((), dtype=dtype).element_size()
    # K and V of n_kv_heads x head_dim, every layer; or what the attention caches instead (MLA: its latent)
    analytic = model.n_layers * sum(h * d for h, d in model.cache_layout().values()) * itemsize
    return {"kv_cache_bytes_per_token": allocated // (batch_size * max_len),
            "kv_cache_bytes_per_token_analytic": analytic,
            "kv_cache_matches_analytic": allocated == analytic * batch_size * max_len,
            "kv_cache_allocated_bytes": allocated, "kv_cache_shape": [batch_size, max_len]}


# -- the suite ------------------------------------------------------------------------------------------
def run_suite(model, cfg: DictConfig, device=None, metrics: dict | None = None, train_step=None,
              on_update=None) -> dict:
    """Benchmark `model` as cfg.bench says; returns the `bench` section of results.json.

    metrics: the evaluation's figures (val_ppl, val_loss, val_tokens), copied in so speed and quality sit in one row.
    train_step: optional callable running one training step of the caller's own; timed instead of ours.
    on_update: optional callable given the partial section after every part (to save progress).
    """
    bc = cfg.bench
    device = torch.device(device) if device is not None else next(model.parameters()).device
    dtype = resolve_dtype(bc.dtype, device)
    profile, sizes = profile_settings(bc, device)
    timer = lambda fn, setup=None: time_fn(fn, device, bc.warmup, bc.repeats, setup)  # noqa: E731
    metrics = metrics or {}
    compiled = bench_compiles(cfg, device)
    bench = suite_header(model, bc, device, dtype, profile, compiled, metrics)
    started = time.perf_counter()
    parts = [p for p in ("train", "prefill", "decode", "kernels") if bc.run[p]]
    log.info(f"benchmark ({profile}): {', '.join(parts)} on {bench['device']}")
    bar = tqdm(total=len(parts), desc="benchmark", unit="part", delay=3, leave=False, dynamic_ncols=True)

    def update():
        bench["elapsed_s"] = time.perf_counter() - started
        if on_update is not None:
            on_update(bench)

    def part(name):  # the previous part is done; the bar names the next (it shows only after a few seconds)
        if bar.postfix:
            bar.update(1)
        bar.set_postfix_str(name)

    data_cfg, train_cfg = cfg.get("data") or {}, cfg.get("train") or {}
    seq_len = min(bc.train_seq_len or data_cfg.get("seq_len") or model.max_seq_len, model.max_seq_len)
    if bc.run.train:
        part("train step")
        batch_size = bc.train_batch_size or train_cfg.get("batch_size") or 8
        bench["train"].append(train_point(model, batch_size, seq_len, device, train_cfg.get("dtype", "auto"), timer,
                                          train_step))
        update()
    with inference_model(model, dtype, device) as im:
        inference_parts(im, cfg, bench, sizes, dtype, device, timer, part, update)
    if bc.run.kernels:
        part("attention kernels")
        attn = model.attention_modules()[0]
        bench["kernels"] = kernel_points(
            attn.n_heads, attn.n_kv_heads, attn.head_dim, sizes["kernel_seq_lens"], list(bc.kernels.masks),
            list(bc.kernels.kernels), sizes["kernel_window"], bc.kernels.documents, bc.kernels.batch_size,
            dtype, device, bc.warmup, bc.repeats)
    summarize_suite(bench, model, seq_len, device)
    update()
    bar.update(1 if bar.postfix else 0)
    bar.close()
    return bench


def suite_header(model, bc, device, dtype, profile: str, compiled: bool, metrics: dict) -> dict:
    """The bench section before any part has run: what was measured, how, and on what."""
    return {"device": device_name(device), "compile": compiled, "device_type": device.type, "dtype": dtype_name(dtype),
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "profile": profile,
            "warmup": bc.warmup, "repeats": bc.repeats, "memory_kind": memory_kind(device),
            "params": model.num_params(), "val_ppl": metrics.get("val_ppl"), "val_loss": metrics.get("val_loss"),
            "val_tokens": metrics.get("val_tokens"),
            **machine_load(),  # others' work skews CPU timings (print_table warns)
            "train": [], "prefill": [], "decode": [], "kernels": [], "reference": None}


def inference_parts(im, cfg, bench: dict, sizes: dict, dtype, device, timer, part, update) -> None:
    """The parts that run the inference copy `im` (runner/bench/inference_model): prefill, decode, the KV-cache
    size and the reference comparison, each written into `bench` as it ends."""
    bc, compiled = cfg.bench, bench["compile"]
    # q/k/v and gate/up as one GEMM each (variants/fusion.py), as gpt-fast decodes; training is unaffected
    bench["fused_projections"] = im.fuse_projections() if hasattr(im, "fuse_projections") else 0
    bench["weight_bytes"] = sum(p.numel() * p.element_size() for p in im.parameters())
    if bc.run.prefill:
        part("prefill")
        bench["prefill"] = prefill_points(im, sizes, dtype, device, timer)
        update()
    if bc.run.decode:
        part("decode")
        decode_points(im, sizes, bc.new_tokens, dtype, device, timer, bench["decode"], update, compiled)
    kv = guarded(lambda: kv_cache_size(im, dtype, device, max_len=min(im.max_seq_len, 1024)), device)
    bench.update(kv if kv.pop("status") == "ok" else {"kv_cache_bytes_per_token": None, "kv_cache_error": kv})
    run_reference, reason = wants_reference(cfg)
    bench["reference"] = guarded(lambda: reference_comparison(
        im, dtype, device, min(sizes["reference_prompt_length"], im.max_seq_len // 2),
        min(bc.new_tokens, im.max_seq_len // 2), timer, compiled, bc.get("reference_static", True)), device) \
        if run_reference else {"status": "skipped", "reason": reason}
    update()


def bench_compiles(cfg: DictConfig, device) -> bool:
    """bench.compile: true, false, or auto = on CUDA, and on any device for `task=bench` of a model compared
    with transformers (the phi3 presets, checkpoints): there the compiled decode is the figure asked for, while
    the benchmark after every training run (train.bench) stays eager on CPU, where compiling takes minutes."""
    setting = cfg.bench.get("compile", "auto")
    return resolve_compile(setting, device) or (
        str(setting).lower() == "auto" and cfg.get("task") == "bench" and wants_reference(cfg)[0])


def train_point(model, batch_size, seq_len, device, train_dtype, timer, train_step=None) -> dict:
    """bf16 autocast over fp32 weights on CUDA, as the training loop does (train.dtype)."""
    autocast = autocast_dtype(train_dtype, device, next(model.parameters()).dtype)
    return guarded(lambda: measure_train(model, batch_size, seq_len, device, autocast, timer, train_step), device,
                   batch_size=batch_size, seq_len=seq_len, autocast=dtype_name(autocast))


def prefill_points(model, sizes: dict, dtype, device, timer) -> list[dict]:
    points = []
    for length in sizes["prompt_lengths"]:
        labels = {"batch_size": sizes["prefill_batch_size"], "prompt_length": length}
        if length > model.max_seq_len:
            points.append({**labels, "status": "skipped", "error": f"longer than model.max_seq_len={model.max_seq_len}"})
            continue
        points.append(guarded(lambda: measure_prefill(model, labels["batch_size"], length, dtype, device, timer),
                              device, **labels))
    return points


def decode_points(model, sizes: dict, new_tokens: int, dtype, device, timer, points: list, update,
                  compiled: bool = False) -> list[dict]:
    """With the cache at every bench.<profile>.batch_sizes (eager, then compiled when `compiled`), without it
    at no_cache_batch_sizes; each point is appended to `points` and saved (update()) as soon as it is measured."""
    prompt = min(sizes["decode_prompt_length"], model.max_seq_len - 1)
    new_tokens = min(new_tokens, model.max_seq_len - prompt)  # positions stay below max_seq_len
    runs = [(True, False, sizes["batch_sizes"])] + [(True, True, sizes["batch_sizes"])] * compiled + [
        (False, False, sizes["no_cache_batch_sizes"])]
    for use_cache, compile_it, batch_sizes in runs:
        for b in batch_sizes:
            points.append(guarded(lambda: measure_decode(model, b, prompt, new_tokens, use_cache, dtype, device, timer,
                                                         compile_it),
                                  device, batch_size=b, prompt_length=prompt, new_tokens=new_tokens, cache=use_cache,
                                  compiled=compile_it))
            update()
    return points


def _ok(points):
    return [p for p in points if p.get("status") == "ok"]


def summarize_suite(bench: dict, model, seq_len: int, device) -> None:
    """The headline figures (stable names other tools read) from the tables."""
    train = _ok(bench["train"])
    bench["train_tokens_per_s"] = train[0]["tokens_per_s"] if train else None
    bench["flops_per_token"] = model.flops_per_token(seq_len)
    bench["peak_flops"], bench["peak_flops_source"] = device_peak_flops(device), peak_source(device)
    bench["mfu"] = (bench["train_tokens_per_s"] * bench["flops_per_token"] / bench["peak_flops"]
                    if bench["train_tokens_per_s"] and bench["peak_flops"] else None)

    prefill = _ok(bench["prefill"])
    longest = max(prefill, key=lambda p: p["prompt_length"]) if prefill else None
    bench["prefill_tokens_per_s"] = longest["tokens_per_s"] if longest else None
    bench["prefill_prompt_length"] = longest["prompt_length"] if longest else None

    cached = sorted(_ok([p for p in bench["decode"] if p["cache"] and not p.get("compiled")]),
                    key=lambda p: p["batch_size"])
    headline = cached[0] if cached else None
    uncached = [p for p in _ok(bench["decode"]) if not p["cache"] and headline and p["batch_size"] == headline["batch_size"]]
    bench["decode_tokens_per_s"] = headline["tokens_per_s"] if headline else None
    bench["decode_tokens_per_s_no_cache"] = uncached[0]["tokens_per_s"] if uncached else None
    bench["decode_batch_size"] = headline["batch_size"] if headline else None
    bench["kv_cache_speedup"] = (bench["decode_tokens_per_s"] / bench["decode_tokens_per_s_no_cache"]
                                 if bench["decode_tokens_per_s"] and bench["decode_tokens_per_s_no_cache"] else None)
    bench["kv_cache_speedup_new_tokens"] = headline["new_tokens"] if headline else None

    compiled = {p["batch_size"]: p for p in _ok(bench["decode"]) if p.get("compiled")}
    fast = compiled.get(bench["decode_batch_size"])
    bench["decode_tokens_per_s_compiled"] = fast["tokens_per_s"] if fast else None
    bench["compile_speedup"] = (fast["tokens_per_s"] / headline["tokens_per_s"]) if fast and headline else None

    # Decoding reads every weight once per step: bandwidth / weight bytes is the batch-1 ceiling.
    bandwidth = device_memory_bandwidth(device)
    bench["memory_bandwidth"] = bandwidth
    bound = bandwidth / bench["weight_bytes"] if bandwidth and bench.get("weight_bytes") else None
    bench["decode_bandwidth_bound_tokens_per_s"] = bound
    for p in cached + list(compiled.values()):
        p["fraction_of_bandwidth_bound"] = p["tokens_per_s"] / (p["batch_size"] * bound) if bound else None
    bench["decode_fraction_of_bandwidth_bound"] = (
        headline["tokens_per_s"] / (headline["batch_size"] * bound) if bound and headline else None)
    bench["decode_bandwidth_utilization"], bench["decode_bandwidth_utilization_reason"] = None, datasheet_reason(device)
    for p in _ok([p for p in bench["decode"] if p["cache"]]):
        p["bandwidth_utilization"] = bandwidth_utilization(p, bench, model, device)
    fastest = fast or headline
    if fastest and fastest.get("bandwidth_utilization") is not None:
        bench["decode_bandwidth_utilization"] = fastest["bandwidth_utilization"]
        bench["decode_bandwidth_utilization_reason"] = None

    peaks = {part: max((p["peak_memory_bytes"] for p in _ok(bench[part])), default=None)
             for part in ("train", "prefill", "decode")}
    bench["peak_memory"] = peaks
    bench["peak_memory_bytes"] = max((v for v in peaks.values() if v is not None), default=None)


def bandwidth_utilization(point: dict, bench: dict, model, device) -> float | None:
    """Bytes a decode step must read (every weight once, plus each row's KV cache so far, on average
    prompt + new_tokens / 2 tokens) x steps/s, over the device's data-sheet memory bandwidth."""
    peak = datasheet_bandwidth(device)
    if peak is None or not bench.get("weight_bytes"):
        return None
    dtype = DTYPES.get(bench["dtype"], torch.float32)
    kv_tokens = point["prompt_length"] + point["new_tokens"] / 2
    step_bytes = bench["weight_bytes"] + point["batch_size"] * kv_tokens * model.kv_cache_bytes_per_token(dtype)
    return step_bytes * point["tokens_per_s"] / point["batch_size"] / peak


# -- task=bench ---------------------------------------------------------------------------------------------
def wants_perplexity(cfg: DictConfig) -> tuple[bool, str | None]:
    """bench.perplexity: true, false, or auto = weights worth scoring, a training run's (eval.weights) or a
    checkpoint read with its own tokenizer (tokenizer=hf). Random weights score about the vocabulary size,
    and leaving them out keeps the default benchmark free of the data build (seconds on a fresh clone)."""
    setting = str(cfg.bench.get("perplexity", "auto")).lower()
    if setting == "false":
        return False, "bench.perplexity=false"
    if setting == "true":
        return True, None
    if setting != "auto":
        raise ValueError(f"bench.perplexity={setting!r} must be auto, true or false")
    if cfg.model.get("checkpoint") and cfg.tokenizer.kind != "hf":
        return False, "model.checkpoint without its tokenizer (add tokenizer=hf tokenizer.name_or_path=...)"
    if cfg.model.get("checkpoint") or (cfg.get("eval") or {}).get("weights"):
        return True, None
    return False, "random weights: perplexity ~ vocabulary size (bench.perplexity=true measures it)"


def main(cfg: DictConfig):
    from runner.evaluate import check_eval_config, load_eval_model, model_and_perplexity

    with task_run(cfg, "bench", print_summary=lambda record: print_table(record.get("bench"), record_path(record))) as run:
        with config_checks():
            resolve_compile(cfg.bench.get("compile", "auto"), "cpu")  # bench.compile: auto | true | false
            perplexity, skipped = wants_perplexity(cfg)
            if perplexity:
                check_eval_config(cfg)  # a checkpoint's tokenizer, before any work
            elif cfg.model.get("vocab_size") is None and not cfg.model.get("checkpoint"):
                raise ValueError("task=bench needs a vocabulary size: set tokenizer.vocab_size (or model.vocab_size), "
                                 "or bench.perplexity=true to take the tokenizer's")
        device = resolve_device(cfg.bench.get("device") or cfg.get("train", {}).get("device", "auto"))
        run.start_logger()
        metrics = {}
        if perplexity:  # the same data, weights and loss as task=eval, on the first bench.eval_batches batches
            model, metrics, data, source = model_and_perplexity(cfg, device, cfg.bench.get("eval_batches"))
            run.results.update(data=data.stats, metrics=metrics)
        else:
            model, source = load_eval_model(cfg, device)
        record_model(run.results, model)
        run.results.update(weights=source)
        bench = run_suite(model, cfg, device, metrics, on_update=lambda partial: run.results.update(bench=partial))
        bench["perplexity"] = ({"status": "ok", "batches": cfg.bench.get("eval_batches"), "weights": source}
                               if perplexity else {"status": "skipped", "reason": skipped})
        run.results.update(bench=bench)
    return run.results.data


def record_path(record: dict) -> str:
    return f"{record.get('output_dir', '')}/results.json"


# -- the printed table --------------------------------------------------------------------------------------
def _rate(p, key="tokens_per_s"):
    if p.get("status") != "ok":
        return p.get("status", "-")
    return f"{p[key]:,.0f} tok/s [{p[key + '_min']:,.0f}-{p[key + '_max']:,.0f}]"


def _num(x, fmt="{:,.3g}"):
    return "-" if x is None else fmt.format(x)


def print_table(bench: dict | None, path=None) -> None:
    if not bench:
        return
    lines = [f"benchmark  {bench['device']}  {bench['dtype']}  torch {bench['torch']}  {bench['date']}  "
             f"(median [slowest-fastest] of {bench['repeats']} after {bench['warmup']} warm-up)"]
    for p in bench["train"]:
        mfu = f"  MFU {bench['mfu']:.1%}" if bench.get("mfu") is not None else ""
        lines.append(f"  train     B={p['batch_size']} T={p['seq_len']:<6}      {_rate(p)}{mfu}  "
                     f"peak {format_bytes(p.get('peak_memory_bytes'))}")
    for p in bench["prefill"]:
        lines.append(f"  prefill   B={p['batch_size']} prompt={p['prompt_length']:<6} {_rate(p)}  "
                     f"peak {format_bytes(p.get('peak_memory_bytes'))}")
    for p in bench["decode"]:
        bound = p.get("fraction_of_bandwidth_bound")
        bound = f"  {bound:.0%} of bandwidth bound" if bound is not None else ""
        util = p.get("bandwidth_utilization")
        bound += f"  {util:.0%} of memory bandwidth" if util is not None else ""
        kind = "compiled" if p.get("compiled") else "cache   " if p["cache"] else "no cache"
        lines.append(f"  decode    B={p['batch_size']} +{p['new_tokens']} {kind}  {_rate(p)}{bound}")
    if bench.get("compile_speedup") is not None:
        lines.append(f"  compiled decode {bench['decode_tokens_per_s_compiled']:,.0f} tok/s vs eager "
                     f"{bench['decode_tokens_per_s']:,.0f}: {bench['compile_speedup']:.2f}x at B={bench['decode_batch_size']}")
    elif not bench.get("compile"):
        lines.append("  compiled decode: off (bench.compile=auto compiles on CUDA only; bench.compile=true here)")
    lines.append(f"  KV cache speed-up {_num(bench.get('kv_cache_speedup'), '{:.1f}x')} at "
                 f"{bench.get('kv_cache_speedup_new_tokens')} new tokens; "
                 f"{_num(bench.get('kv_cache_bytes_per_token'), '{:,}')} bytes/token "
                 f"(analytic {_num(bench.get('kv_cache_bytes_per_token_analytic'), '{:,}')})")
    lines.append(f"  peak memory {format_bytes(bench.get('peak_memory_bytes'))} ({bench['memory_kind']})")
    lines += _kernel_lines(bench["kernels"]) + _reference_lines(bench.get("reference") or {})
    if bench.get("val_ppl") is not None:
        tokens = f", {bench['val_tokens']:,} tokens" if bench.get("val_tokens") else ""
        lines.append(f"  perplexity {bench['val_ppl']:.3f} (val loss {bench['val_loss']:.4f}{tokens})")
    elif (bench.get("perplexity") or {}).get("status") == "skipped":
        lines.append(f"  perplexity skipped: {bench['perplexity']['reason']}")
    if busy_machine_warning(bench):
        lines.append(f"  {busy_machine_warning(bench)}")
    if path:
        lines.append(f"  results    {path}")
    print("\n".join(lines))


def _kernel_lines(points: list[dict]) -> list[str]:
    """The attention kernels' table: a row per (mask, length), a column per kernel, ms per forward."""
    if not points:
        return []
    kernels = list(dict.fromkeys(p["kernel"] for p in points))
    lines = ["  attention kernels, ms per forward: " + "  ".join(f"{k:>10}" for k in kernels)]
    for mask, length in dict.fromkeys((p["mask"], p["seq_len"]) for p in points):
        cells = [next((q for q in points if (q["mask"], q["seq_len"], q["kernel"]) == (mask, length, k)), {})
                 for k in kernels]
        lines.append(f"    {mask:>9} T={length:<6}" + " " * 18 + "  ".join(
            f"{c['median_s'] * 1e3:>10.3f}" if c.get("status") == "ok" else f"{c.get('status', '-'):>10}"
            for c in cells))
    return lines


def _reference_lines(ref: dict) -> list[str]:
    """The comparison with transformers' Phi-3, or why it did not run."""
    if not ref:
        return []
    if ref.get("status") != "ok":
        return [f"  vs transformers: {ref.get('status')} ({ref.get('reason') or ref.get('error')})"]
    static = ref.get("decode_speed_ratio_static")
    return [f"  vs transformers (ours/theirs): forward time {ref['forward_time_ratio']:.2f}x, prefill "
            f"{ref['prefill_speed_ratio']:.2f}x, decode {ref['decode_speed_ratio']:.2f}x tokens/s "
            f"(ours {ref['decode_ours']}, eager {ref['decode_speed_ratio_eager']:.2f}x), peak memory "
            f"{_num(ref.get('peak_memory_ratio'), '{:.2f}x')}, max |logit diff| {ref['max_logit_diff']:.2e}",
            "  vs transformers static cache + compiled forward: " + (
                f"{static:.2f}x (prefill + {ref['new_tokens']} tokens)" if static is not None
                else f"- ({ref.get('decode_speed_ratio_static_reason')})")]
