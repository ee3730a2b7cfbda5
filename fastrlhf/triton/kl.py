"""Triton kernels for KL estimators, KL-penalized per-token rewards and clipped importance
weights.

All math in fp32 (fp64 for fp64 inputs). A ``None`` clamp comes as ``inf``, which leaves
every value unchanged, so clamps are runtime arguments and never specialize a kernel.
Estimators are ``EST``, numbered as ``fastrlhf.reference.kl.CODES`` (k1, abs, k2, k3).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastrlhf._numerics import acc_dtype
from fastrlhf.interpreter import triton_interpreter
from fastrlhf.reference.kl import CODES
from fastrlhf.triton._common import cdiv, flat, narrow, tl_acc

_K1, _ABS, _K2 = (tl.constexpr(CODES.index(name)) for name in ("k1", "abs", "k2"))  # else k3

_BLOCK = 1024
TARGET_PROGRAMS = 1024  # enough programs to fill a GPU before cutting rows into chunks


@triton.jit
def _clamp(x, bound):
    """``x`` clamped to ``[-bound, bound]``; NaN stays NaN (``tl.maximum`` may drop it on GPUs)."""
    return tl.where(x < -bound, -bound, tl.where(x > bound, bound, x))


@triton.jit
def _k3(x):
    """``(exp(-x) - 1 + x, 1 - exp(-x))`` to a few ulps relative: the series of ``e**y - 1 - y``
    (``y = -x``, to ``y**23 / 23!``) where ``-2 < x < 1``, the closed forms beyond: the forms and
    ranges of ``reference.kl.k3_parts`` (Triton has no ``expm1``: ``exp(-x) - (1 - x)`` for
    ``x <= -2``, a cancellation of at most 1.7x there)."""
    near = (x > -2.0) & (x < 1.0)
    y = -tl.where(near, x, 0.0)
    p = tl.full(x.shape, 3.868170170630684e-23, x.dtype)
    p = p * y + 8.896791392450574e-22
    p = p * y + 1.9572941063391263e-20
    p = p * y + 4.110317623312165e-19
    p = p * y + 8.22063524662433e-18
    p = p * y + 1.5619206968586225e-16
    p = p * y + 2.8114572543455206e-15
    p = p * y + 4.779477332387385e-14
    p = p * y + 7.647163731819816e-13
    p = p * y + 1.1470745597729725e-11
    p = p * y + 1.6059043836821613e-10
    p = p * y + 2.08767569878681e-09
    p = p * y + 2.505210838544172e-08
    p = p * y + 2.755731922398589e-07
    p = p * y + 2.7557319223985893e-06
    p = p * y + 2.48015873015873e-05
    p = p * y + 0.0001984126984126984
    p = p * y + 0.001388888888888889
    p = p * y + 0.008333333333333333
    p = p * y + 0.041666666666666664
    p = p * y + 0.16666666666666666
    p = p * y + 0.5
    tail = y * y * p
    e = tl.exp(-x)
    far = tl.where(x >= 1.0, e + (x - 1.0), e - (1.0 - x))
    return tl.where(near, tail, far), tl.where(near, -(y + tail), 1.0 - e)


@triton.jit
def _kl_value(lr, log_ratio_clamp, EST: tl.constexpr):
    x = _clamp(lr, log_ratio_clamp)
    if EST == _K1:
        v = x
    elif EST == _ABS:
        v = tl.abs(x)
    elif EST == _K2:
        v = 0.5 * x * x
    else:
        v, _ = _k3(x)
    return x, v


@triton.jit
def _kl_estimate(lr, clamp, log_ratio_clamp, EST: tl.constexpr):
    """The clamped estimate of the log-ratio ``lr``."""
    _, v = _kl_value(lr, log_ratio_clamp, EST)
    return _clamp(v, clamp)


@triton.jit
def _kl_derivative(lr, clamp, log_ratio_clamp, EST: tl.constexpr, STRAIGHT: tl.constexpr):
    """d estimate / d lr; 0 where a clamp is active. Straight-through: ``lr`` (k2's)."""
    if STRAIGHT:
        d = lr
    else:
        x, v = _kl_value(lr, log_ratio_clamp, EST)
        if EST == _K1:
            d = tl.full(x.shape, 1.0, x.dtype)
        elif EST == _ABS:
            d = tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0))
        elif EST == _K2:
            d = x
        else:
            _, d = _k3(x)
        active = (tl.abs(lr) > log_ratio_clamp) | (tl.abs(v) > clamp)
        d = tl.where(active, 0.0, d)
    return d


