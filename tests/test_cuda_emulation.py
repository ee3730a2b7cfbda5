"""The CUDA kernels' algorithms, emulated on the CPU: their exact control flow and arithmetic
order in NumPy, checked against the fp64 reference on many cases.

No GPU runs here, so what the compiled kernels do is reproduced step by step: the thread
layout (scalar head, packs of 16 bytes, groups of packs per main-loop iteration, the epilogue,
the scalar tail), the log2-domain online softmax with its rescales and its merges (warp
butterflies, then one warp over the warps), the rounding residual of the final statistics,
the backward's per-row constants, the label's owner and the realigning loads. fp32 math is
fp32 here too (a fused multiply-add is one fp64 multiply-add rounded to fp32: exact product,
at most one extra rounding), ``ex2.approx.ftz`` is exp2 with results below 2**-126 flushed to
zero and its approximation error drawn in. Each function names the kernel code it follows;
when a kernel changes, its emulation here changes with it, and tests/test_cuda_parity.py
checks the compiled kernels against the same references on a GPU.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fastrlhf.reference import logprobs as ref
from tests.tolerance import assert_same_dtype_close, max_error

F32, F64 = np.float32, np.float64
LOG2E, LN2 = 1.44269504088896340736, 0.69314718055994530942
WARP, MAX_THREADS = 32, 512


# ------------------------------------------------------------------------ arithmetic
def fma(a, b, c, acc):
    """fma(a, b, c) in the accumulation type (fp32: exact product, one rounding to fp64,
    then to fp32)."""
    if acc is F32:
        return (np.asarray(a, F64) * np.asarray(b, F64) + np.asarray(c, F64)).astype(F32)
    return np.asarray(a, F64) * b + c


def exp2(y, acc):
    """fp32: ex2.approx.ftz: 2**y with a relative error of up to 2**-22 (here a deterministic
    one drawn from the bits of y; exact at y = 0, as the hardware is), a result below 2**-126
    flushed to 0; fp64: exp2."""
    y = np.asarray(y, acc)
    r = np.exp2(y)
    if acc is F32:
        bits = y.view(np.uint32).astype(np.uint64)
        wobble = ((bits * 2654435761) % 65536).astype(F64) / 65536 - 0.5  # in [-0.5, 0.5)
        r = np.where(y == 0, r, r * (1 + wobble * 2.0**-21))
        r = np.where(r < 2.0**-126, 0, r).astype(F32)
    return r


def cast(x, acc):
    return np.asarray(x, acc)


# ------------------------------------------------------------- token log-probs forward
def pack_elems(dtype) -> int:
    return 16 // torch.tensor([], dtype=dtype).element_size()


def threads_for(V: int, pack: int) -> int:
    """kernels/logprobs.cu threads_for."""
    t = WARP
    while t < MAX_THREADS and t * 4 * pack < V:
        t *= 2
    return t


def aligned_head(offset_elems: int, kN: int, n: int) -> int:
    """kernels/common.cuh aligned_head, for a row starting ``offset_elems`` elements past a
    16-byte boundary."""
    past = offset_elems % kN
    return min(0 if past == 0 else kN - past, n)


def fwd_packs(dtype) -> int:
    return 1 if dtype == torch.float64 else 4  # kFwdPacks


class Online:
    """Online<A> of every thread of a block (arrays over the threads)."""

    def __init__(self, n, acc):
        self.mx = np.full(n, -np.inf, acc)
        self.s = np.zeros(n, acc)
        self.t = np.zeros(n, acc)


def shift_of(mx, acc):
    return np.where(mx == -np.inf, acc(0), mx).astype(acc)


def add(st, neg_shift, active, gmax, xs, c, acc, entropy):
    """``add<kEntropy>``: rescale where the group's max grows, then each element in order."""
    grow = active & (gmax > st.mx)  # NaN never grows it
    d = cast(cast(-neg_shift - gmax, acc) * c, acc)
    alpha = exp2(d, acc)
    nz = grow & (st.s != 0)
    if entropy:
        st.t = np.where(nz, cast(alpha * fma(d, st.s, st.t, acc), acc), st.t)
    st.s = np.where(nz, cast(st.s * alpha, acc), st.s)
    st.mx = np.where(grow, gmax, st.mx).astype(acc)
    neg_shift = np.where(grow, -gmax, neg_shift).astype(acc)
    big = np.finfo(acc).max
    for x in xs:
        y = cast(cast(x + neg_shift, acc) * c, acc)
        e = exp2(y, acc)
        st.s = np.where(active, cast(st.s + e, acc), st.s)
        if entropy:
            st.t = np.where(active, fma(e, np.fmax(y, -big), st.t, acc), st.t)
    return neg_shift


def merge(a_mx, a_s, a_t, b_mx, b_s, b_t, c, acc, entropy):
    """``merge<kEntropy>``: onto the state with the larger max."""
    swap = b_mx > a_mx
    A = [np.where(swap, b, a) for a, b in ((a_mx, b_mx), (a_s, b_s), (a_t, b_t))]
    B = [np.where(swap, a, b) for a, b in ((a_mx, b_mx), (a_s, b_s), (a_t, b_t))]
    nz = B[1] != 0
    d = cast(cast(shift_of(B[0], acc) - shift_of(A[0], acc), acc) * c, acc)
    alpha = exp2(d, acc)
    s = np.where(nz, fma(B[1], alpha, A[1], acc), A[1]).astype(acc)
    t = np.where(nz, fma(alpha, fma(d, B[1], B[2], acc), A[2], acc), A[2]).astype(acc) if entropy else A[2]
    return A[0].astype(acc), s, t


