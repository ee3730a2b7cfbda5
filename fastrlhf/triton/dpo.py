"""Triton kernels for the DPO family: per-pair losses with a deterministic mean, and backward.

Per pair, in fp32 (fp64 for fp64 inputs): ``h = (pi_c - pi_r) - (ref_c - ref_r)``,
``a = pi_c - ref_c``, ``b = pi_r - ref_r``; the loss and ``d loss / d a``, ``d loss / d b``
(see ``fastrlhf.reference.dpo``). Only ``exp(-|x|)`` is ever evaluated: ``log sigmoid(x) =
min(x, 0) - log1p(exp(-|x|))``, and ``sigmoid(-x)`` is its own sigmoid, not ``1 - sigmoid(x)``,
so margins of any size give finite losses and gradients.

Forward: each program sums its block of pairs (loss, chosen reward, rejected reward,
margin, accuracy); with one block it writes the means, else a second one-program launch
adds the block sums in a fixed order. Backward: ``d pi_c = g/N * dL/da``,
``d ref_c = -d pi_c``, ``d pi_r = g/N * dL/db``, ``d ref_r = -d pi_r``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastrlhf._numerics import acc_dtype
from fastrlhf.triton._common import cdiv, flat, is_last, narrow, tl_acc

BLOCK = 1024


@triton.jit
def _log1p(e):
    # log(1 + e) without losing a small e (e >= 0): log(u) * e / (u - 1) with u = fl(1 + e)
    u = 1.0 + e
    return tl.where(u == 1.0, e, tl.log(u) * (e / tl.where(u == 1.0, 1.0, u - 1.0)))


@triton.jit
def _logsigmoid(x):
    return tl.minimum(x, 0.0) - _log1p(tl.exp(-tl.abs(x)))


@triton.jit
def _sigmoid(x):
    e = tl.exp(-tl.abs(x))  # never overflows
    return tl.where(x >= 0, 1.0, e) / (1.0 + e)


@triton.jit
def _weighted(w, x):
    """``w * x``, 0 where ``w`` is 0 even for an infinite ``x`` (see ``reference.dpo.weighted``)."""
    return tl.where(w == 0, 0.0, w * x)


@triton.jit
def _pairs(pc_ptr, pr_ptr, rc_ptr, rr_ptr, offs, ok, beta, eps, c_pos, c_neg, LOSS: tl.constexpr,
           ACC: tl.constexpr):
    """``(loss, dL/da, dL/db, a, b)`` of the pairs at ``offs``. ``c_pos``/``c_neg``:
    ``log(1 - eps)`` and ``log(eps)`` (exo_pair)."""
    pc = tl.load(pc_ptr + offs, mask=ok, other=0.0).to(ACC)
    pr = tl.load(pr_ptr + offs, mask=ok, other=0.0).to(ACC)
    rc = tl.load(rc_ptr + offs, mask=ok, other=0.0).to(ACC)
    rr = tl.load(rr_ptr + offs, mask=ok, other=0.0).to(ACC)
    h = (pc - pr) - (rc - rr)
    a = pc - rc
    b = pr - rr
    z = beta * h
    if LOSS == 0:  # sigmoid (conservative DPO with label smoothing eps)
        loss = _weighted(1 - eps, -_logsigmoid(z)) + _weighted(eps, -_logsigmoid(-z))
        da = beta * (-(1 - eps) * _sigmoid(-z) + eps * _sigmoid(z))
        db = -da
    elif LOSS == 1:  # ipo
        d = h - 1 / (2 * beta)
        loss = d * d
        da = 2 * d
        db = -da
    elif LOSS == 2:  # hinge
        loss = tl.maximum(1 - z, 0.0, propagate_nan=tl.PropagateNan.ALL)  # relu(NaN) = NaN
        da = tl.where(1 - z > 0, -beta, 0.0).to(ACC)
        db = -da
    elif LOSS == 3:  # robust
        loss = (_weighted(1 - eps, -_logsigmoid(z)) + _weighted(eps, _logsigmoid(-z))) / (1 - 2 * eps)
        da = beta * (-(1 - eps) * _sigmoid(-z) - eps * _sigmoid(z)) / (1 - 2 * eps)
        db = -da
    elif LOSS == 4:  # exo_pair
        sp = _sigmoid(z)
        sn = _sigmoid(-z)
        loss = _weighted(sp, _logsigmoid(z) - c_pos) + _weighted(sn, _logsigmoid(-z) - c_neg)
        da = beta * _weighted(sp * sn, z - c_pos + c_neg)
        db = -da
    elif LOSS == 5:  # nca_pair
        za = beta * a
        zb = beta * b
        loss = -_logsigmoid(za) - 0.5 * _logsigmoid(-za) - 0.5 * _logsigmoid(-zb)
        da = beta * (0.5 * _sigmoid(za) - _sigmoid(-za))
        db = 0.5 * beta * _sigmoid(zb)
    elif LOSS == 6:  # sppo_hard
        dc = a - 0.5 / beta
        dr = b + 0.5 / beta
        loss = dc * dc + dr * dr
        da = 2 * dc
        db = 2 * dr
    elif LOSS == 7:  # apo_zero
        za = beta * a
        zb = beta * b
        loss = (1 - _sigmoid(za)) + _sigmoid(zb)
        da = -beta * _sigmoid(za) * _sigmoid(-za)
        db = beta * _sigmoid(zb) * _sigmoid(-zb)
    else:  # apo_down
        za = beta * a
        loss = _sigmoid(za) + (1 - _sigmoid(z))
        db = beta * _sigmoid(z) * _sigmoid(-z)
        da = beta * _sigmoid(za) * _sigmoid(-za) - db
    return loss, da, db, a, b


@triton.jit
def _dpo_fwd_kernel(
    pc_ptr, pr_ptr, rc_ptr, rr_ptr, part_ptr, ticket_ptr, out_ptr, N, n_blocks, beta, eps, c_pos, c_neg,
    LOSS: tl.constexpr, ACC: tl.constexpr, FINAL: tl.constexpr, BLOCK: tl.constexpr,
):
    """Block ``pid``'s sums of (loss, chosen, rejected, margin, accuracy) into ``part[pid]``; one
    block (``FINAL``) writes the means into ``out`` directly, else the last block adds them."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    loss, da, db, a, b = _pairs(pc_ptr, pr_ptr, rc_ptr, rr_ptr, offs, ok, beta, eps, c_pos, c_neg,
                                LOSS, ACC)
    chosen = beta * a
    rejected = beta * b
    out = (out_ptr if FINAL else part_ptr) + pid * 5
    n = N if FINAL else 1  # one block: write the means directly
    tl.store(out, tl.sum(tl.where(ok, loss, 0.0), axis=0) / n)
    tl.store(out + 1, tl.sum(tl.where(ok, chosen, 0.0), axis=0) / n)
    tl.store(out + 2, tl.sum(tl.where(ok, rejected, 0.0), axis=0) / n)
    tl.store(out + 3, tl.sum(tl.where(ok, chosen - rejected, 0.0), axis=0) / n)
    tl.store(out + 4, tl.sum(tl.where(ok & (chosen > rejected), 1.0, 0.0).to(ACC), axis=0) / n)
    if not FINAL:
        _mean_of_blocks(part_ptr, ticket_ptr, out_ptr, n_blocks, N, ACC, BLOCK)


