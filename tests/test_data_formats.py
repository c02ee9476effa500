"""Issue 27's data half: explicit validation files, the character tokenizer, corpora tokenized elsewhere (nanoGPT's
train.bin / val.bin, datatrove's shards), random-window sampling and task=data preparing the real cache."""
import logging

import numpy as np
import torch
import pytest

from test_data import make_cfg, naive_rows
from runner.data import build_data
from runner.task import config_checks, is_config_error


def write_files(root, texts: dict):
    root.mkdir(parents=True, exist_ok=True)
    for name, text in texts.items():
        (root / name).write_text(text)


def test_val_paths_put_exactly_those_files_in_validation(tmp_path, caplog):
    texts = {"train.txt": "the training text, long enough " * 20, "val.txt": "validation words here " * 10,
             "more.txt": "another training file " * 5}
    write_files(tmp_path / "c", texts)
    cfg = make_cfg(tmp_path, paths=[str(tmp_path / "c" / "*.txt")], val_paths=[str(tmp_path / "c" / "val.txt")],
                   seq_len=16, val_fraction=0.5)
    data = build_data(cfg)
    tok = data.tokenizer
    docs = {s: [tok.decode(np.asarray(split.take(np.arange(a, b - 1)))) for a, b in zip(split.offsets[:-1], split.offsets[1:])]
            for s, split in (("train", data.train), ("val", data.val))}
    assert docs["val"] == [texts["val.txt"]]  # exactly the named file, whatever the hash of its path says
    assert sorted(docs["train"]) == sorted([texts["more.txt"], texts["train.txt"]])


def test_a_missing_val_path_is_a_one_line_error_naming_the_key(tmp_path):
    write_files(tmp_path / "c", {"train.txt": "some text " * 10})
    cfg = make_cfg(tmp_path, paths=[str(tmp_path / "c" / "*.txt")], val_paths=[str(tmp_path / "c" / "val.txt")])
    from runner.data import check_data_config
    with pytest.raises(FileNotFoundError, match=r"^data\.val_paths=.*val\.txt.*no file matches") as err:
        with config_checks():
            check_data_config(cfg.data)
    assert is_config_error(err.value) and "\n" not in str(err.value)
    # paths that hold only the validation files leave no training file
    cfg.data.val_paths = cfg.data.paths
    with pytest.raises(ValueError, match="no training file"):
        check_data_config(cfg.data)


def test_a_hashed_split_logs_which_files_went_where(tmp_path, caplog):
    write_files(tmp_path / "c", {"train.txt": "training text " * 20, "val.txt": "validation text " * 20})
    # a fraction so small that neither path hashes below it, whatever tmp_path is (at 0.05 one run in ten drew a
    # validation file by hash and logged no fallback): the held-out fallback is what this test is about
    cfg = make_cfg(tmp_path, paths=[str(tmp_path / "c" / "*.txt")], seq_len=16, val_fraction=1e-9)
    with caplog.at_level(logging.INFO):
        data = build_data(cfg)
    logged = caplog.text
    assert "split by a hash" in logged and "data.val_paths" in logged  # the fallback says how to name the file
    held = [r.getMessage() for r in caplog.records if "holding out" in r.getMessage()]
    assert len(held) == 1 and data.stats["documents"] == {"train": 1, "val": 1}


# ---------------------------------------------------------------------------------------------------- tokenizer=char

CHAR_TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll: Speak, speak! <|endoftext|> é 漢 🙂\t"


def char_cfg(tmp_path, **tok):
    write_files(tmp_path / "c", {"a.txt": CHAR_TEXT, "b.txt": "a second file: zebra quiz " * 4})
    cfg = make_cfg(tmp_path, tokenizer="char", paths=[str(tmp_path / "c" / "a.txt")], seq_len=8, val_fraction=0.0)
    cfg.data.val_paths = [str(tmp_path / "c" / "b.txt")]
    for key, value in tok.items():
        cfg.tokenizer[key] = value
    return cfg


def test_the_character_tokenizer_round_trips_every_training_character(tmp_path):
    data = build_data(char_cfg(tmp_path))
    tok = data.tokenizer
    alphabet = sorted(set(CHAR_TEXT))
    assert tok.vocab_size == len(alphabet) + 2 and data.stats["tokenizer"]["kind"] == "char"
    ids = tok.encode(CHAR_TEXT)
    assert len(ids) == len(CHAR_TEXT)  # one id per character, the spelled-out eot included
    assert tok.decode(ids) == CHAR_TEXT and tok.eot_id not in ids and tok.unk_id not in ids
    assert [tok.decode([i]) for i in range(len(alphabet))] == alphabet  # one id for each, each its own
    stream = np.asarray(data.train.take(np.arange(data.train.n_tokens)))
    assert stream.tolist() == ids + [tok.eot_id]  # the packed training split is the text and its eot


