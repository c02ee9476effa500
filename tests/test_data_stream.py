"""The token-stream storage: rows derived per batch against the naive reference of the old packed arrays,
sharded files, worker processes, damaged cache entries, big vocabularies, token caps, resumed loaders."""
import json
import logging
import random

import numpy as np
import pytest
from omegaconf import OmegaConf

from conftest import CONF
from test_data import make_cfg, naive_rows, txt_cfg, write_txt_corpus  # noqa: F401 (txt_cfg is a fixture)
from runner.data import BatchLoader, build_data, iter_eval_batches
from runner.data import encode
from runner.data.corpus import key_score, load_corpus
from runner.data.tokenizer import train_bpe

FIELDS = ("input_ids", "labels", "position_ids", "document_ids")


def entry_files(data):
    """{file name: bytes} of a cache entry's token and offset files."""
    from pathlib import Path
    path = Path(data.stats["cache_path"])
    return {p.name: p.read_bytes() for p in sorted(path.glob("*.bin"))}


@pytest.fixture(scope="module")
def stdlib_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("stdlib_cache"))  # the BPE is trained once for both packing modes


@pytest.mark.parametrize("packing", ["documents", "none"])
def test_rows_derived_from_the_stream_equal_the_old_packed_arrays_on_the_builtin_corpus(tmp_path, stdlib_cache, packing):
    # small shards, so that rows read across shard files
    cfg = make_cfg(tmp_path, "stdlib", max_documents=25, seq_len=64, packing=packing, shard_tokens=5000)
    cfg.cache_dir = stdlib_cache
    data = build_data(cfg)
    assert data.stats["shards"]["train"] > 10 and data.stats["token_dtype"] == "uint16"
    corpus = load_corpus(cfg.data, cfg.cache_dir)
    tok = data.tokenizer
    for split, texts in ((data.train, corpus.train), (data.val, corpus.val)):
        want = np.array(naive_rows([tok.encode(t) for t in texts], tok.eot_id, tok.pad_id, 64, packing))
        assert len(split) == len(want)
        got = {k: np.concatenate([b[k].numpy() for b in iter_eval_batches(split, 37)]) for k in FIELDS}
        for k, name in enumerate(FIELDS):
            np.testing.assert_array_equal(got[name], want[..., k], err_msg=name)
        rows = random.Random(0).sample(range(len(split)), 20)  # arbitrary rows, as a shuffled loader asks
        for k, name in enumerate(FIELDS):
            np.testing.assert_array_equal(split.rows(rows)[name], want[rows][..., k], err_msg=name)


def test_the_cache_holds_two_bytes_per_token(txt_cfg):
    data = build_data(txt_cfg)
    tokens = data.stats["tokens"]["train"] + data.stats["tokens"]["val"]
    documents = data.stats["documents"]["train"] + data.stats["documents"]["val"]
    files = entry_files(data)
    assert sum(map(len, files.values())) == 2 * tokens + 8 * (documents + 2)  # uint16 ids + int64 offsets
    assert data.stats["bytes_per_token"] == pytest.approx((2 * tokens + 8 * (documents + 2)) / tokens)
    stream = np.frombuffer(files["train.tokens.00000.bin"], dtype=np.uint16)
    offsets = np.frombuffer(files["train.offsets.bin"], dtype=np.int64)
    corpus = load_corpus(txt_cfg.data, txt_cfg.cache_dir)
    assert [stream[a:b - 1].tolist() for a, b in zip(offsets[:-1], offsets[1:])] == \
        [data.tokenizer.encode(t) for t in corpus.train]
    assert (stream[offsets[1:] - 1] == data.tokenizer.eot_id).all()


