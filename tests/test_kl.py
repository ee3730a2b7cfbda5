"""kl_penalty / kl_penalized_rewards / importance_weights / KL controllers: every backend against the naive
reference."""

import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastrlhf.ops.kl import (AdaptiveKLController, FixedKLController, importance_weights, kl_penalized_rewards,
                             kl_penalty)
from fastrlhf.reference import kl as ref
from tests.conftest import DEVICE
from tests.tolerance import assert_same_dtype_close, max_error

ESTIMATORS = [n + s for n in ("k1", "abs", "k2", "mse", "k3", "low_var_kl") for s in ("", "+")]
# (clamp, log_ratio_clamp): none; a value clamp active on many tokens; verl's k3 shape
# (log-ratio clamp then value clamp), scaled down so that both are active on random inputs.
CLAMPS = {"noclamp": (None, None), "clamp0.5": (0.5, None), "lrclamp1-clamp2": (2.0, 1.0)}
# Shapes: a single token per row, odd sizes that line up with nothing, and a row longer
# than one 1024-element tile (1031 = 1024 + 7).
SHAPES = [(3, 1), (5, 37), (2, 1031)]
DTYPES = [torch.float32, torch.bfloat16]


def _dtype_id(d):
    return str(d).removeprefix("torch.")


def _pair(shape, dtype=torch.float32, scale=1.0):
    lp = (torch.randn(shape, device=DEVICE) * scale).to(dtype)
    rp = (lp.float() + torch.randn(shape, device=DEVICE) * scale).to(dtype)
    return lp, rp


def _kl_run(lp, rp, grad, backend, **kw):
    """Value and both gradients of ``sum(grad * kl)``."""
    a = lp.detach().clone().requires_grad_(True)
    b = rp.detach().clone().requires_grad_(True)
    if backend == "reference":
        out = ref.kl_penalty(a, b, kw.get("estimator", "k1"), kw.get("clamp"), kw.get("log_ratio_clamp"))
    else:
        out = kl_penalty(a, b, backend=backend, **kw)
    (out * grad).sum().backward()
    return out.detach(), a.grad, b.grad


def _backends():
    from fastrlhf.backend import available_backends

    return available_backends(DEVICE)


# ------------------------------------------------------------------------ kl_penalty
@pytest.mark.parametrize("clamps", CLAMPS.values(), ids=CLAMPS.keys())
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_kl_penalty_matches_reference(backend, estimator, clamps):
    clamp, lr_clamp = clamps
    lp, rp = _pair((5, 37))
    grad = torch.randn(5, 37, device=DEVICE)
    kw = dict(estimator=estimator, clamp=clamp, log_ratio_clamp=lr_clamp)
    got = _kl_run(lp, rp, grad, backend, **kw)
    want = _kl_run(lp.double(), rp.double(), grad.double(), "reference", **kw)
    assert got[0].dtype == torch.float32 and got[1].dtype == got[2].dtype == torch.float32
    for g, w in zip(got, want):
        assert max_error(g, w) < 1e-5
    if clamp is not None:
        assert got[0].abs().max() <= clamp


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"B{s[0]}-T{s[1]}")
@pytest.mark.parametrize("estimator", ["k1", "k3", "abs+"])
def test_kl_penalty_shapes_and_dtypes(backend, shape, dtype, estimator):
    lp, rp = _pair(shape, dtype)
    grad = torch.randn(shape, device=DEVICE)
    truth = _kl_run(lp.double(), rp.double(), grad.double(), "reference", estimator=estimator)
    got = _kl_run(lp, rp, grad, backend, estimator=estimator)
    assert got[0].dtype == torch.float32 and got[1].dtype == got[2].dtype == dtype
    assert_same_dtype_close(got, _kl_run(lp, rp, grad, "reference", estimator=estimator), truth, dtype)


def test_straight_through_value_and_gradient(backend):
    """``"+"``: the value of the estimator, the gradient ``lr`` of k2 (clamps ignored)."""
    lp, rp = _pair((4, 9), scale=2.0)
    grad = torch.randn(4, 9, device=DEVICE)
    lr = lp - rp
    for name in ("k1", "abs", "k2", "k3"):
        plain = _kl_run(lp, rp, grad, backend, estimator=name, clamp=1.0)
        got = _kl_run(lp, rp, grad, backend, estimator=name + "+", clamp=1.0)
        torch.testing.assert_close(got[0], plain[0])
        torch.testing.assert_close(got[1], grad * lr)
        torch.testing.assert_close(got[2], -grad * lr)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # the interpreter's numpy
def test_clamps_extreme_log_ratios(backend):
    """lr = -100 overflows exp(-lr) in fp32: an active clamp still gives a finite value and a
    zero gradient (not NaN); verl's k3 settings give exactly the clamp; no clamp gives +inf."""
    lp = torch.tensor([-100.0, 100.0, 0.5, -30.0], device=DEVICE)
    rp = torch.zeros(4, device=DEVICE)
    val, dlp, dref = _kl_run(lp, rp, torch.ones(4, device=DEVICE), backend, estimator="k3", clamp=10.0)
    assert val[0] == val[1] == val[3] == 10.0
    assert dlp[0] == dlp[1] == dlp[3] == 0.0 and torch.isfinite(dlp).all() and torch.isfinite(dref).all()
    val, dlp, _ = _kl_run(lp, rp, torch.ones(4, device=DEVICE), backend, estimator="k3", clamp=100.0)
    assert val[1] == 99.0 and dlp[1] == 1.0 and val[0] == 100.0 and dlp[0] == 0.0
    val, dlp, _ = _kl_run(lp, rp, torch.ones(4, device=DEVICE), backend, estimator="k3",
                          clamp=10.0, log_ratio_clamp=20.0)
    assert val[0] == 10.0 and val[1] == 10.0 and dlp[0] == 0 and dlp[1] == 0
    assert abs(val[2].item() - (math.exp(-0.5) - 1 + 0.5)) < 1e-6
    assert abs(dlp[2].item() - (1 - math.exp(-0.5))) < 1e-6
    assert kl_penalty(lp, rp, estimator="k3", backend=backend)[0] == float("inf")
    # log-ratio clamp alone: k1 of +-100 is +-20, gradient 0 there and 1 elsewhere
    val, dlp, dref = _kl_run(lp, rp, torch.ones(4, device=DEVICE), backend, log_ratio_clamp=20.0)
    assert val.tolist() == [-20.0, 20.0, 0.5, -20.0]
    assert dlp.tolist() == [0.0, 0.0, 1.0, 0.0] and dref.tolist() == [0.0, 0.0, -1.0, 0.0]


