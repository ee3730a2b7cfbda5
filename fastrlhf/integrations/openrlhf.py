"""Drop-in replacements for OpenRLHF's log-prob, KL, reward, advantage and PPO-loss code, and
:func:`patch_openrlhf`.

Each keeps the signature and semantics of OpenRLHF 0.11.2 (``openrlhf/models/utils.py``,
``openrlhf/models/loss.py``, ``RemoteExperienceMaker.get_advantages_and_returns`` /
``get_cumulative_returns`` in ``openrlhf/trainer/ppo_utils/experience_maker.py``) and runs on
fastrlhf ops. The backend follows :func:`fastrlhf.use_backend` / ``FASTRLHF_BACKEND``
(``auto`` by default). ``patch_openrlhf()`` swaps them into the loaded OpenRLHF modules.

Differences from OpenRLHF, all deliberate:

* Outputs are fp32 (fp64 for fp64 inputs, where OpenRLHF's KL rounds to fp32).
* No NaN on valid input: an all-masked batch gives loss 0 and statistics 0 (OpenRLHF
  divides 0 by 0).
* Masks are binary: a token counts where ``mask != 0`` (OpenRLHF multiplies by the mask).
* Advantages and returns carry no gradient (OpenRLHF's returns keep the values' graph;
  it computes them under ``no_grad``).
* ``compute_approx_kl``'s k3 is accurate to a few ulps near a log-ratio of 0, where
  OpenRLHF's ``exp(-x) - 1 + x`` cancels (in fp32 its relative error is 1e-4 at a log-ratio of
  0.01, a few % at 0.001, and its result is noise below 1e-4).
* ``log_probs_from_logits`` does not divide the logits in place by the temperature.
* ``PolicyLoss`` raises ``ValueError`` where OpenRLHF asserts (``dual_clip <= 1``).
"""

from __future__ import annotations

import os
import sys
import types

import torch

from fastrlhf import _checks
from fastrlhf.integrations.common import (
    NO_IGNORE_INDEX,
    entropy,
    gather_or_zero,
    next_valid,
)
from fastrlhf.integrations.patching import Patch, PatchSlot, in_package
from fastrlhf.ops.advantages import discounted_returns, gae
from fastrlhf.ops.aggregation import aggregate
from fastrlhf.ops.kl import kl_penalized_rewards
from fastrlhf.ops.kl import kl_penalty as _kl_penalty
from fastrlhf.ops.logprobs import token_logprobs
from fastrlhf.ops.policy_loss import RolloutCorrection, policy_loss, ppo_value_loss

__all__ = ["KL_IS_WEIGHT_CLIP", "OpenRLHFPatch", "PolicyLoss", "ValueLoss", "aggregate_loss", "compute_approx_kl",
           "compute_entropy", "compute_reward", "get_advantages_and_returns", "get_cumulative_returns",
           "log_probs_from_logits", "patch_openrlhf"]

KL_IS_WEIGHT_CLIP = 10.0
"""Upper bound of the importance weight of ``compute_approx_kl(..., unbiased_gradient=True)``."""


