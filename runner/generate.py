"""Text generation: greedy or sampled (temperature, top-k, top-p), batched prompts, a static KV cache or
none, tokens streamed as they come.

    python run.py task=generate model=phi3 model.checkpoint=microsoft/Phi-3-mini-4k-instruct prompt="'The sky is'"
    python run.py task=generate generate.weights=outputs/runs/<run>    # a trained run; prompt: the root config's
    python run.py task=generate ... "prompt=['def f(x):','import os']"  # a batch

(Hydra reads `prompt=...` with its override grammar: quote text with parentheses, commas or colons inside
single quotes, as above; a prompt it cannot hold, e.g. one that starts with a newline, goes in a file:
`generate.prompt_file=prompt.txt`, read exactly as written.)

Batched prompts are left-padded so that every row's next token lands in the same column. The padding is a
document of its own (document id -1, the prompt's is 0): no prompt token attends to it and the prompt's
positions start at 0, so a padded row decodes exactly as it would alone.

Past model.max_seq_len (prompt + new tokens) the context is cropped to its last max_seq_len tokens, as nanoGPT
and transformers do, and encoded afresh every step from then on (positions start at 0 at the crop: the KV
cache is recomputed, never shifted), so a 64-position model writes any length.
"""
import sys
import time
from functools import partial

import torch

from runner.build import build_model, check_model_config, record_model, resolve_device
from runner.compute import resolve_compile
from runner.decode import Decoder
from runner.task import config_checks, task_run

PAD_DOCUMENT, PROMPT_DOCUMENT = -1, 0


