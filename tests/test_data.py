"""The packed-document pipeline: every row checked against a naive reference built token by token in pure
Python, the split, the seeded and resumable loader, local files, the Hub's offline failure, bad input."""
import json
import os
import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from omegaconf import OmegaConf

from conftest import CONF, ROOT, compose
from runner.data.corpus import load_corpus, wikitext_articles
from runner.data import BatchLoader, build_data, iter_eval_batches, main
from runner.data.packing import PackedSplit, pack

WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches "
         "def return import class lambda yield None True False ( ) [ ] { } : , . = + - * / \n \t").split(" ")


def write_txt_corpus(root, n_docs=40, seed=0):
    """Documents of very different lengths (longer than a row, a few tokens, empty) as one .txt file each."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        n = rng.choice([0, 1, 3, 20, 60, 300])
        text = " ".join(rng.choice(WORDS) for _ in range(n))
        if i == 5:
            text = "a document that spells out <|endoftext|> in its text"
        (root / f"doc{i:03d}.txt").write_text(text)
    return sorted(root.glob("*.txt"))


def make_cfg(tmp_path, data="local", tokenizer="bpe", **data_overrides):
    d = OmegaConf.load(CONF / "data" / f"{data}.yaml")
    t = OmegaConf.load(CONF / "tokenizer" / f"{tokenizer}.yaml")
    t.vocab_size = 300 if tokenizer == "bpe" else t.vocab_size
    cfg = OmegaConf.create({"data": d, "tokenizer": t, "cache_dir": str(tmp_path / "cache")})
    for key, value in data_overrides.items():
        cfg.data[key] = value
    return cfg


@pytest.fixture
def txt_cfg(tmp_path):
    write_txt_corpus(tmp_path / "docs")
    return make_cfg(tmp_path, paths=[str(tmp_path / "docs" / "*.txt")], seq_len=16, val_fraction=0.2)


def naive_rows(docs, eot, pad, T, packing):
    """The reference layout, one token at a time: (input, label, position, document) per slot."""
    rows, row = [], []
    def flush():
        nonlocal row
        if row:
            rows.append(row + [(pad, -100, 0, -1)] * (T - len(row)))
        row = []
    stream = [(tok, d) for d, doc in enumerate(docs) for tok in list(doc) + [eot]]
    for i, (tok, d) in enumerate(stream):
        if packing == "none" and row and row[-1][3] != d:
            flush()
        nxt = stream[i + 1] if i + 1 < len(stream) else None
        label = nxt[0] if nxt is not None and nxt[1] == d else -100
        prev = row[-1] if row else None
        pos = prev[2] + 1 if prev is not None and prev[3] == d else 0
        row.append((tok, label, pos, d))
        if len(row) == T:
            flush()
    flush()
    return rows


@pytest.mark.parametrize("packing", ["documents", "none"])
@pytest.mark.parametrize("T", [2, 5, 16])
def test_pack_matches_a_naive_token_by_token_reference(packing, T):
    rng = random.Random(T)
    docs = [[rng.randrange(1, 50) for _ in range(rng.choice([0, 1, 2, 4, 7, 23]))] for _ in range(30)]
    got = pack(docs, eot_id=0, pad_id=99, seq_len=T, packing=packing)
    want = np.array(naive_rows(docs, 0, 99, T, packing), dtype=np.int64)  # (N, T, 4)
    for k, name in enumerate(("input_ids", "labels", "position_ids", "document_ids")):
        np.testing.assert_array_equal(getattr(got, name), want[..., k], err_msg=name)


@pytest.mark.parametrize("packing", ["documents", "none"])
def test_every_training_token_appears_once_in_order(tmp_path, txt_cfg, packing):
    txt_cfg.data.packing = packing
    data = build_data(txt_cfg)
    corpus = load_corpus(txt_cfg.data, txt_cfg.cache_dir)
    tok, tr = data.tokenizer, data.train
    real = tr.document_ids >= 0
    flat_ids, flat_docs = tr.input_ids[real], tr.document_ids[real]
    # the separators are exactly the last token of each document
    last = np.r_[flat_docs[1:] != flat_docs[:-1], True]
    assert (flat_ids[last] == tok.eot_id).all() and (flat_ids[~last] != tok.eot_id).all()
    rebuilt = [flat_ids[(flat_docs == d) & ~last].tolist() for d in range(flat_docs.max() + 1)]
    reference = [tok.encode(text) for text in corpus.train]  # one by one, not batched
    assert rebuilt == reference
    assert len(reference) == data.stats["documents"]["train"] == len(corpus.train)
    assert data.stats["tokens"]["train"] == sum(len(r) + 1 for r in reference)


def test_rows_keep_the_document_conventions(txt_cfg):
    data = build_data(txt_cfg)
    eot = data.tokenizer.eot_id
    for split in (data.train, data.val):
        ids, labels, pos, docs = (np.asarray(getattr(split, n)) for n in
                                  ("input_ids", "labels", "position_ids", "document_ids"))
        # position_ids restart at each document and each row, and count up by one otherwise
        same = docs[:, 1:] == docs[:, :-1]
        assert (pos[:, 0] == 0).all()
        assert (pos[:, 1:][same & (docs[:, 1:] >= 0)] == pos[:, :-1][same & (docs[:, 1:] >= 0)] + 1).all()
        assert (pos[:, 1:][~same] == 0).all()
        # document_ids change exactly after a separator (across row boundaries too)
        flat_ids, flat_docs = ids.ravel(), docs.ravel()
        changes = flat_docs[1:] != flat_docs[:-1]
        after_eot = (flat_ids[:-1] == eot) & (flat_docs[:-1] >= 0)  # pad_id may equal eot_id: padding is doc -1
        assert (changes == after_eot).all()
        # no label reaches across a boundary: a label is the next token of the same document, or -100
        flat_labels = labels.ravel()
        target_ok = np.r_[(flat_docs[1:] == flat_docs[:-1]) & (flat_docs[:-1] >= 0), False]
        assert (flat_labels[~target_ok] == -100).all()
        assert (flat_labels[:-1][target_ok[:-1]] == flat_ids[1:][target_ok[:-1]]).all()
        assert (flat_labels[flat_ids == eot] == -100).all()


def test_special_token_text_inside_a_document_stays_text(txt_cfg):
    data = build_data(txt_cfg)
    ids = data.tokenizer.encode("before <|endoftext|> after")
    assert data.tokenizer.eot_id not in ids
    assert data.tokenizer.decode(ids) == "before <|endoftext|> after"


def test_train_and_val_share_no_document_and_the_split_is_by_key(tmp_path):
    stdlib = make_cfg(tmp_path, "stdlib", max_documents=120, val_fraction=0.2)
    corpus = load_corpus(stdlib.data, stdlib.cache_dir)
    assert not set(corpus.train_keys) & set(corpus.val_keys)
    assert corpus.val_keys and corpus.train_keys
    keys = corpus.train_keys + corpus.val_keys
    assert not any(part in ("test", "tests", "idle_test") for k in keys for part in k.split("/")[:-1])
    assert corpus.train_keys == sorted(corpus.train_keys)  # the fixed, sorted order
    assert corpus.meta["python_version"] == ".".join(map(str, sys.version_info[:3]))
    # a document's split does not depend on which other documents are in the corpus
    smaller = load_corpus(make_cfg(tmp_path, "stdlib", max_documents=60, val_fraction=0.2).data, stdlib.cache_dir)
    assert set(smaller.val_keys) <= set(corpus.val_keys) and set(smaller.train_keys) <= set(corpus.train_keys)
    assert smaller.fingerprint != corpus.fingerprint
    assert load_corpus(stdlib.data, stdlib.cache_dir).fingerprint == corpus.fingerprint


def test_cache_reloads_without_retraining_or_repacking(txt_cfg):
    cold = build_data(txt_cfg)
    warm = build_data(txt_cfg)
    assert not cold.stats["cached"] and cold.stats["tokenizer"]["trained"]
    assert warm.stats["cached"] and not warm.stats["tokenizer"]["trained"]
    # the cached load memory-maps its storage: since CACHE_VERSION 2 that is the token stream and its offsets
    assert all(isinstance(a, np.memmap) for a in (*warm.train.shards, warm.train.offsets))
    for name in ("input_ids", "labels", "position_ids", "document_ids"):
        np.testing.assert_array_equal(getattr(cold.train, name), getattr(warm.train, name))
    txt_cfg.data.seq_len = 8  # another layout is another cache entry, with the same tokenizer
    other = build_data(txt_cfg)
    assert not other.stats["cached"] and not other.stats["tokenizer"]["trained"] and other.train.seq_len == 8
    assert build_data(txt_cfg, rebuild=True).stats["tokenizer"]["trained"]


def counted_efficiency(split, pad_id, n_documents):
    """Real slots over all slots, counted from the raw input rows alone: every input that is not pad_id is a
    document's token (pad_id is eot_id, and an eot never occurs inside a document), plus one eot per document."""
    ids = np.asarray(split.input_ids)
    return (int((ids != pad_id).sum()) + n_documents) / ids.size


