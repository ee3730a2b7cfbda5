"""The spec of a policy loss: its modes, each mode's options and statistics, the rollout
correction, and the one encoding of all of it at the custom-op boundary.

A call of :func:`fastrlhf.policy_loss` is checked here (:func:`resolve_options`), encoded once
into the op's arguments (:func:`encode`: a kernel mode name, the aggregation, a correction
string and a float vector; ``torch.library`` ops take no objects) and decoded once on the other
side (:func:`decode` -> :class:`LossSpec`, which the launchers read). The kernels' integer
numbering of modes and corrections lives with the launchers (``fastrlhf.triton.policy_loss``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from fastrlhf import _checks
from fastrlhf.reference import policy_loss as ref

__all__ = ["POLICY_LOSS_MODES", "REQUIRED", "KernelArgs", "LossSpec", "RolloutCorrection", "decode", "encode",
           "kernel_mode", "needs_table", "policy_loss_options", "resolve_options", "stats_of"]

POLICY_LOSS_MODES = ref.MODES
"""The modes of :func:`policy_loss`: verl 0.9.1's policy-loss registry."""



class _Required:
    def __repr__(self):
        return "REQUIRED"


REQUIRED = _Required()
"""The default of an option a mode cannot do without (:func:`policy_loss_options`)."""
_PPO = {"clip_low": 0.2, "clip_high": None}
_OPTIONS = {
    "vanilla": {**_PPO, "dual_clip": None, "log_ratio_clamp": 20.0},
    "dppo_tv": {**_PPO, "ratio_cap": 20.0, "log_ratio_clamp": 20.0},
    "dppo_kl": {**_PPO, "ratio_cap": 20.0, "log_ratio_clamp": 20.0},
    "gspo": {**_PPO, "dual_clip": None, "log_ratio_clamp": 10.0, "gradient": "token"},
    "sapo": {"tau_pos": 1.0, "tau_neg": 1.05, "log_ratio_clamp": 20.0},
    "gpg": {},
    "clip_cov": {**_PPO, "clip_cov_ratio": 0.0002, "clip_cov_lb": 1.0, "clip_cov_ub": 5.0, "generator": None},
    "kl_cov": {"kl_cov_ratio": 0.0002, "ppo_kl_coef": 0.1},
    "geo_mean": dict(_PPO),
    "dro": {"dro_beta": REQUIRED},
    "cispo": {**_PPO, "log_ratio_clamp": 20.0},
    "bypass_mode": {"loss_type": "ppo_clip", **_PPO, "dual_clip": None, "log_ratio_clamp": 20.0},
}
"""Each mode's options and defaults (verl 0.9.1's ``ActorConfig`` / ``PolicyLossConfig`` defaults,
except ``dual_clip``: off unless asked for; verl's ``clip_ratio_c`` is 3.0)."""

_STATS = {
    "vanilla": ("clipfrac", "clipfrac_lower", "approx_kl"),
    "dppo_tv": ("clipfrac", "clipfrac_lower", "approx_kl"),
    "dppo_kl": ("clipfrac", "clipfrac_lower", "approx_kl"),
    "gspo": ("clipfrac", "clipfrac_lower", "approx_kl"),
    "sapo": ("approx_kl",),
    "gpg": ("approx_kl",),
    "clip_cov": ("clipfrac", "approx_kl"),
    "kl_cov": ("clipfrac", "approx_kl", "abs_kl"),
    "geo_mean": ("clipfrac", "clipfrac_lower", "approx_kl"),
    "dro": ("approx_kl",),
    "cispo": ("clipfrac", "approx_kl"),
    "value": ("clipfrac",),
}
_PARAMS = ("clip_low", "clip_high", "dual_clip", "log_ratio_clamp", "ratio_cap", "tau_pos", "tau_neg",
           "ppo_kl_coef", "dro_beta", "clip", "is_low", "is_high", "is_log_ratio_clamp")
