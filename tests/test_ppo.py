"""ppo_policy_loss / ppo_value_loss / aggregate: every backend against the naive reference."""

import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastrlhf.ops.aggregation import AGG_MODES, aggregate
from fastrlhf.ops.policy_loss import ppo_policy_loss, ppo_value_loss
from fastrlhf.reference import policy_loss as ref
from tests.conftest import DEVICE
from tests.tolerance import assert_close_fp64, assert_same_dtype_close

# Shapes: one token per row, odd sizes that line up with nothing, a row longer than one
# 1024-token tile (1031 = 1024 + 7), and a batch whose flat size spans tiles mid-row.
SHAPES = [(3, 1), (5, 37), (2, 1031), (7, 300)]
DTYPES = [torch.float32, torch.bfloat16]
STATS = ("clipfrac", "clipfrac_lower", "approx_kl")


def _dtype_id(d):
    return str(d).removeprefix("torch.")


def _mask(B, T, p=0.7):
    """Holes everywhere, a fully masked row and a padded row."""
    mask = torch.rand(B, T, device=DEVICE) < p
    if B > 1:
        mask[1] = False
    if B > 2 and T > 2:
        mask[2, T // 2:] = False
    return mask


def _policy_case(B, T, dtype=torch.float32, spread=0.3):
    logp = (-torch.rand(B, T, device=DEVICE) * 3).to(dtype)
    old = (logp.float() + torch.randn(B, T, device=DEVICE) * spread).to(dtype)
    adv = torch.randn(B, T, device=DEVICE).to(dtype)
    return logp, old, adv, _mask(B, T)


def _policy_run(backend, logp, old, adv, mask, grad=1.7, **kw):
    """``(loss, stats, d loss / d logp)`` for an upstream gradient ``grad``."""
    x = logp.detach().clone().requires_grad_(True)
    if backend == "reference":
        kw.setdefault("clip_low", 0.2)
        loss, stats = ref.ppo_policy_loss(x, old, adv, mask, **kw)
    else:
        loss, stats = ppo_policy_loss(x, old, adv, mask, backend=backend, **kw)
    (loss * grad).backward()
    return loss.detach(), stats, x.grad


def _value_run(backend, v, old, ret, mask, grad=0.6, **kw):
    x = v.detach().clone().requires_grad_(True)
    if backend == "reference":
        loss, stats = ref.ppo_value_loss(x, old, ret, mask, **kw)
    else:
        loss, stats = ppo_value_loss(x, old, ret, mask, backend=backend, **kw)
    (loss * grad).backward()
    return loss.detach(), stats, x.grad


# ----------------------------------------------------------------------- policy loss
@pytest.mark.parametrize("dual_clip", [None, 3.0], ids=["nodual", "dual3"])
@pytest.mark.parametrize("clip_high", [None, 0.28], ids=["sym", "high0.28"])
@pytest.mark.parametrize("agg", AGG_MODES)
def test_policy_matches_reference(backend, agg, clip_high, dual_clip):
    # spread 1.0: many ratios outside [0.8, 1.28] and above the dual clip 3
    logp, old, adv, mask = _policy_case(5, 37, spread=1.0)
    kw = dict(clip_high=clip_high, dual_clip=dual_clip, agg=agg)
    loss, stats, grad = _policy_run(backend, logp, old, adv, mask, **kw)
    want, want_stats, want_grad = _policy_run("reference", logp.double(), old.double(), adv.double(), mask, **kw)
    assert loss.dtype == torch.float32 and loss.shape == () and grad.dtype == torch.float32
    assert_close_fp64(loss, want)
    assert_close_fp64(grad, want_grad, atol=1e-6)
    for k in STATS:
        assert stats[k].dtype == torch.float32 and not stats[k].requires_grad
        assert_close_fp64(stats[k], want_stats[k])
    assert (grad[mask == 0] == 0).all()
    assert stats["clipfrac"] > 0 and (stats["clipfrac_lower"] > 0) == (dual_clip is not None)


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"B{s[0]}-T{s[1]}")
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_policy_shapes_and_dtypes(backend, shape, dtype, agg):
    logp, old, adv, mask = _policy_case(*shape, dtype)
    kw = dict(dual_clip=3.0, agg=agg)
    truth = _policy_run("reference", logp.double(), old.double(), adv.double(), mask, **kw)
    got = _policy_run(backend, logp, old, adv, mask, **kw)
    assert got[0].dtype == torch.float32 and got[2].dtype == dtype
    same = _policy_run("reference", logp, old, adv, mask, **kw)
    outputs = [{"loss": r[0], "grad": r[2], **{k: r[1][k] for k in STATS}} for r in (got, same, truth)]
    assert_same_dtype_close(*outputs, dtype)


