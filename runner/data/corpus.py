"""Corpora: documents as plain strings, split into train and validation by document.

Three sources, chosen by `data.source`:
  stdlib  the running Python's standard library, one document per .py file (no network needed)
  hub     a Hugging Face Hub dataset through `datasets.load_dataset` (TinyStories, WikiText-103, FineWeb-Edu)
  local   local .txt, .jsonl or .parquet files by path or glob

The split is by document and never by position: a document's key (its relative path, or its record index)
is hashed, so a document lands in the same split whatever else is in the corpus. The fingerprint hashes
every key and text (and the split rule), so any change to the corpus changes every cache key built on it.
Documents are streamed, never held all at once: a Corpus is a recipe for fresh passes over them.
"""
import glob
import hashlib
import io
import itertools
import json
import logging
import os
import platform
import re
import sysconfig
import tokenize
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

from omegaconf import OmegaConf

log = logging.getLogger(__name__)

# Directories of the standard library that hold tests (test/, tests/, idlelib/idle_test, lib2to3/tests,
# ctypes/test, ...) or third-party code; a directory with one of these names is skipped anywhere in the tree.
STDLIB_EXCLUDED_DIRS = ("test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__")


@dataclass
class Corpus:
    """Documents read lazily: `documents()` starts a fresh pass over (split, key, text), so no pass holds more
    than one document; `train`/`val` and their keys materialize lists (for tests and small corpora)."""
    name: str
    fingerprint: str
    streams: list[Callable[[], Iterator[tuple[str, str, str]]]]  # each call starts a fresh pass
    meta: dict = field(default_factory=dict)  # source, python_version, skipped empty documents, ...

    def documents(self) -> Iterator[tuple[str, str, str]]:
        for stream in self.streams:
            yield from stream()

    def texts(self, split: str) -> Iterator[str]:
        return (text for s, _, text in self.documents() if s == split)

    train = property(lambda self: list(self.texts("train")))
    val = property(lambda self: list(self.texts("val")))
    train_keys = property(lambda self: [k for s, k, _ in self.documents() if s == "train"])
    val_keys = property(lambda self: [k for s, k, _ in self.documents() if s == "val"])


def load_corpus(data_cfg, cache_dir: str | os.PathLike) -> Corpus:
    """Describe the documents `data_cfg` names and how they split. Reads the corpus once (to count, check and
    fingerprint it) without keeping it; raises before anything is tokenized. A streamed Hub dataset is not
    read here: its fingerprint is its name, revision and caps."""
    max_docs, val_fraction = data_cfg.get("max_documents"), data_cfg.val_fraction
    if max_docs is not None and max_docs < 1:
        raise ValueError(f"data.max_documents={max_docs} must be >= 1 or null")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"data.val_fraction={val_fraction} must be in [0, 1)")
    meta = {"source": data_cfg.source, "python_version": platform.python_version()}
    skipped = {"n": 0}  # empty documents: skipped before max_documents counts, so the cap counts real ones
    raw = raw_streams(data_cfg, cache_dir, skipped, meta)
    if data_cfg.source == "hub" and data_cfg.get("streaming", False):
        return streamed_corpus(data_cfg, raw, meta)

    h, counts, lowest, val_keys = count_splits(raw, val_fraction)  # one pass over every document
    held_out = None
    if raw[0][0] is None and val_fraction > 0 and counts["val"] == 0 and counts["train"] >= 2:
        # A small corpus can draw no validation document at all; hold out the one with the lowest hash
        # (deterministic, and still chosen by key, not by position).
        held_out = lowest[1]
        counts = {"train": counts["train"] - 1, "val": 1}
    if raw[0][0] is None:
        log_hashed_split(data_cfg, counts, val_keys, held_out)
    h.update(json.dumps([val_fraction, held_out]).encode())
    meta["skipped_empty_documents"] = skipped["n"]
    check_split_counts(data_cfg, counts, skipped["n"])
    return Corpus(data_cfg.name, h.hexdigest()[:16], [split_stream(r, val_fraction, held_out) for r in raw], meta)


