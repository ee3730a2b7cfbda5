"""Triton kernels for token log-probs and entropy: one streaming pass over each row.

Forward, in fp32 (fp64 for fp64 logits) and in base 2: ``c = log2(e) / T`` folds the
temperature and the change of base into one multiply, so an element costs ``(x - m) c`` and
one ``exp2``. A tile is ``[R, VEC]``: each of its R rows is VEC logits one thread loads with
one 16-byte load, and keeps its own running max ``m`` (of the raw logits) and sums
``s = sum(2**a)``, ``t = sum(2**a a)`` with ``a = (x - m) c``: no value crosses threads
inside the loop (no barrier, no shuffle). One merge at the end gives the row's max ``M``,
``S`` and ``T``; then ``logp = ((x[label] - M) c - log2 S) ln 2`` and ``entropy = (log2 S -
T / S) ln 2``, all relative to the max, so large logits cost no precision and the max's own
term is exactly 1. The row's max and log-sum are kept for backward (natural units).

Rows are read from their 16-byte boundary at or before the row start: the first and last
tiles are masked (columns < 0 or >= V), every other tile is a full unmasked tile of 128-bit
loads, for any V and any row stride. Within a row, offsets are 32-bit.

Backward, per element, with ``log2 p = (x * c - m log2 e) - log s log2 e`` (the stats): ``dx = -(p / T) (g_logp + g_ent (log p + H))``, and at the
label ``+ g_logp / T`` (``1[label]``; none for a label outside ``[0, V)``), written after the
row's loop from the label's logit read before it (in place, the loop overwrites it).

``FAST``: ``exp2`` is the hardware's ``ex2.approx.ftz.f32`` (one ``MUFU.EX2``; results below
2**-126 flush to 0, a relative error of about 2**-22), compiled on GPUs only: the interpreter
and fp64 take ``tl.exp2``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastrlhf.triton._common import tl_acc

_NEG_INF = tl.constexpr(float("-inf"))
_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)
_LOWEST = tl.constexpr(-3.4028234663852886e38)  # fp32's lowest: -inf clamped, so 0 * it is 0


@triton.jit
def _exp2(x, FAST: tl.constexpr):
    if FAST:
        return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return tl.exp2(x)


@triton.jit
def _row_start(x_ptr, row, D1, s0, s1, lead, VEC: tl.constexpr, ALIGNED: tl.constexpr):
    """``(pointer, mis)``: the row's 16-byte boundary at or before its first element, and how
    many elements before it that boundary is. ``x_ptr`` is ``lead`` elements after a 16-byte
    boundary; without ``ALIGNED`` (an unaligned allocation) rows start at their first element."""
    off = (row // D1) * s0 + (row % D1) * s1
    if ALIGNED:
        mis = ((off + lead) % VEC).to(tl.int32)
        return x_ptr + tl.multiple_of(off + lead - mis, VEC) - lead, mis
    else:
        return x_ptr + off, 0


@triton.jit
def _tile_offsets(BLOCK_V: tl.constexpr, VEC: tl.constexpr, R: tl.constexpr):
    """``[K, R, VEC]`` column offsets of a tile: each of ``R`` threads reads ``K`` 16-byte packs
    (``K = BLOCK_V / (R VEC)``), all folded into its one running state."""
    K: tl.constexpr = BLOCK_V // (R * VEC)
    return ((tl.arange(0, K)[:, None, None] * R + tl.arange(0, R)[None, :, None]) * VEC
            + tl.arange(0, VEC)[None, None, :])


@triton.jit
def _fold(x, ok, m, s, t, c, MASKED: tl.constexpr, WITH_ENTROPY: tl.constexpr, FAST: tl.constexpr):
    """Fold a tile ``x [K, R, VEC]`` of fp32 logits (with ``MASKED``, only where ``ok``) into
    each thread's raw max ``m [R]`` and ``(s, t)`` (log2 units, relative to ``m * c``). The
    max's own term is ``2**0 = 1`` exactly: a row with one finite logit has log-prob 0, entropy 0."""
    if MASKED:
        x = tl.where(ok, x, _NEG_INF)
    m_new = tl.maximum(m, tl.max(tl.max(x, axis=2), axis=0))
    shift = tl.where(m_new == _NEG_INF, 0.0, m_new)  # a row of -inf so far: keep the exponent finite
    alpha = tl.where(m == _NEG_INF, 0.0, _exp2((m - shift) * c, FAST))  # (-inf * c is NaN for c = 0)
    arg = (x - shift[None, :, None]) * c
    if MASKED:  # -inf * c is NaN when c underflowed to 0 (T past 1e38)
        arg = tl.where(ok, arg, _NEG_INF)
    e = _exp2(arg, FAST)
    if WITH_ENTROPY:  # moving the max by d adds d * s to t
        d = tl.where(m == _NEG_INF, 0.0, (m - shift) * c)
        t = alpha * (t + d * s) + tl.sum(tl.sum(e * tl.maximum(arg, _LOWEST), axis=2), axis=0)
    return m_new, s * alpha + tl.sum(tl.sum(e, axis=2), axis=0), t