"""The float options in the op's ``params`` vector (``inf`` for None)."""
_NONE_IS_INF = ("dual_clip", "log_ratio_clamp", "clip", "is_log_ratio_clamp")


# ----------------------------------------------------------------------- rollout correction
@dataclass(frozen=True)
class RolloutCorrection:
    """Importance correction for the mismatch between the rollout engine's and the trainer's
    log-probs: each token's loss is multiplied by a detached coefficient ``c``.

    The ratio of a token is ``rho = exp(clamp(old - rollout, +-log_ratio_clamp))`` (verl's
    decoupled mode, OpenRLHF; in ``mode="bypass_mode"``, where ``old`` is the rollout,
    ``exp(clamp(logprobs.detach() - old, ...))``). A statistic ``g`` is gated per *unit*:

    * ``level="token"``: ``g = rho`` (or, with ``stat``, a divergence of the token);
    * ``level="sequence"``: ``g = exp(clamp(sum of the sequence's log-ratios, +-clamp))``, the
      product of its ratios (verl ``rollout_is="sequence"``); ratio only;
    * ``level="sequence-mean"``: the mean over the sequence's valid tokens: of the log-ratio,
      then ``exp`` (the geometric mean ratio; OpenRLHF ``is_correction_level="seq"``), or of a
      divergence.

    ``stat``: ``"ratio"``, or OpenRLHF's gates on the sampled token's probabilities ``p``
    (rollout) and ``q`` (trainer), each clamped to ``[1e-6, 1 - 1e-6]``: ``"binary_kl"``
    ``p log(p/q) + (1-p) log((1-p)/(1-q))`` or ``"tv"`` ``|p - q|``.

    ``mode`` (``bounds`` = ``high``, or ``(low, high)``):

    * ``"truncate"``: ``c = min(g, high)`` (verl TIS; an upper bound only);
    * ``"clamp"``: ``c = clamp(g, low, high)`` (OpenRLHF ``is_correction_mode="clip"``);
    * ``"mask"``: ``c = weight`` where ``low <= g <= high``, else 0 (verl IcePop, OpenRLHF
      ``"mask"``); ``weight = g`` for a ratio at ``token`` / ``sequence`` level, else the token's
      own ratio ``rho`` (a sequence mean or a divergence is a gate, not a weight). Without
      ``low`` there is no lower bound.

    ``truncate`` and ``clamp`` need ``stat="ratio"``. Statistics: ``is_weight_mean`` (mean of
    ``c`` over the valid tokens), ``is_filtered_frac`` (units whose ``g`` is outside the bounds:
    tokens, or sequences with a valid token), ``rollout_kl`` (mean of ``rollout - old``, OpenRLHF's
    ``vllm_kl``, verl's ``rollout_corr/kl``). See :meth:`verl` and :meth:`openrlhf` for the peers'
    settings.
    """

    level: str = "token"
    mode: str = "truncate"
    bounds: float | tuple = 2.0
    stat: str = "ratio"
    log_ratio_clamp: float | None = 20.0

    def __post_init__(self):
        _checks.choice("level", self.level, ref.IS_LEVELS)
        _checks.choice("mode", self.mode, ref.IS_MODES)
        _checks.choice("stat", self.stat, ref.IS_STATS)
        _checks.optional_positive("log_ratio_clamp", self.log_ratio_clamp)
        if self.stat != "ratio" and self.level == "sequence":
            raise ValueError(f"stat={self.stat!r} is gated per token or by its mean over a sequence "
                             "(level='token' or 'sequence-mean'), not level='sequence'")
        if self.stat != "ratio" and self.mode != "mask":
            raise ValueError(f"mode={self.mode!r} makes the statistic the weight: it needs stat='ratio' "
                             f"(got {self.stat!r}; a divergence can only mask)")
        low, _ = self._bounds()
        if self.mode == "truncate" and low != -math.inf:
            raise ValueError(f"mode='truncate' takes an upper bound only, got bounds={self.bounds!r}")
        if self.mode == "clamp" and low == -math.inf:
            raise ValueError(f"mode='clamp' needs bounds=(low, high), got {self.bounds!r}")

    def _bounds(self) -> tuple[float, float]:
        b = self.bounds
        if isinstance(b, (tuple, list)):
            if len(b) != 2:
                raise ValueError(f"bounds must be high or (low, high), got {b!r}")
            low, high = _checks.number("bounds[0]", b[0]), _checks.positive("bounds[1]", b[1])
            if low > high:
                raise ValueError(f"bounds must be in order (low <= high), got {tuple(b)}")
            return low, high
        return -math.inf, _checks.positive("bounds", b)

    @property
    def low(self) -> float:
        return self._bounds()[0]

    @property
    def high(self) -> float:
        return self._bounds()[1]

    @classmethod
    def verl(cls, rollout_is: str, rollout_is_threshold: float | str = 2.0) -> RolloutCorrection:
        """verl 0.9.1's ``rollout_is`` / ``rollout_is_threshold`` (``rollout_corr_helper.py``):
        ``"token"`` or ``"sequence"``; a number (or number string) is TIS's upper bound, a
        ``"low_high"`` string IcePop's band (both > 0); log-ratios clamped to +-20 (verl's
        ``SAFETY_BOUND``). verl's ``rollout_is_batch_normalize`` is not covered."""
        if rollout_is not in ("token", "sequence"):
            raise ValueError(f"rollout_is must be 'token' or 'sequence', got {rollout_is!r}")
        spec = rollout_is_threshold
        if isinstance(spec, bool) or not isinstance(spec, (int, float, str)):
            raise TypeError(f"rollout_is_threshold must be a number or a 'low_high' string, got {spec!r}")
        if isinstance(spec, str) and "_" in spec:
            low, _, high = spec.partition("_")
            try:
                bounds = (float(low), float(high))
            except ValueError:
                raise ValueError(f"invalid rollout_is_threshold {spec!r}") from None
            if bounds[0] <= 0:
                raise ValueError(f"rollout_is_threshold's lower bound must be > 0, got {spec!r}")
            return cls(rollout_is, "mask", bounds, "ratio", 20.0)
        try:
            high = float(spec)
        except ValueError:
            raise ValueError(f"invalid rollout_is_threshold {spec!r}") from None
        return cls(rollout_is, "truncate", high, "ratio", 20.0)

    @classmethod
    def openrlhf(cls, is_correction_level: str, is_correction_mode: str = "mask",
                 is_correction_gating: str = "ratio", is_correction_threshold=(0.5, 5.0)) -> RolloutCorrection:
        """OpenRLHF 0.11.2 ``PolicyLoss``'s correction options: level ``"token"`` / ``"seq"``
        (the per-sequence mean), mode ``"mask"`` / ``"clip"``, gating ``"ratio"`` /
        ``"binary_kl"`` / ``"tv"``, threshold ``(low, high)``; ratios unclamped, as OpenRLHF."""
        levels = {"token": "token", "seq": "sequence-mean"}
        modes = {"mask": "mask", "clip": "clamp"}
        if is_correction_level not in levels:
            raise ValueError(f"is_correction_level must be 'token' or 'seq', got {is_correction_level!r}")
        if is_correction_mode not in modes:
            raise ValueError(f"is_correction_mode must be 'mask' or 'clip', got {is_correction_mode!r}")
        if modes[is_correction_mode] == "clamp" and is_correction_level != "token":
            raise ValueError("is_correction_mode='clip' requires is_correction_level='token'")
        return cls(levels[is_correction_level], modes[is_correction_mode], tuple(is_correction_threshold),
                   is_correction_gating, None)


