"""Compiled decoding in the style of gpt-fast: a static KV cache attended at a fixed shape, the prompt
(prefill) and the one-token step compiled separately, the step with CUDA graphs on CUDA.

    decoder = Decoder(model, batch_size, max_len, compile=True)
    logits = decoder.prefill(ids, document_ids)   # (B, V): the prompt's last column
    logits = decoder.step(token)                  # (B, V): one new token per row, same shapes every call

Every step calls the model with the same tensor shapes: the cache slot, the positions and the document
ids arrive as tensors (advanced in place on the device), and attention covers the whole preallocated
cache with a mask (variants.masks.CacheSlotContext), so the compiled step is traced once and replayed;
no Python integer that changes per token reaches the graph. Speed comes from removing Python from the
token loop: on CUDA the step becomes one CUDA graph (mode="reduce-overhead").

The eager token loop of runner/generate.py (the cache sliced to its current length) stays the reference
this path is tested against.
"""
import weakref

import torch

from variants.position import positions_from_documents

_COMPILED: dict = {}  # (which, mode) -> the torch.compile'd call, shared by every Decoder of the process
# model -> (shape key, KVCache): the last static cache allocated for a model, reused by the next Decoder of the
# same shape (same addresses: the CUDA graph replays instead of re-recording); one per model bounds memory
_STATIC_CACHES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _normal(t):
    """A tensor made under torch.inference_mode carries other dispatch keys than a normal one, and the compiled
    step guards on them: a caller inside inference_mode (the transformers comparison) would recompile it."""
    return t.clone() if t is not None and t.is_inference() else t


# Every Decoder method runs outside inference mode, without autograd: its cache and counters are normal tensors
# whoever calls (in-place updates of inference tensors outside inference mode fail), and the graphs see one mode.
def _outside_inference_mode(fn):
    return torch.inference_mode(False)(torch.no_grad()(fn))


@_outside_inference_mode
def static_cache(model, batch_size: int, max_len: int, dtype=None, device=None):
    """The model's static cache for (batch_size, max_len, dtype, device): the last one when its shape matches,
    else a new one (replacing it), marked static for torch.compile without address guards (torch 2.9 guards
    by default, which recompiled the step for every new Decoder: every bench point and every generate())."""
    ref = next(model.parameters())
    key = (batch_size, max_len, dtype or ref.dtype, torch.device(device or ref.device))
    held = _STATIC_CACHES.get(model)
    if held is not None and held[0] == key:
        return held[1]
    _STATIC_CACHES.pop(model, None)  # free the old buffers before allocating the new ones
    cache = model.allocate_cache(batch_size, max_len, key[2], key[3])
    cache.mark_static()
    _STATIC_CACHES[model] = (key, cache)
    return cache


def _call(model, cache, ids, slots, positions, docs):
    return model(ids, position_ids=positions, document_ids=docs, cache=cache, cache_slots=slots)[:, -1]  # (B, V)


# Two functions, not one: dynamo keeps its graphs per code object, so a shared one would count the step's
# first compile as a recompile of the prefill, and check every step against the prefill's guards first.
def _prefill_call(model, cache, ids, slots, positions, docs):
    return _call(model, cache, ids, slots, positions, docs)


def _step_call(model, cache, ids, slots, positions, docs):
    return _call(model, cache, ids, slots, positions, docs)


def _compiled(which: str, device_type: str):
    """The prefill (default mode: its shape follows the prompt) or the step (CUDA graphs on CUDA)."""
    mode = "reduce-overhead" if which == "step" and device_type == "cuda" else None
    key = (which, mode)
    if key not in _COMPILED:
        # One traced graph per model architecture, batch size and cache length: a process that decodes
        # many variants (a sweep's benchmarks, the tests) would pass dynamo's default of 8 per function.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        fn = _step_call if which == "step" else _prefill_call
        _COMPILED[key] = torch.compile(fn, mode=mode, fullgraph=which == "step")
    return _COMPILED[key]


class Decoder:
    """A model and its static cache for `batch_size` rows of up to `max_len` tokens (prompt + new).

    Decoders of the same model and shape share one cache (static_cache), so a new Decoder neither
    recompiles nor re-records the step; the last to prefill owns it, and an older one's step then fails."""

    @_outside_inference_mode
    def __init__(self, model, batch_size: int, max_len: int, dtype=None, device=None, compile: bool = False):
        self.model, self.compile = model, compile
        self.cache = static_cache(model, batch_size, max_len, dtype, device)
        self.device = self.cache.device
        self.length = 0  # Python's own count, for bounds checks only; the graph reads `slot`
        self.slot = torch.zeros(1, dtype=torch.long, device=self.device)  # (1,) the next write slot
        self.positions = self.documents = None  # (B, 1): the next token's position and document

    def _run(self, which: str, ids, slots, positions, docs):
        fn = _compiled(which, self.device.type) if self.compile else _call
        if self.compile and which == "step" and self.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs have been read
        return fn(self.model, self.cache, _normal(ids), slots, positions, docs)

    @_outside_inference_mode
    def prefill(self, ids, document_ids=None, position_ids=None):
        """Encode ids (B, P) from an empty cache; returns the last column's logits (B, V). Positions
        restart at every document (document_ids; default: one document per row), as model.forward does."""
        B, P = ids.shape
        if P > self.cache.max_len:
            raise ValueError(f"the prompt has {P} tokens; the decoder's cache holds {self.cache.max_len}")
        docs = torch.zeros_like(ids) if document_ids is None else _normal(document_ids)
        positions = positions_from_documents(docs) if position_ids is None else _normal(position_ids)
        self.cache.reset()
        self.cache.owner = self
        slots = torch.arange(P, device=self.device)
        logits = self._run("prefill", ids, slots, positions, docs)
        self.length = P
        self.slot.fill_(P)
        self.positions, self.documents = positions[:, -1:] + 1, docs[:, -1:].clone()  # continue the last document
        return logits

    @_outside_inference_mode
    def step(self, token):
        """One token per row, token (B,) or (B, 1), at the next slot; returns its logits (B, V)."""
        if self.positions is None:
            raise RuntimeError("Decoder.step before prefill")
        if self.cache.owner is not self:
            raise RuntimeError("another Decoder of the same model and shape has prefilled since: its cache is shared")
        if self.length >= self.cache.max_len:
            raise ValueError(f"KV cache holds {self.cache.max_len} tokens; this step needs {self.length + 1}")
        logits = self._run("step", token.reshape(-1, 1), self.slot, self.positions, self.documents)
        self.slot += 1  # in place, on the device: the next call sees the same tensors
        self.positions += 1
        self.length += 1
        return logits
