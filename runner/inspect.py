"""task=inspect: what a "look inside an LLM" chapter shows, for any model (a preset or a checkpoint).

    python run.py task=inspect model=phi3 model.checkpoint=microsoft/Phi-3-mini-4k-instruct prompt="The sky is"

Prints the module tree; parameter counts (embedding, each block, head, total); the shape of every hidden
state and of the logits for the prompt (read by forward hooks); the most likely next tokens; and the KV cache
per token and at full context, 2 (K and V) x layers x KV heads x head_dim x bytes per element, checked
against the bytes of a cache actually allocated. Writes the same as inspect.json in the run directory.
"""
import torch

from runner.build import resolve_device
from runner.formatting import dtype_name, format_bytes
from runner.generate import load_model_and_tokenizer

FULL_CONTEXT_ALLOCATION_LIMIT = 1 << 30  # allocate a real full-context cache only below 1 GiB


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def parameter_counts(model) -> dict:
    """Unique parameters by part; a tied head counts once, in the embedding."""
    blocks = [{"attention": _count(b.attn), "ffn": _count(b.ffn),
               "norms": _count(b.attn_norm) + _count(b.ffn_norm), "total": _count(b)} for b in model.blocks]
    counts = {
        "embedding": model.embed.weight.numel(),
        "position": _count(model.position),
        "blocks": blocks,
        "blocks_total": sum(b["total"] for b in blocks),
        "final_norm": _count(model.norm),
        "lm_head": 0 if model.tie_embeddings else model.lm_head.weight.numel(),
        "tied": model.tie_embeddings,
        "total": model.num_params(),
        "non_embedding": model.num_params(exclude_embeddings=True),
    }
    parts = ("embedding", "position", "blocks_total", "final_norm", "lm_head")
    counts["parts_sum_matches_total"] = sum(counts[k] for k in parts) == counts["total"]
    return counts


@torch.no_grad()
def hidden_shapes(model, input_ids) -> tuple[list[dict], torch.Tensor]:
    """Run the prompt once with forward hooks; returns [{name, shape, rms}] in call order, and the logits."""
    seen, hooks = [], []

    def record(name, note=""):
        def hook(module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            seen.append({"name": name, "shape": list(out.shape), "rms": out.float().pow(2).mean().sqrt().item(),
                         "note": note})
        return hook

    attn = model.attention_modules()[0]
    targets = [("embed", model.embed, ""),
               ("block 0 q_proj", attn.q_proj, f"{attn.n_heads} heads x head_dim {attn.head_dim}"),
               ("block 0 k_proj", getattr(attn, "k_proj", None), f"{attn.n_kv_heads} KV heads x head_dim {attn.head_dim}"),
               ("block 0 v_proj", getattr(attn, "v_proj", None), f"{attn.n_kv_heads} KV heads x head_dim {attn.head_dim}")]
    targets = [t for t in targets if t[1] is not None]  # MLA has a latent in place of k_proj/v_proj
    targets += [(f"block {i}", block, "residual stream") for i, block in enumerate(model.blocks)]
    targets += [("final norm", model.norm, ""), ("logits", model.lm_head, "one score per vocabulary entry")]
    for name, module, note in targets:
        hooks.append(module.register_forward_hook(record(name, note)))
    try:
        logits = model(input_ids)
    finally:
        for h in hooks:
            h.remove()
    return seen, logits


def kv_cache_report(model, prompt_len: int, dtype=None) -> dict:
    """The analytic KV-cache size, checked against caches actually allocated."""
    dtype = dtype or model.embed.weight.dtype
    item = torch.empty((), dtype=dtype).element_size()
    L, kv, H, hd = model.n_layers, model.n_kv_heads, model.n_heads, model.head_dim
    per_token = L * sum(h * d for h, d in model.cache_layout().values()) * item  # K and V (or MLA's latent), every layer
    full = per_token * model.max_seq_len
    small = model.allocate_cache(1, prompt_len, dtype=dtype)
    report = {
        "dtype": dtype_name(dtype), "bytes_per_element": item, "n_layers": L, "n_kv_heads": kv,
        "n_heads": H, "head_dim": hd, "bytes_per_token": per_token,
        "model_bytes_per_token": model.kv_cache_bytes_per_token(dtype),
        "max_seq_len": model.max_seq_len, "bytes_full_context": full,
        "mha_bytes_per_token": 2 * L * H * hd * item,
        "allocated_prompt": {"tokens": prompt_len, "nbytes": small.nbytes, "expected": per_token * prompt_len},
    }
    del small
    if full <= FULL_CONTEXT_ALLOCATION_LIMIT:
        cache = model.allocate_cache(1, model.max_seq_len, dtype=dtype)
        report["allocated_full"] = {"tokens": model.max_seq_len, "nbytes": cache.nbytes, "expected": full}
        del cache
    report["matches"] = report["model_bytes_per_token"] == per_token and all(
        a["nbytes"] == a["expected"] for k, a in report.items() if k.startswith("allocated_"))
    return report


def inspect_model(model, prompt_ids: list[int], decode=None, top: int = 10) -> dict:
    decode = decode or (lambda ids: str(ids))
    device = next(model.parameters()).device
    input_ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)  # (1, T)
    shapes, logits = hidden_shapes(model, input_ids)
    probs = logits[0, -1].float().softmax(-1)
    p, ids = probs.topk(min(top, probs.numel()))
    attn = model.attention_modules()[0]
    return {
        "summary": {"n_layers": model.n_layers, "d_model": model.d_model, "n_heads": model.n_heads,
                    "n_kv_heads": model.n_kv_heads, "head_dim": model.head_dim, "vocab_size": model.vocab_size,
                    "max_seq_len": model.max_seq_len, "dtype": dtype_name(model.embed.weight.dtype),
                    "kernel": attn.kernel, "mask": repr(attn.pattern)},
        "tree": str(model),
        "parameters": parameter_counts(model),
        "prompt_ids": list(prompt_ids),
        "shapes": [{"name": "input_ids", "shape": list(input_ids.shape), "rms": None, "note": "token ids"}] + shapes,
        "next_token": [{"id": int(i), "text": decode([int(i)]), "prob": float(q)} for q, i in zip(p, ids)],
        "kv_cache": kv_cache_report(model, len(prompt_ids)),
    }


