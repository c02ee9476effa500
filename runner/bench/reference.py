"""Our model against transformers' Phi3ForCausalLM: the same weights, dtype and device, in one process.

Ratios are ours / theirs: `forward_time_ratio` < 1 and `*_speed_ratio` > 1 mean we are faster. Both
models run the same greedy loop: an untimed prefill, then `new_tokens` one-token steps, ours with its
static preallocated KV cache, theirs with transformers' default (dynamic) cache. The attention kernel
matches ours (eager, sdpa or flex_attention).
"""
import torch

from runner.bench.timing import PeakMemory, throughput

PHI3_TARGET = "runner.build.build_phi3"  # the _target_ of conf/model/phi3*.yaml
HF_ATTENTION = {"eager": "eager", "sdpa": "sdpa", "flex": "flex_attention"}
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


def reference_comparison(model, dtype, device, prompt_length: int, new_tokens: int, timer) -> dict:
    """max_logit_diff, and the ratios of forward time, prefill and decode tokens/s and peak memory."""
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

        decode, memory = {}, {}
        for name, setup, run in (("ours", ours_setup, ours_decode), ("theirs", theirs_setup, theirs_decode)):
            with PeakMemory(device) as mem:
                decode[name] = timer(run, setup=setup)
            # The block's own memory (cache, activations) plus the model's weights: the other model,
            # resident at the same time, is not counted.
            memory[name] = (mem.delta or 0) + weights[name]
        out["greedy_match_fraction"] = (
            sum(int(a.item() == b.item()) for a, b in zip(tokens["ours"], tokens["theirs"])) / max(1, new_tokens))

    out["forward_time_ratio"] = forward["ours"]["median_s"] / forward["theirs"]["median_s"]
    out["prefill_speed_ratio"] = prefill["theirs"]["median_s"] / prefill["ours"]["median_s"]
    out["decode_speed_ratio"] = decode["theirs"]["median_s"] / decode["ours"]["median_s"]
    out["peak_memory_ratio"] = memory["ours"] / memory["theirs"] if memory["theirs"] else None
    out["peak_memory_bytes"] = memory
    out["forward_s"] = {k: v["median_s"] for k, v in forward.items()}
    out["prefill_tokens_per_s"] = {k: throughput(v, prompt_length)["tokens_per_s"] for k, v in prefill.items()}
    out["decode_tokens_per_s"] = {k: throughput(v, new_tokens)["tokens_per_s"] for k, v in decode.items()}
    return out
