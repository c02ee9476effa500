"""Tokenizers behind one small interface: encode / encode_batch / decode, eot_id, pad_id, vocab_size.

`tokenizer.kind` picks one:
  bpe  a byte-level BPE trained with `tokenizers` on the corpus's training split, cached on disk under
       `cache_dir/tokenizers/` by corpus fingerprint and settings, so it is trained once
  char one id per character of the training text, an unknown-character id and the end-of-text id; the
       alphabet is cached the same way (nanoGPT's character-level models)
  ids  no text: the size and end-of-text id of a corpus tokenized elsewhere (data=tokenized)
  hf   any Hugging Face tokenizer by Hub id or local path (transformers.AutoTokenizer), e.g. Phi-3's

Document text never produces the end-of-text token: special tokens spelled out inside a document are
tokenized as ordinary text, so the only separators in a packed row are the ones packing inserts.
"""
import hashlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Iterable

import numpy as np

log = logging.getLogger(__name__)
EOT = "<|endoftext|>"
N_BYTES = 256  # a byte-level BPE starts from all 256 byte symbols
TOKENIZER_KINDS = ("bpe", "char", "hf", "ids")


class Tokenizer:
    """eot_id separates documents; pad_id fills the tail of unpacked rows (masked out by labels and
    document_ids, so its value only has to be a valid id); vocab_size counts every id, specials included."""
    eot_id: int
    pad_id: int
    vocab_size: int
    fingerprint: str  # changes whenever the id mapping could

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError


class BPETokenizer(Tokenizer):
    def __init__(self, tok, eot_token: str = EOT):
        self.tok = tok
        self.tok.encode_special_tokens = True  # "<|endoftext|>" inside a document is just text
        self.eot_id = tok.token_to_id(eot_token)
        if self.eot_id is None:
            raise ValueError(f"the BPE tokenizer has no {eot_token!r} token")
        self.pad_id = self.eot_id  # GPT-2's convention: no extra token for padding
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.fingerprint = hashlib.sha256(tok.to_str().encode()).hexdigest()[:16]

    def __setstate__(self, state):  # a pickled `tokenizers.Tokenizer` (sent to a worker process) forgets the flag
        self.__dict__.update(state)
        self.tok.encode_special_tokens = True

    def encode_batch(self, texts):
        return [e.ids for e in self.tok.encode_batch_fast(texts, add_special_tokens=False)]

    def decode(self, ids):
        return self.tok.decode(list(ids), skip_special_tokens=False)


class HFTokenizer(Tokenizer):
    def __init__(self, tok, eot_token: str | None = None, add_special_tokens: bool = False):
        self.tok = tok
        self.add_special_tokens = add_special_tokens  # e.g. Llama-style <s> at the start of every document
        eot_token = eot_token or tok.eos_token
        if eot_token is None:
            raise ValueError(f"tokenizer {tok.name_or_path!r} has no eos token; set tokenizer.eot_token")
        self.eot_id = tok.convert_tokens_to_ids(eot_token)
        if self.eot_id is None or self.eot_id == tok.unk_token_id:
            raise ValueError(f"tokenizer.eot_token={eot_token!r} is not a token of {tok.name_or_path!r}")
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else self.eot_id
        self.vocab_size = len(tok)  # base vocabulary plus added tokens
        spec = tok.backend_tokenizer.to_str() if tok.is_fast else json.dumps(sorted(tok.get_vocab().items()))
        spec += f"|eot={self.eot_id}|specials={add_special_tokens}"
        self.fingerprint = hashlib.sha256(spec.encode()).hexdigest()[:16]

    def encode_batch(self, texts):
        # verbose=False: documents longer than the tokenizer's model_max_length are fine, packing cuts them
        return self.tok(list(texts), add_special_tokens=self.add_special_tokens, split_special_tokens=True,
                        return_attention_mask=False, verbose=False)["input_ids"]

    def decode(self, ids):
        return self.tok.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


class CharTokenizer(Tokenizer):
    """One id per character of the training text (nanoGPT's shakespeare_char), in code-point order, then an
    unknown-character id and the end-of-text id: `<|endoftext|>` inside a document is just its 13 characters.
    Decoding gives text for any id: the unknown id and ids past the vocabulary (a padded embedding) decode to
    U+FFFD, the eot to `<|endoftext|>`."""
    UNKNOWN = "\ufffd"

    def __init__(self, chars: str):
        self.chars = "".join(sorted(set(chars)))
        self.code_points = np.frombuffer(self.chars.encode("utf-32-le"), dtype=np.uint32)  # sorted: id = index
        self.unk_id, self.eot_id = len(self.chars), len(self.chars) + 1
        self.pad_id = self.eot_id
        self.vocab_size = len(self.chars) + 2
        self.fingerprint = hashlib.sha256(json.dumps(["char", self.chars]).encode()).hexdigest()[:16]

    def encode_batch(self, texts):
        return [self.encode_array(text).tolist() for text in texts]

    def encode_array(self, text: str) -> np.ndarray:
        codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        ids = np.searchsorted(self.code_points, codes)
        known = self.code_points[np.minimum(ids, max(len(self.chars) - 1, 0))] == codes if len(self.chars) else ids < 0
        return np.where(known, ids, self.unk_id)

    def decode(self, ids):
        table = self.chars + self.UNKNOWN
        return "".join(table[i] if 0 <= i <= self.unk_id else EOT if i == self.eot_id else self.UNKNOWN
                       for i in map(int, ids))


