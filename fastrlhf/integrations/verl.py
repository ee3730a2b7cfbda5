"""Drop-in replacements for verl's PPO functions, and :func:`register_with_verl`.

Each function keeps the signature and semantics of verl 0.9.1 (``verl/utils/torch_functional.py``,
``verl/trainer/ppo/core_algos.py``) and runs on fastrlhf ops. The backend follows
:func:`fastrlhf.use_backend` / ``FASTRLHF_BACKEND`` (``auto`` by default).

Differences from verl, all deliberate:

* Outputs are fp32 (fp64 for fp64 inputs); verl's PyTorch paths return the input dtype.
* No NaN on valid input: an all-masked batch gives loss 0 (verl divides 0 by 0), and
  whitening with fewer than two valid elements does not scale (verl raises).
* Masks are binary: a token counts where ``mask != 0``. verl multiplies by the mask, so
  fractional mask values act as weights there.
* ``kl_penalty``'s ``low_var_kl`` (k3) is accurate to a few ulps near a log-ratio of 0, where
  verl's ``exp(kl) - kl - 1`` cancels (in fp32 its relative error is 1e-4 at a log-ratio of
  0.01, a few % at 0.001).
"""

from __future__ import annotations

import importlib
import sys
import warnings
from collections.abc import Mapping

import torch

from fastrlhf import _checks
from fastrlhf._numerics import acc_dtype
from fastrlhf.integrations.common import gather_or_zero, next_valid
from fastrlhf.integrations.patching import Patch
from fastrlhf.ops.advantages import discounted_returns, gae, group_advantages
from fastrlhf.ops.aggregation import aggregate
from fastrlhf.ops.kl import kl_penalty as _kl_penalty
from fastrlhf.ops.logprobs import token_logprobs
from fastrlhf.ops.policy_loss import RolloutCorrection, policy_loss, ppo_value_loss

__all__ = ["ADV_ESTIMATORS", "AGG_MODES", "POLICY_LOSSES", "VerlRegistration", "agg_loss",
           "compute_gae_advantage_return", "compute_grpo_outcome_advantage",
           "compute_grpo_vectorized_outcome_advantage", "compute_policy_loss_bypass_mode",
           "compute_policy_loss_cispo", "compute_policy_loss_clip_cov", "compute_policy_loss_dppo_kl",
           "compute_policy_loss_dppo_tv", "compute_policy_loss_dro", "compute_policy_loss_geo_mean",
           "compute_policy_loss_gpg", "compute_policy_loss_gspo", "compute_policy_loss_kl_cov",
           "compute_policy_loss_reinforce", "compute_policy_loss_sapo", "compute_policy_loss_vanilla",
           "compute_reinforce_plus_plus_baseline_outcome_advantage",
           "compute_reinforce_plus_plus_outcome_advantage", "compute_remax_outcome_advantage",
           "compute_rloo_outcome_advantage", "compute_rloo_vectorized_outcome_advantage", "compute_value_loss",
           "kl_penalty", "logprobs_from_logits", "masked_whiten", "register_with_verl"]

AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean",
             "seq-mean-token-sum-norm")
_KL_NAMES = {"kl": "k1", "k1": "k1", "abs": "abs", "mse": "k2", "k2": "k2", "low_var_kl": "k3", "k3": "k3"}


# ------------------------------------------------------------------------------ log-probs
def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor, inplace_backward: bool = True):
    """Log-prob of each label under ``softmax(logits)``, as verl's ``logprobs_from_logits``.

    Labels equal to -100 give 0 (as verl's flash-attn path). ``inplace_backward=True``
    (verl's default) writes the gradient into ``logits``' buffer: pass ``False`` when the
    logits are used again (verl does when it also computes the entropy). Returns fp32 of
    ``labels``' shape. See :func:`fastrlhf.token_logprobs`.
    """
    return token_logprobs(logits, labels, inplace_backward=bool(inplace_backward))


# ------------------------------------------------------------------------------------ KL
def kl_penalty(logprob: torch.Tensor, ref_logprob: torch.Tensor, kl_penalty: str) -> torch.Tensor:
    """verl's per-token KL estimate of ``logprob - ref_logprob``.

    ``kl_penalty``: ``"kl"``/``"k1"``, ``"abs"``, ``"mse"``/``"k2"``, ``"low_var_kl"``/``"k3"``,
    each optionally with ``"+"`` (straight-through: the value of the estimator, the gradient
    of k2). ``k3`` keeps verl's clamps: the log-ratio to ``+-20`` and the result to ``+-10``.
    ``"full"`` raises ``NotImplementedError`` as in verl. Returns fp32, differentiable
    w.r.t. both inputs (see :func:`fastrlhf.kl_penalty`).
    """
    if not isinstance(kl_penalty, str):
        raise TypeError(f"kl_penalty must be a str, got {type(kl_penalty).__name__}")
    base = kl_penalty.removesuffix("+")
    if base == "full":
        raise NotImplementedError("kl_penalty='full' needs the full vocabulary distributions")
    if base not in _KL_NAMES:
        raise ValueError(f"kl_penalty must be one of {sorted(_KL_NAMES)} (optionally with '+'), "
                         f"got {kl_penalty!r}")
    name = _KL_NAMES[base]
    clamps = {"clamp": 10.0, "log_ratio_clamp": 20.0} if name == "k3" else {}
    straight = kl_penalty.endswith("+") and name != "k2"
    return _kl_penalty(logprob, ref_logprob, estimator=name + ("+" if straight else ""), **clamps)


