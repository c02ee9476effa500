"""Phi-3 checkpoints (transformers' `Phi3ForCausalLM`) in and out of TransformerLM.

    model = TransformerLM.from_hf("microsoft/Phi-3-mini-4k-instruct")   # or a local directory
    model = TransformerLM.from_hf(path, n_kv_heads=8)                    # MHA -> GQA, K/V mean-pooled
    model.save_hf("out/")                                                # Phi3ForCausalLM.from_pretrained("out/")

Everything with `model_type: phi3` loads: Phi-3-mini 4k and 128k (LongRoPE), Phi-3-medium (GQA), Phi-3.5-mini
and Phi-4-mini (partial rotary, tied embeddings). The config is read from config.json ourselves (both
transformers 5's `rope_parameters` and the legacy `rope_theta` + `rope_scaling`), so this module imports
transformers only to hand a model over to it (`to_hf_model`).
"""
import json
from functools import partial
from pathlib import Path

import torch
from torch import nn

from .attention import Attention
from .ffn import ACTIVATIONS, GatedMLP
from .masks import Causal, SlidingWindow
from .position import LongRoPEScaling, RoPE

# Phi-3 tensor name -> our parameter name(s); "{}" is the layer index. A tuple means Phi-3 fuses those
# parameters of ours into one matrix, stacked by rows in this order: qkv_proj is [q; k; v] (Phi3Attention
# slices it so) and gate_up_proj is [gate; up] (Phi3MLP: `gate, up = gate_up_proj(x).chunk(2, dim=-1)`).
PHI3_TO_OURS = {
    "model.embed_tokens.weight": "embed.weight",
    "model.layers.{}.input_layernorm.weight": "blocks.{}.attn_norm.weight",
    "model.layers.{}.self_attn.qkv_proj.weight": ("blocks.{}.attn.q_proj.weight", "blocks.{}.attn.k_proj.weight",
                                                  "blocks.{}.attn.v_proj.weight"),
    "model.layers.{}.self_attn.o_proj.weight": "blocks.{}.attn.o_proj.weight",
    "model.layers.{}.post_attention_layernorm.weight": "blocks.{}.ffn_norm.weight",
    "model.layers.{}.mlp.gate_up_proj.weight": ("blocks.{}.ffn.gate_proj.weight", "blocks.{}.ffn.up_proj.weight"),
    "model.layers.{}.mlp.down_proj.weight": "blocks.{}.ffn.down_proj.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "lm_head.weight",
}
# transformers' activation names (ACT2FN) <-> ours (ffn.ACTIVATIONS)
HF_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh",
                  "gelu_new": "gelu_tanh", "relu": "relu"}
OUR_ACTIVATIONS = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _pairs(n_layers: int):
    """(Phi-3 name, [our names]) for every tensor, the table's "{}" filled in for each layer."""
    for theirs, ours in PHI3_TO_OURS.items():
        ours = (ours,) if isinstance(ours, str) else ours
        for i in range(n_layers) if "{}" in theirs else [None]:
            yield theirs.format(i), [name.format(i) for name in ours]