class IdsTokenizer(Tokenizer):
    """The vocabulary of a corpus tokenized elsewhere (data=tokenized), known only by its size and end-of-text
    id; it has no text: decode writes ids as <id> (use tokenizer=hf with the corpus's own tokenizer for text)."""

    def __init__(self, vocab_size: int, eot_id: int | None):
        self.vocab_size, self.eot_id = int(vocab_size), None if eot_id is None else int(eot_id)
        self.pad_id = 0 if eot_id is None else self.eot_id  # any valid id: padding is masked out
        self.fingerprint = hashlib.sha256(json.dumps(["ids", self.vocab_size, self.eot_id]).encode()).hexdigest()[:16]

    def encode_batch(self, texts):
        raise ValueError("tokenizer.kind=ids has no text to encode: give tokenizer=hf with the tokenizer the corpus "
                         "was made with")

    def decode(self, ids):
        return "".join(f"<{int(i)}>" for i in ids)


def text_characters(texts: Iterable[str], max_chars: int | None = None) -> tuple[str, int]:
    """The distinct characters of `texts` (at most max_chars of them read), and how many were read; lone
    surrogates are left out (they are not text: they encode as the unknown id)."""
    seen, read = set(), 0
    for text in texts:
        if max_chars is not None and read >= max_chars:
            break
        piece = text if max_chars is None else text[:max_chars - read]
        seen.update(piece)
        read += len(piece)
    return "".join(sorted(c for c in seen if not 0xD800 <= ord(c) <= 0xDFFF)), read


def char_tokenizer(tok_cfg, train_texts, corpus_fingerprint, cache_dir, rebuild=False):
    settings = {"kind": "char", "corpus": corpus_fingerprint, "train_max_chars": tok_cfg.get("train_max_chars")}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cache_dir) / "tokenizers" / f"char-{key}.json"
    info = {"kind": "char", "path": str(path), "trained": False, "train_seconds": 0.0}
    if path.exists() and not rebuild:
        tok = CharTokenizer(json.loads(path.read_text())["chars"])
    else:
        started = time.perf_counter()
        chars, read = text_characters(train_texts, settings["train_max_chars"])
        tok = CharTokenizer(chars)
        info.update(trained=True, train_seconds=time.perf_counter() - started, train_chars=read)
        atomic_write_text(path, json.dumps({"chars": tok.chars, **settings}))
    if tok_cfg.get("vocab_size") is not None and tok_cfg.vocab_size < tok.vocab_size:
        raise ValueError(f"tokenizer.vocab_size={tok_cfg.vocab_size} is smaller than the {tok.vocab_size} ids of the "
                         f"training text's characters (+ unknown + end-of-text); leave it null to take that size")
    return tok, info


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp_", suffix=path.suffix)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)  # atomic: concurrent sweep jobs never read half a file


def bpe_minimum(tok_cfg) -> tuple[int, list[str]]:
    specials = [EOT] + [t for t in (tok_cfg.get("extra_special_tokens") or []) if t != EOT]
    return N_BYTES + len(specials), specials


def check_tokenizer_config(tok_cfg) -> None:
    """The checks that need no data (run before the corpus is read)."""
    if tok_cfg.kind not in TOKENIZER_KINDS:
        raise ValueError(f"tokenizer.kind={tok_cfg.kind!r} is not a tokenizer kind; choose one of {TOKENIZER_KINDS}")
    if tok_cfg.kind == "ids":
        vocab, eot = tok_cfg.get("vocab_size"), tok_cfg.get("eot_id")
        if vocab is None or vocab < 1:
            raise ValueError(f"tokenizer.vocab_size={vocab}: tokenizer=ids needs the vocabulary size the corpus was "
                             f"tokenized with (nanoGPT's GPT-2 files: 50257; shakespeare_char: 65)")
        if eot is not None and not 0 <= eot < vocab:
            raise ValueError(f"tokenizer.eot_id={eot} must be in [0, tokenizer.vocab_size={vocab}) or null")
    if tok_cfg.kind == "bpe":
        need, specials = bpe_minimum(tok_cfg)
        if tok_cfg.vocab_size is None or tok_cfg.vocab_size < need:
            raise ValueError(f"tokenizer.vocab_size={tok_cfg.vocab_size} is smaller than the {need} tokens a byte-level "
                             f"BPE starts with ({N_BYTES} byte symbols + special tokens {specials}); for a character "
                             f"vocabulary use tokenizer=char")