def sample_next(logits, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                generator=None):
    """logits (B, V) -> next token ids (B,). temperature 0 is greedy; otherwise softmax(logits / temperature),
    cut to the top_k tokens, then to the smallest set of tokens whose probability reaches top_p (nucleus
    sampling, Holtzman et al. 2020), the order transformers' logits warpers use."""
    if not temperature or temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token once the tokens ranked above it already hold top_p; the top token always stays
        drop_sorted = probs.cumsum(dim=-1) - probs >= top_p
        logits = logits.masked_fill(drop_sorted.scatter(1, order, drop_sorted), float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model, prompts, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, seed: int | None = None, eos_token_id=None, use_cache: bool = True,
             pad_token_id: int = 0, on_token=None, compile: bool = False) -> list[list[int]]:
    """Continue each prompt (a list of token ids, or a list of them) by up to `max_new_tokens` tokens.

    Returns each row's new tokens, ending with the first end-of-text token (eos_token_id: an id or a list)
    when one came. Generation stops when every row has ended or after max_new_tokens. With use_cache=False
    every step runs the whole sequence again (the reference the cache must match). Past model.max_seq_len
    tokens, every step sees only the last max_seq_len (crop_context).
    on_token(step, tokens (B,), finished (B,)) is called for every step as it arrives; `finished` marks
    rows that had ended before this step.
    compile=True (with the cache): the fixed-shape, torch.compile'd prefill and step of runner/decode.py;
    the same tokens as the eager loop (the reference), faster once compiled.
    """
    if prompts and isinstance(prompts[0], int):
        prompts = [prompts]
    device = next(model.parameters()).device
    ids, docs = left_padded(prompts, pad_token_id, device)
    B, P = ids.shape
    eos = torch.tensor([] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int)
                       else list(eos_token_id), dtype=torch.long, device=device)
    generator = None
    if seed is not None and temperature and temperature > 0:
        generator = torch.Generator(device=device).manual_seed(int(seed))

    ids, docs = crop_context(ids, docs, model.max_seq_len)
    cache_len = min(P + max_new_tokens, model.max_seq_len)
    decoder = Decoder(model, B, cache_len, compile=True) if compile and use_cache else None
    cache = model.allocate_cache(B, cache_len) if use_cache and decoder is None else None
    switch = model.reencode_at  # e.g. LongRoPE past its original context: cached keys go stale there
    longest = max(len(p) for p in prompts)  # the largest position + 1 in this call decides LongRoPE's factors
    long_mode = switch is not None and longest > switch
    logits = decoder.prefill(ids, docs) if decoder else model(ids, document_ids=docs, cache=cache)[:, -1]  # (B, V)
    new, finished = [], torch.zeros(B, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        token = sample_next(logits, temperature, top_k, top_p, generator)  # (B,)
        new.append(token)
        if on_token is not None:
            on_token(step, token, finished.clone())
        finished |= torch.isin(token, eos)
        if step == max_new_tokens - 1 or (eos.numel() and bool(finished.all())):  # no host sync without eos
            break
        ids = torch.cat([ids, token[:, None]], dim=1)
        docs = torch.cat([docs, torch.full((B, 1), PROMPT_DOCUMENT, dtype=torch.long, device=device)], dim=1)
        crossing = switch is not None and not long_mode and longest + step + 1 > switch
        long_mode = long_mode or crossing
        cropped = ids.shape[1] > model.max_seq_len
        ids, docs = crop_context(ids, docs, model.max_seq_len)
        if decoder is not None:  # re-encoding is one more prefill (compiled for its length); the step stays
            logits = decoder.prefill(ids, docs) if crossing or cropped else decoder.step(token)
        elif cache is None or crossing or cropped:
            if cache is not None:  # positions changed (a crop, LongRoPE's long factors): re-encode the context
                cache.reset()
            logits = model(ids, document_ids=docs, cache=cache)[:, -1]
        else:
            logits = model(token[:, None], cache=cache)[:, -1]

    out = torch.stack(new, dim=1).tolist() if new else [[] for _ in range(B)]
    return cut_after_eos(out, set(eos.tolist()))


def left_padded(prompts: list[list[int]], pad_token_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompts right-aligned in one (B, P) batch: token ids, and document ids that keep the padding on
    the left out of every prompt's attention."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    B, P = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((B, P), pad_token_id, dtype=torch.long, device=device)
    docs = torch.full((B, P), PAD_DOCUMENT, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):] = torch.tensor(p, dtype=torch.long, device=device)
        docs[i, P - len(p):] = PROMPT_DOCUMENT
    return ids, docs


def cut_after_eos(rows: list[list[int]], eos: set[int]) -> list[list[int]]:
    """Each row cut after its first end-of-text token (in place; returned)."""
    for row in rows:
        for j, t in enumerate(row):
            if t in eos:
                del row[j + 1:]
                break
    return rows


# -- task=generate ------------------------------------------------------------------------------------------
class PromptTokenizer:
    """encode/decode and the end-of-text ids, over a transformers tokenizer or the project's own."""

    def __init__(self, encode, decode, eos_ids, name: str, vocab_size: int, chat_template=None):
        self.encode, self.decode, self.eos_ids, self.name = encode, decode, sorted(set(eos_ids)), name
        self.vocab_size = vocab_size
        self.chat_template = chat_template  # text -> ids in the tokenizer's chat format, or None

    @classmethod
    def from_hf(cls, tok, name: str, extra_eos=()):
        """A transformers tokenizer as its checkpoint uses it (its own special tokens, e.g. a leading <s>)."""
        eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
        chat = partial(_user_turn, tok) if getattr(tok, "chat_template", None) else None
        return cls(lambda text: tok(text)["input_ids"], lambda ids: tok.decode(ids, skip_special_tokens=False),
                   [*eos, *extra_eos], name, len(tok), chat)

    @classmethod
    def from_project(cls, tok, name: str):
        """runner.data.tokenizer's Tokenizer (the trained BPE or tokenizer.kind=hf)."""
        return cls(tok.encode, tok.decode, [tok.eot_id], name, tok.vocab_size)


def _user_turn(tok, text: str) -> list[int]:
    """`text` as one user message in the tokenizer's chat format, ready for the assistant's reply."""
    return list(tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                        tokenize=True, return_dict=True)["input_ids"])


