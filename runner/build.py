"""Turn a composed config into a model, checking it first on the meta device.

Building on `torch.device("meta")` runs every constructor's validation (head counts, rotary dims, windows,
unknown kernels) without allocating a byte, so a config that cannot work fails before data is read.
"""
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf


def _instantiate(model_cfg: DictConfig | dict):
    if isinstance(model_cfg, DictConfig):
        model_cfg = OmegaConf.to_container(model_cfg, resolve=True)
    model_cfg = dict(model_cfg)
    checkpoint = model_cfg.pop("checkpoint", None)
    if checkpoint:
        from variants.hf import build_from_checkpoint  # Phi-3 / Hugging Face weights
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
    model = _instantiate(model_cfg)
    return model.to(device)


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is visible")
    return torch.device(name)