def test_packing_none_pads_and_is_less_efficient(txt_cfg):
    packed = build_data(txt_cfg)
    txt_cfg.data.packing = "none"
    unpacked = build_data(txt_cfg)
    assert packed.tokenizer.pad_id == packed.tokenizer.eot_id  # what counted_efficiency relies on
    n_documents = len(load_corpus(txt_cfg.data, txt_cfg.cache_dir).train)
    packed_eff = counted_efficiency(packed.train, packed.tokenizer.pad_id, n_documents)
    unpacked_eff = counted_efficiency(unpacked.train, unpacked.tokenizer.pad_id, n_documents)
    assert unpacked_eff < packed_eff
    assert unpacked.stats["packing_efficiency"] == pytest.approx(unpacked_eff) == unpacked.train.efficiency()
    assert packed.stats["packing_efficiency"] == pytest.approx(packed_eff) == packed.train.efficiency()
    assert packed.stats["packing_efficiency_by_mode"]["none"]["train"] == pytest.approx(unpacked_eff)
    assert unpacked.stats["packing_efficiency_by_mode"]["documents"]["train"] == pytest.approx(packed_eff)
    docs = np.asarray(unpacked.train.document_ids)
    assert len(unpacked.train) > len(packed.train)
    # one document per row: a row's real tokens all belong to one document, padding is masked
    for row in docs:
        assert len(set(row[row >= 0].tolist())) == 1
    assert (np.asarray(unpacked.train.labels)[docs < 0] == -100).all()


