"""Naive PyTorch policy losses: PPO's clipped policy and value losses and every mode of verl 0.9.1's policy-loss registry
(``verl/trainer/ppo/core_algos.py``), OpenRLHF 0.11.2's ``PolicyLoss`` (``openrlhf/models/loss.py``)
and the rollout correction of both (``verl/trainer/ppo/rollout_corr_helper.py``), written the
way those trainers write them: autograd does the gradients, ``.detach()`` marks the
stop-gradients. The oracle of the tests, the baseline of the benchmarks and the ``torch`` backend
of :func:`fastrlhf.policy_loss` (whose docstring states every formula).

Inputs are ``[B, T]``, or packed ``[total]`` with ``cu_seqlens`` (padded here to ``[S, max_len]``
first, as verl's ``no_padding_2_padding`` does, so the packed result is the padded one by
construction). A token is valid where ``mask != 0``; invalid tokens are selected away
(``torch.where``), so whatever they hold (even NaN) reaches neither the loss nor the statistics.
Math in the accumulation dtype (fp32, fp64 for fp64 inputs).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from fastrlhf._numerics import acc_dtype
from fastrlhf.reference.aggregation import aggregate, masked_mean

MODES = ("vanilla", "dppo_tv", "dppo_kl", "gspo", "sapo", "gpg", "clip_cov", "kl_cov", "geo_mean", "dro",
         "cispo", "bypass_mode")
"""verl 0.9.1's policy-loss registry, in its order."""

IS_LEVELS = ("token", "sequence", "sequence-mean")
IS_MODES = ("truncate", "clamp", "mask")
IS_STATS = ("ratio", "binary_kl", "tv")
STATS = ("clipfrac", "clipfrac_lower", "approx_kl", "abs_kl", "is_weight_mean", "is_filtered_frac", "rollout_kl")
"""Every statistic a mode may report, in the order of the op's statistics vector."""

EPS = 1e-8
"""verl's ``masked_mean`` / geometric-mean denominators ``n + 1e-8``."""


class Correction(NamedTuple):
    """A rollout correction, resolved (see ``fastrlhf.ops.policy_loss.RolloutCorrection``)."""

    level: str  # IS_LEVELS
    mode: str  # IS_MODES
    low: float  # -inf when there is no lower bound
    high: float
    stat: str  # IS_STATS
    log_ratio_clamp: float | None
    source: str = "rollout"  # "rollout": old vs rollout log-probs; "current": log-probs vs old (bypass)
    apply: bool = True  # False: statistics only (verl's bypass mode with the PPO-clip loss)


