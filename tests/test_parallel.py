"""Vocab-parallel log-probs and global counts, on 2-3 gloo processes on CPU."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st

import fastrlhf
import fastrlhf.reference.advantages
from fastrlhf.parallel import (
    global_counts,
    vocab_parallel_linear_token_logprobs,
    vocab_parallel_token_logprobs,
)
from tests.ranks import ThreadGroup

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
            _check_whiten_over_ranks(rank, world, backend)
        mask = torch.zeros(2, 4)
        mask[0, : rank + 1] = 1
        tokens, seqs = global_counts(mask)
        assert tokens.item() == sum(r + 1 for r in range(world)) and seqs.item() == world
        result[rank] = backends
    finally:
        dist.destroy_process_group()


def _check_shard(rank, world, backend):
    for ignore_index in (-100, 0, 20):  # 0 and 20: real vocabulary ids of the first and second shard
        torch.manual_seed(0)
        logits = torch.randn(3, 5, V, dtype=torch.float64) * 4
        logits[0, 0, :] = float("-inf")  # one finite logit, on the last shard
        logits[0, 0, V - 1] = 1.0
        labels = torch.randint(0, V, (3, 5))
        labels[1, 2] = ignore_index
        labels[1, 3], labels[2, 4] = 0, 20
        labels[2, 1] = V + 2  # outside the vocabulary: NaN
        g1, g2 = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
        lo, hi = _splits(world)[rank]
        shard = logits[..., lo:hi].clone().requires_grad_(True)
        lp, ent = vocab_parallel_token_logprobs(shard, labels, vocab_start=lo, ignore_index=ignore_index,
                                                return_entropy=True, backend=backend)
        (lp.nan_to_num() * g1 + ent * g2).sum().backward()
        full = logits.clone().requires_grad_(True)
        want_lp, want_ent = fastrlhf.token_logprobs(full, labels, ignore_index=ignore_index,
                                                    return_entropy=True, backend="torch")
        (want_lp.nan_to_num() * g1 + want_ent * g2).sum().backward()
        torch.testing.assert_close(lp, want_lp, equal_nan=True)
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
    cols = torch.zeros(hi - lo, 2)
    cols[:, 1] = bias[lo:hi]
    cols.requires_grad_(True)
    b = cols[:, 1]  # a strided view (stride 2): read with its strides, not as contiguous
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
    torch.testing.assert_close(cols.grad[:, 1], full[2].grad[lo:hi], **tol)


def _check_whiten_over_ranks(rank, world, backend):
    """masked_whiten over the group: each rank's part of whitening the concatenation."""
    xs = [torch.randn(3, 7 + r, generator=torch.Generator().manual_seed(r)) * 2 + r for r in range(world)]
    ms = [torch.arange(x.numel()).view(x.shape) % (r + 2) != 0 for r, x in enumerate(xs)]
    want = fastrlhf.reference.advantages.masked_whiten(torch.cat([x.reshape(-1) for x in xs]).double(),
                                                      torch.cat([m.reshape(-1) for m in ms]))
    start = sum(x.numel() for x in xs[:rank])
    got = fastrlhf.masked_whiten(xs[rank], ms[rank], group=dist.group.WORLD, backend=backend)
    torch.testing.assert_close(got.reshape(-1).double(), want[start:start + xs[rank].numel()], atol=1e-5, rtol=1e-5)


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


# ------------------------------------------------- ranks simulated by threads (property tests)
@st.composite
def _sharded_case(draw):
    V = draw(st.integers(2, 40))
    world = draw(st.integers(1, 4).filter(lambda w: w <= V))
    cuts = sorted(draw(st.lists(st.integers(1, V - 1), min_size=world - 1, max_size=world - 1,
                                unique=True)))
    edges = [0, *cuts, V]
    ignore_index = draw(st.sampled_from([-100, -1, 0, V - 1, V, V + 1, edges[world // 2]]))
    N = draw(st.integers(1, 12))
    labels = draw(st.lists(st.integers(-3, V + 3) | st.just(ignore_index), min_size=N, max_size=N))
    return V, edges, ignore_index, labels, draw(st.integers(0, 2**16))


@settings(max_examples=60, deadline=None)
@given(_sharded_case())
def test_vocab_parallel_labels_property(case):
    """On random uneven shards and every kind of ignore index (negative, 0, inside a shard, V):
    log-probs, entropy and gradients equal ``token_logprobs`` of the gathered logits, on every
    rank, with NaN for labels outside the vocabulary."""
    V, edges, ignore_index, labels, seed = case
    gen = torch.Generator().manual_seed(seed)
    N = len(labels)
    logits = torch.randn(N, V, generator=gen, dtype=torch.float64) * 3
    labels = torch.tensor(labels)
    g1, g2 = torch.randn(N, generator=gen, dtype=torch.float64), torch.randn(N, generator=gen, dtype=torch.float64)
    full = logits.clone().requires_grad_(True)
    want_lp, want_ent = fastrlhf.token_logprobs(full, labels, ignore_index=ignore_index,
                                                return_entropy=True, backend="torch")
    (want_lp.nan_to_num() * g1 + want_ent * g2).sum().backward()

    def rank_fn(rank):
        lo, hi = edges[rank], edges[rank + 1]
        shard = logits[:, lo:hi].clone().requires_grad_(True)
        lp, ent = vocab_parallel_token_logprobs(shard, labels, vocab_start=lo, ignore_index=ignore_index,
                                                return_entropy=True, backend="torch")
        (lp.nan_to_num() * g1 + ent * g2).sum().backward()
        return lp.detach(), ent.detach(), shard.grad

    for rank, (lp, ent, grad) in enumerate(ThreadGroup(len(edges) - 1).run(rank_fn)):
        torch.testing.assert_close(lp, want_lp.detach(), equal_nan=True)
        torch.testing.assert_close(ent, want_ent.detach())
        torch.testing.assert_close(grad, full.grad[:, edges[rank]:edges[rank + 1]])


@pytest.mark.parametrize("ignore_index", [-100, 0, 20, 37])
def test_vocab_parallel_head_labels(ignore_index):
    """The sharded LM head on the same label cases (ignore index 0, inside the second shard, V;
    labels out of range), against the unsharded op."""
    N, H, edges = 9, 8, [0, 15, 26, 37]
    hidden = torch.randn(N, H, dtype=torch.float64)
    weight = torch.randn(V, H, dtype=torch.float64) / 3
    labels = torch.tensor([0, 14, 15, 20, 36, 37, -5, ignore_index, 3])
    want = fastrlhf.token_logprobs(hidden @ weight.T, labels, ignore_index=ignore_index, backend="torch")

    def rank_fn(rank):
        lo, hi = edges[rank], edges[rank + 1]
        return vocab_parallel_linear_token_logprobs(hidden.float(), weight[lo:hi].float(), labels,
                                                    vocab_start=lo, ignore_index=ignore_index,
                                                    backend="torch")

    for lp in ThreadGroup(3).run(rank_fn):
        torch.testing.assert_close(lp, want.float(), equal_nan=True, atol=1e-5, rtol=1e-5)
