"""The cuda backend against the reference and against Triton, where CUDA is present.

The parity suites of every op family (tests/test_<family>.py) already run with
``backend="cuda"`` through the ``backend`` fixture once the extension loads. This file adds
what they do not cover: the launchers called directly, layouts that exercise the 16-byte
pack paths (every row misalignment, a gradient with another alignment than the logits),
the current stream, determinism, the C++ input checks, and cross-checks with Triton at
large shapes (V = 151936, N * V > 2**31).
"""

from __future__ import annotations

import math
import re

import pytest
import torch

import fastrlhf
from fastrlhf import _cuda
from fastrlhf.reference import logprobs as ref

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="the cuda backend needs a CUDA device (none here)")
DEVICE = torch.device("cuda")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _dtype_id(d):
    return str(d).removeprefix("torch.")


@pytest.fixture(scope="module", autouse=True)
def _extension():
    ok, why = _cuda.status()
    if not ok:
        pytest.fail(f"CUDA is present but the cuda backend is not: {why}")


class _LogprobsOn:
    """Token log-probs forward and backward of one backend, through the op layer's custom ops
    (which allocate the outputs the launchers fill)."""

    def __init__(self, backend):
        self.backend = backend

    def token_logprobs_fwd(self, logits, labels, temperature, ignore_index, with_entropy):
        return torch.ops.fastrlhf.token_logprobs(logits, labels, temperature, ignore_index, with_entropy,
                                                 False, self.backend)

    def token_logprobs_bwd(self, g_logp, g_ent, logits, labels, stats, ent, temperature, ignore_index,
                           inplace=False):
        args = (g_logp, g_ent, logits, labels, stats, ent, temperature, ignore_index, self.backend)
        if inplace:
            torch.ops.fastrlhf.token_logprobs_backward_(*args)
            return logits
        return torch.ops.fastrlhf.token_logprobs_backward(*args)


def _triton():
    pytest.importorskip("triton")
    return _LogprobsOn("triton")


def _cuda_lp():
    return _LogprobsOn("cuda")


def test_build_info_and_device():
    info = _cuda.build_info()
    major, minor = torch.cuda.get_device_capability()
    assert info["cuda"] and info["torch"] and info["module"]
    assert _cuda._module.check_device(torch.cuda.current_device()) == ""
    assert any(int(a) // 100 == major for a in info["archs"].split(",")), (info, major, minor)


def _call_logprobs():
    x = torch.randn(3, 50, device=DEVICE, requires_grad=True)
    fastrlhf.token_logprobs(x, torch.randint(0, 50, (3,), device=DEVICE), backend="cuda").sum().backward()


def _call_advantages():
    from fastrlhf.ops import advantages as ops_adv

    r, m = torch.randn(2, 9, device=DEVICE), torch.ones(2, 9, device=DEVICE)
    ops_adv.gae(r, r, m, backend="cuda")
    ops_adv.group_advantages(r.reshape(-1), 3, backend="cuda")


def _call_kl():
    lp = torch.randn(2, 9, device=DEVICE, requires_grad=True)
    fastrlhf.kl_penalty(lp, torch.randn(2, 9, device=DEVICE), estimator="k3", backend="cuda").sum().backward()
    fastrlhf.kl_penalized_rewards(torch.randn(2, device=DEVICE), lp.detach(), lp.detach(),
                                  torch.ones(2, 9, device=DEVICE), kl_coef=0.1, backend="cuda")


def _call_ppo():
    lp = torch.randn(2, 9, device=DEVICE, requires_grad=True)
    other, mask = torch.randn(2, 9, device=DEVICE), torch.ones(2, 9, device=DEVICE)
    out = fastrlhf.ppo_policy_loss(lp, other, other, mask, backend="cuda")
    (out[0] if isinstance(out, tuple) else out).backward()


DISPATCH = {
    "logprobs": (_call_logprobs, {"token_logprobs_fwd", "token_logprobs_bwd"}),
    "advantages": (_call_advantages, {"gae_fwd", "group_advantages_fwd"}),
    "kl": (_call_kl, {"kl_penalty_fwd", "kl_penalty_bwd", "kl_penalized_rewards_fwd"}),
    "policy_loss": (_call_ppo, {"ppo_policy_fwd", "ppo_policy_bwd"}),
}


@pytest.mark.parametrize("family", DISPATCH)
def test_public_ops_dispatch_to_the_cuda_launchers(monkeypatch, family):
    """backend="cuda" on the public ops reaches fastrlhf.cuda.<family>, not a fallback."""
    import importlib

    call, expected = DISPATCH[family]
    module = importlib.import_module(f"fastrlhf.cuda.{family}")
    calls = set()
    for name in expected:
        fn = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _fn=fn, _n=name, **k: calls.add(_n) or _fn(*a, **k))
    call()
    assert calls == expected


# ----------------------------------------------------------------- token log-probs
def _inputs(N, V, dtype, scale=4.0, offset=0, ignore_frac=0.2):
    """``N`` rows of ``V`` logits starting ``offset`` elements into their storage (so row
    starts are misaligned when ``offset`` or ``V`` is not a multiple of the 16-byte pack)."""
    store = torch.randn(N * V + offset, device=DEVICE).mul_(scale).to(dtype)
    logits = store[offset:].view(N, V)
    labels = torch.randint(0, V, (N,), device=DEVICE)
    labels[torch.rand(N, device=DEVICE) < ignore_frac] = -100
    labels[0] = V  # out of range: NaN log-prob, -logsumexp gradient
    return logits, labels