def test_policy_hand_computed():
    """Two tokens per case, A = +-1: the clipped branch, dual clip and their statistics."""
    lr = torch.tensor([[math.log(1.5), math.log(0.5), math.log(5.0), math.log(0.9)]], device=DEVICE)
    adv = torch.tensor([[1.0, -1.0, -1.0, 1.0]], device=DEVICE)
    mask = torch.ones(1, 4, device=DEVICE)
    for backend in ["torch"] + [b for b in _backends() if b != "torch"]:
        loss, stats, grad = _policy_run(backend, lr, torch.zeros_like(lr), adv, mask, grad=1.0,
                                        dual_clip=3.0, agg="token-sum")
        # per token: -min(1.5, 1.2) = -1.2 (clipped); max(0.5, 0.8) = 0.8 (clipped);
        # min(max(5, 1.2), 3) = 3 (dual clip); -0.9 (unclipped)
        assert abs(loss.item() - (-1.2 + 0.8 + 3.0 - 0.9)) < 1e-6
        assert stats["clipfrac"].item() == 0.5  # for A < 0 and ratio 5 the unclipped term is larger
        assert stats["clipfrac_lower"].item() == 0.25
        assert abs(stats["approx_kl"].item() + lr.mean().item()) < 1e-6
        torch.testing.assert_close(grad, torch.tensor([[0.0, 0.0, 0.0, -0.9]], device=DEVICE))


def test_log_ratio_clamp(backend):
    """A log-ratio of 30 is clamped to 20: ratio e**20, zero gradient, approx_kl uses the clamp."""
    logp = torch.tensor([[30.0, 0.1]], device=DEVICE)
    old = torch.zeros(1, 2, device=DEVICE)
    adv = torch.tensor([[-1.0, -1.0]], device=DEVICE)
    mask = torch.ones(1, 2, device=DEVICE)
    loss, stats, grad = _policy_run(backend, logp, old, adv, mask, grad=1.0, agg="token-sum")
    assert math.isclose(loss.item(), math.exp(20) + math.exp(0.1), rel_tol=1e-6)
    assert abs(stats["approx_kl"].item() + 10.05) < 1e-5
    assert grad[0, 0] == 0 and abs(grad[0, 1].item() - math.exp(0.1)) < 1e-6
    loss, stats, grad = _policy_run(backend, logp, old, adv, mask, agg="token-sum", log_ratio_clamp=None)
    assert math.isclose(loss.item(), math.exp(30) + math.exp(0.1), rel_tol=1e-5) and grad[0, 0] > 0


def test_policy_gradcheck_fp64(backend):
    logp, old, adv, mask = _policy_case(3, 6, torch.float64, spread=0.5)
    logp.requires_grad_(True)
    for agg in ("token-mean", "seq-mean-token-mean"):
        assert torch.autograd.gradcheck(
            lambda x: ppo_policy_loss(x, old, adv, mask, dual_clip=2.0, agg=agg, backend=backend)[0], (logp,))


