"""Batch-invariant mode: a row's results are the same bits alone, inside batches of other sizes,
at other positions, padded and packed; a PPO update whose old log-probs came from other
micro-batches sees ratios of exactly 1."""

import pytest
import torch

import fastrlhf
from fastrlhf._numerics import ordered_row_sum
from tests.conftest import DEVICE

FAMILY = "linear_logprobs"
DTYPES = [torch.float32, torch.bfloat16]


def _ids(d):
    return str(d).removeprefix("torch.")


def _equal_rows(got, want, rows):
    for g, w in zip(got, want):
        assert torch.equal(g, w[rows]), (g - w[rows]).abs().max()


def test_ordered_row_sum_ignores_padding_batch_and_packing():
    x = torch.randn(5, 200, device=DEVICE)
    torch.testing.assert_close(ordered_row_sum(x), x.sum(-1), atol=1e-5, rtol=1e-5)
    full = ordered_row_sum(x)
    padded = ordered_row_sum(torch.nn.functional.pad(x, (0, 77)))
    assert torch.equal(padded, full)
    assert torch.equal(ordered_row_sum(x[3:4].clone())[0], full[3])
    cu = torch.tensor([0, 200, 200, 400], dtype=torch.int32, device=DEVICE)
    packed = ordered_row_sum(torch.cat([x[1], x[4]]), cu)
    assert torch.equal(packed, torch.stack([full[1], torch.zeros((), device=DEVICE), full[4]]))


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_token_logprobs_rows_alone_strided_and_permuted(backend, dtype):
    pytest.importorskip("triton")
    V = 1003  # odd: rows of logits[:, :-1] start off a 16-byte boundary
    big = (torch.randn(7, V + 1, device=DEVICE) * 3).to(dtype)
    logits, labels = big[:, :-1], torch.randint(0, V, (7,), device=DEVICE)
    g = torch.randn(7, device=DEVICE)

    def run(rows, strided=True):
        x = (logits[rows] if strided else logits[rows].clone()).detach().requires_grad_(True)
        lp, ent = fastrlhf.token_logprobs(x, labels[rows], return_entropy=True, batch_invariant=True,
                                          backend=backend)
        (lp * g[rows] + ent).sum().backward()
        return lp.detach(), ent.detach(), x.grad

    full = run(torch.arange(7))
    for i in range(7):
        _equal_rows(run(torch.tensor([i]), strided=False), full, torch.tensor([i]))
    perm = torch.tensor([4, 0, 6, 2, 5, 1, 3], device=DEVICE)
    _equal_rows(run(perm), full, perm)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_sequence_logprobs_alone_padded_and_packed(backend):
    pytest.importorskip("triton")
    B, T, V = 4, 9, 37
    logits = torch.randn(B, T, V, device=DEVICE)
    labels = torch.randint(0, V, (B, T), device=DEVICE)
    mask = torch.rand(B, T, device=DEVICE) > 0.3
    kw = {"batch_invariant": True, "backend": backend}
    full = fastrlhf.sequence_logprobs(logits, labels, mask, **kw)
    padded = fastrlhf.sequence_logprobs(torch.nn.functional.pad(logits, (0, 0, 0, 5)),
                                        torch.nn.functional.pad(labels, (0, 5)),
                                        torch.nn.functional.pad(mask, (0, 5)), **kw)
    assert torch.equal(padded, full)
    for i in range(B):
        assert torch.equal(fastrlhf.sequence_logprobs(logits[i:i + 1].clone(), labels[i:i + 1], mask[i:i + 1], **kw)[0],
                           full[i])
    cu = torch.tensor([0, 9, 18, 27, 36], dtype=torch.int32, device=DEVICE)
    packed = fastrlhf.sequence_logprobs(logits.reshape(B * T, V), labels.reshape(-1), mask.reshape(-1),
                                        cu_seqlens=cu, **kw)
    assert torch.equal(packed, full)
    torch.testing.assert_close(full, fastrlhf.sequence_logprobs(logits, labels, mask, backend=backend))


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
def test_linear_token_logprobs_rows_and_their_gradients(backend, dtype):
    H, V, N = 32, 301, 9
    w = (torch.randn(V, H, device=DEVICE) * 0.3).to(dtype)
    b = torch.randn(V, device=DEVICE).to(dtype)
    h = torch.randn(N, H, device=DEVICE).to(dtype)
    labels = torch.randint(0, V, (N,), device=DEVICE)
    g, ge = torch.randn(N, device=DEVICE), torch.randn(N, device=DEVICE)

    def run(rows):
        x = h[rows].clone().requires_grad_(True)
        lp, ent = fastrlhf.linear_token_logprobs(x, w, labels[rows], bias=b, softcap=5.0, return_entropy=True,
                                                 batch_invariant=True, backend=backend)
        (lp * g[rows] + ent * ge[rows]).sum().backward()
        return lp.detach(), ent.detach(), x.grad

    full = run(torch.arange(N))
    for i in range(N):
        _equal_rows(run(torch.tensor([i])), full, torch.tensor([i]))
    perm = torch.tensor([5, 2, 7, 0, 1, 8, 3, 6, 4], device=DEVICE)
    _equal_rows(run(perm), full, perm)
    near = fastrlhf.linear_token_logprobs(h, w, labels, bias=b, softcap=5.0, backend=backend)
    torch.testing.assert_close(full[0], near, atol=1e-5, rtol=1e-5)  # the same math, other blocks