def row_loader(n_rows, batch_size, seed=0, **kw):
    """A split whose row r holds the value r everywhere, so a batch shows which rows it took."""
    rows = np.repeat(np.arange(n_rows, dtype=np.int64)[:, None], 4, axis=1)
    return BatchLoader(PackedSplit(rows, rows, rows, rows), batch_size, seed=seed, **kw)


def taken(batch):
    return batch["input_ids"][:, 0].tolist()


def test_same_seed_same_batches_and_each_epoch_a_permutation():
    a, b, c = row_loader(12, 4, seed=1), row_loader(12, 4, seed=1), row_loader(12, 4, seed=2)
    first = [taken(next(a)) for _ in range(6)]
    assert first == [taken(next(b)) for _ in range(6)]
    assert first != [taken(next(c)) for _ in range(6)]
    assert sorted(sum(first[:3], [])) == list(range(12)) == sorted(sum(first[3:], []))
    assert first[:3] != first[3:]  # a fresh order each epoch
    batch = next(row_loader(12, 4))
    assert set(batch) == {"input_ids", "labels", "position_ids", "document_ids"}
    assert batch["input_ids"].shape == (4, 4) and batch["input_ids"].dtype.is_floating_point is False


def test_restored_state_gives_exactly_the_next_batches_across_epochs():
    reference = row_loader(10, 3, seed=7)  # 3 batches per epoch; one row left out of each
    stream = [taken(next(reference)) for _ in range(10)]
    for k in range(10):
        loader = row_loader(10, 3, seed=7)
        for _ in range(k):
            next(loader)
        state = json.loads(json.dumps(loader.state_dict()))  # as a checkpoint stores it
        resumed = row_loader(10, 3, seed=7)
        resumed.load_state_dict(state)
        assert [taken(next(resumed)) for _ in range(10 - k)] == stream[k:], k
    with pytest.raises(ValueError, match="position"):
        row_loader(10, 3).load_state_dict({"epoch": 0, "position": 4})


def test_ranks_get_disjoint_equal_shards():
    world = 3
    loaders = [row_loader(20, 2, seed=3, rank=r, world_size=world) for r in range(world)]
    assert len({len(l) for l in loaders}) == 1  # every rank takes the same number of steps
    for epoch in range(2):
        shards = [sum((taken(next(l)) for _ in range(len(l))), []) for l in loaders]
        flat = sum(shards, [])
        assert len(flat) == len(set(flat)) == world * len(loaders[0]) * 2
    with pytest.raises(ValueError, match="fewer than"):
        row_loader(5, 2, world_size=3)


