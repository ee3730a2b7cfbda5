"""Triton kernels of the policy-loss family (``fastrlhf.ops.policy_loss``).

**Plain form** (PPO's policy and value losses, padded, no correction: the ``ppo_*`` launchers).
Forward: one launch. One program per ``TOKENS_PER_PARTIAL`` tokens of the flattened ``[B, T]``
computes the per-token loss and statistics and writes its partial sums (loss [, minus log-ratio],
in the accumulation dtype) and counts (valid, clipped [, dual-clipped], int32); then takes a
ticket (an integer atomic, acquire-release). The program that takes the last ticket adds every
program's partials in a fixed order (same input, same bits: no float atomics), counts the rows
with a valid token where the normalizer needs them, and writes the loss, the statistics and the
``scale`` (``1 / denominator`` of the aggregation) the backward uses.
Backward: one elementwise kernel writing ``grad * scale * w * d loss_token / d x``, ``w = 1 /
n_row`` for ``seq-mean-token-mean`` (``PER_ROW``, the row counts given) and 1 otherwise. The row
of a flat offset is ``(offset * row_magic) >> row_shift``, exact below 2**31 tokens
(:func:`row_divider`); beyond, a plain 64-bit division.

**General op** (every mode, rollout correction, padded ``[B, T]`` and packed ``[total]`` +
``cu_seqlens`` layouts). Two passes of one launch each, both deterministic (fixed-order sums,
no float atomics: integer tickets say which program adds the others' partials):

1. **Per-sequence pass** (only when a sequence-level quantity is needed: GSPO's ratio, the
   geometric mean of ``geo_mean``, sequence-level importance weights, the token count of a
   sequence for the ``seq-mean-*`` aggregations). One program per ``SEQ_CHUNK`` tokens of one
   sequence writes ``SEQ_SUMS`` partial sums and a count; the last of a sequence's chunks to
   finish adds them in order and writes the derived values into the sequence table
   ``[TABLE_ROWS, S]`` (count, mode values, importance coefficient, filtered flag). Sequences
   of any length spread over many programs; packed sequences find their chunks through
   ``chunk_starts`` (int32 ``[S + 1]``, the exclusive prefix sum of each sequence's chunk count,
   ``len // SEQ_CHUNK + 1``: an empty sequence has one empty chunk).
2. **Token pass**: one program per ``TOKENS_PER_PARTIAL`` tokens of the flattened input computes
   the per-token loss and statistics and writes partial sums; the program with the last ticket
   adds them in a fixed order and normalizes (as the plain form's). Backward: one elementwise
   kernel, after (GSPO with the sequence-level gradient only) one more per-sequence pass that
   sums each sequence's loss derivatives.

A token finds its sequence by ``row_divider`` (padded) or by a binary search of ``cu_seqlens``
(packed, ``ceil(log2 S)`` cached loads). Full tiles load unmasked (vector loads), only the last
tile is masked; inputs are loaded then selected by the mask, so masked tokens (even NaN) never
reach a result.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastrlhf.reference.aggregation import AGG_MODES
from fastrlhf.triton._common import cdiv, count_positive, flat, is_last, narrow, safe_div, tl_acc, total

TOKENS_PER_PARTIAL = 1024
"""Tokens of one token-pass program (both forms): the forward writes ``cdiv(N, TOKENS_PER_PARTIAL)``
partials."""
SEQ_CHUNK = 4096
"""Tokens of one program of the per-sequence pass."""
SEQ_SUMS = 4
"""Partial sums per program of the per-sequence pass."""
TABLE_ROWS = 5
"""Rows of the sequence table: count, two mode values, importance coefficient, filtered flag."""
FWD_SUMS, FWD_COUNTS = 5, 4
"""Token-pass partials: sums (loss, -log-ratio, |log-ratio|, coefficient, rollout KL) and counts
(valid, clipped, lower-clipped, filtered)."""

# The kernels' numbering of the spec's names (``fastrlhf.ops.policy_spec.LossSpec``), as constexprs
# the kernels compare against, and the tables the launchers look the names up in.
KERNEL_MODES = ("vanilla", "dppo_tv", "dppo_kl", "gspo", "gspo_seq", "sapo", "gpg", "clip_cov", "kl_cov",
                "geo_mean", "dro", "cispo", "value")
(_VANILLA, _DPPO_TV, _DPPO_KL, _GSPO, _GSPO_SEQ, _SAPO, _GPG, _CLIP_COV, _KL_COV, _GEO_MEAN, _DRO, _CISPO,
 _VALUE) = (tl.constexpr(i) for i in range(len(KERNEL_MODES)))
_NO_IS, _IS_TOKEN, _IS_SEQUENCE, _IS_SEQUENCE_MEAN = (tl.constexpr(i) for i in range(4))
_TRUNCATE, _CLAMP, _MASK = (tl.constexpr(i) for i in range(3))
_RATIO, _BINARY_KL, _TV = (tl.constexpr(i) for i in range(3))
_MODES = {name: i for i, name in enumerate(KERNEL_MODES)}
# the aggregation modes, numbered as ``fastrlhf.reference.aggregation.AGG_MODES`` lists them
_TOKEN_MEAN, _TOKEN_SUM, _SEQ_MEAN_TOKEN_SUM, _SEQ_MEAN_TOKEN_MEAN, _SEQ_MEAN_TOKEN_SUM_NORM = (
    tl.constexpr(AGG_MODES.index(m)) for m in ("token-mean", "token-sum", "seq-mean-token-sum",
                                               "seq-mean-token-mean", "seq-mean-token-sum-norm"))
REDUCE_BLOCK = 1024
"""Partials the last program adds per step."""
_LEVELS = {None: 0, "token": 1, "sequence": 2, "sequence-mean": 3}
_IS_MODES = {"truncate": 0, "clamp": 1, "mask": 2}
_STATS = {"ratio": 0, "binary_kl": 1, "tv": 2}

# sequence-table rows
_ROW_N = tl.constexpr(0)
_ROW_A = tl.constexpr(1)
_ROW_B = tl.constexpr(2)
_ROW_IS = tl.constexpr(3)
_ROW_ISF = tl.constexpr(4)
# what the per-sequence pass sums
W_LR, W_GEO, W_IS, W_GRAD = 1, 2, 4, 8


# ----------------------------------------------------------------------------- helpers
# ----------------------------------------------------------------- shared device math, plain form
@triton.jit
def _clamp(x, lo, hi):
    """``x`` clamped to ``[lo, hi]``; NaN stays NaN (``tl.maximum`` may drop it on GPUs)."""
    return tl.where(x < lo, lo, tl.where(x > hi, hi, x))


@triton.jit
def _surrogate(ratio, adv, lo, hi, dual_clip):
    """PPO's clipped surrogate of a ratio: ``(loss, clipped, lower, d loss / d log ratio)``;
    ``lower`` (dual clip caps the loss) never without dual clip (``dual_clip = inf``)."""
    loss1 = -adv * ratio
    loss2 = -adv * _clamp(ratio, lo, hi)
    clipped = loss2 > loss1
    loss = tl.where(clipped, loss2, loss1)
    loss3 = -tl.where(adv < 0, adv, -1.0) * dual_clip  # -A * c where A < 0; no 0 * inf
    lower = (adv < 0) & (loss > loss3)
    return tl.where(lower, loss3, loss), clipped, lower, tl.where(clipped | lower, 0.0, loss1)


@triton.jit
def _policy_terms(logp, old, adv, ratio_low, ratio_high, dual_clip, log_ratio_clamp):
    """Per token: ``(loss, clipped, dual_clipped, log_ratio, d loss / d logp)``; the gradient is 0
    where the log-ratio clamp is active."""
    raw = logp - old
    lr = _clamp(raw, -log_ratio_clamp, log_ratio_clamp)
    loss, clipped, lower, d = _surrogate(tl.exp(lr), adv, ratio_low, ratio_high, dual_clip)
    return loss, clipped, lower, lr, tl.where(tl.abs(raw) > log_ratio_clamp, 0.0, d)


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
def _normalize(sums_ptr, n_valid, n_seqs, gtok_ptr, gseq_ptr, lsf_ptr, loss_ptr, scale_ptr, T, P,
               AGG: tl.constexpr, HAS_GTOK: tl.constexpr, HAS_GSEQ: tl.constexpr, HAS_LSF: tl.constexpr,
               ACC: tl.constexpr, RBLOCK: tl.constexpr):
    """Write ``scale = 1 / denominator`` of mode ``AGG`` (0 where it is ``<= 0``;
    ``fastrlhf.reference.aggregation.denominator``) and ``loss = sum(sums[0]) * scale``."""
    if AGG == _TOKEN_SUM:
        den = tl.full([], 1.0, tl.float64)
    elif AGG == _TOKEN_MEAN:
        if HAS_GTOK:
            den = tl.load(gtok_ptr).to(tl.float64)
        else:
            den = n_valid.to(tl.float64)
    else:
        if HAS_GSEQ:
            den = tl.load(gseq_ptr).to(tl.float64)
        else:
            den = n_seqs.to(tl.float64)
        if AGG == _SEQ_MEAN_TOKEN_SUM_NORM:
            if HAS_LSF:
                den = den * tl.load(lsf_ptr).to(tl.float64)
            else:
                den = den * T
    scale = safe_div(tl.full([], 1.0, ACC), den.to(ACC))
    tl.store(scale_ptr, scale)
    tl.store(loss_ptr, total(sums_ptr, P, ACC, RBLOCK) * scale)


@triton.jit(noinline=True)
def _last(sums_ptr, counts_ptr, rowcnt_ptr, gtok_ptr, gseq_ptr, lsf_ptr, loss_ptr, stats_ptr, scale_ptr, B, T, P,
          N_SUMS: tl.constexpr, N_COUNTS: tl.constexpr, AGG: tl.constexpr, HAS_GTOK: tl.constexpr,
          HAS_GSEQ: tl.constexpr, HAS_LSF: tl.constexpr, ACC: tl.constexpr, RBLOCK: tl.constexpr):
    """Once every program's partials are in, the program with the last ticket (``counts[N_COUNTS *
    P]``) adds them and writes ``stats = (counts[1:], sums[1:]) / valid``, ``scale`` and ``loss``
    (:func:`_normalize`), counting the rows with a valid token (``row_counts > 0``) for a
    ``seq-mean-*`` mode without ``global_seqs``.
    Not inlined: a subroutine that one program runs once per launch adds no registers to the
    token pass and no instructions to its per-token path (the static report's count)."""
    if is_last(counts_ptr + N_COUNTS * P, P):
        n_valid = total(counts_ptr, P, tl.int64, RBLOCK)
        n_tok = n_valid.to(ACC)
        for i in tl.static_range(1, N_COUNTS):
            tl.store(stats_ptr + i - 1, safe_div(total(counts_ptr + i * P, P, tl.int64, RBLOCK).to(ACC), n_tok))
        for i in tl.static_range(1, N_SUMS):
            tl.store(stats_ptr + N_COUNTS - 2 + i, safe_div(total(sums_ptr + i * P, P, ACC, RBLOCK), n_tok))
        if AGG == _TOKEN_MEAN or AGG == _TOKEN_SUM or HAS_GSEQ:
            n_seqs = tl.full([], 0, tl.int64)
        else:
            n_seqs = count_positive(rowcnt_ptr, B, RBLOCK)
        _normalize(sums_ptr, n_valid, n_seqs, gtok_ptr, gseq_ptr, lsf_ptr, loss_ptr, scale_ptr, T, P, AGG, HAS_GTOK,
                   HAS_GSEQ, HAS_LSF, ACC, RBLOCK)


@triton.jit(noinline=True)
def _last_general(sums_ptr, counts_ptr, table_ptr, n_table, gtok_ptr, gseq_ptr, lsf_ptr, loss_ptr, stats_ptr,
                  scale_ptr, T, P, AGG: tl.constexpr, HAS_GTOK: tl.constexpr, HAS_GSEQ: tl.constexpr,
                  HAS_LSF: tl.constexpr, HAS_TABLE: tl.constexpr, SEQ_FILTER: tl.constexpr, ACC: tl.constexpr,
                  RBLOCK: tl.constexpr):
    """The general token pass's :func:`_last`: the program with the last ticket (``counts[4 * P]``)
    writes the statistics in the order of ``fastrlhf.reference.policy_loss.STATS`` (clipped and
    lower-clipped fractions, mean minus log-ratio, mean |log-ratio|, mean coefficient, filtered
    fraction, rollout KL, each per valid token; the filtered fraction per sequence with a valid
    token for a sequence-level correction, ``SEQ_FILTER``), ``scale`` and ``loss``; the sequences
    with a valid token are the sequence table's (``n_table`` columns) with a count ``> 0``."""
    if is_last(counts_ptr + 4 * P, P):
        n_valid = total(counts_ptr, P, tl.int64, RBLOCK)
        n = n_valid.to(ACC)
        for i in tl.static_range(1, 3):
            tl.store(stats_ptr + i - 1, safe_div(total(counts_ptr + i * P, P, tl.int64, RBLOCK).to(ACC), n))
        for i in tl.static_range(1, 4):
            tl.store(stats_ptr + i + 1, safe_div(total(sums_ptr + i * P, P, ACC, RBLOCK), n))
        if HAS_TABLE:
            n_seqs = count_positive(table_ptr + _ROW_N * n_table, n_table, RBLOCK)
        else:
            n_seqs = tl.full([], 0, tl.int64)
        if SEQ_FILTER:
            acc = tl.zeros([RBLOCK], ACC)
            for start in range(0, n_table, RBLOCK):
                offs = start + tl.arange(0, RBLOCK)
                has = tl.load(table_ptr + _ROW_N * n_table + offs, mask=offs < n_table, other=0,
                              cache_modifier=".cg") > 0
                flag = tl.load(table_ptr + _ROW_ISF * n_table + offs, mask=has, other=0, cache_modifier=".cg")
                acc += tl.where(has, flag.to(ACC), 0.0)
            tl.store(stats_ptr + 5, safe_div(tl.sum(acc, axis=0), n_seqs.to(ACC)))
        else:
            tl.store(stats_ptr + 5, safe_div(total(counts_ptr + 3 * P, P, tl.int64, RBLOCK).to(ACC), n))
        tl.store(stats_ptr + 6, safe_div(total(sums_ptr + 4 * P, P, ACC, RBLOCK), n))
        _normalize(sums_ptr, n_valid, n_seqs, gtok_ptr, gseq_ptr, lsf_ptr, loss_ptr, scale_ptr, T, P, AGG, HAS_GTOK,
                   HAS_GSEQ, HAS_LSF, ACC, RBLOCK)


@triton.jit
def _policy_fwd_kernel(logp_ptr, old_ptr, adv_ptr, mask_ptr, rowcnt_ptr, sums_ptr, counts_ptr, gtok_ptr, gseq_ptr,
                       lsf_ptr, loss_ptr, stats_ptr, scale_ptr, N, B, T, P, ratio_low, ratio_high, dual_clip,
                       log_ratio_clamp, row_magic, row_shift, AGG: tl.constexpr, HAS_GTOK: tl.constexpr,
                       HAS_GSEQ: tl.constexpr, HAS_LSF: tl.constexpr, PER_ROW: tl.constexpr,
                       FAST_ROWS: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr, RBLOCK: tl.constexpr):
    """Partials of program ``pid``: ``sums[:, pid]`` = (weighted loss, -log-ratio), ``counts[:, pid]``
    = (valid, clipped, dual-clipped); the last program: loss, stats (clipfrac, clipfrac_lower,
    approx_kl) and scale."""
    pid = tl.program_id(0)
    args = (logp_ptr, old_ptr, adv_ptr, mask_ptr, rowcnt_ptr, sums_ptr, counts_ptr, pid, N, T, P,
            ratio_low, ratio_high, dual_clip, log_ratio_clamp, row_magic, row_shift)
    if pid < N // BLOCK:
        _policy_partials(*args, False, PER_ROW, FAST_ROWS, ACC, BLOCK)
    else:
        _policy_partials(*args, True, PER_ROW, FAST_ROWS, ACC, BLOCK)
    _last(sums_ptr, counts_ptr, rowcnt_ptr, gtok_ptr, gseq_ptr, lsf_ptr, loss_ptr, stats_ptr, scale_ptr, B, T, P,
          2, 3, AGG, HAS_GTOK, HAS_GSEQ, HAS_LSF, ACC, RBLOCK)


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
def _value_fwd_kernel(v_ptr, old_ptr, ret_ptr, mask_ptr, rowcnt_ptr, sums_ptr, counts_ptr, gtok_ptr, gseq_ptr,
                      lsf_ptr, loss_ptr, stats_ptr, scale_ptr, N, B, T, P, clip, row_magic, row_shift,
                      AGG: tl.constexpr, HAS_GTOK: tl.constexpr, HAS_GSEQ: tl.constexpr, HAS_LSF: tl.constexpr,
                      PER_ROW: tl.constexpr, FAST_ROWS: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
                      RBLOCK: tl.constexpr):
    """Partials of program ``pid``: ``sums[0, pid]`` = weighted loss, ``counts[:, pid]`` = (valid,
    clipped); the last program: loss, stats (vf_clipfrac) and scale."""
    pid = tl.program_id(0)
    args = (v_ptr, old_ptr, ret_ptr, mask_ptr, rowcnt_ptr, sums_ptr, counts_ptr, pid, N, T, P, clip,
            row_magic, row_shift)
    if pid < N // BLOCK:
        _value_partials(*args, False, PER_ROW, FAST_ROWS, ACC, BLOCK)
    else:
        _value_partials(*args, True, PER_ROW, FAST_ROWS, ACC, BLOCK)
    _last(sums_ptr, counts_ptr, rowcnt_ptr, gtok_ptr, gseq_ptr, lsf_ptr, loss_ptr, stats_ptr, scale_ptr, B, T, P,
          1, 2, AGG, HAS_GTOK, HAS_GSEQ, HAS_LSF, ACC, RBLOCK)


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


def _plain_fwd(kernel, n_sums, n_counts, inputs, mask, row_counts, args, agg, counts, loss, stats, scale):
    """One launch of a plain forward ``kernel``: partials, the last program's reduction (its
    scratch: ``sums [n_sums, P]`` in the accumulation dtype and ``counts [n_counts * P + 1]``
    int32 with the ticket, zeroed: two allocations)."""
    n, (B, T) = inputs[0].numel(), inputs[0].shape
    P = max(1, cdiv(n, TOKENS_PER_PARTIAL))
    sums = torch.empty(n_sums * P, dtype=loss.dtype, device=loss.device)
    parts = torch.zeros(n_counts * P + 1, dtype=torch.int32, device=loss.device)
    magic, shift = row_divider(max(T, 1))
    gtok, gseq, lsf = counts
    kernel[(P,)](
        *(flat(x) for x in inputs), flat(mask), parts if row_counts is None else row_counts, sums, parts,
        *(loss if c is None else c for c in counts), loss, stats, scale, n, B, T, P, *args, magic, shift,
        AGG=AGG_MODES.index(agg), HAS_GTOK=gtok is not None, HAS_GSEQ=gseq is not None, HAS_LSF=lsf is not None,
        PER_ROW=agg == "seq-mean-token-mean", FAST_ROWS=n < 2**31, ACC=tl_acc(loss.dtype), BLOCK=TOKENS_PER_PARTIAL,
        RBLOCK=REDUCE_BLOCK)


def ppo_policy_fwd(logprobs, old_logprobs, advantages, mask, row_counts, ratio_low, ratio_high, dual_clip,
                   log_ratio_clamp, agg, counts, loss, stats, scale):
    """Fill ``loss`` (0-dim), ``stats [3]`` (clipfrac, clipfrac_lower, approx_kl) and ``scale`` (0-dim),
    all in the accumulation dtype, of ``[B, T]`` inputs aggregated by ``agg``. ``row_counts``: int64
    ``[B]``, the rows' valid tokens, given for ``seq-mean-token-mean`` (the tokens' weights) and
    for a ``seq-mean-*`` mode without ``global_seqs``; ``counts``: (global_tokens, global_seqs,
    loss_scale_factor), 0-dim tensors or None."""
    _plain_fwd(_policy_fwd_kernel, 2, 3, (logprobs, old_logprobs, advantages), mask, row_counts,
               (ratio_low, ratio_high, dual_clip, log_ratio_clamp), agg, counts, loss, stats, scale)


def ppo_value_fwd(values, old_values, returns, mask, row_counts, clip, agg, counts, loss, stats, scale):
    """Fill ``loss``, ``stats [1]`` (vf_clipfrac) and ``scale`` (see :func:`ppo_policy_fwd`)."""
    _plain_fwd(_value_fwd_kernel, 1, 2, (values, old_values, returns), mask, row_counts, (clip,), agg, counts,
               loss, stats, scale)


def ppo_policy_bwd(grad, scale, logprobs, old_logprobs, advantages, mask, row_counts, ratio_low, ratio_high,
                   dual_clip, log_ratio_clamp, grad_logprobs):
    """Fill ``grad_logprobs`` (contiguous, the log-probs' dtype); ``grad``, ``scale``: 0-dim."""
    n, T = logprobs.numel(), logprobs.shape[1]
    magic, shift = row_divider(T)
    _policy_bwd_kernel[(cdiv(n, TOKENS_PER_PARTIAL),)](
        grad, scale, flat(logprobs), flat(old_logprobs), flat(advantages), flat(mask),
        row_counts if row_counts is not None else scale, grad_logprobs, n, T,
        ratio_low, ratio_high, dual_clip, log_ratio_clamp, magic, shift,
        PER_ROW=row_counts is not None, FAST_ROWS=n < 2**31, ACC=tl_acc(scale.dtype), BLOCK=TOKENS_PER_PARTIAL)


def ppo_value_bwd(grad, scale, values, old_values, returns, mask, row_counts, clip, grad_values):
    """Fill ``grad_values`` (contiguous, the values' dtype); ``grad``, ``scale``: 0-dim."""
    n, T = values.numel(), values.shape[1]
    magic, shift = row_divider(T)
    _value_bwd_kernel[(cdiv(n, TOKENS_PER_PARTIAL),)](
        grad, scale, flat(values), flat(old_values), flat(returns), flat(mask),
        row_counts if row_counts is not None else scale, grad_values, n, T, clip, magic, shift,
        PER_ROW=row_counts is not None, FAST_ROWS=n < 2**31, ACC=tl_acc(scale.dtype), BLOCK=TOKENS_PER_PARTIAL)


# -------------------------------------------------------------------------------- general op
@triton.jit
def _ld(ptr, offs, inb, MASKED: tl.constexpr):
    if MASKED:
        x = tl.load(ptr + offs, mask=inb, other=0)
    else:
        x = tl.load(ptr + offs)
    return x


@triton.jit
def _at(ptr, idx, inb, MASKED: tl.constexpr, other):
    """``ptr[idx]`` for the in-bounds tokens: read whatever the mask says (a load guarded by the
    mask would wait for it); what invalid tokens read is selected away later."""
    if MASKED:
        x = tl.load(ptr + idx, mask=inb, other=other)
    else:
        x = tl.load(ptr + idx)
    return x


@triton.jit
def _seq_of(offs, cu_ptr, S, T, steps, row_magic, row_shift, PACKED: tl.constexpr, FAST_ROWS: tl.constexpr):
    """The sequence of each flat offset: the largest ``s < S`` with ``cu[s] <= offs`` (packed;
    empty sequences are skipped), else the row ``offs // T``."""
    if PACKED:
        lo = (offs * 0).to(tl.int32)
        hi = lo + S
        for _step in range(steps):
            mid = (lo + hi) >> 1
            go = tl.load(cu_ptr + mid).to(tl.int64) <= offs
            lo = tl.where(go, mid, lo)
            hi = tl.where(go, hi, mid)
        seq = lo.to(tl.int64)
    else:
        if FAST_ROWS:
            seq = (offs * row_magic) >> row_shift
        else:
            seq = offs // T
    return seq


@triton.jit
def _gate_stat(rho, num, den, IS_STAT: tl.constexpr):
    """The gated statistic of a token: its ratio, or OpenRLHF's binary KL / total variation of
    the sampled token's probabilities (``p`` rollout, ``q`` trainer, clamped to ``[1e-6, 1-1e-6]``)."""
    if IS_STAT == _RATIO:
        g = rho
    else:
        p = _clamp(tl.exp(den), 1e-6, 1.0 - 1e-6)
        q = _clamp(tl.exp(num), 1e-6, 1.0 - 1e-6)
        if IS_STAT == _BINARY_KL:
            g = p * tl.log(p / q) + (1.0 - p) * tl.log((1.0 - p) / (1.0 - q))
            g = tl.maximum(g, 0.0, propagate_nan=tl.PropagateNan.ALL)  # rounded below 0 for p ~ q
        else:
            g = tl.abs(p - q)
    return g


@triton.jit
def _is_apply(g, weight, is_low, is_high, IS_MODE: tl.constexpr):
    """``(coefficient, filtered)`` of a gated statistic ``g``: truncate (``min(g, high)``),
    clamp (``clamp(g, low, high)``) or mask (``weight`` inside ``[low, high]``, else 0)."""
    if IS_MODE == _TRUNCATE:
        coef = tl.where(g > is_high, is_high, g)
        filt = g > is_high
    elif IS_MODE == _CLAMP:
        coef = _clamp(g, is_low, is_high)
        filt = (g < is_low) | (g > is_high)
    else:
        keep = (g >= is_low) & (g <= is_high)
        coef = tl.where(keep, weight, 0.0)
        filt = keep == 0
    return coef, filt


@triton.jit
def _is_token(logp, old, roll, is_low, is_high, is_clamp, IS_MODE: tl.constexpr, IS_STAT: tl.constexpr,
              IS_SOURCE: tl.constexpr):
    """Token-level correction: ``(coefficient, filtered, token ratio, rollout KL, log-ratio)``."""
    if IS_SOURCE == 1:  # bypass: current (detached) over old, which is the rollout
        num = logp
        den = old
    else:
        num = old
        den = roll
    lr = num - den
    rho = tl.exp(_clamp(lr, -is_clamp, is_clamp))
    g = _gate_stat(rho, num, den, IS_STAT)
    coef, filt = _is_apply(g, rho, is_low, is_high, IS_MODE)
    return coef, filt, rho, den - num, lr, g


@triton.jit
def _mode_terms(logp, old, adv, sel, seq_a, seq_b, n_s, lo, hi, dual_clip, lrc, p0, p1, MODE: tl.constexpr):
    """Per token of mode ``MODE``: ``(loss, d loss / d logp, clipped, lower, -log-ratio)``.

    ``lo``/``hi``: ratio bounds (PPO-like modes), divergence thresholds (dppo) or log-ratio
    bounds (geo_mean); ``lrc``: the token log-ratio clamp (GSPO: the upper clamp of the
    sequence log-ratio, applied in the sequence table); ``p0``/``p1``: the mode's numbers;
    ``seq_a``/``seq_b``: the sequence table's values (GSPO: ratio, gate; geo_mean: A * ratio)."""
    raw = logp - old
    never = tl.zeros_like(raw) > 1.0
    if MODE == _VANILLA:
        loss, clipped, lower, lr, d = _policy_terms(logp, old, adv, lo, hi, dual_clip, lrc)
        neg = -lr
    elif MODE == _DPPO_TV or MODE == _DPPO_KL:
        lr = _clamp(raw, -lrc, lrc)
        ratio = tl.exp(lr)
        truncated = tl.where(ratio > p0, p0, ratio)
        prob = tl.exp(logp)
        old_prob = tl.exp(old)
        if MODE == _DPPO_TV:
            pos = (prob - old_prob) <= hi
            negative = (prob - old_prob) >= -lo
        else:
            binary_kl = old_prob * (old - logp) + (1.0 - old_prob) * tl.log(
                (1.0 - old_prob + 1e-8) / (1.0 - prob + 1e-8))
            pos = (binary_kl <= hi) | (prob <= old_prob)
            negative = (binary_kl <= lo) | (prob >= old_prob)
        keep = tl.where(adv > 0, pos, negative)
        loss = tl.where(keep, -adv * truncated * logp, 0.0)
        d = tl.where(keep, -adv * truncated, 0.0)
        clipped = keep == 0
        lower = (ratio > p0) & keep
        neg = -lr
    elif MODE == _GSPO or MODE == _GSPO_SEQ:  # token gradient, sequence gradient
        loss, clipped, lower, dlog = _surrogate(seq_a, adv, lo, hi, dual_clip)
        d = dlog * seq_b
        neg = -raw
    elif MODE == _SAPO:
        lr = _clamp(raw, -lrc, lrc)
        ratio = tl.exp(lr)
        tau = tl.where(adv > 0, p0, p1)
        sig = tl.sigmoid(tau * (ratio - 1.0))
        loss = -sig * (4.0 / tau) * adv
        d = tl.where(tl.abs(raw) > lrc, 0.0, -adv * 4.0 * sig * (1.0 - sig) * ratio)
        clipped = never
        lower = never
        neg = -lr
    elif MODE == _GPG:  # (and bypass reinforce)
        loss = -logp * adv
        d = -adv
        clipped = never
        lower = never
        neg = -raw
    elif MODE == _CLIP_COV:  # no dual clip: dual_clip = inf
        loss, _, _, d = _surrogate(tl.exp(raw), adv, lo, hi, dual_clip)
        chosen = sel != 0
        loss = tl.where(chosen, 0.0, loss)
        d = tl.where(chosen, 0.0, d)
        clipped = chosen
        lower = never
        neg = -raw
    elif MODE == _KL_COV:
        loss1 = -adv * tl.exp(raw)
        chosen = sel != 0
        sign = tl.where(raw > 0, 1.0, tl.where(raw < 0, -1.0, 0.0))
        loss = tl.where(chosen, loss1 + p0 * tl.abs(raw), loss1)
        d = tl.where(chosen, loss1 + p0 * sign, loss1)
        clipped = chosen
        lower = never
        neg = -raw
    elif MODE == _GEO_MEAN:  # the sequence loss -A_s * r_s, broadcast to its tokens
        sign = tl.where(adv > 0, 1.0, tl.where(adv < 0, -1.0, 0.0))
        clamped = _clamp(raw, lo, hi)
        free = (adv != 0) & (sign * raw <= sign * clamped)
        loss = -seq_a
        d = tl.where(free, -seq_a * (n_s / (n_s + 1e-8)), 0.0)
        out = raw != clamped
        clipped = out & (adv > 0)
        lower = out & (adv < 0)
        neg = -raw
    elif MODE == _DRO:
        loss = -(logp * adv - 0.5 * p0 * raw * raw)
        d = -(adv - p0 * raw)
        clipped = never
        lower = never
        neg = -raw
    elif MODE == _CISPO:
        lr = _clamp(raw, -lrc, lrc)
        ratio = tl.exp(lr)
        clipped_ratio = _clamp(ratio, lo, hi)
        loss = -clipped_ratio * adv * logp
        d = -clipped_ratio * adv
        clipped = ratio != clipped_ratio
        lower = never
        neg = -lr
    else:  # value loss (values, old values, returns; p0 = clip)
        loss, clipped, d = _value_terms(logp, old, adv, p0)
        lower = never
        neg = tl.zeros_like(raw)
    return loss, d, clipped, lower, neg


@triton.jit
def _coefficients(logp, old, roll, w, seq, inb, table_ptr, S, is_low, is_high, is_clamp,
                  MODE: tl.constexpr, IS_LEVEL: tl.constexpr, IS_MODE: tl.constexpr, IS_STAT: tl.constexpr,
                  IS_SOURCE: tl.constexpr, IS_APPLY: tl.constexpr, HAS_W: tl.constexpr, MASKED: tl.constexpr):
    """``(applied coefficient, coefficient for statistics, filtered, rollout KL)`` per token."""
    coef = tl.full(logp.shape, 1.0, logp.dtype)
    filt = tl.zeros_like(logp) > 1.0
    rkl = tl.zeros_like(logp)
    if HAS_W:
        coef = w
    if IS_LEVEL == _IS_TOKEN:
        coef, filt, rho, rkl, _lr, _g = _is_token(logp, old, roll, is_low, is_high, is_clamp, IS_MODE, IS_STAT,
                                                   IS_SOURCE)
    elif IS_LEVEL >= _IS_SEQUENCE:
        _c, _f, rho, rkl, _lr, _g = _is_token(logp, old, roll, is_low, is_high, is_clamp, IS_MODE, IS_STAT,
                                          IS_SOURCE)
        t_is = _at(table_ptr + _ROW_IS * S, seq, inb, MASKED, 0.0)
        filt = _at(table_ptr + _ROW_ISF * S, seq, inb, MASKED, 0.0) != 0
        if IS_MODE == _MASK and (IS_STAT != _RATIO or IS_LEVEL == _IS_SEQUENCE_MEAN):
            coef = tl.where(t_is != 0, rho, 0.0)  # the sequence is a gate; the token keeps its ratio
        else:
            coef = t_is
    if MODE == _GEO_MEAN and (HAS_W or IS_LEVEL != _NO_IS):  # geo_mean: the geometric mean over the sequence
        coef = _at(table_ptr + _ROW_B * S, seq, inb, MASKED, 1.0)
    if IS_APPLY:
        applied = coef
    else:
        applied = tl.full(logp.shape, 1.0, logp.dtype)
    return applied, coef, filt, rkl


@triton.jit
def _token(pid, logp_ptr, old_ptr, adv_ptr, mask_ptr, roll_ptr, w_ptr, sel_ptr, table_ptr, cu_ptr, N, T, S,
           steps, row_magic, row_shift, lo, hi, dual_clip, lrc, p0, p1, is_low, is_high, is_clamp,
           MODE: tl.constexpr, IS_LEVEL: tl.constexpr, IS_MODE: tl.constexpr, IS_STAT: tl.constexpr,
           IS_SOURCE: tl.constexpr, IS_APPLY: tl.constexpr, HAS_W: tl.constexpr, HAS_SEL: tl.constexpr,
           PER_SEQ: tl.constexpr, NEED_SEQ: tl.constexpr, PACKED: tl.constexpr, FAST_ROWS: tl.constexpr,
           MASKED: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """Everything the token kernels need about the tokens of program ``pid``."""
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < N
    valid = (_ld(mask_ptr, offs, inb, MASKED) != 0) & inb
    logp = _ld(logp_ptr, offs, inb, MASKED).to(ACC)
    old = _ld(old_ptr, offs, inb, MASKED).to(ACC)
    adv = _ld(adv_ptr, offs, inb, MASKED).to(ACC)
    roll = logp
    if IS_LEVEL != _NO_IS and IS_SOURCE == 0:
        roll = _ld(roll_ptr, offs, inb, MASKED).to(ACC)
    w = logp
    if HAS_W:
        w = _ld(w_ptr, offs, inb, MASKED).to(ACC)
    sel = valid
    if HAS_SEL:
        sel = _ld(sel_ptr, offs, inb, MASKED) != 0
    seq = offs
    n_s = tl.full(logp.shape, 1.0, ACC)
    seq_a = n_s
    seq_b = n_s
    if NEED_SEQ:
        seq = _seq_of(offs, cu_ptr, S, T, steps, row_magic, row_shift, PACKED, FAST_ROWS)
        n_s = _at(table_ptr + _ROW_N * S, seq, inb, MASKED, 1.0)
        if MODE == _GSPO or MODE == _GSPO_SEQ or MODE == _GEO_MEAN:
            seq_a = _at(table_ptr + _ROW_A * S, seq, inb, MASKED, 0.0)
            seq_b = _at(table_ptr + _ROW_B * S, seq, inb, MASKED, 0.0)
    loss, d, clipped, lower, neg = _mode_terms(logp, old, adv, sel, seq_a, seq_b, n_s, lo, hi, dual_clip, lrc,
                                               p0, p1, MODE)
    applied, coef, filt, rkl = _coefficients(logp, old, roll, w, seq, inb, table_ptr, S, is_low, is_high,
                                             is_clamp, MODE, IS_LEVEL, IS_MODE, IS_STAT, IS_SOURCE, IS_APPLY,
                                             HAS_W, MASKED)
    weight = applied
    if PER_SEQ:
        weight = applied / n_s
    return offs, inb, valid, loss, d, weight, clipped, lower, neg, tl.abs(logp - old), coef, filt, rkl, seq, n_s, \
        seq_b


# --------------------------------------------------------------------------- token pass
@triton.jit
def _fwd_tile(pid, logp_ptr, old_ptr, adv_ptr, mask_ptr, roll_ptr, w_ptr, sel_ptr, table_ptr, cu_ptr,
              sums_ptr, counts_ptr, N, T, S, P, steps, row_magic, row_shift, lo, hi, dual_clip, lrc, p0, p1,
              is_low, is_high, is_clamp, MODE: tl.constexpr, IS_LEVEL: tl.constexpr, IS_MODE: tl.constexpr,
              IS_STAT: tl.constexpr, IS_SOURCE: tl.constexpr, IS_APPLY: tl.constexpr, HAS_W: tl.constexpr,
              HAS_SEL: tl.constexpr, PER_SEQ: tl.constexpr, NEED_SEQ: tl.constexpr, PACKED: tl.constexpr,
              FAST_ROWS: tl.constexpr, MASKED: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    _, _, valid, loss, _, weight, clipped, lower, neg, absl, coef, filt, rkl, _, _, _ = _token(
        pid, logp_ptr, old_ptr, adv_ptr, mask_ptr, roll_ptr, w_ptr, sel_ptr, table_ptr, cu_ptr, N, T, S, steps,
        row_magic, row_shift, lo, hi, dual_clip, lrc, p0, p1, is_low, is_high, is_clamp, MODE, IS_LEVEL, IS_MODE,
        IS_STAT, IS_SOURCE, IS_APPLY, HAS_W, HAS_SEL, PER_SEQ, NEED_SEQ, PACKED, FAST_ROWS, MASKED, ACC, BLOCK)
    tl.store(sums_ptr + pid, tl.sum(tl.where(valid, weight * loss, 0.0), axis=0))
    tl.store(sums_ptr + P + pid, tl.sum(tl.where(valid, neg, 0.0), axis=0))
    tl.store(sums_ptr + 2 * P + pid, tl.sum(tl.where(valid, absl, 0.0), axis=0))
    tl.store(sums_ptr + 3 * P + pid, tl.sum(tl.where(valid, coef, 0.0), axis=0))
    tl.store(sums_ptr + 4 * P + pid, tl.sum(tl.where(valid, rkl, 0.0), axis=0))
    tl.store(counts_ptr + pid, tl.sum(valid.to(tl.int32), axis=0))
    tl.store(counts_ptr + P + pid, tl.sum((valid & clipped).to(tl.int32), axis=0))
    tl.store(counts_ptr + 2 * P + pid, tl.sum((valid & lower).to(tl.int32), axis=0))
    tl.store(counts_ptr + 3 * P + pid, tl.sum((valid & filt).to(tl.int32), axis=0))


@triton.jit
def _policy_loss_fwd_kernel(logp_ptr, old_ptr, adv_ptr, mask_ptr, roll_ptr, w_ptr, sel_ptr, table_ptr, cu_ptr,
                            sums_ptr, counts_ptr, gtok_ptr, gseq_ptr, lsf_ptr, loss_ptr, stats_ptr, scale_ptr,
                            N, T, S, n_table, P, steps, row_magic, row_shift, lo, hi, dual_clip, lrc, p0, p1, is_low,
                            is_high, is_clamp, MODE: tl.constexpr, IS_LEVEL: tl.constexpr, IS_MODE: tl.constexpr,
                            IS_STAT: tl.constexpr, IS_SOURCE: tl.constexpr, IS_APPLY: tl.constexpr,
                            HAS_W: tl.constexpr, HAS_SEL: tl.constexpr, PER_SEQ: tl.constexpr,
                            NEED_SEQ: tl.constexpr, PACKED: tl.constexpr, FAST_ROWS: tl.constexpr,
                            AGG: tl.constexpr, HAS_GTOK: tl.constexpr, HAS_GSEQ: tl.constexpr,
                            HAS_LSF: tl.constexpr, SEQ_FILTER: tl.constexpr, ACC: tl.constexpr,
                            BLOCK: tl.constexpr, RBLOCK: tl.constexpr):
    """Partials of program ``pid``: ``sums[:, pid]`` (weighted loss, -log-ratio, |log-ratio|,
    coefficient, rollout KL), ``counts[:, pid]`` (valid, clipped, lower, filtered); the last
    program: loss, statistics and scale (:func:`_last_general`)."""
    pid = tl.program_id(0)
    args = (pid, logp_ptr, old_ptr, adv_ptr, mask_ptr, roll_ptr, w_ptr, sel_ptr, table_ptr, cu_ptr, sums_ptr,
            counts_ptr, N, T, S, P, steps, row_magic, row_shift, lo, hi, dual_clip, lrc, p0, p1, is_low, is_high,
            is_clamp)
    flags = (MODE, IS_LEVEL, IS_MODE, IS_STAT, IS_SOURCE, IS_APPLY, HAS_W, HAS_SEL, PER_SEQ, NEED_SEQ, PACKED,
             FAST_ROWS)
    if pid < N // BLOCK:
        _fwd_tile(*args, *flags, False, ACC, BLOCK)
    else:
        _fwd_tile(*args, *flags, True, ACC, BLOCK)
    _last_general(sums_ptr, counts_ptr, table_ptr, n_table, gtok_ptr, gseq_ptr, lsf_ptr, loss_ptr, stats_ptr,
                  scale_ptr, T, P, AGG, HAS_GTOK, HAS_GSEQ, HAS_LSF, NEED_SEQ, SEQ_FILTER, ACC, RBLOCK)


@triton.jit
def _bwd_tile(pid, grad_ptr, scale_ptr, gseq_ptr, logp_ptr, old_ptr, adv_ptr, mask_ptr, roll_ptr, w_ptr,
              sel_ptr, table_ptr, cu_ptr, dx_ptr, N, T, S, steps, row_magic, row_shift, lo, hi, dual_clip, lrc,
              p0, p1, is_low, is_high, is_clamp, MODE: tl.constexpr, IS_LEVEL: tl.constexpr,
              IS_MODE: tl.constexpr, IS_STAT: tl.constexpr, IS_SOURCE: tl.constexpr, IS_APPLY: tl.constexpr,
              HAS_W: tl.constexpr, HAS_SEL: tl.constexpr, PER_SEQ: tl.constexpr, NEED_SEQ: tl.constexpr,
              PACKED: tl.constexpr, FAST_ROWS: tl.constexpr, MASKED: tl.constexpr, ACC: tl.constexpr,
              BLOCK: tl.constexpr):
    offs, inb, valid, _, d, weight, _, _, _, _, _, _, _, seq, n_s, gate = _token(
        pid, logp_ptr, old_ptr, adv_ptr, mask_ptr, roll_ptr, w_ptr, sel_ptr, table_ptr, cu_ptr, N, T, S, steps,
        row_magic, row_shift, lo, hi, dual_clip, lrc, p0, p1, is_low, is_high, is_clamp, MODE, IS_LEVEL, IS_MODE,
        IS_STAT, IS_SOURCE, IS_APPLY, HAS_W, HAS_SEL, PER_SEQ, NEED_SEQ, PACKED, FAST_ROWS, MASKED, ACC, BLOCK)
    if MODE == _GSPO_SEQ:  # GSPO, gradient through the sequence mean: G_s * gate / n_s on every valid token
        d = _at(gseq_ptr, seq, inb, MASKED, 0.0) * gate / n_s
    else:
        d = weight * d
    g = tl.where(valid, tl.load(grad_ptr).to(ACC) * tl.load(scale_ptr).to(ACC) * d, 0.0)
    _store(dx_ptr, offs, g, N, MASKED)


@triton.jit
def _policy_loss_bwd_kernel(grad_ptr, scale_ptr, gseq_ptr, logp_ptr, old_ptr, adv_ptr, mask_ptr, roll_ptr, w_ptr,
                            sel_ptr, table_ptr, cu_ptr, dx_ptr, N, T, S, steps, row_magic, row_shift, lo, hi,
                            dual_clip, lrc, p0, p1, is_low, is_high, is_clamp, MODE: tl.constexpr,
                            IS_LEVEL: tl.constexpr, IS_MODE: tl.constexpr, IS_STAT: tl.constexpr,
                            IS_SOURCE: tl.constexpr, IS_APPLY: tl.constexpr, HAS_W: tl.constexpr,
                            HAS_SEL: tl.constexpr, PER_SEQ: tl.constexpr, NEED_SEQ: tl.constexpr,
                            PACKED: tl.constexpr, FAST_ROWS: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """``d loss / d logp = grad * scale * w * c * d loss_token / d logp`` on valid tokens, 0 elsewhere."""
    pid = tl.program_id(0)
    args = (pid, grad_ptr, scale_ptr, gseq_ptr, logp_ptr, old_ptr, adv_ptr, mask_ptr, roll_ptr, w_ptr, sel_ptr,
            table_ptr, cu_ptr, dx_ptr, N, T, S, steps, row_magic, row_shift, lo, hi, dual_clip, lrc, p0, p1,
            is_low, is_high, is_clamp)
    flags = (MODE, IS_LEVEL, IS_MODE, IS_STAT, IS_SOURCE, IS_APPLY, HAS_W, HAS_SEL, PER_SEQ, NEED_SEQ, PACKED,
             FAST_ROWS)
    if pid < N // BLOCK:
        _bwd_tile(*args, *flags, False, ACC, BLOCK)
    else:
        _bwd_tile(*args, *flags, True, ACC, BLOCK)


# ------------------------------------------------------------------------ sequence pass
@triton.jit
def _policy_seq_kernel(logp_ptr, old_ptr, adv_ptr, mask_ptr, roll_ptr, w_ptr, table_ptr, gseq_ptr, cu_ptr,
                       cstart_ptr, part_ptr, pcount_ptr, T, S, NC, cpr, cstart_steps, lo, hi, dual_clip,
                       lrc, is_low, is_high, is_clamp, WHAT: tl.constexpr, MODE: tl.constexpr,
                       IS_LEVEL: tl.constexpr, IS_MODE: tl.constexpr, IS_STAT: tl.constexpr,
                       IS_SOURCE: tl.constexpr, IS_APPLY: tl.constexpr, HAS_W: tl.constexpr,
                       GEO_W: tl.constexpr, PER_SEQ: tl.constexpr, PACKED: tl.constexpr, ACC: tl.constexpr,
                       BLOCK: tl.constexpr, CHUNK: tl.constexpr, BLOCK_C: tl.constexpr):
    """The sums of one chunk of one sequence into ``part[:, p]``, ``pcount[p]``; the last chunk of
    a sequence to finish then writes the sequence's table column or ``gseq[s]`` (:func:`_seq_last`).

    ``WHAT`` (bits): ``W_LR`` sum of log-ratios (GSPO); ``W_GEO`` sums of geo_mean's clipped
    log-ratios, advantages and ``log(coefficient + 1e-10)``; ``W_IS`` sum of the correction's
    log-ratios (or divergences); ``W_GRAD`` sum of ``coefficient * d loss / d log s`` (GSPO's
    sequence-level gradient, backward: reads the table).
    """
    p = tl.program_id(0)
    if PACKED:  # programs past the last chunk find an empty range (start >= end)
        s = p * 0
        top = s + S
        for _step in range(cstart_steps):  # the largest s with chunk_starts[s] <= p
            mid = (s + top) >> 1
            go = tl.load(cstart_ptr + mid) <= p
            s = tl.where(go, mid, s)
            top = tl.where(go, top, mid)
        c = p - tl.load(cstart_ptr + s)
        start = tl.load(cu_ptr + s).to(tl.int64) + c.to(tl.int64) * CHUNK
        end = tl.minimum(start + CHUNK, tl.load(cu_ptr + s + 1).to(tl.int64))
    else:
        s = p // cpr
        c = p % cpr
        start = s.to(tl.int64) * T + c.to(tl.int64) * CHUNK
        end = tl.minimum(start + CHUNK, s.to(tl.int64) * T + T)
    q0 = tl.zeros([BLOCK], ACC)
    q1 = tl.zeros([BLOCK], ACC)
    q2 = tl.zeros([BLOCK], ACC)
    q3 = tl.zeros([BLOCK], ACC)
    n = tl.zeros([BLOCK], tl.int32)
    if (WHAT & 8) != 0:  # the sequence's values, for the gradient sums
        s_ratio = tl.load(table_ptr + _ROW_A * S + s)
        t_is = tl.load(table_ptr + _ROW_IS * S + s)
    for k in range(0, CHUNK, BLOCK):
        offs = start + k + tl.arange(0, BLOCK)
        inb = offs < end
        valid = (tl.load(mask_ptr + offs, mask=inb, other=0) != 0) & inb
        logp = tl.load(logp_ptr + offs, mask=inb, other=0.0).to(ACC)
        old = tl.load(old_ptr + offs, mask=inb, other=0.0).to(ACC)
        raw = logp - old
        n += valid.to(tl.int32)
        if (WHAT & 1) != 0:
            q0 += tl.where(valid, raw, 0.0)
        if (WHAT & 2) != 0 or (WHAT & 8) != 0 or (WHAT & 4) != 0:
            adv = tl.load(adv_ptr + offs, mask=inb, other=0.0).to(ACC)
            roll = logp
            if IS_LEVEL != _NO_IS and IS_SOURCE == 0:
                roll = tl.load(roll_ptr + offs, mask=inb, other=0.0).to(ACC)
            coef = tl.full([BLOCK], 1.0, ACC)
            if HAS_W:
                coef = tl.load(w_ptr + offs, mask=inb, other=1.0).to(ACC)
            if IS_LEVEL != _NO_IS:
                coef, _f, rho, _k, lr, g = _is_token(logp, old, roll, is_low, is_high, is_clamp, IS_MODE, IS_STAT,
                                                     IS_SOURCE)
            if (WHAT & 4) != 0:
                if IS_STAT == _RATIO:
                    q3 += tl.where(valid, lr, 0.0)
                else:
                    q3 += tl.where(valid, g, 0.0)
            if (WHAT & 2) != 0:
                sign = tl.where(adv > 0, 1.0, tl.where(adv < 0, -1.0, 0.0))
                clamped = _clamp(raw, lo, hi)
                lr_min = sign * tl.where(sign * raw < sign * clamped, sign * raw, sign * clamped)
                q0 += tl.where(valid, lr_min, 0.0)
                q1 += tl.where(valid, adv, 0.0)
                q2 += tl.where(valid, tl.log(coef + 1e-10), 0.0)
            if (WHAT & 8) != 0:
                if IS_LEVEL >= _IS_SEQUENCE:
                    if IS_MODE == _MASK and (IS_STAT != _RATIO or IS_LEVEL == _IS_SEQUENCE_MEAN):
                        coef = tl.where(t_is != 0, rho, 0.0)
                    else:
                        coef = tl.full([BLOCK], 1.0, ACC) * t_is
                if not IS_APPLY:
                    coef = tl.full([BLOCK], 1.0, ACC)
                _l, _c, _w, dlog = _surrogate(s_ratio, adv, lo, hi, dual_clip)
                q0 += tl.where(valid, coef * dlog, 0.0)
    tl.store(part_ptr + p, tl.sum(q0, axis=0))
    tl.store(part_ptr + NC + p, tl.sum(q1, axis=0))
    tl.store(part_ptr + 2 * NC + p, tl.sum(q2, axis=0))
    tl.store(part_ptr + 3 * NC + p, tl.sum(q3, axis=0))
    tl.store(pcount_ptr + p, tl.sum(n, axis=0))
    if PACKED:
        c0 = tl.load(cstart_ptr + s)
        c1 = tl.load(cstart_ptr + s + 1)
    else:
        c0 = s * cpr
        c1 = c0 + cpr
    if p < c1:  # a program past the last chunk (packed) holds no ticket
        _seq_last(part_ptr, pcount_ptr, pcount_ptr + NC + s, table_ptr, gseq_ptr, s, S, NC, c0, c1, lrc, is_low,
                  is_high, is_clamp, WHAT, IS_LEVEL, IS_MODE, IS_STAT, GEO_W, PER_SEQ, ACC, BLOCK_C)


@triton.jit(noinline=True)
def _seq_last(part_ptr, pcount_ptr, ticket_ptr, table_ptr, gseq_ptr, s, S, NC, c0, c1, lrc, is_low, is_high,
              is_clamp, WHAT: tl.constexpr, IS_LEVEL: tl.constexpr, IS_MODE: tl.constexpr, IS_STAT: tl.constexpr,
              GEO_W: tl.constexpr, PER_SEQ: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr):
    """Once sequence ``s``'s chunks ``[c0, c1)`` are all in, the last of them (ticket
    ``ticket_ptr``) adds their partials in order and writes the sequence's table column (forward)
    or ``gseq[s]`` (``W_GRAD``, backward). Not inlined: once per sequence."""
    if is_last(ticket_ptr, c1 - c0):
        a0 = tl.zeros([BLOCK_C], ACC)
        a1 = tl.zeros([BLOCK_C], ACC)
        a2 = tl.zeros([BLOCK_C], ACC)
        a3 = tl.zeros([BLOCK_C], ACC)
        an = tl.zeros([BLOCK_C], tl.int32)
        for c in range(c0, c1, BLOCK_C):
            idx = c + tl.arange(0, BLOCK_C)
            m = idx < c1
            a0 += tl.load(part_ptr + idx, mask=m, other=0.0, cache_modifier=".cg")
            a1 += tl.load(part_ptr + NC + idx, mask=m, other=0.0, cache_modifier=".cg")
            a2 += tl.load(part_ptr + 2 * NC + idx, mask=m, other=0.0, cache_modifier=".cg")
            a3 += tl.load(part_ptr + 3 * NC + idx, mask=m, other=0.0, cache_modifier=".cg")
            an += tl.load(pcount_ptr + idx, mask=m, other=0, cache_modifier=".cg")
        q0 = tl.sum(a0, axis=0)
        q1 = tl.sum(a1, axis=0)
        q2 = tl.sum(a2, axis=0)
        q3 = tl.sum(a3, axis=0)
        n = tl.sum(an, axis=0).to(ACC)
        if (WHAT & 8) != 0:
            if PER_SEQ:
                q0 = q0 / tl.maximum(n, 1.0)
            tl.store(gseq_ptr + s, q0)
        else:  # every row is written (rows a mode does not use hold 0 / 1 / 1 / 0)
            tl.store(table_ptr + _ROW_N * S + s, n)
            if (WHAT & 3) == 0:
                tl.store(table_ptr + _ROW_A * S + s, n * 0.0)
                tl.store(table_ptr + _ROW_B * S + s, n * 0.0 + 1.0)
            if (WHAT & 4) == 0:
                tl.store(table_ptr + _ROW_IS * S + s, n * 0.0 + 1.0)
                tl.store(table_ptr + _ROW_ISF * S + s, n * 0.0)
            if (WHAT & 1) != 0:  # GSPO: ratio exp(min(mean, lrc)), gate (mean <= lrc)
                mean = q0 / tl.maximum(n, 1.0)
                tl.store(table_ptr + _ROW_A * S + s, tl.exp(tl.where(mean > lrc, lrc, mean)))
                tl.store(table_ptr + _ROW_B * S + s, (mean <= lrc).to(ACC))
            if (WHAT & 2) != 0:  # geo_mean: A_s * r_s and the geometric mean of the coefficients
                tl.store(table_ptr + _ROW_A * S + s, (q1 / (n + 1e-8)) * tl.exp(q0 / (n + 1e-8)))
                if GEO_W:
                    tl.store(table_ptr + _ROW_B * S + s, tl.exp(q2 / (n + 1e-8)))
                else:
                    tl.store(table_ptr + _ROW_B * S + s, n * 0.0 + 1.0)
            if (WHAT & 4) != 0:  # sequence-level correction
                if IS_STAT == _RATIO:
                    if IS_LEVEL == _IS_SEQUENCE:
                        g = tl.exp(_clamp(q3, -is_clamp, is_clamp))
                    else:
                        g = tl.exp(_clamp(q3 / tl.maximum(n, 1.0), -is_clamp, is_clamp))
                else:
                    g = q3 / tl.maximum(n, 1.0)
                if IS_MODE == _MASK and (IS_STAT != _RATIO or IS_LEVEL == _IS_SEQUENCE_MEAN):
                    keep = (g >= is_low) & (g <= is_high)
                    coef = keep.to(ACC)
                    filt = keep == 0
                else:
                    coef, filt = _is_apply(g, g, is_low, is_high, IS_MODE)
                tl.store(table_ptr + _ROW_IS * S + s, coef)
                tl.store(table_ptr + _ROW_ISF * S + s, filt.to(ACC))


# ---------------------------------------------------------------------------- launchers
def _steps(n: int) -> int:
    """Binary-search steps over ``[0, n)``: ``ceil(log2(n))``."""
    return max(n - 1, 0).bit_length()


def _opt(x, like):
    return flat(x) if x is not None else like


def _constexprs(spec, *, rollout, weights, selected, packed, n, dtype):
    return dict(MODE=_MODES[spec.mode], IS_LEVEL=_LEVELS[spec.is_level], IS_MODE=_IS_MODES[spec.is_mode],
                IS_STAT=_STATS[spec.is_stat], IS_SOURCE=int(spec.is_source == "current"), IS_APPLY=spec.is_apply,
                HAS_W=weights is not None, HAS_SEL=selected is not None, PACKED=packed, ACC=tl_acc(dtype))


def seq_work(spec) -> int:
    """The ``WHAT`` bits of the forward per-sequence pass of ``spec``."""
    what = 0
    if spec.mode in ("gspo", "gspo_seq"):
        what |= W_LR
    if spec.mode == "geo_mean":
        what |= W_GEO
    if spec.is_level in ("sequence", "sequence-mean"):
        what |= W_IS
    return what


def seq_programs(N: int, S: int, T: int, packed: bool) -> int:
    """Programs of the per-sequence pass: ``S * max(1, cdiv(T, SEQ_CHUNK))`` padded, at most
    ``cdiv(N, SEQ_CHUNK) + S`` packed (every sequence has ``len // SEQ_CHUNK + 1`` chunks)."""
    return cdiv(N, SEQ_CHUNK) + S if packed else S * max(1, cdiv(T, SEQ_CHUNK))


def policy_seq_pass(logprobs, old_logprobs, advantages, mask, rollout, weights, cu_seqlens, chunk_starts, spec,
                    what, table, gseq=None):
    """Fill ``table [TABLE_ROWS, S]`` (forward, ``what = seq_work(spec)``) or ``gseq [S]``
    (``what = W_GRAD``, reading ``table``) for padded ``[B, T]`` or packed ``[total]`` inputs
    (``cu_seqlens`` and ``chunk_starts`` int32 ``[S + 1]``, the first chunk of each sequence), in
    one launch. Scratch: ``SEQ_SUMS * NC`` sums and ``NC + S`` zeroed int32 (chunk counts, one
    ticket per sequence), ``NC = seq_programs(...)``."""
    packed = cu_seqlens is not None
    S = table.shape[1]
    N = logprobs.numel()
    T = 0 if packed else logprobs.shape[-1]
    NC = seq_programs(N, S, T, packed)
    if NC == 0:
        return
    partials = torch.empty(SEQ_SUMS * NC, dtype=table.dtype, device=table.device)
    pcounts = torch.zeros(NC + S, dtype=torch.int32, device=table.device)
    x = flat(logprobs)
    cex = _constexprs(spec, rollout=rollout, weights=weights, selected=None, packed=packed, n=N, dtype=table.dtype)
    cex.pop("HAS_SEL")
    k = spec.kernel
    cu = cu_seqlens.contiguous() if packed else pcounts
    cs = chunk_starts if packed else pcounts
    _policy_seq_kernel[(NC,)](
        x, flat(old_logprobs), flat(advantages), flat(mask), _opt(rollout, x), _opt(weights, x), table,
        gseq if gseq is not None else table, cu, cs, partials, pcounts, T, S, NC, max(1, cdiv(T, SEQ_CHUNK)),
        _steps(S + 1), k.lo, k.hi, k.dual_clip, k.lrc, k.is_low, k.is_high, k.is_clamp, WHAT=what, **cex,
        GEO_W=weights is not None or spec.is_level is not None, PER_SEQ=spec.agg == "seq-mean-token-mean",
        BLOCK=1024, CHUNK=SEQ_CHUNK, BLOCK_C=32)


def _token_args(logprobs, cu_seqlens, table):
    packed = cu_seqlens is not None
    n = logprobs.numel()
    T = 1 if packed or logprobs.dim() < 2 else max(logprobs.shape[-1], 1)
    S = table.shape[1] if table is not None else 0
    magic, shift = row_divider(T)
    return n, T, S, _steps(S), magic, shift, packed


def policy_loss_fwd(logprobs, old_logprobs, advantages, mask, rollout, weights, selected, cu_seqlens, table,
                    spec, counts, loss, stats, scale):
    """Fill ``loss`` (0-dim), ``stats [len(STATS)]`` and ``scale`` (0-dim), in the accumulation
    dtype, in one launch; ``table``: the sequence table, or None when ``spec`` needs none;
    ``counts``: (global_tokens, global_seqs, loss_scale_factor), 0-dim tensors or None. Scratch:
    ``FWD_SUMS * P`` sums and ``FWD_COUNTS * P + 1`` int32 counts with the ticket, ``P =
    cdiv(N, TOKENS_PER_PARTIAL)``."""
    n, T, S, steps, magic, shift, packed = _token_args(logprobs, cu_seqlens, table)
    P = max(1, cdiv(n, TOKENS_PER_PARTIAL))
    sums = torch.empty(FWD_SUMS * P, dtype=loss.dtype, device=loss.device)
    parts = torch.zeros(FWD_COUNTS * P + 1, dtype=torch.int32, device=loss.device)
    x = flat(logprobs)
    k = spec.kernel
    gtok, gseq, lsf = counts
    _policy_loss_fwd_kernel[(P,)](
        x, flat(old_logprobs), flat(advantages), flat(mask), _opt(rollout, x), _opt(weights, x),
        _opt(selected, x), table if table is not None else sums, cu_seqlens.contiguous() if packed else parts,
        sums, parts,
        *(loss if c is None else c for c in counts), loss, stats, scale,
        n, T, max(S, 1), S, P, steps, magic, shift, k.lo, k.hi, k.dual_clip, k.lrc, k.p0, k.p1, k.is_low,
        k.is_high, k.is_clamp,
        **_constexprs(spec, rollout=rollout, weights=weights, selected=selected, packed=packed, n=n,
                      dtype=loss.dtype),
        PER_SEQ=spec.agg == "seq-mean-token-mean", NEED_SEQ=table is not None, FAST_ROWS=n < 2**31,
        AGG=AGG_MODES.index(spec.agg), HAS_GTOK=gtok is not None, HAS_GSEQ=gseq is not None, HAS_LSF=lsf is not None,
        SEQ_FILTER=spec.is_level in ("sequence", "sequence-mean"), BLOCK=TOKENS_PER_PARTIAL, RBLOCK=REDUCE_BLOCK)


def policy_loss_bwd(grad, scale, logprobs, old_logprobs, advantages, mask, rollout, weights, selected, cu_seqlens,
                    table, gseq, spec, grad_logprobs):
    """Fill ``grad_logprobs`` (contiguous, the log-probs' dtype); ``grad``, ``scale``: 0-dim;
    ``gseq``: ``[S]`` sums of GSPO's sequence-level gradient (``spec.mode == "gspo_seq"``)."""
    n, T, S, steps, magic, shift, packed = _token_args(logprobs, cu_seqlens, table)
    x = flat(logprobs)
    k = spec.kernel
    _policy_loss_bwd_kernel[(cdiv(n, TOKENS_PER_PARTIAL),)](
        grad, scale, gseq if gseq is not None else scale, x, flat(old_logprobs), flat(advantages), flat(mask),
        _opt(rollout, x), _opt(weights, x), _opt(selected, x), table if table is not None else scale,
        cu_seqlens.contiguous() if packed else scale, grad_logprobs, n, T, max(S, 1), steps, magic, shift, k.lo, k.hi,
        k.dual_clip, k.lrc, k.p0, k.p1, k.is_low, k.is_high, k.is_clamp,
        **_constexprs(spec, rollout=rollout, weights=weights, selected=selected, packed=packed, n=n,
                      dtype=scale.dtype),
        PER_SEQ=spec.agg == "seq-mean-token-mean", NEED_SEQ=table is not None, FAST_ROWS=n < 2**31,
        BLOCK=TOKENS_PER_PARTIAL)
