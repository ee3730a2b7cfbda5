"""Loss aggregation: a scalar from a per-token loss over the valid tokens, the way trainers write it.

The one statement of the aggregation modes' normalizers (:func:`denominator`): this oracle
divides by it, the ops (``fastrlhf.ops.aggregation``) scale their fused sums by its inverse.
A token is valid where ``mask != 0``; invalid tokens are selected away (``torch.where``), so
whatever they hold (even NaN) reaches nothing.
"""

from __future__ import annotations

import torch

from fastrlhf._numerics import acc_dtype

AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean",
             "seq-mean-token-sum-norm")


def safe_div(total: torch.Tensor, count) -> torch.Tensor:
    """``total / count`` (``count`` broadcast), and 0 where ``count <= 0``."""
    count = torch.as_tensor(count, dtype=total.dtype, device=total.device)
    return torch.where(count > 0, total / torch.where(count > 0, count, 1.0), 0.0)


def denominator(agg: str, n_tokens, n_seqs, T, global_tokens=None, global_seqs=None, loss_scale_factor=None):
    """What the (row-weighted) sum of mode ``agg`` is divided by: ``None`` for ``token-sum``, the
    valid tokens for ``token-mean`` (``global_tokens`` replaces the count), else the sequences with
    a valid token (``global_seqs`` replaces it), times ``loss_scale_factor`` (default: the padded
    length ``T``) for ``seq-mean-token-sum-norm``. Counts may be numbers or 0-dim tensors."""
    if agg == "token-sum":
        return None
    if agg == "token-mean":
        return n_tokens if global_tokens is None else global_tokens
    seqs = n_seqs if global_seqs is None else global_seqs
    if agg == "seq-mean-token-sum-norm":
        seqs = seqs * (T if loss_scale_factor is None else loss_scale_factor)
    return seqs


def normalized(total: torch.Tensor, n_valid, n_seqs, agg: str, norm: tuple, T) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, scale)`` of a (row-weighted) sum ``total``: ``scale = 1 / denominator`` (1 for
    ``token-sum``, 0 where the denominator is ``<= 0``; :func:`denominator` of ``n_valid`` tokens,
    ``n_seqs`` sequences with one, padded length ``T``, ``norm = (global_tokens, global_seqs,
    loss_scale_factor)``) in ``total``'s dtype, and ``loss = total * scale``."""
    one = torch.ones_like(total)
    den = denominator(agg, n_valid, n_seqs, T, *norm)
    scale = one if den is None else safe_div(one, den)
    return total * scale, scale


def finish_partials(sums, counts, row_counts, agg, norm, T, loss, stats, scale) -> None:
    """Fill a plain forward's ``loss``, ``stats`` and ``scale`` from its partials ``sums
    [n_sums, P]`` (loss [, minus log-ratio]) and ``counts [n_counts, P]`` (valid, clipped
    [, dual-clipped]), added in a fixed order: ``stats = (counts[1:], sums[1:]) / valid``, then
    :func:`normalized`, the sequences with a valid token counted from ``row_counts`` (int64
    ``[B]``, or None where no denominator needs them)."""
    s, c = sums.sum(1), counts.sum(1)
    stats.copy_(safe_div(torch.cat([c[1:].to(s.dtype), s[1:]]), c[0]).reshape(stats.shape))
    n_seqs = None if row_counts is None else row_counts.gt(0).sum()
    for out, value in zip((loss, scale), normalized(s[0], c[0], n_seqs, agg, norm, T)):
        out.copy_(value)


def packed_row_counts(valid: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """int64 ``[S]``: the valid tokens of each packed sequence (a cumsum of the mask, exact)."""
    csum = torch.cat([valid.new_zeros(1, dtype=torch.int64), valid.long().cumsum(0)])
    cu = cu_seqlens.long()
    return csum[cu[1:]] - csum[cu[:-1]]


def aggregate(loss_mat: torch.Tensor, mask: torch.Tensor, mode: str = "token-mean",
              global_tokens=None, global_seqs=None, loss_scale_factor=None, cu_seqlens=None) -> torch.Tensor:
    """A scalar from a ``[B, T]`` (or packed ``[total]``) per-token loss; see ``fastrlhf.aggregate``.
    ``seq-mean-token-mean`` weighs each token by ``1 / its row's valid tokens``."""
    valid = mask != 0
    row_n = packed_row_counts(valid, cu_seqlens) if cu_seqlens is not None else valid.sum(-1)
    x = _per_row(torch.where(valid, loss_mat.to(acc_dtype(loss_mat)), 0.0), row_n, mode, cu_seqlens)
    T = None if cu_seqlens is not None else mask.shape[-1]
    den = denominator(mode, valid.sum(), (row_n > 0).sum(), T, global_tokens, global_seqs, loss_scale_factor)
    return x.sum() if den is None else safe_div(x.sum(), den)


def _per_row(x: torch.Tensor, row_n: torch.Tensor, mode: str, cu_seqlens) -> torch.Tensor:
    """``x`` with ``seq-mean-token-mean``'s weights: each token divided by its row's valid tokens
    ``row_n`` (packed: by its sequence's); other modes weigh every token alike."""
    if mode != "seq-mean-token-mean":
        return x
    if cu_seqlens is not None:
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        return x * torch.repeat_interleave(1.0 / row_n.clamp(min=1).to(x.dtype), lengths, output_size=x.numel())
    return x / row_n.clamp(min=1).unsqueeze(-1)


def token_weights(mask: torch.Tensor, mode: str, global_tokens=None, global_seqs=None, loss_scale_factor=None,
                  cu_seqlens=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Each token's weight in :func:`aggregate` (the derivative of the scalar w.r.t. the token's
    loss), of ``mask``'s shape: 0 on invalid tokens, and everywhere when the denominator is ``<= 0``."""
    valid = mask != 0
    row_n = packed_row_counts(valid, cu_seqlens) if cu_seqlens is not None else valid.sum(-1)
    w = _per_row(valid.to(dtype), row_n, mode, cu_seqlens)
    T = None if cu_seqlens is not None else mask.shape[-1]
    den = denominator(mode, valid.sum(), (row_n > 0).sum(), T, global_tokens, global_seqs, loss_scale_factor)
    return w if den is None else safe_div(w, den)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over the valid tokens; 0 when there is none."""
    return aggregate(x, mask, "token-mean")