@triton.jit
def _log_ratio(logp_ptr, ref_ptr, offs, mask, ACC: tl.constexpr):
    logp = tl.load(logp_ptr + offs, mask=mask, other=0.0).to(ACC)
    return logp - tl.load(ref_ptr + offs, mask=mask, other=0.0).to(ACC)


@triton.jit
def _store_pair(d, da_ptr, db_ptr, offs, inb, WANT_A: tl.constexpr, WANT_B: tl.constexpr):
    """The gradients of a difference ``a - b`` of two inputs: ``d`` and ``-d``, each if wanted."""
    if WANT_A:
        tl.store(da_ptr + offs, narrow(d, da_ptr), mask=inb)
    if WANT_B:
        tl.store(db_ptr + offs, narrow(-d, db_ptr), mask=inb)


@triton.jit
def _kl_fwd_kernel(logp_ptr, ref_ptr, kl_ptr, N, clamp, log_ratio_clamp,
                   EST: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < N
    lr = _log_ratio(logp_ptr, ref_ptr, offs, inb, ACC)
    tl.store(kl_ptr + offs, _kl_estimate(lr, clamp, log_ratio_clamp, EST), mask=inb)


@triton.jit
def _kl_bwd_kernel(grad_ptr, logp_ptr, ref_ptr, dlogp_ptr, dref_ptr, N, clamp, log_ratio_clamp,
                   EST: tl.constexpr, STRAIGHT: tl.constexpr, WANT_LOGP: tl.constexpr,
                   WANT_REF: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < N
    lr = _log_ratio(logp_ptr, ref_ptr, offs, inb, ACC)
    d = _kl_derivative(lr, clamp, log_ratio_clamp, EST, STRAIGHT)
    _store_pair(d * tl.load(grad_ptr + offs, mask=inb, other=0.0).to(ACC), dlogp_ptr, dref_ptr, offs, inb,
                WANT_LOGP, WANT_REF)


@triton.jit
def _weight(lr, low, high, log_ratio_clamp):
    """``(clamp(exp(clamp(lr)), low, high), d weight / d lr)``: 0 where a clamp is active."""
    r = tl.exp(_clamp(lr, log_ratio_clamp))
    w = tl.where(r < low, low, tl.where(r > high, high, r))
    return w, tl.where((tl.abs(lr) > log_ratio_clamp) | (r < low) | (r > high), 0.0, r)


@triton.jit
def _weights_fwd_kernel(logp_ptr, old_ptr, w_ptr, N, low, high, log_ratio_clamp, ACC: tl.constexpr,
                        BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < N
    w, _ = _weight(_log_ratio(logp_ptr, old_ptr, offs, inb, ACC), low, high, log_ratio_clamp)
    tl.store(w_ptr + offs, w, mask=inb)


@triton.jit
def _weights_bwd_kernel(grad_ptr, logp_ptr, old_ptr, dlogp_ptr, dold_ptr, N, low, high, log_ratio_clamp,
                        WANT_LOGP: tl.constexpr, WANT_OLD: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < N
    _, d = _weight(_log_ratio(logp_ptr, old_ptr, offs, inb, ACC), low, high, log_ratio_clamp)
    _store_pair(d * tl.load(grad_ptr + offs, mask=inb, other=0.0).to(ACC), dlogp_ptr, dold_ptr, offs, inb,
                WANT_LOGP, WANT_OLD)


@triton.jit
def _rewards_tile(lp_row, rf_row, m_row, rewards_ptr, kl_ptr, out, cols, hi, coef, clamp, log_ratio_clamp,
                  last, MASKED: tl.constexpr, EST: tl.constexpr, ACC: tl.constexpr):
    """Write one tile's rewards and KL; return the last valid column so far."""
    if MASKED:
        inb = cols < hi
        valid = (tl.load(m_row + cols, mask=inb, other=0) != 0) & inb
        lr = _log_ratio(lp_row, rf_row, cols, inb, ACC)  # bounds-masked only: no wait on the mask
    else:
        valid = tl.load(m_row + cols) != 0
        lr = tl.load(lp_row + cols).to(ACC) - tl.load(rf_row + cols).to(ACC)
    kl = tl.where(valid, _kl_estimate(lr, clamp, log_ratio_clamp, EST), 0.0)
    if MASKED:
        tl.store(rewards_ptr + out + cols, tl.where(valid, -coef * kl, 0.0), mask=inb)
        tl.store(kl_ptr + out + cols, kl, mask=inb)
    else:
        tl.store(rewards_ptr + out + cols, tl.where(valid, -coef * kl, 0.0))
        tl.store(kl_ptr + out + cols, kl)
    return tl.maximum(last, tl.max(tl.where(valid, cols, -1), axis=0))


@triton.jit
def _kl_rewards_kernel(scores_ptr, logp_ptr, ref_ptr, mask_ptr, rewards_ptr, kl_ptr, coef_ptr, cu_ptr,
                       T, NC, CHUNK, s_logp, s_ref, s_mask, kl_coef, clamp, log_ratio_clamp, score_clip,
                       EST: tl.constexpr, COEF_TENSOR: tl.constexpr, PACKED: tl.constexpr, ACC: tl.constexpr,
                       BLOCK_T: tl.constexpr):
    """One program per chunk of a row (a packed sequence: ``[cu[s], cu[s + 1])``), tile by
    tile. The chunk holding the row's last valid token adds the score there, after its tiles
    are written; it knows it holds it by reading the mask past its end until a valid token
    (only the chunk right before a masked run reads it, so the extra reads stay below one
    more pass over the mask)."""
    pid = tl.program_id(0)
    row = (pid // NC).to(tl.int64)
    c = pid % NC
    if PACKED:
        start = tl.load(cu_ptr + row).to(tl.int64)
        L = tl.load(cu_ptr + row + 1).to(tl.int64) - start
        lp_row, rf_row, m_row, out = logp_ptr + start, ref_ptr + start, mask_ptr + start, start
    else:
        L = T
        lp_row, rf_row, m_row, out = logp_ptr + row * s_logp, ref_ptr + row * s_ref, mask_ptr + row * s_mask, row * T
    if COEF_TENSOR:
        coef = tl.load(coef_ptr).to(ACC)
    else:
        coef = kl_coef
    lo = c * CHUNK
    hi = tl.minimum(lo + CHUNK, L)
    j = tl.arange(0, BLOCK_T)
    last = tl.full([], -1, tl.int64)
    n_full = tl.maximum(hi - lo, 0) // BLOCK_T
    for k in range(0, n_full):  # full tiles: vector loads and stores, no mask
        last = _rewards_tile(lp_row, rf_row, m_row, rewards_ptr, kl_ptr, out, lo + k * BLOCK_T + j, hi, coef,
                             clamp, log_ratio_clamp, last, False, EST, ACC)
    if lo + n_full * BLOCK_T < hi:
        last = _rewards_tile(lp_row, rf_row, m_row, rewards_ptr, kl_ptr, out, lo + n_full * BLOCK_T + j, hi, coef,
                             clamp, log_ratio_clamp, last, True, EST, ACC)
    later = tl.full([], 0, tl.int32)
    nxt = hi
    while (last >= 0) & (later == 0) & (nxt < L):
        cols = nxt + j
        later = tl.max((tl.load(m_row + cols, mask=cols < L, other=0) != 0).to(tl.int32), axis=0)
        nxt += BLOCK_T
    if (last >= 0) & (later == 0):  # the row's last valid token: its reward gets the score
        tl.debug_barrier()  # after every thread's stores above
        score = _clamp(tl.load(scores_ptr + row).to(ACC), score_clip)
        at = rewards_ptr + out + last
        tl.store(at, tl.load(at) + score)


def kl_penalty_fwd(logprobs, ref_logprobs, estimator, clamp, log_ratio_clamp, out):
    """Fill ``out`` (contiguous, the inputs' shape) with the clamped estimate."""
    n = out.numel()
    _kl_fwd_kernel[(cdiv(n, _BLOCK),)](
        flat(logprobs), flat(ref_logprobs), out, n, clamp, log_ratio_clamp,
        EST=estimator, ACC=tl_acc(out.dtype), BLOCK=_BLOCK)


def _pair_backward(kernel, grad, a, b, args, grad_a, grad_b, **constexprs):
    """Launch an elementwise backward ``kernel`` of two log-prob inputs into their gradients
    (contiguous, the inputs' dtypes; an empty one is not wanted)."""
    outs = (grad_a, grad_b)
    if triton_interpreter():
        # The interpreter casts fp32 to bf16 by truncation (GPUs round to nearest): under it the
        # kernel writes fp32 and torch rounds, so the tests see the GPU's rounding.
        outs = tuple(g.new_empty(g.shape, dtype=torch.float32) if g.dtype == torch.bfloat16 else g for g in outs)
    n = a.numel()
    kernel[(cdiv(n, _BLOCK),)](flat(grad), flat(a), flat(b), outs[0], outs[1], n, *args, **constexprs,
                                      ACC=tl_acc(acc_dtype(a, b)), BLOCK=_BLOCK)
    for out, buf in zip((grad_a, grad_b), outs):
        if buf is not out:
            out.copy_(buf)


def kl_penalty_bwd(grad, logprobs, ref_logprobs, estimator, straight, clamp, log_ratio_clamp,
                   grad_logprobs, grad_ref_logprobs):
    """Fill the gradients (contiguous, the inputs' dtypes); an empty one is not wanted."""
    _pair_backward(_kl_bwd_kernel, grad, logprobs, ref_logprobs, (clamp, log_ratio_clamp), grad_logprobs,
                   grad_ref_logprobs, EST=estimator, STRAIGHT=straight, WANT_LOGP=grad_logprobs.numel() > 0,
                   WANT_REF=grad_ref_logprobs.numel() > 0)


def importance_weights_fwd(logprobs, old_logprobs, low, high, log_ratio_clamp, out):
    """Fill ``out`` (contiguous, the inputs' shape) with the clipped weights; an unset bound is ``inf``."""
    n = out.numel()
    _weights_fwd_kernel[(cdiv(n, _BLOCK),)](
        flat(logprobs), flat(old_logprobs), out, n, low, high, log_ratio_clamp, ACC=tl_acc(out.dtype), BLOCK=_BLOCK)


def importance_weights_bwd(grad, logprobs, old_logprobs, low, high, log_ratio_clamp, grad_logprobs,
                           grad_old_logprobs):
    """Fill the gradients (contiguous, the inputs' dtypes); an empty one is not wanted."""
    _pair_backward(_weights_bwd_kernel, grad, logprobs, old_logprobs, (low, high, log_ratio_clamp), grad_logprobs,
                   grad_old_logprobs, WANT_LOGP=grad_logprobs.numel() > 0, WANT_OLD=grad_old_logprobs.numel() > 0)


def _rows(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``(x, row stride)`` of a ``[B, T]`` tensor read in place when its last dim is unit-strided
    (a packed 1-D tensor: contiguous, stride 0); a bool mask as bytes."""
    if x.dim() == 1 or (x.shape[1] > 1 and x.stride(1) != 1):
        x = x.contiguous()
    if x.dtype == torch.bool:
        x = x.view(torch.uint8)
    return x, (x.stride(0) if x.dim() == 2 else 0)


def kl_penalized_rewards_fwd(scores, logprobs, ref_logprobs, mask, kl_coef, kl_coef_t, estimator,
                             kl_clamp, log_ratio_clamp, score_clip, rewards, kl, cu_seqlens=None):
    """Fill ``rewards`` and ``kl`` (contiguous, the log-probs' shape: ``[B, T]``, or packed 1-D
    with ``cu_seqlens``). ``kl_coef_t`` (a 0-dim tensor on the inputs' device) is read by the
    kernel when given, else the Python float ``kl_coef``."""
    packed = cu_seqlens is not None
    B, T = (cu_seqlens.numel() - 1, logprobs.numel()) if packed else logprobs.shape
    block = min(max(triton.next_power_of_2(T), 16), 2048)  # >= 16: tiny tiles crash some Triton versions
    n_tiles = cdiv(T, block)
    nc = min(n_tiles, cdiv(TARGET_PROGRAMS, max(B, 1)))  # long rows of few: chunks in parallel
    chunk = cdiv(n_tiles, nc) * block
    (lp, s_lp), (rf, s_rf), (m, s_m) = _rows(logprobs), _rows(ref_logprobs), _rows(mask)
    _kl_rewards_kernel[(B * cdiv(T, chunk),)](
        scores.contiguous(), lp, rf, m, rewards, kl, kl_coef_t if kl_coef_t is not None else scores,
        cu_seqlens.contiguous() if packed else scores, T, cdiv(T, chunk), chunk, s_lp, s_rf, s_m, float(kl_coef),
        kl_clamp, log_ratio_clamp, score_clip, EST=estimator, COEF_TENSOR=kl_coef_t is not None, PACKED=packed,
        ACC=tl_acc(rewards.dtype), BLOCK_T=block, num_warps=8 if block >= 2048 else 4)
