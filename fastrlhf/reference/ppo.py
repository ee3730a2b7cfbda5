"""Naive PyTorch PPO policy and value losses and loss aggregation, written the way trainers
write them. The oracle of the tests, the baseline of the benchmarks and the ``torch`` backend.

A token is valid where ``mask != 0``; invalid tokens are selected away (``torch.where``), so
whatever they hold (even NaN) reaches neither the loss nor the statistics.
"""

from __future__ import annotations

import torch

from fastrlhf._numerics import acc_dtype

AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean",
             "seq-mean-token-sum-norm")


def safe_div(total: torch.Tensor, count) -> torch.Tensor:
    """``total / count``, and 0 when ``count <= 0``."""
    count = torch.as_tensor(count, dtype=total.dtype, device=total.device)
    return torch.where(count > 0, total / torch.where(count > 0, count, 1.0), 0.0)


def packed_row_counts(valid: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """int64 ``[S]``: the valid tokens of each packed sequence (a cumsum of the mask, exact)."""
    csum = torch.cat([valid.new_zeros(1, dtype=torch.int64), valid.long().cumsum(0)])
    cu = cu_seqlens.long()
    return csum[cu[1:]] - csum[cu[:-1]]


def aggregate(loss_mat: torch.Tensor, mask: torch.Tensor, mode: str = "token-mean",
              global_tokens=None, global_seqs=None, loss_scale_factor=None, cu_seqlens=None) -> torch.Tensor:
    """A scalar from a ``[B, T]`` (or packed ``[total]``) per-token loss; see ``fastrlhf.ops.ppo.aggregate``."""
    valid = mask != 0
    x = torch.where(valid, loss_mat.to(acc_dtype(loss_mat)), 0.0)
    if cu_seqlens is not None:
        if mode in ("token-mean", "token-sum"):
            return aggregate(x, valid, mode, global_tokens)
        row_n = packed_row_counts(valid, cu_seqlens)
        seqs = (row_n > 0).sum() if global_seqs is None else global_seqs
        if mode == "seq-mean-token-mean":  # each token weighs 1 / its sequence's count
            lengths = cu_seqlens[1:] - cu_seqlens[:-1]
            per_token = torch.repeat_interleave(1.0 / row_n.clamp(min=1).to(x.dtype), lengths.long(),
                                                output_size=x.numel())
            x = x * per_token
        elif mode == "seq-mean-token-sum-norm":
            seqs = seqs * loss_scale_factor
        return safe_div(x.sum(), seqs)
    if mode == "token-mean":
        return safe_div(x.sum(), valid.sum() if global_tokens is None else global_tokens)
    if mode == "token-sum":
        return x.sum()
    row_n = valid.sum(-1)
    seqs = (row_n > 0).sum() if global_seqs is None else global_seqs
    if mode == "seq-mean-token-sum-norm":
        return safe_div(x.sum(), seqs * (mask.shape[-1] if loss_scale_factor is None else loss_scale_factor))
    row = x.sum(-1)
    if mode == "seq-mean-token-mean":
        row = row / row_n.clamp(min=1)
    return safe_div(row.sum(), seqs)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over the valid tokens; 0 when there is none."""
    return aggregate(x, mask, "token-mean")


def policy_terms(logprobs, old_logprobs, advantages, clip_low, clip_high, dual_clip, log_ratio_clamp):
    """Per token: ``(loss, clipped, dual_clipped, clamped log-ratio)``."""
    acc = acc_dtype(logprobs, old_logprobs, advantages)
    lr = logprobs.to(acc) - old_logprobs.to(acc)
    if log_ratio_clamp is not None:
        lr = lr.clamp(-log_ratio_clamp, log_ratio_clamp)
    ratio = torch.exp(lr)
    adv = advantages.to(acc)
    loss1 = -adv * ratio
    loss2 = -adv * ratio.clamp(1 - clip_low, 1 + clip_high)
    loss = torch.maximum(loss1, loss2)
    clipped = loss2 > loss1
    if dual_clip is None:
        lower = torch.zeros_like(clipped)
    else:
        loss3 = -adv * dual_clip
        lower = (adv < 0) & (loss > loss3)
        loss = torch.where(adv < 0, torch.minimum(loss, loss3), loss)
    return loss, clipped, lower, lr


def ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip_low=0.2, clip_high=None,
                    dual_clip=None, agg="token-mean", global_tokens=None, global_seqs=None,
                    loss_scale_factor=None, log_ratio_clamp=20.0):
    """``(loss, stats)`` of the clipped (optionally dual-clipped) PPO surrogate, differentiable."""
    clip_high = clip_low if clip_high is None else clip_high
    loss, clipped, lower, lr = policy_terms(logprobs, old_logprobs, advantages, clip_low, clip_high,
                                             dual_clip, log_ratio_clamp)
    total = aggregate(loss, mask, agg, global_tokens, global_seqs, loss_scale_factor)
    stats = {"clipfrac": masked_mean(clipped.to(lr.dtype), mask),
             "clipfrac_lower": masked_mean(lower.to(lr.dtype), mask),
             "approx_kl": masked_mean(-lr, mask)}
    return total, {k: v.detach() for k, v in stats.items()}


def ppo_value_loss(values, old_values, returns, mask, clip=None, agg="token-mean",
                   global_tokens=None, global_seqs=None, loss_scale_factor=None):
    """``(0.5 * agg(max((v - R)**2, (clip(v, old +- clip) - R)**2)), {"vf_clipfrac": ...})``."""
    acc = acc_dtype(values, old_values, returns)
    v, old, ret = values.to(acc), old_values.to(acc), returns.to(acc)
    loss1 = (v - ret).square()
    if clip is None:
        loss, clipped = loss1, torch.zeros_like(loss1, dtype=torch.bool)
    else:
        loss2 = (torch.clamp(v, old - clip, old + clip) - ret).square()
        loss, clipped = torch.maximum(loss1, loss2), loss2 > loss1
    total = 0.5 * aggregate(loss, mask, agg, global_tokens, global_seqs, loss_scale_factor)
    return total, {"vf_clipfrac": masked_mean(clipped.to(acc), mask).detach()}


# ------------------------------------------ gradients in closed form (the torch backend's backward)
def _token_weight(grad, mask, scale, row_counts, dtype):
    w = (grad.to(dtype) * scale.to(dtype)).expand(mask.shape)
    if row_counts is not None:
        w = w / row_counts.clamp(min=1).to(dtype).unsqueeze(-1)
    return w


def ppo_policy_loss_backward(grad, logprobs, old_logprobs, advantages, mask, scale, row_counts,
                             clip_low, clip_high, dual_clip, log_ratio_clamp):
    """``d loss / d logprobs`` (in ``logprobs.dtype``) as the kernels compute it.

    ``d loss_token / d lr = -A * ratio`` (= the unclipped surrogate ``loss1``) where the
    unclipped surrogate is chosen; 0 where the clipped one is strictly larger, where dual clip
    caps the loss, or where the log-ratio clamp is active.
    """
    acc = acc_dtype(logprobs, old_logprobs, advantages)
    raw = logprobs.to(acc) - old_logprobs.to(acc)
    c = float("inf") if log_ratio_clamp is None else log_ratio_clamp
    ratio = torch.exp(raw.clamp(-c, c))
    adv = advantages.to(acc)
    loss1 = -adv * ratio
    loss2 = -adv * ratio.clamp(1 - clip_low, 1 + clip_high)
    d = torch.where(loss2 > loss1, 0.0, loss1)
    if dual_clip is not None:
        d = torch.where((adv < 0) & (torch.maximum(loss1, loss2) > -adv * dual_clip), 0.0, d)
    d = torch.where(raw.abs() > c, 0.0, d)
    w = _token_weight(grad, mask, scale, row_counts, acc)
    return torch.where(mask != 0, w * d, 0.0).to(logprobs.dtype)


def ppo_value_loss_backward(grad, values, old_values, returns, mask, scale, row_counts, clip):
    """``d loss / d values`` (in ``values.dtype``): ``v - R`` unless the clipped term is
    strictly larger (then 0)."""
    acc = acc_dtype(values, old_values, returns)
    v, old, ret = values.to(acc), old_values.to(acc), returns.to(acc)
    d = v - ret
    if clip is not None:
        loss2 = (torch.clamp(v, old - clip, old + clip) - ret).square()
        d = torch.where(loss2 > d.square(), 0.0, d)
    w = _token_weight(grad, mask, scale, row_counts, acc)
    return torch.where(mask != 0, w * d, 0.0).to(values.dtype)
