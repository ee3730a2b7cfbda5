"""gae / discounted_returns / masked_whiten / group_advantages against the naive reference."""

import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastrlhf.ops.advantages import discounted_returns, gae, gae_outputs, group_advantages, masked_whiten
from fastrlhf.reference import advantages as ref
from tests.conftest import BACKENDS, DEVICE, family_backends

# Kernel backends with launchers for this family (the cuda backend has none for it yet).


@pytest.fixture(params=family_backends("advantages"))
def backend(request):
    """Overrides the shared fixture: the backends this family runs on."""
    return request.param


def _dt(d):
    return str(d).removeprefix("torch.")


# Rows: one token; a prime length (nothing lines up with tiles or warps); a few short rows.
GRID = [(1, 1), (3, 37), (5, 50)]
# gamma/lam: no discount; the usual pair; 0 (advantage = TD error r - V); 1/1 (Monte-Carlo return
# minus V). Each with an input dtype (fp32 and bf16 inputs both accumulate in fp32).
GAMMA_LAM_DTYPE = [(1.0, 0.95, torch.float32), (0.99, 0.95, torch.bfloat16), (0.0, 0.0, torch.float32),
                   (1.0, 1.0, torch.bfloat16)]


def _mask(B, T, kind="mixed"):
    """Row 0: random holes; row 1: fully masked; row 2: valid prefix (EOS padding);
    row 3: holes and a masked prefix/suffix; further rows random."""
    m = torch.rand(B, T, device=DEVICE) > 0.3
    if kind == "holes" or B < 2:
        return m
    m[1] = False
    if B > 2:
        m[2] = torch.arange(T, device=DEVICE) < (2 * T) // 3
    if B > 3:
        m[3, : T // 4] = False
        m[3, -T // 4:] = False
    return m


def _case(B, T, dtype):
    rewards = torch.randn(B, T, device=DEVICE).to(dtype)
    values = torch.randn(B, T, device=DEVICE).to(dtype)
    return rewards, values, _mask(B, T)


def _close(got, want, tol=2e-6):
    """fp32 accumulation against an fp64 reference run on the same (rounded) inputs."""
    assert got.shape == want.shape
    if want.numel() == 0:
        return
    scale = 1 + want.abs().max().item()
    assert torch.isfinite(got).all()
    assert (got.double() - want).abs().max().item() <= tol * scale * math.sqrt(1 + want.shape[-1])


@pytest.mark.parametrize("gamma, lam, dtype", GAMMA_LAM_DTYPE,
                         ids=[f"g{g}-l{l}-{_dt(d)}" for g, l, d in GAMMA_LAM_DTYPE])
@pytest.mark.parametrize("holes", ["skip", "zero"])
@pytest.mark.parametrize("shape", GRID, ids=lambda s: f"B{s[0]}-T{s[1]}")
def test_gae_matches_reference(backend, shape, holes, gamma, lam, dtype):
    rewards, values, mask = _case(*shape, dtype)
    adv, ret = gae(rewards, values, mask, gamma=gamma, lam=lam, holes=holes, backend=backend)
    want_adv, want_ret = ref.gae(rewards.double(), values.double(), mask, gamma, lam, holes)
    assert adv.dtype == ret.dtype == torch.float32
    _close(adv, want_adv)
    _close(ret, want_ret)
    assert (adv[~mask] == 0).all() and (ret[~mask] == 0).all()


@pytest.mark.parametrize("gamma", [1.0, 0.99, 0.0])
@pytest.mark.parametrize("holes", ["skip", "zero"])
@pytest.mark.parametrize("shape", GRID, ids=lambda s: f"B{s[0]}-T{s[1]}")
def test_discounted_returns_matches_reference(backend, shape, holes, gamma):
    rewards, _, mask = _case(*shape, torch.bfloat16)
    got = discounted_returns(rewards, mask, gamma=gamma, holes=holes, backend=backend)
    _close(got, ref.discounted_returns(rewards.double(), mask, gamma, holes))
    assert (got[~mask] == 0).all()


def test_crosses_several_tiles(backend):
    """T = 5000 spans five 1024-wide tiles; with two rows the triton backend also cuts each
    row into chunks scanned in parallel, so chunk carries are exercised too."""
    rewards, values, mask = _case(2, 5000, torch.float32)
    adv, ret = gae(rewards, values, mask, gamma=0.99, lam=0.95, backend=backend)
    want_adv, want_ret = ref.gae(rewards.double(), values.double(), mask, 0.99, 0.95)
    _close(adv, want_adv)
    _close(ret, want_ret)


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton cannot run here")
@pytest.mark.parametrize("block, tiles_per_chunk, with_values, holes", [
    (16, 1, True, "skip"), (16, 3, False, "zero"), (32, None, True, "zero")])
def test_long_row_block_carry(block, tiles_per_chunk, with_values, holes):
    """One long row cut into many small tiles and chunks (the layout of B=1, T=65536+ at
    toy scale): every tile boundary and chunk carry sits inside runs of holes too."""
    from fastrlhf.triton.advantages import gae_fwd

    T = 400
    rewards, values = torch.randn(2, 1, T, device=DEVICE)
    mask = torch.rand(1, T, device=DEVICE) > 0.5
    mask[0, 100:170] = False  # a hole wider than a tile and a chunk
    gamma, lam = 0.999, 0.97
    v = values if with_values else None
    got = gae_outputs(rewards, v)
    gae_fwd(rewards, v, mask, gamma, lam if with_values else 1.0, holes == "skip", *got, block=block,
            tiles_per_chunk=tiles_per_chunk)
    if with_values:
        want = ref.gae(rewards.double(), values.double(), mask, gamma, lam, holes)
        _close(got[0], want[0])
        _close(got[1], want[1])
    else:
        _close(got[0], ref.discounted_returns(rewards.double(), mask, gamma, holes))


def test_plan_respects_launch_limits():
    from fastrlhf.triton.advantages import MAX_CHUNKS, plan

    assert plan(8192, 2048) == (512, 2048, 1)  # the batch fills the GPU: whole rows
    BLOCK, CHUNK, NC = plan(1, 65536)
    assert (BLOCK, NC) == (512, 128) and NC * CHUNK >= 65536  # one long row: 128 chunks
    for B, T in [(1, 1), (1, 2**22), (3, 37), (64, 100_000), (100_000, 3)]:
        BLOCK, CHUNK, NC = plan(B, T)
        assert CHUNK % BLOCK == 0 and (NC - 1) * CHUNK < T <= NC * CHUNK
        assert NC <= MAX_CHUNKS and B * NC < 2**31


# ---------------------------------------------------------------------- semantics
def test_hole_conventions_by_hand(backend):
    """r = [1, 5, 2, 7], V = [0.5, 9, 0.25, 3], mask = [1, 0, 1, 0], gamma = 0.5, lam = 1."""
    r = torch.tensor([[1.0, 5.0, 2.0, 7.0]], device=DEVICE)
    v = torch.tensor([[0.5, 9.0, 0.25, 3.0]], device=DEVICE)
    m = torch.tensor([[1, 0, 1, 0]], device=DEVICE)
    adv, ret = gae(r, v, m, gamma=0.5, lam=1.0, holes="skip", backend=backend)
    # skip: t=2 is the last valid step: A2 = 2 - 0.25 = 1.75; t=0 sees V_next = V2 and A_next = A2
    a2 = 2 - 0.25
    a0 = 1 + 0.5 * 0.25 - 0.5 + 0.5 * a2
    torch.testing.assert_close(adv, torch.tensor([[a0, 0, a2, 0]], device=DEVICE))
    torch.testing.assert_close(ret, torch.tensor([[a0 + 0.5, 0, a2 + 0.25, 0]], device=DEVICE))
    adv, _ = gae(r, v, m, gamma=0.5, lam=1.0, holes="zero", backend=backend)
    # zero: the hole at t=1 is a step with r = V = 0: A1 = 0.5 * V2 + 0.5 * A2; t=0 sees V_next = 0
    z0 = 1 + 0 - 0.5 + 0.5 * (0.5 * 0.25 + 0.5 * a2)
    torch.testing.assert_close(adv, torch.tensor([[z0, 0, a2, 0]], device=DEVICE))
    g = discounted_returns(r, m, gamma=0.5, holes="skip", backend=backend)
    torch.testing.assert_close(g, torch.tensor([[1 + 0.5 * 2, 0, 2, 0]], device=DEVICE))
    g = discounted_returns(r, m, gamma=0.5, holes="zero", backend=backend)
    torch.testing.assert_close(g, torch.tensor([[1 + 0.25 * 2, 0, 2, 0]], device=DEVICE))


def _skip_loop(r, v, m, gamma, lam):
    """The multi-turn trainer loop: masked steps leave next-value and running advantage alone."""
    m = m.double()
    nv = la = 0.0
    out = []
    for t in reversed(range(r.shape[1])):
        a = r[:, t] + gamma * nv - v[:, t] + gamma * lam * la
        nv = v[:, t] * m[:, t] + (1 - m[:, t]) * nv
        la = a * m[:, t] + (1 - m[:, t]) * la
        out.append(la)
    return torch.stack(out[::-1], 1)


def _zero_loop(r, v, m, gamma, lam):
    """The single-turn trainer loop: rewards and values multiplied by the mask."""
    r, v = r * m, v * m
    la = 0.0
    out = []
    for t in reversed(range(r.shape[1])):
        nv = v[:, t + 1] if t + 1 < r.shape[1] else 0.0
        la = r[:, t] + gamma * nv - v[:, t] + gamma * lam * la
        out.append(la)
    return torch.stack(out[::-1], 1)


@pytest.mark.parametrize("holes", ["skip", "zero"])
def test_matches_trainer_conventions_on_valid_tokens(backend, holes):
    r, v = torch.randn(2, 3, 29, device=DEVICE)
    m = _mask(3, 29, "holes")
    adv, ret = gae(r, v, m, gamma=0.98, lam=0.9, holes=holes, backend=backend)
    want = (_skip_loop if holes == "skip" else _zero_loop)(r.double(), v.double(), m, 0.98, 0.9)
    _close(adv[m], want[m])
    _close(ret[m], (want + v)[m])


def test_conventions_agree_without_holes(backend):
    r, v = torch.randn(2, 4, 23, device=DEVICE)
    m = torch.arange(23, device=DEVICE) < torch.tensor([[23], [10], [1], [0]], device=DEVICE)
    skip = gae(r, v, m, gamma=0.9, lam=0.8, holes="skip", backend=backend)
    zero = gae(r, v, m, gamma=0.9, lam=0.8, holes="zero", backend=backend)
    for a, b in zip(skip, zero):
        torch.testing.assert_close(a, b)
    assert (skip[0][3] == 0).all()


@pytest.mark.parametrize("holes", ["skip", "zero"])
def test_masked_inputs_are_never_read(backend, holes):
    """Garbage (NaN/inf) where the mask is 0 does not reach any output."""
    r, v, m = _case(3, 37, torch.float32)
    want = gae(r, v, m, gamma=0.99, lam=0.95, holes=holes, backend=backend)
    r2, v2 = r.clone(), v.clone()
    r2[~m], v2[~m] = float("nan"), float("inf")
    got = gae(r2, v2, m, gamma=0.99, lam=0.95, holes=holes, backend=backend)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_mask_dtypes_and_strided_inputs(backend):
    """bool/int/float masks agree, and column slices (``values[:, :-1]``) are read in place."""
    base_r, base_v = torch.randn(2, 3, 41, device=DEVICE)
    r, v = base_r[:, 1:], base_v[:, :-1]
    m = _mask(3, 40)
    want = gae(r.contiguous(), v.contiguous(), m, gamma=0.97, lam=0.9, backend=backend)
    for mm in (m, m.int(), m.float(), m.t().contiguous().t()):
        got = gae(r, v, mm, gamma=0.97, lam=0.9, backend=backend)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)


def test_empty_and_fp64(backend):
    for B, T in [(0, 5), (3, 0), (0, 0)]:
        x = torch.randn(B, T, device=DEVICE)
        adv, ret = gae(x, x, x > 0, backend=backend)
        assert adv.shape == ret.shape == (B, T)
        assert discounted_returns(x, x > 0, backend=backend).shape == (B, T)
    r, v = torch.randn(2, 2, 9, dtype=torch.float64, device=DEVICE)
    adv, ret = gae(r, v, torch.ones(2, 9, device=DEVICE), gamma=0.5, lam=0.5, backend=backend)
    want = ref.gae(r, v, torch.ones(2, 9, device=DEVICE), 0.5, 0.5)
    assert adv.dtype == torch.float64
    torch.testing.assert_close(adv, want[0], atol=1e-6, rtol=1e-6)  # gamma passes through fp32


def test_no_gradient_and_deterministic(backend):
    r, v, m = _case(3, 37, torch.float32)
    r.requires_grad_(True)
    v.requires_grad_(True)
    adv, ret = gae(r, v, m, backend=backend)
    assert not adv.requires_grad and not ret.requires_grad
    again = gae(r, v, m, backend=backend)
    assert torch.equal(adv, again[0]) and torch.equal(ret, again[1])


@settings(max_examples=12, deadline=None)
@given(B=st.integers(0, 3), T=st.integers(1, 40), p_valid=st.sampled_from([0.0, 0.3, 0.8, 1.0]),
       gamma_lam=st.sampled_from([(1.0, 1.0), (1.0, 0.95), (0.99, 0.95), (0.0, 0.5), (0.5, 0.0)]),
       holes=st.sampled_from(["skip", "zero"]), scale=st.sampled_from([1e-3, 1.0, 1e3]),
       seed=st.integers(0, 2**16))
def test_property_against_reference(B, T, p_valid, gamma_lam, holes, scale, seed):
    torch.manual_seed(seed)
    r = torch.randn(B, T, device=DEVICE) * scale
    v = torch.randn(B, T, device=DEVICE) * scale
    m = torch.rand(B, T, device=DEVICE) < p_valid
    gamma, lam = gamma_lam
    want = ref.gae(r.double(), v.double(), m, gamma, lam, holes)
    want_g = ref.discounted_returns(r.double(), m, gamma, holes)
    for backend in family_backends("advantages"):
        got = gae(r, v, m, gamma=gamma, lam=lam, holes=holes, backend=backend)
        for a, b in zip(got, want):
            _close(a, b)
            assert (a[~m] == 0).all()
        _close(discounted_returns(r, m, gamma=gamma, holes=holes, backend=backend), want_g)


# -------------------------------------------------------------------- masked whiten
def test_masked_whiten_values_and_gradient():
    x = torch.randn(3, 17, dtype=torch.float64, device=DEVICE) * 4 + 2
    m = _mask(3, 17, "holes")
    vals = x[m]
    for unbiased in (True, False):
        for shift_mean in (True, False):
            got = masked_whiten(x, m, shift_mean=shift_mean, unbiased=unbiased)
            want = (vals - vals.mean()) / torch.sqrt(vals.var(unbiased=unbiased) + 1e-8)
            if not shift_mean:
                want = want + vals.mean()
            torch.testing.assert_close(got[m], want)
            assert (got[~m] == 0).all()
    assert torch.autograd.gradcheck(lambda t: masked_whiten(t, m), (x.clone().requires_grad_(True),))


def test_masked_whiten_degenerate_masks():
    x = torch.randn(2, 5, device=DEVICE).bfloat16()
    none = torch.zeros(2, 5, dtype=torch.bool, device=DEVICE)
    one = none.clone()
    one[1, 2] = True
    for shift_mean in (True, False):
        for unbiased in (True, False):
            out = masked_whiten(x, none, shift_mean=shift_mean, unbiased=unbiased)
            assert out.dtype == torch.float32 and (out == 0).all()
            out = masked_whiten(x, one, shift_mean=shift_mean, unbiased=unbiased)
            assert torch.isfinite(out).all() and (out[~one] == 0).all()
            # a single valid element: 0 after centring (no scaling), itself with shift_mean=False
            assert out[1, 2] == (0 if shift_mean else x[1, 2].float())
    # equal values: zero variance, no NaN
    same = torch.full((4,), 3.0, device=DEVICE)
    assert (masked_whiten(same, torch.ones(4, device=DEVICE)) == 0).all()


def test_masked_whiten_backends_agree(backend):
    """Every backend (one fp64 statistics pass, one elementwise pass) against the two-pass
    fp64 reference, values and gradients, with holes, odd sizes and a bf16 input."""
    for shape, dtype in (((3, 37), torch.float32), ((5, 1031), torch.bfloat16), ((4097,), torch.float32)):
        x = (torch.randn(shape, device=DEVICE) * 3 + 1).to(dtype)
        m = torch.rand(shape, device=DEVICE) < 0.7
        g = torch.randn(shape, device=DEVICE)
        for shift_mean, unbiased in ((True, True), (False, False)):
            kw = dict(shift_mean=shift_mean, unbiased=unbiased)
            xg = x.detach().clone().requires_grad_(True)
            got = masked_whiten(xg, m, backend=backend, **kw)
            (got * g).sum().backward()
            xd = x.detach().double().requires_grad_(True)
            want = ref.masked_whiten(xd, m, **kw)
            (want * g.double()).sum().backward()
            assert got.dtype == torch.float32
            torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
            tol = 2.0**-8 if dtype == torch.bfloat16 else 1e-5  # bf16 gradients: one bf16 rounding
            torch.testing.assert_close(xg.grad.double(), xd.grad, atol=tol * xd.grad.abs().max().item(), rtol=tol)


@pytest.mark.parametrize("world", [2, 3])
def test_masked_whiten_over_ranks(backend, world):
    """With a process group, every rank whitens with the statistics of all ranks' valid
    elements (one all-reduce; ranks simulated by threads): values and gradients equal
    whitening the concatenation, a fully masked rank included."""
    from tests.ranks import ThreadGroup

    xs = [torch.randn(2, 9 + r, device=DEVICE, dtype=torch.float64) * 2 + r for r in range(world)]
    ms = [torch.rand(2, 9 + r, device=DEVICE) < 0.7 for r in range(world)]
    ms[-1][:] = False
    gs = [torch.randn_like(x) for x in xs]
    flat_x = torch.cat([x.reshape(-1) for x in xs]).requires_grad_(True)
    want = ref.masked_whiten(flat_x, torch.cat([m.reshape(-1) for m in ms]))
    (want * torch.cat([g.reshape(-1) for g in gs])).sum().backward()
    group = ThreadGroup(world)

    def rank_fn(rank):
        x = xs[rank].clone().requires_grad_(True)
        out = masked_whiten(x, ms[rank], group=object(), backend=backend)
        (out * gs[rank]).sum().backward()
        return out.detach(), x.grad

    start = 0
    for (out, grad), x in zip(group.run(rank_fn), xs):
        n = x.numel()
        torch.testing.assert_close(out.reshape(-1), want[start:start + n].detach())
        torch.testing.assert_close(grad.reshape(-1), flat_x.grad[start:start + n])
        start += n


# ------------------------------------------------------------------ packed sequences
def _packed_case(lengths, seed=0):
    """Padded ``[S, max]`` rewards/values/mask (holes, a fully masked sequence) and their packed
    1-D forms with ``cu_seqlens``."""
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    S, width = len(lengths), max(lengths + [1])
    r = torch.randn(S, width, device=DEVICE, generator=gen)
    v = torch.randn(S, width, device=DEVICE, generator=gen)
    m = torch.rand(S, width, device=DEVICE, generator=gen) < 0.75
    m &= torch.arange(width, device=DEVICE) < torch.tensor(lengths, device=DEVICE)[:, None]
    if S > 1:
        m[1] = False
    inside = torch.arange(width, device=DEVICE) < torch.tensor(lengths, device=DEVICE)[:, None]
    cu = torch.tensor([0] + lengths, device=DEVICE).cumsum(0).to(torch.int32)
    return (r, v, m), (r[inside], v[inside], m[inside]), cu, inside


@pytest.mark.parametrize("lengths", [[5, 0, 37, 1], [300, 1, 1031], [2100, 3]], ids=str)
@pytest.mark.parametrize("holes", ["skip", "zero"])
def test_gae_packed_equals_padded(backend, lengths, holes):
    """Packed sequences (empty ones, length 1, longer than a tile, holes) give exactly the
    padded result at their positions, GAE and discounted returns."""
    (r, v, m), (rp, vp, mp), cu, inside = _packed_case(lengths)
    kw = dict(gamma=0.99, lam=0.95, holes=holes)
    adv, ret = gae(r, v, m, backend=backend, **kw)
    adv_p, ret_p = gae(rp, vp, mp, cu_seqlens=cu, backend=backend, **kw)
    torch.testing.assert_close(adv_p, adv[inside])
    torch.testing.assert_close(ret_p, ret[inside])
    g = discounted_returns(r, m, gamma=0.97, holes=holes, backend=backend)
    torch.testing.assert_close(discounted_returns(rp, mp, gamma=0.97, holes=holes, cu_seqlens=cu, backend=backend),
                               g[inside])


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton cannot run here")
def test_gae_packed_long_sequence_chunked():
    """One long sequence beside short ones is cut into chunks scanned in parallel (small tiles
    force many chunks), holes across chunk boundaries: equal to the padded reference."""
    from fastrlhf.ops.advantages import gae_outputs
    from fastrlhf.triton.advantages import gae_fwd

    (r, v, m), (rp, vp, mp), cu, inside = _packed_case([400, 7, 0, 33], seed=1)
    out = gae_outputs(rp, vp)
    gae_fwd(rp, vp, mp, 0.999, 0.97, True, *out, cu, block=16, tiles_per_chunk=2)
    want = ref.gae(r.double(), v.double(), m, 0.999, 0.97, "skip")
    _close(out[0], want[0][inside])
    _close(out[1], want[1][inside])


def test_packed_bad_offsets():
    r = torch.randn(10)
    m = torch.ones(10)
    for cu, words in ((torch.tensor([1, 10], dtype=torch.int32), "cu_seqlens must start at 0"),
                      (torch.tensor([0, 6, 4, 10], dtype=torch.int32), "cu_seqlens must be non-decreasing"),
                      (torch.tensor([0, 9], dtype=torch.int32), "must end at the packed length 10"),
                      (torch.tensor([0, 10]), "cu_seqlens must have dtype int32"),
                      (torch.tensor([[0, 10]], dtype=torch.int32), "cu_seqlens must have 1 dimension")):
        with pytest.raises((ValueError, TypeError), match=words):
            gae(r, r, m, cu_seqlens=cu)
    with pytest.raises(ValueError, match="rewards must have 1 dimension"):
        gae(r.view(2, 5), r.view(2, 5), m.view(2, 5), cu_seqlens=torch.tensor([0, 10], dtype=torch.int32))


# ----------------------------------------------------------------- group advantages
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=_dt)
@pytest.mark.parametrize("method", ["grpo", "rloo", "dr_grpo"])
@pytest.mark.parametrize("group_size, n_groups", [(1, 5), (2, 3), (5, 7), (16, 70), (1100, 2)],
                         ids=lambda x: str(x))