def format_report(r: dict, source: str = "", prompt: str = "") -> str:
    s, pc, kv = r["summary"], r["parameters"], r["kv_cache"]
    out = ["== model ==", f"source: {source}" if source else "",
           f"{s['n_layers']} layers, d_model {s['d_model']}, {s['n_heads']} heads x head_dim {s['head_dim']}, "
           f"{s['n_kv_heads']} KV heads, vocab {s['vocab_size']}, max_seq_len {s['max_seq_len']}, {s['dtype']}, "
           f"attention kernel {s['kernel']}, mask {s['mask']}",
           "", "== module tree ==", r["tree"], "", "== parameters =="]
    row = lambda name, n, note="": out.append(f"{name:<22}{n:>16,}   {note}".rstrip())
    row("embedding", pc["embedding"], f"({s['vocab_size']} x {s['d_model']})")
    if pc["position"]:
        row("position embedding", pc["position"])
    distinct = {tuple(b.items()) for b in pc["blocks"]}
    for i, b in enumerate(pc["blocks"] if len(distinct) > 1 else pc["blocks"][:1]):
        label = f"block {i}" if len(distinct) > 1 else f"each block (x{s['n_layers']})"
        row(label, b["total"], f"attention {b['attention']:,} + feed-forward {b['ffn']:,} + norms {b['norms']:,}")
    row(f"all {s['n_layers']} blocks", pc["blocks_total"])
    row("final norm", pc["final_norm"])
    row("lm head", pc["lm_head"], "(tied: the embedding matrix, counted once)" if pc["tied"] else
        f"({s['d_model']} x {s['vocab_size']})")
    row("total", pc["total"], "(= model.num_params(); parts add up: "
        f"{'yes' if pc['parts_sum_matches_total'] else 'NO'})")
    row("non-embedding", pc["non_embedding"])

    out += ["", "== shapes for the prompt ==",
            f"prompt {prompt!r} -> {len(r['prompt_ids'])} tokens {r['prompt_ids'][:16]}"
            f"{' ...' if len(r['prompt_ids']) > 16 else ''}"]
    for h in r["shapes"]:
        rms = f"rms {h['rms']:.4f}" if h["rms"] is not None else ""
        out.append(f"{h['name']:<18}{str(tuple(h['shape'])):<22}{rms:<14}{h['note']}".rstrip())

    out += ["", "== next token =="]
    for rank, c in enumerate(r["next_token"], 1):
        out.append(f"{rank:>3}. p={c['prob']:.4f}  id {c['id']:>6}  {c['text']!r}")

    mha = kv["mha_bytes_per_token"]
    out += ["", "== KV cache ==",
            f"per token: 2 (K, V) x {kv['n_layers']} layers x {kv['n_kv_heads']} KV heads x head_dim "
            f"{kv['head_dim']} x {kv['bytes_per_element']} bytes ({kv['dtype']}) = {format_bytes(kv['bytes_per_token'])}",
            f"at full context ({kv['max_seq_len']:,} tokens): {format_bytes(kv['bytes_full_context'])} per sequence",
            f"vs MHA ({kv['n_heads']} KV heads): {format_bytes(mha)} per token, {mha / kv['bytes_per_token']:.1f}x this"]
    for key, label in (("allocated_prompt", "prompt"), ("allocated_full", "full context")):
        if key in kv:
            a = kv[key]
            ok = "matches" if a["nbytes"] == a["expected"] else "MISMATCH"
            out.append(f"allocated cache for the {label} ({a['tokens']:,} tokens): {a['nbytes']:,} bytes, "
                       f"{ok} {a['expected']:,}")
    if "allocated_full" not in kv:
        out.append(f"(full context not allocated: over {format_bytes(FULL_CONTEXT_ALLOCATION_LIMIT)})")
    return "\n".join(line for line in out if line is not None) + "\n"


def main(cfg):
    from runner.tracking import atomic_write_json, output_dir

    device = resolve_device(cfg.generate.get("device") or "auto")
    model, tok, source = load_model_and_tokenizer(cfg, device)
    prompt = cfg.prompt if isinstance(cfg.prompt, str) else cfg.prompt[0]
    report = inspect_model(model, tok.encode(prompt), tok.decode, cfg.generate.get("top_candidates", 10))
    report.update(source=source, prompt=prompt, tokenizer=tok.name)
    print(format_report(report, source, prompt), end="")
    path = output_dir() / "inspect.json"
    atomic_write_json(path, report)
    print(f"wrote {path}")
    return report
