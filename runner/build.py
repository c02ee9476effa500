"""Turn a composed config into a model, checking it first on the meta device.

Building on `torch.device("meta")` runs every constructor's validation (head counts, rotary dims, windows,
unknown kernels) without allocating a byte, so a config that cannot work fails before data is read.
"""
from functools import partial

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from variants import Attention, TransformerLM
from variants.hf import cast_parameters, from_hf, resolve_dtype


def _instantiate(model_cfg: DictConfig | dict):
    if isinstance(model_cfg, DictConfig):
        model_cfg = OmegaConf.to_container(model_cfg, resolve=True)
    model_cfg = dict(model_cfg)
    checkpoint = model_cfg.pop("checkpoint", None)
    if checkpoint:  # Phi-3 / Hugging Face weights
        return build_from_checkpoint(checkpoint, model_cfg)
    return instantiate(model_cfg)


def check_model_config(model_cfg: DictConfig) -> None:
    """Raise the constructors' errors (naming the config key) without allocating weights."""
    if model_cfg.get("checkpoint"):
        return  # the checkpoint's own config decides the shapes; checked while loading
    resolved = OmegaConf.to_container(model_cfg, resolve=True)
    if resolved.get("vocab_size") is None:
        # null: the tokenizer's size (tokenizer=hf), known once it is loaded; build_model checks it then
        resolved["vocab_size"] = 1
    with torch.device("meta"):
        try:
            _instantiate(resolved)
        except InstantiationException as err:
            # Hydra wraps the constructor's error; the constructor's own message names the key
            if isinstance(err.__cause__, (ValueError, TypeError)):
                raise err.__cause__ from None
            raise


def build_model(model_cfg: DictConfig, device="cpu") -> torch.nn.Module:
    check_model_config(model_cfg)
    if not model_cfg.get("checkpoint") and model_cfg.get("vocab_size") is None:
        raise ValueError("model.vocab_size is null: set it, or tokenizer.vocab_size, or load the tokenizer first")
    device = torch.device(device)
    if model_cfg.get("checkpoint") or device.type == "cpu":
        model = _instantiate(model_cfg)
    else:  # random weights drawn on the accelerator: Phi-3-mini's 3.8B would take a CPU tens of seconds (and 15 GB)
        with device:
            model = _instantiate(model_cfg)
    return model.to(device)


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is visible")
    return torch.device(name)


def record_model(results, model) -> None:
    """The model's sizes in the run's record, read from the model itself (a checkpoint has its own)."""
    results.update(params=model.num_params(), params_active=model.num_params(active=True),
                   params_non_embedding=model.num_params(exclude_embeddings=True),
                   kv_cache_bytes_per_token=model.kv_cache_bytes_per_token(next(model.parameters()).dtype))


# -- Hydra entry points for Phi-3 checkpoints (conf/model/phi3*.yaml, model.checkpoint=...) ---------------------
def build_phi3(checkpoint=None, dtype=None, **model_kwargs) -> TransformerLM:
    """The phi3 presets' `_target_`: random weights at the preset's sizes, or `checkpoint`'s weights.

    With a checkpoint its config.json decides the architecture and the preset's sizes are ignored; only
    these keys change what is loaded (see conf/model/phi3.yaml):
      attention.kernel      always used;
      attention.n_kv_heads  None (the MHA default) = the checkpoint's own; a number = mean-pool its key/value
                            heads down to that many;
      attention.window      null = the checkpoint's sliding_window; a number replaces it;
      attention_schedule    null = none; a list of mask patterns replaces the sliding window;
      dtype                 null = float32.
    """
    if checkpoint is None:
        model = TransformerLM(**model_kwargs)
        if dtype is not None:
            cast_parameters(model, resolve_dtype(dtype, torch.float32))
        return model
    attn = model_kwargs.get("attention")
    options = dict(getattr(attn, "keywords", {}))
    if attn is not None and getattr(attn, "func", attn) is not Attention:
        raise ValueError(f"a checkpoint loads into variants.Attention, not {attn!r}")
    return from_hf(checkpoint, n_kv_heads=options.get("n_kv_heads"), window=options.get("window"),
                   attention_schedule=model_kwargs.get("attention_schedule"), kernel=options.get("kernel", "auto"),
                   dtype=dtype, model_cls=partial(TransformerLM, dropout=model_kwargs.get("dropout", 0.0)))


def build_from_checkpoint(checkpoint, model_cfg: dict) -> TransformerLM:
    """`model.checkpoint=...` on any model preset: its resolved config, read by the rule of build_phi3 (the
    preset's sizes and part choices are ignored; the checkpoint's architecture is used)."""
    try:
        return instantiate({**model_cfg, "_target_": f"{__name__}.build_phi3", "checkpoint": str(checkpoint)})
    except InstantiationException as err:  # show the loader's own message, not Hydra's wrapper
        if isinstance(err.__cause__, (ValueError, RuntimeError, OSError)):
            raise err.__cause__ from None
        raise