def test_unseen_characters_map_to_the_unknown_id_and_any_id_decodes_to_text(tmp_path):
    data = build_data(char_cfg(tmp_path))
    tok = data.tokenizer
    ids = tok.encode("Zj" + "\udc80" + "e")  # not in a.txt (validation's b.txt is not the alphabet), a lone surrogate
    assert ids[:3] == [tok.unk_id] * 3 and ids[3] == tok.encode("e")[0]
    generated = np.random.default_rng(0).integers(0, tok.vocab_size + 10, 500).tolist()  # a padded embedding too
    text = tok.decode(generated)
    text.encode("utf-8")  # valid text: no lone surrogate, no byte fragment
    assert len(text) == sum(len("<|endoftext|>") if i == tok.eot_id else 1 for i in generated)


def test_the_character_alphabet_is_cached_by_corpus(tmp_path, monkeypatch):
    cfg = char_cfg(tmp_path)
    first = build_data(cfg).stats["tokenizer"]
    second = build_data(cfg).stats["tokenizer"]
    assert first["trained"] and not second["trained"] and first["path"] == second["path"]
    assert first["fingerprint"] == second["fingerprint"]
    (tmp_path / "c" / "a.txt").write_text(CHAR_TEXT + "Q")  # another corpus: another alphabet
    third = build_data(cfg).stats["tokenizer"]
    assert third["trained"] and third["vocab_size"] == first["vocab_size"] + 1


def test_a_vocabulary_below_the_bpe_minimum_points_to_the_character_tokenizer(tmp_path):
    from runner.data.tokenizer import check_tokenizer_config
    cfg = make_cfg(tmp_path)
    cfg.tokenizer.vocab_size = 65
    with pytest.raises(ValueError, match=r"^tokenizer\.vocab_size=65 .*tokenizer=char") as err:
        with config_checks():
            check_tokenizer_config(cfg.tokenizer)
    assert is_config_error(err.value) and "\n" not in str(err.value)
    with pytest.raises(ValueError, match="tokenizer.vocab_size=5 is smaller than the"):
        build_data(char_cfg(tmp_path, vocab_size=5))


def test_tokenizer_char_composes_and_the_model_takes_its_size(tmp_path):
    from conftest import compose
    from runner.build import check_model_config
    cfg = compose(["tokenizer=char", "data=local", "data.paths=[x.txt]"])
    assert cfg.tokenizer.kind == "char" and cfg.model.vocab_size is None  # the trainer sets it from the tokenizer
    check_model_config(cfg.model)


# ---------------------------------------------------------------------------------------------------- data=tokenized

def random_docs(n, vocab, seed, avoid=None):
    rng = np.random.default_rng(seed)
    docs = [rng.integers(0, vocab, rng.choice([1, 2, 5, 13, 40])).tolist() for _ in range(n)]
    return [[t if t != avoid else (t + 1) % vocab for t in d] for d in docs]


def tokenized_cfg(tmp_path, fmt, train, val, vocab=300, eot=None, **data):
    cfg = make_cfg(tmp_path, data="tokenized", tokenizer="ids", format=fmt, paths=train, val_paths=val, seq_len=8)
    cfg.tokenizer.vocab_size, cfg.tokenizer.eot_id = vocab, eot
    for key, value in data.items():
        cfg.data[key] = value
    return cfg


def assert_rows(split, docs, eot, pad, packing):
    """Every row equals the naive token-by-token reference of test_data (eot appended after each document)."""
    want = np.array(naive_rows(docs, eot, pad, split.seq_len, packing), dtype=np.int64)
    for k, name in enumerate(("input_ids", "labels", "position_ids", "document_ids")):
        np.testing.assert_array_equal(getattr(split, name), want[..., k], err_msg=name)


def write_nanogpt(path, docs, sep, dtype=np.uint16):
    np.array([t for d in docs for t in d + [sep]], dtype=dtype).tofile(path)