def build_tokenizer(tok_cfg, train_texts: Iterable[str], corpus_fingerprint: str, cache_dir, rebuild=False):
    """The tokenizer `tok_cfg` describes; returns (tokenizer, info) where info says what it cost. A BPE reads
    `train_texts` (a lazy iterable) only when it has to be trained, and then at most train_max_chars of it."""
    check_tokenizer_config(tok_cfg)
    if tok_cfg.kind == "bpe":
        return bpe_tokenizer(tok_cfg, train_texts, corpus_fingerprint, cache_dir, rebuild)
    if tok_cfg.kind == "char":
        return char_tokenizer(tok_cfg, train_texts, corpus_fingerprint, cache_dir, rebuild)
    if tok_cfg.kind == "ids":
        return IdsTokenizer(tok_cfg.vocab_size, tok_cfg.get("eot_id")), {"kind": "ids"}
    tok = hf_tokenizer(tok_cfg)
    return tok, {"kind": "hf", "name_or_path": tok_cfg.name_or_path, "vocab_size": tok.vocab_size}


def bpe_tokenizer(tok_cfg, train_texts, corpus_fingerprint, cache_dir, rebuild=False):
    from tokenizers import Tokenizer as HFTok

    _, specials = bpe_minimum(tok_cfg)
    settings = {"corpus": corpus_fingerprint, "vocab_size": tok_cfg.vocab_size, "specials": specials,
                "min_frequency": tok_cfg.get("min_frequency", 2), "train_max_chars": tok_cfg.get("train_max_chars")}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cache_dir) / "tokenizers" / f"bpe-{key}.json"
    info = {"kind": "bpe", "path": str(path), "trained": False, "train_seconds": 0.0}
    if path.exists() and not rebuild:
        return BPETokenizer(HFTok.from_file(str(path))), info

    log.info(f"tokenizer: training a byte-level BPE of {tok_cfg.vocab_size:,} tokens on a sample of the training "
             f"documents (once: cached in {path})")
    started = time.perf_counter()
    tok, train_chars = train_bpe(train_texts, tok_cfg.vocab_size, specials, settings["min_frequency"],
                                 settings["train_max_chars"])
    info.update(trained=True, train_seconds=time.perf_counter() - started, train_chars=train_chars)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp_", suffix=".json")
    os.close(fd)
    tok.save(tmp)
    os.replace(tmp, path)  # atomic: concurrent sweep jobs never read half a file
    return BPETokenizer(tok), info


def train_bpe(texts, vocab_size, specials, min_frequency=2, max_chars=None):
    """A GPT-2 style byte-level BPE: every byte is a symbol, so any text encodes without unknown tokens."""
    from tokenizers import Tokenizer as HFTok, decoders, models, pre_tokenizers, trainers

    tok = HFTok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    # Cap the training text on big corpora: merges converge long before the last gigabyte. The sample is
    # streamed into the trainer, which counts words batch by batch; the stream is not read past the cap.
    chars = 0

    def sample():
        nonlocal chars
        for text in texts:
            if max_chars is not None and chars >= max_chars:
                return
            piece = text if max_chars is None else text[:max_chars - chars]
            chars += len(piece)
            yield piece
    tok.train_from_iterator(sample(), trainer)
    return tok, chars


def hf_tokenizer(tok_cfg) -> HFTokenizer:
    from transformers import AutoTokenizer

    name = tok_cfg.name_or_path
    if not name:
        raise ValueError("tokenizer.name_or_path is empty; give a Hub id (microsoft/Phi-3-mini-4k-instruct) or a path")
    try:
        tok = AutoTokenizer.from_pretrained(name, revision=tok_cfg.get("revision"))
    except OSError as err:
        raise RuntimeError(f"cannot load the tokenizer {name!r}: {err}. A Hub id needs network access or a copy in "
                           f"the Hugging Face cache; or give tokenizer.name_or_path=<local directory>") from err
    wrapped = HFTokenizer(tok, tok_cfg.get("eot_token"), tok_cfg.get("add_special_tokens", False))
    if tok_cfg.get("vocab_size") is not None and tok_cfg.vocab_size < wrapped.vocab_size:
        raise ValueError(f"tokenizer.vocab_size={tok_cfg.vocab_size} is smaller than {name!r}'s {wrapped.vocab_size} "
                         f"tokens; leave it null to take the tokenizer's size")
    return wrapped