# ---------------------------------------------------------------------------- advantages
def _at_next_valid(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``x`` at the next valid index (itself where valid), 0 after a row's last valid token."""
    return gather_or_zero(x, next_valid(valid))


def _number(name: str, value) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a Python float, got {type(value).__name__}")
    return float(value)


def compute_gae_advantage_return(token_level_rewards: torch.Tensor, values: torch.Tensor,
                                 response_mask: torch.Tensor, gamma, lam):
    """verl's GAE: ``(whitened advantages, returns)``, both ``[B, T]`` fp32, no gradient.

    Masked tokens inside a row (multi-turn observations) are skipped: the next value and
    the running advantage carry across them (:func:`fastrlhf.ops.advantages.gae` with
    ``holes="skip"``). As in verl, a masked position holds the running advantage of the
    next valid token (0 after the last one), ``returns = advantages + values`` everywhere
    (before whitening), and the advantages are whitened with the statistics of the valid
    tokens and returned at every position (:func:`masked_whiten`).
    """
    _checks.tensor("values", values, _checks.FLOAT_DTYPES, dim=2)
    _checks.mask("response_mask", response_mask, values.shape, values.device)
    adv, _ = gae(token_level_rewards, values, response_mask, gamma=_number("gamma", gamma),
                 lam=_number("lam", lam), holes="skip")
    adv = _at_next_valid(adv, response_mask != 0)
    returns = adv + values.detach().to(adv.dtype)
    return masked_whiten(adv, response_mask), returns


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """verl's ``masked_whiten``: ``(values - mean) * rsqrt(var + 1e-8)`` at every position.

    ``mean`` and the unbiased ``var`` are over the elements where ``mask != 0`` (all dims);
    ``shift_mean=False`` adds the mean back. Masked positions are transformed too (verl
    does). With fewer than two valid elements nothing is scaled (verl raises); with none
    the mean is 0. Returns fp32 (fp64 for fp64 values), differentiable, no host sync.
    """
    _checks.tensor("values", values, _checks.FLOAT_DTYPES)
    _checks.mask("mask", mask, values.shape, values.device)
    x = values.to(acc_dtype(values))
    flat, flat_mask = x.reshape(1, -1), mask.reshape(1, -1)
    mean = aggregate(flat, flat_mask, "token-mean")
    var = aggregate((flat - mean).square(), flat_mask, "token-mean")
    n = (mask != 0).sum()
    var = var * (n / (n - 1).clamp(min=1))
    out = (x - mean) * torch.where(n > 1, torch.rsqrt(var + 1e-8), 1.0)
    return out if shift_mean else out + mean


def _grouped(scores: torch.Tensor, index, method: str, eps: float, fallback, *args, **kwargs):
    """Group advantages of ``scores [B]`` over verl's ``index`` (one uid per sample, any order):
    with groups of one size, :func:`fastrlhf.group_advantages` on the samples sorted by group
    (stable) and put back; ragged groups run ``fallback`` (verl's own estimator), ``None`` if none."""
    import numpy as np

    ids = np.asarray(index)
    _, inv, counts = np.unique(ids, return_inverse=True, return_counts=True)
    if counts.size == 0 or counts.min() != counts.max():
        return None
    size = int(counts[0])
    order = torch.as_tensor(np.argsort(inv.reshape(-1), kind="stable"), device=scores.device)
    out = torch.empty_like(scores, dtype=acc_dtype(scores))
    out[order] = group_advantages(scores[order].to(out.dtype), size, method=method, eps=eps)
    return out, size


def _estimator(name, method, verl_name, vectorized=False):
    def estimate(token_level_rewards, response_mask, index, epsilon: float = 1e-6,
                 norm_adv_by_std_in_grpo: bool = True, config=None, **kwargs):
        with torch.no_grad():
            scores = token_level_rewards.sum(dim=-1)
            kind = method if (method != "grpo" or norm_adv_by_std_in_grpo) else "dr_grpo"
            grouped = _grouped(scores, index, kind, float(epsilon) if kind == "grpo" else 0.0, None)
            if grouped is None:  # groups of different sizes: verl's own estimator
                fn = _verl_own(verl_name)
                extra = {"norm_adv_by_std_in_grpo": norm_adv_by_std_in_grpo} if method == "grpo" else {}
                return fn(token_level_rewards=token_level_rewards, response_mask=response_mask, index=index,
                          epsilon=epsilon, config=config, **extra)
            adv, size = grouped
            if vectorized and method == "rloo" and size == 1:  # verl's vectorized RLOO zeroes singletons
                adv = torch.zeros_like(adv)
            adv = adv.unsqueeze(-1) * response_mask
            return adv, adv

    estimate.__name__ = verl_name
    estimate.__doc__ = (f"verl's ``{name!r}`` advantage estimator: ``{method}`` group advantages of the summed "
                        "token rewards over verl's ``index`` (uids), broadcast to the valid tokens "
                        "(:func:`fastrlhf.group_advantages`; fp64 group statistics). Ragged groups run verl's "
                        "own estimator. Returns ``(advantages, returns)``, equal, ``[B, T]``.")
    return estimate


compute_grpo_outcome_advantage = _estimator("grpo", "grpo", "compute_grpo_outcome_advantage")
compute_grpo_vectorized_outcome_advantage = _estimator("grpo_vectorized", "grpo",
                                                       "compute_grpo_vectorized_outcome_advantage", vectorized=True)
compute_rloo_outcome_advantage = _estimator("rloo", "rloo", "compute_rloo_outcome_advantage")
compute_rloo_vectorized_outcome_advantage = _estimator("rloo_vectorized", "rloo",
                                                       "compute_rloo_vectorized_outcome_advantage", vectorized=True)


def compute_reinforce_plus_plus_outcome_advantage(token_level_rewards, response_mask, config=None, **kwargs):
    """verl's ``"reinforce_plus_plus"``: returns ``G_t = r_t + gamma G`` over the valid tokens (masked
    tokens skipped, 0 there; ``config.gamma``), advantages the whitened returns on valid tokens.
    Runs :func:`fastrlhf.discounted_returns` and :func:`masked_whiten`."""
    if config is None:
        raise ValueError("config (verl's AlgoConfig, for gamma) is required")
    with torch.no_grad():
        returns = discounted_returns(token_level_rewards, response_mask, gamma=_number("gamma", _cfg(config, "gamma")),
                                     holes="skip")
        return masked_whiten(returns, response_mask) * response_mask, returns


def compute_reinforce_plus_plus_baseline_outcome_advantage(token_level_rewards, response_mask, index,
                                                           epsilon: float = 1e-6, config=None, **kwargs):
    """verl's ``"reinforce_plus_plus_baseline"``: the summed reward minus its group mean (over verl's
    ``index``), on every valid token, whitened over the batch. Ragged groups: verl's own estimator."""
    with torch.no_grad():
        scores = token_level_rewards.sum(dim=-1)
        grouped = _grouped(scores, index, "dr_grpo", 0.0, None)
        if grouped is None:
            return _verl_own("compute_reinforce_plus_plus_baseline_outcome_advantage")(
                token_level_rewards=token_level_rewards, response_mask=response_mask, index=index, epsilon=epsilon,
                config=config)
        adv = grouped[0].unsqueeze(-1) * response_mask
        adv = masked_whiten(adv, response_mask) * response_mask
        return adv, adv


def compute_remax_outcome_advantage(token_level_rewards, reward_baselines, response_mask, config=None, **kwargs):
    """verl's ``"remax"``: returns the reversed cumulative sum of the valid rewards (at a masked
    position, that of the next valid token), advantages ``returns - baseline`` on valid tokens."""
    with torch.no_grad():
        returns = discounted_returns(token_level_rewards, response_mask, gamma=1.0, holes="skip")
        returns = _at_next_valid(returns, response_mask != 0)
        return returns - reward_baselines.unsqueeze(-1) * response_mask, returns


_VERL_ORIGINALS: dict = {}
"""verl's functions that :func:`register_with_verl` replaced, by name (ragged groups run them)."""


def _verl_own(name: str):
    fn = _VERL_ORIGINALS.get(name)
    return fn if fn is not None else getattr(importlib.import_module(_CORE), name)


# ----------------------------------------------------------------------------- losses
def _agg_plan(mode, T, dp_size, batch_num_tokens, global_batch_size, loss_scale_factor):
    """``(fastrlhf mode, count keywords, factor)``: verl's ``agg_loss`` is the fastrlhf
    aggregate times ``factor`` (``dp_size``, divided by the scale factor for ``-norm``)."""
    if mode not in AGG_MODES:
        raise ValueError(f"Invalid loss_agg_mode: {mode!r}; expected one of {AGG_MODES}")
    dp_size = _number("dp_size", dp_size)
    if mode == "token-mean":
        if batch_num_tokens is None and dp_size > 1:
            raise ValueError("(global) batch_num_tokens is required when dp_size > 1")
        return mode, {"global_tokens": batch_num_tokens}, dp_size
    if mode == "token-sum":
        return mode, {}, dp_size
    if global_batch_size is None and dp_size > 1:
        raise ValueError("global_batch_size is required when dp_size > 1")
    counts = {"global_seqs": global_batch_size}
    if mode == "seq-mean-token-sum-norm":  # verl 0.9: the seq-mean of the token sums, / factor
        return "seq-mean-token-sum", counts, dp_size / (T if loss_scale_factor is None else loss_scale_factor)
    return mode, counts, dp_size


def agg_loss(loss_mat: torch.Tensor, loss_mask: torch.Tensor, loss_agg_mode: str, dp_size: int = 1,
             batch_num_tokens=None, global_batch_size=None, loss_scale_factor=None) -> torch.Tensor:
    """verl's ``agg_loss``: a ``[B, T]`` per-token loss aggregated by ``loss_agg_mode``.

    ``token-mean``: sum / ``batch_num_tokens`` (default: local valid tokens) * ``dp_size``;
    ``token-sum``: sum * ``dp_size``; ``seq-mean-token-sum`` / ``seq-mean-token-mean``: sum
    over rows of the row sum / row mean, / ``global_batch_size`` (default: local rows with a
    valid token) * ``dp_size``; ``seq-mean-token-sum-norm``: ``seq-mean-token-sum`` /
    ``loss_scale_factor`` (default ``T``), as verl 0.9 (earlier verl did not divide by the
    row count). Counts may be numbers or 0-dim tensors. Built on :func:`fastrlhf.aggregate`;
    returns a differentiable 0-dim fp32 tensor.
    """
    mode, counts, factor = _agg_plan(loss_agg_mode, loss_mat.shape[-1], dp_size, batch_num_tokens,
                                     global_batch_size, loss_scale_factor)
    return aggregate(loss_mat, loss_mask, mode, **counts) * factor


def _cfg(config, name: str, default=None):
    if config is None:
        return default
    if isinstance(config, Mapping) or hasattr(config, "get"):
        return config.get(name, default)
    return getattr(config, name, default)


def _clip_range(config) -> tuple[float, float]:
    """``(clip_ratio_low, clip_ratio_high)``, each defaulting to ``clip_ratio`` (0.2)."""
    clip = _cfg(config, "clip_ratio", 0.2)
    low, high = _cfg(config, "clip_ratio_low"), _cfg(config, "clip_ratio_high")
    return float(clip if low is None else low), float(clip if high is None else high)


def _loss_cfg(config, name: str, default):
    """``config.policy_loss.<name>``, ``default`` where it is None."""
    value = _cfg(_cfg(config, "policy_loss"), name)
    return default if value is None else value


def _item(x) -> float:
    return x.item() if isinstance(x, torch.Tensor) else float(x)


def _run_loss(mode, old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights,
              stats_map, *, batch_info=True, **options):
    """fastrlhf's ``policy_loss(mode=...)`` with verl's aggregation (``config.global_batch_info``)
    and verl's metric names: ``stats_map`` maps each to a fastrlhf statistic (or a number)."""
    if config is None:
        raise ValueError("config is required: an actor config with clip_ratio (verl's ActorConfig)")
    info = dict(_cfg(config, "global_batch_info") or {}) if batch_info else {}
    agg, counts, factor = _agg_plan(loss_agg_mode, log_prob.shape[-1], info.get("dp_size", 1),
                                    info.get("batch_num_tokens"), info.get("global_batch_size"),
                                    info.get("loss_scale_factor"))
    if rollout_is_weights is not None:
        rollout_is_weights = rollout_is_weights.detach()
    loss, stats = policy_loss(log_prob, old_log_prob, advantages, response_mask, mode=mode, agg=agg,
                              is_weights=rollout_is_weights, **counts, **options)
    metrics = {name: _item(stats[key] if isinstance(key, str) else key) for name, key in stats_map.items()}
    return loss * factor, metrics


_PPO_METRICS = {"actor/pg_clipfrac": "clipfrac", "actor/ppo_kl": "approx_kl",
                "actor/pg_clipfrac_lower": "clipfrac_lower"}


def compute_policy_loss_vanilla(old_log_prob: torch.Tensor, log_prob: torch.Tensor, advantages: torch.Tensor,
                                response_mask: torch.Tensor, loss_agg_mode: str = "token-mean", config=None,
                                rollout_is_weights: torch.Tensor | None = None):
    """verl's ``"vanilla"`` PPO policy loss: clipped surrogate with dual clip, aggregated.

    ``ratio = exp(clamp(log_prob - old_log_prob, +-20))``; clip range
    ``[1 - clip_ratio_low, 1 + clip_ratio_high]`` (each defaulting to ``clip_ratio``) and dual
    clip ``clip_ratio_c`` (default 3.0) from ``config`` (an actor config: attributes or a
    mapping, with ``global_batch_info`` holding ``dp_size``, ``batch_num_tokens``,
    ``global_batch_size``, ``loss_scale_factor`` for :func:`agg_loss`). Per-token
    ``rollout_is_weights`` multiply the per-token loss (the clip fractions are those of the
    unweighted loss, as verl).

    Returns ``(pg_loss, metrics)``: ``pg_loss`` a 0-dim fp32 tensor with a gradient w.r.t.
    ``log_prob``; ``metrics`` Python floats ``actor/pg_clipfrac``, ``actor/ppo_kl`` (masked
    mean of the negated clamped log-ratio), ``actor/pg_clipfrac_lower`` (read with
    ``.item()``, as verl does). Runs :func:`fastrlhf.policy_loss` (``mode="vanilla"``).
    """
    low, high = _clip_range(config)
    dual = _cfg(config, "clip_ratio_c", 3.0)
    if not dual > 1.0:
        raise ValueError(f"The lower bound of the clip_ratio_c for dual-clip PPO should be greater than 1.0, "
                         f"but get the value: {dual}.")
    return _run_loss("vanilla", old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                     rollout_is_weights, _PPO_METRICS, clip_low=low, clip_high=high, dual_clip=float(dual),
                     log_ratio_clamp=20.0)


def _dppo(mode):
    def loss_fn(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean", config=None,
                rollout_is_weights=None):
        low, high = _clip_range(config)
        return _run_loss(mode, old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                         rollout_is_weights, _PPO_METRICS, clip_low=low, clip_high=high,
                         ratio_cap=float(_cfg(config, "clip_ratio_c", 20.0)), log_ratio_clamp=20.0)

    loss_fn.__name__ = f"compute_policy_loss_{mode}"
    loss_fn.__doc__ = (f"verl's ``{mode!r}`` policy loss (DPPO-Binary-{'TV' if mode == 'dppo_tv' else 'KL'}): "
                       "``-A sg(min(r, clip_ratio_c)) log_prob`` inside the trust region of thresholds "
                       "``clip_ratio_low/high``, else 0 (:func:`fastrlhf.policy_loss` ``mode=" + repr(mode) + "``). "
                       "Signature, aggregation and metrics as :func:`compute_policy_loss_vanilla`.")
    return loss_fn


compute_policy_loss_dppo_tv = _dppo("dppo_tv")
compute_policy_loss_dppo_kl = _dppo("dppo_kl")


def compute_policy_loss_gspo(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="seq-mean-token-mean",
                             config=None, rollout_is_weights=None):
    """verl's ``"gspo"`` policy loss: the PPO clip of one ratio per sequence (the exp of its mean
    log-ratio, capped at ``e**10``), the gradient per token (:func:`fastrlhf.policy_loss`
    ``mode="gspo"``). Metrics ``actor/pg_clipfrac``, ``actor/ppo_kl`` (unclamped),
    ``actor/pg_clipfrac_lower`` (0, as verl)."""
    low, high = _clip_range(config)
    return _run_loss("gspo", old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                     rollout_is_weights, {**_PPO_METRICS, "actor/pg_clipfrac_lower": 0.0},
                     clip_low=low, clip_high=high, log_ratio_clamp=10.0, gradient="token")


def compute_policy_loss_sapo(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="seq-mean-token-mean",
                             config=None, rollout_is_weights=None):
    """verl's ``"sapo"`` policy loss ``-A (4 / tau) sigmoid(tau (r - 1))`` (``tau_pos`` / ``tau_neg``
    of ``config``), always aggregated ``seq-mean-token-mean`` as verl does. Both clip fractions 0."""
    return _run_loss("sapo", old_log_prob, log_prob, advantages, response_mask, "seq-mean-token-mean", config,
                     rollout_is_weights, {"actor/pg_clipfrac": 0.0, "actor/ppo_kl": "approx_kl",
                                          "actor/pg_clipfrac_lower": 0.0},
                     tau_pos=float(_cfg(config, "tau_pos", 1.0)), tau_neg=float(_cfg(config, "tau_neg", 1.05)),
                     log_ratio_clamp=20.0)


def compute_policy_loss_gpg(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
                            config=None, rollout_is_weights=None):
    """verl's ``"gpg"`` policy loss ``-A log_prob``; no metrics (``{}``), as verl."""
    return _run_loss("gpg", old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                     rollout_is_weights, {})


def compute_policy_loss_clip_cov(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
                                 config=None, rollout_is_weights=None):
    """verl's ``"clip_cov"`` policy loss: the clipped surrogate, 0 on tokens drawn by covariance
    (``config.policy_loss.clip_cov_ratio / clip_cov_lb / clip_cov_ub``; drawn with the global CPU
    generator as verl). Metrics ``actor/pg_clipfrac`` (the drawn fraction), ``actor/ppo_kl``."""
    low, high = _clip_range(config)
    ratio = float(_loss_cfg(config, "clip_cov_ratio", 0.0002))
    if not ratio > 0:
        raise ValueError("clip_ratio should be larger than 0.")
    return _run_loss("clip_cov", old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                     rollout_is_weights, {"actor/pg_clipfrac": "clipfrac", "actor/ppo_kl": "approx_kl"},
                     clip_low=low, clip_high=high, clip_cov_ratio=ratio,
                     clip_cov_lb=float(_loss_cfg(config, "clip_cov_lb", 1.0)),
                     clip_cov_ub=float(_loss_cfg(config, "clip_cov_ub", 5.0)))


def compute_policy_loss_kl_cov(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
                               config=None, rollout_is_weights=None):
    """verl's ``"kl_cov"`` policy loss: ``-A r``, plus ``ppo_kl_coef |lr|`` (None: 1.0, as verl) on the
    top-covariance tokens (``config.policy_loss.kl_cov_ratio``). Metric ``actor/ppo_kl``: the mean
    ``|lr|``, as verl."""
    ratio = float(_loss_cfg(config, "kl_cov_ratio", 0.0002))
    if not ratio > 0:
        raise ValueError("kl_cov_ratio should be larger than 0.")
    return _run_loss("kl_cov", old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                     rollout_is_weights, {"actor/ppo_kl": "abs_kl"}, kl_cov_ratio=ratio,
                     ppo_kl_coef=float(_loss_cfg(config, "ppo_kl_coef", 1.0)))


def compute_policy_loss_geo_mean(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
                                 config=None, rollout_is_weights=None):
    """verl's ``"geo_mean"`` policy loss (GMPO): one loss per sequence, the mean over all ``B`` rows
    (verl ignores ``loss_agg_mode`` and the global batch counts here). ``rollout_is_weights`` enter
    as their geometric mean per sequence. Metrics as :func:`compute_policy_loss_vanilla`."""
    low, high = _clip_range(config)
    if config is None:
        raise ValueError("config is required: an actor config with clip_ratio (verl's ActorConfig)")
    weights = None if rollout_is_weights is None else rollout_is_weights.detach()
    loss, stats = policy_loss(log_prob, old_log_prob, advantages, response_mask, mode="geo_mean",
                              agg="seq-mean-token-mean", global_seqs=log_prob.shape[0], is_weights=weights,
                              clip_low=low, clip_high=high)
    return loss, {name: _item(stats[key]) for name, key in _PPO_METRICS.items()}


def compute_policy_loss_dro(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
                            config=None, rollout_is_weights=None):
    """verl's ``"dro"`` policy loss ``-(A log_prob - dro_beta / 2 lr**2)``; ``config.policy_loss.dro_beta``
    must be > 0 (``ValueError`` otherwise, as verl). Metric ``actor/ppo_kl``."""
    beta = _loss_cfg(config, "dro_beta", None)
    if beta is None or beta <= 0:
        raise ValueError("policy_loss.dro_beta must be a positive value when using DRO")
    return _run_loss("dro", old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                     rollout_is_weights, {"actor/ppo_kl": "approx_kl"}, dro_beta=float(beta))


def compute_policy_loss_cispo(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
                              config=None, rollout_is_weights=None):
    """verl's ``"cispo"`` policy loss ``-sg(clip(r, 1 - low, 1 + high)) A log_prob``. Metrics
    ``actor/pg_clipfrac``, ``actor/ppo_kl``, ``actor/pg_clipfrac_lower`` (0, as verl)."""
    low, high = _clip_range(config)
    return _run_loss("cispo", old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                     rollout_is_weights, {**_PPO_METRICS, "actor/pg_clipfrac_lower": 0.0},
                     clip_low=low, clip_high=high, log_ratio_clamp=20.0)


def compute_policy_loss_reinforce(rollout_log_prob, log_prob, advantages, response_mask,
                                  loss_agg_mode="seq-mean-token-sum", config=None, rollout_is_weights=None):
    """verl's ``compute_policy_loss_reinforce``: ``-A log_prob`` (times ``rollout_is_weights``),
    metric ``actor/ppo_kl`` the mean of ``rollout_log_prob - log_prob``."""
    return _run_loss("gpg", rollout_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                     rollout_is_weights, {"actor/ppo_kl": "approx_kl"})


def compute_policy_loss_bypass_mode(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
                                    config=None, rollout_is_weights=None):
    """verl's ``"bypass_mode"`` policy loss: ``old_log_prob`` are the rollout's; ``rollout_correction``
    of ``config.policy_loss`` (``loss_type`` ``"ppo_clip"`` or ``"reinforce"``, ``rollout_is``,
    ``rollout_is_threshold``, rejection sampling ``rollout_rs``, ``rollout_is_batch_normalize``).

    verl's ``compute_rollout_correction_and_rejection_mask`` gives the rejection mask and the
    ``rollout_corr/*`` metrics (a diagnostic pass under ``no_grad``); the loss runs in fastrlhf:
    ``"reinforce"`` with the importance weights in the loss kernels (``RolloutCorrection.verl``;
    with batch normalisation, verl's normalised weights), ``"ppo_clip"`` as
    :func:`compute_policy_loss_vanilla` against the rollout (no weights, as verl).
    ``rollout_is_weights`` is ignored, as verl.
    """
    from verl.trainer.ppo.rollout_corr_helper import compute_rollout_correction_and_rejection_mask

    if config is None:
        raise ValueError("config is required for bypass_mode loss")
    rc = _cfg(_cfg(config, "policy_loss"), "rollout_correction")
    if rc is None:
        raise ValueError("rollout_correction config not found in policy_loss. When using loss_mode='bypass_mode', "
                         "ensure rollout_correction config is passed.")
    loss_type = _cfg(rc, "loss_type", "ppo_clip")
    rollout_is = _cfg(rc, "rollout_is", None)
    threshold = _cfg(rc, "rollout_is_threshold", 2.0)
    normalize = bool(_cfg(rc, "rollout_is_batch_normalize", False))
    with torch.no_grad():
        weights_proto, mask, rollout_metrics = compute_rollout_correction_and_rejection_mask(
            old_log_prob=log_prob, rollout_log_prob=old_log_prob, response_mask=response_mask,
            rollout_is=rollout_is, rollout_is_threshold=threshold, rollout_is_batch_normalize=normalize,
            rollout_rs=_cfg(rc, "rollout_rs", None), rollout_rs_threshold=_cfg(rc, "rollout_rs_threshold", None))
    if loss_type == "reinforce":
        if rollout_is is not None and threshold is not None and not normalize:
            loss, metrics = _run_loss("bypass_mode", old_log_prob, log_prob, advantages, mask, loss_agg_mode, config,
                                      None, {"actor/ppo_kl": "approx_kl"}, loss_type="reinforce",
                                      rollout_correction=RolloutCorrection.verl(rollout_is, threshold))
        else:
            weights = None if weights_proto is None else weights_proto.batch["rollout_is_weights"]
            loss, metrics = compute_policy_loss_reinforce(old_log_prob, log_prob, advantages, mask, loss_agg_mode,
                                                          config, weights)
    elif loss_type == "ppo_clip":
        loss, metrics = compute_policy_loss_vanilla(old_log_prob, log_prob, advantages, mask, loss_agg_mode, config)
    else:
        raise ValueError(f"Invalid loss_type: {loss_type}. Must be 'reinforce' or 'ppo_clip'.")
    metrics.update(rollout_metrics)
    return loss, metrics


def compute_value_loss(vpreds: torch.Tensor, returns: torch.Tensor, values: torch.Tensor,
                       response_mask: torch.Tensor, cliprange_value: float, loss_agg_mode: str = "token-mean",
                       dp_size: int = 1, batch_num_tokens=None, global_batch_size=None, loss_scale_factor=None):
    """verl's clipped value loss ``0.5 * agg_loss(max((v - R)^2, (clip(v, old +- c) - R)^2))``.

    ``vpreds`` are the critic's predictions (the only input with a gradient), ``values`` the
    old values, ``cliprange_value = c > 0``; aggregation as :func:`agg_loss`. Returns
    ``(vf_loss, vf_clipfrac)``, 0-dim fp32 tensors. Runs :func:`fastrlhf.ppo_value_loss`.
    """
    mode, counts, factor = _agg_plan(loss_agg_mode, vpreds.shape[-1], dp_size, batch_num_tokens,
                                     global_batch_size, loss_scale_factor)
    loss, stats = ppo_value_loss(vpreds, values, returns, response_mask, clip=cliprange_value, agg=mode,
                                 **counts)
    return loss * factor, stats["vf_clipfrac"]


# -------------------------------------------------------------------------- registration
_CORE = "verl.trainer.ppo.core_algos"
_TORCH_FUNCTIONAL = "verl.utils.torch_functional"

POLICY_LOSSES = {
    "vanilla": compute_policy_loss_vanilla, "dppo_tv": compute_policy_loss_dppo_tv,
    "dppo_kl": compute_policy_loss_dppo_kl, "gspo": compute_policy_loss_gspo, "sapo": compute_policy_loss_sapo,
    "gpg": compute_policy_loss_gpg, "clip_cov": compute_policy_loss_clip_cov, "kl_cov": compute_policy_loss_kl_cov,
    "geo_mean": compute_policy_loss_geo_mean, "dro": compute_policy_loss_dro, "cispo": compute_policy_loss_cispo,
    "bypass_mode": compute_policy_loss_bypass_mode}
"""verl 0.9.1's policy-loss registry names -> fastrlhf's drop-ins (all of them)."""

ADV_ESTIMATORS = {
    "gae": compute_gae_advantage_return, "grpo": compute_grpo_outcome_advantage,
    "grpo_vectorized": compute_grpo_vectorized_outcome_advantage, "rloo": compute_rloo_outcome_advantage,
    "rloo_vectorized": compute_rloo_vectorized_outcome_advantage,
    "reinforce_plus_plus": compute_reinforce_plus_plus_outcome_advantage,
    "reinforce_plus_plus_baseline": compute_reinforce_plus_plus_baseline_outcome_advantage,
    "remax": compute_remax_outcome_advantage}
"""verl 0.9.1's advantage-estimator names fastrlhf computes -> its drop-ins (verl's ``opo``, ``gpg``,
``grpo_passk``, ``gdpo`` and the optimal-token baselines stay verl's)."""

_OVERRIDES = {
    _CORE: {**{fn.__name__: fn for fn in POLICY_LOSSES.values()},
            **{fn.__name__: fn for fn in ADV_ESTIMATORS.values()},
            "compute_policy_loss_reinforce": compute_policy_loss_reinforce,
            "compute_value_loss": compute_value_loss, "kl_penalty": kl_penalty, "agg_loss": agg_loss},
    _TORCH_FUNCTIONAL: {"logprobs_from_logits": logprobs_from_logits, "masked_whiten": masked_whiten},
}


class VerlRegistration(Patch):
    """What :func:`register_with_verl` changed; :meth:`undo` restores verl (also on leaving a
    ``with`` block): the registry entries, and verl's functions wherever a loaded ``verl`` module
    holds a fastrlhf one (also in modules imported after the registration)."""

    @property
    def entries(self) -> list:
        """``(registry, key, had key, old value)`` of each registry entry set."""
        return [(c.target, c.key, c.had, c.old) for c in self.changes
                if c.kind == "item" and c.target is not _VERL_ORIGINALS]

    @property
    def swaps(self) -> list:
        """``(verl's function, fastrlhf's function, verl's name)`` of each function swapped."""
        return [(c.old, c.new, c.key) for c in self.changes if c.kind == "rebind"]

    def set_entry(self, registry: dict, key: str, fn) -> None:
        """``registry[key] = fn``."""
        self.set_item(registry, key, fn)

    def swap(self, old, new, name: str | None = None) -> None:
        """Bind ``new`` wherever a loaded ``verl`` module binds ``old``; under ``name``, ``old``
        stays callable as verl's own (ragged groups run it) until :meth:`undo`."""
        if name is not None and name not in _VERL_ORIGINALS:
            self.set_item(_VERL_ORIGINALS, name, old)
        self.rebind(old, new, "verl", name)


def register_with_verl(*, override: bool = False) -> VerlRegistration | None:
    """Register fastrlhf's functions in an installed verl; a no-op with a warning without verl.

    Always: every policy loss of :data:`POLICY_LOSSES` as ``"fastrlhf_<name>"`` in verl's
    policy-loss registry (``actor.policy_loss.loss_mode=fastrlhf_gspo``, ...), and every
    estimator of :data:`ADV_ESTIMATORS` as ``"fastrlhf_<name>"`` in its advantage-estimator
    registry (``algorithm.adv_estimator=fastrlhf_grpo``; verl's trainer calls ``gae`` with
    values outside the registry, so ``fastrlhf_gae`` is only for callers that pass them).

    ``override=True`` (the one-line switch-over) also replaces verl's own: those registry names
    (``vanilla``, ``gspo``, ..., ``bypass_mode``; ``gae``, ``grpo``, ``rloo``, ...), and, in every
    loaded ``verl`` module, the functions under verl's names (``compute_policy_loss_*``,
    ``compute_*_advantage*``, ``compute_value_loss``, ``kl_penalty``, ``agg_loss`` of
    ``core_algos``; ``logprobs_from_logits``, ``masked_whiten`` of ``torch_functional``): verl's
    trainer calls GAE and GRPO by module attribute, and its workers import the loss helpers.
    The rollout correction: every loss takes verl's ``rollout_is_weights``; ``bypass_mode``
    computes its importance weights in the loss kernels. Call it before verl's workers import
    these names (or in each worker process).

    Returns a :class:`VerlRegistration` whose ``undo()`` restores verl, or ``None`` without verl.
    """
    try:
        core = importlib.import_module(_CORE)
        importlib.import_module(_TORCH_FUNCTIONAL)
    except ImportError as e:
        warnings.warn(f"register_with_verl: verl is not importable ({e}); nothing was registered",
                      stacklevel=2)
        return None
    reg = VerlRegistration()
    for name, fn in POLICY_LOSSES.items():
        reg.set_entry(core.POLICY_LOSS_REGISTRY, f"fastrlhf_{name}", fn)
    for name, fn in ADV_ESTIMATORS.items():
        reg.set_entry(core.ADV_ESTIMATOR_REGISTRY, f"fastrlhf_{name}", fn)
    if override:
        for name, fn in POLICY_LOSSES.items():
            if name in core.POLICY_LOSS_REGISTRY:
                reg.set_entry(core.POLICY_LOSS_REGISTRY, name, fn)
        for name, fn in ADV_ESTIMATORS.items():
            if name in core.ADV_ESTIMATOR_REGISTRY:
                reg.set_entry(core.ADV_ESTIMATOR_REGISTRY, name, fn)
        for module_name, names in _OVERRIDES.items():
            module = sys.modules[module_name]
            for name, fn in names.items():
                old = getattr(module, name, None)
                if old is not None and old is not fn:
                    reg.swap(old, fn, name)
    return reg
