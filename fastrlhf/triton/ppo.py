"""Triton kernels for the PPO policy and value losses.

Forward: one program per ``BLOCK`` tokens of the flattened ``[B, T]`` computes the per-token
loss and statistics and writes its partial sums (``sums``: loss [, minus log-ratio], in the
accumulation dtype) and counts (``counts``: valid, clipped [, dual-clipped], int32); the op
layer adds the partials in a fixed order and normalizes (``fastrlhf.ops.ppo``). Backward: one
elementwise kernel writing ``grad * scale * w * d loss_token / d x``.

``w = 1 / n_row`` for ``seq-mean-token-mean`` (``PER_ROW``, the row counts given) and 1
otherwise. The row of a flat offset is ``(offset * row_magic) >> row_shift``, exact below
2**31 tokens (:func:`row_divider`); beyond, a plain 64-bit division. Full tiles load without
masks (128-bit loads); only the last tile is masked. Inputs are loaded whole and then selected
by the mask, so the loads vectorize; what masked tokens hold (even NaN) never reaches a result.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastrlhf.triton._common import narrow, tl_acc

TOKENS_PER_PARTIAL = 1024
"""Tokens summed by one program: the forward writes ``cdiv(B * T, TOKENS_PER_PARTIAL)`` partials."""


@triton.jit
def _clamp(x, lo, hi):
    """``x`` clamped to ``[lo, hi]``; NaN stays NaN (``tl.maximum`` may drop it on GPUs)."""
    return tl.where(x < lo, lo, tl.where(x > hi, hi, x))


@triton.jit
def _policy_terms(logp, old, adv, ratio_low, ratio_high, dual_clip, log_ratio_clamp):
    """Per token: ``(loss, clipped, dual_clipped, log_ratio, d loss / d logp)``."""
    raw = logp - old
    lr = _clamp(raw, -log_ratio_clamp, log_ratio_clamp)
    ratio = tl.exp(lr)
    loss1 = -adv * ratio
    loss2 = -adv * _clamp(ratio, ratio_low, ratio_high)
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
def _tokens(a_ptr, b_ptr, c_ptr, mask_ptr, offs, N, MASKED: tl.constexpr, ACC: tl.constexpr):
    """``(valid, a, b, c)`` at ``offs``: the three inputs in ``ACC`` and the valid flags."""
    if MASKED:
        inb = offs < N
        valid = (tl.load(mask_ptr + offs, mask=inb, other=0) != 0) & inb
        a = tl.load(a_ptr + offs, mask=inb, other=0.0)
        b = tl.load(b_ptr + offs, mask=inb, other=0.0)
        c = tl.load(c_ptr + offs, mask=inb, other=0.0)
    else:
        valid = tl.load(mask_ptr + offs) != 0
        a = tl.load(a_ptr + offs)
        b = tl.load(b_ptr + offs)
        c = tl.load(c_ptr + offs)
    return valid, a.to(ACC), b.to(ACC), c.to(ACC)


@triton.jit
def _row_weight(x, rowcnt_ptr, offs, N, T, row_magic, row_shift, MASKED: tl.constexpr, PER_ROW: tl.constexpr,
                FAST_ROWS: tl.constexpr):
    """``x / n_row`` (``PER_ROW``), else ``x``. Every in-bounds token's count is read, valid or
    not (a load masked by the mask would wait for it); a masked row's 0 is selected away later."""
    if PER_ROW:
        if FAST_ROWS:
            row = (offs * row_magic) >> row_shift
        else:
            row = offs // T
        if MASKED:
            n_row = tl.load(rowcnt_ptr + row, mask=offs < N, other=1)
        else:
            n_row = tl.load(rowcnt_ptr + row)
        x = x / n_row.to(x.dtype)
    return x