# -- reading a checkpoint -------------------------------------------------------------------------------------
def resolve_checkpoint(path_or_id, revision: str | None = None) -> Path:
    """A local directory as is; anything else is a Hub id, fetched into (or found in) the Hugging Face cache."""
    path = Path(str(path_or_id)).expanduser()
    if path.is_dir():
        return path
    if path.exists() or str(path_or_id).startswith((".", "/", "~")) or str(path_or_id).count("/") > 1:
        raise FileNotFoundError(f"checkpoint {str(path_or_id)!r} is not a directory (nor a Hub id like "
                                f"microsoft/Phi-3-mini-4k-instruct)")
    from huggingface_hub import snapshot_download
    try:
        local = snapshot_download(str(path_or_id), revision=revision,
                                  allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"])
        if not any(Path(local).glob("*.safetensors")):  # an old repository with PyTorch .bin files only
            local = snapshot_download(str(path_or_id), revision=revision, allow_patterns=["*.bin", "*.json"])
    except Exception as err:
        raise RuntimeError(
            f"cannot fetch {str(path_or_id)!r} from the Hugging Face Hub ({type(err).__name__}: {err}). Without "
            f"network, download it elsewhere (`hf download {path_or_id} --local-dir DIR`) and load DIR, or set "
            f"HF_HUB_OFFLINE=1 to use a copy already in the Hugging Face cache. (Meant as a local directory? "
            f"{path.resolve()} does not exist.)") from err
    return Path(local)


def read_config(directory: Path) -> dict:
    """config.json, refusing anything that is not a Phi-3 causal LM."""
    file = Path(directory) / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{directory} has no config.json: not a Hugging Face checkpoint")
    cfg = json.loads(file.read_text())
    model_type, archs = cfg.get("model_type"), cfg.get("architectures") or []
    if model_type != "phi3" or any(a != "Phi3ForCausalLM" for a in archs):
        raise ValueError(f"{directory} is a {model_type!r} checkpoint ({', '.join(archs) or 'no architectures'}), "
                         f"not Phi-3: variants.hf loads model_type 'phi3' / Phi3ForCausalLM checkpoints only")
    return cfg


def rope_settings(cfg: dict) -> dict:
    """RoPE keyword arguments from a Phi-3 config.json, as transformers reads it: `rope_parameters`
    (transformers 5) or `rope_theta` + `rope_scaling` (earlier checkpoints, where LongRoPE was called "su")."""
    rp = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    rope_type = rp.get("rope_type") or rp.get("type") or "default"
    theta = rp.get("rope_theta", cfg.get("rope_theta", 10000.0))
    partial_rotary = rp.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    if rope_type == "default":
        scaling = None
    elif rope_type in ("longrope", "su"):
        # transformers gives the top-level original_max_position_embeddings priority (Phi3Config default 4096)
        original = cfg.get("original_max_position_embeddings",
                           rp.get("original_max_position_embeddings", 4096))
        scaling = LongRoPEScaling(rp["short_factor"], rp["long_factor"], original, factor=rp.get("factor"),
                                  attention_factor=rp.get("attention_factor"))
    else:
        raise ValueError(f"RoPE type {rope_type!r} is not one Phi-3 uses (default, longrope)")
    return {"theta": float(theta), "partial_rotary_factor": float(partial_rotary), "scaling": scaling}


def architecture(cfg: dict, kernel: str = "auto", window=None, attention_schedule=None) -> dict:
    """TransformerLM keyword arguments for a Phi-3 config.json (its defaults are Phi3Config's)."""
    d_model, n_heads = cfg.get("hidden_size", 3072), cfg.get("num_attention_heads", 32)
    act = cfg.get("hidden_act", "silu")
    if act not in HF_ACTIVATIONS:
        raise ValueError(f"config.json's hidden_act={act!r} has no counterpart in variants.ffn: the gated MLP loads "
                         f"with hidden_act one of {sorted(HF_ACTIVATIONS)}")
    if attention_schedule is None and window is None:
        window = cfg.get("sliding_window")  # Phi-3 applies it to every layer
    return dict(
        vocab_size=cfg.get("vocab_size", 32064), d_model=d_model, n_layers=cfg.get("num_hidden_layers", 32),
        n_heads=n_heads, max_seq_len=cfg.get("max_position_embeddings", 4096), head_dim=cfg.get("head_dim"),
        attention=partial(Attention, n_kv_heads=cfg.get("num_key_value_heads") or n_heads, kernel=kernel,
                          window=window),
        ffn=partial(GatedMLP, hidden_dim=cfg.get("intermediate_size", 8192), activation=HF_ACTIVATIONS[act]),
        norm=partial(nn.RMSNorm, eps=cfg.get("rms_norm_eps", 1e-5)),
        position=partial(RoPE, **rope_settings(cfg)),
        norm_position="pre", tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_schedule=attention_schedule,
    )


def load_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint: model.safetensors, sharded safetensors (model.safetensors.index.json),
    or the older pytorch_model.bin (sharded or not)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    for index_name, reader in (("model.safetensors.index.json", load_file),
                               ("pytorch_model.bin.index.json", _load_bin)):
        index = directory / index_name
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            missing = [s for s in shards if not (directory / s).is_file()]
            if missing:
                raise FileNotFoundError(f"{index} names shards that are not there: {missing}")
            return {k: v for shard in shards for k, v in reader(directory / shard).items()}
    if (directory / "model.safetensors").is_file():
        return load_file(directory / "model.safetensors")
    if (directory / "pytorch_model.bin").is_file():
        return _load_bin(directory / "pytorch_model.bin")
    raise FileNotFoundError(f"{directory} has no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def _load_bin(path):
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def phi3_to_ours(tensors: dict, shapes: dict, n_layers: int, tied: bool) -> dict:
    """Rename and split a Phi-3 state dict into ours. `shapes`: our parameter shapes (name -> torch.Size).
    Raises one error listing every missing, unexpected and wrongly shaped tensor."""
    out, expected, missing, wrong = {}, set(), [], []
    for theirs, ours in _pairs(n_layers):
        if theirs == "lm_head.weight" and tied:
            continue  # the head is the embedding
        expected.add(theirs)
        if theirs not in tensors:
            missing.append(theirs)
            continue
        rows = [shapes[name][0] for name in ours]
        want = (sum(rows), *shapes[ours[0]][1:])
        if tuple(tensors[theirs].shape) != want:
            parts = ""
            if len(ours) > 1:  # name the parts of a fused tensor: "= q_proj 64 + k_proj 32 + v_proj 32 rows"
                parts = " = " + " + ".join(f"{n.split('.')[-2]} {r}" for n, r in zip(ours, rows)) + " rows"
            wrong.append(f"{theirs}: {tuple(tensors[theirs].shape)} in the checkpoint, the model needs {want}{parts}")
            continue
        out.update(zip(ours, tensors[theirs].split(rows)))
    # rotary tables are computed, not learned; a tied head may be saved anyway (transformers ignores it)
    ignorable = {k for k in tensors if k.endswith("rotary_emb.inv_freq") or (tied and k == "lm_head.weight")}
    unexpected = sorted(set(tensors) - expected - ignorable)
    problems = ([f"missing tensors: {', '.join(missing)}"] if missing else []) + \
               ([f"unexpected tensors: {', '.join(unexpected)}"] if unexpected else []) + \
               ([f"wrong shapes: {'; '.join(wrong)}"] if wrong else [])
    if problems:
        raise ValueError("the checkpoint does not fit its config.json: " + " | ".join(problems))
    if tied:
        out["lm_head.weight"] = out["embed.weight"]
    return out


def from_hf(path_or_id, n_kv_heads: int | None = None, window: int | None = None, attention_schedule=None,
            kernel: str = "auto", dtype=None, revision: str | None = None, *, model_cls) -> nn.Module:
    """Load a Phi-3 checkpoint (a local directory or a Hub id) into `model_cls` (TransformerLM, whose
    `from_hf` calls this), in eval mode.

    n_kv_heads: fewer key/value heads than the checkpoint has: mean-pool them per group (mean_pool_kv_heads).
    window / attention_schedule: a sliding window or per-layer mask patterns the checkpoint was not trained
        with (they replace its own `sliding_window`; attention_schedule=[Causal()] removes it).
    dtype: None or "float32" (default), "bfloat16", "float16", a torch.dtype, or "auto" = as stored.
    """
    directory = resolve_checkpoint(path_or_id, revision)
    cfg = read_config(directory)
    kwargs = architecture(cfg, kernel, window, attention_schedule)
    with torch.device("meta"):  # no memory, no random init: the checkpoint's tensors become the parameters
        model = model_cls(**kwargs)
    shapes = {name: t.shape for name, t in model.state_dict().items()}
    state = phi3_to_ours(load_tensors(directory), shapes, model.n_layers, model.tie_embeddings)
    model.load_state_dict(state, strict=True, assign=True)
    if model.tie_embeddings:
        model.lm_head.weight = model.embed.weight  # assign=True gave them separate Parameter objects
    cast_parameters(model, resolve_dtype(dtype, next(iter(state.values())).dtype))
    # RoPE's frequencies are computed buffers (not saved): build them for real, in float32
    model.position = kwargs["position"](d_model=model.d_model, head_dim=model.head_dim, max_seq_len=model.max_seq_len)
    if n_kv_heads is not None and n_kv_heads != model.n_kv_heads:
        mean_pool_kv_heads(model, n_kv_heads)
    return model.eval()


def cast_parameters(model: nn.Module, dtype: torch.dtype) -> None:
    """Parameters to `dtype`; computed buffers (RoPE frequencies) stay float32, as transformers keeps them."""
    for p in model.parameters():
        p.data = p.data.to(dtype)


def resolve_dtype(name, stored: torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name is None:
        return torch.float32
    if name == "auto":
        return stored
    if name not in DTYPES:
        raise ValueError(f"dtype={name!r} must be one of {sorted(DTYPES)} or 'auto' (as stored)")
    return DTYPES[name]


@torch.no_grad()
def mean_pool_kv_heads(model: nn.Module, n_kv_heads: int) -> nn.Module:
    """Convert every attention layer to `n_kv_heads` key/value heads by averaging the key and value
    projections of each group of heads (Ainslie et al. 2023, GQA, section 2.1). Groups are consecutive heads,
    as `repeat_interleave` pairs query heads with key/value heads, so query head j keeps the group it was in."""
    for block in model.blocks:
        attn = block.attn
        old = attn.n_kv_heads
        if n_kv_heads > old or old % n_kv_heads:
            raise ValueError(f"cannot turn {old} key/value heads into n_kv_heads={n_kv_heads}: mean-pooling needs "
                             f"a divisor of {old} (fewer heads, never more)")
        for name in ("k_proj", "v_proj"):
            proj = getattr(attn, name)
            # (Hkv', group, hd, d) -> (Hkv', hd, d), averaged in float32 even for bfloat16 weights
            groups = proj.weight.view(n_kv_heads, old // n_kv_heads, attn.head_dim, -1)
            w = groups.float().mean(1).to(proj.weight.dtype)
            pooled = nn.Linear(proj.in_features, n_kv_heads * attn.head_dim, bias=proj.bias is not None,
                               device=w.device, dtype=w.dtype)
            pooled.weight.copy_(w.reshape(-1, proj.in_features))
            if proj.bias is not None:
                pooled.bias.copy_(proj.bias.view(n_kv_heads, old // n_kv_heads, attn.head_dim).float().mean(1).flatten())
            setattr(attn, name, pooled)
        attn.n_kv_heads = n_kv_heads
    return model


# -- writing a checkpoint -----------------------------------------------------------------------------------
def phi3_config(model: nn.Module) -> dict:
    """config.json for `model`, or a ValueError naming the first choice Phi3ForCausalLM cannot express."""
    def refuse(choice, why):
        raise ValueError(f"save_hf: {choice} is not Phi-3 compatible ({why})")

    if model.norm_position != "pre":
        refuse(f"norm_position={model.norm_position!r}", "Phi-3 normalises before each sublayer")
    norms = [m for b in model.blocks for m in (b.attn_norm, b.ffn_norm)] + [model.norm]
    for norm in norms:
        if not isinstance(norm, nn.RMSNorm) or not norm.elementwise_affine:
            refuse(type(norm).__name__, "Phi-3 uses RMSNorm with a learned scale")
    eps = {n.eps for n in norms}
    if len(eps) > 1:
        refuse(f"RMSNorm eps {sorted(eps, key=str)}", "Phi-3 has one rms_norm_eps")
    attn0, ffn0 = model.blocks[0].attn, model.blocks[0].ffn
    for block in model.blocks:
        attn, ffn = block.attn, block.ffn
        if type(attn) is not Attention or attn.q_proj.bias is not None:
            refuse(f"attention {type(attn).__name__} with bias={attn.q_proj.bias is not None}",
                   "Phi-3 attention has no biases")
        if attn.n_kv_heads != attn0.n_kv_heads:
            refuse("different key/value head counts per layer", "Phi-3 has one num_key_value_heads")
        if type(ffn) is not GatedMLP:
            refuse(f"feed-forward {type(ffn).__name__}", "Phi-3 uses a gated MLP, down(act(gate(x)) * up(x))")
        if ffn.gate_proj.bias is not None or ffn.gate_proj.out_features != ffn0.gate_proj.out_features:
            refuse("feed-forward biases or per-layer hidden sizes", "Phi-3 has one bias-free intermediate_size")
    patterns = {b.attn.pattern for b in model.blocks}
    if len(patterns) > 1 or not isinstance(attn0.pattern, (Causal, SlidingWindow)):
        refuse(f"attention schedule {sorted(map(repr, patterns))}",
               "Phi-3 applies one mask to every layer: causal, or causal within one sliding window")
    activation = next(name for name, fn in ACTIVATIONS.items() if fn is ffn0.act)
    pos = model.position
    if not isinstance(pos, RoPE):
        refuse(f"position {type(pos).__name__}", "Phi-3 uses rotary position embeddings")
    if pos.scaling is not None and not isinstance(pos.scaling, LongRoPEScaling):
        refuse(f"RoPE scaling {type(pos.scaling).__name__}", "Phi-3 knows plain RoPE and LongRoPE")

    rope = {"rope_type": "default", "rope_theta": pos.theta, "partial_rotary_factor": pos.rotary_dim / model.head_dim}
    legacy_scaling, original = None, model.max_seq_len
    if isinstance(pos.scaling, LongRoPEScaling):
        s = pos.scaling
        original = s.original_max_position_embeddings
        extra = {k: v for k, v in (("factor", s.factor), ("attention_factor", s.attention_factor)) if v is not None}
        legacy_scaling = {"type": "longrope", "short_factor": s.short_factor, "long_factor": s.long_factor, **extra}
        rope.update(rope_type="longrope", short_factor=s.short_factor, long_factor=s.long_factor,
                    original_max_position_embeddings=original, **extra)
    eps = eps.pop()
    cfg = {
        "architectures": ["Phi3ForCausalLM"], "model_type": "phi3",
        "vocab_size": model.vocab_size, "hidden_size": model.d_model, "num_hidden_layers": model.n_layers,
        "num_attention_heads": model.n_heads, "num_key_value_heads": attn0.n_kv_heads,
        "intermediate_size": ffn0.gate_proj.out_features, "hidden_act": OUR_ACTIVATIONS[activation],
        "rms_norm_eps": eps if eps is not None else torch.finfo(torch.float32).eps,
        "max_position_embeddings": model.max_seq_len, "original_max_position_embeddings": original,
        "sliding_window": attn0.pattern.window if isinstance(attn0.pattern, SlidingWindow) else None,
        "tie_word_embeddings": model.tie_embeddings,
        # transformers 5 reads rope_parameters; earlier versions rope_theta / partial_rotary_factor / rope_scaling
        "rope_parameters": rope, "rope_theta": pos.theta, "partial_rotary_factor": rope["partial_rotary_factor"],
        "rope_scaling": legacy_scaling,
        # Phi3Config's defaults (32000) are outside a small vocabulary; the tokenizer's ids belong here
        "bos_token_id": None, "eos_token_id": None, "pad_token_id": None,
        "dtype": str(model.embed.weight.dtype).removeprefix("torch."),
    }
    if model.head_dim != model.d_model // model.n_heads:
        cfg["head_dim"] = model.head_dim
    return cfg


def ours_to_phi3(model: nn.Module, include_tied_head: bool = False) -> dict[str, torch.Tensor]:
    """Our parameters under Phi-3's names, q/k/v and gate/up fused again (new, contiguous tensors)."""
    ours = model.state_dict()
    out = {}
    for theirs, names in _pairs(model.n_layers):
        if theirs == "lm_head.weight" and model.tie_embeddings and not include_tied_head:
            continue
        out[theirs] = torch.cat([ours[n] for n in names]) if len(names) > 1 else ours[names[0]].clone()
    return out


def save_hf(model: nn.Module, directory, max_shard_bytes: int | None = None, **config_overrides) -> Path:
    """Write config.json and safetensors weights that `Phi3ForCausalLM.from_pretrained(directory)` loads.
    config_overrides: e.g. eos_token_id=..., written into config.json. Shards above max_shard_bytes."""
    from safetensors.torch import save_file

    cfg = {**phi3_config(model), **config_overrides}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = ours_to_phi3(model)
    shards, size = [{}], 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if max_shard_bytes and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t.detach().cpu().contiguous()
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], directory / "model.safetensors", metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, directory / file, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, file))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        (directory / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (directory / "config.json").write_text(json.dumps(cfg, indent=2))
    return directory


def to_hf_model(model: nn.Module, dtype=None, device=None, attn_implementation: str = "sdpa"):
    """transformers' Phi3ForCausalLM holding our weights (in memory, e.g. to compare the two)."""
    from transformers import Phi3Config, Phi3ForCausalLM

    ref = model.embed.weight
    config = Phi3Config.from_dict(phi3_config(model))
    with torch.device("meta"):  # skip transformers' random init; our tensors are assigned below
        hf = Phi3ForCausalLM._from_config(config, attn_implementation=attn_implementation)
    hf.load_state_dict(ours_to_phi3(model, include_tied_head=True), strict=True, assign=True)
    if model.tie_embeddings:
        hf.lm_head.weight = hf.model.embed_tokens.weight
    hf.model.rotary_emb = type(hf.model.rotary_emb)(config=hf.config)  # computed buffers, built for real
    return hf.to(device=device or ref.device, dtype=dtype or ref.dtype).eval()