def raw_streams(data_cfg, cache_dir, skipped: dict, meta: dict) -> list:
    """data.source's document streams, [(split or None: hashed, a callable that yields (key, text))]; what names
    the source goes into `meta`."""
    source, max_docs = data_cfg.source, data_cfg.get("max_documents")
    if source == "stdlib":
        root = Path(sysconfig.get_paths()["stdlib"])
        meta["root"] = str(root)
        return [(None, lambda: itertools.islice(non_empty(stdlib_documents(root), skipped), max_docs))]
    if source == "hub":
        meta.update(dataset=data_cfg.dataset, config_name=data_cfg.get("config_name"))
        return hub_streams(data_cfg, skipped)  # a Hub dataset may bring its own validation split
    if source == "local":
        return local_streams(data_cfg, cache_dir, skipped, max_docs)
    raise ValueError(f"data.source={source!r} is not a source; choose stdlib, hub or local")


def streamed_corpus(data_cfg, raw: list, meta: dict) -> Corpus:
    """A streamed Hub dataset, not read ahead: fingerprinted by its settings, checked on its first document."""
    spec = {k: OmegaConf.to_container(v) if OmegaConf.is_config(v) else v for k, v in data_cfg.items()
            if k not in ("seq_len", "packing", "sampling", "bench", "rebuild", "num_proc", "verify", "shard_tokens",
                         "name")}
    meta["skipped_empty_documents"] = None  # unknown until read
    for split, docs in raw:  # only the first document of each: a wrong text_field fails here, not later
        if next(iter(docs()), None) is None and split != "val":
            raise ValueError(f"corpus {data_cfg.name!r} has no non-empty training documents")
    fp = hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return Corpus(data_cfg.name, fp, [split_stream(r, data_cfg.val_fraction, None) for r in raw], meta)


def count_splits(raw: list, val_fraction: float):
    """One pass: each split's documents counted, every key and text hashed, the hashed split's validation keys
    and its lowest-scoring key (the held-out fallback). -> (hash, counts, (score, key) or None, val keys)."""
    h, counts, lowest, val_keys = hashlib.sha256(), {"train": 0, "val": 0}, None, []
    for i, (split, docs) in enumerate(raw):
        for key, text in docs():
            data = text.encode("utf-8", "surrogatepass")
            h.update(f"{i}\0{key}\0{len(data)}\0".encode())
            h.update(data)
            score = key_score(key)
            counts[split or ("val" if score < val_fraction else "train")] += 1
            if split is None and score < val_fraction:
                val_keys.append(key)
            if split is None and (lowest is None or score < lowest[0]):
                lowest = (score, key)
    return h, counts, lowest, val_keys


def check_split_counts(data_cfg, counts: dict, skipped: int) -> None:
    """A split with no documents, named with the setting that caused it."""
    if not counts["train"] and not counts["val"]:
        raise ValueError(f"corpus {data_cfg.name!r} has no non-empty documents ({skipped} empty ones skipped)")
    if not counts["train"]:
        raise ValueError(f"corpus {data_cfg.name!r} has no training documents; lower data.val_fraction")
    if not counts["val"] and data_cfg.get("val_paths"):
        raise ValueError(f"data.val_paths={list_of(data_cfg.val_paths)} holds no non-empty document")
    if not counts["val"] and data_cfg.get("val_split"):
        raise ValueError(f"data.val_split={data_cfg.val_split!r} of {data_cfg.name!r} has no non-empty documents")
    if not counts["val"] and data_cfg.val_fraction > 0:
        raise ValueError(f"corpus {data_cfg.name!r} is too small to hold out a validation document "
                         f"({counts['train']} documents); add documents or set data.val_fraction=0")