@triton.jit
def _policy_partials(logp_ptr, old_ptr, adv_ptr, mask_ptr, rowcnt_ptr, sums_ptr, counts_ptr, pid, N, T, P,
                     ratio_low, ratio_high, dual_clip, log_ratio_clamp, row_magic, row_shift,
                     MASKED: tl.constexpr, PER_ROW: tl.constexpr, FAST_ROWS: tl.constexpr,
                     ACC: tl.constexpr, BLOCK: tl.constexpr):
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid, logp, old, adv = _tokens(logp_ptr, old_ptr, adv_ptr, mask_ptr, offs, N, MASKED, ACC)
    loss, clipped, lower, lr, _ = _policy_terms(logp, old, adv, ratio_low, ratio_high, dual_clip,
                                                log_ratio_clamp)
    loss = _row_weight(loss, rowcnt_ptr, offs, N, T, row_magic, row_shift, MASKED, PER_ROW, FAST_ROWS)
    tl.store(sums_ptr + pid, tl.sum(tl.where(valid, loss, 0.0), axis=0))
    tl.store(sums_ptr + P + pid, tl.sum(tl.where(valid, -lr, 0.0), axis=0))
    tl.store(counts_ptr + pid, tl.sum(valid.to(tl.int32), axis=0))
    tl.store(counts_ptr + P + pid, tl.sum((valid & clipped).to(tl.int32), axis=0))
    tl.store(counts_ptr + 2 * P + pid, tl.sum((valid & lower).to(tl.int32), axis=0))


@triton.jit
def _policy_fwd_kernel(logp_ptr, old_ptr, adv_ptr, mask_ptr, rowcnt_ptr, sums_ptr, counts_ptr, N, T, P,
                       ratio_low, ratio_high, dual_clip, log_ratio_clamp, row_magic, row_shift,
                       PER_ROW: tl.constexpr, FAST_ROWS: tl.constexpr, ACC: tl.constexpr,
                       BLOCK: tl.constexpr):
    """Partials of program ``pid``: ``sums[:, pid]`` = (weighted loss, -log-ratio), ``counts[:, pid]``
    = (valid, clipped, dual-clipped)."""
    pid = tl.program_id(0)
    args = (logp_ptr, old_ptr, adv_ptr, mask_ptr, rowcnt_ptr, sums_ptr, counts_ptr, pid, N, T, P,
            ratio_low, ratio_high, dual_clip, log_ratio_clamp, row_magic, row_shift)
    if pid < N // BLOCK:
        _policy_partials(*args, False, PER_ROW, FAST_ROWS, ACC, BLOCK)
    else:
        _policy_partials(*args, True, PER_ROW, FAST_ROWS, ACC, BLOCK)