# ------------------------------------------------------------------------- the op's spec
class KernelArgs(NamedTuple):
    """The kernels' float arguments (an option that is off is ``inf``)."""

    lo: float
    hi: float
    dual_clip: float
    lrc: float
    p0: float
    p1: float
    is_low: float
    is_high: float
    is_clamp: float


class LossSpec(NamedTuple):
    """What one call computes, as the launchers read it."""

    mode: str  # a kernel mode: a public mode, "gspo_seq" (GSPO, sequence gradient) or "value"
    agg: str
    is_level: str | None
    is_mode: str
    is_stat: str
    is_source: str  # "rollout" or "current"
    is_apply: bool
    kernel: KernelArgs
    options: dict | None = None  # the float options by name (None where off), for the torch backend


def _kernel_args(mode: str, o: dict) -> KernelArgs:
    inf = math.inf
    lo = hi = 0.0
    if mode in ("vanilla", "gspo", "gspo_seq", "clip_cov", "cispo"):
        lo, hi = 1.0 - o["clip_low"], 1.0 + o["clip_high"]
    elif mode in ("dppo_tv", "dppo_kl"):
        lo, hi = o["clip_low"], o["clip_high"]
    elif mode == "geo_mean":
        lo, hi = -o["clip_low"], o["clip_high"]
    p0 = {"dppo_tv": "ratio_cap", "dppo_kl": "ratio_cap", "sapo": "tau_pos", "kl_cov": "ppo_kl_coef",
          "dro": "dro_beta", "value": "clip"}.get(mode)
    return KernelArgs(lo, hi, o["dual_clip"] or inf, o["log_ratio_clamp"] or inf,
                      inf if p0 is None or o[p0] is None else o[p0], o["tau_neg"] if mode == "sapo" else 0.0,
                      o["is_low"], o["is_high"], o["is_log_ratio_clamp"] or inf)