def log_hashed_split(data_cfg, counts: dict, val_keys: list[str], held_out: str | None) -> None:
    """Say which documents (for data=local with one document per file: which files) the hash put in validation,
    so that a file meant for validation and landed in training is seen at once."""
    shown = val_keys[:20] + (["..."] if len(val_keys) > 20 else [])
    log.info(f"data: split by a hash of each document's key (data.val_fraction={data_cfg.val_fraction}): "
             f"{counts['train']} training, {len(val_keys)} validation documents {shown}")
    if held_out is not None:
        log.warning(f"data: no key hashed below data.val_fraction={data_cfg.val_fraction}; holding out {held_out!r} "
                    f"(the lowest hash) for validation. Name validation files with data.val_paths (data=local)")


def non_empty(docs: Iterable[tuple[str, str]], skipped: dict) -> Iterator[tuple[str, str]]:
    """Documents with at least one non-blank character; the others are counted in skipped["n"]."""
    for key, text in docs:
        if text.strip():
            yield key, text
        else:
            skipped["n"] += 1


def key_score(key: str) -> float:
    """A uniform number in [0, 1) that depends on the key only."""
    return int(hashlib.sha1(key.encode()).hexdigest()[:13], 16) / 16 ** 13


def split_stream(raw, val_fraction: float, held_out: str | None):
    """(split, key, text) documents of a raw (split or None, documents) stream; None = split by key:
    validation = documents whose key hashes below val_fraction, plus `held_out`; order is kept."""
    split, docs = raw

    def stream():
        for key, text in docs():
            s = split or ("val" if key_score(key) < val_fraction or key == held_out else "train")
            yield s, key, text
    return stream


# ---------------------------------------------------------------------------------------------------- stdlib

def stdlib_documents(root: Path) -> Iterator[tuple[str, str]]:
    """(relative path, source) for every .py file under `root`, sorted by path, tests excluded."""
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in STDLIB_EXCLUDED_DIRS]
        paths += [Path(dirpath, f) for f in filenames if f.endswith(".py")]
    for path in sorted(paths, key=lambda p: p.relative_to(root).as_posix()):
        yield path.relative_to(root).as_posix(), read_python_source(path)


def read_python_source(path: Path) -> str:
    # Honour the PEP 263 coding cookie, as the interpreter does (a few stdlib files once were latin-1).
    raw = path.read_bytes()
    encoding, _ = tokenize.detect_encoding(io.BytesIO(raw).readline)
    return raw.decode(encoding, errors="replace")


# ---------------------------------------------------------------------------------------------------- local

def list_of(patterns) -> list[str]:
    if patterns is None:
        return []
    return [str(patterns)] if isinstance(patterns, str) else [str(p) for p in patterns]


def local_files(data_cfg, key: str = "paths") -> list[str]:
    """The files `data.<key>` names (paths or globs, `**` recursing), in order; a clear error when there are none.
    Training files are those of data.paths less any of data.val_paths. Cheap (globs only): the config checks
    call it before any data is read."""
    patterns = list_of(data_cfg.get(key))
    if not patterns:
        raise ValueError(f"data.{key} is empty; give a file, a directory's glob (e.g. 'corpus/*.txt') or a list")
    files = []
    for pattern in patterns:
        pattern = os.path.expanduser(pattern)
        matched = sorted(glob.glob(pattern, recursive=True))
        if not matched:
            raise FileNotFoundError(f"data.{key}={pattern!r}: no file matches it (relative to {os.getcwd()})")
        files += [f for f in matched if os.path.isfile(f)]
    if not files:
        raise FileNotFoundError(f"data.{key}={patterns} matches only directories; use a glob such as 'dir/*.txt'")
    if key == "paths" and data_cfg.get("val_paths"):
        held = {os.path.realpath(f) for f in local_files(data_cfg, "val_paths")}
        files = [f for f in files if os.path.realpath(f) not in held]
        if not files:
            raise ValueError(f"data.paths={patterns} holds only the data.val_paths files: no training file is left")
    return files