@pytest.mark.parametrize("packing", ["documents", "none"])
def test_nanogpt_bins_are_read_in_place_with_documents_at_the_separator(tmp_path, packing):
    eot = 299
    train, val = random_docs(30, 299, 0, avoid=eot), random_docs(7, 299, 1, avoid=eot)
    write_nanogpt(tmp_path / "train.bin", train, eot)
    write_nanogpt(tmp_path / "val.bin", val, eot)
    cfg = tokenized_cfg(tmp_path, "nanogpt", [str(tmp_path / "train.bin")], [str(tmp_path / "val.bin")], eot=eot,
                        packing=packing)
    data = build_data(cfg)
    assert_rows(data.train, train, eot, eot, packing)
    assert_rows(data.val, val, eot, eot, packing)
    shard = data.train.shards[0]
    assert isinstance(shard, np.memmap) and shard.filename == str(tmp_path / "train.bin")  # no copy
    assert data.stats["documents"] == {"train": 30, "val": 7} and data.tokenizer.vocab_size == 300
    again = build_data(cfg)  # the separator scan is cached, the rows are the same
    np.testing.assert_array_equal(again.train.offsets, data.train.offsets)


def test_a_nanogpt_file_without_separator_is_one_stream_cut_into_rows(tmp_path):
    ids = np.random.default_rng(0).integers(0, 65, 100).astype(np.uint16)  # shakespeare_char: 65 characters
    ids.tofile(tmp_path / "train.bin")
    ids[:20].tofile(tmp_path / "val.bin")
    cfg = tokenized_cfg(tmp_path, "nanogpt", [str(tmp_path / "train.bin")], [str(tmp_path / "val.bin")], vocab=65)
    data = build_data(cfg)
    rows = data.train.rows(np.arange(len(data.train)))
    assert len(data.train) == 13 and data.stats["documents"]["train"] == 1
    np.testing.assert_array_equal(rows["input_ids"].ravel()[:100], ids)  # nanoGPT's x: consecutive ids
    np.testing.assert_array_equal(rows["labels"].ravel()[:99], ids[1:])   # nanoGPT's y: the next id
    np.testing.assert_array_equal(rows["position_ids"][1], np.arange(8))  # each row a fresh window


def datatrove_layout(root, name, docs, token_size=2):
    """datatrove's DocumentTokenizer output, written by hand from its documented layout: little-endian ids,
    uint64 document ends, and `<tokenizer>|<token size>` then the token count in the metadata."""
    ids = np.array([t for d in docs for t in d], dtype="<u2" if token_size == 2 else "<u4")
    ids.tofile(root / f"{name}.ds")
    np.cumsum([len(d) for d in docs]).astype("<u8").tofile(root / f"{name}.ds.index")
    (root / f"{name}.ds.metadata").write_text(f"gpt2|{token_size}\n{len(ids)}\n{len(ids)}T")


def test_datatrove_shards_by_their_documented_layout(tmp_path):
    eot = 70_000  # above uint16: the metadata says 4-byte ids
    docs = [d + [eot] for d in random_docs(25, 70_000, 2)]  # datatrove appends the eos to each document
    (tmp_path / "tr").mkdir()
    datatrove_layout(tmp_path / "tr", "000_train", docs[:10], 4)
    datatrove_layout(tmp_path / "tr", "001_train", docs[10:20], 4)
    datatrove_layout(tmp_path, "val", docs[20:], 4)
    cfg = tokenized_cfg(tmp_path, "datatrove", [str(tmp_path / "tr" / "*.ds")], [str(tmp_path / "val.ds")],
                        vocab=70_001, eot=eot)
    data = build_data(cfg)
    assert len(data.train.shards) == 2 and data.stats["documents"] == {"train": 20, "val": 5}
    assert_rows(data.train, [d[:-1] for d in docs[:20]], eot, eot, "documents")
    assert_rows(data.val, [d[:-1] for d in docs[20:]], eot, eot, "documents")


def test_datatrove_files_written_by_datatrove_itself(tmp_path):
    tokens_mod = pytest.importorskip("datatrove.pipeline.tokens.tokenizer")
    eot = 50256
    docs = [d + [eot] for d in random_docs(12, 50256, 3)]
    for name, part in (("train.ds", docs[:9]), ("val.ds", docs[9:])):
        f = tokens_mod.TokenizedFile(str(tmp_path), name, save_final_metadata=True, tokenizer_name_or_path="gpt2")
        for d in part:
            f.write(d, None)
        f.close()
    assert (tmp_path / "train.ds.index").exists() and (tmp_path / "train.ds.metadata").exists()
    cfg = tokenized_cfg(tmp_path, "datatrove", [str(tmp_path / "train.ds")], [str(tmp_path / "val.ds")],
                        vocab=50257, eot=eot, packing="none")
    data = build_data(cfg)
    assert_rows(data.train, [d[:-1] for d in docs[:9]], eot, eot, "none")
    assert_rows(data.val, [d[:-1] for d in docs[9:]], eot, eot, "none")