def test_group_advantages_matches_reference(backend, group_size, n_groups, method, dtype):
    """Group sizes: a singleton, pairs, an odd size, many groups per program, and a group
    wider than one 1024-wide tile."""
    scores = (torch.randn(group_size * n_groups, device=DEVICE) * 3).to(dtype)
    got = group_advantages(scores, group_size, method=method, backend=backend)
    want = ref.group_advantages(scores.double(), group_size, method)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=2e-5)


def test_group_advantages_by_hand(backend):
    s = torch.tensor([1.0, 2.0, 3.0, 4.0, 4.0, 4.0], device=DEVICE)
    eps = 1e-6
    torch.testing.assert_close(group_advantages(s, 3, eps=eps, backend=backend),
                               torch.tensor([-1 / (1 + eps), 0, 1 / (1 + eps), 0, 0, 0], device=DEVICE))
    torch.testing.assert_close(group_advantages(s, 3, method="rloo", backend=backend),
                               torch.tensor([-1.5, 0, 1.5, 0, 0, 0], device=DEVICE))
    torch.testing.assert_close(group_advantages(s, 3, method="dr_grpo", backend=backend),
                               torch.tensor([-1.0, 0, 1, 0, 0, 0], device=DEVICE))
    # groups of one: no baseline (mean 0, std 1)
    torch.testing.assert_close(group_advantages(s, 1, eps=0.5, backend=backend), s / 1.5)
    for method in ("rloo", "dr_grpo"):
        torch.testing.assert_close(group_advantages(s, 1, method=method, backend=backend), s)
    assert group_advantages(s[:0], 4, backend=backend).shape == (0,)


