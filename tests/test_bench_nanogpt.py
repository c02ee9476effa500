"""runner/bench/nanogpt.py against a stand-in for nanoGPT's model.py (its API: GPT, GPTConfig,
configure_optimizers, forward(idx, targets) -> (logits, loss)), a bigram model whose scores are easy to check."""
import json
import math

import torch
import torch.nn.functional as F

STAND_IN = '''
from dataclasses import dataclass
import torch
import torch.nn.functional as F
from torch import nn

@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True

class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.table = nn.Embedding(config.vocab_size, config.vocab_size)

    def forward(self, idx, targets=None):
        logits = self.table(idx)
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return logits, loss

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        return torch.optim.AdamW(self.parameters(), lr=learning_rate, betas=betas)
'''


def test_the_comparison_runs_and_scores_every_validation_character_once(tmp_path):
    from runner.bench import nanogpt
    (tmp_path / "nanoGPT").mkdir()
    (tmp_path / "nanoGPT" / "model.py").write_text(STAND_IN)
    text = "".join(chr(97 + (i * 7) % 13) for i in range(3000)) + "\nthe end\n"
    (tmp_path / "input.txt").write_text(text)
    result = nanogpt.main(["--nanogpt", str(tmp_path / "nanoGPT"), "--text", str(tmp_path / "input.txt"),
                           "--steps", "4", "--rounds", "2", "--json", str(tmp_path / "out.json")])
    assert json.loads((tmp_path / "out.json").read_text())["vocab"] == len(set(text)) == result["vocab"]
    assert len(result["ratios"]) == 2 and all(r > 0 for r in result["ratios"])
    assert all(math.isfinite(v) for v in result["val_nll"].values())

    # a bigram model sees one character of context: the windowed score must equal the plain per-character NLL
    train, val, vocab = nanogpt.char_splits(text)
    assert len(train) + len(val) == len(text) and len(train) == int(0.9 * len(text))
    side = nanogpt.NanoGPTSide(tmp_path / "nanoGPT", vocab, steps=1, seed=0)
    with torch.no_grad():
        naive = F.cross_entropy(side.model.table(val[:-1]), val[1:]).item()
    assert abs(nanogpt.validation_nll(side, val, block=64) - naive) < 1e-5


def test_nanogpt_compile_trains_nanogpts_side_through_torch_compile_as_its_train_py_does(tmp_path, monkeypatch):
    from runner.bench import nanogpt
    (tmp_path / "nanoGPT").mkdir()
    (tmp_path / "nanoGPT" / "model.py").write_text(STAND_IN)
    compiled = []

    def fake_compile(model, **kwargs):  # records what was compiled; runs it eagerly
        compiled.append((type(model).__name__, kwargs))
        return model
    monkeypatch.setattr(torch, "compile", fake_compile)
    eager = nanogpt.NanoGPTSide(tmp_path / "nanoGPT", 20, steps=1, seed=0)
    assert compiled == [] and eager.forward_model is eager.model
    side = nanogpt.NanoGPTSide(tmp_path / "nanoGPT", 20, steps=1, seed=0, compile=True)
    assert compiled == [("GPT", {})]  # train.py's plain torch.compile(model)
    x = torch.randint(0, 20, (2, 8))
    assert torch.isfinite(side.step(x, x))