# ------------------------------------------------------------------------ packed layout
def seq_ids(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """int64 ``[total]``: the packed sequence of each token."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    return torch.repeat_interleave(torch.arange(lengths.numel(), device=cu_seqlens.device), lengths,
                                   output_size=total)


def pad(x: torch.Tensor, cu_seqlens: torch.Tensor, fill=0) -> torch.Tensor:
    """A packed ``[total]`` tensor as ``[S, max_len]``, ``fill`` after each sequence (differentiable)."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    S = lengths.numel()
    width = int(lengths.max()) if S else 0
    seq = seq_ids(cu_seqlens, x.numel())
    pos = torch.arange(x.numel(), device=x.device) - cu_seqlens.long()[seq]
    out = torch.full((S, width), fill, dtype=x.dtype, device=x.device)
    return out.index_put((seq, pos), x)


# ------------------------------------------------------------------------ per-mode losses
def _clamped(lr, c):
    return lr if c is None else lr.clamp(-c, c)


def _row_sum(x, valid):
    return torch.where(valid, x, 0.0).sum(-1)


def _surrogate(ratio, adv, clip_low, clip_high, dual_clip):
    """PPO's clipped surrogate of a ratio (any shape broadcasting with ``adv``):
    ``(loss, clipped, dual-clipped)``."""
    return clipped_surrogate(ratio, adv, 1 - clip_low, 1 + clip_high, dual_clip)


def clipped_surrogate(ratio, adv, ratio_low, ratio_high, dual_clip):
    """:func:`_surrogate` with the ratio's bounds given (``dual_clip`` None: off)."""
    loss1 = -adv * ratio
    loss2 = -adv * ratio.clamp(ratio_low, ratio_high)
    loss = torch.maximum(loss1, loss2)
    clipped = loss2 > loss1
    lower = torch.zeros_like(clipped)
    if dual_clip is not None:
        loss3 = -adv * dual_clip
        lower = (adv < 0) & (loss > loss3)
        loss = torch.where(adv < 0, torch.minimum(loss, loss3), loss)
    return loss, clipped, lower


def mode_loss(mode, logp, old, adv, valid, o: dict, selected=None):
    """``(per-token loss [B, T], per-token statistics)`` of one mode (fp32/fp64 inputs)."""
    raw = logp - old
    if mode in ("vanilla", "bypass_mode") and o.get("loss_type", "ppo_clip") == "ppo_clip":
        # verl compute_policy_loss_vanilla; OpenRLHF PolicyLoss(policy_loss_type="ppo")
        lr = _clamped(raw, o["log_ratio_clamp"])
        loss, clipped, lower = _surrogate(lr.exp(), adv, o["clip_low"], o["clip_high"], o["dual_clip"])
        return loss, {"clipfrac": clipped, "clipfrac_lower": lower, "approx_kl": -lr}
    if mode in ("gpg", "bypass_mode"):
        # verl compute_policy_loss_gpg, and compute_policy_loss_reinforce (bypass_mode, loss_type="reinforce")
        return -logp * adv, {"approx_kl": -raw}
    if mode in ("dppo_tv", "dppo_kl"):
        # verl compute_policy_loss_dppo_tv / _dppo_kl: clip_low/clip_high are divergence thresholds
        lr = _clamped(raw, o["log_ratio_clamp"])
        ratio = lr.exp()
        truncated = ratio.clamp(max=o["ratio_cap"]).detach()
        prob, old_prob = logp.exp(), old.exp()
        if mode == "dppo_tv":
            pos = (prob - old_prob) <= o["clip_high"]
            neg = (prob - old_prob) >= -o["clip_low"]
        else:
            binary_kl = old_prob * (old - logp) + (1 - old_prob) * torch.log(
                (1.0 - old_prob + 1e-8) / (1.0 - prob + 1e-8))
            pos = (binary_kl <= o["clip_high"]) | (prob <= old_prob)
            neg = (binary_kl <= o["clip_low"]) | (prob >= old_prob)
        keep = torch.where(adv > 0, pos, neg).detach()
        loss = torch.where(keep, -adv * truncated * logp, 0.0)  # verl multiplies by the 0/1 float mask
        return loss, {"clipfrac": ~keep, "clipfrac_lower": (ratio > o["ratio_cap"]) & keep, "approx_kl": -lr}
    if mode == "gspo":
        n = valid.sum(-1).clamp(min=1)
        seq_lr = (_row_sum(raw, valid) / n).unsqueeze(-1)
        if o["gradient"] == "token":
            # verl compute_policy_loss_gspo: s_i,t = sg[s_i] * pi_t / sg[pi_t], token-level gradient
            log_s = logp - logp.detach() + seq_lr.detach()
        else:
            # OpenRLHF PolicyLoss(policy_loss_type="gspo"): the gradient flows through the sequence mean
            log_s = seq_lr.expand_as(logp)
        if o["log_ratio_clamp"] is not None:
            log_s = log_s.clamp(max=o["log_ratio_clamp"])
        loss, clipped, lower = _surrogate(log_s.exp(), adv, o["clip_low"], o["clip_high"], o["dual_clip"])
        return loss, {"clipfrac": clipped, "clipfrac_lower": lower, "approx_kl": -raw}
    if mode == "sapo":
        # verl compute_policy_loss_sapo
        lr = _clamped(raw, o["log_ratio_clamp"])
        ratio = lr.exp()
        tau = torch.where(adv > 0, o["tau_pos"], o["tau_neg"]).to(ratio.dtype)
        gates = torch.sigmoid(tau * (ratio - 1.0)) * (4.0 / tau)
        return -gates * adv, {"approx_kl": -lr}
    if mode == "clip_cov":
        # verl compute_policy_loss_clip_cov (the selection: clip_cov_selection)
        loss, _, _ = _surrogate(raw.exp(), adv, o["clip_low"], o["clip_high"], None)
        return torch.where(selected, 0.0, loss), {"clipfrac": selected, "approx_kl": -raw}
    if mode == "kl_cov":
        # verl compute_policy_loss_kl_cov (the selection: kl_cov_selection)
        loss1 = -adv * raw.exp()
        loss = torch.where(selected, loss1 + o["ppo_kl_coef"] * raw.abs(), loss1)
        return loss, {"clipfrac": selected, "approx_kl": -raw, "abs_kl": raw.abs()}
    if mode == "geo_mean":
        # verl compute_policy_loss_geo_mean: token clip of the log-ratio in log space, then one
        # sequence-level ratio exp(mean); the sequence loss is broadcast to its tokens
        sgn = adv.sign()
        clamped = raw.clamp(-o["clip_low"], o["clip_high"])
        lr_min = sgn * torch.min(sgn * raw, sgn * clamped)
        n = valid.sum(-1)
        ratio = torch.exp(_row_sum(lr_min, valid) / (n + EPS))
        seq_adv = _row_sum(adv, valid) / (n + EPS)
        loss = (-seq_adv * ratio).unsqueeze(-1).expand_as(logp)
        clipped = raw != clamped
        return loss, {"clipfrac": clipped & (adv > 0), "clipfrac_lower": clipped & (adv < 0), "approx_kl": -raw}
    if mode == "dro":
        # verl compute_policy_loss_dro
        return -(logp * adv - 0.5 * o["dro_beta"] * raw.square()), {"approx_kl": -raw}
    if mode == "cispo":
        # verl compute_policy_loss_cispo
        lr = _clamped(raw, o["log_ratio_clamp"])
        ratio = lr.exp()
        clipped_ratio = ratio.clamp(1 - o["clip_low"], 1 + o["clip_high"])
        loss = -clipped_ratio.detach() * adv * logp
        return loss, {"clipfrac": ratio != clipped_ratio, "approx_kl": -lr}
    raise ValueError(f"unknown mode {mode!r}")


# ----------------------------------------------------------------------- rollout correction
def _binary_kl_tv(stat, num, den):
    """OpenRLHF's gates on the sampled token's probabilities: ``p`` of the rollout (``den``),
    ``q`` of the trainer (``num``), each clamped to ``[1e-6, 1 - 1e-6]``. The binary KL is
    clamped at 0: its two terms cancel for ``p ~ q`` and may round below 0, which a lower
    bound of 0 must not reject (the peers keep ``kl <= threshold``)."""
    p = den.exp().clamp(1e-6, 1 - 1e-6)
    q = num.exp().clamp(1e-6, 1 - 1e-6)
    if stat == "binary_kl":
        return (p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()).clamp(min=0)
    return (p - q).abs()


def correction(logp, old, rollout, valid, c: Correction):
    """``(coefficient [B, T], filtered per unit, per-token rollout KL)``, all detached.

    The importance ratio is trainer over rollout: ``old / rollout`` (verl's decoupled mode,
    OpenRLHF), or ``current / old`` with ``source="current"`` (verl's bypass mode, where
    ``old`` is the rollout). ``filtered`` is ``[B, T]`` at token level, ``[B]`` per sequence.
    """
    num, den = (logp.detach(), old) if c.source == "current" else (old, rollout)
    lr = (num - den).detach()
    rho = _clamped(lr, c.log_ratio_clamp).exp()
    if c.stat == "ratio":
        if c.level == "token":
            g = rho
        elif c.level == "sequence":  # verl: the product of the token ratios
            g = _clamped(_row_sum(lr, valid), c.log_ratio_clamp).exp()
        else:  # OpenRLHF seq gate: the geometric mean of the token ratios
            g = _clamped(_row_sum(lr, valid) / valid.sum(-1).clamp(min=1), c.log_ratio_clamp).exp()
    else:
        g = _binary_kl_tv(c.stat, num, den)
        if c.level == "sequence-mean":
            g = _row_sum(g, valid) / valid.sum(-1).clamp(min=1)
    if c.level != "token":
        g = g.unsqueeze(-1)
    if c.mode == "truncate":  # verl TIS
        coef, filtered = g.clamp(max=c.high), g > c.high
    elif c.mode == "clamp":  # OpenRLHF is_correction_mode="clip"
        coef, filtered = g.clamp(c.low, c.high), (g < c.low) | (g > c.high)
    else:  # verl IcePop / OpenRLHF mask: the kept unit keeps its weight, the others weigh 0
        keep = (g >= c.low) & (g <= c.high)
        weight = g if c.stat == "ratio" and c.level != "sequence-mean" else rho
        coef, filtered = torch.where(keep, weight, 0.0), ~keep
    if c.level != "token":
        filtered = filtered.squeeze(-1)
    return coef.expand_as(logp), filtered, (den - num).detach()


# ------------------------------------------------------------------------------ the loss
class Terms(NamedTuple):
    """A call's per-token quantities on padded ``[B, T]`` inputs (accumulation dtype)."""

    loss: torch.Tensor  # the per-token loss, the coefficient applied; differentiable w.r.t. logprobs
    stats: dict  # statistic name -> per-token values (means over the valid tokens are reported)
    filtered: torch.Tensor | None  # a sequence-level correction's filtered flag per sequence, [B]
    valid: torch.Tensor  # bool, mask != 0


def token_terms(logprobs, old_logprobs, advantages, mask, mode="vanilla", options=None, rollout_logprobs=None,
                correction_: Correction | None = None, is_weights=None, selected=None) -> Terms:
    """The per-token loss and statistics of :func:`policy_loss` before aggregation (padded input;
    ``mode="value"`` is the clipped value loss with ``options["clip"]``)."""
    o = dict(options or {})
    acc = acc_dtype(logprobs, old_logprobs, advantages, rollout_logprobs, is_weights)
    valid = mask != 0
    # invalid tokens enter as 0: nothing they hold reaches a value or a gradient (a NaN there would
    # otherwise come back as 0 * NaN through the selections' derivatives)
    logp, old, adv = (torch.where(valid, x.to(acc), 0.0) for x in (logprobs, old_logprobs, advantages))
    if rollout_logprobs is not None:
        rollout_logprobs = torch.where(valid, rollout_logprobs.to(acc), 0.0)
    if is_weights is not None:
        is_weights = torch.where(valid, is_weights.to(acc), 0.0)
    if selected is not None:
        selected = selected != 0
    if mode == "value":
        loss, clipped = value_terms(logp, old, adv, o["clip"])
        return Terms(loss, {"clipfrac": clipped}, None, valid)
    loss, stats = mode_loss(mode, logp, old, adv, valid, o, selected)
    coef, filtered = None, None
    if is_weights is not None:
        coef = is_weights.detach()
    if correction_ is not None:
        coef, filt, stats["rollout_kl"] = correction(logp, old, rollout_logprobs, valid, correction_)
        if correction_.level == "token":
            stats["is_filtered_frac"] = filt
        else:
            filtered = filt & valid.any(-1)
        if not correction_.apply:
            stats["is_weight_mean"] = coef
            coef = None
    if coef is not None:
        if mode == "geo_mean":  # verl: the geometric mean of the token weights of each sequence
            n = valid.sum(-1, keepdim=True)
            coef = torch.exp(torch.where(valid, torch.log(coef + 1e-10), 0.0).sum(-1, keepdim=True) / (n + EPS))
            coef = coef.expand_as(logp)
        stats["is_weight_mean"] = coef
        loss = loss * coef
    return Terms(loss, stats, filtered, valid)


def policy_loss(logprobs, old_logprobs, advantages, mask, mode="vanilla", agg="token-mean", options=None,
                global_tokens=None, global_seqs=None, loss_scale_factor=None, rollout_logprobs=None,
                correction_: Correction | None = None, is_weights=None, selected=None, cu_seqlens=None):
    """``(loss, stats)``, differentiable w.r.t. ``logprobs``; see :func:`fastrlhf.policy_loss`.

    ``options``: the mode's options, all present (``clip_high`` resolved); ``selected``: the
    tokens clip_cov / kl_cov chose (:func:`clip_cov_selection`, :func:`kl_cov_selection`).
    ``agg="seq-mean-token-sum-norm"`` on packed input needs ``loss_scale_factor``.
    """
    if cu_seqlens is not None:
        padded = [None if x is None else pad(x, cu_seqlens) for x in
                  (logprobs, old_logprobs, advantages, rollout_logprobs, is_weights, selected)]
        return policy_loss(*padded[:3], pad(mask, cu_seqlens), mode, agg, options, global_tokens, global_seqs,
                           loss_scale_factor, padded[3], correction_, padded[4], padded[5])
    t = token_terms(logprobs, old_logprobs, advantages, mask, mode, options, rollout_logprobs, correction_,
                    is_weights, selected)
    acc = t.loss.dtype
    stats = {k: masked_mean(v.to(acc), mask) for k, v in t.stats.items()}
    if t.filtered is not None:
        has = t.valid.any(-1)
        stats["is_filtered_frac"] = aggregate(t.filtered.to(acc).unsqueeze(0), has.unsqueeze(0), "token-mean")
    total = aggregate(t.loss, mask, agg, global_tokens, global_seqs, loss_scale_factor)
    return total, {k: v.detach() for k, v in stats.items()}


def ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip_low=0.2, clip_high=None, dual_clip=None,
                    agg="token-mean", global_tokens=None, global_seqs=None, loss_scale_factor=None,
                    log_ratio_clamp=20.0):
    """``(loss, stats)`` of the clipped (optionally dual-clipped) PPO surrogate: ``mode="vanilla"``."""
    o = {"clip_low": clip_low, "clip_high": clip_low if clip_high is None else clip_high, "dual_clip": dual_clip,
         "log_ratio_clamp": log_ratio_clamp}
    return policy_loss(logprobs, old_logprobs, advantages, mask, "vanilla", agg, o, global_tokens, global_seqs,
                       loss_scale_factor)


