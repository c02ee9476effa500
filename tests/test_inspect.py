"""task=inspect: parameter counts written out by hand, hidden-state shapes, next-token probabilities, and the
KV-cache size for MHA, GQA and MQA against the analytic formula and an allocated cache."""
import pytest
import torch

from conftest import compose, tiny_model
from runner.inspect import format_report, inspect_model, main
from test_generate import save_tiny_tokenizer
from test_phi3 import save_phi3

@pytest.fixture(scope="module")
def hf_tokenizer_dir(tmp_path_factory):
    return save_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))


SECTIONS = ["== model ==", "== module tree ==", "== parameters ==", "== shapes for the prompt ==",
            "== next token ==", "== KV cache =="]


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_cache_numbers(n_kv_heads, dtype):
    model = tiny_model(d_model=32, n_layers=3, n_heads=4, n_kv_heads=n_kv_heads, max_seq_len=64).to(dtype)
    r = inspect_model(model, [1, 2, 3, 4, 5])
    kv = r["kv_cache"]
    analytic = 2 * 3 * n_kv_heads * 8 * dtype.itemsize  # K and V x layers x KV heads x head_dim x bytes
    assert kv["bytes_per_token"] == kv["model_bytes_per_token"] == analytic
    assert kv["bytes_full_context"] == analytic * 64
    assert kv["allocated_prompt"] == {"tokens": 5, "nbytes": analytic * 5, "expected": analytic * 5}
    assert kv["allocated_full"]["nbytes"] == analytic * 64 and kv["matches"]
    assert kv["mha_bytes_per_token"] // kv["bytes_per_token"] == 4 // n_kv_heads
    text = format_report(r)
    assert f"{n_kv_heads} KV heads x head_dim 8 x {dtype.itemsize} bytes" in text
    assert f"{analytic * 64:,} bytes, matches" in text


@pytest.mark.parametrize("tie", [False, True])
def test_parameter_counts_add_up(tie):
    model = tiny_model(vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, tie_embeddings=tie)
    pc = inspect_model(model, [1, 2, 3])["parameters"]
    d, hd, kv, hidden = 32, 8, 2, model.blocks[0].ffn.gate_proj.out_features
    attention = 2 * d * 4 * hd + 2 * d * kv * hd  # q, o + k, v
    block = attention + 3 * d * hidden + 2 * d
    assert pc["blocks"] == [{"attention": attention, "ffn": 3 * d * hidden, "norms": 2 * d, "total": block}] * 2
    assert pc["embedding"] == 61 * d and pc["lm_head"] == (0 if tie else 61 * d) and pc["final_norm"] == d
    assert pc["total"] == 61 * d * (1 if tie else 2) + 2 * block + d == model.num_params()
    assert pc["parts_sum_matches_total"]


def test_shapes_and_next_token():
    model = tiny_model(vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=1)
    r = inspect_model(model, [5, 6, 7, 8, 9, 10, 11], decode=lambda ids: f"<{ids[0]}>", top=5)
    shapes = {h["name"]: h["shape"] for h in r["shapes"]}
    assert shapes["input_ids"] == [1, 7] and shapes["embed"] == [1, 7, 32]
    assert shapes["block 0 q_proj"] == [1, 7, 32] and shapes["block 0 k_proj"] == [1, 7, 8]  # MQA: one K head
    assert shapes["block 1"] == shapes["final norm"] == [1, 7, 32] and shapes["logits"] == [1, 7, 61]
    with torch.no_grad():
        probs = model(torch.tensor([[5, 6, 7, 8, 9, 10, 11]]))[0, -1].softmax(-1)
    top = r["next_token"]
    assert [c["id"] for c in top] == probs.topk(5).indices.tolist()
    assert [c["prob"] for c in top] == pytest.approx(probs.topk(5).values.tolist())
    assert top[0]["text"] == f"<{top[0]['id']}>"


def test_task_inspect_on_a_checkpoint(tmp_path, hf_tokenizer_dir, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # inspect.json goes to the run directory, here the cwd
    path, _ = save_phi3(tmp_path, vocab_size=300, num_key_value_heads=1, tie_word_embeddings=True)
    for f in hf_tokenizer_dir.iterdir():
        (path / f.name).write_bytes(f.read_bytes())
    report = main(compose(["task=inspect", "model=phi3", f"model.checkpoint={path}", "prompt=import os"]))
    out = capsys.readouterr().out
    for section in SECTIONS:
        assert section in out
    assert "(0-1): 2 x PreNormBlock" in out  # torch's repr folds the identical blocks
    assert "tied: the embedding matrix" in out and "1 KV heads" in out
    kv = report["kv_cache"]
    assert kv["bytes_per_token"] == 2 * 2 * 1 * 16 * 4 and kv["max_seq_len"] == 128 and kv["matches"]
    assert report["shapes"][-1]["shape"] == [1, len(report["prompt_ids"]), 300]


def test_task_inspect_on_a_preset(tmp_path, hf_tokenizer_dir, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main(compose(["task=inspect", "model=mqa_rope", "tokenizer=hf", f"tokenizer.name_or_path={hf_tokenizer_dir}",
                  "data.seq_len=64", "model.n_layers=2"]))
    out = capsys.readouterr().out
    for section in SECTIONS:
        assert section in out
    assert "random weights" in out and (tmp_path / "inspect.json").is_file()
    assert "1 KV heads x head_dim 32 x 4 bytes (float32)" in out
