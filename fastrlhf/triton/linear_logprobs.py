"""Triton kernels for token log-probs straight from hidden states (LM head + log-softmax + gather).

Two designs share the math of this module (``fastrlhf.ops.linear_logprobs`` runs them):

``blas`` (the default): the GEMMs run in the vendor BLAS (``torch.mm`` into an fp32 block of
logits); these kernels are the softmax work between them, one program per row of a block:

* ``_fold_kernel``: folds a block of logits into per-row running values (max, sum of
  exponentials, the entropy, log-sum-of-squares and mean-logit sums, the label's logit and
  the largest logit left of the label), in a fixed column order; the block that ends a row
  writes the outputs instead.
* ``_dlogits_kernel``: turns a block of logits into ``d loss / d logits`` in place, in the
  inputs' dtype: the operand of the two gradient GEMMs.

``fused`` (all Triton): the logits tile is a ``tl.dot`` of the kernel itself and never
leaves registers:

* ``_fused_fwd_kernel`` + ``_combine_kernel``: program ``(row tile, vocabulary split)``
  keeps the same running values per row and split; the splits are merged in a fixed order.
* ``_fused_dlogits_kernel``: recomputes a logits tile and writes its ``dlogits`` into a
  workspace in the inputs' dtype (the gradient GEMMs then run in the vendor BLAS too).

With ``y`` the head's output (bias included), ``z = logit_scale * y / T`` or, soft-capped,
``z = (softcap / T) * tanh(logit_scale * y / softcap)``; with ``log p = z - m - log s``:
``dz = g_logp (1[label] - p) - g_ent p (log p + H) + 2 g_lsq (p^2 / sum p^2 - p) + g_mean / V``
and ``dy = dz * logit_scale / T * (1 - tanh^2)`` (no last factor without soft-capping).
Inside the kernels ``z = k r`` with the raw logit ``r = y`` (soft-capped ``tanh(logit_scale
* y / softcap)``) and ``k = logit_scale / T`` (``softcap / T``). The running max is of ``r``
and an element's exponent is ``(r - max) k log2(e)`` (``log2(e)`` folded into the constant,
one subtraction, one multiply and one ``exp2``): the max is subtracted before scaling, exact
near it (Sterbenz), so logits of 1e3 or more cost no more precision than small ones (a
rounded ``z`` would cost ``ulp(z)`` in every ``log p``). The outputs and the row statistics
kept for backward are in natural units, the log-sum carrying the rounding of the max's
conversion (see :func:`_finish`); backward's exponent is ``(r k - max) log2(e) - log s
log2(e)`` from two FMAs. The row kernels read the label's logit with one load and write its
gradient after the row's loop instead of comparing every column with the label.
Compiled SASS (sm_90, bf16, 2048-column steps, ``python -m bench.static --only
'linear*'``): the fold's loop is 9.4 instructions per element (12.75 with the entropy,
41.75 with soft-capping and every statistic), ``dlogits``' 7.75 (11.75, 37.9). An H100
issues about 37 per fp32 element it reads at full memory bandwidth (55 for ``dlogits``,
which also writes 2 bytes): memory-bound but for the fold with soft-capping and every
statistic, predicted at about 90 % of the bandwidth.

``tl.dot`` on bf16 operands returns garbage under the Triton interpreter, so the operands
are cast to fp32 only when ``INTERPRET`` (products of bf16/fp16 values are exact in fp32,
so this models the tensor-core result); compiled runs keep bf16/fp16 tensor-core dots.
fp32 inputs use ``input_precision="ieee"`` unless ``torch.get_float32_matmul_precision()``
allows TF32, as ``torch.matmul`` does.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from fastrlhf.interpreter import triton_interpreter
from fastrlhf.triton._common import cdiv

_NEG_INF = tl.constexpr(float("-inf"))
_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)
_LOWEST = tl.constexpr(-3.4028234663852886e38)  # fp32's lowest: -inf clamped, so 0 * it is 0

WORKSPACE_FRACTION = 0.05
"""The block of logits held at once has at most this fraction of the ``N * V`` logits..."""
WORKSPACE_ELEMS = 2**22
"""...or this many elements (16 MiB of fp32), whichever is more: small problems run in one
block instead of many tiny GEMMs."""
COL_ALIGN = 128
"""Block widths are multiples of this (aligned GEMM operands, whole tensor-core tiles)."""
MIN_ROWS = 16


def plan(N: int, V: int) -> tuple[int, int]:
    """``(rows, cols)`` of the blocks of logits: ``rows * cols <= max(WORKSPACE_FRACTION * N * V,
    WORKSPACE_ELEMS)`` (``cols`` may round up to ``COL_ALIGN``, ``rows`` to ``MIN_ROWS``).

    All rows at once whenever the budget leaves ``COL_ALIGN`` columns for them (always for
    ``V >= 20 * COL_ALIGN`` above the floor): then ``grad_weight`` is one GEMM per block
    with no running sum across row blocks. The vocabulary splits into equal widths; since
    the budget grows with ``N``, so does the block, and the number of vocabulary blocks
    (each one a read and write of the fp32 ``grad_hidden`` sum) stays ``<= 1 / fraction``.
    """
    budget = max(math.ceil(WORKSPACE_FRACTION * N * V), WORKSPACE_ELEMS)
    widest = max(COL_ALIGN, budget // max(N, 1) // COL_ALIGN * COL_ALIGN)
    cols = V if widest >= V else cdiv(cdiv(V, cdiv(V, widest)), COL_ALIGN) * COL_ALIGN
    return max(1, min(N, max(MIN_ROWS, budget // cols))), cols


# ------------------------------------------------------------------------- shared helpers
@triton.jit
def _tanh(x):
    """fp32 tanh to a few ulp, from ``exp2`` (no libdevice: the interpreter runs it too)."""
    a = tl.abs(x)
    e = tl.exp2(a * -2.8853900817779268)  # exp(-2a)
    big = (1.0 - e) / (1.0 + e)
    a2 = a * a  # below 1/8 the series (error < 1e-12) avoids the cancellation in 1 - e
    small = a * (1.0 + a2 * (-0.3333333333333333 + a2 * (0.13333333333333333 + a2 * (
        -0.05396825396825397 + a2 * 0.021869488536155203))))
    r = tl.where(a < 0.125, small, big)
    return tl.where(x < 0, -r, r)


@triton.jit
def _raw(y, k_in, HAS_CAP: tl.constexpr):
    """The raw logit ``r`` of head outputs ``y``: ``y``, or soft-capped ``tanh(k_in y)``
    (``k_in = scale / cap``). The base-2 logit is ``z2 = k2 r`` (see :func:`_k2`)."""
    if HAS_CAP:
        return _tanh(y * k_in)
    else:
        return y


@triton.jit
def _k2(k_z, k_cap, HAS_CAP: tl.constexpr):
    """``k2``, the base-2 logit per unit of raw logit: ``k_z = scale log2(e) / T``, or
    soft-capped ``k_cap = cap log2(e) / T``. Its natural-unit twin ``k2 * ln 2`` (the
    factor of the row max in the stats) is rounded the same way wherever it is used."""
    if HAS_CAP:
        return k_cap
    else:
        return k_z


@triton.jit
def _merge(m1, s1, t1, q1, m2, s2, t2, q2, k2):
    """Running ``(m, s, t, q)`` of two column ranges, each relative to its own max ``m`` of
    the raw logits ``r``: ``s = sum e``, ``t = sum e a``, ``q = sum e^2`` with ``a = (r - m) k2``
    (base 2) and ``e = 2**a``."""
    m = tl.maximum(m1, m2)
    shift = tl.where(m == _NEG_INF, 0.0, m)  # rows of -inf so far: keep the exponent finite
    d1 = (m1 - shift) * k2  # -inf for m1 = -inf (k2 > 0)
    d2 = (m2 - shift) * k2
    a1 = tl.exp2(d1)
    a2 = tl.exp2(d2)
    d1 = tl.where(m1 == _NEG_INF, 0.0, d1)
    d2 = tl.where(m2 == _NEG_INF, 0.0, d2)
    s = a1 * s1 + a2 * s2
    t = a1 * (t1 + d1 * s1) + a2 * (t2 + d2 * s2)
    q = a1 * a1 * q1 + a2 * a2 * q2
    return m, s, t, q


@triton.jit
def _finish(rows, row_ok, label, m, s, t, q, rsum, label_rel, left_rel, k2, V, ignore_index,
            logp_ptr, ent_ptr, stats_ptr, lsq_ptr, mean_ptr, top1_ptr,
            WITH_ENTROPY: tl.constexpr, WITH_LSQ: tl.constexpr, WITH_MEAN: tl.constexpr,
            WITH_TOP1: tl.constexpr):
    """Store the outputs (natural units) of rows whose running values cover the whole
    vocabulary: ``m`` the max of the raw logits, ``(s, t, q)`` relative to it in base 2
    (:func:`_merge`), ``rsum`` the sum of the raw logits.

    ``label_rel = r[label] - m`` and ``left_rel = (max of r left of the label) - m`` (exact
    near the max, Sterbenz: ``a - m == 0`` only for ``a == m``). Passing the differences
    keeps each loop result of the callers to one use (Triton 3.6 asserts otherwise in
    ``OptimizeThreadLocality``).

    Stats in natural units: the max ``M = m k`` (``k = k2 ln 2``, rounded) and the log-sum
    plus the max's rounding ``m k - M`` (exact: an FMA gives a product's rounding error), so
    that ``M + stats[1]`` is the row's log-sum-exp to the rounding of small numbers however
    large the logits (vocab-parallel shards combine them in natural units), and backward's
    ``(r k - M) log2(e) - stats[1] log2(e)`` (two FMAs, :func:`_grad_logits`) is forward's
    ``(r - m) k2 - log2 s`` to that rounding, not to ``ulp(M)``."""
    s = tl.where(row_ok, s, 1.0)  # rows past the end: no log(0) warnings
    q = tl.where(row_ok, q, 1.0)
    log2_s = tl.log2(s)
    keep = label != ignore_index
    in_range = (label >= 0) & (label < V)
    # Clamps keep NaN (the default drops it: NaN/+inf logits would give 0, not NaN)
    logp = tl.minimum((label_rel * k2 - log2_s) * _LN2, 0.0, propagate_nan=tl.PropagateNan.ALL)
    logp = tl.where(in_range, logp, float("nan"))
    tl.store(logp_ptr + rows, tl.where(keep, logp, 0.0), mask=row_ok)
    k = k2 * _LN2
    big_m = m * k
    residual = tl.where(m == _NEG_INF, 0.0, tl.fma(m, k, -big_m))
    tl.store(stats_ptr + 2 * rows, big_m, mask=row_ok)
    tl.store(stats_ptr + 2 * rows + 1, tl.fma(log2_s, _LN2, residual), mask=row_ok)
    if WITH_ENTROPY:
        ent = tl.maximum((log2_s - t / s) * _LN2, 0.0, propagate_nan=tl.PropagateNan.ALL)
        tl.store(ent_ptr + rows, tl.where(keep, ent, 0.0), mask=row_ok)
    if WITH_LSQ:
        lsq = tl.minimum((tl.log2(q) - 2.0 * log2_s) * _LN2, 0.0, propagate_nan=tl.PropagateNan.ALL)
        tl.store(lsq_ptr + rows, tl.where(keep, lsq, 0.0), mask=row_ok)
    if WITH_MEAN:
        tl.store(mean_ptr + rows, tl.where(keep, rsum * k / V, 0.0), mask=row_ok)
    if WITH_TOP1:
        tl.store(top1_ptr + rows, keep & in_range & (label_rel >= 0) & (left_rel < 0), mask=row_ok)


@triton.jit
def _grad_logits(r, hit, big_m, ls2, k, g_logp, g_ent, ent, g_lsq, lsq2, g_mean_v, k_grad,
                 HAS_CAP: tl.constexpr, WITH_ENTROPY: tl.constexpr, WITH_LSQ: tl.constexpr,
                 WITH_MEAN: tl.constexpr):
    """``d loss / d y`` (fp32) of raw logits ``r`` (:func:`_raw`); per-row values come
    broadcastable to ``r``: ``big_m`` the stats' max (natural units), ``ls2`` their log-sum
    and ``lsq2`` the log sum p^2, times log2(e); ``k = k2 ln 2`` (:func:`_finish`); upstream
    gradients already zero on ignored rows; ``g_mean_v = g_mean / V``.

    ``log2 p = (r k - M) log2(e) - ls2``: the product ``r k`` is exact inside the FMA, so
    ``r k - M`` is ``(r - m) k`` plus the max's rounding (which ``ls2`` carries) rounded once."""
    logq2 = tl.fma(tl.fma(r, k, -big_m), _LOG2E, -ls2)
    p = tl.exp2(logq2)
    g = tl.where(hit, g_logp, 0.0) - g_logp * p
    if WITH_ENTROPY:  # p (log p + H), 0 where p = 0 (log p = -inf)
        g -= g_ent * p * tl.maximum(logq2 * _LN2 + ent, _LOWEST)
    if WITH_LSQ:
        g += 2.0 * g_lsq * (tl.exp2(2.0 * logq2 - lsq2) - p)
    if WITH_MEAN:
        g += g_mean_v
    g = g * k_grad
    if HAS_CAP:
        g = g * (1.0 - r * r)
    return g


