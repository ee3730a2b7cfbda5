"""Triton kernels for GAE / discounted returns (a chunked scan over T) and group advantages.

GAE as a scan. Walking a row backwards, the state is ``(A, nv)``: the running advantage and
the value of the next valid step. Step ``t`` maps it affinely:

* a valid step:  ``A' = gamma*lam*A + gamma*nv + (r_t - V_t)``, ``nv' = V_t``
* a skipped hole (and any padding outside the row): the identity.

(With ``holes="zero"`` every position is a valid step, with reward and value zeroed where
masked; discounted returns are the case ``V = 0``, ``lam = 1``.) Such maps form the family
``A' = p*A + q*nv + u``, ``nv' = s*nv + w``, closed under composition, so ``(p, q, u, s, w)``
tuples are combined with ``tl.associative_scan``. ``A_t`` is the composite of steps
``t .. T-1`` applied to the state ``(0, 0)`` after the row's end.

A tile is loaded in reversed time order and scanned forwards (``reverse=True`` is avoided:
compiled reverse scans with a non-commutative combine have been reported wrong in some
Triton versions). Tiles of a chunk run in sequence, carrying the state. Long rows
with few rows in the batch are cut into chunks that run in parallel: a first pass stores
each chunk's composite map, and the second pass composes the maps of the later chunks of
its row into its incoming state (a small scan over at most 256 maps) before scanning its
chunk. Every result is a fixed-order composition: deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastrlhf.triton._common import tl_acc

MAX_CHUNKS = 256
TARGET_PROGRAMS = 1024  # enough programs to fill a GPU before cutting rows into chunks


@triton.jit
def _compose(p1, q1, u1, s1, w1, p2, q2, u2, s2, w2):
    # (1): the maps of the later steps, applied first; (2): the earlier step, applied after.
    return p2 * p1, p2 * q1 + q2 * s1, p2 * u1 + q2 * w1 + u2, s2 * s1, s2 * w1 + w2


@triton.jit
def _tile(r_ptr, v_ptr, m_ptr, sr, sv, sm, row, idx, ok, gamma, gl, skip,
          HAS_VALUES: tl.constexpr, ACC: tl.constexpr):
    """Step maps of the positions ``idx`` (``ok``: inside the chunk), scanned in ``idx`` order."""
    valid = (tl.load(m_ptr + row * sm + idx, mask=ok, other=0) != 0) & ok
    r = tl.load(r_ptr + row * sr + idx, mask=valid, other=0.0).to(ACC)
    if HAS_VALUES:
        v = tl.load(v_ptr + row * sv + idx, mask=valid, other=0.0).to(ACC)
    else:
        v = tl.zeros(idx.shape, ACC)
    r = tl.where(valid, r, 0.0)
    v = tl.where(valid, v, 0.0)
    step = valid | (ok & (skip == 0))  # holes="zero": every position is a step
    p = tl.where(step, gl, 1.0).to(ACC)
    q = tl.where(step, gamma, 0.0).to(ACC)
    s = tl.where(step, 0.0, 1.0).to(ACC)
    p, q, u, s, w = tl.associative_scan((p, q, r - v, s, v), 0, _compose)
    return p, q, u, s, w, v, valid


@triton.jit
def _last(x, j, BLOCK: tl.constexpr):
    return tl.sum(tl.where(j == BLOCK - 1, x, 0.0), axis=0)


@triton.jit
def _gae_kernel(
    r_ptr, v_ptr, m_ptr, adv_ptr, ret_ptr, agg_ptr,
    T, NC, CHUNK, sr, sv, sm, gamma, gl, skip,
    HAS_VALUES: tl.constexpr, SUMMARY: tl.constexpr,
    HAS_CARRY: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr, NCP: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    row = pid // NC
    c = pid % NC
    lo = c * CHUNK
    hi = tl.minimum(lo + CHUNK, T)
    n_tiles = (hi - lo + BLOCK - 1) // BLOCK
    j = tl.arange(0, BLOCK)

    if SUMMARY:  # store the composite map of this chunk
        P = tl.full([], 1.0, ACC)
        Q = tl.full([], 0.0, ACC)
        U = tl.full([], 0.0, ACC)
        S = tl.full([], 1.0, ACC)
        W = tl.full([], 0.0, ACC)
        for k in range(0, n_tiles):
            idx = hi - 1 - k * BLOCK - j
            p, q, u, s, w, v, valid = _tile(r_ptr, v_ptr, m_ptr, sr, sv, sm, row, idx, idx >= lo,
                                            gamma, gl, skip, HAS_VALUES, ACC)
            P, Q, U, S, W = _compose(P, Q, U, S, W, _last(p, j, BLOCK), _last(q, j, BLOCK),
                                     _last(u, j, BLOCK), _last(s, j, BLOCK), _last(w, j, BLOCK))
        out = agg_ptr + pid * 5
        tl.store(out, P)
        tl.store(out + 1, Q)
        tl.store(out + 2, U)
        tl.store(out + 3, S)
        tl.store(out + 4, W)
    else:
        A = tl.full([], 0.0, ACC)  # the state after this chunk
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
        for k in range(0, n_tiles):
            idx = hi - 1 - k * BLOCK - j
            ok = idx >= lo
            p, q, u, s, w, v, valid = _tile(r_ptr, v_ptr, m_ptr, sr, sv, sm, row, idx, ok,
                                            gamma, gl, skip, HAS_VALUES, ACC)
            adv = p * A + q * NV + u
            nv = s * NV + w
            tl.store(adv_ptr + row * T + idx, tl.where(valid, adv, 0.0), mask=ok)
            if HAS_VALUES:
                tl.store(ret_ptr + row * T + idx, tl.where(valid, adv + v, 0.0), mask=ok)
            A = _last(adv, j, BLOCK)
            NV = _last(nv, j, BLOCK)


def _rows(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``(x, row_stride)`` with unit stride along T (copied only when it is not)."""
    if x.stride(1) != 1 and x.shape[1] > 1:
        x = x.contiguous()
    if x.dtype == torch.bool:
        x = x.view(torch.uint8)
    return x, x.stride(0)