def test_worker_processes_write_the_same_bytes_as_one_process(tmp_path, monkeypatch):
    write_txt_corpus(tmp_path / "docs", n_docs=120)
    monkeypatch.setattr(encode, "CHUNK_CHARS", 3000)  # several chunks, each split between the workers
    built = []
    for num_proc in (1, 2):
        cfg = make_cfg(tmp_path / f"p{num_proc}", paths=[str(tmp_path / "docs" / "*.txt")], seq_len=16,
                       val_fraction=0.2, num_proc=num_proc, shard_tokens=1000)
        built.append(build_data(cfg))
    one, two = built
    assert two.stats["num_proc"] == 2 and one.stats["num_proc"] == 1
    files = entry_files(one)
    assert len(files) > 4 and files == entry_files(two)


def test_a_truncated_or_corrupted_shard_is_detected_and_rebuilt(txt_cfg, caplog):
    txt_cfg.data.shard_tokens = 500
    first = build_data(txt_cfg)
    good = entry_files(first)
    from pathlib import Path
    shard = Path(first.stats["cache_path"]) / "train.tokens.00001.bin"
    shard.write_bytes(shard.read_bytes()[:-6])  # as a full disk or a killed copy leaves it
    with caplog.at_level(logging.WARNING, logger="runner.data.store"):
        again = build_data(txt_cfg)
    assert not again.stats["cached"] and "train.tokens.00001.bin" in caplog.text and "damaged" in caplog.text
    assert entry_files(again) == good
    assert build_data(txt_cfg).stats["cached"]

    # the same size with other bytes: only the checksum sees it, so data.verify=checksum reads every file
    data = bytearray(shard.read_bytes())
    data[10] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert build_data(txt_cfg).stats["cached"]  # the cheap size check passes
    txt_cfg.data.verify = "checksum"
    assert not build_data(txt_cfg).stats["cached"] and entry_files(build_data(txt_cfg)) == good


def test_a_vocabulary_above_65536_is_stored_as_uint32(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(70_000)}
    vocab["<|endoftext|>"] = 70_000
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(tmp_path / "big")
    rng = random.Random(0)
    (tmp_path / "docs").mkdir()
    for d in range(12):
        words = [f"w{rng.choice([rng.randrange(100), rng.randrange(65_530, 70_000)])}" for _ in range(rng.randrange(1, 40))]
        (tmp_path / "docs" / f"{d}.txt").write_text(" ".join(words))
    cfg = make_cfg(tmp_path, paths=[str(tmp_path / "docs" / "*.txt")], seq_len=8, val_fraction=0.2)
    cfg.tokenizer = OmegaConf.load(CONF / "tokenizer" / "hf.yaml")
    cfg.tokenizer.name_or_path = str(tmp_path / "big")
    data = build_data(cfg)
    assert data.tokenizer.vocab_size == 70_001 and data.stats["token_dtype"] == "uint32"
    assert data.train.shards[0].dtype == np.uint32
    ids = np.asarray(data.train.input_ids)
    corpus = load_corpus(cfg.data, cfg.cache_dir)
    want = np.array(naive_rows([data.tokenizer.encode(t) for t in corpus.train], 70_000, data.tokenizer.pad_id, 8,
                               "documents"))
    np.testing.assert_array_equal(ids, want[..., 0])
    assert ids.max() > 65_535


def test_a_resumed_loader_on_the_stream_gives_exactly_the_next_batches(txt_cfg):
    txt_cfg.data.shard_tokens = 300
    data = build_data(txt_cfg)
    for world in (1, 2):
        for rank in range(world):
            def loader():
                return BatchLoader(data.train, 4, seed=5, rank=rank, world_size=world)
            reference = loader()
            stream = [next(reference) for _ in range(3 * len(reference))]  # three epochs
            for k in (1, len(reference), len(reference) + 2):
                first = loader()
                for _ in range(k):
                    next(first)
                resumed = loader()
                resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
                for want in stream[k:k + 4]:
                    got = next(resumed)
                    for name in FIELDS:
                        assert got[name].equal(want[name]), (world, rank, k, name)
    # and a batch is the rows it names, as derived from the whole split
    loader = BatchLoader(data.train, 4, seed=5)
    index = loader.epoch_order(0)[:4]
    batch = next(loader)
    for name in FIELDS:
        np.testing.assert_array_equal(batch[name].numpy(), getattr(data.train, name)[index])


