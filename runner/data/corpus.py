"""Corpora: documents as plain strings, split into train and validation by document.

Three sources, chosen by `data.source`:
  stdlib  the running Python's standard library, one document per .py file (no network needed)
  hub     a Hugging Face Hub dataset through `datasets.load_dataset` (TinyStories, WikiText-103, FineWeb-Edu)
  local   local .txt, .jsonl or .parquet files by path or glob

The split is by document and never by position: a document's key (its relative path, or its record index)
is hashed, so a document lands in the same split whatever else is in the corpus. The fingerprint hashes
every key and text of both splits, so any change to the corpus changes every cache key built on it.
"""
import glob
import hashlib
import io
import itertools
import os
import platform
import re
import sysconfig
import tokenize
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from omegaconf import OmegaConf

# Directories of the standard library that hold tests (test/, tests/, idlelib/idle_test, lib2to3/tests,
# ctypes/test, ...) or third-party code; a directory with one of these names is skipped anywhere in the tree.
STDLIB_EXCLUDED_DIRS = ("test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__")


@dataclass
class Corpus:
    name: str
    train: list[str]
    val: list[str]
    fingerprint: str
    train_keys: list[str] = field(default_factory=list)  # a path or record index per document
    val_keys: list[str] = field(default_factory=list)
    meta: dict = field(default_factory=dict)  # source, python_version, skipped empty documents, ...


def load_corpus(data_cfg, cache_dir: str | os.PathLike) -> Corpus:
    """Read the documents `data_cfg` names and split them. Raises before anything is tokenized."""
    source = data_cfg.source
    max_docs = data_cfg.get("max_documents")
    if max_docs is not None and max_docs < 1:
        raise ValueError(f"data.max_documents={max_docs} must be >= 1 or null")
    val_fraction = data_cfg.val_fraction
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"data.val_fraction={val_fraction} must be in [0, 1)")

    meta = {"source": source, "python_version": platform.python_version()}
    skipped = []  # keys of empty documents: skipped before max_documents counts, so the cap counts real ones
    val = None    # a Hub dataset may bring its own validation split
    if source == "stdlib":
        root = Path(sysconfig.get_paths()["stdlib"])
        train = list(itertools.islice(non_empty(stdlib_documents(root), skipped), max_docs))
        meta["root"] = str(root)
    elif source == "hub":
        train, val = hub_documents(data_cfg, skipped)
        meta.update(dataset=data_cfg.dataset, config_name=data_cfg.get("config_name"))
    elif source == "local":
        train = list(itertools.islice(non_empty(local_documents(data_cfg, cache_dir), skipped), max_docs))
    else:
        raise ValueError(f"data.source={source!r} is not a source; choose stdlib, hub or local")
    if val is None:
        train, val = split_by_key(train, val_fraction)

    meta["skipped_empty_documents"] = len(skipped)
    if not train and not val:
        raise ValueError(f"corpus {data_cfg.name!r} has no non-empty documents ({len(skipped)} empty ones skipped)")
    if not train:
        raise ValueError(f"corpus {data_cfg.name!r} has no training documents; lower data.val_fraction")
    if not val and data_cfg.get("val_split"):
        raise ValueError(f"data.val_split={data_cfg.val_split!r} of {data_cfg.name!r} has no non-empty documents")
    if not val and val_fraction > 0:
        raise ValueError(f"corpus {data_cfg.name!r} is too small to hold out a validation document "
                         f"({len(train)} documents); add documents or set data.val_fraction=0")
    return Corpus(data_cfg.name, [t for _, t in train], [t for _, t in val], fingerprint(train, val),
                  [k for k, _ in train], [k for k, _ in val], meta)


def non_empty(docs: Iterable[tuple[str, str]], skipped: list) -> Iterator[tuple[str, str]]:
    """Documents with at least one non-blank character; the keys of the others are appended to `skipped`."""
    for key, text in docs:
        if text.strip():
            yield key, text
        else:
            skipped.append(key)


def split_by_key(docs: list[tuple[str, str]], val_fraction: float):
    """Validation = documents whose key hashes below val_fraction; order within each split is kept."""
    def u(key):  # a uniform number in [0, 1) that depends on the key only
        return int(hashlib.sha1(key.encode()).hexdigest()[:13], 16) / 16 ** 13
    scores = [u(key) for key, _ in docs]
    train = [d for d, s in zip(docs, scores) if s >= val_fraction]
    val = [d for d, s in zip(docs, scores) if s < val_fraction]
    if val_fraction > 0 and not val and len(docs) >= 2:
        # A small corpus can draw no validation document at all; hold out the one with the lowest hash
        # (deterministic, and still chosen by key, not by position).
        lowest = min(range(len(docs)), key=scores.__getitem__)
        val, train = [docs[lowest]], docs[:lowest] + docs[lowest + 1:]
    return train, val