def test_the_switch_and_what_it_refuses():
    h, w = torch.randn(3, 8, device=DEVICE), torch.randn(11, 8, device=DEVICE)
    labels = torch.randint(0, 11, (3,), device=DEVICE)
    with fastrlhf.use_batch_invariant():
        with pytest.raises(ValueError, match="batch-invariant calls run design='blas'"):
            fastrlhf.linear_token_logprobs(h, w, labels, design="fused", backend="triton")
        fastrlhf.linear_token_logprobs(h, w, labels, batch_invariant=False, design="fused", backend="triton")
    if DEVICE.type == "cuda":
        with pytest.raises(fastrlhf.BackendUnavailableError, match="batch_invariant"):
            fastrlhf.token_logprobs(torch.randn(3, 11, device=DEVICE), labels, batch_invariant=True, backend="cuda")


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
def test_ppo_update_after_other_micro_batches_sees_ratio_one(backend, dtype):
    """Old log-probs from micro-batches of 8 rows (linear_token_logprobs), the update in
    micro-batches of 3 rows (linear_policy_loss, chunks of one row): the same bits, so every
    ratio is 1, the clip fraction and approx_kl exactly 0; each row's grad_hidden is the same in
    any chunking (a token-sum loss: no batch-wide normalizer)."""
    B, T, H, V = 11, 5, 32, 301
    w = (torch.randn(V, H, device=DEVICE) * 0.3).to(dtype)
    h = torch.randn(B, T, H, device=DEVICE).to(dtype)
    labels = torch.randint(0, V, (B, T), device=DEVICE)
    adv, mask = torch.randn(B, T, device=DEVICE), torch.rand(B, T, device=DEVICE) > 0.2
    kw = {"batch_invariant": True, "backend": backend}
    old = torch.cat([fastrlhf.linear_token_logprobs(h[i:i + 8], w, labels[i:i + 8], **kw) for i in range(0, B, 8)])
    for i in range(0, B, 3):
        x = h[i:i + 3].clone().requires_grad_(True)
        loss, stats, logp = fastrlhf.linear_policy_loss(x, w, labels[i:i + 3], old[i:i + 3], adv[i:i + 3],
                                                        mask[i:i + 3], mode="gspo", return_logprobs=True,
                                                        chunk_bytes=4 * V * T, **kw)
        loss.backward()
        assert torch.equal(logp, old[i:i + 3])
        assert stats["clipfrac"].item() == 0 and stats["approx_kl"].item() == 0

    def grads(rows, chunk):
        x = h[rows].clone().requires_grad_(True)
        loss, _ = fastrlhf.linear_policy_loss(x, w, labels[rows], old[rows], adv[rows], mask[rows], agg="token-sum",
                                              chunk_bytes=chunk, **kw)
        loss.backward()
        return x.grad

    full = grads(torch.arange(B), 2**30)
    for i in (0, 4, 10):
        assert torch.equal(grads(torch.tensor([i]), 1)[0], full[i])


def test_dpo_and_nll_rows(backend):
    B, T, H, V = 3, 6, 16, 37
    w = torch.randn(V, H, device=DEVICE) * 0.3
    h = torch.randn(2 * B, T, H, device=DEVICE)
    labels = torch.randint(0, V, (2 * B, T), device=DEVICE)
    labels[:, :2] = -100
    ref = torch.zeros(B, device=DEVICE)
    kw = {"batch_invariant": True, "backend": backend}
    _, _, (chosen, rejected) = fastrlhf.linear_dpo_loss(h, w, labels, ref, ref, return_logps=True, chunk_bytes=1,
                                                        **kw)
    lp = fastrlhf.linear_token_logprobs(h, w, labels, **kw)
    assert torch.equal(torch.cat([chosen, rejected]), ordered_row_sum(lp))
    pair = torch.tensor([1, B + 1], device=DEVICE)
    _, _, (c1, r1) = fastrlhf.linear_dpo_loss(h[pair], w, labels[pair], ref[:1], ref[:1], return_logps=True, **kw)
    assert torch.equal(c1[0], chosen[1]) and torch.equal(r1[0], rejected[1])
    total = fastrlhf.linear_nll_loss(h, w, labels, reduction="sum", **kw)
    torch.testing.assert_close(total, -lp.sum(), atol=1e-5, rtol=1e-5)


def test_the_switch_reaches_the_drop_ins(monkeypatch):
    """verl's ``logprobs_from_logits`` drop-in calls the op without the keyword: the environment
    switch (or ``use_batch_invariant``) puts it in the mode."""
    pytest.importorskip("triton")
    from fastrlhf.integrations import verl

    monkeypatch.setenv("FASTRLHF_BATCH_INVARIANT", "1")
    monkeypatch.setenv("FASTRLHF_BACKEND", "triton")
    V = 1003
    logits = torch.randn(6, V + 1, device=DEVICE, dtype=torch.bfloat16)[:, :-1]
    labels = torch.randint(0, V, (6,), device=DEVICE)
    full = verl.logprobs_from_logits(logits, labels, inplace_backward=False)
    for i in range(6):
        assert torch.equal(verl.logprobs_from_logits(logits[i:i + 1].clone(), labels[i:i + 1])[0], full[i])