def test_eval_batches_cover_every_row_in_order():
    split = row_loader(11, 1).split
    batches = [taken(b) for b in iter_eval_batches(split, 4)]
    assert batches == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10]]
    assert [taken(b) for b in iter_eval_batches(split, 4, max_batches=2)] == batches[:2]
    assert sum((taken(b) for r in range(2) for b in iter_eval_batches(split, 3, rank=r, world_size=2)), []) \
        == list(range(0, 11, 2)) + list(range(1, 11, 2))


def test_local_jsonl_and_parquet_and_txt_units(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [{"id": i, "content": f"record number {i} " * (i % 5)} for i in range(30)]  # i % 5 == 0: empty
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in records[:15]) + "\n")
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in records[15:]) + "\n")
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "c.parquet")
    expected = [r["content"] for r in records if r["content"].strip()]
    for paths in ([str(tmp_path / "*.jsonl")], str(tmp_path / "c.parquet")):
        cfg = make_cfg(tmp_path, paths=paths, text_field="content", val_fraction=0.0)
        corpus = load_corpus(cfg.data, cfg.cache_dir)
        assert corpus.train == expected and corpus.meta["skipped_empty_documents"] == 6
        with pytest.raises(ValueError, match="'body'.*'content'"):
            cfg.data.text_field = "body"
            load_corpus(cfg.data, cfg.cache_dir)

    (tmp_path / "t.txt").write_text("one\ntwo\n\nthree\n")
    cfg = make_cfg(tmp_path, paths=str(tmp_path / "t.txt"), val_fraction=0.0)
    for unit, docs in (("file", ["one\ntwo\n\nthree\n"]), ("paragraph", ["one\ntwo", "three\n"]),
                       ("line", ["one", "two", "three"])):
        cfg.data.txt_documents = unit
        assert load_corpus(cfg.data, cfg.cache_dir).train == docs


def test_bad_input_fails_early_with_a_clear_error(tmp_path, txt_cfg):
    (tmp_path / "empty").mkdir()
    for i in range(3):
        (tmp_path / "empty" / f"{i}.txt").write_text(" \n" * i)
    cases = [
        (dict(paths=str(tmp_path / "empty" / "*.txt")), ValueError, "no non-empty documents"),
        (dict(paths=str(tmp_path / "missing" / "*.txt")), FileNotFoundError, "no file matches"),
        (dict(seq_len=1), ValueError, "seq_len=1"),
        (dict(packing="sometimes"), ValueError, "packing"),
        (dict(source="ftp"), ValueError, "source"),
    ]
    for overrides, error, message in cases:
        cfg = txt_cfg.copy()
        for key, value in overrides.items():
            cfg.data[key] = value
        with pytest.raises(error, match=message):
            build_data(cfg)
    cfg = txt_cfg.copy()
    cfg.tokenizer.vocab_size = 200
    with pytest.raises(ValueError, match="vocab_size=200 is smaller than the 257"):
        build_data(cfg)
    assert not (tmp_path / "cache" / "packed").exists()  # nothing was built


