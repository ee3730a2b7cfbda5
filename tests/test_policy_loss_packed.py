"""Packed (padding-free) sequences for the PPO family: ``policy_loss`` (every mode, sequence-level
corrections), ``ppo_policy_loss``, ``ppo_value_loss`` and ``aggregate`` on ``[total]`` inputs with
``cu_seqlens`` equal their padded results on the same data: holes inside sequences, empty
sequences, sequences longer than a per-sequence chunk (4096 tokens)."""

import itertools
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastrlhf
from fastrlhf import RolloutCorrection, aggregate, policy_loss, ppo_policy_loss, ppo_value_loss
from fastrlhf.ops import policy_loss as ops
from fastrlhf.ops.aggregation import AGG_MODES
from fastrlhf.reference.policy_loss import pad
from tests.conftest import DEVICE

FAMILY = "policy_loss"

# Empty sequences first, last and between; one token; odd lengths (sequences over 1024-token
# tiles and 4096-token chunks: test_long_sequences_span_chunks).
LENGTHS = {"mixed": [0, 5, 1, 0, 37, 70, 20, 0], "one": [13], "empty-all": [0, 0], "none": []}
OPTIONS = {"dro": {"dro_beta": 0.3}, "bypass_mode": {"loss_type": "reinforce"}, "kl_cov": {"kl_cov_ratio": 0.1},
           "clip_cov": {"clip_cov_ratio": 0.1, "clip_cov_lb": -5.0, "clip_cov_ub": 5.0}}


def _cu(lengths):
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=DEVICE)


def _packed_case(lengths, spread=0.5, p=0.7):
    cu = _cu(lengths)
    n = int(cu[-1])
    logp = -torch.rand(n, device=DEVICE) * 3
    old = logp + torch.randn(n, device=DEVICE) * spread
    adv = torch.randn(n, device=DEVICE)
    roll = old + torch.randn(n, device=DEVICE) * spread
    mask = torch.rand(n, device=DEVICE) < p  # holes inside sequences
    return cu, logp, old, adv, mask, roll


def _valid_positions(cu):
    """bool ``[S, max_len]``: where the padded layout holds a packed token."""
    return pad(torch.ones(int(cu[-1]), dtype=torch.bool, device=DEVICE), cu, False)


def _both(fn, backend, cu, x, *inputs, **kw):
    """``(loss, stats, grad)`` of ``fn`` packed, and padded (its gradient read back at the packed tokens)."""
    out = []
    for packed in (True, False):
        xx = (x if packed else pad(x, cu)).detach().clone().requires_grad_(True)
        args = [t if packed or not isinstance(t, torch.Tensor) else pad(t, cu) for t in inputs]
        per_token = ("rollout_logprobs", "is_weights")
        extra = {k: (pad(v, cu) if k in per_token and not packed else v) for k, v in kw.items()}
        if packed:
            extra["cu_seqlens"] = cu
        if kw.get("generator") is not None:  # the same draws in both layouts
            extra["generator"] = torch.Generator().manual_seed(kw["generator"].initial_seed())
        loss, stats = fn(xx, *args, backend=backend, **extra)
        loss.backward()
        grad = xx.grad if packed else xx.grad[_valid_positions(cu)]
        out.append((loss.detach(), stats, grad))
    return out


def _same(a, b, atol=1e-5):
    def close(u, w):
        torch.testing.assert_close(u.double(), w.double(), atol=atol, rtol=1e-5)

    close(a[0], b[0])
    close(a[2], b[2])
    assert set(a[1]) == set(b[1])
    for k in a[1]:
        close(a[1][k], b[1][k])


def _generator(kw):
    if "clip_cov_ratio" in kw:
        kw["generator"] = torch.Generator().manual_seed(5)
    return kw


_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


@pytest.mark.parametrize("mode, agg", [(m, _AGGS[i % 3]) for i, m in enumerate(ops.POLICY_LOSS_MODES)] +
                         [("gspo", "token-mean"), ("geo_mean", "seq-mean-token-sum-norm")])
