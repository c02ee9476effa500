"""Our model against transformers' Phi3ForCausalLM: the same weights, dtype and device, in one process.

Ratios are ours / theirs: `forward_time_ratio` < 1 and `*_speed_ratio` > 1 mean we are faster. Both
models run the same greedy loop: an untimed prefill, then `new_tokens` one-token steps, ours with its
static preallocated KV cache, theirs with transformers' default (dynamic) cache. The attention kernel
matches ours (eager, sdpa or flex_attention).
"""
import torch

from runner.bench.timing import PeakMemory, throughput
from runner.decode import Decoder

PHI3_TARGET = "runner.build.build_phi3"  # the _target_ of conf/model/phi3*.yaml
HF_ATTENTION = {"eager": "eager", "sdpa": "sdpa", "flex": "flex_attention", "auto": "sdpa"}
# (atol, rtol) for `logits_agree`: max |ours - theirs| <= atol + rtol x max |their logit|. Half precision
# rounds each of the two models' matmuls and norms differently, so it gets a few units in the last place.
LOGIT_TOLERANCE = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (1e-2, 2e-2), torch.float16: (2e-3, 5e-3)}


def wants_reference(cfg) -> tuple[bool, str | None]:
    """bench.reference: true, false, or auto = Phi-3 configurations: the phi3 presets (built by
    runner.build.build_phi3) and models loaded from a checkpoint."""
    setting = str(cfg.bench.get("reference", "auto")).lower()
    if setting == "false":
        return False, "bench.reference=false"
    if setting == "auto":
        model_cfg = cfg.get("model") or {}
        if not (model_cfg.get("_target_") == PHI3_TARGET or model_cfg.get("checkpoint")):
            return False, "not a Phi-3 configuration (bench.reference=true compares any Phi-3-compatible model)"
    elif setting != "true":
        raise ValueError(f"bench.reference={setting!r} must be auto, true or false")
    return True, None


def build_reference(model, dtype, device):
    """transformers' Phi3ForCausalLM holding our model's weights (variants.hf does the key mapping)."""
    from variants import hf
    kernel = model.attention_modules()[0].kernel
    return hf.to_hf_model(model, dtype=dtype, device=device, attn_implementation=HF_ATTENTION[kernel]).eval()


def reference_comparison(model, dtype, device, prompt_length: int, new_tokens: int, timer,
                         compiled: bool = False, static: bool = True) -> dict:
    """max_logit_diff, and the ratios of forward time, prefill and decode tokens/s and peak memory.
    compiled: our decode also runs compiled (runner/decode.py), the faster of the two is `decode_speed_ratio`'s,
    and transformers' static cache with its compiled forward is measured too (`decode_speed_ratio_static`)
    unless `static` is off (bench.reference_static: one more compile of the whole model)."""
    theirs = build_reference(model, dtype, device)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, model.vocab_size, (1, prompt_length), generator=gen).to(device)  # (1, P)
    weights = {name: sum(p.numel() * p.element_size() for p in m.parameters())
               for name, m in (("ours", model), ("theirs", theirs))}
    out = {"prompt_length": prompt_length, "new_tokens": new_tokens, "attn_implementation":
           theirs.config._attn_implementation, "weight_bytes": weights}

    with torch.inference_mode():
        ours_logits, their_logits = model(prompt).float(), theirs(prompt, use_cache=False).logits.float()
        out["max_logit_diff"] = (ours_logits - their_logits).abs().max().item()
        out["logit_scale"] = their_logits.abs().max().item()
        atol, rtol = LOGIT_TOLERANCE.get(dtype, LOGIT_TOLERANCE[torch.bfloat16])
        out["logits_agree"] = out["max_logit_diff"] <= atol + rtol * out["logit_scale"]

        # Forward: the whole prompt, no cache.
        forward = {"ours": timer(lambda: model(prompt)), "theirs": timer(lambda: theirs(prompt, use_cache=False))}

        # Prefill: the prompt into a fresh cache.
        cache = model.allocate_cache(1, prompt_length + new_tokens, dtype, device)
        prefill = {"ours": timer(lambda: model(prompt, cache=cache), setup=cache.reset),
                   "theirs": timer(lambda: theirs(prompt, use_cache=True))}

        # Decode: prefill untimed, then new_tokens greedy steps.
        decoder = Decoder(model, 1, prompt_length + new_tokens, dtype, device, compile=True) if compiled else None
        runs, tokens = decode_runs(model, theirs, prompt, new_tokens, cache, decoder)
        decode, memory = {}, {}
        for name, setup, run in runs:
            with PeakMemory(device) as mem:
                decode[name] = timer(run, setup=setup)
            # The block's own memory (cache, activations) plus the model's weights: the other model,
            # resident at the same time, is not counted.
            memory[name] = (mem.delta or 0) + weights[name.removesuffix("_compiled")]
        out["greedy_match_fraction"] = (
            sum(int(a.item() == b.item()) for a, b in zip(tokens["ours"], tokens["theirs"])) / max(1, new_tokens))

    out["forward_time_ratio"] = forward["ours"]["median_s"] / forward["theirs"]["median_s"]
    out["prefill_speed_ratio"] = prefill["theirs"]["median_s"] / prefill["ours"]["median_s"]
    ours = min(("ours", "ours_compiled") if compiled else ("ours",), key=lambda k: decode[k]["median_s"])
    out["decode_ours"] = "compiled" if ours == "ours_compiled" else "eager"
    out["decode_speed_ratio"] = decode["theirs"]["median_s"] / decode[ours]["median_s"]
    out["decode_speed_ratio_eager"] = decode["theirs"]["median_s"] / decode["ours"]["median_s"]
    out.update(static_comparison(model, theirs, decoder, prompt, new_tokens, timer) if static else {
        "decode_speed_ratio_static": None, "decode_speed_ratio_static_reason": "bench.reference_static=false"})
    memory.pop("ours_compiled", None)
    out["peak_memory_ratio"] = memory["ours"] / memory["theirs"] if memory["theirs"] else None
    out["peak_memory_bytes"] = memory
    out["forward_s"] = {k: v["median_s"] for k, v in forward.items()}
    out["prefill_tokens_per_s"] = {k: throughput(v, prompt_length)["tokens_per_s"] for k, v in prefill.items()}
    out["decode_tokens_per_s"] = {k: throughput(v, new_tokens)["tokens_per_s"] for k, v in decode.items()}
    return out


