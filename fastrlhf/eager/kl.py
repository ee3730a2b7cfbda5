"""The torch backend's KL launchers (``fastrlhf.triton.kl``' entry points): the reference's
estimators, rewards and importance weights (``fastrlhf.reference.kl``), packed sequences on padded
rows.

Arguments come as the kernels take them: the estimator's number (``reference.kl.CODES``) and
``inf`` for a bound that is not set (a clamp to ``+-inf`` changes no value).
"""

from __future__ import annotations

import torch

from fastrlhf.reference import kl as ref
from fastrlhf.reference import packed


def kl_penalty_fwd(logprobs, ref_logprobs, estimator, clamp, log_ratio_clamp, out):
    """Fill ``out`` (the inputs' shape) with the clamped estimate."""
    out.copy_(ref.kl_penalty(logprobs, ref_logprobs, ref.CODES[estimator], clamp, log_ratio_clamp))


def kl_penalty_bwd(grad, logprobs, ref_logprobs, estimator, straight, clamp, log_ratio_clamp,
                   grad_logprobs, grad_ref_logprobs):
    """Fill the gradients (the inputs' dtypes); an empty one is not wanted."""
    name = ref.CODES[estimator] + ("+" if straight else "")
    for out, g in zip((grad_logprobs, grad_ref_logprobs),
                      ref.kl_penalty_backward(grad, logprobs, ref_logprobs, name, clamp, log_ratio_clamp)):
        if out.numel():
            out.copy_(g)


def kl_penalized_rewards_fwd(scores, logprobs, ref_logprobs, mask, kl_coef, kl_coef_t, estimator,
                             kl_clamp, log_ratio_clamp, score_clip, rewards, kl, cu_seqlens=None):
    """Fill ``rewards`` and ``kl`` (the log-probs' shape: ``[B, T]``, or packed 1-D with
    ``cu_seqlens``: the reference runs on a padded copy). ``kl_coef_t`` (a 0-dim tensor) when
    given, else the Python float ``kl_coef``."""
    rows = (logprobs, ref_logprobs, mask)
    if cu_seqlens is not None:
        rows = packed.pad(cu_seqlens, *rows)
    out = ref.kl_penalized_rewards(scores, *rows, kl_coef if kl_coef_t is None else kl_coef_t,
                                   ref.CODES[estimator], kl_clamp, log_ratio_clamp, score_clip)
    if cu_seqlens is not None:
        out = packed.unpad(cu_seqlens, *out)
    rewards.copy_(out[0])
    kl.copy_(out[1])


def importance_weights_fwd(logprobs, old_logprobs, low, high, log_ratio_clamp, out):
    """Fill ``out`` (the inputs' shape) with the clipped weights."""
    out.copy_(ref.importance_weights(logprobs, old_logprobs, low, high, log_ratio_clamp))


def importance_weights_bwd(grad, logprobs, old_logprobs, low, high, log_ratio_clamp, grad_logprobs,
                           grad_old_logprobs):
    """Fill the gradients (the inputs' dtypes; an empty one is not wanted): ``grad * ratio`` where
    no clamp is active (strictly beyond its bound), else 0; minus that for ``old_logprobs``."""
    lr = logprobs.to(grad.dtype) - old_logprobs.to(grad.dtype)
    ratio = lr.clamp(-log_ratio_clamp, log_ratio_clamp).exp()
    d = grad * torch.where((lr.abs() > log_ratio_clamp) | (ratio < low) | (ratio > high), 0.0, ratio)
    for out, g in zip((grad_logprobs, grad_old_logprobs), (d, -d)):
        if out.numel():
            out.copy_(g)
