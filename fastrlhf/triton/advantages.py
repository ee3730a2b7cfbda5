"""Triton kernels for GAE / discounted returns (a chunked scan over T) and group advantages.

GAE walks a row backwards: ``A_t = delta_t + gamma lam A_next`` with ``delta_t = r_t - V_t +
gamma V_next``, ``V_next`` the value of the next valid step (0 after the row's end). A masked
position inside a row is skipped (``holes="skip"``: ``A`` and ``V_next`` carry across it) or a
step with ``r = V = 0`` (``holes="zero"``). Discounted returns are the case ``V = 0``, ``lam = 1``.

On the state ``(A, V_next)`` a step is affine, and so is any run of steps: ``A' = p A + q V +
u``, ``V' = s V + w`` (``(p, q, u, s, w)``, closed under composition). A tile of ``8 R``
positions gives each of its ``R`` threads 8 consecutive positions, read and written with
16-byte accesses, the threads in reversed order (thread 0 holds the latest positions). A
thread composes its 8 steps in registers (latest first), one scan over the threads composes
those maps (``tl.associative_scan``, forward: backwards in time), each thread takes the state
after the threads before it (``tl.gather``) and walks its 8 positions again writing ``A``.
Loads are masked by the bounds only, never by the loaded mask (no load waits for another),
and only in the row's last (partial) tile. Tiles of a chunk run from the row's end down,
carrying the state.

Long rows of a small batch are cut into chunks that run in parallel: a first pass stores each
chunk's composite map, the second pass composes the maps of the later chunks of its row (a
small scan over at most 256 maps) into its incoming state. Every result is a fixed-order
composition: deterministic. Packed sequences (``cu_seqlens``) are rows of their own length.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastrlhf.reference.advantages import METHODS
from fastrlhf.triton._common import cdiv, flat, tl_acc

_GRPO, _RLOO = (tl.constexpr(METHODS.index(name)) for name in ("grpo", "rloo"))  # else dr_grpo

MAX_CHUNKS = 256
TARGET_PROGRAMS = 1024  # enough programs to fill a GPU before cutting rows into chunks


@triton.jit
def _compose(p1, q1, u1, s1, w1, p2, q2, u2, s2, w2):
    # (1): the maps of the later steps, applied first; (2): the earlier step, applied after.
    return p2 * p1, p2 * q1 + q2 * s1, p2 * u1 + q2 * w1 + u2, s2 * s1, s2 * w1 + w2


@triton.jit
def _last(x, j, N: tl.constexpr):
    return tl.sum(tl.where(j == N - 1, x, 0.0), axis=0)


@triton.jit
def _cols(x, R: tl.constexpr):
    """The 8 columns of ``x [R, 8]`` in order, each ``[R]`` (splits inside each thread's row)."""
    a, b = tl.split(tl.reshape(x, [R, 4, 2]))
    a0, a1 = tl.split(tl.reshape(a, [R, 2, 2]))
    b0, b1 = tl.split(tl.reshape(b, [R, 2, 2]))
    c0, c4 = tl.split(tl.reshape(a0, [R, 1, 2]))
    c2, c6 = tl.split(tl.reshape(a1, [R, 1, 2]))
    c1, c5 = tl.split(tl.reshape(b0, [R, 1, 2]))
    c3, c7 = tl.split(tl.reshape(b1, [R, 1, 2]))
    return (tl.reshape(c0, [R]), tl.reshape(c1, [R]), tl.reshape(c2, [R]), tl.reshape(c3, [R]),
            tl.reshape(c4, [R]), tl.reshape(c5, [R]), tl.reshape(c6, [R]), tl.reshape(c7, [R]))


@triton.jit
def _rows(c0, c1, c2, c3, c4, c5, c6, c7, R: tl.constexpr):
    """``[R, 8]`` from its 8 columns (the inverse of :func:`_cols`)."""
    a = tl.reshape(tl.join(tl.reshape(tl.join(c0, c4), [R, 2]), tl.reshape(tl.join(c2, c6), [R, 2])), [R, 4])
    b = tl.reshape(tl.join(tl.reshape(tl.join(c1, c5), [R, 2]), tl.reshape(tl.join(c3, c7), [R, 2])), [R, 4])
    return tl.reshape(tl.join(a, b), [R, 8])


@triton.jit
def _then(p, q, u, s, w, step, d, v, gamma, gl):
    """The map ``(p, q, u, s, w)`` followed by the step (``d = r - V``) at one earlier position."""
    return (tl.where(step, gl * p, p), tl.where(step, gl * q + gamma * s, q),
            tl.where(step, gl * u + gamma * w + d, u), tl.where(step, 0.0, s), tl.where(step, v, w))


@triton.jit
def _tile_map(steps, ds, vs, gamma, gl, R: tl.constexpr, ACC: tl.constexpr):
    """Each thread's composite map of its 8 positions (latest first)."""
    one = tl.full([R], 1.0, ACC)
    zero = tl.zeros([R], ACC)
    p, q, u, s, w = one, zero, zero, one, zero
    for e in tl.static_range(7, -1, -1):
        p, q, u, s, w = _then(p, q, u, s, w, steps[e], ds[e], vs[e], gamma, gl)
    return p, q, u, s, w


@triton.jit
def _load_tile(r_row, v_row, m_row, pos, lo, hi, MASKED: tl.constexpr, SKIP: tl.constexpr,
               HAS_VALUES: tl.constexpr, ACC: tl.constexpr, R: tl.constexpr, AGAIN: tl.constexpr = False):
    """``(ok, valid, steps, ds, vs, v)`` at positions ``pos [R, 8]``: in the chunk, valid, per
    column (8-tuples of ``[R]``) a step or not, ``r - V`` and ``V`` (0 where masked), and ``V``."""
    # A tile is read twice (see _scan_tile): first kept in cache, the second time read last.
    policy: tl.constexpr = "evict_first" if AGAIN else "evict_last"
    if MASKED:
        ok = (pos >= lo) & (pos < hi)
        valid = (tl.load(m_row + pos, mask=ok, other=0, eviction_policy=policy) != 0) & ok
        r = tl.where(valid, tl.load(r_row + pos, mask=ok, other=0.0, eviction_policy=policy).to(ACC), 0.0)
        if HAS_VALUES:
            v = tl.where(valid, tl.load(v_row + pos, mask=ok, other=0.0, eviction_policy=policy).to(ACC), 0.0)
    else:
        ok = pos >= 0
        valid = tl.load(m_row + pos, eviction_policy=policy) != 0
        r = tl.where(valid, tl.load(r_row + pos, eviction_policy=policy).to(ACC), 0.0)
        if HAS_VALUES:
            v = tl.where(valid, tl.load(v_row + pos, eviction_policy=policy).to(ACC), 0.0)
    if not HAS_VALUES:
        v = tl.zeros(r.shape, ACC)
    step = valid if SKIP else ok
    s0, s1, s2, s3, s4, s5, s6, s7 = _cols(step.to(tl.int8), R)
    steps = (s0 != 0, s1 != 0, s2 != 0, s3 != 0, s4 != 0, s5 != 0, s6 != 0, s7 != 0)
    return ok, valid, steps, _cols(r - v, R), _cols(v, R), v


@triton.jit
def _scan_tile(r_row, v_row, m_row, adv_ptr, ret_ptr, out, tbase, lo, hi, A, NV, gamma, gl,
               MASKED: tl.constexpr, SKIP: tl.constexpr, HAS_VALUES: tl.constexpr, ACC: tl.constexpr,
               R: tl.constexpr):
    """Write the tile at ``tbase`` (``8 R`` positions) given the state ``(A, NV)`` after it;
    return the state before it."""
    rr = tl.arange(0, R)
    pos = tbase + (R - 1 - rr)[:, None] * 8 + tl.arange(0, 8)[None, :]
    _, _, steps, ds, vs, _ = _load_tile(r_row, v_row, m_row, pos, lo, hi, MASKED, SKIP, HAS_VALUES, ACC, R)
    p, q, u, s, w = tl.associative_scan(_tile_map(steps, ds, vs, gamma, gl, R, ACC), 0, _compose)
    after_a = p * A + q * NV + u  # the state after each thread's positions
    after_nv = s * NV + w
    prev = tl.maximum(rr - 1, 0)  # each thread starts from the state the thread before it left
    a = tl.where(rr == 0, A, tl.gather(after_a, prev, 0))
    nv = tl.where(rr == 0, NV, tl.gather(after_nv, prev, 0))
    # the tile again, from cache: cheaper than holding it in registers across the scan
    ok, valid, steps, ds, vs, v = _load_tile(r_row, v_row, m_row, pos, lo, hi, MASKED, SKIP, HAS_VALUES, ACC, R,
                                             True)
    advs = ()
    for e in tl.static_range(7, -1, -1):
        a = tl.where(steps[e], gl * a + gamma * nv + ds[e], a)
        nv = tl.where(steps[e], vs[e], nv)
        advs = (a,) + advs
    adv = tl.where(valid, _rows(*advs, R), 0.0)
    if MASKED:
        tl.store(adv_ptr + out + pos, adv, mask=ok)
    else:
        tl.store(adv_ptr + out + pos, adv)
    if HAS_VALUES:
        ret = tl.where(valid, adv + v, 0.0)
        if MASKED:
            tl.store(ret_ptr + out + pos, ret, mask=ok)
        else:
            tl.store(ret_ptr + out + pos, ret)
    return _last(after_a, rr, R), _last(after_nv, rr, R)


@triton.jit
def _chunk_map(r_row, v_row, m_row, tbase, lo, hi, P, Q, U, S, W, gamma, gl, MASKED: tl.constexpr,
               SKIP: tl.constexpr, HAS_VALUES: tl.constexpr, ACC: tl.constexpr, R: tl.constexpr):
    """The composite map so far ``(P, Q, U, S, W)`` followed by the tile at ``tbase``."""
    rr = tl.arange(0, R)
    pos = tbase + (R - 1 - rr)[:, None] * 8 + tl.arange(0, 8)[None, :]
    _, _, steps, ds, vs, _ = _load_tile(r_row, v_row, m_row, pos, lo, hi, MASKED, SKIP, HAS_VALUES, ACC, R)
    p, q, u, s, w = tl.associative_scan(_tile_map(steps, ds, vs, gamma, gl, R, ACC), 0, _compose)
    return _compose(P, Q, U, S, W, _last(p, rr, R), _last(q, rr, R), _last(u, rr, R), _last(s, rr, R),
                    _last(w, rr, R))


@triton.jit
def _gae_kernel(
    r_ptr, v_ptr, m_ptr, adv_ptr, ret_ptr, agg_ptr, cu_ptr,
    T, NC, CHUNK, sr, sv, sm, gamma, gl,
    SKIP: tl.constexpr, HAS_VALUES: tl.constexpr, SUMMARY: tl.constexpr, HAS_CARRY: tl.constexpr,
    PACKED: tl.constexpr, ACC: tl.constexpr, R: tl.constexpr, NCP: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    row = pid // NC
    c = pid % NC
    if PACKED:  # sequence `row` is positions [cu[row], cu[row + 1]) of the 1-D inputs
        start = tl.load(cu_ptr + row).to(tl.int64)
        L = tl.load(cu_ptr + row + 1).to(tl.int64) - start
        r_row, v_row, m_row, out = r_ptr + start, v_ptr + start, m_ptr + start, start
    else:
        L = T
        r_row, v_row, m_row, out = r_ptr + row * sr, v_ptr + row * sv, m_ptr + row * sm, row * T
    BLOCK: tl.constexpr = 8 * R
    lo = c * CHUNK
    hi = tl.minimum(lo + CHUNK, L)
    n_tiles = tl.maximum(hi - lo + BLOCK - 1, 0) // BLOCK  # the last one (at the row's end) masked
    top = lo + (n_tiles - 1) * BLOCK

    if SUMMARY:  # this chunk's composite map on (A, V_next), from its end down
        one = tl.full([], 1.0, ACC)
        zero = tl.full([], 0.0, ACC)
        P, Q, U, S, W = one, zero, zero, one, zero
        if n_tiles > 0:
            P, Q, U, S, W = _chunk_map(r_row, v_row, m_row, top, lo, hi, P, Q, U, S, W, gamma, gl, True, SKIP,
                                       HAS_VALUES, ACC, R)
        for k in range(1, n_tiles):
            P, Q, U, S, W = _chunk_map(r_row, v_row, m_row, top - k * BLOCK, lo, hi, P, Q, U, S, W, gamma, gl,
                                       False, SKIP, HAS_VALUES, ACC, R)
        base = agg_ptr + pid * 5
        tl.store(base, P)
        tl.store(base + 1, Q)
        tl.store(base + 2, U)
        tl.store(base + 3, S)
        tl.store(base + 4, W)
    else:
        A = tl.full([], 0.0, ACC)  # the state entering this chunk from the later positions
        NV = tl.full([], 0.0, ACC)
        if HAS_CARRY:  # compose the maps of chunks NC-1 .. c+1 and apply them to (0, 0)
            i = tl.arange(0, NCP)
            later = NC - 1 - i > c
            base = agg_ptr + (row * NC + NC - 1 - i) * 5
            _, _, cu, _, cw = tl.associative_scan(
                (tl.load(base, mask=later, other=1.0), tl.load(base + 1, mask=later, other=0.0),
                 tl.load(base + 2, mask=later, other=0.0), tl.load(base + 3, mask=later, other=1.0),
                 tl.load(base + 4, mask=later, other=0.0)), 0, _compose)
            A = _last(cu, i, NCP)
            NV = _last(cw, i, NCP)
        if n_tiles > 0:
            A, NV = _scan_tile(r_row, v_row, m_row, adv_ptr, ret_ptr, out, top, lo, hi, A, NV, gamma, gl, True,
                               SKIP, HAS_VALUES, ACC, R)
        for k in range(1, n_tiles):  # full tiles: 16-byte loads and stores, no mask
            A, NV = _scan_tile(r_row, v_row, m_row, adv_ptr, ret_ptr, out, top - k * BLOCK, lo, hi, A, NV, gamma,
                               gl, False, SKIP, HAS_VALUES, ACC, R)


def plan(B: int, T: int, block: int | None = None, tiles_per_chunk: int | None = None):
    """``(BLOCK, CHUNK, NC)``: tile size, chunk length (a multiple of it) and chunks per row, for
    ``B`` rows of at most ``T`` positions.

    Rows are cut into chunks only when the batch alone gives fewer than ``TARGET_PROGRAMS``
    programs; ``block`` / ``tiles_per_chunk`` override the choice (tests use small tiles).
    """
    BLOCK = block or min(512, max(16, triton.next_power_of_2(T)))
    n_tiles = max(cdiv(T, BLOCK), 1)
    if tiles_per_chunk is None:
        nc = min(n_tiles, cdiv(TARGET_PROGRAMS, max(B, 1)), MAX_CHUNKS)
        tiles_per_chunk = cdiv(n_tiles, nc)
    tiles_per_chunk = max(tiles_per_chunk, cdiv(n_tiles, MAX_CHUNKS))
    CHUNK = tiles_per_chunk * BLOCK
    return BLOCK, CHUNK, cdiv(n_tiles, tiles_per_chunk)


def _unit_rows(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``(x, row_stride)`` with unit stride along T (copied only when it is not); packed 1-D
    inputs are made contiguous."""
    if x.dim() == 1 or (x.stride(1) != 1 and x.shape[1] > 1):
        x = x.contiguous()
    if x.dtype == torch.bool:
        x = x.view(torch.uint8)
    return x, (x.stride(0) if x.dim() == 2 else 0)


def gae_fwd(rewards, values, mask, gamma, lam, skip, advantages, returns, cu_seqlens=None, block=None,
            tiles_per_chunk=None):
    """Fill ``advantages`` and ``returns`` (contiguous, the rewards' shape; ``values=None``:
    discounted returns into ``advantages``, ``returns`` empty and unwritten). Padded: ``[B, T]``
    rows; packed: 1-D inputs whose sequences ``cu_seqlens`` delimits, planned as if each were
    as long as all of them (chunks past a sequence's end do nothing). Allocates
    ``5 * rows * NC`` floats for chunked rows. ``block`` / ``tiles_per_chunk``: see :func:`plan`."""
    packed = cu_seqlens is not None
    B, T = (cu_seqlens.numel() - 1, rewards.numel()) if packed else rewards.shape
    BLOCK, CHUNK, NC = plan(B, T, block, tiles_per_chunk)
    r, sr = _unit_rows(rewards)
    m, sm = _unit_rows(mask)
    v, sv = _unit_rows(values) if values is not None else (r, 0)
    agg = advantages.new_empty((B, NC, 5)) if NC > 1 else advantages
    args = (r, v, m, advantages, returns, agg, cu_seqlens.contiguous() if packed else r, T, NC, CHUNK, sr, sv, sm,
            float(gamma), float(gamma * lam))
    # 64 threads of 8 positions; 64 registers (no spill): 16 blocks, half the SM's threads
    meta = dict(SKIP=bool(skip), HAS_VALUES=values is not None, HAS_CARRY=NC > 1, PACKED=packed,
                ACC=tl_acc(advantages.dtype), R=BLOCK // 8, NCP=triton.next_power_of_2(NC),
                num_warps=max(1, BLOCK // 256), maxnreg=64)
    if NC > 1:
        _gae_kernel[(B * NC,)](*args, SUMMARY=True, **meta)
    _gae_kernel[(B * NC,)](*args, SUMMARY=False, **meta)


# ------------------------------------------------------------------- group advantages
@triton.jit
def _group_advantages_kernel(
    s_ptr, out_ptr, n_groups, G, eps, method, ROWS: tl.constexpr, BLOCK_G: tl.constexpr,
):
    """Statistics and outputs in fp64 (``STATS_DTYPE``), stored in the output's dtype."""
    groups = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    group_ok = groups < n_groups
    base = groups[:, None] * G
    cols = tl.arange(0, BLOCK_G)
    # Tiles are summed elementwise in the loops and reduced once after them.
    tile = tl.zeros([ROWS, BLOCK_G], tl.float64)
    for start in range(0, G, BLOCK_G):
        c = start + cols
        ok = group_ok[:, None] & (c < G)[None, :]
        tile += tl.load(s_ptr + base + c[None, :], mask=ok, other=0.0).to(tl.float64)
    total = tl.sum(tile, axis=1)
    many = G > 1
    mean = tl.where(many, total / G, 0.0)  # a group of one: no baseline
    tile = tl.zeros([ROWS, BLOCK_G], tl.float64)
    if method == _GRPO:  # unbiased std, two-pass
        for start in range(0, G, BLOCK_G):
            c = start + cols
            ok = group_ok[:, None] & (c < G)[None, :]
            x = tl.load(s_ptr + base + c[None, :], mask=ok, other=0.0).to(tl.float64)
            d = tl.where(ok, x - mean[:, None], 0.0)
            tile += d * d
    ss = tl.sum(tile, axis=1)
    denom = tl.where(many, tl.sqrt(ss / tl.maximum(G - 1, 1)), 1.0) + eps
    for start in range(0, G, BLOCK_G):
        c = start + cols
        ok = group_ok[:, None] & (c < G)[None, :]
        x = tl.load(s_ptr + base + c[None, :], mask=ok, other=0.0).to(tl.float64)
        if method == _GRPO:
            y = (x - mean[:, None]) / denom[:, None]
        elif method == _RLOO:  # minus the mean of the others
            y = tl.where(many, x - (total[:, None] - x) / tl.maximum(G - 1, 1), x)
        else:
            y = x - mean[:, None]
        tl.store(out_ptr + base + c[None, :], y, mask=ok)


def group_advantages_fwd(scores, group_size, method, eps, out):
    """Fill ``out`` (contiguous ``[N]``, N > 0); ``method`` numbers ``fastrlhf.reference.advantages.METHODS``
    (0 grpo, 1 rloo, 2 dr_grpo). One program
    per block of groups."""
    n_groups = scores.numel() // group_size
    BLOCK_G = min(max(triton.next_power_of_2(group_size), 16), 1024)
    ROWS = max(1, min(64, 2048 // BLOCK_G))
    _group_advantages_kernel[(cdiv(n_groups, ROWS),)](
        scores.contiguous(), out, n_groups, group_size, float(eps), method,
        ROWS=ROWS, BLOCK_G=BLOCK_G, num_warps=4)


# -------------------------------------------------------------------------- masked whiten
WHITEN_BLOCK = 2048
"""Elements one whitening program reads: the statistics come as ``cdiv(n, WHITEN_BLOCK)`` partials."""


@triton.jit
def _whiten_stats_kernel(x_ptr, m_ptr, part_ptr, N, P, BLOCK: tl.constexpr):
    """``part[:, pid]`` = (valid count, mean, sum of squared deviations from the mean) of the
    program's elements, in fp64 (``STATS_DTYPE``), by two passes over the registers: the mean,
    then the deviations, whose sum refines the mean (so a constant block has exactly its value
    and no spread). Loads are bounds-masked only."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < N
    valid = (tl.load(m_ptr + offs, mask=inb, other=0) != 0) & inb
    x = tl.where(valid, tl.load(x_ptr + offs, mask=inb, other=0.0).to(tl.float64), 0.0)
    n = tl.sum(valid.to(tl.float64), axis=0)
    n1 = tl.maximum(n, 1.0)
    mean = tl.sum(x, axis=0) / n1
    d = tl.where(valid, x - mean, 0.0)
    s1 = tl.sum(d, axis=0)
    tl.store(part_ptr + pid, n)
    tl.store(part_ptr + P + pid, mean + s1 / n1)
    tl.store(part_ptr + 2 * P + pid, tl.maximum(tl.sum(d * d, axis=0) - s1 * s1 / n1, 0.0))


@triton.jit
def _whiten_apply_kernel(x_ptr, m_ptr, coef_ptr, out_ptr, N, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """``out = (x - hi - lo) * scale + add`` where valid, 0 elsewhere; ``coef = (scale, hi, lo,
    add)`` with ``hi + lo`` the mean to twice ``ACC``'s precision, so ``x - mean`` is exact near
    the mean and only the product and the sum round."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < N
    valid = tl.load(m_ptr + offs, mask=inb, other=0) != 0
    x = tl.load(x_ptr + offs, mask=inb, other=0.0).to(ACC)
    d = (x - tl.load(coef_ptr + 1).to(ACC)) - tl.load(coef_ptr + 2).to(ACC)
    y = tl.fma(d, tl.load(coef_ptr).to(ACC), tl.load(coef_ptr + 3).to(ACC))
    tl.store(out_ptr + offs, tl.where(valid, y, 0.0), mask=inb)


def whiten_stats(x, mask, partials):
    """Fill ``partials [3, cdiv(n, WHITEN_BLOCK)]`` (fp64 count, mean, squared deviations) of
    ``n = x.numel() > 0`` elements."""
    n = x.numel()
    _whiten_stats_kernel[(partials.shape[1],)](flat(x), flat(mask), partials, n, partials.shape[1],
                                               BLOCK=WHITEN_BLOCK, num_warps=8)


def whiten_apply(x, mask, coef, out):
    """Fill ``out`` (contiguous, ``x``'s shape) with ``(x - coef[1] - coef[2]) * coef[0] + coef[3]``
    where valid, else 0."""
    n = x.numel()
    _whiten_apply_kernel[(cdiv(n, WHITEN_BLOCK),)](flat(x), flat(mask), coef, out, n,
                                                          ACC=tl_acc(out.dtype), BLOCK=WHITEN_BLOCK, num_warps=8)