def decode(mode: str, agg: str, correction: str, params: list[float]) -> LossSpec:
    """The launchers' spec from the op's string and float arguments (:func:`encode`'s)."""
    o = {k: (None if k in _NONE_IS_INF and math.isinf(v) else v) for k, v in zip(_PARAMS, params)}
    level, is_mode, stat, source, apply = None, "truncate", "ratio", "rollout", True
    if correction:
        level, is_mode, stat, source, flag = correction.split(",")
        apply = flag == "1"
    return LossSpec(mode, agg, level, is_mode, stat, source, apply, _kernel_args(mode, o), o)


def needs_table(spec: LossSpec, global_seqs) -> bool:
    """Whether the call needs the per-sequence pass (a sequence-level quantity or count)."""
    return (spec.mode in ("gspo", "gspo_seq", "geo_mean") or spec.is_level in ("sequence", "sequence-mean")
            or spec.agg == "seq-mean-token-mean"
            or (spec.agg in ("seq-mean-token-sum", "seq-mean-token-sum-norm") and global_seqs is None))


def policy_loss_options(mode: str) -> dict:
    """The options :func:`policy_loss` takes in ``mode`` (keyword arguments), with their defaults;
    an option the mode cannot do without has the default :data:`REQUIRED`.

    >>> fastrlhf.policy_loss_options("sapo")
    {'tau_pos': 1.0, 'tau_neg': 1.05, 'log_ratio_clamp': 20.0}
    """
    _checks.choice("mode", mode, POLICY_LOSS_MODES)
    return dict(_OPTIONS[mode])