@triton.jit
def _value_partials(v_ptr, old_ptr, ret_ptr, mask_ptr, rowcnt_ptr, sums_ptr, counts_ptr, pid, N, T, P,
                    clip, row_magic, row_shift, MASKED: tl.constexpr, PER_ROW: tl.constexpr,
                    FAST_ROWS: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid, v, old, ret = _tokens(v_ptr, old_ptr, ret_ptr, mask_ptr, offs, N, MASKED, ACC)
    loss, clipped, _ = _value_terms(v, old, ret, clip)
    loss = _row_weight(loss, rowcnt_ptr, offs, N, T, row_magic, row_shift, MASKED, PER_ROW, FAST_ROWS)
    tl.store(sums_ptr + pid, tl.sum(tl.where(valid, loss, 0.0), axis=0))
    tl.store(counts_ptr + pid, tl.sum(valid.to(tl.int32), axis=0))
    tl.store(counts_ptr + P + pid, tl.sum((valid & clipped).to(tl.int32), axis=0))


@triton.jit
def _value_fwd_kernel(v_ptr, old_ptr, ret_ptr, mask_ptr, rowcnt_ptr, sums_ptr, counts_ptr, N, T, P,
                      clip, row_magic, row_shift, PER_ROW: tl.constexpr, FAST_ROWS: tl.constexpr,
                      ACC: tl.constexpr, BLOCK: tl.constexpr):
    """Partials of program ``pid``: ``sums[0, pid]`` = weighted loss, ``counts[:, pid]`` = (valid, clipped)."""
    pid = tl.program_id(0)
    args = (v_ptr, old_ptr, ret_ptr, mask_ptr, rowcnt_ptr, sums_ptr, counts_ptr, pid, N, T, P, clip,
            row_magic, row_shift)
    if pid < N // BLOCK:
        _value_partials(*args, False, PER_ROW, FAST_ROWS, ACC, BLOCK)
    else:
        _value_partials(*args, True, PER_ROW, FAST_ROWS, ACC, BLOCK)


@triton.jit
def _policy_grad(grad_ptr, scale_ptr, logp_ptr, old_ptr, adv_ptr, mask_ptr, rowcnt_ptr, dx_ptr, pid, N, T,
                 ratio_low, ratio_high, dual_clip, log_ratio_clamp, row_magic, row_shift,
                 MASKED: tl.constexpr, PER_ROW: tl.constexpr, FAST_ROWS: tl.constexpr,
                 ACC: tl.constexpr, BLOCK: tl.constexpr):
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid, logp, old, adv = _tokens(logp_ptr, old_ptr, adv_ptr, mask_ptr, offs, N, MASKED, ACC)
    _, _, _, _, d = _policy_terms(logp, old, adv, ratio_low, ratio_high, dual_clip, log_ratio_clamp)
    d = _row_weight(d, rowcnt_ptr, offs, N, T, row_magic, row_shift, MASKED, PER_ROW, FAST_ROWS)
    g = tl.where(valid, tl.load(grad_ptr).to(ACC) * tl.load(scale_ptr).to(ACC) * d, 0.0)
    _store(dx_ptr, offs, g, N, MASKED)


@triton.jit
def _policy_bwd_kernel(grad_ptr, scale_ptr, logp_ptr, old_ptr, adv_ptr, mask_ptr, rowcnt_ptr, dx_ptr, N, T,
                       ratio_low, ratio_high, dual_clip, log_ratio_clamp, row_magic, row_shift,
                       PER_ROW: tl.constexpr, FAST_ROWS: tl.constexpr, ACC: tl.constexpr,
                       BLOCK: tl.constexpr):
    """``d loss / d logp = grad * scale * w * d loss_token / d logp`` on valid tokens, 0 elsewhere."""
    pid = tl.program_id(0)
    args = (grad_ptr, scale_ptr, logp_ptr, old_ptr, adv_ptr, mask_ptr, rowcnt_ptr, dx_ptr, pid, N, T,
            ratio_low, ratio_high, dual_clip, log_ratio_clamp, row_magic, row_shift)
    if pid < N // BLOCK:
        _policy_grad(*args, False, PER_ROW, FAST_ROWS, ACC, BLOCK)
    else:
        _policy_grad(*args, True, PER_ROW, FAST_ROWS, ACC, BLOCK)


@triton.jit
def _value_grad(grad_ptr, scale_ptr, v_ptr, old_ptr, ret_ptr, mask_ptr, rowcnt_ptr, dx_ptr, pid, N, T, clip,
                row_magic, row_shift, MASKED: tl.constexpr, PER_ROW: tl.constexpr,
                FAST_ROWS: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid, v, old, ret = _tokens(v_ptr, old_ptr, ret_ptr, mask_ptr, offs, N, MASKED, ACC)
    _, _, d = _value_terms(v, old, ret, clip)
    d = _row_weight(d, rowcnt_ptr, offs, N, T, row_magic, row_shift, MASKED, PER_ROW, FAST_ROWS)
    g = tl.where(valid, tl.load(grad_ptr).to(ACC) * tl.load(scale_ptr).to(ACC) * d, 0.0)
    _store(dx_ptr, offs, g, N, MASKED)


@triton.jit
def _value_bwd_kernel(grad_ptr, scale_ptr, v_ptr, old_ptr, ret_ptr, mask_ptr, rowcnt_ptr, dx_ptr, N, T,
                      clip, row_magic, row_shift, PER_ROW: tl.constexpr, FAST_ROWS: tl.constexpr,
                      ACC: tl.constexpr, BLOCK: tl.constexpr):
    """``d loss / d v = grad * scale * w * d loss_token / d v`` on valid tokens, 0 elsewhere."""
    pid = tl.program_id(0)
    args = (grad_ptr, scale_ptr, v_ptr, old_ptr, ret_ptr, mask_ptr, rowcnt_ptr, dx_ptr, pid, N, T, clip,
            row_magic, row_shift)
    if pid < N // BLOCK:
        _value_grad(*args, False, PER_ROW, FAST_ROWS, ACC, BLOCK)
    else:
        _value_grad(*args, True, PER_ROW, FAST_ROWS, ACC, BLOCK)


@triton.jit
def _store(ptr, offs, x, N, MASKED: tl.constexpr):
    if MASKED:
        tl.store(ptr + offs, narrow(x, ptr), mask=offs < N)
    else:
        tl.store(ptr + offs, narrow(x, ptr))


def row_divider(T: int) -> tuple[int, int]:
    """``(magic, shift)`` with ``(i * magic) >> shift == i // T`` for every ``0 <= i < 2**31``
    (Granlund and Montgomery's division by an invariant integer: ``magic < 2**32``, so the
    product fits in int64)."""
    shift = 31 + (T - 1).bit_length()
    return -(-(1 << shift) // T), shift


def _flat(x: torch.Tensor) -> torch.Tensor:
    """A contiguous 1-D view (a copy only for a non-contiguous or expanded input)."""
    x = x.reshape(-1).contiguous()
    return x.view(torch.uint8) if x.dtype == torch.bool else x


def ppo_policy_fwd(logprobs, old_logprobs, advantages, mask, row_counts, ratio_low, ratio_high, dual_clip,
                   log_ratio_clamp, sums, counts):
    """Fill the partials ``sums [2, P]`` (accumulation dtype) and ``counts [3, P]`` (int32) of
    ``[B, T]`` inputs, ``P = cdiv(B * T, TOKENS_PER_PARTIAL)``; ``row_counts``: int64 ``[B]``
    (``seq-mean-token-mean``) or None."""
    n, T = logprobs.numel(), logprobs.shape[1]
    magic, shift = row_divider(T)
    _policy_fwd_kernel[(sums.shape[1],)](
        _flat(logprobs), _flat(old_logprobs), _flat(advantages), _flat(mask),
        row_counts if row_counts is not None else counts, sums, counts, n, T, sums.shape[1],
        ratio_low, ratio_high, dual_clip, log_ratio_clamp, magic, shift,
        PER_ROW=row_counts is not None, FAST_ROWS=n < 2**31, ACC=tl_acc(sums.dtype), BLOCK=TOKENS_PER_PARTIAL)


def ppo_value_fwd(values, old_values, returns, mask, row_counts, clip, sums, counts):
    """Fill the partials ``sums [1, P]`` and ``counts [2, P]`` (see :func:`ppo_policy_fwd`)."""
    n, T = values.numel(), values.shape[1]
    magic, shift = row_divider(T)
    _value_fwd_kernel[(sums.shape[1],)](
        _flat(values), _flat(old_values), _flat(returns), _flat(mask),
        row_counts if row_counts is not None else counts, sums, counts, n, T, sums.shape[1], clip, magic, shift,
        PER_ROW=row_counts is not None, FAST_ROWS=n < 2**31, ACC=tl_acc(sums.dtype), BLOCK=TOKENS_PER_PARTIAL)


def ppo_policy_bwd(grad, scale, logprobs, old_logprobs, advantages, mask, row_counts, ratio_low, ratio_high,
                   dual_clip, log_ratio_clamp, grad_logprobs):
    """Fill ``grad_logprobs`` (contiguous, the log-probs' dtype); ``grad``, ``scale``: 0-dim."""
    n, T = logprobs.numel(), logprobs.shape[1]
    magic, shift = row_divider(T)
    _policy_bwd_kernel[(triton.cdiv(n, TOKENS_PER_PARTIAL),)](
        grad, scale, _flat(logprobs), _flat(old_logprobs), _flat(advantages), _flat(mask),
        row_counts if row_counts is not None else scale, grad_logprobs, n, T,
        ratio_low, ratio_high, dual_clip, log_ratio_clamp, magic, shift,
        PER_ROW=row_counts is not None, FAST_ROWS=n < 2**31, ACC=tl_acc(scale.dtype), BLOCK=TOKENS_PER_PARTIAL)


def ppo_value_bwd(grad, scale, values, old_values, returns, mask, row_counts, clip, grad_values):
    """Fill ``grad_values`` (contiguous, the values' dtype); ``grad``, ``scale``: 0-dim."""
    n, T = values.numel(), values.shape[1]
    magic, shift = row_divider(T)
    _value_bwd_kernel[(triton.cdiv(n, TOKENS_PER_PARTIAL),)](
        grad, scale, _flat(values), _flat(old_values), _flat(returns), _flat(mask),
        row_counts if row_counts is not None else scale, grad_values, n, T, clip, magic, shift,
        PER_ROW=row_counts is not None, FAST_ROWS=n < 2**31, ACC=tl_acc(scale.dtype), BLOCK=TOKENS_PER_PARTIAL)