def _reference(logits, labels, g_logp, g_ent, temperature):
    """fp64 values and gradient (the loss is NaN where a label is out of range; its gradient
    is still defined: that of -logsumexp)."""
    x = logits.detach().double().requires_grad_(True)
    lp, ent = ref.token_logprobs(x, labels, temperature, return_entropy=True)
    (lp * g_logp + ent * g_ent).sum().backward()
    return lp, ent, x.grad


def _close(got, want, dtype):
    """fp32 math, then one rounding to ``dtype`` (half an ulp: 2**-9 bf16, 2**-12 fp16)."""
    rtol = {torch.float64: 1e-5, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    atol = 1e-5 * want.abs().nan_to_num(0.0).max().item() + 1e-7
    torch.testing.assert_close(got.double(), want.double(), atol=atol, rtol=rtol, equal_nan=True)


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=_dtype_id)
@pytest.mark.parametrize("offset", range(8))
@pytest.mark.parametrize("V", [1, 7, 130, 4099, 32003])
def test_logprobs_every_alignment(V, offset, dtype):
    """Rows starting at each offset from a 16-byte boundary; V = 1 and 7 have no full pack,
    32003 makes every row start elsewhere (fp64: packs of two, a head of 0 or 1). Values and
    gradients against the fp64 reference."""
    cu = _cuda_lp()
    logits, labels = _inputs(5, V, dtype, offset=offset)
    g_logp, g_ent = torch.randn(5, device=DEVICE), torch.randn(5, device=DEVICE)
    lp, ent, stats = cu.token_logprobs_fwd(logits, labels, 0.7, -100, True)
    want_lp, want_ent, want_dx = _reference(logits, labels, g_logp, g_ent, 0.7)
    _close(lp, want_lp, torch.float32)
    _close(ent, want_ent, torch.float32)
    torch.testing.assert_close(stats.double(), ref.row_stats(logits.double(), 0.7), atol=1e-5, rtol=1e-5)
    dx = cu.token_logprobs_bwd(g_logp, g_ent, logits, labels, stats, ent, 0.7, -100)
    assert dx.dtype == dtype and dx.is_contiguous()
    _close(dx, want_dx, dtype)  # dx is aligned, the logits (offset) are not: realigned loads


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=_dtype_id)
def test_logprobs_running_max_paths(dtype):
    """Rows whose max grows at every group of packs (increasing logits: a rescale each
    iteration), only shrinks (decreasing), jumps in the scalar head or tail, sits on every
    thread's share once (a sawtooth), and rows of equal logits (the max never grows after the
    first group): values and gradients against the fp64 reference, with entropy."""
    cu = _cuda_lp()
    V = 20011  # 2502 packs of bf16: 4.9 per thread of 512, so the epilogue runs too
    ramp = torch.linspace(-30.0, 30.0, V, device=DEVICE)
    rows = [ramp, ramp.flip(0), torch.randn(V, device=DEVICE), torch.randn(V, device=DEVICE),
            (torch.arange(V, device=DEVICE) % 4099).float() / 100, torch.full((V,), 2.5, device=DEVICE)]
    rows[2][1] = 40.0  # in the head of a misaligned row
    rows[3][V - 2] = 40.0  # in the tail
    store = torch.empty(len(rows) * V + 3, device=DEVICE)
    logits = store[3:].view(len(rows), V)  # rows at odd offsets from 16-byte boundaries
    logits.copy_(torch.stack(rows))
    logits = logits.to(dtype)
    labels = torch.tensor([V - 1, 0, 1, V - 2, 4098, 17], device=DEVICE)
    g_logp, g_ent = torch.randn(len(rows), device=DEVICE), torch.randn(len(rows), device=DEVICE)
    for temperature in (1.0, 0.3):
        lp, ent, stats = cu.token_logprobs_fwd(logits, labels, temperature, -100, True)
        want_lp, want_ent, want_dx = _reference(logits, labels, g_logp, g_ent, temperature)
        _close(lp, want_lp, torch.float64 if dtype == torch.float64 else torch.float32)
        _close(ent, want_ent, torch.float64 if dtype == torch.float64 else torch.float32)
        dx = cu.token_logprobs_bwd(g_logp, g_ent, logits, labels, stats, ent, temperature, -100)
        _close(dx, want_dx, dtype)
    assert abs(ent[5].item() - math.log(V)) < 1e-4  # equal logits: uniform


