"""Drop-in replacements for OpenRLHF's KL, reward, GAE and PPO-loss functions.

Each keeps the signature and semantics of OpenRLHF 0.11.2 (``openrlhf/models/utils.py``,
``openrlhf/models/loss.py``, ``ExperienceMaker.get_advantages_and_returns`` in
``openrlhf/trainer/ppo_utils/experience_maker.py``) and runs on fastrlhf ops. The backend
follows :func:`fastrlhf.use_backend` / ``FASTRLHF_BACKEND`` (``auto`` by default).

Differences from OpenRLHF, all deliberate:

* Outputs are fp32 (fp64 for fp64 inputs, where OpenRLHF's KL rounds to fp32).
* No NaN on valid input: an all-masked batch gives loss 0 and statistics 0 (OpenRLHF
  divides 0 by 0).
* Masks are binary: a token counts where ``mask != 0`` (OpenRLHF multiplies by the mask).
* Advantages and returns carry no gradient (OpenRLHF's returns keep the values' graph;
  it computes them under ``no_grad``).
"""

from __future__ import annotations

import torch

from fastrlhf import _checks
from fastrlhf.integrations.verl import _next_valid
from fastrlhf.ops.advantages import gae
from fastrlhf.ops.kl import kl_penalized_rewards
from fastrlhf.ops.kl import kl_penalty as _kl_penalty
from fastrlhf.ops.ppo import aggregate, ppo_policy_loss, ppo_value_loss

__all__ = ["KL_IS_WEIGHT_CLIP", "PolicyLoss", "ValueLoss", "compute_approx_kl", "compute_reward",
           "get_advantages_and_returns"]

KL_IS_WEIGHT_CLIP = 10.0
"""Upper bound of the importance weight of ``compute_approx_kl(..., unbiased_gradient=True)``."""


def compute_approx_kl(log_probs: torch.Tensor, log_probs_base: torch.Tensor,
                      log_probs_old: torch.Tensor | None = None, kl_estimator: str = "k1",
                      unbiased_gradient: bool = False) -> torch.Tensor:
    """OpenRLHF's per-token KL estimate of ``log_probs - log_probs_base``, clamped to ``[-10, 10]``.

    ``kl_estimator``: ``"k1"`` (the log-ratio), ``"k2"`` (half its square) or ``"k3"``
    (``exp(-lr) - 1 + lr``; OpenRLHF's one-sided log-ratio bound at -10 changes nothing
    under the final clamp). ``unbiased_gradient=True`` keeps the value and backpropagates
    ``w * lr`` (the gradient of ``w * lr**2 / 2``), ``w = exp(log_probs - log_probs_old)``
    clamped to :data:`KL_IS_WEIGHT_CLIP` and detached (``w = 1`` without ``log_probs_old``).
    Returns fp32; gradients reach both ``log_probs`` and ``log_probs_base``.
    """
    if kl_estimator not in ("k1", "k2", "k3"):
        raise ValueError(f"Unknown kl_estimator: {kl_estimator!r}; expected 'k1', 'k2' or 'k3'")
    if not unbiased_gradient:
        return _kl_penalty(log_probs, log_probs_base, estimator=kl_estimator, clamp=10.0)
    value = _kl_penalty(log_probs, log_probs_base, estimator=kl_estimator + "+", clamp=10.0)
    if log_probs_old is None:
        return value
    _checks.tensor("log_probs_old", log_probs_old, _checks.FLOAT_DTYPES)
    w = (log_probs.detach().float() - log_probs_old.detach().float()).exp().clamp(max=KL_IS_WEIGHT_CLIP)
    return value.detach() + w * (value - value.detach())