def test_policy_loss_packed_equals_padded(backend, mode, agg):
    cu, logp, old, adv, mask, roll = _packed_case(LENGTHS["mixed"])
    kw = dict(OPTIONS.get(mode, {}), agg=agg, loss_scale_factor=64.0)
    if mode == "bypass_mode":
        kw["rollout_correction"] = RolloutCorrection("sequence", "mask", (0.2, 5.0))
    elif mode != "geo_mean":
        kw.update(rollout_logprobs=roll, rollout_correction=RolloutCorrection("sequence-mean", "mask", (0.8, 1.25)))
    packed = _both(policy_loss, backend, cu, logp, old, adv, mask, mode=mode, **_generator(kw))
    _same(*packed)
    assert (packed[0][2][~mask] == 0).all()


@pytest.mark.parametrize("correction", [RolloutCorrection(), RolloutCorrection("sequence", "truncate", 1.5),
                                        RolloutCorrection("sequence-mean", "mask", 0.05, stat="binary_kl")],
                         ids=["tis-token", "tis-sequence", "binary-kl-seqmean"])
@pytest.mark.parametrize("mode, options", [("gspo", {}), ("gspo", {"gradient": "sequence", "dual_clip": 3.0})],
                         ids=["gspo", "gspo-seqgrad"])
def test_sequence_quantities_packed(backend, mode, options, correction):
    """GSPO's sequence ratio and sequence-level corrections per packed sequence, against the
    reference on the padded data."""
    cu, logp, old, adv, mask, roll = _packed_case(LENGTHS["mixed"], spread=0.2)
    kw = dict(options, agg="seq-mean-token-mean", rollout_correction=correction)
    x = logp.clone().requires_grad_(True)
    loss, stats = policy_loss(x, old, adv, mask, mode=mode, rollout_logprobs=roll, cu_seqlens=cu, backend=backend,
                              **kw)
    loss.backward()
    y = pad(logp.double(), cu).requires_grad_(True)
    want, want_stats = policy_loss(y, pad(old.double(), cu), pad(adv.double(), cu), pad(mask, cu), mode=mode,
                                   rollout_logprobs=pad(roll.double(), cu), backend="torch", **kw)
    want.backward()
    _same((loss.detach(), stats, x.grad), (want.detach(), want_stats, y.grad[_valid_positions(cu)]))


@pytest.mark.parametrize("lengths", list(LENGTHS), ids=list(LENGTHS))
def test_edge_layouts(backend, lengths):
    """One sequence, only empty sequences, no sequence at all: the padded result, zeros when
    nothing is valid."""
    cu, logp, old, adv, mask, roll = _packed_case(LENGTHS[lengths])
    for mode, kw in [("gspo", {"agg": "seq-mean-token-mean"}), ("geo_mean", {"agg": "seq-mean-token-sum"}),
                     ("vanilla", {"agg": "seq-mean-token-mean", "rollout_logprobs": roll,
                                  "rollout_correction": RolloutCorrection("sequence", "mask", (0.2, 5.0))})]:
        got = _both(policy_loss, backend, cu, logp, old, adv, mask, mode=mode, **kw)
        _same(*got)
        if not mask.any():
            assert got[0][0].item() == 0 and (got[0][2] == 0).all()


def test_long_sequences_span_chunks(backend):
    """A packed sequence and a padded row longer than the per-sequence chunk (4096 tokens): the
    chunks of a sequence are added in order."""
    from fastrlhf.triton.policy_loss import SEQ_CHUNK

    cu, logp, old, adv, mask, roll = _packed_case([3, SEQ_CHUNK + 5, 0, 1030], spread=0.02)
    for mode, kw in [("gspo", {}), ("geo_mean", {"is_weights": (roll - old).exp()})]:
        got = _both(policy_loss, backend, cu, logp, old, adv, mask, mode=mode, agg="seq-mean-token-mean", **kw)
        _same(*got)
        want = _both(policy_loss, "torch", cu, logp.double(), old.double(), adv.double(), mask, mode=mode,
                     agg="seq-mean-token-mean", **{k: v.double() for k, v in kw.items()})[1]
        _same(got[0], want, atol=1e-5)


