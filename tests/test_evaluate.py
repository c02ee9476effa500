"""task=eval: validation perplexity of a training run's weights, end to end in a subprocess, against a naive
loop that scores one document piece at a time; a Phi-3 checkpoint against transformers' own model; and the
checks that stop a request before any work (a checkpoint without its tokenizer, a vocabulary too small)."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, compose

TINY = ["model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.attention.n_kv_heads=1",
        "data.max_documents=60", "tokenizer.vocab_size=300", "data.seq_len=32", "train.batch_size=4",
        "train.device=cpu", "logger=none"]


def run(args, cwd, cache_dir):
    cmd = [sys.executable, str(ROOT / "run.py"), *TINY, f"cache_dir={cache_dir}", *args]
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, f"{' '.join(args)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def record(run_dir) -> dict:
    return json.loads((Path(run_dir) / "results.json").read_text())


@torch.no_grad()
def naive_nll(forward, split, n_rows=None) -> tuple[float, int]:
    """Summed -log p(next token) and the number of targets over the first n_rows rows. Each piece of a row
    that holds one document runs alone from position 0 (no document mask involved); targets come from
    input_ids and document_ids (the next slot, in the next row too, while it holds the same document), not
    from the stored labels."""
    ids, docs = torch.tensor(np.array(split.input_ids)), torch.tensor(np.array(split.document_ids))
    flat_ids, flat_docs, T = ids.flatten(), docs.flatten(), ids.shape[1]
    nll, count = 0.0, 0
    for r in range(ids.shape[0] if n_rows is None else n_rows):
        start = 0
        while start < T:
            doc, end = int(docs[r, start]), start
            while end < T and docs[r, end] == doc:
                end += 1
            if doc >= 0:
                logp = forward(ids[r, start:end][None])[0].double().log_softmax(-1)  # (piece, V)
                for t in range(start, end):
                    nxt = r * T + t + 1
                    if nxt < len(flat_ids) and flat_docs[nxt] == doc:
                        nll -= logp[t - start, flat_ids[nxt]].item()
                        count += 1
            start = end
    return nll, count


@pytest.mark.slow
def test_eval_of_a_training_run_agrees_with_a_naive_token_loop(tmp_path, cache_dir):
    run(["hydra.run.dir=train", "train.max_steps=4", "train.checkpoint_every=4", "train.eval_every=0",
         "train.warmup_steps=1", "train.bench=false"], tmp_path, cache_dir)
    out = run(["task=eval", "hydra.run.dir=eval", f"eval.weights={tmp_path / 'train'}"], tmp_path, cache_dir)
    r = record(tmp_path / "eval")
    assert r["status"] == "ok" and r["task"] == "eval" and r["params"] > 0
    assert r["weights"].endswith("step_0000004.pt")
    m = r["metrics"]
    assert m["val_ppl"] == pytest.approx(math.exp(m["val_loss"]), rel=1e-12)
    # the training run's own final evaluation (the whole split, the same batches) saw the same weights
    assert m["val_loss"] == pytest.approx(record(tmp_path / "train")["metrics"]["val_loss"], rel=1e-6)
    assert "val loss" in out.stdout and "ppl" in out.stdout and str(tmp_path / "eval") in out.stdout

    from runner.build import build_model
    from runner.data import build_data
    cfg = compose([*TINY, f"cache_dir={cache_dir}"])
    data = build_data(cfg)
    model = build_model(cfg.model).eval()
    model.load_state_dict(torch.load(tmp_path / "train/checkpoints/step_0000004.pt", weights_only=False)["model"])
    nll, count = naive_nll(model, data.val)
    assert m["val_tokens"] == count and m["val_rows"] == len(data.val)
    assert m["val_loss"] == pytest.approx(nll / count, rel=1e-5)


def test_a_checkpoint_without_an_hf_tokenizer_fails_before_any_work(tmp_path, monkeypatch):
    from runner.evaluate import main
    monkeypatch.chdir(tmp_path)  # results.json: the cwd outside Hydra
    cfg = compose(["task=eval", "model=phi3", f"model.checkpoint={tmp_path / 'never-read'}", "logger=none",
                   f"cache_dir={tmp_path / 'cache'}"])
    with pytest.raises(ValueError, match="tokenizer=hf"):
        main(cfg)
    r = record(tmp_path)
    assert r["status"] == "failed" and "tokenizer=hf" in r["error"]["message"]
    assert not (tmp_path / "cache").exists()  # no corpus read, no tokenizer trained


def save_tokenizer(directory) -> Path:
    """A byte-level BPE of 300 ids as a transformers tokenizer, saved like a checkpoint's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["def f(x):\n    return x + 1\n", "import os\nprint(os.getcwd())\n"] * 20, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(directory)
    return Path(directory)


def save_phi3(directory, vocab_size):
    import transformers
    torch.manual_seed(0)
    config = transformers.Phi3Config(vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                     num_attention_heads=2, max_position_embeddings=64, pad_token_id=None,
                                     bos_token_id=None, eos_token_id=None)
    hf = transformers.Phi3ForCausalLM(config).eval()
    hf.save_pretrained(directory)
    return hf


def test_a_phi3_checkpoint_scores_as_transformers_does_and_must_cover_the_tokenizer(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    from runner.data import build_data
    from runner.evaluate import main
    monkeypatch.chdir(tmp_path)
    tokenizer = save_tokenizer(tmp_path / "tokenizer")
    hf = save_phi3(tmp_path / "phi3", vocab_size=300)
    overrides = ["task=eval", "model=phi3", "tokenizer=hf", f"tokenizer.name_or_path={tokenizer}",
                 "data.max_documents=20", "data.seq_len=32", "eval.batches=8", "eval.batch_size=4", "logger=none",
                 f"cache_dir={tmp_path / 'cache'}"]
    m = main(compose([*overrides, f"model.checkpoint={tmp_path / 'phi3'}"]))["metrics"]
    assert m["val_rows"] == 32
    nll, count = naive_nll(lambda ids: hf(ids).logits, build_data(compose(overrides)).val, n_rows=32)
    assert m["val_tokens"] == count and m["val_loss"] == pytest.approx(nll / count, rel=1e-5)

    save_phi3(tmp_path / "small", vocab_size=256)  # 290 token ids, 256 embeddings
    with pytest.raises(ValueError, match="256 token embeddings, the tokenizer 290"):
        main(compose([*overrides, f"model.checkpoint={tmp_path / 'small'}"]))