def test_max_tokens_keeps_whole_documents_up_to_the_cap(txt_cfg):
    full = build_data(txt_cfg)
    lengths = np.diff(np.asarray(full.train.offsets))
    cap = int(lengths[:7].sum()) + int(lengths[7]) // 2  # inside the 8th training document
    txt_cfg.data.max_tokens = cap
    capped = build_data(txt_cfg)
    assert capped.stats["documents"]["train"] == 7 and capped.stats["tokens"]["train"] == lengths[:7].sum() <= cap
    n = len(capped.train.offsets) - 1
    np.testing.assert_array_equal(np.asarray(capped.train.offsets), np.asarray(full.train.offsets)[:n + 1])
    np.testing.assert_array_equal(capped.train.input_ids[:-1], full.train.input_ids[:len(capped.train) - 1])
    txt_cfg.data.max_tokens = 1
    with pytest.raises(ValueError, match="no training document within data.max_tokens=1"):
        build_data(txt_cfg)


def test_a_streamed_dataset_is_read_only_up_to_max_tokens(tmp_path, monkeypatch):
    import datasets
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf")
    monkeypatch.setattr(encode, "CHUNK_CHARS", 2000)
    rng = random.Random(1)
    records = [" ".join(rng.choice(["alpha", "beta", "gamma", "delta"]) for _ in range(50)) + f" {i}" for i in range(400)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in records))
    cfg = make_cfg(tmp_path, "fineweb_edu", max_documents=None, max_tokens=3000, seq_len=32, val_fraction=0.2)
    cfg.data.update(dataset="json", config_name=None, data_files={"train": str(tmp_path / "train.jsonl")})
    cfg.tokenizer.train_max_chars = 5000  # the tokenizer trains on a bounded sample of the stream
    read = []
    original = encode.text_chunks
    monkeypatch.setattr(encode, "text_chunks", lambda docs, workdir: original((read.append(d) or d for d in docs), workdir))
    data = build_data(cfg)
    assert 0 < data.stats["tokens"]["train"] <= 3000 and data.stats["tokenizer"]["train_chars"] == 5000
    assert len(read) < 200  # a chunk past the cap, not the whole dataset
    # what was kept: the stream's first training documents up to the cap, and the validation ones among them
    is_val = [key_score(f"train/{i}") < 0.2 for i in range(len(records))]
    n_train, n_val = data.stats["documents"]["train"], data.stats["documents"]["val"]
    first_dropped = [i for i, v in enumerate(is_val) if not v][n_train]
    tok = data.tokenizer
    for split, n, want in ((data.train, n_train, [r for r, v in zip(records, is_val) if not v][:n_train]),
                           (data.val, n_val, [r for r, v in zip(records[:first_dropped], is_val) if v])):
        offsets, stream = np.asarray(split.offsets), np.concatenate(split.shards)
        assert [tok.decode(stream[a:b - 1]) for a, b in zip(offsets[:-1], offsets[1:])] == want
    assert n_val > 0


def test_the_tokenizer_reads_no_more_of_the_stream_than_its_sample():
    consumed = []

    def texts():
        for i in range(10_000):
            consumed.append(i)
            yield "some text to learn merges from " * 10

    _, chars = train_bpe(texts(), 300, ["<|endoftext|>"], max_chars=3000)
    assert chars == 3000 and len(consumed) <= 11


def test_bad_stream_settings_fail_early(txt_cfg):
    for key, value, message in (("num_proc", 0, "data.num_proc=0"), ("max_tokens", 0, "data.max_tokens=0"),
                                ("verify", "sometimes", "data.verify"), ("shard_tokens", 0, "data.shard_tokens=0")):
        cfg = txt_cfg.copy()
        cfg.data[key] = value
        with pytest.raises(ValueError, match=message):
            build_data(cfg)