@triton.jit
def _token_logprobs_fwd_kernel(
    x_ptr, labels_ptr, logp_ptr, ent_ptr, stats_ptr,
    D1, sx0, sx1, V, lead, c, ignore_index,
    WITH_ENTROPY: tl.constexpr, ACC: tl.constexpr, VEC: tl.constexpr, BLOCK_V: tl.constexpr, R: tl.constexpr,
    ALIGNED: tl.constexpr, FAST: tl.constexpr, PREFETCH: tl.constexpr,
):
    """``PREFETCH``: each iteration of the full tiles' loop loads the next tile before folding
    the current one, so that a thread has a tile's loads in flight while it computes. Measured
    on an H200 (bf16, 16384 rows): without the entropy 52 -> 78 % of copy bandwidth at
    V = 151936 and 54 -> 85 % at V = 262144; with it slower (60 -> 47 %), so only without."""
    row = tl.program_id(0).to(tl.int64)
    x_row, mis = _row_start(x_ptr, row, D1, sx0, sx1, lead, VEC, ALIGNED)
    offs = _tile_offsets(BLOCK_V, VEC, R)
    m = tl.full([R], _NEG_INF, ACC)
    s = tl.zeros([R], ACC)
    t = tl.zeros([R], ACC)
    n_tiles = tl.cdiv(V + mis, BLOCK_V)
    cols = offs - mis  # the first tile: columns < 0 are the previous row's
    ok = (cols >= 0) & (cols < V)
    x = tl.load(x_row + offs, mask=ok, other=0.0).to(ACC)
    m, s, t = _fold(x, ok, m, s, t, c, True, WITH_ENTROPY, FAST)
    if PREFETCH:
        if n_tiles > 2:
            cur = tl.load(x_row + BLOCK_V + offs)
            for k in range(2, n_tiles - 1):  # full tiles: 128-bit loads, no mask
                nxt = tl.load(x_row + k * BLOCK_V + offs)
                m, s, t = _fold(cur.to(ACC), ok, m, s, t, c, False, WITH_ENTROPY, FAST)
                cur = nxt
            m, s, t = _fold(cur.to(ACC), ok, m, s, t, c, False, WITH_ENTROPY, FAST)
    else:
        for k in range(1, n_tiles - 1):  # full tiles: 128-bit loads, no mask
            x = tl.load(x_row + k * BLOCK_V + offs).to(ACC)
            m, s, t = _fold(x, ok, m, s, t, c, False, WITH_ENTROPY, FAST)
    if n_tiles > 1:
        ok = (n_tiles - 1) * BLOCK_V + offs - mis < V
        x = tl.load(x_row + (n_tiles - 1) * BLOCK_V + offs, mask=ok, other=0.0).to(ACC)
        m, s, t = _fold(x, ok, m, s, t, c, True, WITH_ENTROPY, FAST)

    big_m = tl.max(m, axis=0)  # the one merge of the thread-rows
    shift = tl.where(big_m == _NEG_INF, 0.0, big_m)
    w = tl.where(m == _NEG_INF, 0.0, tl.exp2((m - shift) * c))
    s_sum = tl.sum(s * w, axis=0)
    log2_s = tl.log2(s_sum)

    label = tl.load(labels_ptr + row).to(tl.int64)
    keep = label != ignore_index
    in_range = (label >= 0) & (label < V)
    x_label = tl.load(x_row + mis + tl.where(in_range, label, 0)).to(ACC)
    # Clamps keep NaN (the default drops it: NaN/+inf logits would give 0, not NaN)
    logp = tl.minimum(((x_label - shift) * c - log2_s) * _LN2, 0.0, propagate_nan=tl.PropagateNan.ALL)
    logp = tl.where(in_range, logp, float("nan"))
    tl.store(logp_ptr + row, tl.where(keep, logp, 0.0))
    # Stats in natural units: the max, and a log-sum that carries the max's rounding, so that
    # backward's (x * c - m log2 e) - log s log2 e is forward's (x - max) c - log2 s however
    # large the logits (backward rounds m log2 e the same way; the FMA gives the residual).
    m_nat = (big_m * c) * _LN2
    m2 = m_nat * _LOG2E
    residual = tl.where(big_m == _NEG_INF, 0.0, tl.fma(big_m, c, -m2))
    tl.store(stats_ptr + 2 * row, m_nat)
    tl.store(stats_ptr + 2 * row + 1, (log2_s + residual) * _LN2)
    if WITH_ENTROPY:
        t_sum = tl.sum(w * (t + tl.where(m == _NEG_INF, 0.0, (m - shift) * c) * s), axis=0)
        ent = tl.maximum((log2_s - t_sum / s_sum) * _LN2, 0.0, propagate_nan=tl.PropagateNan.ALL)
        tl.store(ent_ptr + row, tl.where(keep, ent, 0.0))


