import os
from functools import partial
from pathlib import Path

import pytest
import torch

from variants import Attention, TransformerLM

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
os.environ.setdefault("WANDB_SILENT", "true")


def tiny_model(vocab_size=61, d_model=32, n_layers=2, n_heads=4, max_seq_len=64, n_kv_heads=None, kernel="sdpa",
               window=None, seed=0, attention_cls=Attention, attention_options=None, **kwargs):
    torch.manual_seed(seed)
    attention = partial(attention_cls, n_kv_heads=n_kv_heads, kernel=kernel, window=window, **(attention_options or {}))
    return TransformerLM(vocab_size, d_model, n_layers, n_heads, max_seq_len, attention=attention, **kwargs).eval()


def compose(overrides=()):
    """Compose conf/config.yaml as `python run.py <overrides>` would."""
    from hydra import compose as hydra_compose, initialize_config_dir
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides))


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """One tokenizer/data cache for the session's subprocess runs: the corpus is tokenized once."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
