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