def compute_reward(r: torch.Tensor, kl_coef: float, kl: torch.Tensor, action_mask: torch.Tensor | None = None,
                   reward_clip_range: tuple[float, float] | None = None) -> torch.Tensor:
    """OpenRLHF's per-token rewards: ``-kl_coef * kl`` plus the score at each row's last valid token.

    ``r``: ``[B]`` scores, clamped to ``reward_clip_range = (low, high)`` when given;
    ``kl_coef <= 0`` counts as 0; ``kl``: ``[B, T]``; ``action_mask``: ``[B, T]`` (required).
    As in OpenRLHF the KL term is also at masked positions, and a row with no valid token
    gets its score at ``T - 1``. Runs :func:`fastrlhf.kl_penalized_rewards`; returns fp32
    ``[B, T]`` with no gradient.
    """
    if action_mask is None:
        raise ValueError("action_mask is required: it marks where each row's score goes")
    _checks.tensor("r", r, _checks.FLOAT_DTYPES, dim=1)
    _checks.tensor("kl", kl, _checks.FLOAT_DTYPES, dim=2)
    kl_coef = kl_coef.clamp(min=0.0) if isinstance(kl_coef, torch.Tensor) else max(kl_coef, 0.0)
    if reward_clip_range:
        r = r.clamp(min=reward_clip_range[0], max=reward_clip_range[1])
    rewards, _ = kl_penalized_rewards(r, kl, torch.zeros_like(kl), action_mask, kl_coef=kl_coef)
    valid = action_mask != 0
    rewards = torch.where(valid, rewards, -kl_coef * kl.detach().to(rewards.dtype))
    if rewards.shape[-1]:
        rewards[:, -1] += torch.where(valid.any(-1), 0.0, r.detach().to(rewards.dtype))
    return rewards


def get_advantages_and_returns(values: torch.Tensor, rewards: torch.Tensor, action_mask: torch.Tensor | None,
                               gamma: float, lambd: float):
    """OpenRLHF's GAE (``ExperienceMaker.get_advantages_and_returns``): ``(advantages, returns)``.

    Values and rewards are zeroed where ``action_mask`` is 0 and the plain recurrence runs
    over every position (OpenRLHF has no holes: :func:`fastrlhf.ops.advantages.gae` with
    ``holes="zero"``); ``returns = advantages + values``, no whitening. As in OpenRLHF a
    masked position holds the recurrence's value there (0 after a row's last valid token).
    ``action_mask=None`` means every token is valid. Returns fp32 ``[B, T]``, no gradient.
    """
    if action_mask is None:
        action_mask = torch.ones(rewards.shape, dtype=torch.bool, device=rewards.device)
    adv, ret = gae(rewards, values, action_mask, gamma=gamma, lam=lambd, holes="zero")
    valid = action_mask != 0
    # a masked t before the next valid token s: A_t = (gamma lam)^(s - t - 1) (gamma V_s + gamma lam A_s)
    nxt = _next_valid(valid)
    steps = (nxt - torch.arange(valid.shape[-1], device=valid.device)).clamp(min=1) - 1
    pad = adv.new_zeros(adv.shape[0], 1)
    v_next = torch.cat([torch.where(valid, values.detach().to(adv.dtype), 0.0), pad], -1).gather(-1, nxt)
    a_next = torch.cat([adv, pad], -1).gather(-1, nxt)
    gl = gamma * lambd
    carried = gl ** steps.to(adv.dtype) * (gamma * v_next + gl * a_next)
    return torch.where(valid, adv, carried), torch.where(valid, ret, carried)


def _aggregation(token_level_loss: bool, dp_size, batch_num_tokens, global_batch_size):
    """``(fastrlhf mode, count keywords, factor)`` of OpenRLHF's ``aggregate_loss``."""
    if token_level_loss:
        return "token-mean", {"global_tokens": batch_num_tokens}, 1 if batch_num_tokens is None else dp_size
    return "seq-mean-token-mean", {"global_seqs": global_batch_size}, 1 if global_batch_size is None else dp_size


def _mask(action_mask, like: torch.Tensor) -> torch.Tensor:
    return torch.ones(like.shape, dtype=torch.bool, device=like.device) if action_mask is None else action_mask