def warp_merge(mx, s, t, c, acc, entropy):
    """``warp_merge``: xor butterflies within each warp (arrays over the threads)."""
    lanes = np.arange(mx.size)
    for offset in (16, 8, 4, 2, 1):
        other = lanes ^ offset
        mx, s, t = merge(mx, s, t, mx[other], s[other], t[other], c, acc, entropy)
    return mx, s, t


def residual(a, b, r, acc):
    d = fma(a, b, -r, acc)
    return np.where(np.isfinite(d), d, acc(0)).astype(acc)


@np.errstate(all="ignore")  # inf and NaN are inputs here: IEEE results, no warnings
def fwd_row(x, offset, label, temperature, ignore_index, dtype, entropy):
    """One row of ``token_logprobs_fwd_kernel<T, kEntropy>``: (logp, entropy, m, log s).
    ``x``: the row's values (exact in ``dtype``) as fp64; ``offset``: elements from the row
    start to the previous 16-byte boundary."""
    acc = F64 if dtype == torch.float64 else F32
    kN, U = pack_elems(dtype), fwd_packs(dtype)
    V = x.size
    threads = threads_for(V, kN)
    x = x.astype(acc)
    it = acc(1.0 / temperature)
    c = acc((1.0 / temperature) * LOG2E)
    tid = np.arange(threads)
    st, neg_shift = Online(threads, acc), np.zeros(threads, acc)

    def gather(idx, ok):  # inactive threads read nothing (their values are never used)
        ok = ok & (idx < V)
        return np.where(ok, x[np.where(ok, idx, 0)], acc(0)).astype(acc)

    head = aligned_head(offset, kN, V)
    n_packs = (V - head) // kN
    tail = head + n_packs * kN
    ok = tid < head
    v = gather(tid, ok)
    neg_shift = add(st, neg_shift, ok, v, [v], c, acc, entropy)

    def group(first, n):  # n packs at first + u * threads, their max and elements in order
        xs = [gather(head + (first + u * threads) * kN + k, np.ones(threads, bool))
              for u in range(n) for k in range(kN)]
        return np.fmax.reduce(np.stack(xs), axis=0).astype(acc), xs

    i = tid.copy()
    while True:  # the main loop: every thread has the same trip count but the last
        ok = i + (U - 1) * threads < n_packs
        if not ok.any():
            break
        gmax, xs = group(np.where(ok, i, 0), U)
        neg_shift = add(st, neg_shift, ok, gmax, xs, c, acc, entropy)
        i = np.where(ok, i + U * threads, i)
    for u in range(U - 1):  # the epilogue
        ok = i + u * threads < n_packs
        gmax, xs = group(np.where(ok, i + u * threads, 0), 1)
        neg_shift = add(st, neg_shift, ok, gmax, xs, c, acc, entropy)
    ok = tail + tid < V
    v = gather(tail + tid, ok)
    neg_shift = add(st, neg_shift, ok, v, [v], c, acc, entropy)

    mx, s, t = warp_merge(st.mx, st.s, st.t, c, acc, entropy)
    n_warps = threads // WARP
    lane = np.arange(WARP)
    first = lane < n_warps
    pick = np.where(first, lane * WARP, 0)
    mx, s, t = (np.where(first, a[pick], b).astype(acc)
                for a, b in ((mx, -np.inf), (s, 0.0), (t, 0.0)))
    mx, s, t = (a[0] for a in warp_merge(mx, s, t, c, acc, entropy))

    m = cast(mx * it, acc)
    ln_s = cast(np.log(s), acc)
    log_s = cast(ln_s + residual(mx, it, m, acc), acc)
    keep, in_range = label != ignore_index, 0 <= label < V
    x_label = x[label] if in_range else acc(0)
    lp = cast(fma(x_label, it, -m, acc) - log_s, acc)
    lp = (np.where(lp > 0, acc(0), lp) if in_range else acc(np.nan)) if keep else acc(0)
    h = acc(0)
    if entropy:
        h = cast(ln_s - acc(LN2) * cast(t / s, acc), acc)
        h = np.where(h < 0, acc(0), h) if keep else acc(0)
    return float(lp), float(h), float(m), float(log_s)


def emulate_fwd(logits, labels, temperature, ignore_index=-100, offsets=None):
    """``(logp, entropy, stats)`` of a [N, V] batch as the forward kernel computes them."""
    dtype = logits.dtype
    x = logits.double().numpy()
    out = np.zeros((x.shape[0], 4))
    for r in range(x.shape[0]):
        offset = 0 if offsets is None else offsets[r]
        out[r] = fwd_row(x[r], offset, int(labels[r]), temperature, ignore_index, dtype, True)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    t = torch.from_numpy(out).to(acc)
    return t[:, 0], t[:, 1], t[:, 2:]