@triton.jit
def _grad_tile(x, c, m2, l2, a, b, WITH_ENTROPY: tl.constexpr, FAST: tl.constexpr):
    """``-(p / T) (g_logp + g_ent (log p + H))`` of a tile, as ``p * (a + b * arg)`` with
    ``arg = (x * c - m2) - l2`` (log2 p; clamped at -200, where 2**arg is already 0 in fp32, so
    that ``b * arg`` stays finite), ``a = -(g_logp + g_ent H) / T``, ``b = -g_ent ln 2 / T``."""
    arg = tl.maximum(tl.fma(x, c, -m2) - l2, -200.0, propagate_nan=tl.PropagateNan.ALL)
    p = _exp2(arg, FAST)
    if WITH_ENTROPY:
        return p * (a + b * arg)
    else:
        return p * a


@triton.jit
def _token_logprobs_bwd_kernel(
    x_ptr, dx_ptr, labels_ptr, stats_ptr, ent_ptr, glogp_ptr, gent_ptr,
    D1, sx0, sx1, sd0, sd1, V, lead, dlead, c, inv_temp, ignore_index,
    WITH_ENTROPY: tl.constexpr, ACC: tl.constexpr, VEC: tl.constexpr, BLOCK_V: tl.constexpr, R: tl.constexpr,
    ALIGNED: tl.constexpr, FAST: tl.constexpr,
):
    """``ALIGNED``: ``dx`` rows sit at the same offset from a 16-byte boundary as ``x`` rows
    (in place, or the same layout), so stores vectorize like the loads."""
    row = tl.program_id(0).to(tl.int64)
    x_row, mis = _row_start(x_ptr, row, D1, sx0, sx1, lead, VEC, ALIGNED)
    dx_row, _ = _row_start(dx_ptr, row, D1, sd0, sd1, dlead, VEC, ALIGNED)
    label = tl.load(labels_ptr + row).to(tl.int64)
    keep = label != ignore_index
    in_range = (label >= 0) & (label < V)
    g_logp = tl.where(keep, tl.load(glogp_ptr + row).to(ACC), 0.0)
    m2 = tl.load(stats_ptr + 2 * row) * _LOG2E  # the forward's max, bit for bit (see there)
    l2 = tl.load(stats_ptr + 2 * row + 1) * _LOG2E
    a = -g_logp * inv_temp
    b = 0.0
    if WITH_ENTROPY:
        g_ent = tl.where(keep, tl.load(gent_ptr + row).to(ACC), 0.0)
        H = tl.load(ent_ptr + row)
        a -= g_ent * H * inv_temp
        b = -g_ent * _LN2 * inv_temp
    x_label = tl.load(x_row + mis + tl.where(in_range, label, 0)).to(ACC)  # before the loop overwrites it

    offs = _tile_offsets(BLOCK_V, VEC, R)
    n_tiles = tl.cdiv(V + mis, BLOCK_V)
    ty = dx_ptr.dtype.element_ty
    cols = offs - mis
    ok = (cols >= 0) & (cols < V)
    x = tl.load(x_row + offs, mask=ok, other=0.0).to(ACC)
    tl.store(dx_row + offs, _grad_tile(x, c, m2, l2, a, b, WITH_ENTROPY, FAST).to(ty), mask=ok)
    for k in range(1, n_tiles - 1):  # full tiles: 128-bit loads and stores, no mask
        x = tl.load(x_row + k * BLOCK_V + offs).to(ACC)
        tl.store(dx_row + k * BLOCK_V + offs, _grad_tile(x, c, m2, l2, a, b, WITH_ENTROPY, FAST).to(ty))
    if n_tiles > 1:
        ok = (n_tiles - 1) * BLOCK_V + offs - mis < V
        x = tl.load(x_row + (n_tiles - 1) * BLOCK_V + offs, mask=ok, other=0.0).to(ACC)
        g = _grad_tile(x, c, m2, l2, a, b, WITH_ENTROPY, FAST)
        tl.store(dx_row + (n_tiles - 1) * BLOCK_V + offs, g.to(ty), mask=ok)
    # The label's own gradient: its value plus g_logp / T, stored after every store above.
    tl.debug_barrier()
    g = _grad_tile(x_label, c, m2, l2, a, b, WITH_ENTROPY, FAST) + g_logp * inv_temp
    tl.store(dx_row + mis + label, g.to(ty), mask=in_range & keep)


