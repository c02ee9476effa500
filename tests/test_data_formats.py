"""Issue 27's data half: explicit validation files, the character tokenizer, corpora tokenized elsewhere (nanoGPT's
train.bin / val.bin, datatrove's shards), random-window sampling and task=data preparing the real cache."""
import logging

import numpy as np
import pytest

from test_data import make_cfg
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
    cfg = make_cfg(tmp_path, paths=[str(tmp_path / "c" / "*.txt")], seq_len=16, val_fraction=0.05)
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
