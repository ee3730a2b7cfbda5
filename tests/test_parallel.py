"""Vocab-parallel log-probs and global counts, on 2-3 gloo processes on CPU."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastrlhf
from fastrlhf.parallel import (global_counts, vocab_parallel_linear_token_logprobs,
                               vocab_parallel_token_logprobs)

V = 37  # split unevenly over the ranks


def _splits(world):
    edges = [round(V * r / world) for r in range(world + 1)]
    return list(zip(edges[:-1], edges[1:]))


def _worker(rank, world, store, backends, result):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        for backend in backends:
            _check_shard(rank, world, backend)
            _check_head_shard(rank, world, backend)
        mask = torch.zeros(2, 4)
        mask[0, : rank + 1] = 1
        tokens, seqs = global_counts(mask)
        assert tokens.item() == sum(r + 1 for r in range(world)) and seqs.item() == world
        result[rank] = backends
    finally:
        dist.destroy_process_group()


def _check_shard(rank, world, backend):
    torch.manual_seed(0)
    logits = torch.randn(3, 5, V, dtype=torch.float64) * 4
    logits[0, 0, :] = float("-inf")  # one finite logit, on the last shard
    logits[0, 0, V - 1] = 1.0
    labels = torch.randint(0, V, (3, 5))
    labels[1, 2] = -100
    g1, g2 = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    lo, hi = _splits(world)[rank]
    shard = logits[..., lo:hi].clone().requires_grad_(True)
    lp, ent = vocab_parallel_token_logprobs(shard, labels, vocab_start=lo, return_entropy=True,
                                            backend=backend)
    (lp * g1 + ent * g2).sum().backward()
    full = logits.clone().requires_grad_(True)
    want_lp, want_ent = fastrlhf.token_logprobs(full, labels, return_entropy=True, backend="torch")
    (want_lp * g1 + want_ent * g2).sum().backward()
    torch.testing.assert_close(lp, want_lp)
    torch.testing.assert_close(ent, want_ent)
    torch.testing.assert_close(shard.grad, full.grad[..., lo:hi])


def _check_head_shard(rank, world, backend):
    torch.manual_seed(1)
    N, H = 6, 16
    hidden = torch.randn(N, H)
    weight = torch.randn(V, H) / 4
    bias = torch.randn(V)
    labels = torch.randint(0, V, (N,))
    labels[2] = -100
    g1, g2 = torch.randn(N), torch.randn(N)
    lo, hi = _splits(world)[rank]
    h = hidden.clone().requires_grad_(True)
    w = weight[lo:hi].clone().requires_grad_(True)
    b = bias[lo:hi].clone().requires_grad_(True)
    lp, ent = vocab_parallel_linear_token_logprobs(h, w, labels, vocab_start=lo, bias=b,
                                                   return_entropy=True, backend=backend)
    (lp * g1 + ent * g2).sum().backward()
    full = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    want_lp, want_ent = fastrlhf.linear_token_logprobs(full[0], full[1], labels, bias=full[2],
                                                       return_entropy=True, backend="torch")
    (want_lp * g1 + want_ent * g2).sum().backward()
    tol = dict(atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(lp, want_lp, **tol)
    torch.testing.assert_close(ent, want_ent, **tol)
    torch.testing.assert_close(h.grad, full[0].grad, **tol)
    torch.testing.assert_close(w.grad, full[1].grad[lo:hi], **tol)
    torch.testing.assert_close(b.grad, full[2].grad[lo:hi], **tol)


def test_vocab_parallel_matches_unsharded(tmp_path):
    """Three ranks (uneven shards) on every backend that runs on CPU here: sharded logits and
    a sharded LM head."""
    world = 3
    backends = fastrlhf.available_backends("cpu")
    result = mp.Manager().dict()
    mp.spawn(_worker, args=(world, str(tmp_path / "store"), backends, result), nprocs=world)
    assert dict(result) == {r: backends for r in range(world)}


def test_needs_initialized_group():
    with pytest.raises(RuntimeError, match="torch.distributed"):
        vocab_parallel_token_logprobs(torch.randn(2, 5), torch.zeros(2, dtype=torch.long), vocab_start=0)
    with pytest.raises(RuntimeError, match="torch.distributed"):
        vocab_parallel_linear_token_logprobs(torch.randn(2, 4), torch.randn(5, 4),
                                             torch.zeros(2, dtype=torch.long), vocab_start=0)
    tokens, seqs = global_counts(torch.tensor([[1, 0], [0, 0]]))
    assert tokens.item() == 1 and seqs.item() == 1