# ------------------------------------------------------------------------ value loss
@pytest.mark.parametrize("clip", [None, 0.2], ids=["noclip", "clip0.2"])
@pytest.mark.parametrize("agg", AGG_MODES)
def test_value_matches_reference(backend, agg, clip):
    v, old, ret, mask = _policy_case(5, 37, spread=0.5)
    loss, stats, grad = _value_run(backend, v, old, ret, mask, clip=clip, agg=agg)
    want, want_stats, want_grad = _value_run("reference", v.double(), old.double(), ret.double(), mask,
                                             clip=clip, agg=agg)
    assert_close_fp64(loss, want)
    assert_close_fp64(grad, want_grad, atol=1e-6)
    assert_close_fp64(stats["vf_clipfrac"], want_stats["vf_clipfrac"])
    assert (stats["vf_clipfrac"] > 0) == (clip is not None)


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"B{s[0]}-T{s[1]}")
def test_value_shapes_and_dtypes(backend, shape, dtype):
    v, old, ret, mask = _policy_case(*shape, dtype)
    truth = _value_run("reference", v.double(), old.double(), ret.double(), mask, clip=0.1)
    got = _value_run(backend, v, old, ret, mask, clip=0.1)
    same = _value_run("reference", v, old, ret, mask, clip=0.1)
    assert got[2].dtype == dtype
    assert_same_dtype_close(*[(r[0], r[2]) for r in (got, same, truth)], dtype)


def test_value_hand_computed(backend):
    v = torch.tensor([[1.0, 1.0, 0.0]], device=DEVICE)
    old = torch.tensor([[0.0, 0.0, 0.0]], device=DEVICE)
    ret = torch.tensor([[2.0, -1.0, 1.0]], device=DEVICE)
    loss, stats, grad = _value_run(backend, v, old, ret, torch.ones(1, 3, device=DEVICE), grad=1.0,
                                   clip=0.5, agg="token-sum")
    # v=1 clipped to 0.5: max(1, 2.25) -> clipped; max(4, 2.25) -> unclipped; inside: 1
    assert abs(loss.item() - 0.5 * (2.25 + 4.0 + 1.0)) < 1e-6
    assert abs(stats["vf_clipfrac"].item() - 1 / 3) < 1e-6
    torch.testing.assert_close(grad, torch.tensor([[0.0, 2.0, -1.0]], device=DEVICE))


def test_value_gradcheck_fp64(backend):
    v, old, ret, mask = _policy_case(3, 6, torch.float64)
    v.requires_grad_(True)
    for agg in ("token-sum", "seq-mean-token-mean"):
        assert torch.autograd.gradcheck(
            lambda x: ppo_value_loss(x, old, ret, mask, clip=0.2, agg=agg, backend=backend)[0], (v,))


# --------------------------------------------------------- masks, counts, edge cases
@pytest.mark.parametrize("agg", AGG_MODES)
def test_empty_masks_give_zero_not_nan(backend, agg):
    for B, T, zero_mask in [(4, 9, True), (0, 9, False), (3, 0, False), (0, 0, False)]:
        logp, old, adv, mask = _policy_case(B, T)
        if zero_mask:
            mask = torch.zeros_like(mask)
        loss, stats, grad = _policy_run(backend, logp, old, adv, mask, dual_clip=3.0, agg=agg)
        assert loss.item() == 0 and all(stats[k].item() == 0 for k in STATS)
        assert grad.shape == (B, T) and (grad == 0).all()
        loss, stats, grad = _value_run(backend, logp, old, adv, mask, clip=0.2, agg=agg)
        assert loss.item() == 0 and stats["vf_clipfrac"].item() == 0 and (grad == 0).all()


@pytest.mark.parametrize("agg", AGG_MODES)
def test_fully_masked_rows_count_for_nothing(backend, agg):
    logp, old, adv, mask = _policy_case(5, 20)
    keep = mask.any(-1)
    got = _policy_run(backend, logp, old, adv, mask, agg=agg)
    want = _policy_run(backend, logp[keep], old[keep], adv[keep], mask[keep], agg=agg)
    assert_close_fp64(got[0], want[0], atol=1e-6)
    assert_close_fp64(got[2][keep], want[2], atol=1e-7)