def _k3_exact(x: torch.Tensor) -> torch.Tensor:
    """exp(-x) - 1 + x in fp64 by its series, to fp64 rounding for |x| <= 2 (the last term,
    2**29 / 29!, is below 1e-22 of the value), summed from the smallest term up."""
    x = x.double()
    return sum((-x) ** k * (1.0 / math.factorial(k)) for k in range(29, 1, -1))


def _near_zero(dtype) -> torch.Tensor:
    """Log-ratios from 1e-7 to the ends of k3's series range (-2, 1), both signs, densely
    through it, and the values on either side of its ends (where the closed forms take over)."""
    neg = -torch.logspace(-7, math.log10(1.999), 300, dtype=torch.float64)
    pos = torch.logspace(-7, math.log10(0.999), 300, dtype=torch.float64)
    dense = torch.linspace(-2, 1, 3001, dtype=torch.float64)
    x = torch.cat([neg, pos, dense, torch.tensor([-0.113, 0.113], dtype=torch.float64)]).to(dtype)
    ends = torch.tensor([-2.0, 1.0], dtype=dtype)
    sides = [torch.nextafter(ends, ends + d) for d in (-1, 1)]
    return torch.cat([x, ends, *sides]).to(DEVICE)


def _exact(estimator: str, x: torch.Tensor):
    """(value, d value / d x) in fp64, exact to an fp64 ulp."""
    x = x.double()
    return {"k1": (x, torch.ones_like(x)), "abs": (x.abs(), torch.sign(x)), "k2": (0.5 * x * x, x),
            "k3": (_k3_exact(x), -torch.expm1(-x))}[estimator]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=_dtype_id)
@pytest.mark.parametrize("estimator", ["k1", "abs", "k2", "k3"])
def test_estimators_few_ulps_near_zero(backend, estimator, dtype):
    """k3 = exp(-x) - 1 + x cancels to nothing written directly near x = 0 (1e-5 relative error
    at x = -0.11 in fp32): every estimator on every backend is within a few ulps, relative, of
    the exact value there (k3 across its whole series range and just beyond its ends), its
    gradient too, and so is the kl of kl_penalized_rewards."""
    x = _near_zero(dtype)
    zero = torch.zeros_like(x)
    lp = x.clone().requires_grad_(True)
    got = kl_penalty(lp, zero, estimator=estimator, backend=backend)
    got.sum().backward()
    ulp = torch.finfo(dtype).eps
    value, slope = _exact(estimator, x)
    assert ((got.double() - value).abs() <= 4 * ulp * value.abs()).all()
    assert ((lp.grad.double() - slope).abs() <= 4 * ulp * slope.abs()).all()
    _, kl = kl_penalized_rewards(torch.zeros(1, dtype=dtype, device=DEVICE), x[None], zero[None],
                                 torch.ones_like(x[None]), kl_coef=0.1, estimator=estimator, backend=backend)
    assert ((kl[0].double() - value).abs() <= 4 * ulp * value.abs()).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=_dtype_id)
def test_k3_far_from_zero_follows_the_exponential(backend, dtype):
    """Beyond the series, k3 is a closed form whose error is the exponential's: against an fp64
    closed form (exact to fp32's ulps), fp32 within a few ulps; fp64 (against itself) too. The
    bound is wider for fp32 Triton on a GPU, whose exp is ex2.approx of x * log2(e) (an error
    that grows with |x|)."""
    x64 = torch.cat([torch.linspace(-20, -2, 301, dtype=torch.float64), torch.linspace(1, 20, 301, dtype=torch.float64)])
    x = x64.to(dtype).to(DEVICE)
    lp = x.clone().requires_grad_(True)
    got = kl_penalty(lp, torch.zeros_like(x), estimator="k3", backend=backend)
    got.sum().backward()
    xd = x.double()
    value = torch.where(xd >= 1, torch.exp(-xd) + (xd - 1), torch.expm1(-xd) + xd)
    slope = -torch.expm1(-xd)
    ulps = 4 if dtype == torch.float64 or DEVICE.type == "cpu" or backend != "triton" else 64
    tol = ulps * torch.finfo(dtype).eps
    assert ((got.double() - value).abs() <= tol * value).all()
    assert ((lp.grad.double() - slope).abs() <= tol * slope.abs()).all()


def test_abs_gradient_at_zero(backend):
    lp = torch.tensor([0.25, 0.0, -1.0], device=DEVICE)
    _, dlp, dref = _kl_run(lp, torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE), backend,
                           estimator="abs")
    assert dlp.tolist() == [1.0, 0.0, -1.0] and dref.tolist() == [-1.0, 0.0, 1.0]