# ------------------------------------------------------------ token log-probs backward
def owner_of(label, V, head, kN, threads):
    """The thread that stores element ``label`` (kernel: ``owner``)."""
    tail = head + (V - head) // kN * kN
    return label if label < head else ((label - head) // kN % threads if label < tail else label - tail)


def storing_thread(e, V, head, kN, threads):
    """Which thread's store writes element ``e``, read off the loops' index arithmetic."""
    n_packs = (V - head) // kN
    tail = head + n_packs * kN
    if e < head:
        return e  # tid < head
    if e >= tail:
        return e - tail  # tail + tid
    pack = (e - head) // kN
    for tid in range(threads):  # i = tid, tid + stride, ... (main loop and epilogue alike)
        if pack >= tid and (pack - tid) % threads == 0:
            return tid
    raise AssertionError("no thread stores this pack")


@np.errstate(all="ignore")
def bwd_row(x, label, g_logp, g_ent, H, m, log_s, temperature, ignore_index, dtype, entropy):
    """One row of ``token_logprobs_bwd_kernel``: the values it stores (in the logits' dtype)."""
    acc = F64 if dtype == torch.float64 else F32
    x = x.astype(acc)
    V = x.size
    keep = label != ignore_index
    it = acc(1.0 / temperature)
    g_logp = acc(g_logp) if keep else acc(0)
    g_ent = acc(g_ent) if (entropy and keep) else acc(0)
    H = acc(H) if entropy else acc(0)
    log_s, neg_m = acc(log_s), acc(-m)
    neg_ls2 = cast(-log_s * acc(LOG2E), acc)
    k0 = cast(-(fma(g_ent, cast(H - log_s, acc), g_logp, acc) if entropy else g_logp) * it, acc)
    k1 = cast(-g_ent * it, acc)
    t = fma(x, it, neg_m, acc)
    pr = exp2(fma(t, acc(LOG2E), neg_ls2, acc), acc)
    if entropy:
        dx = fma(cast(pr * np.fmax(t, -np.finfo(acc).max), acc), k1, cast(pr * k0, acc), acc)
    else:
        dx = cast(pr * k0, acc)
    if keep and 0 <= label < V:  # the owner's second store
        tl, pl = t[label], pr[label]
        g = cast(g_logp - cast(g_logp * pl, acc), acc)
        if entropy:
            g = cast(g - cast(cast(g_ent * pl, acc) * (cast(cast(tl - log_s, acc) + H, acc) if pl > 0 else acc(0)), acc), acc)
        dx = dx.copy()
        dx[label] = cast(g * it, acc)
    return torch.from_numpy(np.asarray(dx, F64)).to(dtype)


def emulate_bwd(g_logp, g_ent, logits, labels, stats, ent, temperature, ignore_index=-100):
    rows = [bwd_row(logits[r].double().numpy(), int(labels[r]), float(g_logp[r]),
                    0.0 if g_ent is None else float(g_ent[r]), float(ent[r]) if g_ent is not None else 0.0,
                    float(stats[r, 0]), float(stats[r, 1]), temperature, ignore_index, logits.dtype,
                    g_ent is not None) for r in range(logits.shape[0])]
    return torch.stack(rows)


# ------------------------------------------------------------------------------ tests
GRID = [(3, 2), (5, 7), (5, 130), (4, 4099), (3, 32003)]  # (rows, V) as in the parity suites
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def _case(N, V, dtype, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(N, V, generator=g) * scale).to(dtype)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[torch.rand(N, generator=g) < 0.2] = -100
    labels[0] = V  # out of range: NaN log-prob, the -logsumexp gradient
    return logits, labels


def _reference(logits, labels, g1, g2, temperature):
    x = logits.detach().clone().requires_grad_(True)
    lp, ent = ref.token_logprobs(x, labels, temperature, return_entropy=True)
    (lp * g1 + ent * g2).sum().backward()  # a NaN log-prob (label out of range) still has a gradient
    return lp.detach(), ent.detach(), x.grad


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("N, V", GRID, ids=lambda v: str(v))
def test_logprobs_emulation_matches_reference(N, V, dtype, temperature):
    """The emulated kernels against the fp64 reference with the rules of tests/test_logprobs.py
    (fp32: absolute 2e-4; bf16/fp16: tests/tolerance.py's), for rows starting at every offset
    from a 16-byte boundary."""
    logits, labels = _case(N, V, dtype)
    kN = pack_elems(dtype)
    offsets = [(3 * r + 1) % kN for r in range(N)]
    g = torch.Generator().manual_seed(1)
    g1, g2 = torch.randn(N, generator=g), torch.randn(N, generator=g)
    truth = _reference(logits.double(), labels, g1, g2, temperature)
    lp, ent, stats = emulate_fwd(logits, labels, temperature, offsets=offsets)
    torch.testing.assert_close(stats.double(), ref.row_stats(logits.double(), temperature), atol=1e-5, rtol=1e-5)
    dx = emulate_bwd(g1, g2, logits, labels, stats, ent, temperature)
    got = (lp, ent, dx)
    if dtype in (torch.float64, torch.float32):
        for a, b in zip(got, truth):
            assert max_error(a, b) < (1e-10 if dtype == torch.float64 else 2e-4)
    else:
        assert_same_dtype_close(got, _reference(logits, labels, g1, g2, temperature), truth, dtype)
    ignored = labels == -100
    assert (lp[ignored] == 0).all() and (ent[ignored] == 0).all() and (dx[ignored] == 0).all()
    assert torch.isnan(lp[0]) and (lp[1:].nan_to_num(0) <= 0).all()


@pytest.mark.parametrize("temperature", [1.0, 0.25, 3.0])
def test_logprobs_emulation_extreme_logits(temperature):
    """tests/test_logprobs.py's extreme cases (+-1e4, a masked vocabulary, a single finite
    logit, all equal) and larger ones: fp32 logits near 3e4 where a log2-domain shift's
    rounding (~1e-3) would show without the residual corrections, at every temperature."""
    V = 4133
    col = torch.arange(V)
    ninf = float("-inf")
    rows = [torch.where(col % 2 == 0, 1e4, -1e4),  # +-1e4 alternating
            torch.where(col < 5, torch.randn(V), ninf),  # a masked vocabulary
            torch.where(col == 7, 3.0, ninf),  # one finite logit
            torch.full((V,), -1e4),  # all equal
            3e4 + torch.randn(V) * 5,  # large and close together
            -3e4 + torch.randn(V) * 5,
            torch.where(col < V // 2, ninf, torch.randn(V)),  # -inf in the head, the packs and the tail
            torch.randn(V) * 300]
    logits = torch.stack(rows).float()
    labels = torch.tensor([0, 3, 7, 10, 11, 12, V - 1, 13])
    g1, g2 = torch.randn(8), torch.randn(8)
    lp, ent, stats = emulate_fwd(logits, labels, temperature, offsets=[0, 1, 2, 3, 0, 1, 2, 3])
    dx = emulate_bwd(g1, g2, logits, labels, stats, ent, temperature)
    want = _reference(logits.double(), labels, g1, g2, temperature)
    same = _reference(logits, labels, g1, g2, temperature)
    for a, b, s in zip((lp, ent, dx), want, same):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a.double(), b, atol=1e-4, rtol=1e-4)
        assert max_error(a, b) <= 2 * max_error(s, b) + 1e-6  # no worse than fp32 torch (no rounding term)
    assert lp[2] == 0 and ent[2] == 0
    assert abs(ent[3].item() - math.log(V)) < 1e-4
    # m + log s is the row's log-sum-exp to fp32 precision, however large the logits
    lse = torch.logsumexp(logits.double() / temperature, -1)
    torch.testing.assert_close((stats[:, 0].double() + stats[:, 1].double())[[0, 3, 4, 5, 7]],
                               lse[[0, 3, 4, 5, 7]], atol=0, rtol=2e-7)


def test_logprobs_emulation_nan_inf_rows_follow_the_reference():
    """A NaN logit, a +inf logit and a row of only -inf give NaN log-prob and entropy (the
    clamps keep NaN); an ignored row stays 0 whatever its logits hold; a label on a -inf
    logit gives -inf."""
    V = 4099
    logits = torch.randn(7, V).bfloat16()
    logits[0, 1000] = float("nan")
    logits[1, 5] = float("inf")
    logits[2] = float("-inf")
    logits[4, V - 1] = float("nan")
    logits[5, 9] = float("-inf")
    logits[6, :] = float("nan")
    labels = torch.tensor([1, 2, 4, 0, -100, 9, 3])
    lp, ent, stats = emulate_fwd(logits, labels, 0.8, offsets=[1, 2, 3, 4, 5, 6, 7])
    want_lp, want_ent = ref.token_logprobs(logits.double(), labels, 0.8, return_entropy=True)
    assert lp[[0, 1, 2, 6]].isnan().all() and ent[[0, 1, 2, 6]].isnan().all()
    assert lp[4] == 0 and ent[4] == 0 and lp[5] == float("-inf")
    torch.testing.assert_close(lp.double(), want_lp, atol=1e-4, rtol=1e-5, equal_nan=True)
    torch.testing.assert_close(ent.double(), want_ent, atol=1e-4, rtol=1e-5, equal_nan=True)
    g = torch.ones(7)
    dx = emulate_bwd(g, g, logits, labels, stats, ent, 0.8)
    want_dx = _reference(logits.double(), labels, g, g, 0.8)[2]
    assert torch.equal(dx.isnan(), want_dx.isnan())  # NaN rows (also ignored ones): NaN, as the reference
    assert torch.isfinite(dx[[3, 5]]).all()
    torch.testing.assert_close(dx[[3, 5]].double(), want_dx[[3, 5]], atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_label_owner_is_the_thread_that_stores_it(dtype):
    """``owner`` in the backward names the thread whose store writes the label's element, for
    every label, row alignment and block size (the label's full gradient is that thread's
    second store to it)."""
    kN = pack_elems(dtype)
    for V in (1, 5, 9, 40, 130, 1031):
        threads = threads_for(V, kN)
        for offset in range(kN):
            head = aligned_head(offset, kN, V)
            for label in range(V):
                assert owner_of(label, V, head, kN, threads) == storing_thread(label, V, head, kN, threads)


# ------------------------------------------------------------------ realigning loads
def byte_perm(x: int, y: int, s: int) -> int:
    """__byte_perm: output byte k is byte (s >> 4k) & 7 of the 8 bytes y:x."""
    src = x | (y << 32)
    return sum(((src >> (8 * ((s >> (4 * k)) & 7))) & 0xFF) << (8 * k) for k in range(4))


def funnel_pack(a: list[int], c: list[int], b: int, size: int) -> list[int]:
    """kernels/common.cuh funnel_pack on 32-bit words."""
    w = a + c
    two, one = (b & 8) != 0, (b & 4) != 0
    d = [w[k + 2] if two else w[k] for k in range(6)]
    e = [d[k + 1] if (size < 8 and one) else d[k] for k in range(5)]
    if size >= 4:
        return e[:4]
    sel = 0x3210 + 0x1111 * (b & 3)
    return [byte_perm(e[k], e[k + 1], sel) for k in range(4)]


def _words(buf: bytes) -> list[int]:
    return [int.from_bytes(buf[4 * k:4 * k + 4], "little") for k in range(len(buf) // 4)]


@pytest.mark.parametrize("size", [2, 4, 8])
def test_shifted_backward_loads_are_the_logits(size):
    """The shifted backward's body follows the gradient's alignment and rebuilds each pack
    of logits from two aligned 16-byte loads: for every pair of row offsets and lengths the
    rebuilt packs are the logits' bytes, and no load reaches past the row's last 16-byte
    block (the memory a thread may touch)."""
    rng = np.random.default_rng(0)
    memory = bytes(rng.integers(0, 256, 4096, dtype=np.uint8))
    kN = 16 // size
    for V in (1, 7, 8, 9, 31, 64, 77):
        for ox in range(kN):  # logits row: ox elements past a 16-byte boundary
            for od in range(kN):  # gradient row
                X = 256 + ox * size
                head = aligned_head(od, kN, V)  # the body follows the stores
                n_packs = (V - head) // kN
                start = X + head * size
                b = start % 16
                xb, nxt = start - b, (16 if b else 0)
                row_end = -(-(X + V * size) // 16) * 16  # end of the row's last 16-byte block
                for j in range(n_packs):
                    lo, hi = xb + 16 * j, xb + 16 * j + nxt
                    assert hi + 16 <= row_end and lo >= X - X % 16
                    got = funnel_pack(_words(memory[lo:lo + 16]), _words(memory[hi:hi + 16]), b, size)
                    want = _words(memory[start + 16 * j:start + 16 * j + 16])
                    assert got == want, (V, ox, od, j)


# ------------------------------------------------------------------------------- GAE
# kernels/advantages.cu gae_kernel in fp64 (the algebra and the control flow: which path
# each tile takes, the spans of the fast path, the scans, the carries, the chunk maps).
ITEMS = 4


def _then(later, earlier):
    """``then(later, earlier)`` on (p, q, u, s, w) arrays."""
    pl, ql, ul, sl, wl = later
    pe, qe, ue, se, we = earlier
    return (pe * pl, pe * ql + qe * sl, pe * ul + qe * wl + ue, se * sl, se * wl + we)


def _identity(n):
    return (np.ones(n), np.zeros(n), np.zeros(n), np.ones(n), np.zeros(n))


def _warp_scan_maps(m):
    """Inclusive Hillis-Steele scan over each warp's lanes (arrays over the threads)."""
    n = m[0].size
    lane = np.arange(n) % WARP
    for delta in (1, 2, 4, 8, 16):
        src = np.maximum(np.arange(n) - delta, 0)
        before = tuple(x[src] for x in m)
        new = _then(before, m)
        m = tuple(np.where(lane >= delta, a, b) for a, b in zip(new, m))
    return m


def _span_of(unit, n):
    p, q = unit
    out, first = (p, q), True
    while n > 0:
        if n & 1:
            out = (p, q) if first else (out[0] * p, p * out[1])
            first = False
        p, q = p * p, p * q
        n >>= 1
    return out


def _warp_scan_parts(u, w, unit):
    n = u.size
    lane = np.arange(n) % WARP
    p, q = unit
    for delta in (1, 2, 4, 8, 16):
        src = np.maximum(np.arange(n) - delta, 0)
        u = np.where(lane >= delta, p * u[src] + q * w[src] + u, u)
        p, q = p * p, p * q
    return u, (p, q)


def gae_row_tiles(r, v, m, gamma, gl, skip, threads, lo, end, T, n_chunks, carry, summary):
    """One work item of gae_kernel: the outputs of positions [lo, end) (scan) or the chunk's
    composite map (summary), starting from ``carry``; returns (adv, ret, map, paths)."""
    tile = threads * ITEMS
    tid = np.arange(threads)
    lane, warp, n_warps = tid % WARP, tid // WARP, threads // WARP
    unit = (gl ** 4, gamma * gl ** 3)  # twice(twice({gl, gamma}))
    block_span = _span_of(unit, threads)
    lanes_span = [_span_of(unit, max(k, 1)) for k in range(WARP)]
    warps_span = [_span_of(unit, max(k * WARP, 1)) for k in range(max(n_warps, 1))]
    one_tile = n_chunks == 1 and T <= tile
    adv, ret = np.zeros(T), np.zeros(T)
    chunk_map = tuple(x[0] for x in _identity(1))
    ca, cnv = carry
    paths = []
    base = lo + (end - 1 - lo) // tile * tile
    while base >= lo:
        g0 = base + tile - ITEMS * (tid + 1)
        pos = g0[:, None] + np.arange(ITEMS)[None, :]  # [threads, k]
        inside = pos < end
        valid = inside & m[np.minimum(pos, T - 1)]
        u = np.where(valid, r[np.minimum(pos, T - 1)] - v[np.minimum(pos, T - 1)], 0.0)
        w = np.where(valid, v[np.minimum(pos, T - 1)], 0.0)
        path = "fast"
        if skip:
            nxt = g0 + ITEMS
            above = (tid > 0) & (nxt < end) & m[np.minimum(nxt, T - 1)]
            after = np.concatenate([valid[:, 1:], above[:, None]], axis=1)
            run_end = (valid & ~after).any(1)
            bits = (valid * (1 << np.arange(ITEMS))).sum(1)
            lowest = bits & -bits
            hole_inside = ((bits + lowest) & bits) != 0
            warp_hole = np.array([hole_inside[warp == k].any() for k in warp])
            runs = int((run_end | warp_hole).sum())
            top = min(base + tile, end) - 1
            if runs == 0:
                path = "empty"
            elif runs == 1:
                first, last = bool(m[base]), bool(m[top])
                fast = (first and last) if summary else (one_tile or (first and (last or (ca == 0 and cnv == 0))))
                path = "fast" if fast else "general"
            else:
                path = "general"
        paths.append(path)
        if path == "empty":
            base -= tile
            continue
        if path == "fast":
            U = u[:, ITEMS - 1].copy()
            for k in range(ITEMS - 2, -1, -1):
                U = gl * U + (gamma * w[:, k + 1] + u[:, k])
            W = w[:, 0].copy()
            inc_u, warp_span = _warp_scan_parts(U, W, unit)
            tot_u = np.zeros(WARP)
            tot_w = np.zeros(WARP)
            last_lanes = np.arange(n_warps) * WARP + WARP - 1
            tot_u[:n_warps], tot_w[:n_warps] = inc_u[last_lanes], W[last_lanes]
            tot_u, _ = _warp_scan_parts(tot_u, tot_w, warp_span)
            bu, bw = tot_u[n_warps - 1], tot_w[n_warps - 1]
            if summary:
                chunk_map = _then(chunk_map, (block_span[0], block_span[1], bu, 0.0, bw))
                base -= tile
                continue
            x, nv = np.full(threads, ca), np.full(threads, cnv)
            for t in range(threads):
                if warp[t] > 0:
                    sp, sq = warps_span[warp[t]]
                    x[t] = sp * x[t] + (sq * nv[t] + tot_u[warp[t] - 1])
                    nv[t] = tot_w[warp[t] - 1]
                if lane[t] > 0:
                    sp, sq = lanes_span[lane[t]]
                    x[t] = sp * x[t] + (sq * nv[t] + inc_u[t - 1])
                    nv[t] = W[t - 1]
            for k in range(ITEMS - 1, -1, -1):
                x = gl * x + (gamma * nv + u[:, k])
                nv = w[:, k]
                ok = inside[:, k]
                adv[pos[ok, k]] = np.where(valid[ok, k], x[ok], 0.0)
                ret[pos[ok, k]] = np.where(valid[ok, k], x[ok] + w[ok, k], 0.0)
            ca, cnv = block_span[0] * ca + (block_span[1] * cnv + bu), bw
            base -= tile
            continue
        steps = valid if skip else inside
        mine = _identity(threads)
        for k in range(ITEMS - 1, -1, -1):
            st = (np.full(threads, gl), np.full(threads, gamma), u[:, k], np.zeros(threads), w[:, k])
            new = _then(mine, st)
            mine = tuple(np.where(steps[:, k], a, b) for a, b in zip(new, mine))
        inc = _warp_scan_maps(mine)
        last_lanes = np.arange(n_warps) * WARP + WARP - 1
        tot = _identity(WARP)
        tot = tuple(np.concatenate([x[last_lanes], t[n_warps:]]) for x, t in zip(inc, tot))
        tot = _warp_scan_maps(tot)
        blk = tuple(x[n_warps - 1] for x in tot)
        if summary:
            chunk_map = _then(chunk_map, blk)
            base -= tile
            continue
        for t in range(threads):
            prefix = tuple(x[t - 1] for x in inc) if lane[t] > 0 else (1.0, 0.0, 0.0, 1.0, 0.0)
            if warp[t] > 0:
                prefix = _then(tuple(x[warp[t] - 1] for x in tot), prefix)
            x = prefix[0] * ca + prefix[1] * cnv + prefix[2]
            nv = prefix[3] * cnv + prefix[4]
            for k in range(ITEMS - 1, -1, -1):
                if steps[t, k]:
                    x = gl * x + gamma * nv + u[t, k]
                    nv = w[t, k]
                if inside[t, k]:
                    adv[pos[t, k]] = x if valid[t, k] else 0.0
                    ret[pos[t, k]] = x + w[t, k] if valid[t, k] else 0.0
        ca, cnv = blk[0] * ca + blk[1] * cnv + blk[2], blk[3] * cnv + blk[4]
        base -= tile
    return adv, ret, chunk_map, paths


def emulate_gae(r, v, m, gamma, lam, skip, threads, chunk, n_chunks):
    """Both launches of fastrlhf_gae_fwd on [B, T] fp64 arrays (v None: returns)."""
    B, T = r.shape
    v = np.zeros_like(r) if v is None else v
    gl = gamma * lam
    adv, ret = np.zeros((B, T)), np.zeros((B, T))
    chunk = chunk if n_chunks > 1 else T
    maps = np.zeros((B, n_chunks, 5))
    all_paths = []
    for b in range(B):
        for c in range(1, n_chunks):
            lo, end = c * chunk, min((c + 1) * chunk, T)
            *_, mp, paths = gae_row_tiles(r[b], v[b], m[b], gamma, gl, skip, threads, lo, end, T, n_chunks,
                                          (0.0, 0.0), True)
            maps[b, c] = mp
            all_paths += paths
        for c in range(n_chunks):
            lo, end = c * chunk, min((c + 1) * chunk, T)
            later = (1.0, 0.0, 0.0, 1.0, 0.0)
            for k in range(n_chunks - 1, c, -1):  # later_chunks: chunk n-1 first
                later = _then(later, tuple(maps[b, k]))
            a, rt, _, paths = gae_row_tiles(r[b], v[b], m[b], gamma, gl, skip, threads, lo, end, T, n_chunks,
                                            (later[2], later[4]), False)
            adv[b, lo:end], ret[b, lo:end] = a[lo:end], rt[lo:end]
            all_paths += paths
    return adv, ret, all_paths


def _gae_masks(B, T, rng):
    """Random holes, prompt + response + padding (one run), all valid, all masked, one valid
    token, runs that end exactly on tile boundaries, and a hole inside one thread's group."""
    kinds = []
    for b in range(B):
        kind = b % 7
        if kind == 0:
            mk = rng.random(T) < 0.7
        elif kind == 1:
            mk = np.zeros(T, bool)
            a, e = sorted(rng.integers(0, T + 1, 2))
            mk[a:e] = True
        elif kind == 2:
            mk = np.ones(T, bool)
        elif kind == 3:
            mk = np.zeros(T, bool)
        elif kind == 4:
            mk = np.zeros(T, bool)
            mk[rng.integers(0, T)] = True
        elif kind == 5:
            mk = np.ones(T, bool)
            mk[: min(T, 128)] = False  # a masked first tile of 32-thread blocks
            mk[-min(T, 5):] = False
        else:
            mk = np.ones(T, bool)
            mk[T // 2] = False  # one hole
        kinds.append(mk)
    return np.stack(kinds)


@pytest.mark.parametrize("skip", [True, False], ids=["skip", "zero"])
@pytest.mark.parametrize("T, threads, tiles_per_chunk", [(1, 32, None), (37, 32, None), (128, 32, None),
                                                         (300, 32, None), (1000, 64, None), (1000, 32, 2),
                                                         (4099, 128, 1), (4099, 32, 3)])
def test_gae_emulation_matches_reference(T, threads, tiles_per_chunk, skip):
    """The emulated kernel (whole rows, or rows cut into chunks of tiles_per_chunk tiles)
    against the fp64 reference, values and discounted returns, on masks that take every path
    (fast, empty, general) with zero and nonzero carries; each path is taken somewhere."""
    from fastrlhf.reference import advantages as ref_adv

    rng = np.random.default_rng(T * 7 + threads + (tiles_per_chunk or 0) + skip)
    B = 14
    tile = threads * ITEMS
    if tiles_per_chunk:
        chunk = tiles_per_chunk * tile
        n_chunks = -(-T // chunk)
    else:
        chunk, n_chunks = T, 1
    r, v = rng.standard_normal((B, T)), rng.standard_normal((B, T))
    m = _gae_masks(B, T, rng)
    holes = "skip" if skip else "zero"
    seen = set()
    for gamma, lam in ((0.99, 0.95), (1.0, 1.0), (0.9, 0.0)):
        adv, ret, paths = emulate_gae(r, v, m, gamma, lam, skip, threads, chunk, n_chunks)
        seen |= set(paths)
        want_adv, want_ret = ref_adv.gae(torch.from_numpy(r), torch.from_numpy(v), torch.from_numpy(m), gamma, lam,
                                         holes)
        np.testing.assert_allclose(adv, want_adv.numpy(), atol=1e-9, rtol=1e-9)
        np.testing.assert_allclose(ret, want_ret.numpy(), atol=1e-9, rtol=1e-9)
        got, _, _ = emulate_gae(r, None, m, gamma, 1.0, skip, threads, chunk, n_chunks)
        want = ref_adv.discounted_returns(torch.from_numpy(r), torch.from_numpy(m), gamma, holes)
        np.testing.assert_allclose(got, want.numpy(), atol=1e-9, rtol=1e-9)
    if T >= 128:
        assert seen >= ({"fast", "empty", "general"} if skip else {"fast"}), seen


def test_gae_one_run_rows_take_the_fast_path():
    """Rows of prompt + response + padding in skip mode (one run of valid tokens) take the
    fast path in one tile, as do all-valid tiles of long rows; a hole sends a tile to the
    general path."""
    T, threads = 2048, 512
    m = np.zeros((3, T), bool)
    m[0, 300:1700] = True
    m[1, :] = True
    m[2, 300:1700] = True
    m[2, 1000] = False
    r = np.random.default_rng(0).standard_normal((3, T))
    for b, want in ((0, ["fast"]), (1, ["fast"]), (2, ["general"])):
        *_, paths = emulate_gae(r[b:b + 1], r[b:b + 1], m[b:b + 1], 0.99, 0.95, True, threads, T, 1)
        assert paths == want


# ------------------------------------------------------------- KL and PPO token loops
def make_fast_div(d):
    """kernels/common.cuh make_fast_div."""
    l = 0
    while (1 << l) < d:
        l += 1
    magic = ((1 << 32) * ((1 << l) - d)) // d + 1
    return d, magic, min(l, 1), max(l - 1, 0)


def divide(f, n):
    """kernels/common.cuh divide: 32-bit arithmetic."""
    d, magic, s1, s2 = f
    t = (magic * n) >> 32
    return ((t + (((n - t) & 0xFFFFFFFF) >> s1)) & 0xFFFFFFFF) >> s2


def test_fast_division_is_exact():
    """The invariant-divisor division equals n // d for every 32-bit n tried, edges included,
    at every divisor size (the PPO kernels' row of a token)."""
    rng = np.random.default_rng(0)
    divisors = [1, 2, 3, 4, 5, 7, 8, 9, 127, 128, 129, 1000, 2047, 2048, 2049, 65535, 65536, 65537,
                (1 << 31) - 1, 1 << 31, *rng.integers(1, 1 << 31, 40).tolist()]
    ns = [0, 1, 2, 3, (1 << 31) - 1, 1 << 31, (1 << 32) - 2, (1 << 32) - 1, *rng.integers(0, 1 << 32, 300).tolist()]
    for d in divisors:
        f = make_fast_div(int(d))
        assert 0 < f[1] < (1 << 32) or d == 1
        for n in ns + [d - 1, d, d + 1, 2 * d - 1, 2 * d]:
            if 0 <= n < (1 << 32):
                assert divide(f, int(n)) == n // d, (d, n)


def _walk(T, step):
    """kernels/ppo.cu walk_of: (FastDiv of T, q, r) with step = q T + r."""
    return make_fast_div(T), step // T, step % T


def _advance(row, col, q, r, T):
    row, col = row + q, col + r
    if col >= T:
        col, row = col - T, row + 1
    return row, col


@pytest.mark.parametrize("n, T", [(1, 1), (7, 1), (37, 3), (4096, 2048), (4099, 5), (10007, 13), (70001, 4096)])
def test_ppo_token_loops_cover_every_token_once_with_its_row(n, T):
    """The forward's parts (chunk rounded to whole groups, main loop of groups, the tail one
    token per thread) and the backward's grid-stride loop (groups, then the tail), as
    kernels/ppo.cu runs them for 256-thread blocks: every token is handled once, and the row
    that the division-free walk gives it is token // T."""
    threads = 256
    for g in (4, 1):
        # forward: n_parts as the op layer makes them (2048 tokens per partial)
        n_parts = -(-n // 2048)
        chunk = -(-(-(-n // n_parts)) // g) * g
        step = g * threads
        fd, q, r = _walk(T, step)
        seen = np.zeros(n, int)
        for part in range(n_parts):
            lo, hi = part * chunk, min(part * chunk + chunk, n)
            for tid in range(threads):
                i = lo + g * tid
                row, col = (i // T, i % T) if i < hi else (0, 0)
                while i + g <= hi:
                    for k in range(g):
                        assert row + divide(fd, col + k) == (i + k) // T
                        seen[i + k] += 1
                    row, col = _advance(row, col, q, r, T)
                    i += step
                if g > 1:
                    j = lo + (hi - lo) // g * g + tid
                    if j < hi:
                        seen[j] += 1
        assert (seen == 1).all()
        # backward: elementwise_blocks(n / g) blocks of 256, grid stride over groups
        groups = n // g
        blocks = max(1, min(-(-groups // threads), 65536))
        fd, q, r = _walk(T, g * threads * blocks)
        seen = np.zeros(n, int)
        for first in range(blocks * threads):
            i0 = g * first
            row, col = (i0 // T, i0 % T) if i0 < n else (0, 0)
            for gi in range(first, groups, blocks * threads):
                for k in range(g):
                    assert row + divide(fd, col + k) == (gi * g + k) // T
                    seen[gi * g + k] += 1
                row, col = _advance(row, col, q, r, T)
            if g > 1 and groups * g + first < n:
                seen[groups * g + first] += 1
        assert (seen == 1).all()


def test_mask_bits_of_every_width():
    """mask_group's bit tests for 1-, 4- and 8-byte masks: nonzero is valid, a float mask's
    -0.0 is not, NaN is (as torch's mask != 0)."""
    values = torch.tensor([0.0, -0.0, 1.0, float("nan"), -2.5, 0.0, 3.0, -0.0])
    want = values != 0
    for dtype in (torch.float32, torch.float64, torch.int32, torch.int64, torch.bool, torch.uint8):
        m = values.nan_to_num(7.0).to(dtype) if not dtype.is_floating_point else values.to(dtype)
        raw = m.numpy().view(np.uint8).reshape(8, -1)
        size = raw.shape[1]
        words = [int.from_bytes(bytes(raw[k]), "little") for k in range(8)]
        if size == 1:
            bits = [w != 0 for w in words]
        elif size == 4:
            sign = 0x7FFFFFFF if dtype.is_floating_point else 0xFFFFFFFF
            bits = [(w & sign) != 0 for w in words]
        else:
            sign = 0x7FFFFFFF if dtype.is_floating_point else 0xFFFFFFFF
            bits = [((w & 0xFFFFFFFF) | ((w >> 32) & sign)) != 0 for w in words]
        expect = want if dtype.is_floating_point else (m != 0)
        assert bits == expect.tolist(), dtype
