"""model.attention.kernel=auto: SDPA on CPU and for plain causal rows, FlexAttention for packed or
non-causal rows on CUDA; the same attention as the eager reference either way, and what ran is recorded."""
from types import SimpleNamespace

import pytest
import torch

from conftest import tiny_model
from variants import Causal, SlidingWindow
from variants.attention import AutoKernel


@pytest.mark.parametrize("device,documents,pattern,expected", [
    ("cpu", True, SlidingWindow(4), "sdpa"),
    ("cuda", False, Causal(), "sdpa"),
    ("cuda", True, Causal(), "flex"),
    ("cuda", False, SlidingWindow(4), "flex"),
])
def test_auto_chooses_flex_only_for_masked_rows_on_cuda(device, documents, pattern, expected):
    q = SimpleNamespace(device=torch.device(device))
    ctx = SimpleNamespace(q_doc=object() if documents else None, fixed_shape=False)
    assert AutoKernel.choose(q, pattern, ctx) == expected
    assert AutoKernel.choose(q, pattern, SimpleNamespace(q_doc=ctx.q_doc, fixed_shape=True)) == "sdpa"


def test_auto_matches_eager_on_packed_rows_and_records_the_kernel():
    ids = torch.randint(0, 61, (2, 24), generator=torch.Generator().manual_seed(0))
    docs = torch.tensor([[0] * 10 + [1] * 14, [0] * 24])
    auto, eager = tiny_model(kernel="auto", window=6), tiny_model(kernel="eager", window=6)
    with torch.no_grad():
        torch.testing.assert_close(auto(ids, document_ids=docs), eager(ids, document_ids=docs), atol=1e-5, rtol=1e-5)
    assert [m.ran for m in auto.attention_modules()] == ["sdpa", "sdpa"]  # CPU