# ------------------------------------------------------------------ the blas design's epilogues
@triton.jit
def _fold_kernel(
    tile_ptr, ld, bias_ptr, labels_ptr, state_ptr,
    logp_ptr, ent_ptr, stats_ptr, lsq_ptr, mean_ptr, top1_ptr,
    w, v0, V, k_z, k_cap, k_in, ignore_index,
    HAS_BIAS: tl.constexpr, HAS_CAP: tl.constexpr, FIRST: tl.constexpr, LAST: tl.constexpr,
    WITH_ENTROPY: tl.constexpr, WITH_LSQ: tl.constexpr, WITH_MEAN: tl.constexpr,
    WITH_TOP1: tl.constexpr, BLOCK: tl.constexpr, VEC: tl.constexpr,
):
    """Row ``i`` of ``tile [n, w]`` (columns ``v0 + j`` of the vocabulary) into ``state [n, 8]``.

    A step is a ``[BLOCK / VEC, VEC]`` tile: each thread loads VEC consecutive values (one
    16-byte load) and keeps its own running max (of the raw logits) and sums (base 2), so an
    element costs a subtraction, a multiply, one ``exp2`` and the sums; no value crosses
    threads inside the loop (no barrier, no shuffle). The thread-rows are merged once at the
    end."""
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row).to(tl.int64)
    local = label - v0
    offs = tl.arange(0, BLOCK // VEC)[:, None] * VEC + tl.arange(0, VEC)[None, :]
    row_ptr = tile_ptr + row * ld
    # the label's logit: one load (not a compare per element)
    in_tile = (local >= 0) & (local < w)
    y_label = tl.load(row_ptr + tl.where(in_tile, local, 0))
    if HAS_BIAS:
        y_label += tl.load(bias_ptr + v0 + tl.where(in_tile, local, 0)).to(tl.float32)
    r_label = _raw(y_label, k_in, HAS_CAP)
    k2 = _k2(k_z, k_cap, HAS_CAP)
    m = tl.full([BLOCK // VEC], _NEG_INF, tl.float32)
    s = tl.zeros([BLOCK // VEC], tl.float32)
    t = tl.zeros([BLOCK // VEC], tl.float32)
    q = tl.zeros([BLOCK // VEC], tl.float32)
    rsum = tl.zeros([BLOCK // VEC], tl.float32)
    left = tl.full([BLOCK // VEC], _NEG_INF, tl.float32)
    for c0 in range(0, w, BLOCK):
        cols = c0 + offs
        ok = cols < w
        y = tl.load(row_ptr + cols, mask=ok, other=0.0)
        if HAS_BIAS:
            y += tl.load(bias_ptr + v0 + cols, mask=ok, other=0.0).to(tl.float32)
        r = tl.where(ok, _raw(y, k_in, HAS_CAP), _NEG_INF)
        m_new = tl.maximum(m, tl.max(r, axis=1))
        shift = tl.where(m_new == _NEG_INF, 0.0, m_new)
        d = (m - shift) * k2  # -inf while m = -inf: alpha = 0
        alpha = tl.exp2(d)
        # the max is subtracted before scaling: exact near it (Sterbenz), however large r is
        arg = (r - shift[:, None]) * k2
        e = tl.exp2(arg)
        if WITH_ENTROPY:  # t is relative to the running max: moving the max by d adds d * s
            t = alpha * (t + tl.where(m == _NEG_INF, 0.0, d) * s)
            t += tl.sum(e * tl.maximum(arg, _LOWEST), axis=1)  # (-inf, e = 0: 0, not NaN)
        if WITH_LSQ:
            q = q * (alpha * alpha) + tl.sum(e * e, axis=1)
        s = s * alpha + tl.sum(e, axis=1)
        m = m_new
        if WITH_MEAN:
            rsum += tl.sum(tl.where(ok, r, 0.0), axis=1)
        if WITH_TOP1:
            left = tl.maximum(left, tl.max(tl.where(cols < local, r, _NEG_INF), axis=1))
    m_r = tl.max(m, axis=0)
    shift = tl.where(m_r == _NEG_INF, 0.0, m_r)
    d = (m - shift) * k2
    alpha = tl.exp2(d)
    s_r = tl.sum(alpha * s, axis=0)
    t_r = tl.sum(alpha * (t + tl.where(m == _NEG_INF, 0.0, d) * s), axis=0)
    q_r = tl.sum(alpha * alpha * q, axis=0)
    rsum_r = tl.sum(rsum, axis=0)
    rl_r = tl.where(in_tile, r_label, 0.0)
    left_r = tl.max(left, axis=0)
    m = m_r
    st = state_ptr + row * 8
    if not FIRST:
        m, s_r, t_r, q_r = _merge(tl.load(st), tl.load(st + 1), tl.load(st + 2), tl.load(st + 3),
                                  m, s_r, t_r, q_r, k2)
        rsum_r += tl.load(st + 4)
        rl_r += tl.load(st + 5)
        left_r = tl.maximum(left_r, tl.load(st + 6))
    if LAST:
        _finish(row, row >= 0, label, m, s_r, t_r, q_r, rsum_r, rl_r - m, left_r - m, k2, V, ignore_index,
                logp_ptr, ent_ptr, stats_ptr, lsq_ptr, mean_ptr, top1_ptr,
                WITH_ENTROPY, WITH_LSQ, WITH_MEAN, WITH_TOP1)
    else:
        tl.store(st, m)
        tl.store(st + 1, s_r)
        tl.store(st + 2, t_r)
        tl.store(st + 3, q_r)
        tl.store(st + 4, rsum_r)
        tl.store(st + 5, rl_r)
        tl.store(st + 6, left_r)


@triton.jit
def _dlogits_kernel(
    tile_ptr, dz_ptr, ld, ld_dz, bias_ptr, labels_ptr, stats_ptr,
    glogp_ptr, gent_ptr, ent_ptr, glsq_ptr, lsq_ptr, gmean_ptr,
    w, v0, inv_V, k_z, k_cap, k_in, k_grad,
    HAS_BIAS: tl.constexpr, HAS_CAP: tl.constexpr, WITH_ENTROPY: tl.constexpr,
    WITH_LSQ: tl.constexpr, WITH_MEAN: tl.constexpr, BLOCK: tl.constexpr,
):
    """Row ``i`` of the fp32 ``tile`` becomes ``dlogits`` in ``dz``'s dtype, in place: ``dz``
    aliases ``tile`` with row ``i`` at the start of the tile's row ``i`` (``ld_dz = 2 * ld``
    for 16-bit ``dz``). Block ``c`` of a row is stored over fp32 elements ``[c B / 2, (c + 1) B / 2)``,
    all read by earlier blocks or by this one before the barrier: no element is overwritten
    before every warp of the program has loaded it (``bar.sync`` orders the loads before it
    ahead of the stores after it)."""
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row).to(tl.int64)
    big_m = tl.load(stats_ptr + 2 * row)
    ls2 = tl.load(stats_ptr + 2 * row + 1) * _LOG2E
    k = _k2(k_z, k_cap, HAS_CAP) * _LN2  # rounded as the forward's (see _finish)
    g_logp = tl.load(glogp_ptr + row)
    g_ent = 0.0
    ent = 0.0
    g_lsq = 0.0
    lsq2 = 0.0
    g_mean_v = 0.0
    if WITH_ENTROPY:
        g_ent = tl.load(gent_ptr + row)
        ent = tl.load(ent_ptr + row)
    if WITH_LSQ:
        g_lsq = tl.load(glsq_ptr + row)
        lsq2 = tl.load(lsq_ptr + row) * _LOG2E
    if WITH_MEAN:
        g_mean_v = tl.load(gmean_ptr + row) * inv_V
    # The label's column: its logit read before the loop overwrites it, its gradient (with
    # the one-hot term) written after, instead of a compare per element.
    local = label - v0
    in_tile = (local >= 0) & (local < w)
    local = tl.where(in_tile, local, 0)
    y_label = tl.load(tile_ptr + row * ld + local)
    if HAS_BIAS:
        y_label += tl.load(bias_ptr + v0 + local).to(tl.float32)
    lanes = tl.arange(0, BLOCK)
    for c0 in range(0, w, BLOCK):
        cols = c0 + lanes
        ok = cols < w
        y = tl.load(tile_ptr + row * ld + cols, mask=ok, other=0.0)
        if HAS_BIAS:
            y += tl.load(bias_ptr + v0 + cols, mask=ok, other=0.0).to(tl.float32)
        g = _grad_logits(_raw(y, k_in, HAS_CAP), False, big_m, ls2, k, g_logp, g_ent, ent, g_lsq, lsq2,
                         g_mean_v, k_grad, HAS_CAP, WITH_ENTROPY, WITH_LSQ, WITH_MEAN)
        tl.debug_barrier()
        tl.store(dz_ptr + row * ld_dz + cols, g.to(dz_ptr.dtype.element_ty), mask=ok)
    g = _grad_logits(_raw(y_label, k_in, HAS_CAP), True, big_m, ls2, k, g_logp, g_ent, ent, g_lsq, lsq2,
                     g_mean_v, k_grad, HAS_CAP, WITH_ENTROPY, WITH_LSQ, WITH_MEAN)
    tl.debug_barrier()  # after every warp's last store of the loop
    tl.store(dz_ptr + row * ld_dz + local, g.to(dz_ptr.dtype.element_ty), mask=in_tile)


# ------------------------------------------------------------------------ the fused design
@triton.jit
def _grouped(pid, num_a, num_b, GROUP: tl.constexpr):
    """Tile ``(a, b)`` of program ``pid``, with ``GROUP`` consecutive ``a`` tiles per column
    of programs so that programs running together share operand tiles in L2."""
    width = GROUP * num_b
    first = (pid // width) * GROUP
    size = tl.minimum(num_a - first, GROUP)
    return first + (pid % width) % size, (pid % width) // size


@triton.jit
def _logits_tile(x_ptr, w_ptr, b_ptr, rows, cols, col_ok, N, H, sxn, sxk, swv, swk,
                 HAS_BIAS: tl.constexpr, INTERPRET: tl.constexpr, PRECISION: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 ``[BLOCK_N, BLOCK_V]`` tile of ``x[rows] @ w[cols].T + b[cols]`` (``rows``/``cols`` int64)."""
    ks = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows[:, None] * sxn + ks[None, :] * sxk
    w_ptrs = w_ptr + cols[None, :] * swv + ks[:, None] * swk
    row_ok = rows < N
    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    for k in range(0, H, BLOCK_K):
        k_ok = ks < H - k
        a = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if INTERPRET:  # bf16 tl.dot is wrong under the interpreter; fp32 products are exact
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        x_ptrs += BLOCK_K * sxk
        w_ptrs += BLOCK_K * swk
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _fused_fwd_kernel(
    x_ptr, w_ptr, b_ptr, labels_ptr, part_ptr,
    N, V, H, sxn, sxk, swv, swk, k_z, k_cap, k_in, splits, tiles_per_split, step,
    HAS_BIAS: tl.constexpr, HAS_CAP: tl.constexpr, WITH_ENTROPY: tl.constexpr,
    WITH_LSQ: tl.constexpr, WITH_MEAN: tl.constexpr, WITH_TOP1: tl.constexpr,
    INTERPRET: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Consecutive programs share a row tile (x in L2); programs of one split walk the
    # same vocabulary tiles at the same time (W in L2).
    pid = tl.program_id(0)
    split = pid % splits
    rows = (pid // splits).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    labels = tl.load(labels_ptr + rows, mask=rows < N, other=-1).to(tl.int64)
    k2 = _k2(k_z, k_cap, HAS_CAP)
    m = tl.full([BLOCK_N], _NEG_INF, tl.float32)
    s = tl.zeros([BLOCK_N], dtype=tl.float32)
    t = tl.zeros([BLOCK_N], dtype=tl.float32)
    q = tl.zeros([BLOCK_N], dtype=tl.float32)
    rsum = tl.zeros([BLOCK_N], dtype=tl.float32)
    r_label = tl.zeros([BLOCK_N], dtype=tl.float32)
    left = tl.full([BLOCK_N], _NEG_INF, tl.float32)
    v_begin = split * tiles_per_split * BLOCK_V
    v_end = tl.minimum(V, v_begin + tiles_per_split * BLOCK_V)
    for v0 in range(v_begin, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        col_ok = cols < V
        y = _logits_tile(x_ptr, w_ptr, b_ptr, rows, cols, col_ok, N, H, sxn, sxk, swv, swk,
                         HAS_BIAS, INTERPRET, PRECISION, BLOCK_N, BLOCK_V, BLOCK_K)
        r = tl.where(col_ok[None, :], _raw(y, k_in, HAS_CAP), _NEG_INF)
        m_new = tl.maximum(m, tl.max(r, axis=1))
        shift = tl.where(m_new == _NEG_INF, 0.0, m_new)
        d = (m - shift) * k2
        alpha = tl.exp2(d)
        # (r - shift) k2 as in _fold_kernel, from an FMA: r k2 - round(shift k2) is exact but
        # for one rounding, and the rounding of shift k2 (exact, another FMA) is taken back.
        # The same value to a rounding of a number near 0 by the max; this form keeps the
        # soft-capped kernel with every statistic from spilling in its loop (sm_90).
        shift2 = shift * k2
        arg = tl.fma(r, k2, -shift2[:, None]) - tl.fma(shift, k2, -shift2)[:, None]
        e = tl.exp2(arg)
        if WITH_ENTROPY:
            t = alpha * (t + tl.where(m == _NEG_INF, 0.0, d) * s)
            t += tl.sum(e * tl.maximum(arg, _LOWEST), axis=1)
        if WITH_LSQ:
            q = q * (alpha * alpha) + tl.sum(e * e, axis=1)
        s = s * alpha + tl.sum(e, axis=1)
        m = m_new
        if WITH_MEAN:
            rsum += tl.sum(tl.where(col_ok[None, :], r, 0.0), axis=1)
        r_label += tl.sum(tl.where(cols[None, :] == labels[:, None], r, 0.0), axis=1)
        if WITH_TOP1:
            left = tl.maximum(left, tl.max(tl.where(cols[None, :] < labels[:, None], r, _NEG_INF), axis=1))
    # part is [8, splits, N] (step = splits * N): the raw max m, then s, t, q (base 2, relative
    # to m), sum r, r[label], max of r left of the label
    out = part_ptr + split.to(tl.int64) * N + rows
    row_ok = rows < N
    tl.store(out, m, mask=row_ok)
    tl.store(out + step, s, mask=row_ok)
    tl.store(out + 2 * step, t, mask=row_ok)
    tl.store(out + 3 * step, q, mask=row_ok)
    tl.store(out + 4 * step, rsum, mask=row_ok)
    tl.store(out + 5 * step, r_label, mask=row_ok)
    tl.store(out + 6 * step, left, mask=row_ok)


@triton.jit
def _combine_kernel(
    part_ptr, labels_ptr, logp_ptr, ent_ptr, stats_ptr, lsq_ptr, mean_ptr, top1_ptr,
    N, V, splits, step, ignore_index, k2,
    WITH_ENTROPY: tl.constexpr, WITH_LSQ: tl.constexpr, WITH_MEAN: tl.constexpr,
    WITH_TOP1: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < N
    m = tl.full([BLOCK_R], _NEG_INF, tl.float32)
    s = tl.zeros([BLOCK_R], dtype=tl.float32)
    t = tl.zeros([BLOCK_R], dtype=tl.float32)
    q = tl.zeros([BLOCK_R], dtype=tl.float32)
    rsum = tl.zeros([BLOCK_R], dtype=tl.float32)
    r_label = tl.zeros([BLOCK_R], dtype=tl.float32)
    left = tl.full([BLOCK_R], _NEG_INF, tl.float32)
    for s0 in range(0, splits, BLOCK_S):
        sp = s0 + tl.arange(0, BLOCK_S)
        ok = row_ok[:, None] & (sp < splits)[None, :]
        ptrs = part_ptr + sp[None, :].to(tl.int64) * N + rows[:, None]
        m_b = tl.load(ptrs, mask=ok, other=_NEG_INF)
        s_b = tl.load(ptrs + step, mask=ok, other=0.0)
        t_b = tl.load(ptrs + 2 * step, mask=ok, other=0.0)
        q_b = tl.load(ptrs + 3 * step, mask=ok, other=0.0)
        m_new = tl.maximum(m, tl.max(m_b, axis=1))
        shift = tl.where(m_new == _NEG_INF, 0.0, m_new)
        d = (m - shift) * k2  # raw maxima: the differences are exact near the max
        d_b = (m_b - shift[:, None]) * k2
        alpha = tl.exp2(d)
        beta = tl.exp2(d_b)
        d_b = tl.where(m_b == _NEG_INF, 0.0, d_b)
        t = alpha * (t + tl.where(m == _NEG_INF, 0.0, d) * s) + tl.sum(beta * (t_b + d_b * s_b), axis=1)
        q = q * (alpha * alpha) + tl.sum(beta * beta * q_b, axis=1)
        s = s * alpha + tl.sum(beta * s_b, axis=1)
        m = m_new
        rsum += tl.sum(tl.load(ptrs + 4 * step, mask=ok, other=0.0), axis=1)
        r_label += tl.sum(tl.load(ptrs + 5 * step, mask=ok, other=0.0), axis=1)
        left = tl.maximum(left, tl.max(tl.load(ptrs + 6 * step, mask=ok, other=_NEG_INF), axis=1))
    label = tl.load(labels_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    m = tl.where(row_ok, m, 0.0)  # rows past the end: no -inf - -inf warnings
    _finish(rows, row_ok, label, m, s, t, q, rsum, r_label - m, left - m, k2, V, ignore_index,
            logp_ptr, ent_ptr, stats_ptr, lsq_ptr, mean_ptr, top1_ptr,
            WITH_ENTROPY, WITH_LSQ, WITH_MEAN, WITH_TOP1)


@triton.jit
def _fused_dlogits_kernel(
    x_ptr, w_ptr, b_ptr, labels_ptr, stats_ptr, glogp_ptr, gent_ptr, ent_ptr, glsq_ptr,
    lsq_ptr, gmean_ptr, dz_ptr,
    N, H, v0, width, sxn, sxk, swv, swk, inv_V, k_z, k_cap, k_in, k_grad,
    HAS_BIAS: tl.constexpr, HAS_CAP: tl.constexpr, WITH_ENTROPY: tl.constexpr,
    WITH_LSQ: tl.constexpr, WITH_MEAN: tl.constexpr, INTERPRET: tl.constexpr,
    PRECISION: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dlogits of columns ``[v0, v0 + width)`` into ``dz [N, width]`` (contiguous)."""
    pid_n, pid_v = _grouped(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(width, BLOCK_V), GROUP)
    rows = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    local = pid_v.to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    cols = v0 + local
    row_ok = rows < N
    col_ok = local < width
    y = _logits_tile(x_ptr, w_ptr, b_ptr, rows, cols, col_ok, N, H, sxn, sxk, swv, swk,
                     HAS_BIAS, INTERPRET, PRECISION, BLOCK_N, BLOCK_V, BLOCK_K)
    r = _raw(y, k_in, HAS_CAP)
    label = tl.load(labels_ptr + rows, mask=row_ok, other=-1).to(tl.int64)
    big_m = tl.load(stats_ptr + 2 * rows, mask=row_ok, other=0.0)
    ls2 = tl.load(stats_ptr + 2 * rows + 1, mask=row_ok, other=0.0) * _LOG2E
    k = _k2(k_z, k_cap, HAS_CAP) * _LN2  # rounded as the forward's (see _finish)
    g_logp = tl.load(glogp_ptr + rows, mask=row_ok, other=0.0)
    g_ent = tl.zeros([BLOCK_N], tl.float32)
    ent = tl.zeros([BLOCK_N], tl.float32)
    g_lsq = tl.zeros([BLOCK_N], tl.float32)
    lsq2 = tl.zeros([BLOCK_N], tl.float32)
    g_mean_v = tl.zeros([BLOCK_N], tl.float32)
    if WITH_ENTROPY:
        g_ent = tl.load(gent_ptr + rows, mask=row_ok, other=0.0)
        ent = tl.load(ent_ptr + rows, mask=row_ok, other=0.0)
    if WITH_LSQ:
        g_lsq = tl.load(glsq_ptr + rows, mask=row_ok, other=0.0)
        lsq2 = tl.load(lsq_ptr + rows, mask=row_ok, other=0.0) * _LOG2E
    if WITH_MEAN:
        g_mean_v = tl.load(gmean_ptr + rows, mask=row_ok, other=0.0) * inv_V
    g = _grad_logits(r, cols[None, :] == label[:, None], big_m[:, None], ls2[:, None], k,
                     g_logp[:, None], g_ent[:, None], ent[:, None], g_lsq[:, None], lsq2[:, None],
                     g_mean_v[:, None], k_grad, HAS_CAP, WITH_ENTROPY, WITH_LSQ, WITH_MEAN)
    ok = row_ok[:, None] & col_ok[None, :]
    tl.store(dz_ptr + rows[:, None] * width + local[None, :], g.to(dz_ptr.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------- launchers
_LOG2E_F = 1.4426950408889634


_TINY = 2.0**-125
"""Least base-2 factor: fp32-normal also after ``* ln 2``. A factor that underflowed to 0 (a
temperature past ~1e38) would make ``-inf * 0`` NaN; any tiny factor gives the same uniform
distribution the true one does."""


def _consts(p: dict) -> dict:
    """The constants of ``_raw``, ``_k2`` and ``_grad_logits`` for the options ``p``: ``z2 =
    k_z y`` or ``k_cap tanh(k_in y)`` (base 2), ``d z / d y = k_grad (1 - tanh^2)``."""
    k_grad = p["logit_scale"] / p["temperature"]
    cap = p["softcap"]
    return {"k_z": max(k_grad * _LOG2E_F, _TINY),
            "k_cap": 1.0 if cap is None else max(cap / p["temperature"] * _LOG2E_F, _TINY),
            "k_in": 1.0 if cap is None else p["logit_scale"] / cap, "HAS_CAP": cap is not None}


def k_grad(p: dict) -> float:
    """``d z / d u``: the factor of the logits' gradient before the soft-cap's ``1 - tanh^2``."""
    return p["logit_scale"] / p["temperature"]


def _row_config(width: int) -> dict:
    """One program per row of a block: 2048-wide column steps with 8 warps (one 16-byte load
    per thread and step), a few KB per step in flight; 64 under the interpreter, so that
    tests cover many steps per row."""
    if triton_interpreter():
        return {"BLOCK": 64, "num_warps": 4}
    block = min(max(triton.next_power_of_2(width), 128), 2048)
    return {"BLOCK": block, "num_warps": 8 if block >= 2048 else 4}


def fold_(tile, bias, labels, state, v0, V, first, last, p, outs):
    """``_fold_kernel`` over the rows of the fp32 block ``tile [n, w]`` (see
    ``fastrlhf.eager.linear_logprobs.fold_`` for the arguments)."""
    n, w = tile.shape
    logp, ent, stats, lsq, mean, top1 = outs
    c = _consts(p)
    _fold_kernel[(n,)](
        tile, tile.stride(0), bias if bias is not None else tile, labels, state,
        logp, ent, stats, lsq, mean, top1, w, v0, V, c["k_z"], c["k_cap"], c["k_in"], p["ignore_index"],
        HAS_BIAS=bias is not None, HAS_CAP=c["HAS_CAP"], FIRST=first, LAST=last,
        WITH_ENTROPY=ent.numel() > 0, WITH_LSQ=lsq.numel() > 0, WITH_MEAN=mean.numel() > 0,
        WITH_TOP1=top1.numel() > 0, VEC=4, **_row_config(w))


def dlogits_(tile, bias, labels, stats, grads, v0, V, p, out_dtype):
    """``_dlogits_kernel`` over the rows of ``tile``; returns ``dlogits`` as a view of its
    storage in ``out_dtype`` (see ``fastrlhf.eager.linear_logprobs.dlogits_``)."""
    n, w = tile.shape
    dz = tile if out_dtype == tile.dtype else tile.view(out_dtype).view(n, 2 * w)[:, :w]
    g_logp, g_ent, ent, g_lsq, lsq, g_mean = grads
    c = _consts(p)
    _dlogits_kernel[(n,)](
        tile, dz, tile.stride(0), dz.stride(0), bias if bias is not None else tile, labels, stats,
        g_logp, _or(g_ent, g_logp), _or(ent, g_logp), _or(g_lsq, g_logp), _or(lsq, g_logp),
        _or(g_mean, g_logp), w, v0, 1.0 / V, c["k_z"], c["k_cap"], c["k_in"], k_grad(p),
        HAS_BIAS=bias is not None, HAS_CAP=c["HAS_CAP"], WITH_ENTROPY=g_ent is not None,
        WITH_LSQ=g_lsq is not None, WITH_MEAN=g_mean is not None, **_row_config(w))
    return dz


def _or(x, default):
    return default if x is None else x


def _config(dtype: torch.dtype, heavy: bool) -> dict:
    """Tiles of the fused design. Compiled: 128x128 output tiles (wgmma/mma friendly), K step
    64 for 16-bit inputs and 32 for fp32 (3 pipeline stages stay within an A100's shared
    memory); ``heavy`` epilogues (soft-capping with log sum p^2 or the mean logit) take
    64-row tiles, which keep them from spilling (sm_80 and sm_90). Interpreter: smaller
    tiles, still >= 16 per dim as ``tl.dot`` requires."""
    if triton_interpreter():
        return {"BLOCK_N": 32, "BLOCK_V": 128, "BLOCK_K": 64, "num_warps": 4, "num_stages": 1}
    return {"BLOCK_N": 64 if heavy else 128, "BLOCK_V": 128, "BLOCK_K": 64 if dtype.itemsize == 2 else 32,
            "num_warps": 8, "num_stages": 3}


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: a few splits, so that tests cover the merge
    return torch.cuda.get_device_properties(device).multi_processor_count


def _common(dtype: torch.dtype) -> dict:
    precision = "tf32" if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest" else "ieee"
    return {"INTERPRET": triton_interpreter(), "PRECISION": precision}


def fused_forward_out(hidden, weight, bias, labels, p, outs):
    """The fused design's forward into ``outs`` (as :func:`fold_`'s) for all ``N`` rows.

    Allocates ``[8, splits, N]`` fp32 partial row values (``splits`` is at most twice the
    number of SMs divided by the row tiles, at least 8 when the vocabulary has that many tiles).
    """
    N, H = hidden.shape
    V = weight.shape[0]
    logp, ent, stats, lsq, mean, top1 = outs
    c = _consts(p)
    cfg = _config(hidden.dtype, c["HAS_CAP"] and (lsq.numel() > 0 or mean.numel() > 0))
    row_tiles = cdiv(N, cfg["BLOCK_N"])
    v_tiles = cdiv(V, cfg["BLOCK_V"])
    splits = min(v_tiles, max(8, cdiv(2 * _sm_count(hidden.device), row_tiles)))
    tiles_per_split = cdiv(v_tiles, splits)
    splits = cdiv(v_tiles, tiles_per_split)  # no empty split
    part = hidden.new_empty((8, splits, N), dtype=torch.float32)
    flags = {"WITH_ENTROPY": ent.numel() > 0, "WITH_LSQ": lsq.numel() > 0,
             "WITH_MEAN": mean.numel() > 0, "WITH_TOP1": top1.numel() > 0}
    _fused_fwd_kernel[(row_tiles * splits,)](
        hidden, weight, bias if bias is not None else hidden, labels, part,
        N, V, H, *hidden.stride(), *weight.stride(), c["k_z"], c["k_cap"], c["k_in"], splits,
        tiles_per_split, splits * N, HAS_BIAS=bias is not None, HAS_CAP=c["HAS_CAP"], **flags,
        **_common(hidden.dtype), **cfg)
    _combine_kernel[(cdiv(N, 64),)](
        part, labels, logp, ent, stats, lsq, mean, top1, N, V, splits, splits * N,
        p["ignore_index"], c["k_cap"] if c["HAS_CAP"] else c["k_z"], **flags, BLOCK_R=64, BLOCK_S=16)


def fused_dlogits_out(dz, hidden, weight, bias, labels, stats, grads, v0, V, p):
    """The fused design's recompute: ``dlogits`` of columns ``[v0, v0 + w)`` of the rows
    ``hidden [n, H]`` into ``dz [n, w]`` (contiguous, the inputs' dtype)."""
    n, w = dz.shape
    H = hidden.shape[1]
    g_logp, g_ent, ent, g_lsq, lsq, g_mean = grads
    c = _consts(p)
    cfg = _config(hidden.dtype, c["HAS_CAP"] and (g_lsq is not None or g_mean is not None))
    grid = (cdiv(n, cfg["BLOCK_N"]) * cdiv(w, cfg["BLOCK_V"]),)
    _fused_dlogits_kernel[grid](
        hidden, weight, bias if bias is not None else hidden, labels, stats, g_logp,
        _or(g_ent, g_logp), _or(ent, g_logp), _or(g_lsq, g_logp), _or(lsq, g_logp),
        _or(g_mean, g_logp), dz, n, H, v0, w, *hidden.stride(), *weight.stride(), 1.0 / V,
        c["k_z"], c["k_cap"], c["k_in"], k_grad(p), HAS_BIAS=bias is not None, HAS_CAP=c["HAS_CAP"],
        WITH_ENTROPY=g_ent is not None, WITH_LSQ=g_lsq is not None, WITH_MEAN=g_mean is not None,
        GROUP=8, **_common(hidden.dtype), **cfg)
    return dz