# --------------------------------------------------------------- extreme but finite values
@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 60), log10_scale=st.integers(-30, 37), seed=st.integers(0, 2**16),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_masked_whiten_is_scale_invariant(n, log10_scale, seed, dtype):
    """Any finite scale of a 16/32-bit input (the square of 1e20 overflows fp32): the result is
    that of the same values in fp64."""
    gen = torch.Generator().manual_seed(seed)
    x = ((torch.randn(n, generator=gen) + 1) * 10.0**log10_scale).to(dtype).to(DEVICE)
    m = torch.rand(n, generator=gen).to(DEVICE) < 0.8
    got = masked_whiten(x, m)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), masked_whiten(x.double(), m), atol=1e-5, rtol=1e-5)


def _whiten_truth(x, m, offset, shift_mean):
    """Whitening of ``x`` in fp64 from ``x - offset`` (exact: every ``x`` is near ``offset``), so
    the reference's own rounding at a large offset does not count."""
    out = ref.masked_whiten(x.double() - offset, m)
    if not shift_mean:
        vals = x.double()[m] - offset
        out = torch.where(m, out + offset + (vals.mean() if vals.numel() else 0.0), 0.0)
    return out


# Found by hand (fp32 on the triton backend; fp64 on every backend): constants gave 1.5e-5
# (0.1) and 2.6e26 (1e30); 1e8 + randn was off by 4.1e3, 100 + 1e-4 randn by 0.019, shift_mean=False
# at 6e4 by 32; fp64 constants 1e30 and 1e100 gave up to 4.1e17 and 1.7e88.
FAR_FROM_ZERO = [(0.1, 0.0, torch.float32), (1e30, 0.0, torch.float32), (1e8, 1.0, torch.float32),
                 (100.0, 1e-4, torch.float32), (6e4, 1.0, torch.float32), (1e30, 0.0, torch.float64),
                 (1e100, 0.0, torch.float64), (1e100, 1e88, torch.float64), (-3e15, 1.0, torch.float64)]