def test_garbage_outside_mask_is_harmless(backend):
    logp, old, adv, mask = _policy_case(4, 30)
    logp[~mask] = float("-inf")
    old[~mask] = float("-inf")  # -inf - -inf = NaN log-ratio
    adv[~mask] = float("nan")
    for agg in AGG_MODES:
        loss, stats, grad = _policy_run(backend, logp, old, adv, mask, dual_clip=3.0, agg=agg)
        assert torch.isfinite(loss) and all(torch.isfinite(stats[k]) for k in STATS)
        assert torch.isfinite(grad).all() and (grad[~mask] == 0).all()
        loss, stats, grad = _value_run(backend, old, logp, adv, mask, clip=0.2, agg=agg)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"])
def test_global_counts_split_like_data_parallel_ranks(backend, agg):
    """Two ranks with the global count: their losses (and gradients) add up to the full batch's."""
    logp, old, adv, mask = _policy_case(6, 25)
    full = _policy_run(backend, logp, old, adv, mask, agg=agg, dual_clip=3.0)
    n_tok, n_seq = int(mask.sum()), int(mask.any(-1).sum())
    parts = []
    for rows, as_tensor in ((slice(0, 2), True), (slice(2, 6), False)):
        count = {"global_tokens": n_tok, "global_seqs": n_seq}
        if as_tensor:
            count = {k: torch.tensor(v, device=DEVICE) for k, v in count.items()}
        parts.append(_policy_run(backend, logp[rows], old[rows], adv[rows], mask[rows], agg=agg,
                                 dual_clip=3.0, **count))
    assert_close_fp64(parts[0][0] + parts[1][0], full[0], atol=1e-6)
    assert_close_fp64(torch.cat([parts[0][2], parts[1][2]]), full[2], atol=1e-7)


def test_global_counts_and_loss_scale_factor(backend):
    logp, old, adv, mask = _policy_case(4, 16)
    local = _policy_run(backend, logp, old, adv, mask)[0]
    for count in (2 * int(mask.sum()), 2.0 * int(mask.sum()), torch.tensor(2.0 * int(mask.sum()), device=DEVICE)):
        assert_close_fp64(_policy_run(backend, logp, old, adv, mask, global_tokens=count)[0], local / 2)
    assert _policy_run(backend, logp, old, adv, mask, global_tokens=0)[0].item() == 0
    assert _policy_run(backend, logp, old, adv, mask, global_tokens=torch.tensor(0, device=DEVICE))[0].item() == 0
    total = _policy_run(backend, logp, old, adv, mask, agg="token-sum", global_tokens=5)[0]  # ignored
    seqs = int(mask.any(-1).sum())  # sum-norm: sum / (sequences x factor), the factor defaulting to T
    sum_norm = "seq-mean-token-sum-norm"
    assert_close_fp64(_policy_run(backend, logp, old, adv, mask, agg=sum_norm)[0], total / (seqs * 16))
    assert_close_fp64(_policy_run(backend, logp, old, adv, mask, agg=sum_norm, loss_scale_factor=4096)[0],
                      total / (seqs * 4096))
    assert_close_fp64(_policy_run(backend, logp, old, adv, mask, agg=sum_norm, global_seqs=7,
                                  loss_scale_factor=torch.tensor(4096.0, device=DEVICE))[0], total / (7 * 4096))
    v = _value_run(backend, logp, old, adv, mask, agg="seq-mean-token-sum", global_seqs=torch.tensor(8))
    assert_close_fp64(v[0], _value_run("reference", logp, old, adv, mask, agg="seq-mean-token-sum", global_seqs=8)[0])


def test_deterministic(backend):
    logp, old, adv, mask = _policy_case(7, 300)
    a = _policy_run(backend, logp, old, adv, mask, agg="seq-mean-token-mean", dual_clip=3.0)
    b = _policy_run(backend, logp, old, adv, mask, agg="seq-mean-token-mean", dual_clip=3.0)
    assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])


