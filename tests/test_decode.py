"""Fixed-shape (compiled) decoding against the eager token loop, the reference: the same greedy tokens
for 64 steps and logits within float tolerance, for every attention variant, left-padded batches and a
Phi-3 checkpoint whose LongRoPE switches factors mid-generation; and no recompilation while decoding."""
import pytest
import torch

from conftest import tiny_model
from runner.decode import Decoder
from runner.generate import PAD_DOCUMENT, PROMPT_DOCUMENT, generate
from variants import ALiBi, Causal, MultiHeadLatentAttention, StridedSparse

STEPS = 64
VARIANTS = {
    "mha": {},
    "gqa": {"n_kv_heads": 2},
    "mqa": {"n_kv_heads": 1},
    "sliding": {"n_kv_heads": 2, "window": 8},
    "sparse": {"attention_schedule": [Causal(), StridedSparse(4)]},
    "flex": {"kernel": "flex", "window": 8},
    "eager_kernel": {"kernel": "eager", "n_kv_heads": 2},
    "auto_kernel": {"kernel": "auto", "n_kv_heads": 2, "window": 8},
    "mla": {"attention_cls": MultiHeadLatentAttention, "attention_options": {"kv_lora_rank": 12}},
    "alibi_softcap": {"position": ALiBi, "attention_options": {"softcap": 5.0}},
}


def left_padded(prompts):
    P = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (P - len(p)) + p for p in prompts])
    docs = torch.tensor([[PAD_DOCUMENT] * (P - len(p)) + [PROMPT_DOCUMENT] * len(p) for p in prompts])
    return ids, docs


@torch.no_grad()
def eager_greedy(model, ids, docs, steps):
    """The reference: model.forward with the cache sliced to its length (runner/generate.py's loop)."""
    cache = model.allocate_cache(ids.shape[0], ids.shape[1] + steps)
    logits = [model(ids, document_ids=docs, cache=cache)[:, -1]]
    for _ in range(steps - 1):
        logits.append(model(logits[-1].argmax(-1)[:, None], cache=cache)[:, -1])
    return torch.stack(logits, 1)  # (B, steps, V)


@torch.no_grad()
def fixed_shape_greedy(model, ids, docs, steps, compile=False):
    decoder = Decoder(model, ids.shape[0], ids.shape[1] + steps, compile=compile)
    logits = [decoder.prefill(ids, docs)]
    for _ in range(steps - 1):
        logits.append(decoder.step(logits[-1].argmax(-1)).clone())
    return torch.stack(logits, 1)


def assert_same_decoding(ours, reference):
    assert torch.equal(ours.argmax(-1), reference.argmax(-1))  # the same greedy tokens at every step
    torch.testing.assert_close(ours, reference, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_fixed_shape_decoding_matches_the_eager_loop(variant):
    """The same code as the compiled path, run eagerly: cache slots as tensors, attention over the whole
    preallocated cache under a mask, a left-padded batch of three prompts."""
    model = tiny_model(max_seq_len=96, **VARIANTS[variant])
    g = torch.Generator().manual_seed(1)
    ids, docs = left_padded([torch.randint(1, 61, (n,), generator=g).tolist() for n in (5, 17, 11)])
    assert_same_decoding(fixed_shape_greedy(model, ids, docs, STEPS), eager_greedy(model, ids, docs, STEPS))


@pytest.mark.slow
def test_compiled_decoding_matches_eager_and_never_recompiles():
    """torch.compile'd prefill and step: 64 greedy steps give the eager loop's tokens and logits, and after
    the first step no frame is compiled again (dynamo's counters)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    model = tiny_model(n_kv_heads=2, max_seq_len=96)
    ids, docs = left_padded([[3, 1, 4, 1, 5, 9, 2, 6], [5, 3, 5]])
    reference = eager_greedy(model, ids, docs, STEPS)
    before = counters["stats"]["unique_graphs"]  # other tests (FlexAttention) may have traced graphs
    with torch.no_grad():
        decoder = Decoder(model, 2, ids.shape[1] + STEPS, compile=True)
        logits = [decoder.prefill(ids, docs)]
        logits.append(decoder.step(logits[-1].argmax(-1)).clone())
        graphs = counters["stats"]["unique_graphs"]
        for _ in range(STEPS - 2):
            logits.append(decoder.step(logits[-1].argmax(-1)).clone())
    assert graphs - before == 2  # one prefill, one step
    assert counters["stats"]["unique_graphs"] == graphs  # 62 more steps, nothing recompiled
    assert_same_decoding(torch.stack(logits, 1), reference)
    # generate(compile=True) runs the same compiled step (already traced: no new graph) to the same tokens
    prompts = [[3, 1, 4, 1, 5, 9, 2, 6], [5, 3, 5]]
    assert generate(model, prompts, max_new_tokens=20, compile=True) == generate(model, prompts, max_new_tokens=20)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["mqa", "sliding", "sparse"])
def test_compiled_decoding_matches_eager_for_every_variant(variant):
    model = tiny_model(max_seq_len=96, **VARIANTS[variant])
    ids, docs = left_padded([[3, 1, 4, 1, 5, 9, 2, 6], [5, 3, 5]])
    assert_same_decoding(fixed_shape_greedy(model, ids, docs, STEPS, compile=True),
                         eager_greedy(model, ids, docs, STEPS))


@pytest.mark.parametrize("compile", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_phi3_longrope_switch_mid_generation(tmp_path, compile, monkeypatch):
    """A Phi-3 checkpoint whose LongRoPE switches to its long factors at 32 tokens: 20 + 40 tokens cross
    it, the decoder re-encodes once (model.reencode_at), and the tokens equal transformers' generate."""
    pytest.importorskip("transformers")
    from test_generate import hf_greedy
    from test_phi3 import LONGROPE, VOCAB, save_phi3
    from runner import generate as generate_module
    from variants import TransformerLM

    path, hf = save_phi3(tmp_path, num_key_value_heads=2, **LONGROPE)
    ours = TransformerLM.from_hf(path)
    prompt = torch.randint(0, VOCAB, (20,), generator=torch.Generator().manual_seed(3)).tolist()
    if not compile:  # the same fixed-shape decoder, run eagerly
        monkeypatch.setattr(generate_module, "Decoder", lambda *a, **k: Decoder(*a, **{**k, "compile": False}))
    assert generate(ours, prompt, max_new_tokens=40, compile=True)[0] == hf_greedy(hf, prompt, 40)