def _far_case(offset, spread, dtype, n, seed):
    gen = torch.Generator().manual_seed(seed)
    x = (offset + spread * torch.randn(n, generator=gen, dtype=torch.float64)).to(dtype).to(DEVICE)
    m = (torch.rand(n, generator=gen) < 0.8).to(DEVICE)
    m[0] = True
    return x, m


def _assert_whiten_close(got, want, x, m, dtype, offset, shift_mean):
    """A few roundings of the output's dtype at the output's scale (the offset's with
    shift_mean=False), plus the one rounding of the fp64 mean, at the whitened scale."""
    scale = max(1.0, abs(offset) if not shift_mean else 0.0, want.abs().max().item())
    spread = (x.double()[m] - offset).std().item() if int(m.sum()) > 1 else 0.0
    mean_rounding = torch.finfo(torch.float64).eps * abs(offset) / spread if spread > 0 else 0.0
    torch.testing.assert_close(got.double(), want, rtol=0, atol=4 * torch.finfo(dtype).eps * scale + mean_rounding)


@pytest.mark.parametrize("offset, spread, dtype", FAR_FROM_ZERO, ids=lambda v: _dt(v) if isinstance(v, torch.dtype) else f"{v:g}")
@pytest.mark.parametrize("shift_mean", [True, False], ids=["shift", "noshift"])
def test_masked_whiten_far_from_zero(backend, offset, spread, dtype, shift_mean):
    """Data far from zero, constants included (exactly 0 out): as exact as fp64 from x - offset."""
    x, m = _far_case(offset, spread, dtype, 4099, 0)  # two whitening blocks and a part
    got = masked_whiten(x, m, shift_mean=shift_mean, backend=backend)
    _assert_whiten_close(got, _whiten_truth(x, m, offset, shift_mean), x, m, dtype, offset, shift_mean)
    if spread == 0 and shift_mean:
        assert (got == 0).all()