@pytest.mark.parametrize("agg", AGG_MODES)
def test_triton_last_program_adds_many_partials(monkeypatch, agg):
    """The one-launch forward with 16-token tiles and 4 partials per reduction step: 132 programs
    (a partial last tile) racing for the ticket on a GPU, the last one adds the partials in 33
    steps and counts 7 rows; the same bits every run."""
    pytest.importorskip("triton")
    from fastrlhf.triton import policy_loss as launchers

    monkeypatch.setattr(launchers, "TOKENS_PER_PARTIAL", 16)
    monkeypatch.setattr(launchers, "REDUCE_BLOCK", 4)
    logp, old, adv, mask = _policy_case(7, 300)
    counts = {"loss_scale_factor": 256.0} if agg == "seq-mean-token-sum-norm" else {}
    got = _policy_run("triton", logp, old, adv, mask, agg=agg, dual_clip=3.0, **counts)
    again = _policy_run("triton", logp, old, adv, mask, agg=agg, dual_clip=3.0, **counts)
    assert torch.equal(got[0], again[0]) and all(torch.equal(got[1][k], again[1][k]) for k in STATS)
    want = _policy_run("reference", logp.double(), old.double(), adv.double(), mask, agg=agg, dual_clip=3.0,
                       **counts)
    for a, b in zip((got[0], *got[1].values(), got[2]), (want[0], *want[1].values(), want[2])):
        assert_close_fp64(a, b)
    got = _value_run("triton", logp, old, adv, mask, agg=agg, clip=0.2, **counts)
    want = _value_run("reference", logp.double(), old.double(), adv.double(), mask, agg=agg, clip=0.2, **counts)
    for a, b in zip((got[0], got[1]["vf_clipfrac"], got[2]), (want[0], want[1]["vf_clipfrac"], want[2])):
        assert_close_fp64(a, b)


def test_input_layouts_and_mask_dtypes(backend):
    """Sliced, transposed and expanded inputs; bool, int and float masks (values are not weights)."""
    base = torch.randn(4, 21, device=DEVICE)
    logp, old = base[:, 1:], base.t().contiguous().t()[:, :-1]
    adv = torch.randn(4, 1, device=DEVICE).expand(4, 20)  # sequence-level advantages
    mask = _mask(4, 20)
    want = _policy_run("reference", logp.contiguous(), old.contiguous(), adv.contiguous(), mask)
    for m in (mask, mask.int(), mask.float() * 0.5):
        got = _policy_run(backend, logp, old, adv, m)
        assert_close_fp64(got[0], want[0])
        assert_close_fp64(got[2], want[2], atol=1e-7)


@settings(max_examples=20, deadline=None)
@given(B=st.integers(0, 5), T=st.integers(1, 80), agg=st.sampled_from(AGG_MODES),
       p=st.sampled_from([0.0, 0.2, 0.9, 1.0]), spread=st.sampled_from([0.01, 0.5, 3.0]),
       dual_clip=st.sampled_from([None, 1.5, 3.0]), clip_high=st.sampled_from([None, 0.1, 0.28]),
       value_clip=st.sampled_from([None, 0.05, 1.0]), seed=st.integers(0, 2**16))
def test_property_against_reference(B, T, agg, p, spread, dual_clip, clip_high, value_clip, seed):
    torch.manual_seed(seed)
    logp, old, adv, _ = _policy_case(B, T, spread=spread)
    mask = torch.rand(B, T, device=DEVICE) < p
    kw = dict(agg=agg, dual_clip=dual_clip, clip_high=clip_high)
    want = _policy_run("reference", logp.double(), old.double(), adv.double(), mask, **kw)
    want_v = _value_run("reference", logp.double(), old.double(), adv.double(), mask, agg=agg, clip=value_clip)
    for backend in _backends():
        got = _policy_run(backend, logp, old, adv, mask, **kw)
        assert_close_fp64(got[0], want[0], atol=1e-4)
        assert_close_fp64(got[2], want[2], atol=1e-5)
        for k in STATS:
            assert_close_fp64(got[1][k], want[1][k], atol=1e-5)
        got_v = _value_run(backend, logp, old, adv, mask, agg=agg, clip=value_clip)
        assert_close_fp64(got_v[0], want_v[0], atol=1e-4)
        assert_close_fp64(got_v[2], want_v[2], atol=1e-5)


def _backends():
    from fastrlhf.backend import available_backends

    return available_backends(DEVICE)