def _rows(x: torch.Tensor) -> tuple[torch.Tensor, int, int, int]:
    """``(x, D1, s0, s1)``: row ``r`` of ``x [..., V]`` starts at ``(r // D1) * s0 + (r % D1) * s1``.

    Leading dims are merged where memory allows; only a layout needing three or more
    separate strides is copied.
    """
    dims: list[list[int]] = []
    for n, s in zip(x.shape[:-1], x.stride()[:-1]):
        if n == 1:
            continue
        if dims and dims[-1][1] == n * s:
            dims[-1] = [dims[-1][0] * n, s]
        else:
            dims.append([n, s])
    if len(dims) > 2:
        x = x.contiguous()
        dims = [[x[..., 0].numel(), x.shape[-1]]]
    if len(dims) == 2:
        return x, dims[1][0], dims[0][1], dims[1][1]
    return x, max(x[..., 0].numel(), 1), 0, (dims[0][1] if dims else 0)


def _config(logits: torch.Tensor) -> dict:
    V = logits.shape[-1]
    vec = 16 // logits.element_size()
    block = min(max(triton.next_power_of_2(V), 16), 1024 * vec)  # >= 16: tiny tiles crash some Triton versions
    vec = min(vec, block)
    warps = 8 if block >= 2048 else 4
    return {"BLOCK_V": block, "VEC": vec, "R": min(32 * warps, block // vec), "num_warps": warps,
            "FAST": logits.dtype != torch.float64 and logits.device.type == "cuda"}


def _aligned(x: torch.Tensor) -> tuple[torch.Tensor, int, bool]:
    """``(base, lead, aligned)``: a tensor whose data pointer is the 16-byte boundary at or before
    ``x``'s first element and ``lead``, the elements between them; ``aligned`` False (and ``x``
    itself) when that boundary is outside ``x``'s storage."""
    lead = (x.data_ptr() % 16) // x.element_size()
    if lead > x.storage_offset():
        return x, 0, False
    return x.as_strided((1,), (1,), x.storage_offset() - lead), lead, True


def token_logprobs_fwd(logits, labels, temperature, ignore_index, with_entropy, logp, entropy, stats,
                       invariant=False):
    """Fill ``logp``, ``entropy`` (when ``with_entropy``) and ``stats`` (contiguous, shaped as
    ``fastrlhf.ops.logprobs`` allocates them) for ``labels.numel() > 0`` rows. ``invariant``: a
    row's fold must not depend on where it sits: rows are realigned to 16 bytes (which moves the
    columns between the threads) only when every row already starts on a boundary."""
    x, D1, s0, s1 = _rows(logits)
    base, lead, aligned = _aligned(x)
    vec = 16 // x.element_size()
    if invariant and (lead % vec or s0 % vec or s1 % vec):
        base, lead, aligned = x, 0, False
    _token_logprobs_fwd_kernel[(labels.numel(),)](
        base, labels.reshape(-1).contiguous(), logp, entropy, stats, D1, s0, s1, logits.shape[-1], lead,
        1.4426950408889634 / temperature, ignore_index,
        WITH_ENTROPY=with_entropy, ACC=tl_acc(logp.dtype), ALIGNED=aligned, PREFETCH=not with_entropy,
        **_config(x))


def token_logprobs_bwd(grad_logp, grad_entropy, logits, labels, stats, entropy, temperature,
                       ignore_index, grad_logits):
    """Write ``d loss / d logits`` into ``grad_logits``: a contiguous tensor of the logits'
    shape and dtype, or ``logits`` itself (an in-place backward)."""
    V = logits.shape[-1]
    x, D1, sx0, sx1 = _rows(logits)
    inplace = grad_logits is logits
    dx, sd0, sd1 = (x, sx0, sx1) if inplace else (grad_logits, D1 * V, V)
    (base, lead, ok), (dbase, dlead, dok) = _aligned(x), _aligned(dx)
    vec = 16 // x.element_size()
    # stores vectorize when every dx row sits where its x row does relative to 16 bytes
    co = ok and dok and all((a - b) % vec == 0 for a, b in ((sx0, sd0), (sx1, sd1), (lead, dlead)))
    with_entropy = grad_entropy is not None
    _token_logprobs_bwd_kernel[(labels.numel(),)](
        base if co else x, dbase if co else dx, labels.reshape(-1).contiguous(), stats, entropy,
        grad_logp.reshape(-1).contiguous(), grad_entropy.reshape(-1).contiguous() if with_entropy else grad_logp,
        D1, sx0, sx1, sd0, sd1, V, lead if co else 0, dlead if co else 0,
        1.4426950408889634 / temperature, 1.0 / temperature, ignore_index,
        WITH_ENTROPY=with_entropy, ACC=tl_acc(stats.dtype), ALIGNED=co, **_config(x))
    if dx is not grad_logits:  # in place on a layout that _rows had to copy
        grad_logits.copy_(dx.view(grad_logits.shape))