def test_logprobs_sliced_odd_vocab_against_triton():
    """The label shift logits[:, :-1] of Qwen's 151655-token vocabulary (odd V): every row
    starts at another offset from a 16-byte boundary than its row of the contiguous gradient,
    so the backward realigns the logits (the shifted kernel); in place it does not. cuda vs
    Triton everywhere and vs the fp64 reference on a few rows."""
    tri, cu = _triton(), _cuda_lp()
    V = 151655
    base = torch.randn(2, 33, V, device=DEVICE).mul_(4).bfloat16()
    x = base[:, :-1]
    labels = torch.randint(0, V, x.shape[:-1], device=DEVICE)
    labels[0, ::5] = -100
    g_logp, g_ent = torch.randn(x.shape[:-1], device=DEVICE), torch.randn(x.shape[:-1], device=DEVICE)
    got = cu.token_logprobs_fwd(x, labels, 0.9, -100, True)
    want = tri.token_logprobs_fwd(x, labels, 0.9, -100, True)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=1e-5)
    dx = cu.token_logprobs_bwd(g_logp, g_ent, x, labels, got[2], got[1], 0.9, -100)
    torch.testing.assert_close(dx, tri.token_logprobs_bwd(g_logp, g_ent, x, labels, got[2], got[1], 0.9, -100))
    rows = (slice(None), slice(0, 3))
    _, _, want_dx = _reference(x[rows].reshape(-1, V), labels[rows].reshape(-1), g_logp[rows].reshape(-1),
                               g_ent[rows].reshape(-1), 0.9)
    _close(dx[rows].reshape(-1, V), want_dx, torch.bfloat16)
    work = base.clone()
    inplace = cu.token_logprobs_bwd(g_logp, g_ent, work[:, :-1], labels, got[2], got[1], 0.9, -100, inplace=True)
    torch.testing.assert_close(inplace, dx)
    assert torch.equal(work[:, -1], base[:, -1])  # the row outside the view is untouched


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_logprobs_inplace_and_strided(dtype):
    """The label shift x[..., :-1, :] (two strides, read and written in place) and views with
    three separate strides (worked on contiguous copies, written back): values, and an
    in-place backward that writes the view and nothing else."""
    cu = _cuda_lp()
    base = (torch.randn(4, 5, 6, 201, device=DEVICE) * 3).to(dtype)
    makers = (lambda b: b[:, :, :-1], lambda b: b.transpose(0, 1), lambda b: b[::2, 1::2, ::2])
    for make in makers:
        view = make(base)
        labels = torch.randint(0, 201, view.shape[:-1], device=DEVICE, dtype=torch.int32)
        g = torch.randn(view.shape[:-1], device=DEVICE)
        lp, ent, stats = cu.token_logprobs_fwd(view, labels, 1.0, -100, True)
        want = cu.token_logprobs_fwd(view.contiguous(), labels, 1.0, -100, True)
        for a, b in zip((lp, ent, stats), want):  # other row alignments: other summation order
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        dx = cu.token_logprobs_bwd(g, g, view.contiguous(), labels, stats, ent, 1.0, -100)
        torch.testing.assert_close(cu.token_logprobs_bwd(g, g, view, labels, stats, ent, 1.0, -100), dx)
        work = base.clone()
        inplace_view = make(work)
        out = cu.token_logprobs_bwd(g, g, inplace_view, labels, stats, ent, 1.0, -100, inplace=True)
        assert out is inplace_view
        torch.testing.assert_close(inplace_view, dx)
        untouched = torch.ones_like(work, dtype=torch.bool)
        make(untouched).fill_(False)
        assert torch.equal(work[untouched], base[untouched])  # nothing outside the view written


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_dtype_id)
def test_logprobs_nan_inf_and_all_masked_rows_follow_the_reference(dtype):
    """A NaN logit, a +inf logit and a row of only -inf give NaN log-prob and entropy, as the
    reference does (a clamp with fmin / fmax would turn them into a plausible 0); an ignored
    row stays 0 whatever its logits hold."""
    cu = _cuda_lp()
    V = 4099  # odd: rows start at varying offsets; the last column is in a scalar tail
    logits = torch.randn(6, V, device=DEVICE).to(dtype)
    logits[0, 1000] = float("nan")
    logits[1, 5] = float("inf")
    logits[2] = float("-inf")
    logits[4, V - 1] = float("nan")
    labels = torch.tensor([1, 2, 4, 0, -100, 17], device=DEVICE)
    lp, ent, _ = cu.token_logprobs_fwd(logits, labels, 0.8, -100, True)
    want_lp, want_ent = ref.token_logprobs(logits.double(), labels, 0.8, return_entropy=True)
    assert lp[:3].isnan().all() and ent[:3].isnan().all()
    assert lp[4] == 0 and ent[4] == 0
    torch.testing.assert_close(lp.double(), want_lp, atol=1e-4, rtol=1e-5, equal_nan=True)
    torch.testing.assert_close(ent.double(), want_ent, atol=1e-4, rtol=1e-5, equal_nan=True)


def test_logprobs_without_entropy_and_int32_labels():
    cu = _cuda_lp()
    logits, labels = _inputs(33, 2049, torch.bfloat16)
    lp, ent, stats = cu.token_logprobs_fwd(logits, labels.int(), 1.3, -100, False)
    assert ent.numel() == 0
    want = ref.token_logprobs(logits.double(), labels, 1.3)
    _close(lp, want, torch.float32)
    g = torch.randn(33, device=DEVICE)
    dx = cu.token_logprobs_bwd(g, None, logits, labels.int(), stats, ent, 1.3, -100)
    _close(dx, _reference(logits, labels, g, torch.zeros_like(g), 1.3)[2], torch.bfloat16)


def test_logprobs_current_stream_and_determinism():
    cu = _cuda_lp()
    logits, labels = _inputs(257, 32000, torch.bfloat16)
    first = cu.token_logprobs_fwd(logits, labels, 1.0, -100, True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        again = cu.token_logprobs_fwd(logits, labels, 1.0, -100, True)
        dx1 = cu.token_logprobs_bwd(torch.ones(257, device=DEVICE), None, logits, labels, again[2], again[1], 1.0, -100)
    torch.cuda.current_stream().wait_stream(side)
    dx2 = cu.token_logprobs_bwd(torch.ones(257, device=DEVICE), None, logits, labels, first[2], first[1], 1.0, -100)
    for a, b in zip(first + (dx2,), again + (dx1,)):
        assert torch.equal(a.nan_to_num(), b.nan_to_num())  # same bits, run to run


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_logprobs_against_triton(dtype):
    tri, cu = _triton(), _cuda_lp()
    logits, labels = _inputs(300, 32003, dtype, scale=8.0)
    g_logp, g_ent = torch.randn(300, device=DEVICE), torch.randn(300, device=DEVICE)
    got = cu.token_logprobs_fwd(logits, labels, 0.6, -100, True)
    want = tri.token_logprobs_fwd(logits, labels, 0.6, -100, True)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5, equal_nan=True)
    _, ent, stats = want
    dx = cu.token_logprobs_bwd(g_logp, g_ent, logits, labels, stats, ent, 0.6, -100)
    dx_t = tri.token_logprobs_bwd(g_logp, g_ent, logits, labels, stats, ent, 0.6, -100)
    torch.testing.assert_close(dx, dx_t)  # the dtype's default tolerance: at most a rounding apart


