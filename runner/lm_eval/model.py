"""Our TransformerLM behind lm-evaluation-harness's model interface (its TemplateLM), batched as its HFLM is.

    loglikelihood          (context, continuation) -> (log p(continuation | context), is it the greedy choice):
                           one forward over context + continuation, requests sorted longest first and right-padded
                           into batches; the harness tokenizes and splits the pair (TemplateLM.loglikelihood)
    loglikelihood_rolling  a whole text in the harness's rolling windows of max_length tokens, each token
                           predicted once (lm_eval.utils.get_rolling_token_windows), summed
    generate_until         greedy or sampled continuations with runner.generate's static KV cache (prompts
                           left-padded as their own document), cut at the first stop sequence

Right padding needs no mask: causal attention keeps every real token from seeing the padding after it.
"""
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from lm_eval import utils
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

from runner.compute import autocast
from runner.generate import generate


@dataclass(frozen=True)
class HarnessTokenizer:
    """What the harness needs of a tokenizer. prefix_id stands in for an empty context and starts every rolling
    window: BOS when the tokenizer has one, else end-of-text (HFLM's prefix_token_id)."""
    encode: Callable[[str, bool | None], list[int]]  # (text, add_special_tokens; None: the tokenizer's default)
    decode: Callable[[list[int]], str]
    eot_id: int
    prefix_id: int
    vocab_size: int
    name: str

    @classmethod
    def from_hf(cls, tok, name: str) -> "HarnessTokenizer":
        """A transformers tokenizer, used as HFLM uses it (its own special tokens, e.g. a leading <s>)."""
        if tok.eos_token_id is None:
            raise ValueError(f"tokenizer {name!r} has no end-of-text (eos) token, which the harness needs")

        def encode(text, add_special_tokens=None):
            specials = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
            return tok.encode(text, **specials)
        prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        return cls(encode, lambda ids: tok.decode(ids, skip_special_tokens=True), tok.eos_token_id, prefix,
                   len(tok), name)

    @classmethod
    def from_project(cls, tok, name: str) -> "HarnessTokenizer":
        """runner.data.tokenizer's Tokenizer, as the model was trained: documents follow <|endoftext|>, so an
        empty context is end-of-text."""
        return cls(lambda text, add_special_tokens=None: tok.encode(text), tok.decode, tok.eot_id, tok.eot_id,
                   tok.vocab_size, name)


class VariantsLM(TemplateLM):
    """model: a TransformerLM (eval mode, on its device); max_length: the longest window the model reads (default
    its max_seq_len); dtype: the autocast dtype (None: the weights' own)."""

    def __init__(self, model, tokenizer: HarnessTokenizer, batch_size: int = 8, max_length: int | None = None,
                 max_gen_toks: int = 256, dtype: torch.dtype | None = None, seed: int = 0):
        super().__init__()
        self.model, self.tok = model.eval(), tokenizer
        self._device = next(model.parameters()).device
        self.batch_size, self.max_gen_toks, self.dtype, self.seed = int(batch_size), max_gen_toks, dtype, seed
        self.max_length = max_length or model.max_seq_len
        if self.max_length > model.max_seq_len:
            raise ValueError(f"lm_eval.max_length={self.max_length} exceeds the model's max_seq_len="
                             f"{model.max_seq_len}")

    # -- what TemplateLM asks for ------------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tok.eot_id

    @property
    def prefix_token_id(self) -> int:
        return self.tok.prefix_id

    @property
    def tokenizer_name(self) -> str:
        return self.tok.name

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tok.encode(string, add_special_tokens)

    @torch.no_grad()
    def _log_probs(self, rows: list[list[int]]) -> torch.Tensor:
        """Right-padded rows -> float32 log-softmax over the vocabulary (B, T, V)."""
        ids = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long, device=self.device)
        for i, row in enumerate(rows):
            ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        with autocast(self.device, self.dtype):
            logits = self.model(ids)
        return F.log_softmax(logits.float(), dim=-1)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """requests: ((context, continuation) or (None,), context ids, continuation ids)."""
        order = Collator(requests, sort_fn=lambda r: (-len(r[1] + r[2]), tuple(r[1] + r[2])))
        out = []
        for chunk in order.get_batched(n=self.batch_size):
            for _, _, cont in chunk:
                if not 0 < len(cont) <= self.max_length:
                    raise ValueError(f"a continuation of {len(cont)} tokens does not fit lm_eval.max_length="
                                     f"{self.max_length} (or is empty)")
            # the last max_length + 1 tokens (the harness truncates on the left); the model reads all but the last
            rows = [(ctx + cont)[-(self.max_length + 1):][:-1] for _, ctx, cont in chunk]
            log_probs = self._log_probs(rows)  # (B, T, V)
            for (request, _, cont), row, lp in zip(chunk, rows, log_probs):
                lp = lp[len(row) - len(cont):len(row)]  # (len(cont), V): the predictions of the continuation
                target = torch.tensor(cont, device=lp.device)
                answer = (float(lp.gather(1, target[:, None]).sum()), bool((lp.argmax(-1) == target).all()))
                out.append(answer)
                if request[0] is not None:  # rolling windows are cached per text, in loglikelihood_rolling
                    self.cache_hook.add_partial("loglikelihood", request, answer)
        return order.get_original(out)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            for context, continuation in map(utils.make_disjoint_window, utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append(((None,), context, continuation))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (log_prob, _) in zip(owner, self._loglikelihood_tokens(windows)):
            totals[i] += log_prob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        order = Collator([req.args for req in requests], sort_fn=lambda r: (-len(self.tok_encode(r[0])), r[0]),
                         group_by="gen_kwargs", group_fn=lambda r: r[1])
        out = []
        for chunk in order.get_batched(n=self.batch_size):
            contexts, all_kwargs = zip(*chunk)
            kwargs = normalize_gen_kwargs(all_kwargs[0], self.max_gen_toks)  # one set of kwargs per chunk
            until, max_new = handle_stop_sequences(kwargs.pop("until", None), eos=None), kwargs.pop("max_gen_toks")
            room = self.max_length - max_new
            if room <= 0:
                raise ValueError(f"max_gen_toks={max_new} leaves no room for a prompt in lm_eval.max_length="
                                 f"{self.max_length}")
            prompts = [self.tok_encode(c)[-room:] or [self.prefix_token_id] for c in contexts]
            sampling = bool(kwargs.get("do_sample"))
            with autocast(self.device, self.dtype):
                rows = generate(self.model, prompts, max_new_tokens=max_new,
                                temperature=float(kwargs.get("temperature") or 0.0) if sampling else 0.0,
                                top_k=kwargs.get("top_k"), top_p=kwargs.get("top_p"), seed=self.seed,
                                eos_token_id=self.eot_token_id)
            for context, row in zip(contexts, rows):
                text = postprocess_generated_text(self.tok.decode([t for t in row if t != self.eot_token_id]),
                                                  until, None)
                out.append(text)
                self.cache_hook.add_partial("generate_until", (context, all_kwargs[0]), text)
        return order.get_original(out)