def local_streams(data_cfg, cache_dir, skipped: dict, max_docs):
    """[(split or None, documents)] of local files: data.paths split by key (None), or, with data.val_paths,
    exactly those files as validation and the rest of data.paths as training (nothing hashed)."""
    def stream(key):
        return lambda: itertools.islice(non_empty(local_documents(data_cfg, cache_dir, key), skipped), max_docs)
    if not data_cfg.get("val_paths"):
        return [(None, stream("paths"))]
    log.info(f"data: validation = data.val_paths {local_files(data_cfg, 'val_paths')}; "
             f"training = data.paths {local_files(data_cfg)}")
    return [("train", stream("paths")), ("val", stream("val_paths"))]


def local_documents(data_cfg, cache_dir, key: str = "paths") -> Iterator[tuple[str, str]]:
    """Documents from local files: every path or glob in `data.<key>`, sorted, then read by format."""
    files = local_files(data_cfg, key)

    fmt = data_cfg.get("format", "auto")
    formats = {file_format(f) if fmt == "auto" else fmt for f in files}
    if len(formats) != 1:
        raise ValueError(f"data.{key} mixes formats {sorted(formats)}; give one format at a time")
    fmt = formats.pop()
    if fmt == "txt":
        yield from text_documents(files, data_cfg.get("txt_documents", "file"))
    elif fmt in ("jsonl", "parquet"):
        # The same `datasets` code path as Hub datasets, with the local files as data_files; streamed, so a
        # pass reads the files block by block (no Arrow copy of the corpus on disk, nothing of it held in memory).
        builder = {"jsonl": "json", "parquet": "parquet"}[fmt]
        ds = load_hf_dataset(builder, None, "train", streaming=True, data_files=files,
                             cache_dir=os.path.join(cache_dir, "hf_datasets"))
        yield from dataset_documents(ds, data_cfg.text_field, what=f"{fmt} files {files[:3]}")
    else:
        raise ValueError(f"data.format={fmt!r} is not a format; choose auto, txt, jsonl or parquet")


def file_format(path: str) -> str:
    suffix = Path(path).suffix.lower()
    formats = {".txt": "txt", ".text": "txt", ".md": "txt", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}
    if suffix not in formats:
        raise ValueError(f"cannot tell the format of {path!r} from its suffix; set data.format=txt|jsonl|parquet")
    return formats[suffix]


def text_documents(files: list[str], unit: str) -> Iterator[tuple[str, str]]:
    """unit: `file` (one document per file), `paragraph` (blank-line separated) or `line`."""
    if unit not in ("file", "paragraph", "line"):
        raise ValueError(f"data.txt_documents={unit!r} must be file, paragraph or line")
    for path in files:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
        if unit == "file":
            yield path, text
        else:
            parts = re.split(r"\n\s*\n", text) if unit == "paragraph" else text.splitlines()
            for i, part in enumerate(parts):
                yield f"{path}:{i}", part


# ---------------------------------------------------------------------------------------------------- Hub

def hub_streams(data_cfg, skipped: dict):
    """[(split or None, documents)] of a Hub dataset: its train split, and its validation split when it has
    one (None: validation is split off by key)."""
    data_files = data_cfg.get("data_files")
    if OmegaConf.is_config(data_files):  # datasets wants a plain str, list or dict
        data_files = OmegaConf.to_container(data_files)
    if data_cfg.get("documents", "records") not in ("records", "wikitext_articles"):
        raise ValueError(f"data.documents={data_cfg.documents!r} must be records or wikitext_articles")

    def stream(split, limit):
        def docs():
            ds = load_hf_dataset(data_cfg.dataset, data_cfg.get("config_name"), split,
                                 streaming=data_cfg.get("streaming", False), revision=data_cfg.get("revision"),
                                 data_files=data_files)
            docs = dataset_documents(ds, data_cfg.text_field, what=f"{data_cfg.dataset}[{split}]", prefix=f"{split}/")
            if data_cfg.get("documents", "records") == "wikitext_articles":
                docs = wikitext_articles(docs)
            return with_hub_errors(itertools.islice(non_empty(docs, skipped), limit), data_cfg.dataset)
        return docs

    val_split = data_cfg.get("val_split")
    streams = [("train" if val_split else None, stream(data_cfg.split, data_cfg.get("max_documents")))]
    if val_split:
        streams.append(("val", stream(val_split, data_cfg.get("max_val_documents"))))
    return streams


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether a TCP connection to the Hub's endpoint opens (one short attempt; no DNS means no)."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout_s).close()
        return True
    except OSError:
        return False