def test_logprobs_bad_input_in_cpp():
    """The C++ checks behind the launchers: clear ValueError/TypeError naming the argument."""
    op = torch.ops.fastrlhf_cuda.token_logprobs_fwd
    logits = torch.randn(2, 5, device=DEVICE)
    labels = torch.zeros(2, dtype=torch.long, device=DEVICE)
    out = torch.empty(2, device=DEVICE)
    stats = torch.empty(2, 2, device=DEVICE)
    with pytest.raises(ValueError, match="logits must be a CUDA tensor"):
        op(logits.cpu(), labels, 1.0, -100, False, out, out, stats)
    with pytest.raises(TypeError, match="labels must have dtype int32/int64, got float32"):
        op(logits, labels.float(), 1.0, -100, False, out, out, stats)
    with pytest.raises(TypeError, match="stats must have dtype float32, got float16"):
        op(logits, labels, 1.0, -100, False, out, out, stats.half())
    with pytest.raises(ValueError, match=re.escape("stats must have shape [2, 2], got [2]")):
        op(logits, labels, 1.0, -100, False, out, out, out)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        op(logits, labels, 0.0, -100, False, out, out, stats)


# ---------------------------------------------------------------- large shapes
def _free_gib():
    free, _ = torch.cuda.mem_get_info()
    return free / 2**30


def test_logprobs_large_vocab_past_2_to_31_against_triton():
    """Qwen's V = 151936 with N * V > 2**31 bf16 logits: the last rows start past 2**31
    elements. cuda vs Triton everywhere; vs the fp64 reference on the first and last rows."""
    if _free_gib() < 24:
        pytest.skip(f"needs ~24 GiB of free GPU memory, {_free_gib():.0f} GiB free")
    tri, cu = _triton(), _cuda_lp()
    V, N = 151936, 14200
    assert N * V > 2**31
    logits = torch.empty(N, V, device=DEVICE, dtype=torch.bfloat16)
    for i in range(0, N, 1024):  # chunked: no fp32 [N, V] temporary
        logits[i:i + 1024].normal_(0, 3)
    labels = torch.randint(0, V, (N,), device=DEVICE)
    labels[::7] = -100
    g_logp, g_ent = torch.randn(N, device=DEVICE), torch.randn(N, device=DEVICE)

    got = cu.token_logprobs_fwd(logits, labels, 0.9, -100, True)
    want = tri.token_logprobs_fwd(logits, labels, 0.9, -100, True)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=1e-5)
    for rows in (slice(0, 64), slice(N - 64, N)):
        lp, ent = ref.token_logprobs(logits[rows].double(), labels[rows], 0.9, return_entropy=True)
        torch.testing.assert_close(got[0][rows].double(), lp, atol=2e-4, rtol=1e-5)
        torch.testing.assert_close(got[1][rows].double(), ent, atol=2e-4, rtol=1e-5)

    dx = cu.token_logprobs_bwd(g_logp, g_ent, logits, labels, got[2], got[1], 0.9, -100)
    dx_t = tri.token_logprobs_bwd(g_logp, g_ent, logits, labels, got[2], got[1], 0.9, -100,
                                  inplace=True)  # into the logits: saves 4 GiB
    assert dx_t is logits
    for i in range(0, N, 1024):
        torch.testing.assert_close(dx[i:i + 1024], dx_t[i:i + 1024])


# --------------------------------------------------------------------- advantages
def _mask(B, T, kind, dtype=torch.bool):
    """Holes inside rows, a fully masked row, and masks of several dtypes."""
    m = torch.rand(B, T, device=DEVICE) < 0.7
    if kind == "prompt+pad":
        m[:] = True
        m[:, : T // 3] = False
        m[:, T - T // 4:] = False
    if B > 1:
        m[1] = False
    return m.to(dtype)


def _gae(launchers, rewards, values, mask, gamma, lam, skip, block=None, tiles=None):
    """``(advantages, returns)`` from ``launchers.gae_fwd`` into outputs allocated as the op does."""
    from fastrlhf.ops.advantages import gae_outputs

    out = gae_outputs(rewards, values)
    launchers.gae_fwd(rewards, values, mask, gamma, lam, skip, *out, block=block, tiles_per_chunk=tiles)
    return out


@pytest.mark.parametrize("skip", [True, False], ids=["skip", "zero"])
@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                    (torch.float64, torch.float64)], ids=lambda d: "-".join(map(_dtype_id, d)))
@pytest.mark.parametrize("B,T", [(3, 1), (4, 37), (2, 2051), (3, 4099)])
def test_gae_against_reference(B, T, dtypes, skip):
    """T = 2051 and 4099 span several tiles; with this small batch the launcher cuts them into
    chunks (forced layouts: test_gae_forced_chunks_against_reference)."""
    from fastrlhf.cuda import advantages as cu
    from fastrlhf.reference import advantages as ref_adv

    holes = "skip" if skip else "zero"
    rewards = torch.randn(B, T + 1, device=DEVICE).to(dtypes[0])[:, :-1]  # a row stride != T
    values = torch.randn(B, T, device=DEVICE).to(dtypes[1])
    for mask_dtype in (torch.bool, torch.float32, torch.int64):
        mask = _mask(B, T, "holes", mask_dtype)
        adv, ret = _gae(cu, rewards, values, mask, 0.99, 0.95, skip)
        want_adv, want_ret = ref_adv.gae(rewards.double(), values.double(), mask, 0.99, 0.95, holes)
        tol = 1e-10 if dtypes[0] == torch.float64 else 1e-4
        torch.testing.assert_close(adv.double(), want_adv, atol=tol, rtol=tol)
        torch.testing.assert_close(ret.double(), want_ret, atol=tol, rtol=tol)
        assert adv.dtype == ret.dtype == (torch.float64 if dtypes[0] == torch.float64 else torch.float32)
        returns, empty = _gae(cu, rewards, None, mask, 0.97, 1.0, skip)
        assert empty.numel() == 0
        want = ref_adv.discounted_returns(rewards.double(), mask, 0.97, holes)
        torch.testing.assert_close(returns.double(), want, atol=tol, rtol=tol)