def test_many_chunks_per_sequence_last_chunk_adds_them(monkeypatch):
    """With 16-token chunks: sequences of many chunks (some a multiple of 16: an empty last chunk),
    empty ones, padded rows of 3 chunks; the last chunk of each sequence to finish writes its
    column, forward and GSPO's sequence-level backward."""
    pytest.importorskip("triton")
    from fastrlhf.triton import policy_loss as launchers

    monkeypatch.setattr(launchers, "SEQ_CHUNK", 16)
    cu, logp, old, adv, mask, roll = _packed_case([0, 16, 17, 48, 5, 0, 33], spread=0.05)
    cases = [("gspo", {}), ("geo_mean", {"is_weights": (roll - old).exp()}), ("gspo", {"gradient": "sequence"}),
             ("vanilla", {"rollout_logprobs": roll, "rollout_correction": RolloutCorrection.verl("sequence", 2.0)})]
    for mode, kw in cases:
        got = _both(policy_loss, "triton", cu, logp, old, adv, mask, mode=mode, agg="seq-mean-token-mean", **kw)
        _same(*got)
        want = _both(policy_loss, "torch", cu, logp, old, adv, mask, mode=mode, agg="seq-mean-token-mean", **kw)
        _same(got[0], want[0], atol=1e-5)


@pytest.mark.parametrize("agg", AGG_MODES)
def test_ppo_losses_packed_equal_padded(backend, agg):
    cu, logp, old, adv, mask, _ = _packed_case(LENGTHS["mixed"], spread=1.0)
    kw = dict(agg=agg, loss_scale_factor=torch.tensor(100.0, device=DEVICE))
    _same(*_both(ppo_policy_loss, backend, cu, logp, old, adv, mask, dual_clip=3.0, clip_high=0.28, **kw))
    _same(*_both(ppo_value_loss, backend, cu, logp, old, adv, mask, clip=0.2, **kw))
    if agg in ("seq-mean-token-sum", "seq-mean-token-mean"):  # a global count overrides the packed one
        _same(*_both(ppo_policy_loss, backend, cu, logp, old, adv, mask, agg=agg, global_seqs=11))


@pytest.mark.parametrize("mode", AGG_MODES)
def test_aggregate_packed_equals_padded(mode):
    cu, x, _, _, mask, _ = _packed_case(LENGTHS["mixed"])
    x = x.clone()
    x[~mask] = float("nan")  # harmless under the mask
    got = []
    for packed in (True, False):
        xx = (x if packed else pad(x, cu)).clone().requires_grad_(True)
        m = mask if packed else pad(mask, cu)
        kw = {"cu_seqlens": cu} if packed else {}
        out = aggregate(xx, m, mode, loss_scale_factor=50, **kw)
        out.backward()
        got.append((out, xx.grad if packed else xx.grad[_valid_positions(cu)]))
    torch.testing.assert_close(got[0][0], got[1][0])
    torch.testing.assert_close(got[0][1], got[1][1])
    assert torch.isfinite(got[0][1]).all()


@settings(max_examples=6, deadline=None)
@given(lengths=st.lists(st.integers(0, 40), min_size=0, max_size=6), p=st.sampled_from([0.0, 0.4, 1.0]),
       mode=st.sampled_from(ops.POLICY_LOSS_MODES), agg=st.sampled_from(AGG_MODES),
       seq_correction=st.booleans(), seed=st.integers(0, 2**16))
def test_property_packed_equals_padded(lengths, p, mode, agg, seq_correction, seed):
    torch.manual_seed(seed)
    cu, logp, old, adv, mask, roll = _packed_case(lengths, p=p)
    kw = dict(OPTIONS.get(mode, {}), agg=agg, loss_scale_factor=32.0)
    if seq_correction and mode != "geo_mean":
        kw["rollout_correction"] = RolloutCorrection("sequence", "mask", (0.3, 3.0))
        if mode != "bypass_mode":
            kw["rollout_logprobs"] = roll
    for backend in fastrlhf.available_backends(DEVICE):
        if backend != "cuda":
            _same(*_both(policy_loss, backend, cu, logp, old, adv, mask, mode=mode, **_generator(dict(kw))),
                  atol=1e-5)