@settings(max_examples=30, deadline=None)
@given(log10_offset=st.integers(-30, 37), log10_spread=st.integers(-12, 0), seed=st.integers(0, 2**16),
       dtype=st.sampled_from([torch.float32, torch.float64]), shift_mean=st.booleans(), world=st.integers(1, 3))
def test_masked_whiten_offset_property(log10_offset, log10_spread, seed, dtype, shift_mean, world):
    """Any offset, a spread down to 1e-12 of it (fp32: often a constant after rounding), on every
    backend, on one rank and split over ranks (statistics merged across them)."""
    from tests.ranks import ThreadGroup

    offset = 10.0**log10_offset
    x, m = _far_case(offset, offset * 10.0**log10_spread, dtype, 61, seed)
    want = _whiten_truth(x, m, offset, shift_mean)
    cuts = [len(x) * r // world for r in range(world + 1)]
    for backend in family_backends("advantages"):
        if world == 1:
            got = masked_whiten(x, m, shift_mean=shift_mean, backend=backend)
        else:
            parts = ThreadGroup(world).run(lambda r: masked_whiten(
                x[cuts[r]:cuts[r + 1]], m[cuts[r]:cuts[r + 1]], shift_mean=shift_mean, group=object(),
                backend=backend))
            got = torch.cat(parts)
        _assert_whiten_close(got, want, x, m, dtype, offset, shift_mean)


@settings(max_examples=60, deadline=None)
@given(group_size=st.integers(1, 6), n_groups=st.integers(1, 3), seed=st.integers(0, 2**16),
       method=st.sampled_from(["grpo", "rloo", "dr_grpo"]), dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_group_advantages_finite_in_the_promised_range(group_size, n_groups, seed, method, dtype):
    """Scores at the edges of the promised range, |s| <= fp32 max / 2 (the differences rloo and
    dr_grpo take reach fp32 max there; ±inf came out for larger scores, which the docstring now
    excludes): finite, and the fp64 answer rounded once."""
    half = torch.finfo(torch.float32).max / 2
    top = half if dtype == torch.float32 else half * (1 - 2**-8)  # bf16 rounds fp32 max / 2 up, out of range
    gen = torch.Generator().manual_seed(seed)
    pick = torch.randint(0, 4, (group_size * n_groups,), generator=gen)
    scores = torch.tensor([top, -top, top * 0.999, 0.0])[pick].to(dtype).to(DEVICE)
    assert scores.double().abs().max() <= half
    want = ref.group_advantages(scores.double(), group_size, method)
    for backend in family_backends("advantages"):
        got = group_advantages(scores, group_size, method=method, backend=backend)
        assert torch.isfinite(got).all(), (backend, scores, got)
        torch.testing.assert_close(got.double(), want, rtol=2e-7, atol=0)


@settings(max_examples=40, deadline=None)
@given(group_size=st.integers(1, 40), n_groups=st.integers(1, 4), log10_scale=st.integers(-30, 37),
       method=st.sampled_from(["grpo", "rloo", "dr_grpo"]), seed=st.integers(0, 2**16))
def test_group_advantages_any_scale(group_size, n_groups, log10_scale, method, seed):
    """Scores at any finite fp32 scale: every backend gives the fp64 answer (a grpo std of scores
    around 1e20 overflowed fp32 and gave zeros)."""
    gen = torch.Generator().manual_seed(seed)
    scores = (torch.randn(group_size * n_groups, generator=gen) * 3 * 10.0**log10_scale).float().to(DEVICE)
    want = ref.group_advantages(scores.double(), group_size, method)
    for backend in family_backends("advantages"):
        got = group_advantages(scores, group_size, method=method, backend=backend)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_group_advantages_packed_tokens(backend):
    """With the sequences' offsets, each sequence's advantage on each of its tokens."""
    scores = torch.tensor([1.0, 2.0, 3.0, 4.0], device=DEVICE)
    cu = torch.tensor([0, 2, 2, 5, 6], dtype=torch.int32, device=DEVICE)
    per_seq = group_advantages(scores, 2, backend=backend)
    got = group_advantages(scores, 2, cu_seqlens=cu, backend=backend)
    torch.testing.assert_close(got, per_seq[torch.tensor([0, 0, 2, 2, 2, 3], device=DEVICE)])


# ------------------------------------------------------------------------ bad input
def _gae_call(**kw):
    args = {"rewards": torch.randn(2, 5), "values": torch.randn(2, 5), "mask": torch.ones(2, 5)}
    args.update(kw)
    return lambda: gae(args.pop("rewards"), args.pop("values"), args.pop("mask"), **args)


BAD_INPUTS = {
    "values-wrong-shape": (_gae_call(values=torch.randn(2, 6)), ValueError, "values must have shape (2, 5)"),
    "mask-wrong-shape": (_gae_call(mask=torch.ones(5)), ValueError, "mask must have shape"),
    "rewards-1d": (_gae_call(rewards=torch.randn(10)), ValueError, "rewards must have 2 dimension"),
    "rewards-int": (_gae_call(rewards=torch.ones(2, 5, dtype=torch.long)), TypeError, "rewards must have dtype"),
    "values-list": (_gae_call(values=[1.0]), TypeError, "values must be a torch.Tensor"),
    "gamma-above-1": (_gae_call(gamma=1.5), ValueError, "gamma must be in [0, 1]"),
    "lam-negative": (_gae_call(lam=-0.1), ValueError, "lam must be in"),
    "gamma-string": (_gae_call(gamma="0.9"), TypeError, "gamma must be a Python float"),
    "holes-unknown": (_gae_call(holes="drop"), ValueError, "holes must be one of"),
    "backend-unknown": (_gae_call(backend="jax"), ValueError, "backend must be one of"),
    "returns-mask-wrong-shape": (lambda: discounted_returns(torch.randn(2, 5), torch.ones(2, 4)), ValueError,
                                 "mask must have shape"),
    "whiten-mask-wrong-shape": (lambda: masked_whiten(torch.randn(3), torch.ones(4)), ValueError,
                                "mask must have shape"),
    "whiten-eps-zero": (lambda: masked_whiten(torch.randn(3), torch.ones(3), eps=0.0), ValueError, "eps"),
    "group-size-not-dividing": (lambda: group_advantages(torch.randn(7), 3), ValueError,
                                "not a multiple of group_size = 3"),
    "group-size-zero": (lambda: group_advantages(torch.randn(6), 0), ValueError, "group_size must be >= 1"),
    "group-size-float": (lambda: group_advantages(torch.randn(6), 2.0), TypeError, "group_size must be a Python int"),
    "scores-2d": (lambda: group_advantages(torch.randn(2, 3), 3), ValueError, "scores must have 1 dimension"),
    "method-unknown": (lambda: group_advantages(torch.randn(6), 3, method="ppo"), ValueError, "method must be one of"),
    "group-eps-zero": (lambda: group_advantages(torch.randn(6), 3, eps=0.0), ValueError, "eps must be"),
}


@pytest.mark.parametrize("call, exc, words", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input(call, exc, words):
    with pytest.raises(exc, match=re.escape(words)):
        call()


# --------------------------------------------------------------- torch.library / compile
def test_opcheck():
    r, v, m = _case(3, 7, torch.float32)
    cu = torch.tensor([0, 5, 5, 21], dtype=torch.int32, device=DEVICE)
    for values in (v, None):
        for skip in (True, False):
            torch.library.opcheck(torch.ops.fastrlhf.gae.default, (r, values, m, 0.99, 0.95, skip, None, "torch"))
            torch.library.opcheck(torch.ops.fastrlhf.gae.default,
                                  (r.reshape(-1), None if values is None else values.reshape(-1), m.reshape(-1),
                                   0.99, 0.95, skip, cu, "torch"))
    torch.library.opcheck(torch.ops.fastrlhf.group_advantages.default,
                          (torch.randn(12, device=DEVICE), 4, "grpo", 1e-6, "torch"))


def test_torch_compile_fullgraph():
    @torch.compile(fullgraph=True)
    def advantages(r, v, m, scores):
        adv, ret = gae(r, v, m, gamma=0.99, lam=0.95, backend="torch")
        g = discounted_returns(r, m, backend="torch")
        return masked_whiten(adv, m), ret, g, group_advantages(scores, 4, backend="torch")

    r, v, m = _case(3, 11, torch.float32)
    scores = torch.randn(8, device=DEVICE)
    got = advantages(r, v, m, scores)
    want_adv, want_ret = ref.gae(r, v, m, 0.99, 0.95)
    torch.testing.assert_close(got[0], ref.masked_whiten(want_adv, m))
    torch.testing.assert_close(got[1], want_ret)
    torch.testing.assert_close(got[2], ref.discounted_returns(r, m))
    torch.testing.assert_close(got[3], ref.group_advantages(scores, 4))


# ------------------------------------------------------- compiled for real GPUs (no GPU)
def _aot_launches():
    """Launches besides the report's ``gae.*``, ``group_advantages.*`` and ``masked_whiten.*`` cases
    (fp32): GAE with bf16, fp16, fp32 and fp64 rewards (fp64 accumulates in fp64), bool, int64
    and fp32 masks, rows 2**31 elements apart (i64 strides), holes skipped or zeroed, with and
    without values, rows cut into chunks (a carry between them) or not, packed sequences, and
    rows of one token (ints equal to 1 become constexpr 1). Group advantages: bf16 groups of
    256, fp32 and fp64 groups of 16 and 128 (aligned counts), fp64 groups of one (rloo:
    ``method`` 1, constexpr like the group size)."""
    from bench.static.cases import t
    from fastrlhf._numerics import acc_dtype
    from fastrlhf.triton import advantages as launchers

    def gae(r, v, mask, skip, cu=None):
        acc = acc_dtype(r, v)
        launchers.gae_fwd(r, v, mask, 0.99, 0.95, skip, t(*r.shape, dtype=acc),
                          t(*r.shape, dtype=acc) if v is not None else t(0, dtype=acc), cu)

    def far(B, T, dtype):  # rows 2**31 + 16 elements apart
        return t(B, 2**31 + 16, dtype=dtype)[:, :T]

    B, T = 16, 32768  # few long rows: 64 chunks each
    bf16, fp16, fp64 = torch.bfloat16, torch.float16, torch.float64
    gae(far(B, T, bf16), far(B, T, bf16), far(B, T, torch.bool), True)
    gae(t(B, T), t(B, T, dtype=bf16), t(B, T), False)
    gae(far(8192, 2048, fp16), None, far(8192, 2048, torch.int64), True)  # one chunk per row
    gae(t(B, T, dtype=fp64), t(B, T, dtype=fp64), t(B, T, dtype=torch.bool), True)
    gae(t(B * T), t(B * T), t(B * T, dtype=torch.bool), True, cu=t(B + 1, dtype=torch.int32))
    gae(t(8192 * 2048, dtype=bf16), t(8192 * 2048, dtype=bf16), t(8192 * 2048, dtype=torch.bool), False,
        cu=t(8192 + 1, dtype=torch.int32))
    gae(t(8192, 1), t(8192, 1), t(8192, 1, dtype=torch.bool), True)
    for dtype, out, G, method in ((bf16, torch.float32, 256, 0), (torch.float32, torch.float32, 16, 0),
                                  (torch.float32, torch.float32, 128, 2), (fp64, fp64, 16, 0),
                                  (fp64, fp64, 128, 0), (fp64, fp64, 1, 1)):
        launchers.group_advantages_fwd(t(G * 4096, dtype=dtype), G, method, 1e-6, t(G * 4096, dtype=out))


def test_kernels_compile_for_gpus():
    from tests.triton_aot import compile_for_gpus

    compile_for_gpus(("gae.*", "group_advantages.*", "masked_whiten.*"), _aot_launches)