@pytest.mark.parametrize("skip", [True, False], ids=["skip", "zero"])
@pytest.mark.parametrize("T", [2048, 1000, 4096, 2051])
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32, torch.int64, torch.float16],
                         ids=_dtype_id)
def test_gae_vector_layouts_and_paths_against_reference(T, mask_dtype, skip):
    """Contiguous fp32 rewards and values with T a multiple of 4 take the 16-byte loads (masks
    of 1, 4 and 8 bytes; a 2-byte mask and T = 2051 the scalar loads); rows of prompt +
    response + padding (one run: the fast path in skip mode), all valid, all masked, holes
    (the general path) and a single valid token, in one tile (T <= 2048) or several, whole rows
    and the launcher's chunks (B = 7 is a small batch); same bits run to run."""
    from fastrlhf.cuda import advantages as cu
    from fastrlhf.reference import advantages as ref_adv

    B = 7
    g = torch.Generator(device=DEVICE).manual_seed(T)
    rewards = torch.randn(B, T, device=DEVICE, generator=g)
    values = torch.randn(B, T, device=DEVICE, generator=g)
    mask = torch.zeros(B, T, dtype=torch.bool, device=DEVICE)
    mask[0, T // 5: T - T // 7] = True  # prompt + response + padding
    mask[1] = True
    mask[3] = torch.rand(T, device=DEVICE, generator=g) < 0.7  # holes
    mask[4, T // 2] = True  # one valid token
    mask[5] = True
    mask[5, T // 3] = False  # one hole
    mask[6, : T // 2] = True  # a valid prefix: trailing padding
    rewards = rewards.masked_fill(~mask, float("nan"))  # masked inputs never reach an output
    holes = "skip" if skip else "zero"
    m = mask.to(mask_dtype)
    for block, tiles in ((None, None), (128, 1), (512, 2)):
        got = _gae(cu, rewards, values, m, 0.99, 0.95, skip, block, tiles)
        again = _gae(cu, rewards, values, m, 0.99, 0.95, skip, block, tiles)
        want = ref_adv.gae(rewards.double(), values.double(), mask, 0.99, 0.95, holes)
        for a, b, w in zip(got, again, want):
            assert torch.equal(a, b)
            torch.testing.assert_close(a.double(), w, atol=1e-4, rtol=1e-4)
        returns, _ = _gae(cu, rewards, None, m, 0.97, 1.0, skip, block, tiles)
        torch.testing.assert_close(returns.double(), ref_adv.discounted_returns(rewards.double(), mask, 0.97, holes),
                                   atol=1e-4, rtol=1e-4)


def test_gae_long_rows_against_closed_form_and_triton():
    """T = 65,536 with holes. With gamma = lam = 1 the advantage telescopes: A_t = (sum of the
    valid rewards from t on) - V_t, a reverse cumsum; then cuda vs Triton at gamma, lam < 1."""
    from fastrlhf.cuda import advantages as cu

    B, T = 3, 65536
    rewards = torch.randn(B, T, device=DEVICE) * 0.01
    values = torch.randn(B, T, device=DEVICE)
    mask = _mask(B, T, "holes")
    valid = mask.double()
    tail = (rewards.double() * valid).flip(-1).cumsum(-1).flip(-1)
    adv, ret = _gae(cu, rewards, values, mask, 1.0, 1.0, True)
    torch.testing.assert_close(adv.double(), (tail - values.double()) * valid, atol=2e-3, rtol=1e-4)
    torch.testing.assert_close(ret.double(), tail * valid, atol=2e-3, rtol=1e-4)
    tri = pytest.importorskip("fastrlhf.triton.advantages")
    for skip in (True, False):
        got = _gae(cu, rewards, values, mask, 0.999, 0.95, skip)
        want = _gae(tri, rewards, values, mask, 0.999, 0.95, skip)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_gae_plan():
    """Whole rows (no summary launch) when the batch fills the GPU or a row is one tile; a
    long row of a small batch is cut into many chunks; every plan respects the kernel's limits."""
    from fastrlhf.cuda import advantages as cu

    assert cu.plan(8192, 2048) == (512, 2048, 1)
    assert cu.plan(1, 2048) == (512, 2048, 1)
    assert cu.plan(1, 65536) == (128, 512, 128)
    assert cu.plan(1, 400, 128, 1) == (32, 128, 4)  # forced: tiles of 128, chunks of one tile
    assert cu.plan(1, 400, 16, None)[:2] == (32, 128)  # tiles below 128 positions round up
    for B, T in [(1, 1), (3, 37), (1, 4096), (8, 65536), (64, 100_000), (1, 2**22), (1023, 2049),
                 (100_000, 3), (1, 5000)]:
        for block, tiles in [(None, None), (128, 1), (300, 2), (2048, None)]:
            threads, chunk, n_chunks = cu.plan(B, T, block, tiles)
            assert threads in (32, 64, 128, 256, 512) and (n_chunks == 1 or chunk % (4 * threads) == 0)
            assert 1 <= n_chunks <= cu.MAX_CHUNKS and (n_chunks - 1) * chunk < T <= n_chunks * chunk


def _gae_case(B, T, chunk, seed=0):
    """fp32 rewards (NaN under the mask), bf16 values, and a mask with holes on both sides of
    every chunk boundary, a fully masked chunk (row 2), a fully masked row (row 1) and the
    last position masked."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    mask = torch.rand(B, T, device=DEVICE, generator=g) < 0.7
    for lo in range(chunk, T, chunk):
        mask[0, lo - 1:lo + 1] = False
    mask[1] = False
    mask[2, chunk:2 * chunk] = False
    mask[:, -1] = False
    rewards = torch.randn(B, T, device=DEVICE, generator=g).masked_fill(~mask, float("nan"))
    values = torch.randn(B, T, device=DEVICE, generator=g).to(torch.bfloat16)
    return rewards, values, mask


@pytest.mark.parametrize("skip", [True, False], ids=["skip", "zero"])
@pytest.mark.parametrize("with_values", [True, False], ids=["gae", "returns"])
@pytest.mark.parametrize("block, tiles, chunks", [(128, 1, 33), (128, 3, 11), (256, 2, 9), (2048, 1, 3),
                                                 (128, 10**6, 1)])
def test_gae_forced_chunks_against_reference(block, tiles, chunks, with_values, skip):
    """Rows of 4099 cut into 33, 11, 9 and 3 chunks of one or more tiles (the layout of
    B = 1, T = 65,536 at a small scale; the last chunk partial), and one chunk of 33 tiles
    (whole rows, block carry only). fp32 math on fp32/bf16 inputs with a bool mask, fp64 math
    with a float mask whose holes hold -0.0; same bits run to run."""
    from fastrlhf.cuda import advantages as cu
    from fastrlhf.reference import advantages as ref_adv

    B, T = 3, 4099
    _, chunk, n_chunks = cu.plan(B, T, block, tiles)
    assert n_chunks == chunks
    rewards, values, mask = _gae_case(B, T, min(chunk, 1000))
    gamma, lam, holes = 0.99, (0.95 if with_values else 1.0), "skip" if skip else "zero"
    if with_values:
        want = ref_adv.gae(rewards.double(), values.double(), mask, gamma, lam, holes)
    else:
        want = (ref_adv.discounted_returns(rewards.double(), mask, gamma, holes),)
    float_mask = torch.where(mask, 1.0, -0.0)
    for r, v, m, tol in ((rewards, values, mask, 1e-4),
                         (rewards.double(), values.double(), float_mask, 1e-10)):
        got = _gae(cu, r, v if with_values else None, m, gamma, lam, skip, block, tiles)
        again = _gae(cu, r, v if with_values else None, m, gamma, lam, skip, block, tiles)
        for a, b, w in zip(got, again, want):
            assert torch.equal(a, b)  # fixed composition order: deterministic
            torch.testing.assert_close(a.double(), w, atol=tol, rtol=tol)


def test_gae_one_long_row_is_chunked():
    """B = 1, T = 65,536 (issue 5's shape): the launcher's own plan cuts the row into 128
    chunks scanned by as many blocks. Holes around chunk boundaries and fully masked chunks;
    against the fp64 reference (run on the CPU: a 65,536-step loop) and Triton."""
    from fastrlhf.cuda import advantages as cu
    from fastrlhf.reference import advantages as ref_adv

    T = 65536
    _, chunk, n_chunks = cu.plan(1, T)
    assert n_chunks == 128
    rewards, values, mask = (x[:1] for x in _gae_case(3, T, chunk, seed=1))  # row 0: boundary holes
    rewards, mask = rewards * 0.1, mask.clone()
    mask[:, 5 * chunk:9 * chunk] = False  # four fully masked chunks
    r64, v64, m = rewards.cpu().double(), values.cpu().double(), mask.cpu()
    cases = {(True, 0.95): values, (False, 1.0): None}  # (skip, lam): values, or None (returns)
    got = {}
    for (skip, lam), v in cases.items():
        holes = "skip" if skip else "zero"
        got[skip, lam] = _gae(cu, rewards, v, mask, 0.999, lam, skip)
        want = (ref_adv.gae(r64, v64, m, 0.999, lam, holes) if v is not None
                else (ref_adv.discounted_returns(r64, m, 0.999, holes),))
        for a, w in zip(got[skip, lam], want):
            torch.testing.assert_close(a.double().cpu(), w, atol=1e-4, rtol=1e-4)
    tri = pytest.importorskip("fastrlhf.triton.advantages")
    for (skip, lam), v in cases.items():
        for a, b in zip(got[skip, lam], _gae(tri, rewards, v, mask, 0.999, lam, skip)):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_gae_bad_input_in_cpp():
    op = torch.ops.fastrlhf_cuda.gae_fwd
    r = torch.randn(2, 300, device=DEVICE)
    m = torch.ones(2, 300, device=DEVICE)
    out, maps = torch.empty_like(r), torch.empty(2, 3, 5, device=DEVICE)
    with pytest.raises(ValueError, match=re.escape("threads must be a power of two in [32, 512], got 48")):
        op(r, r, m, 0.99, 0.95, True, 48, 128, out, out, maps)
    with pytest.raises(ValueError, match="chunk must be >= 1, got 0"):
        op(r, r, m, 0.99, 0.95, True, 32, 0, out, out, maps)
    with pytest.raises(ValueError, match=re.escape("maps must have shape [2, 5, 5], got [2, 3, 5]")):
        op(r, r, m, 0.99, 0.95, True, 32, 64, out, out, maps)
    with pytest.raises(TypeError, match="maps must have dtype float32, got float64"):
        op(r, r, m, 0.99, 0.95, True, 32, 128, out, out, maps.double())


@pytest.mark.parametrize("method", ["grpo", "rloo", "dr_grpo"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=_dtype_id)
def test_group_advantages_against_reference(method, dtype):
    from fastrlhf.reference import advantages as ref_adv

    for n_groups, G in [(7, 1), (5, 2), (3, 16), (2, 1000), (1, 4099)]:
        scores = (torch.randn(n_groups * G, device=DEVICE) * 3).to(dtype)
        scores[:G] = 0.5  # a group of equal scores (exact sums): 0, for grpo 0 / eps
        got = torch.ops.fastrlhf.group_advantages(scores, G, method, 1e-6, "cuda")
        want = ref_adv.group_advantages(scores.double(), G, method, 1e-6)
        tol = 1e-10 if dtype == torch.float64 else 2e-5
        torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)


# ----------------------------------------------------------------------------- kl
ESTIMATORS = ["k1", "abs", "k2", "k3", "k3+", "low_var_kl"]


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("clamps", [(None, None), (10.0, 20.0), (0.5, 1.0)],
                         ids=lambda c: f"clamp{c[0]}-lr{c[1]}")
def test_kl_penalty_against_reference(estimator, clamps):
    from fastrlhf.reference import kl as ref_kl

    op, bwd = torch.ops.fastrlhf.kl_penalty, torch.ops.fastrlhf.kl_penalty_backward
    logp = torch.randn(4, 513, device=DEVICE) * 3
    ref_lp = (torch.randn(4, 513, device=DEVICE) * 3).to(torch.bfloat16)  # mixed dtypes
    logp[0, :8] = torch.tensor([0.0, 30.0, -30.0, 1e-7, -1e-7, 25.0, -25.0, 5.0])
    grad = torch.randn(4, 513, device=DEVICE)
    got = op(logp, ref_lp, estimator, *clamps, "cuda")
    want = ref_kl.kl_penalty(logp.double(), ref_lp.double(), estimator, *clamps)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    dlogp, dref = bwd(grad, logp, ref_lp, estimator, *clamps, True, True, "cuda")
    want_lp, want_ref = ref_kl.kl_penalty_backward(grad.double(), logp.double(), ref_lp.double(),
                                                   estimator, *clamps)
    assert dlogp.dtype == torch.float32 and dref.dtype == torch.bfloat16
    torch.testing.assert_close(dlogp.double(), want_lp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dref.double(), want_ref, atol=1e-2, rtol=8e-3)
    only_ref = bwd(grad, logp, ref_lp, estimator, *clamps, False, True, "cuda")
    assert only_ref[0].numel() == 0 and torch.equal(only_ref[1], dref)


@pytest.mark.parametrize("estimator", ["k1", "k3"])
@pytest.mark.parametrize("T", [1, 7, 300, 5000])
def test_kl_penalized_rewards_against_reference(estimator, T):
    """Holes, a fully masked row (no score), a score at the last valid token, clips, and the
    coefficient as a float or a 0-dim tensor."""
    from fastrlhf.reference import kl as ref_kl

    B = 4
    logp = torch.randn(B, T + 3, device=DEVICE)[:, 1:-2]  # read in place, row stride T + 3
    ref_lp = torch.randn(B, T, device=DEVICE).half()
    scores = torch.randn(B, device=DEVICE) * 20
    mask = _mask(B, T, "holes", torch.float32)
    for coef, coef_t in ((0.05, None), (0.0, torch.tensor(0.2, device=DEVICE, dtype=torch.float64))):
        got = torch.ops.fastrlhf.kl_penalized_rewards(scores, logp, ref_lp, mask, coef, coef_t, estimator,
                                                      10.0, 20.0, 5.0, None, "cuda")
        want = ref_kl.kl_penalized_rewards(scores.double(), logp.double(), ref_lp.double(), mask,
                                           coef if coef_t is None else coef_t.double(), estimator,
                                           10.0, 20.0, 5.0)
        for a, b in zip(got, want):
            torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=1e-5)
        assert (got[0][1] == 0).all()  # the fully masked row gets no score


# ---------------------------------------------------------------------------- ppo
POLICY_CLIPS = [(0.2, 0.2, None, None), (0.2, 0.28, 3.0, 20.0), (0.1, 0.1, 1.5, 0.5)]
AGGS = ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("value", [False, True], ids=["policy", "value"])
def test_ppo_losses_against_triton(value, agg):
    """Both backends on the same inputs (NaN under the mask, mixed dtypes, a masked row): loss,
    statistics and gradient agree, with local and global counts."""
    pytest.importorskip("triton")
    B, T = 6, 1501
    x = torch.randn(B, T, device=DEVICE) * 0.3
    old = (x + torch.randn(B, T, device=DEVICE) * 0.2).to(torch.bfloat16)
    y = torch.randn(B, T, device=DEVICE)
    mask = _mask(B, T, "prompt+pad")
    x = x.masked_fill(~mask, float("nan"))
    if value:
        cases = [{"clip": None}, {"clip": 0.2}]
    else:
        cases = [dict(zip(("clip_low", "clip_high", "dual_clip", "log_ratio_clamp"), c)) for c in POLICY_CLIPS]
    for kw in cases:
        for counts in ({}, {"global_tokens": torch.tensor(37.0, device=DEVICE), "global_seqs": 37}):
            results = []
            for backend in ("cuda", "triton"):
                leaf = x.clone().requires_grad_(True)
                fn = fastrlhf.ppo_value_loss if value else fastrlhf.ppo_policy_loss
                loss, stats = fn(leaf, old, y, mask, agg=agg, backend=backend, **kw, **counts)
                (loss * 1.7).backward()
                results.append((loss, stats, leaf.grad))
            (loss, stats, dx), (loss_t, stats_t, dx_t) = results
            torch.testing.assert_close(loss, loss_t, atol=1e-5, rtol=1e-5)
            for k in stats:
                torch.testing.assert_close(stats[k], stats_t[k], atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(dx, dx_t, atol=1e-7, rtol=1e-5)
            assert (dx[~mask] == 0).all() and torch.isfinite(dx).all()


@pytest.mark.parametrize("n", [4096, 4097, 4098, 4099, 3])
def test_kl_penalty_group_loads_and_tails(n):
    """fp32 log-probs of the same dtype take the 4-token group loads: n = 4096 + 0..3 (the
    last n % 4 tokens one per thread), forward and both gradients, k3 with clamps; an offset
    view (not 16-byte aligned) takes the scalar loads and gives the same values."""
    from fastrlhf.reference import kl as ref_kl

    op, bwd = torch.ops.fastrlhf.kl_penalty, torch.ops.fastrlhf.kl_penalty_backward
    store = torch.randn(2, n + 1, device=DEVICE) * 2
    logp, ref_lp = store[0, :n], store[1, :n]
    grad = torch.randn(n, device=DEVICE)
    for lp, rf in ((logp, ref_lp), (store[0, 1:], store[1, 1:])):
        got = op(lp, rf, "k3", 10.0, 20.0, "cuda")
        torch.testing.assert_close(got.double(), ref_kl.kl_penalty(lp.double(), rf.double(), "k3", 10.0, 20.0),
                                   atol=1e-5, rtol=1e-5)
        dlogp, dref = bwd(grad, lp, rf, "k3", 10.0, 20.0, True, True, "cuda")
        want_lp, want_ref = ref_kl.kl_penalty_backward(grad.double(), lp.double(), rf.double(), "k3", 10.0, 20.0)
        torch.testing.assert_close(dlogp.double(), want_lp, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(dref.double(), want_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32, torch.int64, torch.float16], ids=_dtype_id)
@pytest.mark.parametrize("T", [4, 2048, 2051])
def test_kl_rewards_group_loads_against_reference(T, mask_dtype):
    """Contiguous fp32 inputs with T % 4 == 0 read 4 tokens per load (masks of 1, 4 and 8
    bytes; a 2-byte mask and T = 2051 the scalar loads), NaN under the mask; the score lands on
    the last valid token, also when that token is the last of a group of 4."""
    from fastrlhf.reference import kl as ref_kl

    B = 5
    logp = torch.randn(B, T, device=DEVICE)
    ref_lp = torch.randn(B, T, device=DEVICE)
    mask = _mask(B, T, "holes")
    mask[0, :] = True
    mask[2, :] = False
    mask[2, : max(T // 2, 1)] = True  # the last valid token ends a group when T // 2 % 4 == 0
    logp = logp.masked_fill(~mask, float("nan"))
    scores = torch.randn(B, device=DEVICE) * 3
    m = mask.to(mask_dtype)
    got = torch.ops.fastrlhf.kl_penalized_rewards(scores, logp, ref_lp, m, 0.05, None, "k3", 10.0, 20.0, 5.0, None, "cuda")
    want = ref_kl.kl_penalized_rewards(scores.double(), logp.double().nan_to_num(0.0), ref_lp.double(), mask,
                                       0.05, "k3", 10.0, 20.0, 5.0)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32, torch.int64], ids=_dtype_id)
@pytest.mark.parametrize("B, T", [(6, 1501), (3, 4096), (1000, 3), (7, 1)])
def test_ppo_group_loads_against_reference(B, T, mask_dtype, agg):
    """All-fp32 PPO inputs take the 4-token group loads (masks of 1, 4 and 8 bytes), with the
    token count not a multiple of 4 (the tail) and rows of 1, 3 and 4096 tokens (the
    division-free row walk of seq-mean-token-mean crossing rows inside a group); NaN under the
    mask; loss, statistics and gradient against the fp64 reference for both losses."""
    from fastrlhf.reference import policy_loss as ref_ppo

    x = torch.randn(B, T, device=DEVICE) * 0.3
    old = x + torch.randn(B, T, device=DEVICE) * 0.2
    y = torch.randn(B, T, device=DEVICE)
    mask = _mask(B, T, "holes") if T > 1 else torch.rand(B, T, device=DEVICE) < 0.6
    x = x.masked_fill(~mask, float("nan"))
    m = mask.to(mask_dtype)
    for value in (False, True):
        leaf = x.clone().requires_grad_(True)
        kw = {"clip": 0.2} if value else {"clip_low": 0.2, "clip_high": 0.28, "dual_clip": 3.0}
        fn = fastrlhf.ppo_value_loss if value else fastrlhf.ppo_policy_loss
        loss, stats = fn(leaf, old, y, m, agg=agg, backend="cuda", **kw)
        (loss * 1.7).backward()
        ref_leaf = x.double().nan_to_num(0.0).requires_grad_(True)
        ref_fn = ref_ppo.ppo_value_loss if value else ref_ppo.ppo_policy_loss
        want, want_stats = ref_fn(ref_leaf, old.double(), y.double(), mask, agg=agg, **kw)
        (want * 1.7).backward()
        torch.testing.assert_close(loss.double(), want, atol=1e-5, rtol=1e-5)
        for k in stats:
            torch.testing.assert_close(stats[k].double(), want_stats[k].double(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(leaf.grad.double(), ref_leaf.grad, atol=1e-6, rtol=1e-5)
        assert (leaf.grad[~mask] == 0).all()