# ------------------------------------------------------------------------ aggregate
def test_aggregate_modes_hand_computed():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, float("nan")], [7.0, 8.0, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [0, 0, 0]])
    want = {"token-mean": 15 / 5, "token-sum": 15.0, "seq-mean-token-sum": 15 / 2,
            "seq-mean-token-mean": (2 + 4.5) / 2, "seq-mean-token-sum-norm": 15 / (2 * 3)}
    for mode, value in want.items():
        assert abs(aggregate(loss, mask, mode).item() - value) < 1e-6
    assert aggregate(loss, mask, "token-mean", global_tokens=10).item() == 1.5
    assert aggregate(loss, mask, "seq-mean-token-mean", global_seqs=torch.tensor(4)).item() == 6.5 / 4
    assert aggregate(loss, mask, "seq-mean-token-sum-norm", loss_scale_factor=30).item() == 0.25
    assert aggregate(loss, mask, "seq-mean-token-sum-norm", global_seqs=5).item() == 1.0
    assert aggregate(loss, torch.zeros_like(mask), "seq-mean-token-mean").item() == 0
    x = loss.clone().requires_grad_(True)
    aggregate(x, mask, "seq-mean-token-mean").backward()
    torch.testing.assert_close(x.grad, torch.tensor([[1 / 6] * 3, [1 / 4, 1 / 4, 0], [0, 0, 0]]))


def test_aggregate_matches_policy_loss_aggregation(backend):
    logp, old, adv, mask = _policy_case(5, 11)
    o = {"clip_low": 0.2, "clip_high": 0.2, "dual_clip": None, "log_ratio_clamp": 20.0}
    per_token, _ = ref.mode_loss("vanilla", logp.float(), old.float(), adv.float(), mask != 0, o)
    for agg in AGG_MODES:
        assert_close_fp64(aggregate(per_token, mask, agg), _policy_run(backend, logp, old, adv, mask, agg=agg)[0])


# ------------------------------------------------------------------------ bad input
_x = torch.randn(2, 3)
_m = torch.ones(2, 3, dtype=torch.bool)