def test_hub_datasets_fail_offline_with_a_clear_message(tmp_path):
    # A real offline call, in a subprocess because `datasets` reads HF_*_OFFLINE when it is imported.
    script = textwrap.dedent("""
        from omegaconf import OmegaConf
        from runner.data.corpus import load_corpus
        for name in ("tinystories", "wikitext103", "fineweb_edu"):
            cfg = OmegaConf.load(f"conf/data/{name}.yaml")
            try:
                load_corpus(cfg, "unused")
            except RuntimeError as err:
                print(name, "|", err)
            else:
                print(name, "| loaded?!")
        from runner.data.tokenizer import hf_tokenizer
        try:
            hf_tokenizer(OmegaConf.load("conf/tokenizer/phi3.yaml"))
        except RuntimeError as err:
            print("phi3 |", str(err).replace("\\n", " "))
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "hf"), "HF_HOME": str(tmp_path / "hf_home")}
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = dict(line.split(" | ", 1) for line in out.stdout.strip().splitlines())
    for name, dataset in (("tinystories", "roneneldan/TinyStories"), ("wikitext103", "Salesforce/wikitext"),
                          ("fineweb_edu", "HuggingFaceFW/fineweb-edu")):
        assert dataset in lines[name] and "needs network access" in lines[name], lines[name]
    assert "microsoft/Phi-3-mini-4k-instruct" in lines["phi3"] and "local directory" in lines["phi3"]


@pytest.mark.parametrize("streaming", [False, True])
def test_the_hub_code_path_on_local_files(tmp_path, monkeypatch, streaming):
    # `datasets.load_dataset("json", data_files=...)` runs the same code as a Hub id: splits, streaming,
    # max_documents, WikiText article grouping; only the download is missing.
    import datasets
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf")  # keep ~/.cache clean
    lines = [" = Alpha = \n", " \n", " alpha text \n", " = Beta = \n", " beta \n", " = Gamma = \n", " g \n"]
    for split, rows in (("train", lines), ("validation", lines[:3])):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
    cfg = make_cfg(tmp_path, "wikitext103")
    cfg.data.update(dataset="json", config_name=None, streaming=streaming, max_documents=2,
                    data_files={"train": str(tmp_path / "train.jsonl"), "validation": str(tmp_path / "validation.jsonl")})
    corpus = load_corpus(cfg.data, cfg.cache_dir)
    assert corpus.train == ["".join(lines[:3]), "".join(lines[3:5])] and corpus.val == ["".join(lines[:3])]
    assert corpus.train_keys == ["train/0", "train/3"] and corpus.meta["dataset"] == "json"
    cfg.data.text_field = "body"
    with pytest.raises(ValueError, match="'body' is not a field"):
        load_corpus(cfg.data, cfg.cache_dir)


def test_wikitext_lines_group_into_articles():
    lines = [" = Alpha = \n", " \n", " = = History = = \n", " alpha text \n", " = Beta = \n", " beta \n"]
    articles = list(wikitext_articles((str(i), line) for i, line in enumerate(lines)))
    assert articles == [("0", "".join(lines[:4])), ("4", "".join(lines[4:]))]


def test_a_hugging_face_tokenizer_by_path(tmp_path, txt_cfg):
    from transformers import PreTrainedTokenizerFast

    bpe = build_data(txt_cfg).tokenizer
    PreTrainedTokenizerFast(tokenizer_object=bpe.tok, eos_token="<|endoftext|>").save_pretrained(tmp_path / "hf_tok")
    cfg = txt_cfg.copy()
    cfg.tokenizer = OmegaConf.load(CONF / "tokenizer" / "hf.yaml")
    cfg.tokenizer.name_or_path = str(tmp_path / "hf_tok")
    data = build_data(cfg)
    assert data.tokenizer.vocab_size == len(data.tokenizer.tok) == bpe.vocab_size
    assert data.tokenizer.eot_id == bpe.eot_id
    text = "the quick <|endoftext|> fox"
    assert data.tokenizer.encode(text) == bpe.encode(text) and data.tokenizer.decode(bpe.encode(text)) == text
    np.testing.assert_array_equal(data.train.input_ids, build_data(txt_cfg).train.input_ids)


def test_main_prints_and_writes_the_statistics(tmp_path, txt_cfg, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # outside Hydra, the output directory is the cwd
    txt_cfg.data.bench = True
    stats = main(txt_cfg)
    printed = capsys.readouterr().out
    for word in ("documents", "tokens", "rows", "packing efficiency", "tokens/s", "cold build", "cached load"):
        assert word in printed
    saved = json.loads((tmp_path / "data_stats.json").read_text())
    assert saved["documents"] == stats["documents"] and saved["cold"]["tokens_per_s"] > 0
    assert saved["cached_load"]["seconds"]["tokenize"] == 0.0
    assert not list((tmp_path / "cache").glob("data-bench-*"))  # the benchmark's fresh cache is removed


def test_composed_config_builds(tmp_path):
    cfg = compose(["data.max_documents=30", "tokenizer.vocab_size=300", "data.seq_len=32", f"cache_dir={tmp_path}"])
    assert cfg.model.vocab_size == 300 and cfg.model.max_seq_len == 32
    data = build_data(cfg)
    assert data.stats["corpus"] == "stdlib" and data.tokenizer.vocab_size <= cfg.model.vocab_size
    batch = next(BatchLoader(data.train, 4, seed=cfg.train.seed))
    assert batch["input_ids"].shape == (4, 32) and int(batch["input_ids"].max()) < cfg.model.vocab_size