def ppo_value_loss(values, old_values, returns, mask, clip=None, agg="token-mean",
                   global_tokens=None, global_seqs=None, loss_scale_factor=None):
    """``(0.5 * agg(max((v - R)**2, (clip(v, old +- clip) - R)**2)), {"vf_clipfrac": ...})``."""
    acc = acc_dtype(values, old_values, returns)
    loss, clipped = value_terms(values.to(acc), old_values.to(acc), returns.to(acc), clip)
    total = aggregate(loss, mask, agg, global_tokens, global_seqs, loss_scale_factor)
    return total, {"vf_clipfrac": masked_mean(clipped.to(acc), mask).detach()}


def value_terms(v, old, ret, clip):
    """Per token: ``(0.5 * max((v - R)**2, (clip(v, old +- clip) - R)**2), clipped)`` (``clip`` None: off)."""
    loss1 = (v - ret).square()
    if clip is None:
        return 0.5 * loss1, torch.zeros_like(loss1, dtype=torch.bool)
    loss2 = (torch.clamp(v, old - clip, old + clip) - ret).square()
    return 0.5 * torch.maximum(loss1, loss2), loss2 > loss1


# ------------------------------------------------------------------- covariance selections
def clip_cov_selection(logprobs, old_logprobs, advantages, mask, clip_low, clip_high, clip_cov_ratio,
                       clip_cov_lb, clip_cov_ub, generator=None) -> torch.Tensor:
    """verl 0.9.1 ``compute_policy_loss_clip_cov``'s selection: bool, the shape of ``mask``.

    Among the valid tokens the PPO clip leaves unclipped, those whose centred covariance
    ``(A - mean A) * (logp - mean logp)`` lies strictly inside ``(clip_cov_lb, clip_cov_ub)``
    are candidates; ``max(int(clip_cov_ratio * n_valid), 1)`` of them are drawn uniformly by
    ``torch.randperm`` (``generator``, else the global CPU generator as in verl) over the
    candidates in row-major order. Reads counts on the host (a sync).
    """
    with torch.no_grad():
        acc = acc_dtype(logprobs, old_logprobs, advantages)
        logp, adv = logprobs.detach().to(acc), advantages.to(acc)
        valid = mask != 0
        n = valid.sum()
        ratio = (logp - old_logprobs.to(acc)).exp()
        loss1 = -adv * ratio
        loss2 = -adv * ratio.clamp(1 - clip_low, 1 + clip_high)
        clip_by_origin = (loss2 > loss1) & valid
        mean_adv = torch.where(valid, adv, 0.0).sum() / (n + EPS)
        mean_logp = torch.where(valid, logp, 0.0).sum() / (n + EPS)
        cov = (adv - mean_adv) * (logp - mean_logp)
        cov = torch.where(valid & ~clip_by_origin, cov, -math.inf)
        clip_num = max(int(clip_cov_ratio * int(n)), 1)
        candidates = torch.nonzero(((cov < clip_cov_ub) & (cov > clip_cov_lb) & valid).reshape(-1)).squeeze(-1)
        chosen = candidates[:0]
        if candidates.numel():
            perm = torch.randperm(candidates.numel(), generator=generator,
                                  device="cpu" if generator is None else generator.device)
            chosen = candidates[perm[:min(clip_num, candidates.numel())].to(candidates.device)]
        selected = torch.zeros(mask.numel(), dtype=torch.bool, device=mask.device)
        selected[chosen] = True
        return selected.view(mask.shape)


def kl_cov_selection(logprobs, advantages, mask, kl_cov_ratio) -> torch.Tensor:
    """verl 0.9.1 ``compute_policy_loss_kl_cov``'s selection: bool, the shape of ``mask``.

    The ``max(1, int(n_valid * kl_cov_ratio))`` valid tokens with the largest centred
    covariance ``(A - mean A) * (logp - mean logp)`` (means over the valid tokens, plain
    means as verl), by ``torch.topk``; none when no token is valid. Reads counts on the host.
    """
    with torch.no_grad():
        acc = acc_dtype(logprobs, advantages)
        valid = (mask != 0).reshape(-1)
        idx = torch.nonzero(valid).squeeze(-1)
        selected = torch.zeros(mask.numel(), dtype=torch.bool, device=mask.device)
        if idx.numel():
            adv = advantages.detach().reshape(-1)[idx].to(acc)
            logp = logprobs.detach().reshape(-1)[idx].to(acc)
            cov = (adv - adv.mean()) * (logp - logp.mean())
            k = max(1, int(idx.numel() * kl_cov_ratio))
            selected[idx[torch.topk(cov, k, largest=True).indices]] = True
        return selected.view(mask.shape)