def test_ids_beyond_the_vocabulary_and_a_text_tokenizer_are_one_line_errors(tmp_path):
    write_nanogpt(tmp_path / "train.bin", [[1, 2, 3, 400]], 5)
    write_nanogpt(tmp_path / "val.bin", [[1, 2]], 5)
    cfg = tokenized_cfg(tmp_path, "nanogpt", [str(tmp_path / "train.bin")], [str(tmp_path / "val.bin")], vocab=300)
    with pytest.raises(ValueError, match=r"^tokenizer\.vocab_size=300 is not above the largest token id 400") as err:
        build_data(cfg)
    assert is_config_error(err.value) and "\n" not in str(err.value)
    cfg.tokenizer = make_cfg(tmp_path).tokenizer  # a BPE: its ids are not these
    with pytest.raises(ValueError, match=r"^tokenizer\.kind='bpe' cannot describe ids") as err:
        build_data(cfg)
    assert is_config_error(err.value)
    from runner.data import check_data_config
    for key, value, message in (("format", "megatron", "data.format='megatron'"), ("val_paths", [], "data.val_paths"),
                                ("token_size", 3, "data.token_size=3")):
        bad = cfg.copy()
        bad.data[key] = value
        with pytest.raises(ValueError, match=message):
            check_data_config(bad.data)


def test_data_tokenized_composes(tmp_path):
    from conftest import compose
    cfg = compose(["data=tokenized", "tokenizer=ids", "tokenizer.vocab_size=65", "data.format=datatrove"])
    assert cfg.model.vocab_size == 65 and cfg.data.source == "tokenized"


# ---------------------------------------------------------------------------------------------------- data.sampling=windows

def stream_split(seq_len=8):
    from runner.data.packing import pack
    docs = random_docs(60, 97, 4)
    return pack(docs, eot_id=99, pad_id=98, seq_len=seq_len), docs


def test_windows_are_the_streams_tokens_at_their_offsets():
    from runner.data import batch_loader
    split, docs = stream_split()
    stream = [t for d in docs for t in d + [99]]
    doc_of = [i for i, d in enumerate(docs) for _ in range(len(d) + 1)]
    loader = batch_loader(split, 16, seed=3, sampling="windows")
    for _ in range(5):
        starts = loader.starts(loader.position)
        batch = next(loader)
        for row, s in enumerate(starts):  # the reference, token by token, from the plain stream
            s = int(s)
            assert batch["input_ids"][row].tolist() == stream[s:s + 8]
            want_labels = [stream[i + 1] if doc_of[i + 1] == doc_of[i] else -100 for i in range(s, s + 8)]
            assert batch["labels"][row].tolist() == want_labels
            first = [i for i in range(s, s + 8) if i == s or doc_of[i] != doc_of[i - 1]]
            assert batch["position_ids"][row].tolist() == [i - max(j for j in first if j <= i) for i in range(s, s + 8)]
            assert batch["document_ids"][row].tolist() == doc_of[s:s + 8]
    everywhere = np.concatenate([loader.starts(k) for k in range(200)])
    assert everywhere.min() == 0 and everywhere.max() == split.n_tokens - 9  # every offset can be drawn