def fingerprint(train: list[tuple[str, str]], val: list[tuple[str, str]]) -> str:
    h = hashlib.sha256()
    for split, docs in (("train", train), ("val", val)):
        for key, text in docs:
            data = text.encode("utf-8", "surrogatepass")
            h.update(f"{split}\0{key}\0{len(data)}\0".encode())
            h.update(data)
    return h.hexdigest()[:16]


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

def local_documents(data_cfg, cache_dir) -> Iterator[tuple[str, str]]:
    """Documents from local files: every path or glob in `data.paths`, sorted, then read by format."""
    patterns = data_cfg.paths
    if patterns is None or len(patterns) == 0:
        raise ValueError("data.paths is empty; give a file, a directory's glob (e.g. 'corpus/*.txt') or a list")
    if isinstance(patterns, str):
        patterns = [patterns]
    files = []
    for pattern in patterns:
        pattern = os.path.expanduser(str(pattern))
        matched = sorted(glob.glob(pattern, recursive=True))
        if not matched:
            raise FileNotFoundError(f"data.paths: no file matches {pattern!r} (cwd {os.getcwd()})")
        files += [f for f in matched if os.path.isfile(f)]
    if not files:
        raise FileNotFoundError(f"data.paths={list(patterns)} matches only directories; use a glob such as 'dir/*.txt'")

    fmt = data_cfg.get("format", "auto")
    formats = {file_format(f) if fmt == "auto" else fmt for f in files}
    if len(formats) != 1:
        raise ValueError(f"data.paths mixes formats {sorted(formats)}; give one format at a time")
    fmt = formats.pop()
    if fmt == "txt":
        yield from text_documents(files, data_cfg.get("txt_documents", "file"))
    elif fmt in ("jsonl", "parquet"):
        # The same `datasets` code path as Hub datasets, with the local files as data_files.
        builder = {"jsonl": "json", "parquet": "parquet"}[fmt]
        ds = load_hf_dataset(builder, None, "train", data_files=files, cache_dir=os.path.join(cache_dir, "hf_datasets"))
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

def hub_documents(data_cfg, skipped: list):
    """(train documents, validation documents or None) from a Hub dataset; None = split by key."""
    data_files = data_cfg.get("data_files")
    if OmegaConf.is_config(data_files):  # datasets wants a plain str, list or dict
        data_files = OmegaConf.to_container(data_files)

    def load(split, limit):
        ds = load_hf_dataset(data_cfg.dataset, data_cfg.get("config_name"), split,
                             streaming=data_cfg.get("streaming", False), revision=data_cfg.get("revision"),
                             data_files=data_files)
        docs = dataset_documents(ds, data_cfg.text_field, what=f"{data_cfg.dataset}[{split}]", prefix=f"{split}/")
        if data_cfg.get("documents", "records") == "wikitext_articles":
            docs = wikitext_articles(docs)
        elif data_cfg.get("documents", "records") != "records":
            raise ValueError(f"data.documents={data_cfg.documents!r} must be records or wikitext_articles")
        return list(with_hub_errors(itertools.islice(non_empty(docs, skipped), limit), data_cfg.dataset))

    train = load(data_cfg.split, data_cfg.get("max_documents"))
    val_split = data_cfg.get("val_split")
    val = load(val_split, data_cfg.get("max_val_documents")) if val_split else None
    return train, val


def load_hf_dataset(path, config_name, split, streaming=False, revision=None, data_files=None, cache_dir=None):
    """`datasets.load_dataset`, with the failures of a machine that cannot reach the Hub made readable."""
    import datasets

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
    return RuntimeError(
        f"cannot load the Hugging Face dataset {dataset!r}: {type(err).__name__}: {err}. It needs network access "
        f"to the Hub, or a local copy: download it once where there is network (it is cached under "
        f"HF_DATASETS_CACHE / ~/.cache/huggingface and then works with HF_DATASETS_OFFLINE=1), or export it to "
        f"jsonl/parquet and use data=local data.paths=... data.text_field=...")


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