class PolicyLoss(torch.nn.Module):
    """OpenRLHF's PPO ``PolicyLoss`` (``policy_loss_type="ppo"``, IS correction off).

    ``loss = max(-A r, -A clip(r, 1 - clip_eps_low, 1 + clip_eps_high))`` per token with
    ``r = exp(clamp(log_probs - old_log_probs, +-20))`` and, with ``dual_clip = c > 1``,
    ``min(loss, -A c)`` where ``A < 0``; aggregated as a token mean (``token_level_loss``)
    or a mean of per-sequence token means, with OpenRLHF's global counts and ``dp_size``.
    ``forward`` returns ``(loss, clip_ratio, ppo_kl, None, None)`` like OpenRLHF with the
    correction off; ``ppo_kl`` is the masked mean of ``-(log_probs - old_log_probs)``
    (unclamped). Runs :func:`fastrlhf.ppo_policy_loss`. GSPO and the train/rollout
    IS correction are not covered (``ValueError``).
    """

    def __init__(self, clip_eps_low: float = 0.2, clip_eps_high: float = 0.2, dual_clip: float | None = None,
                 token_level_loss: bool = True, policy_loss_type: str = "ppo", is_correction_level: str = "off",
                 is_correction_mode: str = "mask", is_correction_gating: str = "ratio",
                 is_correction_threshold=(0.5, 5.0)) -> None:
        super().__init__()
        if policy_loss_type != "ppo":
            raise ValueError(f"fastrlhf's PolicyLoss covers policy_loss_type='ppo', got {policy_loss_type!r}")
        if is_correction_level != "off":
            raise ValueError(f"fastrlhf's PolicyLoss covers is_correction_level='off', "
                             f"got {is_correction_level!r}")
        if dual_clip is not None and not dual_clip > 1.0:
            raise ValueError(f"dual_clip must be > 1.0, got {dual_clip}")
        self.clip_eps_low = clip_eps_low
        self.clip_eps_high = clip_eps_high
        self.dual_clip = dual_clip
        self.token_level_loss = token_level_loss
        self.policy_loss_type = policy_loss_type
        self.is_correction_level = is_correction_level
        self.is_correction_mode = is_correction_mode
        self.is_correction_gating = is_correction_gating
        self.is_correction_threshold = is_correction_threshold

    def forward(self, log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor,
                action_mask: torch.Tensor | None = None, rollout_log_probs: torch.Tensor | None = None,
                dp_size: int = 1, batch_num_tokens=None, global_batch_size=None):
        mask = _mask(action_mask, log_probs)
        mode, counts, factor = _aggregation(self.token_level_loss, dp_size, batch_num_tokens, global_batch_size)
        loss, stats = ppo_policy_loss(log_probs, old_log_probs, advantages, mask, clip_low=self.clip_eps_low,
                                      clip_high=self.clip_eps_high, dual_clip=self.dual_clip, agg=mode,
                                      log_ratio_clamp=20.0, **counts)
        ppo_kl = aggregate(old_log_probs.detach().float() - log_probs.detach().float(), mask, "token-mean")
        return loss * factor, stats["clipfrac"], ppo_kl, None, None


class ValueLoss(torch.nn.Module):
    """OpenRLHF's ``ValueLoss``: ``0.5 * agg(max((v - R)^2, (clip(v, old +- clip_eps) - R)^2))``.

    Without ``clip_eps`` the plain ``0.5 * agg((v - R)^2)``; aggregation as :class:`PolicyLoss`.
    ``forward`` returns the 0-dim fp32 loss (gradient w.r.t. ``values``). Runs
    :func:`fastrlhf.ppo_value_loss`.
    """

    def __init__(self, clip_eps: float | None = None, token_level_loss: bool = True) -> None:
        super().__init__()
        self.clip_eps = clip_eps
        self.token_level_loss = token_level_loss

    def forward(self, values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                action_mask: torch.Tensor | None = None, dp_size: int = 1, batch_num_tokens=None,
                global_batch_size=None) -> torch.Tensor:
        mask = _mask(action_mask, values)
        mode, counts, factor = _aggregation(self.token_level_loss, dp_size, batch_num_tokens, global_batch_size)
        loss, _ = ppo_value_loss(values, old_values, returns, mask, clip=self.clip_eps, agg=mode, **counts)
        return loss * factor