def decode_runs(model, theirs, prompt, new_tokens: int, cache, decoder=None):
    """The decode benchmarks as (name, setup, run) triples: ours with `cache`, transformers' with its dynamic cache,
    and our compiled `decoder` when given; each setup prefills untimed, each run takes new_tokens greedy steps.
    Returns (the triples, {"ours": [...], "theirs": [...]}: the tokens each run generated, filled by the runs)."""
    state, tokens = {}, {"ours": [], "theirs": []}

    def ours_setup():
        cache.reset()
        state["next"] = model(prompt, cache=cache)[:, -1:].argmax(-1)  # (1, 1)

    def ours_decode():
        token, generated = state["next"], []
        for _ in range(new_tokens):
            token = model(token, cache=cache)[:, -1:].argmax(-1)
            generated.append(token)
        tokens["ours"] = generated

    def theirs_setup():
        result = theirs(prompt, use_cache=True)
        state["past"], state["next"] = result.past_key_values, result.logits[:, -1:].argmax(-1)

    def theirs_decode():
        token, past, generated = state["next"], state["past"], []
        for _ in range(new_tokens):
            result = theirs(token, past_key_values=past, use_cache=True)
            past, token = result.past_key_values, result.logits[:, -1:].argmax(-1)
            generated.append(token)
        tokens["theirs"] = generated

    def compiled_setup():
        state["next_compiled"] = decoder.prefill(prompt).argmax(-1)  # (1,)

    def compiled_decode():
        token = state["next_compiled"]
        for _ in range(new_tokens):
            token = decoder.step(token).argmax(-1)

    runs = [("ours", ours_setup, ours_decode), ("theirs", theirs_setup, theirs_decode)]
    runs += [("ours_compiled", compiled_setup, compiled_decode)] if decoder is not None else []
    return runs, tokens


def static_comparison(model, theirs, decoder, prompt, new_tokens: int, timer) -> dict:
    """Our compiled decoder against transformers' `generate(cache_implementation="static")` with its
    forward compiled (its CompileConfig: CUDA graphs on CUDA; forced on other devices too), both timed for
    the whole call, prefill + new_tokens greedy tokens, as `generate` is one call. Needs bench.compile on."""
    if decoder is None:
        return {"decode_speed_ratio_static": None, "decode_speed_ratio_static_reason":
                "bench.compile is off (auto compiles on CUDA only; bench.compile=true measures it here)"}
    try:
        from transformers import CompileConfig
        mode = "reduce-overhead" if prompt.device.type == "cuda" else "default"
        config = CompileConfig(mode=mode)
        config._compile_all_devices = True  # transformers compiles on its accelerators only unless told
        kwargs = dict(attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=new_tokens,
                      min_new_tokens=new_tokens, cache_implementation="static", compile_config=config,
                      pad_token_id=0, eos_token_id=None)
        with torch.inference_mode():
            their_time = timer(lambda: theirs.generate(prompt, **kwargs))

            def ours():
                token = decoder.prefill(prompt).argmax(-1)
                for _ in range(new_tokens - 1):
                    token = decoder.step(token).argmax(-1)

            our_time = timer(ours)
    except Exception as err:  # noqa: BLE001 -- their compile path varies by version and device: record why
        return {"decode_speed_ratio_static": None,
                "decode_speed_ratio_static_reason": f"transformers' static cache + compile failed: {type(err).__name__}: {err}"}
    return {"decode_speed_ratio_static": their_time["median_s"] / our_time["median_s"],
            "decode_speed_ratio_static_reason": None,
            "generate_s_static": {"ours": our_time["median_s"], "theirs": their_time["median_s"]}}
