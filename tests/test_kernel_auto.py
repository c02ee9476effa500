"""model.attention.kernel=auto: SDPA on CPU, for plain causal rows and for one-token steps, FlexAttention for
packed or non-causal rows on CUDA (choose_kernel, a pure function any device type can ask); the same attention as the
eager reference either way, and what ran is recorded."""
from types import SimpleNamespace

import pytest
import torch

from conftest import tiny_model
from variants import Causal, SlidingWindow
from variants.attention import AutoKernel, choose_kernel


@pytest.mark.parametrize("device,documents,pattern,expected", [
    ("cpu", True, SlidingWindow(4), "sdpa"),
    ("mps", True, SlidingWindow(4), "sdpa"),
    ("cuda", False, Causal(), "sdpa"),
    ("cuda", True, Causal(), "flex"),
    ("cuda", False, SlidingWindow(4), "flex"),
])
def test_auto_chooses_flex_only_for_masked_rows_on_cuda(device, documents, pattern, expected):
    assert choose_kernel(device, pattern, 512, 512, documents) == expected
    assert choose_kernel(device, pattern, 512, 512, documents, fixed_shape=True) == "sdpa"  # compiled decoding
    assert choose_kernel(device, pattern, 64, 64, documents) == "sdpa"  # within one flex block: nothing to skip


@pytest.mark.parametrize("device", ["cpu", "cuda", "xpu"])
@pytest.mark.parametrize("documents", [False, True])
@pytest.mark.parametrize("pattern", [Causal(), SlidingWindow(4)])
def test_a_one_token_step_takes_sdpa_on_any_device(device, documents, pattern):
    """A decoding step with a cache: one query row, whatever the cache holds."""
    assert choose_kernel(device, pattern, 1, 4096, documents) == "sdpa"


def test_auto_kernel_asks_choose_kernel_with_the_calls_shapes():
    ctx = SimpleNamespace(q_doc=object(), fixed_shape=False, q_len=1, kv_len=300)
    q = SimpleNamespace(device=torch.device("cuda"))
    assert AutoKernel.choose(q, Causal(), ctx) == "sdpa"
    assert AutoKernel.choose(q, Causal(), SimpleNamespace(**{**vars(ctx), "q_len": 300})) == "flex"


def test_auto_matches_eager_on_packed_rows_and_records_the_kernel():
    ids = torch.randint(0, 61, (2, 24), generator=torch.Generator().manual_seed(0))
    docs = torch.tensor([[0] * 10 + [1] * 14, [0] * 24])
    auto, eager = tiny_model(kernel="auto", window=6), tiny_model(kernel="eager", window=6)
    with torch.no_grad():
        torch.testing.assert_close(auto(ids, document_ids=docs), eager(ids, document_ids=docs), atol=1e-5, rtol=1e-5)
    assert [m.ran for m in auto.attention_modules()] == ["sdpa", "sdpa"]  # CPU
