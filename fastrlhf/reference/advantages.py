"""Naive PyTorch advantages: GAE, discounted returns, masked whitening, group advantages.

Written the way trainers write them (a Python loop over T for the recurrences); this is the
oracle of the tests, the baseline of the benchmarks and the ``torch`` backend. Everything is
computed in fp32 (fp64 when an input is fp64).

Hole conventions for a mask with zeros inside a row (multi-turn observation tokens):

* ``"skip"``: a masked step is skipped: its reward and value are never read, and the next
  value and the running advantage (return) carry across it unchanged.
* ``"zero"``: rewards and values are zeroed where masked and the plain recurrence runs over
  every position, so a hole is a step with reward 0 and value 0.

In both, outputs at masked positions are 0, and the step after a row's last valid token has
value 0 (the episode ends there; nothing is bootstrapped).
"""

from __future__ import annotations

import torch

from fastrlhf._numerics import STATS_DTYPE, acc_dtype

METHODS = ("grpo", "rloo", "dr_grpo")
"""The group-advantage methods of :func:`group_advantages`; ``METHODS.index(method)`` is the
number the kernels take."""


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95, holes: str = "skip") -> tuple[torch.Tensor, torch.Tensor]:
    """``(advantages, returns)`` of ``[B, T]`` rewards and values; ``returns = advantages + values``.

    ``delta_t = r_t + gamma * V_next - V_t``; ``A_t = delta_t + gamma * lam * A_next``.
    """
    acc = acc_dtype(rewards, values)
    valid = mask != 0
    r = torch.where(valid, rewards.to(acc), 0.0)
    v = torch.where(valid, values.to(acc), 0.0)
    next_value = r.new_zeros(r.shape[0])
    last_adv = r.new_zeros(r.shape[0])
    adv = torch.zeros_like(r)
    for t in reversed(range(r.shape[1])):
        delta = r[:, t] + gamma * next_value - v[:, t]
        a = delta + gamma * lam * last_adv
        if holes == "skip":
            next_value = torch.where(valid[:, t], v[:, t], next_value)
            last_adv = torch.where(valid[:, t], a, last_adv)
        else:
            next_value, last_adv = v[:, t], a
        adv[:, t] = a
    adv = torch.where(valid, adv, 0.0)
    return adv, torch.where(valid, adv + v, 0.0)


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
                       holes: str = "skip") -> torch.Tensor:
    """``G_t = r_t + gamma * G_next`` over ``[B, T]`` (REINFORCE-style returns)."""
    valid = mask != 0
    r = torch.where(valid, rewards.to(acc_dtype(rewards)), 0.0)
    running = r.new_zeros(r.shape[0])
    out = torch.zeros_like(r)
    for t in reversed(range(r.shape[1])):
        g = r[:, t] + gamma * running
        running = torch.where(valid[:, t], g, running) if holes == "skip" else g
        out[:, t] = g
    return torch.where(valid, out, 0.0)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True,
                  unbiased: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """``(x - mean) / sqrt(var + eps)`` over the elements where ``mask != 0`` (all dims at once).

    With ``shift_mean=False`` the mean is added back. Masked positions give 0. Fewer valid
    elements than the variance needs (0, or 1 with ``unbiased``) means no scaling; 0 valid
    elements means mean 0, so the result is all zeros. Computed in fp64 (see
    ``STATS_DTYPE``), returned in the accumulation dtype. Differentiable.
    """
    valid = mask != 0
    xd = torch.where(valid, x.to(STATS_DTYPE), 0.0)
    n = valid.sum()
    mean = xd.sum() / n.clamp(min=1)
    mean = mean + torch.where(valid, xd - mean, 0.0).sum() / n.clamp(min=1)  # the sum's rounding undone
    dev = torch.where(valid, xd - mean, 0.0)
    dof = n - 1 if unbiased else n
    var = (dev * dev).sum() / dof.clamp(min=1)
    out = dev * torch.where(dof > 0, torch.rsqrt(var + eps), 1.0)
    if not shift_mean:
        out = out + mean
    return torch.where(valid, out, 0.0).to(acc_dtype(x))


def group_advantages(scores: torch.Tensor, group_size: int, method: str = "grpo",
                     eps: float = 1e-6) -> torch.Tensor:
    """Advantages of ``scores [N]`` against their group of ``group_size`` consecutive scores.

    ``grpo``: ``(s - mean) / (std + eps)`` (unbiased std); ``rloo``: ``s - mean(others)``;
    ``dr_grpo``: ``s - mean``. A group of one has no baseline: mean 0 and std 1. Computed in
    fp64 (``STATS_DTYPE``), returned in the accumulation dtype.
    """
    s = scores.to(STATS_DTYPE).view(-1, group_size)
    if group_size == 1 or s.numel() == 0:
        out = s / (1 + eps) if method == "grpo" else s.clone()
    elif method == "rloo":
        out = s - (s.sum(-1, keepdim=True) - s) / (group_size - 1)
    else:
        out = s - s.mean(-1, keepdim=True)
        if method == "grpo":
            out = out / (s.std(-1, keepdim=True) + eps)
    return out.reshape(-1).to(acc_dtype(scores))