def offline_when_unreachable() -> None:
    """No network to the Hub: use only the local caches at once (datasets otherwise retries each request with
    back-off, ~25 s of repeated warnings before the same failure)."""
    import datasets
    from huggingface_hub import constants
    if constants.HF_HUB_OFFLINE or hub_reachable():
        return
    log.warning("the Hugging Face Hub is not reachable: only locally cached datasets can load")
    constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True


def load_hf_dataset(path, config_name, split, streaming=False, revision=None, data_files=None, cache_dir=None):
    """`datasets.load_dataset`, with the failures of a machine that cannot reach the Hub made readable."""
    import datasets

    offline_when_unreachable()
    try:
        return datasets.load_dataset(path, config_name, split=split, streaming=streaming, revision=revision,
                                     data_files=data_files, cache_dir=cache_dir)
    except (ConnectionError, TimeoutError) as err:
        raise offline_error(path, err) from err
    except FileNotFoundError as err:
        if data_files is not None:
            raise
        raise offline_error(path, err) from err


def with_hub_errors(docs: Iterator, dataset: str) -> Iterator:
    """Streaming datasets fetch while iterating, so connection failures surface here, not at load time."""
    try:
        yield from docs
    except (ConnectionError, TimeoutError) as err:
        raise offline_error(dataset, err) from err


def offline_error(dataset: str, err: Exception) -> RuntimeError:
    error = RuntimeError(
        f"cannot load the Hugging Face dataset {dataset!r}: {type(err).__name__}: {err}. It needs network access "
        f"to the Hub, or a local copy: download it once where there is network (it is cached under "
        f"HF_DATASETS_CACHE / ~/.cache/huggingface and then works with HF_DATASETS_OFFLINE=1), or export it to "
        f"jsonl/parquet and use data=local data.paths=... data.text_field=...")
    error.config_error = True  # run.py prints it in one line: what to change is the data choice or the network
    return error


def dataset_documents(ds, text_field: str, what: str, prefix: str = "") -> Iterator[tuple[str, str]]:
    """(key, text) per record of a `datasets` Dataset or IterableDataset; the key is the record index."""
    columns = ds.column_names
    if columns is None:  # a streaming dataset may not know its columns before the first record
        first = next(iter(ds), None)
        columns = list(first) if first is not None else [text_field]
    if text_field not in columns:
        raise ValueError(f"data.text_field={text_field!r} is not a field of {what}; its fields are {list(columns)}")
    # In batches, lazily: a max_documents cap then reads only what it keeps, also from a streamed dataset.
    texts = itertools.chain.from_iterable(batch[text_field] for batch in ds.iter(batch_size=1000))
    for i, text in enumerate(texts):
        if text is not None and not isinstance(text, str):
            raise ValueError(f"data.text_field={text_field!r} of {what} holds {type(text).__name__}, not text")
        yield f"{prefix}{i}", text or ""


# WikiText stores one line per record; an article starts at a top-level heading line " = Title = ".
WIKITEXT_TITLE = re.compile(r"^ = [^=].* = $")


def wikitext_articles(lines: Iterable[tuple[str, str]]) -> Iterator[tuple[str, str]]:
    """Group WikiText line records into whole articles, so a document is an article, not a paragraph."""
    key, buf = None, []
    for line_key, line in lines:
        if WIKITEXT_TITLE.match(line.rstrip("\n")) and buf:
            yield key, "".join(buf)
            buf = []
        if not buf:
            key = line_key
        buf.append(line)
    if buf:
        yield key, "".join(buf)

