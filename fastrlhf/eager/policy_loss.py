"""The torch backend's launchers of the policy-loss family's plain forms (the PPO policy and
value losses on padded ``[B, T]`` inputs), with the arguments of ``fastrlhf.triton.policy_loss``:
the forward fills one partial sum (``TOKENS_PER_PARTIAL`` covers any input), the backward the
gradient in closed form, as the kernels compute it. The per-token surrogate is the reference's.
"""

from __future__ import annotations

import math

import torch

from fastrlhf.reference.policy_loss import clipped_surrogate

TOKENS_PER_PARTIAL = 1 << 62
"""Tokens one partial sums: one partial for any input."""


def _row_weight(x: torch.Tensor, row_counts: torch.Tensor | None) -> torch.Tensor:
    """``x / n_row`` for ``seq-mean-token-mean`` (``row_counts`` given), else ``x``."""
    return x if row_counts is None else x / row_counts.clamp(min=1).to(x.dtype).unsqueeze(-1)


def _policy_terms(logprobs, old_logprobs, advantages, ratio_low, ratio_high, dual_clip, log_ratio_clamp, dtype):
    """Per token: ``(loss, clipped, dual-clipped, clamped log-ratio, d loss / d logp)``."""
    raw = logprobs.to(dtype) - old_logprobs.to(dtype)
    lr = raw.clamp(-log_ratio_clamp, log_ratio_clamp)
    adv = advantages.to(dtype)
    ratio = lr.exp()
    loss, clipped, lower = clipped_surrogate(ratio, adv, ratio_low, ratio_high,
                                             None if math.isinf(dual_clip) else dual_clip)
    d = torch.where(clipped | lower | (raw.abs() > log_ratio_clamp), 0.0, -adv * ratio)
    return loss, clipped, lower, lr, d


def _value_terms(values, old_values, returns, clip, dtype):
    """Per token: ``(loss, clipped, d loss / d v)`` of ``0.5 * max((v - R)**2, (clip(v) - R)**2)``."""
    v, old, ret = values.to(dtype), old_values.to(dtype), returns.to(dtype)
    err = v - ret
    err2 = torch.clamp(v, old - clip, old + clip) - ret
    clipped = err2.square() > err.square()
    return 0.5 * torch.where(clipped, err2.square(), err.square()), clipped, torch.where(clipped, 0.0, err)


def _fill(sums, counts, valid, sum_rows, count_rows):
    sums[:, 0] = torch.stack([torch.where(valid, x, 0.0).sum() for x in sum_rows])
    counts[:, 0] = torch.stack([(valid & c).sum() for c in (valid, *count_rows)]).to(counts.dtype)


def ppo_policy_fwd(logprobs, old_logprobs, advantages, mask, row_counts, ratio_low, ratio_high, dual_clip,
                   log_ratio_clamp, sums, counts):
    """Fill ``sums [2, 1]`` (weighted loss, minus log-ratio) and ``counts [3, 1]`` (valid, clipped,
    dual-clipped); ``row_counts``: int64 ``[B]`` (``seq-mean-token-mean``) or None."""
    loss, clipped, lower, lr, _ = _policy_terms(logprobs, old_logprobs, advantages, ratio_low, ratio_high,
                                                dual_clip, log_ratio_clamp, sums.dtype)
    _fill(sums, counts, mask != 0, (_row_weight(loss, row_counts), -lr), (clipped, lower))


def ppo_value_fwd(values, old_values, returns, mask, row_counts, clip, sums, counts):
    """Fill ``sums [1, 1]`` (weighted loss) and ``counts [2, 1]`` (valid, clipped)."""
    loss, clipped, _ = _value_terms(values, old_values, returns, clip, sums.dtype)
    _fill(sums, counts, mask != 0, (_row_weight(loss, row_counts),), (clipped,))


def _grad(out, grad, scale, mask, row_counts, d):
    w = grad.to(d.dtype) * scale.to(d.dtype)
    out.copy_(torch.where(mask != 0, _row_weight(w * d, row_counts), 0.0))


def ppo_policy_bwd(grad, scale, logprobs, old_logprobs, advantages, mask, row_counts, ratio_low, ratio_high,
                   dual_clip, log_ratio_clamp, grad_logprobs):
    """Fill ``grad_logprobs``: ``grad * scale * w * (-A * ratio)`` where the unclipped surrogate is
    chosen and the log-ratio clamp inactive, else 0."""
    *_, d = _policy_terms(logprobs, old_logprobs, advantages, ratio_low, ratio_high, dual_clip, log_ratio_clamp,
                          scale.dtype)
    _grad(grad_logprobs, grad, scale, mask, row_counts, d)


def ppo_value_bwd(grad, scale, values, old_values, returns, mask, row_counts, clip, grad_values):
    """Fill ``grad_values``: ``grad * scale * w * (v - R)`` unless the clipped term is larger (0)."""
    *_, d = _value_terms(values, old_values, returns, clip, scale.dtype)
    _grad(grad_values, grad, scale, mask, row_counts, d)
