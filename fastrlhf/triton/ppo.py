"""Triton kernels for the PPO policy and value losses.

Forward: one program per ``BLOCK`` tile of the flattened ``[B, T]`` (64-bit offsets) computes
the per-token loss and statistics and writes its partial sums (loss, minus log-ratio: fp32,
fp64 for fp64 inputs) and counts (valid, clipped, dual-clipped: int32) to a ``[k, P]``
buffer. Second stage: a torch ``.sum`` over those ``P`` partials (fixed order, no atomics:
same input, same bits) and the normalization.

Aggregation: ``loss = scale * sum(w * loss_token)`` over valid tokens, ``w = 1 / n_row`` for
``seq-mean-token-mean`` (``PER_ROW``; row counts from a torch ``(mask != 0).sum(-1)``) and
1 otherwise; ``scale`` (a 0-dim tensor: ``1 / tokens``, ``1 / sequences``, ...) is kept for
backward, which is one elementwise kernel writing ``d loss / d logprobs`` (or ``/ d values``).

A ``None`` clip / clamp is passed as ``inf``: it changes nothing, so no kernel specializes on it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastrlhf._numerics import acc_dtype
from fastrlhf.reference.ppo import kernel_params, reduce_partials
from fastrlhf.triton._common import tl_acc

_BLOCK = 1024


@triton.jit
def _clamp(x, lo, hi):
    """``x`` clamped to ``[lo, hi]``; NaN stays NaN (``tl.maximum`` may drop it on GPUs)."""
    return tl.where(x < lo, lo, tl.where(x > hi, hi, x))


@triton.jit
def _policy_terms(logp, old, adv, ratio_lo, ratio_hi, dual_clip, log_ratio_clamp):
    """Per token: ``(loss, clipped, dual_clipped, log_ratio, d loss / d logp)``."""
    raw = logp - old
    lr = _clamp(raw, -log_ratio_clamp, log_ratio_clamp)
    ratio = tl.exp(lr)
    loss1 = -adv * ratio
    loss2 = -adv * _clamp(ratio, ratio_lo, ratio_hi)
    clipped = loss2 > loss1
    loss = tl.where(clipped, loss2, loss1)
    loss3 = -tl.where(adv < 0, adv, -1.0) * dual_clip  # -A * c where A < 0; no 0 * inf
    lower = (adv < 0) & (loss > loss3)  # never without dual clip (c = inf)
    d = tl.where(clipped | lower | (tl.abs(raw) > log_ratio_clamp), 0.0, loss1)
    return tl.where(lower, loss3, loss), clipped, lower, lr, d


@triton.jit
def _value_terms(v, old, ret, clip):
    """Per token: ``(loss, clipped, d loss / d v)``."""
    err = v - ret
    loss1 = err * err
    err2 = _clamp(v, old - clip, old + clip) - ret
    loss2 = err2 * err2
    clipped = loss2 > loss1
    return 0.5 * tl.where(clipped, loss2, loss1), clipped, tl.where(clipped, 0.0, err)


@triton.jit
def _load_tile(x_ptr, old_ptr, y_ptr, mask_ptr, pid, N, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """Offsets, in-bounds and valid flags, and the three inputs (0 where not valid) of tile ``pid``."""
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < N
    valid = (tl.load(mask_ptr + offs, mask=inb, other=0) != 0) & inb
    x = tl.load(x_ptr + offs, mask=valid, other=0.0).to(ACC)
    old = tl.load(old_ptr + offs, mask=valid, other=0.0).to(ACC)
    y = tl.load(y_ptr + offs, mask=valid, other=0.0).to(ACC)
    return offs, inb, valid, x, old, y


@triton.jit
def _ppo_fwd_kernel(x_ptr, old_ptr, y_ptr, mask_ptr, rowcnt_ptr, sums_ptr, counts_ptr, N, T, P,
                    c0, c1, c2, c3,
                    VALUE: tl.constexpr, PER_ROW: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """Policy (``x, old, y`` = log-probs, old log-probs, advantages; ``c0..c3`` = ratio low and
    high bounds, dual clip, log-ratio clamp) or value (values, old values, returns; ``c0`` =
    clip). Writes ``sums[:, pid]`` = (weighted loss, -log-ratio) and ``counts[:, pid]`` =
    (valid, clipped, dual-clipped); the value loss writes only the first of each and the
    clipped count."""
    pid = tl.program_id(0)
    offs, inb, valid, x, old, y = _load_tile(x_ptr, old_ptr, y_ptr, mask_ptr, pid, N, ACC, BLOCK)
    if VALUE:
        loss, clipped, _ = _value_terms(x, old, y, c0)
    else:
        loss, clipped, lower, lr, _ = _policy_terms(x, old, y, c0, c1, c2, c3)
    if PER_ROW:
        loss = loss / tl.load(rowcnt_ptr + offs // T, mask=valid, other=1).to(ACC)
    tl.store(sums_ptr + pid, tl.sum(tl.where(valid, loss, 0.0), axis=0))
    tl.store(counts_ptr + pid, tl.sum(valid.to(tl.int32), axis=0))
    tl.store(counts_ptr + P + pid, tl.sum((valid & clipped).to(tl.int32), axis=0))
    if not VALUE:
        tl.store(sums_ptr + P + pid, tl.sum(tl.where(valid, -lr, 0.0), axis=0))
        tl.store(counts_ptr + 2 * P + pid, tl.sum((valid & lower).to(tl.int32), axis=0))


@triton.jit
def _ppo_bwd_kernel(grad_ptr, scale_ptr, x_ptr, old_ptr, y_ptr, mask_ptr, rowcnt_ptr, dx_ptr, N, T,
                    c0, c1, c2, c3,
                    VALUE: tl.constexpr, PER_ROW: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """``dx = grad * scale * w * d loss_token / dx`` on valid tokens, 0 elsewhere."""
    offs, inb, valid, x, old, y = _load_tile(x_ptr, old_ptr, y_ptr, mask_ptr, tl.program_id(0), N,
                                             ACC, BLOCK)
    if VALUE:
        _, _, d = _value_terms(x, old, y, c0)
    else:
        _, _, _, _, d = _policy_terms(x, old, y, c0, c1, c2, c3)
    w = tl.load(grad_ptr).to(ACC) * tl.load(scale_ptr).to(ACC)
    if PER_ROW:
        d = d / tl.load(rowcnt_ptr + offs // T, mask=valid, other=1).to(ACC)
    tl.store(dx_ptr + offs, tl.where(valid, w * d, 0.0).to(dx_ptr.dtype.element_ty), mask=inb)


def _flat(x: torch.Tensor) -> torch.Tensor:
    """A contiguous 1-D view (a copy only for a non-contiguous or expanded input)."""
    return x.reshape(-1).contiguous()


def ppo_loss_fwd(value, x, old, y, mask, clips, agg, denom):
    """Launch the forward kernel and reduce its partials.

    Returns ``(loss, stats, scale, row_counts)``: ``loss`` and ``scale`` 0-dim, ``stats`` a
    tuple of 0-dim tensors (policy: clipfrac, clipfrac_lower, approx_kl; value: vf_clipfrac),
    all fp32 (fp64 for fp64 inputs); ``row_counts`` int64 ``[B]`` for ``seq-mean-token-mean``,
    else empty. Allocates ``5 * cdiv(B * T, 1024)`` partials besides.
    """
    B, T = x.shape
    n = B * T
    dtype = acc_dtype(x, old, y)
    per_row = agg == "seq-mean-token-mean"
    row_counts = (mask != 0).sum(-1) if per_row else None  # the kernel weighs tokens by them
    P = triton.cdiv(n, _BLOCK)
    sums = torch.empty((1 if value else 2, P), dtype=dtype, device=x.device)
    counts = torch.empty((2 if value else 3, P), dtype=torch.int32, device=x.device)
    if n:
        _ppo_fwd_kernel[(P,)](
            _flat(x), _flat(old), _flat(y), _flat(mask), row_counts if per_row else counts,
            sums, counts, n, T, P, *kernel_params(value, clips),
            VALUE=value, PER_ROW=per_row, ACC=tl_acc(acc_dtype(x, old, y)), BLOCK=_BLOCK)
    return reduce_partials(value, sums, counts, mask, agg, denom, dtype, row_counts)


def ppo_loss_bwd(value, grad, scale, x, old, y, mask, row_counts, clips, agg):
    """``d loss / d x`` (log-probs or values), a new contiguous tensor in ``x.dtype``."""
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    n = x.numel()
    if n:
        per_row = agg == "seq-mean-token-mean"
        _ppo_bwd_kernel[(triton.cdiv(n, _BLOCK),)](
            grad, scale, _flat(x), _flat(old), _flat(y), _flat(mask), row_counts if per_row else scale,
            dx, n, x.shape[1], *kernel_params(value, clips),
            VALUE=value, PER_ROW=per_row, ACC=tl_acc(acc_dtype(x, old, y)), BLOCK=_BLOCK)
    return dx
