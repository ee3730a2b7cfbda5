"""CUDA launchers for KL estimators and KL-penalized per-token rewards (kernels/kl.cu).

Same semantics, arguments and outputs as :mod:`fastrlhf.triton.kl`: fp32 math (fp64 for
fp64 inputs); a ``None`` clamp is passed as ``inf``, which changes nothing.
"""

from __future__ import annotations

import math

import torch

from fastrlhf._cuda import ops
from fastrlhf._numerics import acc_dtype
from fastrlhf.reference.kl import parse_estimator

_EST_ID = {"k1": 0, "abs": 1, "k2": 2, "k3": 3}


def _inf(x: float | None) -> float:
    return math.inf if x is None else float(x)


def kl_penalty_fwd(logprobs, ref_logprobs, estimator, clamp, log_ratio_clamp):
    """The clamped estimate, a new contiguous tensor of the inputs' shape, fp32 (fp64 for fp64)."""
    name, _ = parse_estimator(estimator)
    out = torch.empty(logprobs.shape, dtype=acc_dtype(logprobs, ref_logprobs), device=logprobs.device)
    if out.numel():
        ops().kl_penalty_fwd(logprobs, ref_logprobs, _EST_ID[name], _inf(clamp), _inf(log_ratio_clamp), out)
    return out


def kl_penalty_bwd(grad, logprobs, ref_logprobs, estimator, clamp, log_ratio_clamp,
                   want_logp=True, want_ref=True):
    """``(d logprobs, d ref_logprobs)`` in the inputs' dtypes; an unwanted one is an empty tensor."""
    name, straight = parse_estimator(estimator)
    dlogp = torch.empty(logprobs.shape if want_logp else 0, dtype=logprobs.dtype, device=logprobs.device)
    dref = torch.empty(ref_logprobs.shape if want_ref else 0, dtype=ref_logprobs.dtype, device=logprobs.device)
    if logprobs.numel() and (want_logp or want_ref):
        ops().kl_penalty_bwd(grad, logprobs, ref_logprobs, _EST_ID[name], straight, _inf(clamp),
                             _inf(log_ratio_clamp), dlogp, dref)
    return dlogp, dref


def kl_penalized_rewards_fwd(scores, logprobs, ref_logprobs, mask, kl_coef, kl_coef_t, estimator,
                             kl_clamp, log_ratio_clamp, score_clip):
    """``(rewards, kl)``: new contiguous ``[B, T]`` tensors, fp32 (fp64 for fp64 log-probs).

    ``kl_coef_t`` (a 0-dim tensor on the inputs' device) is read by the kernel when given,
    else the Python float ``kl_coef``. One block per row.
    """
    dtype = acc_dtype(logprobs, ref_logprobs)
    rewards = torch.empty(logprobs.shape, dtype=dtype, device=logprobs.device)
    kl = torch.empty(logprobs.shape, dtype=dtype, device=logprobs.device)
    if rewards.numel():
        name, _ = parse_estimator(estimator)
        ops().kl_penalized_rewards_fwd(scores, logprobs, ref_logprobs, mask, float(kl_coef), kl_coef_t,
                                       _EST_ID[name], _inf(kl_clamp), _inf(log_ratio_clamp),
                                       _inf(score_clip), rewards, kl)
    return rewards, kl