def log_probs_from_logits(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """OpenRLHF's ``log_probs_from_logits``: ``log_softmax(logits / temperature).gather(labels)``.

    ``logits`` ``[..., V]`` any float dtype (read in place, never copied to fp32), ``labels``
    ``logits.shape[:-1]``. Returns fp32 (fp64 for fp64 logits), differentiable w.r.t. ``logits``.
    Unlike OpenRLHF, the logits are not divided in place. Runs :func:`fastrlhf.token_logprobs`.
    """
    return token_logprobs(logits, labels.long(), temperature=float(temperature), ignore_index=NO_IGNORE_INDEX)


def compute_entropy(logits: torch.Tensor) -> torch.Tensor:
    """OpenRLHF's ``compute_entropy``: the entropy of ``softmax(logits)`` over the last dim, fp32
    (fp64 for fp64 logits), differentiable, in one streaming pass (:func:`fastrlhf.token_logprobs`)."""
    return entropy(logits)


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


def _carry_back(x: torch.Tensor, valid: torch.Tensor, rate, extra=None) -> torch.Tensor:
    """At a masked ``t`` before the next valid token ``s`` (recurrences whose masked steps add 0):
    ``rate**(s - t - 1) * extra_s`` (``extra`` defaults to ``rate * x_s``); 0 after a row's last
    valid token; ``x`` where valid."""
    nxt = next_valid(valid)
    steps = (nxt - torch.arange(valid.shape[-1], device=valid.device)).clamp(min=1) - 1
    nxt_x = gather_or_zero(x, nxt) if extra is None else extra
    carried = rate ** steps.to(x.dtype) * (rate * nxt_x if extra is None else nxt_x)
    return torch.where(valid, x, carried)


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
    nxt = next_valid(valid)
    v_next = gather_or_zero(torch.where(valid, values.detach().to(adv.dtype), 0.0), nxt)
    a_next = gather_or_zero(adv, nxt)
    gl = gamma * lambd
    extra = gamma * v_next + gl * a_next
    return _carry_back(adv, valid, gl, extra), _carry_back(ret, valid, gl, extra)


def get_cumulative_returns(rewards: torch.Tensor, action_mask: torch.Tensor | None, gamma: float) -> torch.Tensor:
    """OpenRLHF's REINFORCE returns (``RemoteExperienceMaker.get_cumulative_returns``):
    ``G_t = r_t + gamma G_{t+1}`` over every position, rewards zeroed where ``action_mask`` is 0
    (masked steps count, as in OpenRLHF). A masked position holds the recurrence's value there
    (0 after a row's last valid token). ``action_mask=None``: every token valid. Returns fp32
    (fp64 for fp64 rewards) ``[B, T]``, no gradient. Runs :func:`fastrlhf.discounted_returns`.
    """
    if action_mask is None:
        action_mask = torch.ones(rewards.shape, dtype=torch.bool, device=rewards.device)
    if not rewards.is_floating_point():
        rewards = rewards.float()
    returns = discounted_returns(rewards, action_mask, gamma=float(gamma), holes="zero")
    return _carry_back(returns, action_mask != 0, float(gamma))


def _aggregation(token_level_loss: bool, dp_size, batch_num_tokens, global_batch_size):
    """``(fastrlhf mode, count keywords, factor)`` of OpenRLHF's ``aggregate_loss``."""
    if token_level_loss:
        return "token-mean", {"global_tokens": batch_num_tokens}, 1 if batch_num_tokens is None else dp_size
    return "seq-mean-token-mean", {"global_seqs": global_batch_size}, 1 if global_batch_size is None else dp_size


def _mask(action_mask, like: torch.Tensor) -> torch.Tensor:
    return torch.ones(like.shape, dtype=torch.bool, device=like.device) if action_mask is None else action_mask


def aggregate_loss(loss: torch.Tensor, loss_mask: torch.Tensor, token_level_loss: bool = True, dp_size: int = 1,
                   batch_num_tokens=None, global_batch_size=None) -> torch.Tensor:
    """OpenRLHF's ``aggregate_loss``: a per-token loss ``[B, T]`` reduced to a scalar.

    ``token_level_loss=True``: the sum over valid tokens / ``batch_num_tokens`` (default: the
    local valid tokens) * ``dp_size``; ``False``: the sum of the per-sequence token means over
    the sequences with a valid token / ``global_batch_size`` (default: their local count) *
    ``dp_size``. ``dp_size`` applies only with a global count, as in OpenRLHF. Counts may be
    numbers or 0-dim tensors (fractional, e.g. divided by the gradient-accumulation steps).
    Runs :func:`fastrlhf.aggregate`; returns a differentiable 0-dim fp32 tensor.
    """
    mode, counts, factor = _aggregation(token_level_loss, dp_size, batch_num_tokens, global_batch_size)
    return aggregate(loss, _mask(loss_mask, loss), mode, **counts) * factor


_LEVELS = ("off", "token", "seq")


class PolicyLoss(torch.nn.Module):
    """OpenRLHF 0.11.2's ``PolicyLoss``, every option: PPO and GSPO, dual clip, token or
    sequence aggregation with global counts, and the train/rollout importance-sampling correction.

    ``policy_loss_type="ppo"``: ``max(-A r, -A clip(r, 1 - clip_eps_low, 1 + clip_eps_high))`` per
    token, ``r = exp(clamp(log_probs - old_log_probs, +-20))``, with ``dual_clip = c > 1``
    ``min(., -A c)`` where ``A < 0`` (:func:`fastrlhf.policy_loss` ``mode="vanilla"``). With
    ``is_correction_level`` ``"token"`` / ``"seq"`` each token's loss is multiplied by the
    correction of ``old_log_probs - rollout_log_probs`` (``RolloutCorrection.openrlhf``: ``mode``
    ``"mask"`` (IcePop / sequence masking, survivors weighted by their token ratio) or ``"clip"``
    (TIS), ``gating`` ``"ratio"``, ``"binary_kl"`` or ``"tv"`` (a trust region: threshold
    ``(0, delta)``), in the loss kernels).

    ``policy_loss_type="gspo"``: one ratio per sequence, ``exp`` of the mean log-ratio over its
    valid tokens (against the rollout log-probs when the correction is on), clipped as above,
    the gradient through the sequence mean; aggregated per sequence (OpenRLHF forces
    ``token_level_loss=False``).

    ``forward(log_probs, old_log_probs, advantages, action_mask=None, rollout_log_probs=None,
    dp_size=1, batch_num_tokens=None, global_batch_size=None)`` returns OpenRLHF's
    ``(loss, clip_ratio, ppo_kl, vllm_kl, is_filter_ratio)``: ``ppo_kl`` the masked mean of
    ``old - log_probs`` (unclamped, against the real old log-probs); ``vllm_kl`` the masked mean of
    ``rollout - old`` and ``is_filter_ratio`` the filtered fraction (tokens; at ``"seq"`` level
    the rows whose statistic is outside the band, fully masked rows counted as filtered, over
    all rows, as OpenRLHF) for PPO with the correction on, else ``None``.
    Options are checked as OpenRLHF does (``ValueError``).
    """

    def __init__(self, clip_eps_low: float = 0.2, clip_eps_high: float = 0.2, dual_clip: float | None = None,
                 token_level_loss: bool = True, policy_loss_type: str = "ppo", is_correction_level: str = "off",
                 is_correction_mode: str = "mask", is_correction_gating: str = "ratio",
                 is_correction_threshold=(0.5, 5.0)) -> None:
        super().__init__()
        if policy_loss_type not in ("ppo", "gspo"):
            raise ValueError(f"Invalid policy loss type: {policy_loss_type!r}; expected 'ppo' or 'gspo'")
        if dual_clip is not None and not dual_clip > 1.0:
            raise ValueError(f"dual_clip must be > 1.0, got {dual_clip}")
        if is_correction_level not in _LEVELS:
            raise ValueError(f"is_correction_level must be off/token/seq, got {is_correction_level}")
        if is_correction_mode not in ("mask", "clip"):
            raise ValueError(f"is_correction_mode must be mask/clip, got {is_correction_mode}")
        if is_correction_gating not in ("ratio", "binary_kl", "tv"):
            raise ValueError(f"is_correction_gating must be ratio/binary_kl/tv, got {is_correction_gating}")
        if is_correction_mode == "clip" and (is_correction_level == "seq" or is_correction_gating != "ratio"):
            raise ValueError("is_correction_mode=clip requires is_correction_level=token and "
                             "is_correction_gating=ratio")
        if is_correction_gating != "ratio" and is_correction_level != "off" and is_correction_threshold[0] > 0:
            raise ValueError(f"is_correction_gating={is_correction_gating} takes an upper bound only (a single delta)")
        self.clip_eps_low = clip_eps_low
        self.clip_eps_high = clip_eps_high
        self.dual_clip = dual_clip
        self.token_level_loss = token_level_loss if policy_loss_type == "ppo" else False
        self.policy_loss_type = policy_loss_type
        self.is_correction_level = is_correction_level
        self.is_correction_mode = is_correction_mode
        self.is_correction_gating = is_correction_gating
        self.is_correction_threshold = is_correction_threshold
        self.correction = None
        if is_correction_level != "off" and policy_loss_type == "ppo":
            low, high = is_correction_threshold
            self.correction = RolloutCorrection.openrlhf(is_correction_level, is_correction_mode, is_correction_gating,
                                                         (float(low), float(high)))

    def forward(self, log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor,
                action_mask: torch.Tensor | None = None, rollout_log_probs: torch.Tensor | None = None,
                dp_size: int = 1, batch_num_tokens=None, global_batch_size=None):
        mask = _mask(action_mask, log_probs)
        corrected = self.is_correction_level != "off"
        if corrected and rollout_log_probs is None:
            raise ValueError(f"is_correction_level={self.is_correction_level!r} needs rollout_log_probs")
        mode, counts, factor = _aggregation(self.token_level_loss, dp_size, batch_num_tokens, global_batch_size)
        clip = {"clip_low": self.clip_eps_low, "clip_high": self.clip_eps_high, "dual_clip": self.dual_clip}
        if self.policy_loss_type == "gspo":
            old = rollout_log_probs if corrected else old_log_probs
            loss, stats = policy_loss(log_probs, old, advantages, mask, mode="gspo", agg=mode, gradient="sequence",
                                      log_ratio_clamp=None, **clip, **counts)
        elif self.correction is not None:
            loss, stats = policy_loss(log_probs, old_log_probs, advantages, mask, mode="vanilla", agg=mode,
                                      rollout_logprobs=rollout_log_probs, rollout_correction=self.correction,
                                      log_ratio_clamp=20.0, **clip, **counts)
        else:
            loss, stats = policy_loss(log_probs, old_log_probs, advantages, mask, mode="vanilla", agg=mode,
                                      log_ratio_clamp=20.0, **clip, **counts)
        ppo_kl = aggregate(old_log_probs.detach().float() - log_probs.detach().float(), mask, "token-mean")
        vllm_kl = filtered = None
        if self.correction is not None:
            vllm_kl = stats["rollout_kl"]
            filtered = stats["is_filtered_frac"]
            if self.is_correction_level == "seq":  # OpenRLHF: over all rows, a row with no valid token filtered
                has_valid = (mask != 0).any(-1)
                rows, n_valid = has_valid.numel(), has_valid.sum()
                filtered = (filtered * n_valid + (rows - n_valid)) / max(rows, 1)
        return loss * factor, stats["clipfrac"], ppo_kl, vllm_kl, filtered


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


# ---------------------------------------------------------------------------- patching
_FUNCTIONS = {"compute_approx_kl": compute_approx_kl, "compute_reward": compute_reward,
              "aggregate_loss": aggregate_loss, "PolicyLoss": PolicyLoss, "ValueLoss": ValueLoss,
              "log_probs_from_logits": log_probs_from_logits, "compute_entropy": compute_entropy}
"""OpenRLHF's name -> the drop-in bound under it."""


def _maker_get_advantages_and_returns(self, values, rewards, action_mask, gamma, lambd):
    return get_advantages_and_returns(values, rewards, action_mask, gamma, lambd)


def _maker_get_cumulative_returns(self, rewards, action_mask, gamma):
    return get_cumulative_returns(rewards, action_mask, gamma)


_METHODS = {"RemoteExperienceMaker": {"get_advantages_and_returns": _maker_get_advantages_and_returns,
                                      "get_cumulative_returns": _maker_get_cumulative_returns}}
"""OpenRLHF's class name -> its methods replaced in place."""


def _is_openrlhf_file(path) -> bool:
    """A source file inside an ``openrlhf`` package directory (also when the module was loaded
    from that file under another name, as OpenRLHF's own tests do)."""
    if not path:
        return False
    parts = os.path.normpath(os.path.abspath(path)).split(os.sep)
    return any(part == "openrlhf" and os.path.isfile(os.path.join(os.sep.join(parts[:i + 1]) or os.sep, "__init__.py"))
               for i, part in enumerate(parts[:-1]))


def _is_openrlhf_module(name: str, module) -> bool:
    if module is None or not isinstance(module, types.ModuleType):
        return False
    return in_package(name, "openrlhf") or _is_openrlhf_file(getattr(module, "__file__", None))


def _defined_in_openrlhf(obj) -> bool:
    """A function or class whose code is in an OpenRLHF source file."""
    if isinstance(obj, type):
        codes = [getattr(v, "__code__", None) for v in vars(obj).values()]
        return any(c is not None and _is_openrlhf_file(c.co_filename) for c in codes)
    for _ in range(4):  # through torch.compile's and functools' wrappers (compute_entropy is compiled)
        inner = getattr(obj, "_torchdynamo_orig_callable", None) or getattr(obj, "__wrapped__", None)
        if inner is None:
            break
        obj = inner
    code = getattr(obj, "__code__", None)
    return code is not None and _is_openrlhf_file(code.co_filename)


_slot = PatchSlot()


class OpenRLHFPatch(Patch):
    """What :func:`patch_openrlhf` changed; :meth:`undo` restores OpenRLHF (also on leaving a
    ``with`` block). ``swaps`` lists ``(where, name)`` of every replaced binding."""

    def __init__(self):
        super().__init__()
        self._originals = {}  # id(OpenRLHF's object) -> its drop-in
        self._seen = {}  # id -> the modules and classes already patched (held: ids are not reused)

    @property
    def swaps(self) -> list[tuple[str, str]]:
        return [(getattr(c.target, "__name__", repr(c.target)), c.key) for c in self.changes if c.kind == "attr"]

    def _patch_openrlhf_module(self, module) -> None:
        for name, new in _FUNCTIONS.items():
            old = vars(module).get(name)
            if old is None or old is new or not _defined_in_openrlhf(old):
                continue
            self._originals[id(old)] = new
            self.set_attr(module, name, new)
        for cls_name, methods in _METHODS.items():
            cls = vars(module).get(cls_name)
            if isinstance(cls, type) and _defined_in_openrlhf(cls) and id(cls) not in self._seen:
                self._seen[id(cls)] = cls
                for name, new in methods.items():
                    if name in vars(cls):
                        self.set_attr(cls, name, new)

    def _patch_other_module(self, module) -> None:
        for name, value in list(vars(module).items()):
            new = self._originals.get(id(value))
            if new is not None and value is not new:
                self.set_attr(module, name, new)

    def extend(self, *modules) -> OpenRLHFPatch:
        """Patch OpenRLHF modules loaded since, and ``modules`` (see :func:`patch_openrlhf`)."""
        found = [m for name, m in list(sys.modules.items()) if _is_openrlhf_module(name, m)]
        found += [m for m in modules if _is_openrlhf_module(getattr(m, "__name__", ""), m)]
        for module in found:
            if id(module) not in self._seen:
                self._seen[id(module)] = module
                self._patch_openrlhf_module(module)
        for module in modules:
            if not _is_openrlhf_module(getattr(module, "__name__", ""), module):
                self._patch_other_module(module)
        return self

    def undo(self) -> None:
        """Put every replaced binding back. Calling it twice is harmless."""
        super().undo()
        self._originals, self._seen = {}, {}


def patch_openrlhf(*modules) -> OpenRLHFPatch:
    """Swap fastrlhf's drop-ins into the loaded OpenRLHF modules.

    In every loaded module named ``openrlhf.*`` (or loaded from a file of an ``openrlhf``
    package under another name), the names ``compute_approx_kl``, ``compute_reward``,
    ``log_probs_from_logits``, ``compute_entropy`` (``models/utils.py`` and the modules that
    imported them, e.g. the experience maker and the PPO actor), ``aggregate_loss``,
    ``PolicyLoss`` and ``ValueLoss`` (``models/loss.py``, ``openrlhf.models``, the PPO actor and
    critic) are rebound to this module's, and ``RemoteExperienceMaker.get_advantages_and_returns``
    / ``get_cumulative_returns`` (GAE and REINFORCE returns) are replaced in the class. Call it
    after importing OpenRLHF and before its trainer builds its losses (in each Ray worker: e.g.
    at the top of the script that launches them, and in the actor / critic processes).

    ``modules``: more modules to patch: OpenRLHF modules loaded outside ``sys.modules``, and
    modules of your own that imported OpenRLHF's names before the call (their names bound to an
    OpenRLHF object that was swapped are rebound too). Calling it again while a patch is active
    extends that patch (to OpenRLHF modules loaded since and to ``modules``) and returns it.

    Returns an :class:`OpenRLHFPatch`; ``.undo()`` (or leaving its ``with`` block) restores OpenRLHF.

    >>> from fastrlhf.integrations.openrlhf import patch_openrlhf
    >>> patch_openrlhf()
    """
    return _slot.get_or_make(OpenRLHFPatch).extend(*modules)