# ------------------------------------------------------------------------ bad input
_x = torch.randn(6)
_m = torch.ones(6, dtype=torch.bool)
_cu6 = torch.tensor([0, 2, 6], dtype=torch.int32)


def _calls(cu, **kw):
    """The same bad offsets through every packed entry point."""
    return [lambda: policy_loss(_x, _x, _x, _m, mode="gspo", cu_seqlens=cu, **kw),
            lambda: ppo_policy_loss(_x, _x, _x, _m, cu_seqlens=cu, **kw),
            lambda: ppo_value_loss(_x, _x, _x, _m, cu_seqlens=cu, **kw),
            lambda: aggregate(_x, _m, cu_seqlens=cu, **{("mode" if k == "agg" else k): v for k, v in kw.items()})]


@pytest.mark.parametrize("entry", range(4), ids=["policy_loss", "ppo_policy_loss", "ppo_value_loss", "aggregate"])
@pytest.mark.parametrize("cu, kw, exc, words", [
    (torch.tensor([1, 2, 6], dtype=torch.int32), {}, ValueError, "cu_seqlens must start at 0, got 1"),
    (torch.tensor([0, 4, 2, 6], dtype=torch.int32), {}, ValueError, "cu_seqlens must be non-decreasing"),
    (torch.tensor([0, 2, 5], dtype=torch.int32), {}, ValueError, "must end at the packed length 6, got 5"),
    (torch.tensor([0, 2, 6]), {}, TypeError, "cu_seqlens must have dtype int32"),
    (torch.tensor([[0, 2, 6]], dtype=torch.int32), {}, ValueError, "cu_seqlens must have 1 dimension"),
    (torch.tensor([], dtype=torch.int32), {}, ValueError, "at least one offset"),
    (_cu6.to("meta"), {}, ValueError, "cu_seqlens must be on cpu"),
    ([0, 2, 6], {}, TypeError, "cu_seqlens must be a torch.Tensor"),
    (_cu6, {"agg": "seq-mean-token-sum-norm"}, ValueError, "needs loss_scale_factor"),
], ids=["start", "decreasing", "end", "int64", "2d", "empty", "device", "list", "sum-norm-factor"])
def test_bad_offsets(entry, cu, kw, exc, words):
    with pytest.raises(exc, match=re.escape(words)):
        _calls(cu, **kw)[entry]()


@pytest.mark.parametrize("call, words", [
    (lambda: policy_loss(_x.view(2, 3), _x.view(2, 3), _x.view(2, 3), _m.view(2, 3), cu_seqlens=_cu6),
     "logprobs must have 1 dimension"),
    (lambda: ppo_policy_loss(_x, _x, _x, _m), "logprobs must have 2 dimension"),
    (lambda: policy_loss(_x, _x, _x, _m[:5], cu_seqlens=_cu6), "mask must have shape (6,)"),
    (lambda: policy_loss(_x, _x, _x, _m, cu_seqlens=_cu6, is_weights=_x[:4]), "is_weights must have shape (6,)"),
], ids=["2d-with-offsets", "1d-without-offsets", "mask-shape", "weights-shape"])
def test_bad_packed_shapes(call, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        call()


def test_cuda_refuses_packed(monkeypatch):
    monkeypatch.setattr(ops, "resolve_backend", lambda backend, device, family=None: backend)
    for fn in (ppo_policy_loss, ppo_value_loss):
        with pytest.raises(fastrlhf.BackendUnavailableError, match=re.escape("no kernels for packed sequences (cu_seqlens)")):
            fn(_x, _x, _x, _m, cu_seqlens=_cu6, backend="cuda")