@triton.jit(noinline=True)
def _mean_of_blocks(part_ptr, ticket_ptr, out_ptr, n_blocks, N, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """The last block to finish: ``out[i] = sum_k part[k, i] / N`` for the 5 columns, in a fixed
    order (not inlined: once per launch)."""
    if is_last(ticket_ptr, n_blocks):
        rows = tl.arange(0, BLOCK)
        for i in tl.static_range(5):
            acc = tl.zeros([BLOCK], ACC)
            for start in range(0, n_blocks, BLOCK):
                k = start + rows
                acc += tl.load(part_ptr + k * 5 + i, mask=k < n_blocks, other=0.0, cache_modifier=".cg")
            tl.store(out_ptr + i, tl.sum(acc, axis=0) / N)


@triton.jit
def _dpo_bwd_kernel(
    pc_ptr, pr_ptr, rc_ptr, rr_ptr, g_ptr, dpc_ptr, dpr_ptr, drc_ptr, drr_ptr,
    N, beta, eps, c_pos, c_neg, LOSS: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    loss, da, db, a, b = _pairs(pc_ptr, pr_ptr, rc_ptr, rr_ptr, offs, ok, beta, eps, c_pos, c_neg,
                                LOSS, ACC)
    g = tl.load(g_ptr).to(ACC) / N
    tl.store(dpc_ptr + offs, narrow(g * da, dpc_ptr), mask=ok)
    tl.store(drc_ptr + offs, narrow(-(g * da), drc_ptr), mask=ok)
    tl.store(dpr_ptr + offs, narrow(g * db, dpr_ptr), mask=ok)
    tl.store(drr_ptr + offs, narrow(-(g * db), drr_ptr), mask=ok)


def dpo_fwd(pc, pr, rc, rr, loss_code, beta, eps, c_pos, c_neg, out):
    """Fill ``out`` (``[5]``): mean loss, mean chosen reward, mean rejected reward, mean margin,
    accuracy, for ``N > 0`` pairs (kernel arguments from ``fastrlhf.ops.dpo``), in one launch.
    Allocates ``5 * cdiv(N, 1024)`` floats of block sums and a zeroed int32 ticket when
    ``N > 1024``."""
    N = pc.numel()
    xs = [flat(x) for x in (pc, pr, rc, rr)]
    n_blocks = cdiv(N, BLOCK)
    final = n_blocks == 1
    part = out if final else out.new_empty((n_blocks, 5))
    ticket = out if final else torch.zeros(1, dtype=torch.int32, device=out.device)
    _dpo_fwd_kernel[(n_blocks,)](*xs, part, ticket, out, N, n_blocks, beta, eps, c_pos, c_neg, loss_code,
                                 ACC=tl_acc(out.dtype), FINAL=final, BLOCK=BLOCK, num_warps=4)


def dpo_bwd(grad, pc, pr, rc, rr, loss_code, beta, eps, c_pos, c_neg, grads):
    """Fill ``grads``, four contiguous tensors shaped and typed like the inputs, for upstream
    gradient ``grad`` (a 0-dim tensor of the mean loss), ``N > 0`` pairs."""
    N = pc.numel()
    xs = [flat(x) for x in (pc, pr, rc, rr)]
    _dpo_bwd_kernel[(cdiv(N, BLOCK),)](
        *xs, grad, *grads, N, beta, eps, c_pos, c_neg, loss_code,
        ACC=tl_acc(acc_dtype(*xs)), BLOCK=BLOCK, num_warps=4)
