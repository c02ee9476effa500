"""Streaming, parallel tokenization: documents -> Arrow chunks -> `datasets.map(num_proc=N)` -> token shards.

Documents are read lazily and written to an Arrow file of at most CHUNK_CHARS characters; `datasets`
tokenizes that file with `num_proc` worker processes (each takes a contiguous slice and writes its own Arrow
file, and `datasets` concatenates them in order, so the result is the same for any num_proc), and the ids are
appended to the split's token stream (store.SplitWriter). Then the chunk's files are deleted and the next
chunk is read. Memory holds one batch of documents and one record batch of ids at a time, whatever the size
of the corpus; disk holds the token files plus one chunk of text and ids.
"""
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np

CHUNK_CHARS = 1 << 25   # characters per chunk (32M, ~8M tokens): bounds the working files and how far past
                        # max_tokens a stream is read
WRITE_BATCH = 1000      # documents per Arrow record batch
SPLIT_CODE = {"train": 0, "val": 1}


def encode_batch(batch: dict, tokenizer, dtype: str) -> dict:
    """datasets.map function: each document's ids followed by the eot, as one array."""
    ids = tokenizer.encode_batch(batch["text"])
    return {"ids": [np.array(x + [tokenizer.eot_id], dtype=dtype) for x in ids]}


def tokenize_streams(streams, tokenizer, writers: dict, workdir: Path, num_proc: int = 1,
                     max_tokens: int | None = None) -> None:
    """Tokenize every (split, key, text) document of each stream into `writers` (split -> SplitWriter), in
    order. With max_tokens, a stream stops before the first training document that would take the training
    split past it; validation documents read before that point are kept."""
    import datasets

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    dtype = writers["train"].dtype.name
    features = datasets.Features({"split": datasets.Value("int8"), "ids": datasets.Sequence(datasets.Value(dtype))})
    n = 0
    with quiet_datasets(), workers_single_threaded(num_proc):
        for stream in streams:
            for texts_file in text_chunks(stream(), workdir):
                n += 1
                ds = datasets.Dataset.from_file(str(texts_file))
                tokenized = ds.map(encode_batch, batched=True, batch_size=256, num_proc=num_proc if num_proc > 1 else None,
                                   fn_kwargs={"tokenizer": tokenizer, "dtype": dtype}, remove_columns=["text"],
                                   features=features, cache_file_name=str(workdir / f"ids_{n}.arrow"),
                                   new_fingerprint=f"ids_{n}", load_from_cache_file=False)
                full = append_ids(tokenized, writers, max_tokens)
                del ds, tokenized  # unmap the chunk's files before deleting them
                for f in workdir.iterdir():
                    f.unlink() if f.is_file() else shutil.rmtree(f, ignore_errors=True)
                if full:
                    break


def text_chunks(documents, workdir: Path):
    """Write documents to Arrow files of about CHUNK_CHARS characters each; yields each file once written."""
    from datasets import Features, Value
    from datasets.arrow_writer import ArrowWriter

    features = Features({"split": Value("int8"), "text": Value("string")})
    k, writer, chars, buf = 0, None, 0, {"split": [], "text": []}
    for split, _key, text in documents:
        if writer is None:
            k += 1
            path = workdir / f"texts_{k}.arrow"
            writer = ArrowWriter(features=features, path=str(path), writer_batch_size=WRITE_BATCH)
        buf["split"].append(SPLIT_CODE[split])
        buf["text"].append(text)
        chars += len(text)
        if len(buf["text"]) == WRITE_BATCH or chars >= CHUNK_CHARS:
            writer.write_batch(buf)
            buf = {"split": [], "text": []}
        if chars >= CHUNK_CHARS:
            writer.finalize()
            writer.close()
            writer, chars = None, 0
            yield path
    if writer is not None:
        if buf["text"]:
            writer.write_batch(buf)
        writer.finalize()
        writer.close()
        yield path


def append_ids(tokenized, writers: dict, max_tokens: int | None) -> bool:
    """Append a tokenized chunk to the writers, record batch by record batch; True once max_tokens is reached."""
    import pyarrow.compute as pc

    for batch in tokenized.data.to_batches():
        ids = batch.column("ids")
        lengths = pc.list_value_length(ids).to_numpy(zero_copy_only=False).astype(np.int64)
        split = batch.column("split").to_numpy(zero_copy_only=False)
        keep, full = len(lengths), False
        if max_tokens is not None:  # training tokens after each document; stop before the one that overflows
            after = writers["train"].tokens + np.cumsum(np.where(split == SPLIT_CODE["train"], lengths, 0))
            over = np.flatnonzero(after > max_tokens)
            if over.size:
                keep, full = int(over[0]), True
        starts = np.concatenate([[0], np.cumsum(lengths)])
        values = ids.flatten().to_numpy(zero_copy_only=False)  # (sum of lengths,), every document's ids in order
        for name, code in SPLIT_CODE.items():
            mine = split[:keep] == code
            if mine.any():
                writers[name].add(values[:starts[keep]][np.repeat(mine, lengths[:keep])], lengths[:keep][mine])
        if full:
            return True
    return False


@contextmanager
def quiet_datasets():
    """No progress bars from datasets.map for the duration (restored afterwards)."""
    import datasets

    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


@contextmanager
def workers_single_threaded(num_proc: int):
    """With worker processes, each tokenizes on one thread (N processes x all-core thread pools would fight
    over the cores, and `tokenizers` warns after a fork); one process keeps its thread pool."""
    if num_proc <= 1:
        yield
        return
    old = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old
