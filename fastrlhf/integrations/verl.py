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
"""

from __future__ import annotations

import importlib
import sys
import warnings
from collections.abc import Mapping

import torch

from fastrlhf import _checks
from fastrlhf._numerics import acc_dtype
from fastrlhf.ops.advantages import gae
from fastrlhf.ops.kl import kl_penalty as _kl_penalty
from fastrlhf.ops.logprobs import token_logprobs
from fastrlhf.ops.ppo import aggregate, ppo_policy_loss, ppo_value_loss

__all__ = ["AGG_MODES", "VerlRegistration", "agg_loss", "compute_gae_advantage_return",
           "compute_policy_loss_vanilla", "compute_value_loss", "kl_penalty", "logprobs_from_logits",
           "masked_whiten", "register_with_verl"]

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
def _next_valid(valid: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` int64: the first index ``s >= t`` where ``valid[b, s]``, or ``T`` if none."""
    T = valid.shape[-1]
    pos = torch.where(valid, torch.arange(T, device=valid.device), T)
    return pos.flip(-1).cummin(-1).values.flip(-1) if T else pos


def _at_next_valid(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``x`` at the next valid index (itself where valid), 0 after a row's last valid token."""
    padded = torch.cat([x, x.new_zeros(x.shape[0], 1)], -1)
    return padded.gather(-1, _next_valid(valid))


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
    if isinstance(config, Mapping) or hasattr(config, "get"):
        return config.get(name, default)
    return getattr(config, name, default)


def compute_policy_loss_vanilla(old_log_prob: torch.Tensor, log_prob: torch.Tensor, advantages: torch.Tensor,
                                response_mask: torch.Tensor, loss_agg_mode: str = "token-mean", config=None,
                                rollout_is_weights: torch.Tensor | None = None):
    """verl's ``"vanilla"`` PPO policy loss: clipped surrogate with dual clip, aggregated.

    ``ratio = exp(clamp(log_prob - old_log_prob, +-20))``; clip range
    ``[1 - clip_ratio_low, 1 + clip_ratio_high]`` (each defaulting to ``clip_ratio``) and dual
    clip ``clip_ratio_c`` (default 3.0) from ``config`` (an actor config: attributes or a
    mapping, with ``global_batch_info`` holding ``dp_size``, ``batch_num_tokens``,
    ``global_batch_size``, ``loss_scale_factor`` for :func:`agg_loss`). Per-token
    ``rollout_is_weights`` (>= 0) multiply the per-token loss (folded into the advantages:
    the clipped loss is positively homogeneous in ``A``); a token of weight exactly 0 counts
    as unclipped in the fractions.

    Returns ``(pg_loss, metrics)``: ``pg_loss`` a 0-dim fp32 tensor with a gradient w.r.t.
    ``log_prob``; ``metrics`` Python floats ``actor/pg_clipfrac``, ``actor/ppo_kl`` (masked
    mean of the negated clamped log-ratio), ``actor/pg_clipfrac_lower`` (read with
    ``.item()``, as verl does). Runs :func:`fastrlhf.ppo_policy_loss`.
    """
    if config is None:
        raise ValueError("config is required: an actor config with clip_ratio (verl's ActorConfig)")
    clip = _cfg(config, "clip_ratio", 0.2)
    low = _cfg(config, "clip_ratio_low")
    high = _cfg(config, "clip_ratio_high")
    low = clip if low is None else low
    high = clip if high is None else high
    dual = _cfg(config, "clip_ratio_c", 3.0)
    info = dict(_cfg(config, "global_batch_info") or {})
    if rollout_is_weights is not None:
        _checks.tensor("rollout_is_weights", rollout_is_weights, _checks.FLOAT_DTYPES)
        _checks.same_shape("rollout_is_weights", rollout_is_weights, advantages.shape, "advantages.shape")
        advantages = advantages * rollout_is_weights
    mode, counts, factor = _agg_plan(loss_agg_mode, log_prob.shape[-1], info.get("dp_size", 1),
                                     info.get("batch_num_tokens"), info.get("global_batch_size"),
                                     info.get("loss_scale_factor"))
    loss, stats = ppo_policy_loss(log_prob, old_log_prob, advantages, response_mask, clip_low=low,
                                  clip_high=high, dual_clip=dual, agg=mode, log_ratio_clamp=20.0, **counts)
    metrics = {"actor/pg_clipfrac": stats["clipfrac"].item(), "actor/ppo_kl": stats["approx_kl"].item(),
               "actor/pg_clipfrac_lower": stats["clipfrac_lower"].item()}
    return loss * factor, metrics


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
_OVERRIDES = {
    _CORE: {"compute_gae_advantage_return": compute_gae_advantage_return,
            "compute_policy_loss_vanilla": compute_policy_loss_vanilla,
            "compute_value_loss": compute_value_loss, "kl_penalty": kl_penalty, "agg_loss": agg_loss},
    _TORCH_FUNCTIONAL: {"logprobs_from_logits": logprobs_from_logits, "masked_whiten": masked_whiten},
}


class VerlRegistration:
    """What :func:`register_with_verl` changed; :meth:`undo` restores verl (also on leaving a
    ``with`` block)."""

    def __init__(self):
        self.entries = []  # (registry dict, key, had key, old value)
        self.swaps = []  # (verl's function, fastrlhf's function)

    def set_entry(self, registry: dict, key: str, fn) -> None:
        self.entries.append((registry, key, key in registry, registry.get(key)))
        registry[key] = fn

    def swap(self, old, new) -> None:
        self.swaps.append((old, new))
        _rebind(old, new)

    def undo(self) -> None:
        for old, new in reversed(self.swaps):
            _rebind(new, old)
        for registry, key, had, old in reversed(self.entries):
            if had:
                registry[key] = old
            else:
                registry.pop(key, None)
        self.entries, self.swaps = [], []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.undo()


def _rebind(old, new) -> None:
    """Rebind every module-level name in loaded ``verl`` modules that is ``old`` to ``new``."""
    for name, module in list(sys.modules.items()):
        if module is None or not (name == "verl" or name.startswith("verl.")):
            continue
        for attr, value in list(vars(module).items()):
            if value is old:
                setattr(module, attr, new)


def register_with_verl(*, override: bool = False) -> VerlRegistration | None:
    """Register fastrlhf's functions in an installed verl; a no-op with a warning without verl.

    Always: the policy loss ``"fastrlhf_vanilla"`` (:func:`compute_policy_loss_vanilla`) in
    verl's policy-loss registry, selected with ``actor.policy_loss.loss_mode=fastrlhf_vanilla``.

    ``override=True`` also replaces verl's own: the ``"vanilla"`` policy loss and the ``"gae"``
    advantage estimator in the registries, and, in every loaded ``verl`` module, the names
    ``compute_gae_advantage_return``, ``compute_policy_loss_vanilla``, ``compute_value_loss``,
    ``kl_penalty``, ``agg_loss`` (``core_algos``), ``logprobs_from_logits`` and ``masked_whiten``
    (``torch_functional``). verl's trainer calls GAE by module attribute, not through the
    registry (the registry's estimators receive no values), hence the module swap. Call it
    before verl's workers import these names (or in each worker process).

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
    reg.set_entry(core.POLICY_LOSS_REGISTRY, "fastrlhf_vanilla", compute_policy_loss_vanilla)
    if override:
        reg.set_entry(core.POLICY_LOSS_REGISTRY, "vanilla", compute_policy_loss_vanilla)
        reg.set_entry(core.ADV_ESTIMATOR_REGISTRY, "gae", compute_gae_advantage_return)
        for module_name, names in _OVERRIDES.items():
            module = sys.modules[module_name]
            for name, fn in names.items():
                old = getattr(module, name, None)
                if old is not None and old is not fn:
                    reg.swap(old, fn)
    return reg