BAD_INPUTS = {
    "old-wrong-shape": (lambda: ppo_policy_loss(_x, torch.randn(2, 4), _x, _m), ValueError,
                        "old_logprobs must have shape (2, 3)"),
    "mask-wrong-shape": (lambda: ppo_policy_loss(_x, _x, _x, torch.ones(3, 2)), ValueError, "mask must have shape"),
    "logprobs-1d": (lambda: ppo_policy_loss(_x[0], _x[0], _x[0], _m[0]), ValueError, "logprobs must have 2 dimension"),
    "logprobs-int": (lambda: ppo_policy_loss(_x.long(), _x, _x, _m), TypeError, "logprobs must have dtype"),
    "advantages-int": (lambda: ppo_policy_loss(_x, _x, _x.int(), _m), TypeError, "advantages must have dtype"),
    "mask-complex": (lambda: ppo_policy_loss(_x, _x, _x, _m.to(torch.complex64)), TypeError, "mask must be a bool"),
    "agg-unknown": (lambda: ppo_policy_loss(_x, _x, _x, _m, agg="mean"), ValueError, "agg must be one of"),
    "dual-clip-one": (lambda: ppo_policy_loss(_x, _x, _x, _m, dual_clip=1.0), ValueError, "dual_clip must be > 1"),
    "dual-clip-half": (lambda: ppo_policy_loss(_x, _x, _x, _m, dual_clip=0.5), ValueError, "dual_clip must be > 1"),
    "dual-clip-negative": (lambda: ppo_policy_loss(_x, _x, _x, _m, dual_clip=-3.0), ValueError, "dual_clip"),
    "clip-low-zero": (lambda: ppo_policy_loss(_x, _x, _x, _m, clip_low=0.0), ValueError, "clip_low"),
    "clip-high-negative": (lambda: ppo_policy_loss(_x, _x, _x, _m, clip_high=-0.1), ValueError, "clip_high"),
    "clip-low-string": (lambda: ppo_policy_loss(_x, _x, _x, _m, clip_low="0.2"), TypeError,
                        "clip_low must be a Python float"),
    "log-ratio-clamp-zero": (lambda: ppo_policy_loss(_x, _x, _x, _m, log_ratio_clamp=0), ValueError,
                             "log_ratio_clamp"),
    "global-tokens-negative": (lambda: ppo_policy_loss(_x, _x, _x, _m, global_tokens=-1), ValueError,
                               "global_tokens must be a finite number >= 0"),
    "global-tokens-string": (lambda: ppo_policy_loss(_x, _x, _x, _m, global_tokens="8"), TypeError,
                             "global_tokens must be"),
    "global-seqs-1d": (lambda: ppo_policy_loss(_x, _x, _x, _m, global_seqs=torch.ones(2)), TypeError, "0-dim"),
    "global-seqs-bool": (lambda: ppo_policy_loss(_x, _x, _x, _m, global_seqs=torch.tensor(True)), TypeError, "0-dim"),
    "loss-scale-factor-inf": (lambda: ppo_policy_loss(_x, _x, _x, _m, loss_scale_factor=float("inf")), ValueError,
                              "loss_scale_factor"),
    "global-tokens-other-device": (
        lambda: ppo_policy_loss(_x, _x, _x, _m, global_tokens=torch.tensor(4, device="meta")), ValueError,
        "global_tokens must be on"),
    "old-other-device": (lambda: ppo_policy_loss(_x, _x.to("meta"), _x, _m), ValueError,
                         "old_logprobs must be on cpu"),
    "backend-unknown": (lambda: ppo_policy_loss(_x, _x, _x, _m, backend="jax"), ValueError, "backend must be one of"),
    "returns-wrong-shape": (lambda: ppo_value_loss(_x, _x, torch.randn(3, 3), _m), ValueError,
                            "returns must have shape"),
    "value-clip-zero": (lambda: ppo_value_loss(_x, _x, _x, _m, clip=0.0), ValueError,
                        "clip must be a finite number > 0"),
    "values-int": (lambda: ppo_value_loss(_x.int(), _x, _x, _m), TypeError, "values must have dtype"),
    "value-agg-unknown": (lambda: ppo_value_loss(_x, _x, _x, _m, agg="token_mean"), ValueError, "agg must be one of"),
    "aggregate-mode-unknown": (lambda: aggregate(_x, _m, "sum"), ValueError, "mode must be one of"),
    "aggregate-mask-wrong-shape": (lambda: aggregate(_x, torch.ones(2, 2)), ValueError, "mask must have shape"),
    "aggregate-mask-other-device": (lambda: aggregate(_x, _m.to("meta")), ValueError, "mask must be on"),
}