def resolve_options(mode: str, given: dict) -> dict:
    """The mode's options: defaults filled in, each checked; unknown ones rejected."""
    allowed = _OPTIONS[mode]
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        takes = ", ".join(allowed) if allowed else "no options"
        raise TypeError(f"policy_loss(mode={mode!r}) got unexpected option(s) {', '.join(unknown)}; "
                        f"{mode} takes {takes}")
    o = {**allowed, **given}
    missing = [k for k, v in o.items() if v is REQUIRED]
    if missing:
        raise TypeError(f"policy_loss(mode={mode!r}) needs option {missing[0]}")
    checks = {"clip_low": _checks.positive, "clip_high": lambda n, v: v if v is None else _checks.positive(n, v),
              "log_ratio_clamp": _checks.optional_positive, "ratio_cap": _checks.positive,
              "tau_pos": _checks.positive, "tau_neg": _checks.positive, "clip_cov_ratio": _checks.unit_interval,
              "clip_cov_lb": _checks.number, "clip_cov_ub": _checks.number, "kl_cov_ratio": _checks.unit_interval,
              "ppo_kl_coef": _checks.non_negative, "dro_beta": _checks.positive}
    for k, check in checks.items():
        if k in o:
            o[k] = check(k, o[k])
    if o.get("dual_clip") is not None:
        if _checks.positive("dual_clip", o["dual_clip"]) <= 1:
            raise ValueError(f"dual_clip must be > 1, got {o['dual_clip']}")
        o["dual_clip"] = float(o["dual_clip"])
    for k in ("clip_cov_ratio", "kl_cov_ratio"):
        if k in o and o[k] == 0:
            raise ValueError(f"{k} must be in (0, 1], got 0")
    if "clip_cov_lb" in o and not o["clip_cov_lb"] < o["clip_cov_ub"]:
        raise ValueError(f"clip_cov_lb must be < clip_cov_ub, got {o['clip_cov_lb']} and {o['clip_cov_ub']}")
    if "gradient" in o:
        _checks.choice("gradient", o["gradient"], ("token", "sequence"))
    if "loss_type" in o:
        _checks.choice("loss_type", o["loss_type"], ("ppo_clip", "reinforce"))
        if o["loss_type"] == "reinforce":
            clipping = sorted(set(given) - {"loss_type"})
            if clipping:
                raise TypeError(f"policy_loss(mode='bypass_mode', loss_type='reinforce') does not clip: "
                                f"unexpected option(s) {', '.join(clipping)}")
    if o.get("generator") is not None and not isinstance(o["generator"], torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(o['generator']).__name__}")
    if "clip_low" in o and o["clip_high"] is None:
        o["clip_high"] = o["clip_low"]
    return o


def kernel_mode(mode: str, o: dict) -> tuple[str, str, bool]:
    """``(kernel mode, correction source, apply the correction)`` of public ``mode`` with resolved
    options ``o``: a public mode, ``"gspo_seq"`` (GSPO, sequence gradient) or, for ``bypass_mode``,
    ``"vanilla"`` (statistics-only correction on the current policy) or ``"gpg"`` (REINFORCE)."""
    if mode == "gspo" and o["gradient"] == "sequence":
        return "gspo_seq", "rollout", True
    if mode == "bypass_mode":
        return ("vanilla" if o["loss_type"] == "ppo_clip" else "gpg"), "current", o["loss_type"] == "reinforce"
    return mode, "rollout", True


def stats_of(kmode: str, correction: RolloutCorrection | None, has_weights: bool) -> tuple[str, ...]:
    """The statistics a call of kernel mode ``kmode`` reports: the mode's, then the correction's."""
    keys = _STATS["gspo" if kmode == "gspo_seq" else kmode]
    if correction is not None:
        return keys + ("is_weight_mean", "is_filtered_frac", "rollout_kl")
    return keys + ("is_weight_mean",) if has_weights else keys


def encode(o: dict, corr: RolloutCorrection | None, source: str = "rollout", apply: bool = True
           ) -> tuple[str, list[float]]:
    """``(correction, params)``: the op's string and float arguments for options ``o`` (resolved)
    and the correction ``corr``; :func:`decode` reads them back."""
    inf = math.inf
    vals = {**{k: o.get(k) for k in _PARAMS}, "is_low": -inf, "is_high": inf, "is_log_ratio_clamp": None}
    correction = ""
    if corr is not None:
        vals.update(is_low=corr.low, is_high=corr.high, is_log_ratio_clamp=corr.log_ratio_clamp)
        correction = f"{corr.level},{corr.mode},{corr.stat},{source},{int(apply)}"
    return correction, [float(vals[k]) if vals[k] is not None else inf if k in _NONE_IS_INF else 0.0
                        for k in _PARAMS]
