"""Naive PyTorch KL estimators, KL-penalized per-token rewards and clipped importance weights,
written the way trainers write them. The oracle of the tests, the baseline of the benchmarks and the ``torch`` backend.
"""

from __future__ import annotations

import math

import torch

from fastrlhf._numerics import acc_dtype

ESTIMATORS = {"k1": "k1", "abs": "abs", "k2": "k2", "mse": "k2", "k3": "k3", "low_var_kl": "k3"}
"""Accepted names (``+`` may be appended to each) and the estimator they mean."""

CODES = ("k1", "abs", "k2", "k3")
"""The estimators that the names of ``ESTIMATORS`` mean; ``CODES.index(name)`` is the number
the kernels take (``EST``)."""


K3_SERIES = tuple(1 / math.factorial(k) for k in range(2, 24))
"""Taylor coefficients of ``e**y - 1 - y = y**2 (1/2! + y/3! + ... + y**21/23!)``: below
``|y| = 2`` the truncation is under 1e-17 of the value, so k3 is accurate to a few ulps in
fp32 and fp64 where the direct ``exp(-x) - 1 + x`` cancels to nothing (near a log-ratio of 0)."""

K3_SERIES_RANGE = (-2.0, 1.0)
"""The log-ratios ``lo < x < hi`` where k3 takes the series. Beyond, the closed forms lose no
more than the exponential's own error: ``exp(-x) + (x - 1)`` for ``x >= 1`` (``x - 1`` exact,
both terms positive), ``expm1(-x) + x`` for ``x <= -2`` (a cancellation of at most 1.5x). Every
backend evaluates the same forms (the CUDA kernels in ``kernels/kl_math.cuh``; Triton, which
has no ``expm1``, as ``exp(-x) - (1 - x)``)."""


def k3_parts(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(exp(-x) - 1 + x, 1 - exp(-x))``, k3 and its derivative, each to a few ulps relative
    (``K3_SERIES``, ``K3_SERIES_RANGE``); the derivative is ``-expm1(-x)``."""
    lo, hi = K3_SERIES_RANGE
    near = (x > lo) & (x < hi)
    y = -torch.where(near, x, 0.0)  # the series only where it is taken (finite everywhere)
    poly = torch.full_like(x, K3_SERIES[-1])
    for c in reversed(K3_SERIES[:-1]):
        poly = poly * y + c
    far = torch.where(x >= hi, torch.exp(-x) + (x - 1), torch.expm1(-x) + x)
    return torch.where(near, y * y * poly, far), -torch.expm1(-x)


def parse_estimator(estimator: str) -> tuple[str, bool]:
    """``("k1" | "abs" | "k2" | "k3", straight_through)`` of an estimator name such as ``"k3+"``."""
    straight = estimator.endswith("+")
    return ESTIMATORS[estimator.removesuffix("+")], straight


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1",
               clamp: float | None = None, log_ratio_clamp: float | None = None) -> torch.Tensor:
    """Per-token KL estimate of ``lr = logprobs - ref_logprobs``, differentiable.

    ``lr`` is clamped to ``+-log_ratio_clamp`` first, the estimate to ``+-clamp`` last.
    ``"+"`` estimators: forward value of the estimator, gradient of ``0.5 * lr**2``
    (straight-through, on the unclamped ``lr``).
    """
    name, straight = parse_estimator(estimator)
    acc = acc_dtype(logprobs, ref_logprobs)
    lr = logprobs.to(acc) - ref_logprobs.to(acc)
    x = lr if log_ratio_clamp is None else lr.clamp(-log_ratio_clamp, log_ratio_clamp)
    if name == "k1":
        kl = x
    elif name == "abs":
        kl = x.abs()
    elif name == "k2":
        kl = 0.5 * x.square()
    else:
        kl = k3_parts(x)[0]
    if clamp is not None:
        kl = kl.clamp(-clamp, clamp)
    if straight:
        k2 = 0.5 * lr.square()
        kl = k2 - k2.detach() + kl.detach()
    return kl


def kl_penalty_backward(grad: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                        estimator: str = "k1", clamp: float | None = None,
                        log_ratio_clamp: float | None = None):
    """``(d/d logprobs, d/d ref_logprobs)`` as the kernels compute them, in the inputs' dtypes.

    The derivative is 0 where a clamp is active (strictly beyond the bound), never NaN from
    the unselected branch (an overflowing ``k3`` under an active ``clamp`` has gradient 0).
    """
    name, straight = parse_estimator(estimator)
    acc = acc_dtype(logprobs, ref_logprobs)
    lr = logprobs.to(acc) - ref_logprobs.to(acc)
    if straight:
        d = lr
    else:
        x = lr if log_ratio_clamp is None else lr.clamp(-log_ratio_clamp, log_ratio_clamp)
        d = {"k1": torch.ones_like, "abs": torch.sign, "k2": lambda v: v,
             "k3": lambda v: k3_parts(v)[1]}[name](x)
        active = torch.zeros_like(lr, dtype=torch.bool)
        if log_ratio_clamp is not None:
            active |= lr.abs() > log_ratio_clamp
        if clamp is not None:
            value = {"k1": x, "abs": x.abs(), "k2": 0.5 * x.square(), "k3": k3_parts(x)[0]}[name]
            active |= value.abs() > clamp
        d = torch.where(active, 0.0, d)
    d = grad.to(acc) * d
    return d.to(logprobs.dtype), (-d).to(ref_logprobs.dtype)


def importance_weights(logprobs: torch.Tensor, old_logprobs: torch.Tensor, low: float | None = None,
                       high: float | None = None, log_ratio_clamp: float | None = None) -> torch.Tensor:
    """Per-token ``clamp(exp(clamp(lr, +-log_ratio_clamp)), low, high)`` of ``lr = logprobs -
    old_logprobs``, differentiable (0 where a clamp is active)."""
    acc = acc_dtype(logprobs, old_logprobs)
    lr = logprobs.to(acc) - old_logprobs.to(acc)
    if log_ratio_clamp is not None:
        lr = lr.clamp(-log_ratio_clamp, log_ratio_clamp)
    return lr.exp() if low is None and high is None else lr.exp().clamp(low, high)


def kl_penalized_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                         mask: torch.Tensor, kl_coef, estimator: str = "k1",
                         kl_clamp: float | None = None, log_ratio_clamp: float | None = None,
                         score_clip: float | None = None):
    """``(rewards, kl)``, ``[B, T]`` fp32 (fp64 for fp64 log-probs), no gradient.

    ``rewards = -kl_coef * kl`` on valid tokens (``mask != 0``), 0 elsewhere, plus the
    (optionally clipped) score at the last valid token of each row. A row with no valid
    token gets no score. ``kl`` is 0 outside the mask.
    """
    with torch.no_grad():
        valid = mask != 0
        kl = kl_penalty(logprobs, ref_logprobs, estimator, kl_clamp, log_ratio_clamp)
        kl = torch.where(valid, kl, 0.0)
        coef = torch.as_tensor(kl_coef, dtype=kl.dtype, device=kl.device)
        rewards = torch.where(valid, -coef * kl, 0.0)
        s = scores.to(kl.dtype)
        if score_clip is not None:
            s = s.clamp(-score_clip, score_clip)
        T = mask.shape[-1]
        last = torch.where(valid, torch.arange(T, device=mask.device), -1).amax(-1) if T else \
            torch.full(mask.shape[:-1], -1, device=mask.device)
        at_last = torch.arange(T, device=mask.device) == last.unsqueeze(-1)
        rewards = rewards + torch.where(at_last, s.unsqueeze(-1), 0.0)
        return rewards, kl