def checkpoint_tokenizer(checkpoint) -> PromptTokenizer | None:
    """The tokenizer saved with a Hugging Face checkpoint (and its generation_config's end tokens), if any."""
    from variants.hf import resolve_checkpoint

    directory = resolve_checkpoint(checkpoint)
    if not any((directory / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    from transformers import AutoTokenizer, GenerationConfig
    tok = AutoTokenizer.from_pretrained(directory)
    extra = []
    if (directory / "generation_config.json").is_file():  # Phi-3 instruct ends turns with <|end|>, not eos
        eos = GenerationConfig.from_pretrained(directory).eos_token_id
        extra = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    return PromptTokenizer.from_hf(tok, str(checkpoint), extra)


def project_tokenizer(cfg) -> PromptTokenizer:
    """tokenizer.kind=hf loads by name; the trained BPE needs the corpus it was trained on (cached after once)."""
    if cfg.tokenizer.kind == "hf":
        from runner.data.tokenizer import hf_tokenizer
        return PromptTokenizer.from_project(hf_tokenizer(cfg.tokenizer), cfg.tokenizer.name_or_path)
    from runner.data import build_data
    return PromptTokenizer.from_project(build_data(cfg).tokenizer, f"{cfg.tokenizer.kind} ({cfg.data.name})")


def load_model_and_tokenizer(cfg, device):
    """The model cfg.model describes (random, a checkpoint, or generate.weights from a training run) and the
    tokenizer that goes with it. Returns (model, tokenizer, a line saying where the weights came from)."""
    from omegaconf import open_dict

    check_model_config(cfg.model)  # a bad model config fails before a corpus or tokenizer is read
    checkpoint = cfg.model.get("checkpoint")
    weights = cfg.generate.get("weights")
    tokenizer = checkpoint_tokenizer(checkpoint) if checkpoint else None
    if tokenizer is None:
        if checkpoint and cfg.tokenizer.kind != "hf":
            raise ValueError(f"checkpoint {checkpoint!r} has no tokenizer, and a freshly trained BPE's ids mean "
                             f"nothing to it: add tokenizer=hf tokenizer.name_or_path=<its tokenizer>")
        tokenizer = project_tokenizer(cfg)
    if not checkpoint and cfg.model.get("vocab_size") is None:
        with open_dict(cfg):
            cfg.model.vocab_size = tokenizer.vocab_size
    model = build_model(cfg.model, device)
    if model.vocab_size < tokenizer.vocab_size:
        raise ValueError(f"the model has {model.vocab_size} token embeddings, tokenizer {tokenizer.name!r} has "
                         f"{tokenizer.vocab_size} tokens")
    source = f"checkpoint {checkpoint}" if checkpoint else "random weights (no model.checkpoint)"
    if weights:
        from runner.checkpoint import load_model_weights
        try:
            path = load_model_weights(model, weights, device)
        except FileNotFoundError as err:
            raise FileNotFoundError(f"generate.weights={err}") from None
        source = f"training checkpoint {path}"
    model.eval().fuse_projections()  # q/k/v and gate/up as one GEMM each: decoding reads every weight per token
    return model, tokenizer, source


def random_weights_notice(root="outputs") -> str:
    """The line said before text from random weights: what it is, and the command for a trained model."""
    from runner.resume import resumable_runs
    latest = resumable_runs(root, limit=1)
    how = (f"python run.py task=generate generate.weights={latest[0][0]} (with the model overrides it was trained with)"
           if latest else "train one (python run.py), then python run.py task=generate generate.weights=outputs/runs/<run>")
    return f"# random weights (no generate.weights, no model.checkpoint): the text below is noise. A trained model: {how}"


def continuation(tok: PromptTokenizer, prompt_ids, new_ids) -> str:
    """The text that new_ids (end-of-text dropped) add to the prompt. Decoded after the prompt, because
    SentencePiece tokenizers (Phi-3's) drop a word's leading space when its token is decoded alone."""
    new_ids = [t for t in new_ids if t not in tok.eos_ids]
    before, after = tok.decode(list(prompt_ids)), tok.decode(list(prompt_ids) + new_ids)
    return after[len(before):] if after.startswith(before) else tok.decode(new_ids)


def crop_context(ids, docs, max_seq_len: int):
    """The last max_seq_len columns of ids and docs (B, T), nanoGPT's `idx[:, -block_size:]`. Every position
    type is cropped alike: learned positions have no row past max_seq_len, and RoPE would extrapolate past what
    the model was trained on (a LongRoPE checkpoint's max_seq_len is its long context)."""
    return (ids, docs) if ids.shape[1] <= max_seq_len else (ids[:, -max_seq_len:], docs[:, -max_seq_len:])


def context_note(model, prompts, max_new_tokens: int) -> str | None:
    """The stderr line said when generation will pass model.max_seq_len, or None."""
    longest = max((len(p) for p in prompts), default=0)
    if longest + max_new_tokens <= model.max_seq_len:
        return None
    return (f"# {longest} prompt tokens + generate.max_new_tokens={max_new_tokens} pass model.max_seq_len="
            f"{model.max_seq_len}: each new token sees only the last {model.max_seq_len} tokens (re-encoded)")


def prompt_texts(cfg) -> list[str]:
    """generate.prompt_file's whole text, exactly as written (a leading newline, quotes, '=' and all that Hydra's
    override grammar cannot hold), else the root config's `prompt` (a string or a list)."""
    path = cfg.generate.get("prompt_file")
    if path:
        from pathlib import Path
        if not Path(path).is_file():
            raise FileNotFoundError(f"generate.prompt_file={path} is not a file")
        return [Path(path).read_text(encoding="utf-8")]
    return [cfg.prompt] if isinstance(cfg.prompt, str) else list(cfg.prompt)


def main(cfg):
    """results.json holds the prompts and completions; the text goes to stdout, everything else to stderr."""
    with task_run(cfg, "generate") as run:
        run.results.update(generation=_generate(cfg, run))
    return run.results.data.get("generation")  # None when interrupted


def _generate(cfg, run) -> dict:
    g = cfg.generate
    device = resolve_device(g.get("device") or "auto")
    torch.manual_seed(g.seed if g.seed is not None else 0)
    with config_checks():  # a bad model config fails before a corpus or tokenizer is read (and prints in one line)
        check_model_config(cfg.model)
        compile_decoding = resolve_compile(g.get("compile"), device)  # generate.compile: auto | true | false
        texts = prompt_texts(cfg)
    model, tok, source = load_model_and_tokenizer(cfg, device)
    record_model(run.results, model)
    run.results.update(weights=source)
    with config_checks():
        if g.get("chat") and tok.chat_template is None:
            raise ValueError(f"generate.chat=true but tokenizer {tok.name!r} has no chat template")
        prompts = [tok.chat_template(t) if g.get("chat") else tok.encode(t) for t in texts]
    print(f"# {source}; tokenizer {tok.name}; {model.num_params():,} parameters on {device}", file=sys.stderr)
    if context_note(model, prompts, g.max_new_tokens):
        print(context_note(model, prompts, g.max_new_tokens), file=sys.stderr)
    if not cfg.model.get("checkpoint") and not g.get("weights"):
        print(random_weights_notice(), file=sys.stderr)

    if not g.temperature and (g.top_k or g.top_p):
        print("# generate.temperature=0 is greedy: top_k/top_p apply only when sampling", file=sys.stderr)

    streaming = g.get("stream", True) and len(prompts) == 1
    shown = {"ids": [], "text": ""}

    def stream(step, tokens, finished):
        if finished[0]:
            return
        shown["ids"].append(int(tokens[0]))
        text = continuation(tok, prompts[0], shown["ids"])
        if not text.endswith("\ufffd"):  # a token may end inside a multi-byte character: wait for the rest
            print(text[len(shown["text"]):], end="", flush=True)
            shown["text"] = text

    if streaming:
        print(texts[0], end="", flush=True)
    started = time.perf_counter()
    out = generate(model, prompts, max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_k=g.top_k,
                   top_p=g.top_p, seed=g.seed, eos_token_id=tok.eos_ids, use_cache=g.use_cache,
                   on_token=stream if streaming else None, compile=compile_decoding)
    seconds = time.perf_counter() - started
    completions = [continuation(tok, p, row) for p, row in zip(prompts, out)]
    if streaming:
        print(completions[0][len(shown["text"]):], flush=True)  # anything held back at a split character
    else:
        for text, completion in zip(texts, completions):
            print(f"--- {text!r}\n{text}{completion}")
    n_new = sum(len(row) for row in out)
    print(f"# {n_new} tokens in {seconds:.2f} s ({n_new / seconds:.1f} tokens/s, KV cache "
          f"{'on' if g.use_cache else 'off'})", file=sys.stderr)
    return {"prompts": texts, "prompt_ids": prompts, "tokens": out, "completions": completions, "seconds": seconds,
            "eos_ids": tok.eos_ids}