def test_gradient_only_for_one_input_and_mixed_dtypes(backend):
    lp = torch.randn(3, 5, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    rp = torch.randn(3, 5, device=DEVICE)
    out = kl_penalty(lp, rp, estimator="k2", backend=backend)
    assert out.dtype == torch.float32
    out.sum().backward()
    assert lp.grad.dtype == torch.bfloat16 and rp.grad is None
    torch.testing.assert_close(lp.grad.float(), (lp.float() - rp).to(torch.bfloat16).float(), atol=1e-2, rtol=1e-2)
    a = torch.randn(4, device=DEVICE, dtype=torch.float64)
    b = torch.randn(4, device=DEVICE, requires_grad=True)
    out = kl_penalty(a, b, estimator="k1", backend=backend)
    out.sum().backward()
    assert out.dtype == torch.float64 and b.grad.dtype == torch.float32 and (b.grad == -1).all()


def test_empty_and_scalar_inputs(backend):
    for shape in [(0,), (0, 7), (3, 0), ()]:
        lp = torch.randn(shape, device=DEVICE, requires_grad=True)
        out = kl_penalty(lp, torch.zeros(shape, device=DEVICE), estimator="k3", backend=backend)
        assert out.shape == shape
        out.sum().backward()
        assert lp.grad.shape == shape


def test_non_contiguous_and_expanded_inputs(backend):
    base = torch.randn(4, 10, device=DEVICE)
    for lp, rp in [(base[:, 1:], base.t().contiguous().t()[:, :-1]),
                   (base[:, :9], torch.zeros((), device=DEVICE).expand(4, 9)),
                   (base[:1].expand(4, 10), base)]:
        a = lp.clone().requires_grad_(True)
        got = kl_penalty(a, rp, estimator="k3", backend=backend)
        torch.testing.assert_close(got, ref.kl_penalty(lp.contiguous(), rp.contiguous(), "k3"))
        got.sum().backward()  # an expanded (stride-0) upstream gradient
        torch.testing.assert_close(a.grad, 1 - torch.exp(rp - lp))


@pytest.mark.parametrize("estimator", ["k1", "abs", "k2", "k3"])
def test_gradcheck_fp64(backend, estimator):
    lp = torch.randn(2, 5, dtype=torch.float64, device=DEVICE, requires_grad=True)
    rp = (lp.detach() + 0.5 + torch.rand(2, 5, dtype=torch.float64, device=DEVICE)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: kl_penalty(a, b, estimator=estimator, clamp=5.0,
                                                            backend=backend), (lp, rp))


# ---------------------------------------------------------------- kl_penalized_rewards
def _holey_mask(B, T):
    mask = (torch.rand(B, T, device=DEVICE) > 0.3).int()
    if B > 1:
        mask[1] = 0  # a fully masked row
    if B > 2 and T > 2:
        mask[2, T // 2:] = 0  # padding after the response
    return mask


def _rewards_case(B, T, dtype=torch.float32):
    lp, rp = _pair((B, T), dtype)
    scores = torch.randn(B, device=DEVICE) * 4
    return scores, lp, rp, _holey_mask(B, T)


@pytest.mark.parametrize("shape", SHAPES + [(3, 4099)], ids=lambda s: f"B{s[0]}-T{s[1]}")
@pytest.mark.parametrize("estimator", ["k1", "k3", "abs+"])
def test_rewards_match_reference(backend, shape, estimator):
    scores, lp, rp, mask = _rewards_case(*shape)
    kw = dict(kl_coef=0.05, estimator=estimator, kl_clamp=1.0, score_clip=2.0)
    rewards, kl = kl_penalized_rewards(scores, lp, rp, mask, backend=backend, **kw)
    want_r, want_kl = ref.kl_penalized_rewards(scores, lp, rp, mask, 0.05, estimator, 1.0, None, 2.0)
    assert rewards.dtype == kl.dtype == torch.float32 and rewards.shape == shape
    torch.testing.assert_close(rewards, want_r, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(kl, want_kl, atol=1e-6, rtol=1e-5)
    assert (kl[mask == 0] == 0).all() and (rewards[mask == 0] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_rewards_dtypes_and_tensor_coef(backend, dtype):
    scores, lp, rp, mask = _rewards_case(4, 37, dtype)
    coef = torch.tensor(0.3, device=DEVICE)
    rewards, kl = kl_penalized_rewards(scores.to(dtype), lp, rp, mask.bool(), kl_coef=coef,
                                       estimator="k3", backend=backend)
    want_r, want_kl = ref.kl_penalized_rewards(scores.to(dtype), lp, rp, mask, 0.3, "k3")
    torch.testing.assert_close(rewards, want_r, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kl, want_kl, atol=1e-5, rtol=1e-5)


def test_score_lands_on_last_valid_token_across_tiles(backend):
    """The last valid token in the first, middle and last 2048-token tile, a fully masked row,
    holes, a float mask and a row whose last valid token is its very last element."""
    B, T = 5, 5000
    mask = torch.zeros(B, T, device=DEVICE)
    mask[0, :101] = 1.0          # last = 100: tile 0, then two all-invalid tiles to scan
    mask[1, :11] = 1.0
    mask[1, 4500] = 0.5          # last = 4500: tile 2, far past a long hole
    mask[3, :4096:2] = 1.0       # last = 4094: end of tile 1, tile 2 empty
    mask[4, -1] = -1.0           # last = 4999, the only valid token
    scores = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], device=DEVICE)
    zeros = torch.zeros(B, T, device=DEVICE)
    rewards, kl = kl_penalized_rewards(scores, zeros, zeros, mask, kl_coef=0.1, backend=backend)
    assert (kl == 0).all()
    assert rewards.nonzero().tolist() == [[0, 100], [1, 4500], [3, 4094], [4, 4999]]
    assert rewards[rewards != 0].tolist() == [1.0, 2.0, 4.0, 5.0]


def test_rewards_sum_identity_and_fully_masked(backend):
    scores, lp, rp, mask = _rewards_case(6, 33)
    mask[4] = 0
    rewards, kl = kl_penalized_rewards(scores, lp, rp, mask, kl_coef=0.2, estimator="k2", backend=backend)
    has = (mask != 0).any(-1)
    torch.testing.assert_close(rewards.sum(-1), -0.2 * kl.sum(-1) + torch.where(has, scores, 0.0))
    assert (rewards[4] == 0).all() and (rewards[1] == 0).all()


def test_rewards_ignore_garbage_outside_mask(backend):
    """Padding positions may hold -inf / NaN log-probs: they reach neither output."""
    scores, lp, rp, mask = _rewards_case(3, 20)
    lp[mask == 0] = float("-inf")
    rp[mask == 0] = float("nan")
    rewards, kl = kl_penalized_rewards(scores, lp, rp, mask, kl_coef=0.1, estimator="k3", backend=backend)
    assert torch.isfinite(rewards).all() and torch.isfinite(kl).all()


@pytest.mark.parametrize("lengths", [[5, 0, 37, 1], [300, 1, 2100], [4500]], ids=str)
def test_rewards_packed_equals_padded(backend, lengths):
    """Packed sequences (empty ones, length 1, several tiles, one long sequence cut into chunks,
    trailing masked runs): each gets its score at its own last valid token, exactly as padded."""
    S, width = len(lengths), max(lengths)
    inside = torch.arange(width, device=DEVICE) < torch.tensor(lengths, device=DEVICE)[:, None]
    lp, rp = _pair((S, width))
    mask = _holey_mask(S, width) * inside
    if S > 2:
        mask[2, -400:] = 0  # a masked run across tiles before the sequence ends
    scores = torch.randn(S, device=DEVICE) * 5
    cu = torch.tensor([0] + lengths, device=DEVICE).cumsum(0).to(torch.int32)
    kw = dict(kl_coef=0.05, estimator="k3", score_clip=4.0, backend=backend)
    rewards, kl = kl_penalized_rewards(scores, lp, rp, mask, **kw)
    got_r, got_k = kl_penalized_rewards(scores, lp[inside], rp[inside], mask[inside], cu_seqlens=cu, **kw)
    torch.testing.assert_close(got_r, rewards[inside])
    torch.testing.assert_close(got_k, kl[inside])


def test_rewards_empty_and_single_token(backend):
    for B, T in [(0, 5), (3, 0), (0, 0)]:
        z = torch.zeros(B, T, device=DEVICE)
        r, k = kl_penalized_rewards(torch.zeros(B, device=DEVICE), z, z, z, kl_coef=0.1, backend=backend)
        assert r.shape == k.shape == (B, T)
    lp = torch.tensor([[0.5], [0.5]], device=DEVICE)
    r, k = kl_penalized_rewards(torch.tensor([3.0, 3.0], device=DEVICE), lp, torch.zeros_like(lp),
                                torch.tensor([[1], [0]], device=DEVICE), kl_coef=0.5, backend=backend)
    assert r.tolist() == [[3.0 - 0.25], [0.0]] and k.tolist() == [[0.5], [0.0]]


def test_rewards_strided_rows_and_no_gradient(backend):
    base = torch.randn(3, 12, device=DEVICE, requires_grad=True)
    lp, rp = base[:, 1:], base[:, :-1].detach()
    mask = torch.ones(3, 11, dtype=torch.bool, device=DEVICE)
    scores = torch.randn(3, device=DEVICE, requires_grad=True)
    r, k = kl_penalized_rewards(scores, lp, rp, mask, kl_coef=0.1, backend=backend)
    assert not r.requires_grad and not k.requires_grad
    want_r, _ = ref.kl_penalized_rewards(scores, lp.contiguous(), rp.contiguous(), mask, 0.1)
    torch.testing.assert_close(r, want_r)


def test_rewards_64bit_offsets(backend):
    """Row 1 of the log-probs starts 2**31 elements in (the storage is reserved, not touched)."""
    if DEVICE.type == "cpu":
        pytest.skip("needs a GPU: the Triton interpreter copies the whole 4 GiB storage back and forth")
    T = 16
    try:
        storage = torch.empty(2**31 + T, dtype=torch.bfloat16, device=DEVICE)
    except RuntimeError as e:  # pragma: no cover - a machine without the memory
        pytest.skip(f"cannot reserve 4 GiB: {e}")
    lp = storage.as_strided((2, T), (2**31, 1))
    lp.copy_(torch.randn(2, T, device=DEVICE))
    rp = torch.zeros(2, T, device=DEVICE)
    mask = torch.ones(2, T, device=DEVICE)
    scores = torch.ones(2, device=DEVICE)
    r, k = kl_penalized_rewards(scores, lp, rp, mask, kl_coef=1.0, backend=backend)
    want_r, want_k = ref.kl_penalized_rewards(scores, lp.contiguous(), rp, mask, 1.0)
    torch.testing.assert_close(r, want_r)
    torch.testing.assert_close(k, want_k)


@settings(max_examples=20, deadline=None)
@given(B=st.integers(0, 4), T=st.integers(1, 70), estimator=st.sampled_from(ESTIMATORS),
       p_valid=st.sampled_from([0.0, 0.3, 1.0]), scale=st.sampled_from([0.01, 1.0, 30.0]),
       clamp=st.sampled_from([None, 10.0]), lr_clamp=st.sampled_from([None, 20.0]),
       seed=st.integers(0, 2**16))
def test_property_against_reference(B, T, estimator, p_valid, scale, clamp, lr_clamp, seed):
    torch.manual_seed(seed)
    lp, rp = _pair((B, T), scale=scale)
    mask = torch.rand(B, T, device=DEVICE) < p_valid
    scores = torch.randn(B, device=DEVICE)
    want_r, want_k = ref.kl_penalized_rewards(scores.double(), lp.double(), rp.double(), mask, 0.1,
                                              estimator, clamp, lr_clamp, 1.0)
    want_kl = ref.kl_penalty(lp.double(), rp.double(), estimator, clamp, lr_clamp)
    for backend in _backends():
        r, k = kl_penalized_rewards(scores, lp, rp, mask, kl_coef=0.1, estimator=estimator,
                                    kl_clamp=clamp, log_ratio_clamp=lr_clamp, score_clip=1.0, backend=backend)
        kl = kl_penalty(lp, rp, estimator=estimator, clamp=clamp, log_ratio_clamp=lr_clamp, backend=backend)
        finite = torch.isfinite(want_kl.float())  # k3 without clamps past fp32's range: +inf
        tol = dict(atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(kl[finite].double(), want_kl[finite], **tol)
        assert (kl[~finite] == want_kl[~finite].float()).all()
        fin = torch.isfinite(want_r.float())
        torch.testing.assert_close(r[fin].double(), want_r[fin], **tol)
        torch.testing.assert_close(k[fin].double(), want_k[fin], **tol)
        if estimator.removesuffix("+") in ("abs", "k2", "mse", "k3", "low_var_kl"):
            assert (kl >= -1e-6).all()  # k3 = exp(-lr) - 1 + lr in fp32 may round to -1e-7


# ---------------------------------------------------------------------- controllers
def test_adaptive_controller():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    assert ctl.value == 0.1
    ctl.update(9.0, n_steps=256)  # err = 0.5 -> clipped to 0.2
    assert math.isclose(ctl.value, 0.1 * (1 + 0.2 * 256 / 10000))
    v = ctl.value
    ctl.update(torch.tensor(3.0), n_steps=100)  # err = -0.5 -> -0.2; a tensor KL is accepted
    assert math.isclose(ctl.value, v * (1 - 0.2 * 100 / 10000))
    v = ctl.value
    assert math.isclose(ctl.update(6.6, 1000), v * (1 + 0.1 * 1000 / 10000))
    fixed = FixedKLController(0.05)
    fixed.update(100.0, 10)
    assert fixed.value == 0.05


@settings(max_examples=60, deadline=None)
@given(kl=st.floats(0, 1e6), target=st.floats(1e-3, 100), horizon=st.floats(1, 1e5),
       n_steps=st.integers(0, 10**7), init=st.floats(1e-6, 10))
def test_adaptive_controller_never_turns_negative(kl, target, horizon, n_steps, init):
    """However many steps one update covers against the horizon, the coefficient moves by at
    most 20 % and stays positive; while n_steps <= horizon it is the peers' uncapped update."""
    ctl = AdaptiveKLController(init, target=target, horizon=horizon)
    value = ctl.update(kl, n_steps)
    assert 0.8 * init * (1 - 1e-12) <= value <= 1.2 * init * (1 + 1e-12)
    if n_steps <= horizon:
        err = min(max(kl / target - 1, -0.2), 0.2)
        assert math.isclose(value, init * (1 + err * n_steps / horizon))


@pytest.mark.parametrize("coef", [-0.1, -1e-30, float("-inf")])
def test_negative_kl_coef_is_refused(coef):
    """A negative coefficient would reward divergence from the reference."""
    with pytest.raises(ValueError, match="kl_coef must be"):
        kl_penalized_rewards(torch.randn(2), torch.randn(2, 3), torch.randn(2, 3), torch.ones(2, 3),
                             kl_coef=coef)


BAD_CONTROLLERS = {
    "target-zero": (lambda: AdaptiveKLController(0.1, 0.0, 10), ValueError),
    "horizon-negative": (lambda: AdaptiveKLController(0.1, 6.0, -1), ValueError),
    "init-negative": (lambda: AdaptiveKLController(-0.1, 6.0, 10), ValueError),
    "target-string": (lambda: AdaptiveKLController(0.1, "6", 10), TypeError),
    "update-kl-nan": (lambda: AdaptiveKLController(0.1, 6.0, 10).update(float("nan"), 1), ValueError),
    "update-steps-float": (lambda: AdaptiveKLController(0.1, 6.0, 10).update(1.0, 1.5), TypeError),
    "fixed-inf": (lambda: FixedKLController(float("inf")), ValueError),
}


@pytest.mark.parametrize("make, exc", BAD_CONTROLLERS.values(), ids=BAD_CONTROLLERS.keys())
def test_controller_bad_input(make, exc):
    with pytest.raises(exc):
        make()


# ------------------------------------------------------------------------ bad input
_x = torch.randn(2, 3)
_m = torch.ones(2, 3)
_s = torch.randn(2)

BAD_INPUTS = {
    "ref-wrong-shape": (lambda: kl_penalty(_x, torch.randn(2, 4)), ValueError, "ref_logprobs must have shape (2, 3)"),
    "logprobs-int": (lambda: kl_penalty(_x.long(), _x), TypeError, "logprobs must have dtype"),
    "ref-int": (lambda: kl_penalty(_x, _x.int()), TypeError, "ref_logprobs must have dtype"),
    "logprobs-list": (lambda: kl_penalty([1.0], _x), TypeError, "logprobs must be a torch.Tensor"),
    "estimator-k4": (lambda: kl_penalty(_x, _x, estimator="k4"), ValueError, "estimator must be one of"),
    "estimator-k3++": (lambda: kl_penalty(_x, _x, estimator="k3++"), ValueError, "estimator must be one of"),
    "estimator-uppercase": (lambda: kl_penalty(_x, _x, estimator="K1"), ValueError, "estimator must be one of"),
    "clamp-zero": (lambda: kl_penalty(_x, _x, clamp=0.0), ValueError, "clamp must be a finite number > 0"),
    "clamp-string": (lambda: kl_penalty(_x, _x, clamp="10"), TypeError, "clamp must be a Python float"),
    "log-ratio-clamp-negative": (lambda: kl_penalty(_x, _x, log_ratio_clamp=-1.0), ValueError, "log_ratio_clamp"),
    "backend-unknown": (lambda: kl_penalty(_x, _x, backend="jax"), ValueError, "backend must be one of"),
    "ref-other-device": (lambda: kl_penalty(_x, _x.to("meta")), ValueError, "ref_logprobs must be on cpu"),
    "rewards-mask-wrong-shape": (lambda: kl_penalized_rewards(_s, _x, _x, torch.ones(2, 4), kl_coef=0.1), ValueError,
                                 "mask must have shape"),
    "scores-wrong-shape": (lambda: kl_penalized_rewards(torch.randn(3), _x, _x, _m, kl_coef=0.1), ValueError,
                           "scores must have shape (2,)"),
    "scores-int": (lambda: kl_penalized_rewards(_s.long(), _x, _x, _m, kl_coef=0.1), TypeError,
                   "scores must have dtype"),
    "rewards-logprobs-1d": (lambda: kl_penalized_rewards(_s, _x[0], _x[0], _m[0], kl_coef=0.1), ValueError,
                            "logprobs must have 2"),
    "kl-coef-string": (lambda: kl_penalized_rewards(_s, _x, _x, _m, kl_coef="0.1"), TypeError, "kl_coef must be"),
    "kl-coef-bool": (lambda: kl_penalized_rewards(_s, _x, _x, _m, kl_coef=True), TypeError, "kl_coef must be"),
    "kl-coef-1d-tensor": (lambda: kl_penalized_rewards(_s, _x, _x, _m, kl_coef=torch.ones(1)), TypeError,
                          "0-dim float tensor"),
    "kl-coef-int-tensor": (lambda: kl_penalized_rewards(_s, _x, _x, _m, kl_coef=torch.tensor(1)), TypeError,
                           "0-dim float tensor"),
    "kl-coef-nan": (lambda: kl_penalized_rewards(_s, _x, _x, _m, kl_coef=float("nan")), ValueError,
                    "kl_coef must be finite"),
    "kl-coef-other-device": (lambda: kl_penalized_rewards(_s, _x, _x, _m, kl_coef=torch.tensor(0.1, device="meta")),
                             ValueError, "kl_coef must be on"),
    "rewards-mask-other-device": (lambda: kl_penalized_rewards(_s, _x, _x, _m.to("meta"), kl_coef=0.1), ValueError,
                                  "mask must be on"),
    "score-clip-zero": (lambda: kl_penalized_rewards(_s, _x, _x, _m, kl_coef=0.1, score_clip=0), ValueError,
                        "score_clip"),
    "rewards-estimator-unknown": (lambda: kl_penalized_rewards(_s, _x, _x, _m, kl_coef=0.1, estimator="kl"),
                                  ValueError, "estimator"),
}


@pytest.mark.parametrize("call, exc, words", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input(call, exc, words):
    with pytest.raises(exc, match=re.escape(words)):
        call()


# ---------------------------------------------------------------- importance_weights
# (low, high, log_ratio_clamp): verl's token-level TIS; a band active on both sides; no bound at all
# (the plain ratio); a log-ratio clamp active on random inputs (scale 1: |lr| > 0.7 is common).
WEIGHTS = {"tis2": (None, 2.0, 20.0), "band0.8-1.2": (0.8, 1.2, 20.0), "ratio": (None, None, None),
           "lrclamp0.7": (0.5, 3.0, 0.7)}


def _weights_run(lp, rp, grad, backend, **kw):
    """Value and both gradients of ``sum(grad * importance_weights)``."""
    a = lp.detach().clone().requires_grad_(True)
    b = rp.detach().clone().requires_grad_(True)
    if backend == "reference":
        out = ref.importance_weights(a, b, kw.get("low"), kw.get("high", 2.0), kw.get("log_ratio_clamp", 20.0))
    else:
        out = importance_weights(a, b, backend=backend, **kw)
    (out * grad).sum().backward()
    return out.detach(), a.grad, b.grad


@pytest.mark.parametrize("bounds", WEIGHTS.values(), ids=WEIGHTS.keys())
def test_importance_weights_match_reference(backend, bounds):
    low, high, lrc = bounds
    lp, rp = _pair((5, 37))
    grad = torch.randn(5, 37, device=DEVICE)
    kw = dict(low=low, high=high, log_ratio_clamp=lrc)
    got = _weights_run(lp, rp, grad, backend, **kw)
    want = _weights_run(lp.double(), rp.double(), grad.double(), "reference", **kw)
    assert got[0].dtype == torch.float32 and got[1].dtype == got[2].dtype == torch.float32
    for g, w in zip(got, want):
        assert max_error(g, w) <= 1e-6 * max(w.abs().max().item(), 1.0)
    assert (got[0] >= (low or 0.0)).all() and (high is None or (got[0] <= high).all())
    clipped = (got[0] == low) | (got[0] == high) if low is not None else got[0] == high
    assert (got[1][clipped] == 0).all() and torch.equal(got[1], -got[2])


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=_dtype_id)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"B{s[0]}-T{s[1]}")
def test_importance_weights_shapes_and_dtypes(backend, shape, dtype):
    lp, rp = _pair(shape, dtype, scale=0.5)
    grad = torch.randn(shape, device=DEVICE)
    kw = dict(low=0.5, high=1.5)
    truth = _weights_run(lp.double(), rp.double(), grad.double(), "reference", **kw)
    got = _weights_run(lp, rp, grad, backend, **kw)
    assert got[0].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert got[1].dtype == got[2].dtype == dtype
    assert_same_dtype_close(got, _weights_run(lp, rp, grad, "reference", **kw), truth, dtype)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # the interpreter's numpy
def test_importance_weights_extreme_log_ratios(backend):
    """|lr| = 1e4 (and an old log-prob of -inf): the clamps give exact bounds and zero gradients,
    never NaN; without a log-ratio clamp the plain ratio overflows to inf / underflows to 0."""
    lp = torch.tensor([[0.0, -1e4, -3.0, 0.0]], device=DEVICE)
    rp = torch.tensor([[-1e4, 0.0, -3.0, -math.inf]], device=DEVICE)
    grad = torch.ones_like(lp)
    w, da, db = _weights_run(lp, rp, grad, backend, low=0.5, high=2.0)
    assert w.tolist() == [[2.0, 0.5, 1.0, 2.0]]
    assert da.tolist() == [[0.0, 0.0, 1.0, 0.0]] and db.tolist() == [[-0.0, -0.0, -1.0, -0.0]]
    w, *_ = _weights_run(lp[:, :3], rp[:, :3], grad[:, :3], backend, high=None, log_ratio_clamp=None)
    assert w.tolist() == [[math.inf, 0.0, 1.0]]


def test_importance_weights_empty_one_input_grad_and_strides(backend):
    e = torch.empty(0, 3, device=DEVICE)
    assert importance_weights(e, e, backend=backend).shape == (0, 3)
    lp, rp = _pair((4, 6))
    a = lp.clone().requires_grad_(True)
    importance_weights(a, rp, backend=backend).sum().backward()
    want = ref.importance_weights(lp.double().requires_grad_(True), rp.double(), None, 2.0, 20.0)
    base = _weights_run(lp, rp, torch.ones_like(lp), backend)
    torch.testing.assert_close(a.grad, base[1])
    torch.testing.assert_close(importance_weights(lp.t(), rp.t(), backend=backend), base[0].t())
    torch.testing.assert_close(importance_weights(lp, rp[:1].expand(4, 6), backend=backend),
                               ref.importance_weights(lp, rp[:1].expand(4, 6), None, 2.0, 20.0))
    assert want.shape == (4, 6)


def test_importance_weights_gradcheck_fp64(backend):
    lp, rp = _pair((3, 5), torch.float64, scale=0.3)
    for kw in (dict(low=None, high=None), dict(low=0.2, high=5.0, log_ratio_clamp=3.0)):
        torch.autograd.gradcheck(lambda a, b, kw=kw: importance_weights(a, b, backend=backend, **kw),
                                 (lp.clone().requires_grad_(True), rp.clone().requires_grad_(True)))


def test_importance_weights_cuda_backend_is_refused_or_absent():
    from fastrlhf.backend import BackendUnavailableError

    lp, rp = _pair((2, 3))
    with pytest.raises(BackendUnavailableError, match="cuda"):
        importance_weights(lp, rp, backend="cuda")


def test_importance_weights_opcheck_and_compile():
    lp, rp = (t.cpu() for t in _pair((3, 5)))
    for args in [(lp.clone().requires_grad_(), rp.clone().requires_grad_(), 0.5, 2.0, 20.0, "torch"),
                 (lp, rp, None, None, None, "torch")]:
        torch.library.opcheck(torch.ops.fastrlhf.importance_weights.default, args)
    torch.library.opcheck(torch.ops.fastrlhf.importance_weights_backward.default,
                          (torch.randn(3, 5), lp, rp, None, 2.0, 20.0, True, False, "torch"))
    compiled = torch.compile(lambda a, b: importance_weights(a, b, low=0.5, backend="torch").sum(), fullgraph=True,
                             backend="aot_eager")
    a = lp.clone().requires_grad_(True)
    compiled(a, rp).backward()
    torch.testing.assert_close(a.grad, _weights_run(lp, rp, torch.ones_like(lp), "torch", low=0.5)[1])


_w = torch.zeros(2, 3)
BAD_WEIGHTS = {
    "low-above-high": (dict(low=3.0, high=2.0), (_w, _w), ValueError, "low must be <= high, got low=3.0 and high=2.0"),
    "low-negative": (dict(low=-0.1), (_w, _w), ValueError, "low must be a finite number >= 0, got -0.1"),
    "low-nan": (dict(low=math.nan), (_w, _w), ValueError, "low must be finite, got nan"),
    "high-zero": (dict(high=0), (_w, _w), ValueError, "high must be a finite number > 0, got 0"),
    "clamp-negative": (dict(log_ratio_clamp=-1), (_w, _w), ValueError, "log_ratio_clamp must be a finite number > 0"),
    "shapes": ({}, (_w, torch.zeros(2, 4)), ValueError, "old_logprobs must have shape (2, 3)"),
    "int-logprobs": ({}, (_w.long(), _w), TypeError, "logprobs must have dtype"),
}


@pytest.mark.parametrize("kw, args, exc, words", BAD_WEIGHTS.values(), ids=BAD_WEIGHTS.keys())
def test_importance_weights_bad_input(kw, args, exc, words):
    with pytest.raises(exc, match=re.escape(words)):
        importance_weights(*args, **kw)


# -------------------------------------------------------- torch.library / torch.compile
def test_opcheck_custom_ops():
    lp, rp = _pair((3, 5))
    mask = _holey_mask(3, 5)
    scores = torch.randn(3, device=DEVICE)
    lp, rp = lp.cpu(), rp.cpu()
    for args in [(lp.clone().requires_grad_(), rp.clone().requires_grad_(), "k3+", 1.0, None, "torch"),
                 (lp, rp, "abs", None, 2.0, "torch")]:
        torch.library.opcheck(torch.ops.fastrlhf.kl_penalty.default, args)
    torch.library.opcheck(torch.ops.fastrlhf.kl_penalty_backward.default,
                          (torch.randn(3, 5), lp, rp, "k3", None, None, True, False, "torch"))
    for coef_t in (None, torch.tensor(0.2)):
        torch.library.opcheck(torch.ops.fastrlhf.kl_penalized_rewards.default,
                              (scores.cpu(), lp, rp, mask.cpu(), 0.1, coef_t, "k1", None, None,
                               3.0, None, "torch"))
    cu = torch.tensor([0, 4, 4, 15], dtype=torch.int32)
    torch.library.opcheck(torch.ops.fastrlhf.kl_penalized_rewards.default,
                          (scores.cpu(), lp.reshape(-1), rp.reshape(-1), mask.cpu().reshape(-1), 0.1, None, "k3",
                           None, None, None, cu, "torch"))


def test_torch_compile_fullgraph_no_recompile_for_new_coef():
    def step(scores, lp, rp, mask, coef):
        rewards, kl = kl_penalized_rewards(scores, lp, rp, mask, kl_coef=coef, estimator="k3",
                                           kl_clamp=10.0, backend="torch")
        loss = kl_penalty(lp, rp, estimator="low_var_kl+", backend="torch").mean()
        return rewards, kl, loss

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    scores, lp, rp, mask = (t.cpu() for t in _rewards_case(3, 7))
    lp.requires_grad_(True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for coef in (0.1, 0.2):
            c = torch.tensor(coef)
            r, k, loss = compiled(scores, lp, rp, mask, c)
            want = step(scores, lp, rp, mask, c)
            torch.testing.assert_close(r, want[0])
            torch.testing.assert_close(loss, want[2])
    (g,) = torch.autograd.grad(loss, lp)
    torch.testing.assert_close(g, (lp - rp).detach() / lp.numel())


# ------------------------------------------------------- compiled for real GPUs (no GPU)
def _aot_launches():
    """Launches besides the report's ``kl_*`` cases (fp32, k3): every estimator with bf16 and fp32
    log-probs (fp32 reference), k3 with fp64 (fp64 accumulation), forward past 2**31 elements
    (i64 count), backward straight-through or not; the importance weights in bf16, fp32 and fp64,
    with the gradients of both inputs or of the log-probs only. Rewards with bool, int64 and
    fp32 masks, rows 2**31 elements apart (i64 strides), a tensor coefficient, fp64 log-probs,
    packed sequences, and rows of one token (T, chunks and strides equal to 1 become constexpr 1)."""
    from bench.static.cases import t
    from fastrlhf._numerics import acc_dtype
    from fastrlhf.triton import kl as launchers

    n, B, T = 2**31 + 1024, 8192, 2048
    for dtype, estimators in ((torch.bfloat16, range(4)), (torch.float32, range(4)), (torch.float64, (3,))):
        acc = acc_dtype(t(0, dtype=dtype))
        for est in estimators:
            launchers.kl_penalty_fwd(t(n, dtype=dtype), t(n, dtype=acc), est, 10.0, 20.0, t(n, dtype=acc))
            for straight in (False, True):
                launchers.kl_penalty_bwd(t(B, T, dtype=acc), t(B, T, dtype=dtype), t(B, T, dtype=acc), est, straight,
                                         10.0, 20.0, t(B, T, dtype=dtype), t(0) if straight else t(B, T, dtype=acc))
        launchers.importance_weights_fwd(t(n, dtype=dtype), t(n, dtype=dtype), 0.5, 2.0, 20.0, t(n, dtype=acc))
        for both in (False, True):
            launchers.importance_weights_bwd(t(B, T, dtype=acc), t(B, T, dtype=dtype), t(B, T, dtype=dtype), 0.5, 2.0,
                                             20.0, t(B, T, dtype=dtype), t(B, T, dtype=dtype) if both else t(0))

    def rewards(lp, ref, mask, est, coef_tensor, cu=None):
        acc = acc_dtype(lp)
        rows = cu.numel() - 1 if cu is not None else lp.shape[0]
        launchers.kl_penalized_rewards_fwd(t(rows), lp, ref, mask, 0.05, t() if coef_tensor else None, est, 10.0, 20.0,
                                           float("inf"), t(*lp.shape, dtype=acc), t(*lp.shape, dtype=acc), cu)

    B, T = 4, 65536  # few long rows: each cut into chunks

    def far(dtype=torch.float32):  # rows 2**31 + 16 elements apart
        return t(B, 2**31 + 16, dtype=dtype)[:, :T]

    rewards(far(torch.bfloat16), far(), far(torch.bool), 3, True)
    rewards(t(B, T, dtype=torch.bfloat16), t(B, T), t(B, T, dtype=torch.int64), 0, False)
    rewards(t(B, T, dtype=torch.float64), t(B, T), t(B, T), 1, True)
    rewards(t(B * T), t(B * T), t(B * T, dtype=torch.bool), 3, False, cu=t(B + 1, dtype=torch.int32))
    rewards(t(8192, 1), t(8192, 1), t(8192, 1, dtype=torch.bool), 3, False)


def test_kernels_compile_for_gpus():
    from tests.triton_aot import compile_for_gpus

    compile_for_gpus("kl_*", _aot_launches)
