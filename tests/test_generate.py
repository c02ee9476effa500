"""Generation: greedy against transformers' model.generate (with and without our KV cache), batched
left-padded prompts, end-of-text, sampling filters against transformers' logits warpers, and the CLI."""
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, compose, tiny_model
from runner.generate import PromptTokenizer, continuation, generate, sample_next
from test_phi3 import LONGROPE, VOCAB, save_phi3
from variants import TransformerLM

transformers = pytest.importorskip("transformers")


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path, monkeypatch):
    """task=generate writes results.json in the cwd outside Hydra: not into the checkout."""
    monkeypatch.chdir(tmp_path)


def hf_greedy(hf, prompt, n):
    ids = torch.tensor([prompt])
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n, min_new_tokens=n,
                      pad_token_id=0, eos_token_id=None)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("case", ["mini_4k", "gqa_window", "longrope_crossing"])
@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_matches_transformers_generate(tmp_path, case, use_cache):
    overrides = {"mini_4k": {}, "gqa_window": {"num_key_value_heads": 2, "sliding_window": 12},
                 "longrope_crossing": LONGROPE}[case]  # 20 + 40 tokens cross the original 32
    path, hf = save_phi3(tmp_path, **overrides)
    ours = TransformerLM.from_hf(path)
    prompt = torch.randint(0, VOCAB, (20,), generator=torch.Generator().manual_seed(3)).tolist()
    expected = hf_greedy(hf, prompt, 40)
    assert generate(ours, prompt, max_new_tokens=40, use_cache=use_cache)[0] == expected


def test_left_padded_batch_decodes_each_row_as_alone(tmp_path):
    path, hf = save_phi3(tmp_path, num_key_value_heads=2)
    ours = TransformerLM.from_hf(path)
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in (5, 17, 11)]
    alone = [generate(ours, p, max_new_tokens=32)[0] for p in prompts]
    assert generate(ours, prompts, max_new_tokens=32) == alone
    assert generate(ours, prompts, max_new_tokens=32, use_cache=False) == alone
    # transformers, left-padded with an attention mask, agrees
    P = 17
    ids = torch.tensor([[0] * (P - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
    theirs = hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=32, min_new_tokens=32,
                         pad_token_id=0, eos_token_id=None)[:, P:].tolist()
    assert theirs == alone


def test_stops_at_end_of_text_per_row():
    model = tiny_model(n_kv_heads=2)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    free = generate(model, prompts, max_new_tokens=12)
    eos = free[0][4]  # pretend row 0's fifth token is end-of-text
    out = generate(model, prompts, max_new_tokens=12, eos_token_id=[eos, 999])
    assert out[0] == free[0][:free[0].index(eos) + 1]
    assert out[1] == (free[1][:free[1].index(eos) + 1] if eos in free[1] else free[1])
    seen = []
    generate(model, prompts[0], max_new_tokens=12, eos_token_id=eos, on_token=lambda s, t, f: seen.append(int(t[0])))
    assert seen == out[0]  # streamed tokens are the returned ones, and generation stopped at the end token


def test_sampling_is_seeded_and_degenerates_to_greedy():
    model = tiny_model()
    prompt = [1, 2, 3, 4]
    a = generate(model, prompt, max_new_tokens=16, temperature=1.0, seed=7)
    assert a == generate(model, prompt, max_new_tokens=16, temperature=1.0, seed=7)
    assert a != generate(model, prompt, max_new_tokens=16, temperature=1.0, seed=8)
    greedy = generate(model, prompt, max_new_tokens=16)
    assert generate(model, prompt, max_new_tokens=16, temperature=1.0, top_k=1, seed=1) == greedy
    assert generate(model, prompt, max_new_tokens=16, temperature=1.0, top_p=1e-6, seed=1) == greedy


@pytest.mark.parametrize("temperature, top_k, top_p", [(0.7, None, None), (1.0, 5, None), (1.3, None, 0.8),
                                                       (0.9, 20, 0.5)])
def test_sampling_filters_match_transformers_warpers(temperature, top_k, top_p):
    from transformers.generation.logits_process import (LogitsProcessorList, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)
    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)] +
                                  ([TopKLogitsWarper(top_k)] if top_k else []) +
                                  ([TopPLogitsWarper(top_p)] if top_p else []))
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0)) * 3
    allowed = torch.isfinite(warpers(None, logits.clone()))
    expected = warpers(None, logits.clone()).softmax(-1)
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_next(logits, temperature, top_k, top_p, g) for _ in range(4000)])  # (N, 4)
    for row in range(4):
        counts = torch.bincount(draws[:, row], minlength=50).float() / len(draws)
        assert allowed[row, draws[:, row]].all()  # never a filtered token
        assert (counts - expected[row]).abs().max() < 0.04  # and the kept ones at their probabilities