def plan(B: int, T: int, block: int | None = None, tiles_per_chunk: int | None = None):
    """``(BLOCK, CHUNK, NC)``: tile size, chunk length (a multiple of it) and chunks per row.

    Rows are cut into chunks only when the batch alone gives fewer than ``TARGET_PROGRAMS``
    programs; ``block`` / ``tiles_per_chunk`` override the choice (tests use small tiles).
    """
    BLOCK = block or min(1024, max(16, triton.next_power_of_2(T)))
    n_tiles = triton.cdiv(T, BLOCK)
    if tiles_per_chunk is None:
        nc = min(n_tiles, triton.cdiv(TARGET_PROGRAMS, max(B, 1)), MAX_CHUNKS)
        tiles_per_chunk = triton.cdiv(n_tiles, nc)
    tiles_per_chunk = max(tiles_per_chunk, triton.cdiv(n_tiles, MAX_CHUNKS))
    CHUNK = tiles_per_chunk * BLOCK
    return BLOCK, CHUNK, triton.cdiv(n_tiles, tiles_per_chunk)


def gae_fwd(rewards, values, mask, gamma, lam, skip, advantages, returns, block=None, tiles_per_chunk=None):
    """Fill ``advantages`` and ``returns`` (contiguous ``[B, T]``, B and T > 0; ``values=None``:
    discounted returns into ``advantages``, ``returns`` empty and unwritten). Allocates
    ``5 * B * NC`` floats for chunked rows. ``block`` / ``tiles_per_chunk``: see :func:`plan`."""
    B, T = rewards.shape
    BLOCK, CHUNK, NC = plan(B, T, block, tiles_per_chunk)
    r, sr = _rows(rewards)
    m, sm = _rows(mask)
    v, sv = _rows(values) if values is not None else (r, 0)
    agg = advantages.new_empty((B, NC, 5)) if NC > 1 else advantages
    args = (r, v, m, advantages, returns, agg, T, NC, CHUNK, sr, sv, sm, float(gamma), float(gamma * lam),
            int(skip))
    meta = dict(HAS_VALUES=values is not None, HAS_CARRY=NC > 1, ACC=tl_acc(advantages.dtype),
                BLOCK=BLOCK, NCP=triton.next_power_of_2(NC), num_warps=4 if BLOCK >= 512 else 2)
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
    total = tl.zeros([ROWS], tl.float64)
    for start in range(0, G, BLOCK_G):
        c = start + cols
        ok = group_ok[:, None] & (c < G)[None, :]
        total += tl.sum(tl.load(s_ptr + base + c[None, :], mask=ok, other=0.0).to(tl.float64), axis=1)
    many = G > 1
    mean = tl.where(many, total / G, 0.0)  # a group of one: no baseline
    ss = tl.zeros([ROWS], tl.float64)
    if method == 0:  # grpo: unbiased std, two-pass
        for start in range(0, G, BLOCK_G):
            c = start + cols
            ok = group_ok[:, None] & (c < G)[None, :]
            x = tl.load(s_ptr + base + c[None, :], mask=ok, other=0.0).to(tl.float64)
            d = tl.where(ok, x - mean[:, None], 0.0)
            ss += tl.sum(d * d, axis=1)
    denom = tl.where(many, tl.sqrt(ss / tl.maximum(G - 1, 1)), 1.0) + eps
    for start in range(0, G, BLOCK_G):
        c = start + cols
        ok = group_ok[:, None] & (c < G)[None, :]
        x = tl.load(s_ptr + base + c[None, :], mask=ok, other=0.0).to(tl.float64)
        if method == 0:
            y = (x - mean[:, None]) / denom[:, None]
        elif method == 1:  # rloo: minus the mean of the others
            y = tl.where(many, x - (total[:, None] - x) / tl.maximum(G - 1, 1), x)
        else:
            y = x - mean[:, None]
        tl.store(out_ptr + base + c[None, :], y, mask=ok)


def group_advantages_fwd(scores, group_size, method, eps, out):
    """Fill ``out`` (contiguous ``[N]``, N > 0); ``method`` numbers ``fastrlhf.ops.advantages.METHODS``
    (0 grpo, 1 rloo, 2 dr_grpo). One program
    per block of groups."""
    n_groups = scores.numel() // group_size
    BLOCK_G = min(max(triton.next_power_of_2(group_size), 16), 1024)
    ROWS = max(1, min(64, 2048 // BLOCK_G))
    _group_advantages_kernel[(triton.cdiv(n_groups, ROWS),)](
        scores.contiguous(), out, n_groups, group_size, float(eps), method,
        ROWS=ROWS, BLOCK_G=BLOCK_G, num_warps=4)