def test_random_window_batches_resume_exactly_after_a_state_dict_round_trip():
    from runner.data import batch_loader
    split, _ = stream_split()
    first = batch_loader(split, 4, seed=7, sampling="windows")
    for _ in range(3):
        next(first)
    state = first.state_dict()
    expected = [next(first) for _ in range(4)]
    resumed = batch_loader(split, 4, seed=7, sampling="windows")
    resumed.load_state_dict(state)
    for want, got in zip(expected, (next(resumed) for _ in range(4))):
        for name in want:
            assert torch.equal(want[name], got[name]), name
    other = batch_loader(split, 4, seed=8, sampling="windows")  # the seed decides the windows
    assert not torch.equal(next(other)["input_ids"], next(batch_loader(split, 4, seed=7, sampling="windows"))["input_ids"])
    # two shards of half a batch draw exactly the windows of one whole batch, and refuse a rows checkpoint
    halves = [batch_loader(split, 2, seed=7, rank=r, world_size=2, sampling="windows") for r in range(2)]
    whole = next(batch_loader(split, 4, seed=7, sampling="windows"))["input_ids"]
    parts = [next(h)["input_ids"] for h in halves]
    assert torch.equal(torch.stack(parts, 1).reshape(4, -1), whole)
    with pytest.raises(ValueError, match="data.sampling=rows"):
        resumed.load_state_dict({"epoch": 0, "position": 1})
    with pytest.raises(ValueError, match="data.sampling='random'"):
        batch_loader(split, 4, sampling="random")


# ---------------------------------------------------------------------------------------------------- task=data

def test_task_data_prepares_the_runs_own_cache(tmp_path, monkeypatch, capsys):
    from runner.data import main
    write_files(tmp_path / "c", {f"{i}.txt": f"document {i} " * 30 for i in range(6)})
    cfg = make_cfg(tmp_path, paths=[str(tmp_path / "c" / "*.txt")], val_paths=[str(tmp_path / "c" / "0.txt")],
                   seq_len=16)
    cfg.data.bench = False
    monkeypatch.chdir(tmp_path)  # outside Hydra, the output directory is the cwd
    prepared = main(cfg)
    printed = capsys.readouterr().out
    assert "ready in" in printed and (tmp_path / "data_stats.json").exists() and not prepared["cached"]
    then = build_data(cfg)  # what a training run then loads: nothing to train or tokenize
    assert then.stats["cached"] and not then.stats["tokenizer"]["trained"]
    assert then.stats["cache_path"] == prepared["cache_path"] and then.stats["cache_path"].startswith(str(tmp_path / "cache"))


# ---------------------------------------------------------------------------------------------------- end to end

@pytest.mark.slow
def test_a_windows_run_resumes_to_the_uninterrupted_curve(tmp_path, cache_dir):
    from test_train import results, run, strip_timing
    args = ["hydra.run.dir=run", "train.checkpoint_every=3", "data.sampling=windows"]
    run(args, tmp_path, cache_dir)
    full = results(tmp_path / "run")["curves"]
    sorted((tmp_path / "run" / "checkpoints").glob("step_*.pt"))[-1].unlink()  # as if it died after step 3
    run([*args, "train.resume=true"], tmp_path, cache_dir)
    resumed = results(tmp_path / "run")
    assert resumed["resumed_from"].endswith("step_0000003.pt")
    assert strip_timing(resumed["curves"]["train"]) == strip_timing(full["train"])


@pytest.mark.slow
def test_char_and_pretokenized_runs_train(tmp_path, cache_dir, monkeypatch):
    """tokenizer=char on a text, then nanoGPT-style bins of its ids with tokenizer=ids: both train and evaluate."""
    from test_train import results, run
    write_files(tmp_path / "c", {"train.txt": CHAR_TEXT * 40, "val.txt": CHAR_TEXT * 5})
    run(["hydra.run.dir=char", "tokenizer=char", "data=local", "data.paths=[c/*.txt]", "data.val_paths=[c/val.txt]",
         "data.max_documents=null", "data.seq_len=16"], tmp_path, cache_dir)
    char = results(tmp_path / "char")
    assert char["status"] == "ok" and char["data"]["tokenizer"]["kind"] == "char"
    assert char["data"]["documents"] == {"train": 1, "val": 1}
    ids = np.random.default_rng(0).integers(0, 65, 4000).astype(np.uint16)
    ids.tofile(tmp_path / "train.bin")
    ids[:600].tofile(tmp_path / "val.bin")
    import test_train  # data=tokenized has no data.max_documents to cap: the tiny run without it
    monkeypatch.setattr(test_train, "TINY", [a for a in test_train.TINY if not a.startswith("data.max_documents")])
    run(["hydra.run.dir=bins", "data=tokenized", "data.paths=[train.bin]", "data.val_paths=[val.bin]", "tokenizer=ids",
         "tokenizer.vocab_size=65", "data.sampling=windows", "data.seq_len=16"], tmp_path, cache_dir)
    bins = results(tmp_path / "bins")
    assert bins["status"] == "ok" and bins["data"]["tokens"] == {"train": 4000, "val": 600}
