"""Run by tests/test_distributed.py under torchrun (2 ranks, gloo): the training loss under FSDP2 takes the
chunked LM head (runner/compute.py) and gives the loss and gradients of one process computing whole-batch
logits with F.cross_entropy. Every rank sees the same batch, so FSDP2's averaged gradients equal the
single-process ones. Prints one `ok chunked=N` line; raises otherwise."""
import copy
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from conftest import tiny_model  # noqa: E402
import runner.compute as compute  # noqa: E402
from runner import distributed  # noqa: E402


def main():
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = tiny_model(n_kv_heads=2).train()  # the same seed, the same weights on every rank
    reference = copy.deepcopy(model)
    sharded = distributed.wrap(model, distributed.Dist("fsdp", rank, rank, world, torch.device("cpu")), None)

    calls = []
    chunked = compute.chunked_cross_entropy
    compute.chunked_cross_entropy = lambda *a, **k: calls.append(1) or chunked(*a, **k)
    gen = torch.Generator().manual_seed(0)
    ids, labels = torch.randint(0, 61, (3, 12), generator=gen), torch.randint(0, 61, (3, 12), generator=gen)
    labels[0, :4] = compute.IGNORE
    loss = compute.next_token_loss(sharded, ids, labels)
    loss.backward()

    logits = reference(ids)
    expected = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=compute.IGNORE)
    expected.backward()
    torch.testing.assert_close(loss.detach(), expected.detach(), rtol=1e-5, atol=1e-6)
    grads = dict(reference.named_parameters())
    for name, p in sharded.named_parameters():
        torch.testing.assert_close(p.grad.full_tensor(), grads[name].grad, rtol=1e-4, atol=1e-6, msg=name)
    assert calls, "the chunked loss was not taken under FSDP2"
    print(f"ok chunked={len(calls)} rank={rank}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