@pytest.mark.parametrize("call, exc, words", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input(call, exc, words):
    with pytest.raises(exc, match=re.escape(words)):
        call()


# -------------------------------------------------------- torch.library / torch.compile
def test_opcheck_custom_ops():
    logp, old, adv, mask = (t.cpu() for t in _policy_case(3, 5))
    ops = torch.ops.fastrlhf
    for agg, counts in [("token-mean", (None, None, None)),
                        ("seq-mean-token-mean", (None, torch.tensor(4.0, dtype=torch.float64), None)),
                        ("seq-mean-token-sum-norm", (None, torch.tensor(3), torch.tensor(16.0)))]:
        torch.library.opcheck(ops.ppo_policy_loss.default,
                              (logp.clone().requires_grad_(True), old, adv, mask, 0.2, 0.28, 3.0, 20.0, agg,
                               *counts, "torch"))
        torch.library.opcheck(ops.ppo_value_loss.default,
                              (logp.clone().requires_grad_(True), old, adv, mask, 0.2, agg, *counts, "torch"))
    rows = mask.sum(-1)
    scale = torch.tensor(0.25)
    torch.library.opcheck(ops.ppo_policy_loss_backward.default,
                          (torch.tensor(1.0), scale, logp, old, adv, mask, rows, 0.2, 0.2, None, 20.0,
                           "seq-mean-token-mean", "torch"))
    torch.library.opcheck(ops.ppo_value_loss_backward.default,
                          (torch.tensor(1.0), scale, logp, old, adv, mask, rows[:0], None, "token-mean", "torch"))


def test_torch_compile_fullgraph_no_recompile_for_new_counts():
    def step(logp, old, adv, values, returns, mask, n_tok):
        pg, stats = ppo_policy_loss(logp, old, adv, mask, dual_clip=3.0, global_tokens=n_tok, backend="torch")
        vf, vstats = ppo_value_loss(values, values.detach(), returns, mask, clip=0.2, backend="torch")
        ent = aggregate(logp.exp(), mask, "seq-mean-token-mean")
        return pg + 0.5 * vf - 0.01 * ent, stats["clipfrac"], vstats["vf_clipfrac"]

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    logp, old, adv, mask = (t.cpu() for t in _policy_case(3, 8))
    values = torch.randn(3, 8)
    grads = []
    with torch._dynamo.config.patch(error_on_recompile=True):
        for n in (40, 50):
            for fn in (compiled, step):
                x = logp.clone().requires_grad_(True)
                v = values.clone().requires_grad_(True)
                out = fn(x, old, adv, v, adv, mask, torch.tensor(n))
                out[0].backward()
                grads.append((out[0].detach(), out[1], x.grad, v.grad))
    for a, b in zip(grads[0::2], grads[1::2]):
        for u, w in zip(a, b):
            torch.testing.assert_close(u, w)


# ------------------------------------------------------- compiled for real GPUs (no GPU)
def _aot_launches():
    """Launches besides the report's ``ppo_*`` cases (fp32, bool mask, 16 M tokens): bf16, fp32 and
    fp64 inputs (fp64 accumulates in fp64), bool, int64 and fp32 masks, with and without row
    counts (``seq-mean-token-mean``), every aggregation and global count (the last program's
    normalizer), 2**31 tokens (i64 count: ``FAST_ROWS`` off) and rows of one token (T = 1 becomes
    constexpr 1)."""
    from bench.static.cases import t
    from fastrlhf._numerics import acc_dtype
    from fastrlhf.triton import policy_loss as launchers

    def run(value, dtype, mask_dtype, agg, B, T, counts=(None, None, None)):
        x, old = t(B, T, dtype=dtype), t(B, T, dtype=dtype)
        acc = acc_dtype(x)
        y, mask = t(B, T, dtype=acc), t(B, T, dtype=mask_dtype)
        rows = t(B, dtype=torch.int64) if agg.startswith("seq-") else None
        per_row = rows if agg == "seq-mean-token-mean" else None
        outs = (t(dtype=acc), t(dtype=acc) if value else t(3, dtype=acc), t(dtype=acc))
        if value:
            launchers.ppo_value_fwd(x, old, y, mask, rows, 0.2, agg, counts, *outs)
            launchers.ppo_value_bwd(t(dtype=acc), t(dtype=acc), x, old, y, mask, per_row, 0.2,
                                    t(B, T, dtype=dtype))
        else:
            clips = (0.8, 1.28, 3.0, 20.0)
            launchers.ppo_policy_fwd(x, old, y, mask, rows, *clips, agg, counts, *outs)
            launchers.ppo_policy_bwd(t(dtype=acc), t(dtype=acc), x, old, y, mask, per_row, *clips,
                                     t(B, T, dtype=dtype))

    f64 = t(dtype=torch.float64)
    run(False, torch.bfloat16, torch.bool, "token-mean", 2**20, 2048)
    run(False, torch.float32, torch.int64, "seq-mean-token-mean", 8192, 2048)
    run(False, torch.float32, torch.bool, "token-sum", 8192, 2048, (f64, None, None))
    run(True, torch.bfloat16, torch.float32, "seq-mean-token-mean", 2**20, 2048)
    run(True, torch.float64, torch.bool, "seq-mean-token-sum-norm", 8192, 2048, (None, f64, f64))
    run(True, torch.float64, torch.bool, "seq-mean-token-sum", 8192, 1)


def test_kernels_compile_for_gpus():
    from tests.triton_aot import compile_for_gpus

    compile_for_gpus("ppo_*", _aot_launches)