def test_streamed_text_keeps_the_leading_space_sentencepiece_drops():
    pieces = ["\u2581def", "\u2581fib", "(n)", "<eos>"]
    tok = PromptTokenizer(None, lambda ids: "".join(pieces[i] for i in ids).replace("\u2581", " ").lstrip(),
                          [3], "sentencepiece-like", 4)
    assert tok.decode([1]) == "fib"  # alone, the space is gone
    assert continuation(tok, [0], [1, 2, 3]) == " fib(n)"


@pytest.mark.slow
def test_cli_generates_from_a_checkpoint_with_its_tokenizer(tmp_path, hf_tokenizer_dir):
    path, _ = save_phi3(tmp_path / "ckpt", vocab_size=300, eos_token_id=None)
    for f in hf_tokenizer_dir.iterdir():
        (path / f.name).write_bytes(f.read_bytes())
    out = subprocess.run([sys.executable, "run.py", "task=generate", "model=phi3", f"model.checkpoint={path}",
                          "prompt='def fibonacci(n):'", "logger=none", "generate.max_new_tokens=12",
                          f"hydra.run.dir={tmp_path / 'run'}"], cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("def fibonacci(n):")
    # the same continuation in process
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(path)
    ids = generate(TransformerLM.from_hf(path), tok("def fibonacci(n):")["input_ids"], max_new_tokens=12,
                   eos_token_id=tok.eos_token_id)[0]
    assert out.stdout.rstrip("\n") == "def fibonacci(n):" + tok.decode([t for t in ids if t != tok.eos_token_id])
    assert "tokens/s" in out.stderr


def test_main_batch_without_cache_equals_with_cache(tmp_path, hf_tokenizer_dir, capsys):
    from runner.generate import main
    path, _ = save_phi3(tmp_path, vocab_size=300)
    for f in hf_tokenizer_dir.iterdir():
        (path / f.name).write_bytes(f.read_bytes())
    base = ["task=generate", "model=phi3", f"model.checkpoint={path}", "generate.max_new_tokens=10",
            "prompt=['def f(x):','import os']"]
    with_cache = main(compose(base))
    without = main(compose(base + ["generate.use_cache=false"]))
    assert with_cache["tokens"] == without["tokens"] and len(with_cache["tokens"]) == 2
    assert "--- 'import os'" in capsys.readouterr().out


def test_main_on_a_random_preset_with_an_hf_tokenizer(hf_tokenizer_dir, capsys):
    from runner.generate import main
    cfg = compose(["task=generate", "model=gqa_rope", "tokenizer=hf", f"tokenizer.name_or_path={hf_tokenizer_dir}",
                   "data.seq_len=64", "generate.max_new_tokens=5", "generate.temperature=0.8", "generate.top_k=20"])
    result = main(cfg)
    assert len(result["tokens"][0]) == 5 and result["completions"][0]
    err = capsys.readouterr().err
    assert "random weights" in err and "the text below is noise" in err and "generate.weights=" in err


def test_the_random_weights_notice_names_the_latest_trained_run(tmp_path):
    from runner.checkpoint import save_checkpoint
    from runner.generate import random_weights_notice
    assert "train one (python run.py)" in random_weights_notice(tmp_path / "outputs")
    older, newer = (tmp_path / "outputs" / "runs" / "2026-12-01" / name for name in ("09-00-00_train", "10-00-00_train"))
    save_checkpoint(older, 3, {"model": {}})
    save_checkpoint(newer, 3, {"model": {}})
    import os
    os.utime(next((older / "checkpoints").iterdir()), (1, 1))  # the other one is the newest, whatever the clock
    notice = random_weights_notice(tmp_path / "outputs")
    assert f"generate.weights={newer}" in notice and "the text below is noise" in notice


def test_main_with_trained_weights_and_the_project_tokenizer(tmp_path, capsys):
    """generate.weights: a training run's checkpoint; the tokenizer is the run's BPE (built by runner.data)."""
    from runner.build import build_model
    from runner.checkpoint import save_checkpoint
    from runner.generate import main
    overrides = ["task=generate", "model=mqa_rope", "model.d_model=32", "model.n_layers=1", "data.max_documents=40",
                 "tokenizer.vocab_size=300", "data.seq_len=32", f"cache_dir={tmp_path / 'cache'}",
                 "generate.max_new_tokens=8", f"generate.weights={tmp_path / 'run'}"]
    torch.manual_seed(123)
    trained = build_model(compose(overrides).model).eval()
    save_checkpoint(tmp_path / "run", 6, {"model": trained.state_dict()})
    result = main(compose(overrides))
    assert "training checkpoint" in capsys.readouterr().err
    assert result["tokens"] == generate(trained, result["prompt_ids"], max_new_tokens=8, eos_token_id=result["eos_ids"])


@pytest.mark.parametrize("task", ["generate", "inspect"])
@pytest.mark.parametrize("tokenizer", [["tokenizer=bpe"], ["tokenizer=hf", "tokenizer.name_or_path=nobody/no-such-tok"]],
                         ids=["bpe", "hf_vocab_size_null"])
def test_a_bad_model_config_fails_before_any_data_is_read(tmp_path, monkeypatch, task, tokenizer):
    import importlib

    import runner.data
    import runner.data.tokenizer

    def read(*args, **kwargs):
        raise AssertionError("a corpus or tokenizer was read before the model config was checked")
    monkeypatch.setattr(runner.data, "build_data", read)  # the trained BPE's way in (it reads the corpus)
    monkeypatch.setattr(runner.data.tokenizer, "hf_tokenizer", read)  # tokenizer=hf's
    main = importlib.import_module(f"runner.{task}").main
    with pytest.raises(ValueError, match=r"model\.n_heads=3 does not divide model\.d_model"):
        main(compose([f"task={task}", "model.n_heads=3", f"cache_dir={tmp_path}", *tokenizer]))


@pytest.mark.parametrize("task", ["generate", "bench"])
def test_a_bad_compile_setting_fails_before_any_data_is_read(tmp_path, monkeypatch, task):
    import importlib

    import runner.data

    monkeypatch.setattr(runner.data, "build_data", lambda *a, **k: pytest.fail("data read before the check"))
    monkeypatch.chdir(tmp_path)  # results.json: the cwd outside Hydra
    main = importlib.import_module(f"runner.{task}").main
    with pytest.raises(ValueError, match=r"compile='sometimes' must be auto, true or false"):
        main(compose([f"task={task}", f"{task}.compile=sometimes", f"cache_dir={tmp_path}", "logger=none"]))


@pytest.fixture(scope="module")
def hf_tokenizer_dir(tmp_path_factory):
    return save_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def save_tiny_tokenizer(directory):
    """A tiny byte-level BPE (300 ids) wrapped as a transformers tokenizer, saved like a checkpoint's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1)\n", "import os\n"] * 50,
                            trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(directory)
    return directory


# -- past model.max_seq_len: the context cropped to its last max_seq_len tokens ------------------------------
CROP_POSITIONS = ["learned", "sinusoidal", "rope", "alibi"]


def _recording_logits(monkeypatch):
    """Every logits row generate() samples from, in order."""
    import runner.generate
    seen, sample = [], runner.generate.sample_next
    monkeypatch.setattr(runner.generate, "sample_next", lambda logits, *a, **k: (seen.append(logits.clone()), sample(logits, *a, **k))[1])
    return seen


def _eager_decoder(monkeypatch):
    """generate(compile=True)'s fixed-shape Decoder path, run without torch.compile (the same calls)."""
    import runner.generate
    from runner.decode import Decoder
    monkeypatch.setattr(runner.generate, "Decoder", lambda model, b, n, compile: Decoder(model, b, n, compile=False))


@pytest.mark.parametrize("position", CROP_POSITIONS)
@pytest.mark.parametrize("path", ["cache", "no_cache", "decoder"])
@pytest.mark.parametrize("prompt_len", [6, 21])  # shorter than max_seq_len, and longer
def test_cropped_generation_equals_a_fresh_forward_over_the_last_max_seq_len_tokens(monkeypatch, position, path,
                                                                                      prompt_len):
    from test_model import POSITIONS
    model = tiny_model(max_seq_len=16, position=POSITIONS[position], n_kv_heads=2)
    seen = _recording_logits(monkeypatch)
    if path == "decoder":
        _eager_decoder(monkeypatch)
    prompt = torch.randint(0, 61, (prompt_len,), generator=torch.Generator().manual_seed(5)).tolist()
    out = generate(model, prompt, max_new_tokens=24, use_cache=path != "no_cache", compile=path == "decoder")[0]
    assert len(out) == 24 and len(seen) == 24
    sequence = prompt + out
    with torch.no_grad():
        for i, logits in enumerate(seen):  # naive: the whole model over the last 16 tokens, nothing cached
            context = torch.tensor([sequence[:prompt_len + i][-16:]])
            torch.testing.assert_close(logits[0], model(context)[0, -1], atol=1e-5, rtol=1e-5)


def test_a_left_padded_row_crops_as_it_would_alone():
    model = tiny_model(max_seq_len=16, n_kv_heads=2)
    g = torch.Generator().manual_seed(6)
    prompts = [torch.randint(1, 61, (n,), generator=g).tolist() for n in (4, 13)]
    alone = [generate(model, p, max_new_tokens=10)[0] for p in prompts]
    assert generate(model, prompts, max_new_tokens=10) == alone
    assert generate(model, prompts, max_new_tokens=10, use_cache=False) == alone


def test_prompt_file_is_read_exactly_with_its_leading_newline(tmp_path, hf_tokenizer_dir, capsys):
    from transformers import AutoTokenizer

    from runner.generate import main
    text = "\ndef f(x):\n    return x, 'a=b'"  # a leading newline, quotes, a comma, '=': beyond Hydra's grammar
    (tmp_path / "prompt.txt").write_text(text, encoding="utf-8")
    cfg = compose(["task=generate", "model=gpt2", "tokenizer=hf", f"tokenizer.name_or_path={hf_tokenizer_dir}",
                   "data.seq_len=16", "generate.max_new_tokens=20", f"generate.prompt_file={tmp_path / 'prompt.txt'}"])
    result = main(cfg)
    assert result["prompts"] == [text]
    assert result["prompt_ids"] == [AutoTokenizer.from_pretrained(hf_tokenizer_dir)(text)["input_ids"]]
    assert len(result["tokens"][0]) == 20  # 20 new tokens from a 16-position model: the context was cropped
    err = capsys.readouterr().err
    assert "each new token sees only the last 16 tokens" in err


def test_a_missing_prompt_file_is_a_config_error(tmp_path):
    from runner.generate import main
    with pytest.raises(FileNotFoundError, match=r"generate\.prompt_file=.*nope\.txt is not a file") as err:
        main(compose(["task=generate", f"generate.prompt_file={tmp_path / 'nope.txt'}", f"cache_dir={tmp_path}"]))
    assert err.value.config_error
