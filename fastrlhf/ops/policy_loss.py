"""Policy losses: every mode of verl 0.9.1's registry and every option of OpenRLHF 0.11.2's
``PolicyLoss``, with rollout correction, on padded ``[B, T]`` or packed ``[total]`` sequences.

Chain: :func:`policy_loss` (checks, per-mode options, covariance selections, backend choice) →
``torch.library`` custom op ``fastrlhf::policy_loss`` with fake and autograd registrations →
Triton launchers (``fastrlhf.triton.policy_loss``: a per-sequence pass when a sequence-level
quantity is needed, a token pass writing partial sums, an elementwise backward). The ``torch``
backend is the reference itself (``fastrlhf.reference.policy_loss``: plain differentiable
PyTorch, autograd gives its gradient, ``torch.compile`` traces it). The op adds the partial
sums in a fixed order and normalizes
(the aggregation modes and global counts of ``fastrlhf.ops.ppo``). The plain PPO loss
(``mode="vanilla"``, padded, without correction) runs the ``ppo_policy_loss`` op, which also has
CUDA kernels; every other call runs on ``triton`` or ``torch``, and ``backend="cuda"`` raises
``BackendUnavailableError`` saying so before any kernel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from fastrlhf import _checks
from fastrlhf._numerics import acc_dtype
from fastrlhf.backend import BackendUnavailableError, launchers, resolve_backend
from fastrlhf.ops import ppo as _ppo
from fastrlhf.reference import policy_loss as ref
from fastrlhf.reference.ppo import AGG_MODES

__all__ = ["POLICY_LOSS_MODES", "REQUIRED", "RolloutCorrection", "policy_loss", "policy_loss_options"]

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


def _decode(mode: str, agg: str, correction: str, params: list[float]) -> LossSpec:
    """The launchers' spec from the op's string and float arguments."""
    o = {k: (None if k in _NONE_IS_INF and math.isinf(v) else v) for k, v in zip(_PARAMS, params)}
    level, is_mode, stat, source, apply = None, "truncate", "ratio", "rollout", True
    if correction:
        level, is_mode, stat, source, flag = correction.split(",")
        apply = flag == "1"
    return LossSpec(mode, agg, level, is_mode, stat, source, apply, _kernel_args(mode, o))


def _needs_table(spec: LossSpec, global_seqs) -> bool:
    return (spec.mode in ("gspo", "gspo_seq", "geo_mean") or spec.is_level in ("sequence", "sequence-mean")
            or spec.agg == "seq-mean-token-mean"
            or (spec.agg in ("seq-mean-token-sum", "seq-mean-token-sum-norm") and global_seqs is None))


def _n_seqs(x: torch.Tensor, cu_seqlens) -> int:
    return cu_seqlens.numel() - 1 if cu_seqlens is not None else x.shape[0]


# ------------------------------------------------------------------ the op (forward / backward)
def _chunk_starts(cu_seqlens: torch.Tensor, chunk: int) -> torch.Tensor:
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    starts = torch.zeros(cu_seqlens.shape, dtype=torch.int32, device=cu_seqlens.device)
    torch.cumsum((lengths + chunk - 1) // chunk, 0, out=starts[1:])
    return starts


def _seq_pass(kernels, x, cu_seqlens, spec, what, table, gseq=None):
    """Run the per-sequence pass of the launchers (allocates its scratch: ``SEQ_SUMS + 1`` numbers
    per ``SEQ_CHUNK`` tokens, and ``chunk_starts`` for packed input)."""
    logp, old, adv, mask, roll, weights = x
    S = table.shape[1]
    if S == 0:
        return
    packed = cu_seqlens is not None
    nc = max(kernels.seq_programs(logp.numel(), S, 0 if packed else logp.shape[-1], packed), 1)
    partials = torch.empty((kernels.SEQ_SUMS, nc), dtype=table.dtype, device=logp.device)
    pcounts = torch.empty(nc, dtype=torch.int32, device=logp.device)
    starts = _chunk_starts(cu_seqlens, kernels.SEQ_CHUNK) if packed else None
    kernels.policy_seq_pass(logp, old, adv, mask, roll, weights, cu_seqlens, starts, spec, what, table, partials,
                            pcounts, gseq)


def _scale(agg, counts, dtype, device, n_tokens, n_seqs, T):
    """0-dim ``scale`` with ``loss = scale * sum(w * c * loss_t)``; 0 when the normalizer is ``<= 0``."""
    global_tokens, global_seqs, factor = counts
    one = torch.ones((), dtype=dtype, device=device)
    if agg == "token-sum":
        return one
    if agg == "token-mean":
        return _ppo._safe_div(one, n_tokens if global_tokens is None else global_tokens)
    seqs = n_seqs if global_seqs is None else global_seqs
    if agg == "seq-mean-token-sum-norm":
        seqs = seqs * (T if factor is None else factor)
    return _ppo._safe_div(one, seqs)


_N_STATS = len(ref.STATS)


@torch.library.custom_op("fastrlhf::policy_loss", mutates_args=())
def _policy_op(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
               rollout_logprobs: torch.Tensor | None, is_weights: torch.Tensor | None, selected: torch.Tensor | None,
               cu_seqlens: torch.Tensor | None, global_tokens: torch.Tensor | None, global_seqs: torch.Tensor | None,
               loss_scale_factor: torch.Tensor | None, mode: str, agg: str, correction: str, params: list[float],
               backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, stats [len(STATS)], scale, sequence table)``; the last two for backward. Kernel
    backends only: the ``torch`` backend is the reference itself, differentiated by autograd."""
    spec = _decode(mode, agg, correction, params)
    counts = (global_tokens, global_seqs, loss_scale_factor)
    dtype = acc_dtype(logprobs, old_logprobs, advantages, rollout_logprobs, is_weights)
    dev = logprobs.device
    kernels = launchers(backend, "policy_loss")
    x = (logprobs, old_logprobs, advantages, mask, rollout_logprobs, is_weights)
    table = None
    if _needs_table(spec, global_seqs):
        table = torch.empty((kernels.TABLE_ROWS, _n_seqs(logprobs, cu_seqlens)), dtype=dtype, device=dev)
        _seq_pass(kernels, x, cu_seqlens, spec, kernels.seq_work(spec), table)
    P = kernels.token_programs(logprobs)
    sums = torch.empty((kernels.FWD_SUMS, P), dtype=dtype, device=dev)
    parts = torch.empty((kernels.FWD_COUNTS, P), dtype=torch.int32, device=dev)
    if logprobs.numel():
        kernels.policy_loss_fwd(*x, selected, cu_seqlens, table, spec, sums, parts)
    s, c = sums.sum(1), parts.sum(1)
    n = c[0]
    # per valid token: counts 1 and 2, sums 1 to 3, count 3, sum 4 (the order of ref.STATS)
    stats = _ppo._safe_div(torch.cat([c[1:3].to(dtype), s[1:4], c[3:4].to(dtype), s[4:5]]), n)
    if table is not None:
        has = table[0] > 0
        n_seqs = has.sum()
        if spec.is_level in ("sequence", "sequence-mean"):  # stat 5 per sequence instead
            per_seq = _ppo._safe_div(torch.where(has, table[4], 0.0).sum(), n_seqs)
            stats = torch.cat([stats[:5], per_seq[None], stats[6:]])
    else:
        n_seqs = (mask != 0).sum(-1).gt(0).sum()
    T = logprobs.shape[-1] if cu_seqlens is None else None
    scale = _scale(agg, counts, dtype, dev, n, n_seqs, T)
    empty = torch.empty((0, 0), dtype=dtype, device=dev)
    return s[0] * scale, stats, scale, table if table is not None else empty


@_policy_op.register_fake
def _(logprobs, old_logprobs, advantages, mask, rollout_logprobs, is_weights, selected, cu_seqlens, global_tokens,
      global_seqs, loss_scale_factor, mode, agg, correction, params, backend):
    dtype = acc_dtype(logprobs, old_logprobs, advantages, rollout_logprobs, is_weights)
    spec = _decode(mode, agg, correction, params)
    rows = launchers(backend, "policy_loss").TABLE_ROWS if _needs_table(spec, global_seqs) else 0
    seqs = _n_seqs(logprobs, cu_seqlens) if rows else 0
    loss = logprobs.new_empty((), dtype=dtype)
    return (loss, logprobs.new_empty(_N_STATS, dtype=dtype), logprobs.new_empty((), dtype=dtype),
            logprobs.new_empty((rows, seqs), dtype=dtype))


@torch.library.custom_op("fastrlhf::policy_loss_backward", mutates_args=())
def _policy_bwd_op(grad: torch.Tensor, scale: torch.Tensor, table: torch.Tensor, logprobs: torch.Tensor,
                   old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                   rollout_logprobs: torch.Tensor | None, is_weights: torch.Tensor | None,
                   selected: torch.Tensor | None, cu_seqlens: torch.Tensor | None, global_tokens: torch.Tensor | None,
                   global_seqs: torch.Tensor | None, loss_scale_factor: torch.Tensor | None, mode: str, agg: str,
                   correction: str, params: list[float], backend: str) -> torch.Tensor:
    spec = _decode(mode, agg, correction, params)
    kernels = launchers(backend, "policy_loss")
    dx = torch.empty(logprobs.shape, dtype=logprobs.dtype, device=logprobs.device)
    if not dx.numel():
        return dx
    tab = table if table.numel() or table.shape[0] else None
    gseq = None
    if mode == "gspo_seq":
        gseq = torch.empty(table.shape[1], dtype=table.dtype, device=table.device)
        _seq_pass(kernels, (logprobs, old_logprobs, advantages, mask, rollout_logprobs, is_weights), cu_seqlens,
                  spec, kernels.W_GRAD, table, gseq)
    kernels.policy_loss_bwd(grad, scale, logprobs, old_logprobs, advantages, mask, rollout_logprobs, is_weights,
                            selected, cu_seqlens, tab, gseq, spec, dx)
    return dx


@_policy_bwd_op.register_fake
def _(grad, scale, table, logprobs, *_):
    return torch.empty_like(logprobs, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:11], output[2], output[3])
    ctx.args = inputs[11:]


def _backward(ctx, grad, *_):
    *x, scale, table = ctx.saved_tensors
    if grad is None:
        grad = torch.zeros((), dtype=scale.dtype, device=x[0].device)
    dx = _policy_bwd_op(grad, scale, table, *x, *ctx.args)
    return (dx, *[None] * (len(ctx.needs_input_grad) - 1))


_policy_op.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------- public API
def policy_loss_options(mode: str) -> dict:
    """The options :func:`policy_loss` takes in ``mode`` (keyword arguments), with their defaults;
    an option the mode cannot do without has the default :data:`REQUIRED`.

    >>> fastrlhf.policy_loss_options("sapo")
    {'tau_pos': 1.0, 'tau_neg': 1.05, 'log_ratio_clamp': 20.0}
    """
    _checks.choice("mode", mode, POLICY_LOSS_MODES)
    return dict(_OPTIONS[mode])


def _options(mode: str, given: dict) -> dict:
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


def _check_layout(names, tensors, mask, cu_seqlens):
    """The inputs' layout: ``[B, T]``, or ``[total]`` with ``cu_seqlens``."""
    if cu_seqlens is None:
        _checks.matching(names, tensors, dim=2)
    else:
        _checks.matching(names, tensors, dim=1)
    _checks.mask("mask", mask, tensors[0].shape, tensors[0].device)
    if cu_seqlens is not None:
        _checks.cu_seqlens("cu_seqlens", cu_seqlens, tensors[0].shape[0], tensors[0].device)


def _check_extra(name, x, like):
    _checks.tensor(name, x, _checks.FLOAT_DTYPES)
    _checks.same_shape(name, x, like.shape, "logprobs.shape")
    _checks.same_device(name, x, like.device)


def _params(o: dict, corr: RolloutCorrection | None) -> list[float]:
    inf = math.inf
    vals = {**{k: o.get(k) for k in _PARAMS}, "is_low": -inf, "is_high": inf, "is_log_ratio_clamp": None}
    if corr is not None:
        vals.update(is_low=corr.low, is_high=corr.high, is_log_ratio_clamp=corr.log_ratio_clamp)
    out = []
    for k in _PARAMS:
        v = vals[k]
        out.append(float(v) if v is not None else inf if k in _NONE_IS_INF else 0.0)
    return out


def _cuda_refused(backend: str, device: torch.device, what: str) -> str:
    """The backend of a call the CUDA kernels do not cover: ``auto`` never picks cuda for it."""
    name = resolve_backend(backend, device, None)
    if name == "cuda":
        raise BackendUnavailableError(f"the cuda backend has no kernels for {what}; use backend='triton' or 'torch'")
    return name


def _run(logprobs, old_logprobs, advantages, mask, kmode, agg, o, counts, rollout_logprobs, corr, is_weights,
         selected, cu_seqlens, name, source="rollout", apply=True):
    """``(loss, stats vector)`` of the op (kernel backends) or of the reference (``torch``)."""
    if name == "torch":  # the naive reference, differentiable by autograd (and by torch.compile)
        rcorr = None
        if corr is not None:
            rcorr = ref.Correction(corr.level, corr.mode, corr.low, corr.high, corr.stat, corr.log_ratio_clamp,
                                   source, apply)
        o = {**o, "gradient": "sequence" if kmode == "gspo_seq" else "token"}
        loss, stats = ref.policy_loss(logprobs, old_logprobs, advantages, mask, "gspo" if kmode == "gspo_seq"
                                      else kmode, agg, o, *counts, rollout_logprobs, rcorr, is_weights, selected,
                                      cu_seqlens)
        zero = torch.zeros((), dtype=loss.dtype, device=loss.device)
        return loss, torch.stack([stats.get(k, zero) for k in ref.STATS])
    correction = ""
    if corr is not None:
        correction = f"{corr.level},{corr.mode},{corr.stat},{source},{int(apply)}"
    loss, stats, _, _ = _policy_op(logprobs, old_logprobs, advantages, mask, rollout_logprobs, is_weights,
                                   None if selected is None else selected, cu_seqlens, *counts, kmode, agg,
                                   correction, _params(o, corr), name)
    return loss, stats.detach()


def _stat_dict(keys, vec) -> dict:
    return {k: vec[ref.STATS.index(k)] for k in keys}


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                *, mode: str = "vanilla", agg: str = "token-mean", global_tokens=None, global_seqs=None,
                loss_scale_factor=None, rollout_logprobs: torch.Tensor | None = None,
                rollout_correction: RolloutCorrection | None = None, is_weights: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None, backend: str = "auto", **options):
    """A policy loss of verl 0.9.1's registry or OpenRLHF 0.11.2's ``PolicyLoss``, fused, aggregated.

    Per valid token (``mask != 0``), with ``lr = logprobs - old_logprobs``, ``A`` the advantage,
    ``clip_high`` defaulting to ``clip_low``, ``sg`` a stop-gradient, then multiplied by the
    correction coefficient ``c`` (``is_weights``, or ``rollout_correction``; 1 without) and
    aggregated by ``agg`` (``fastrlhf.ops.ppo``: token-mean, token-sum, seq-mean-token-sum,
    seq-mean-token-mean, seq-mean-token-sum-norm, with ``global_tokens`` / ``global_seqs`` /
    ``loss_scale_factor``). ``mode`` and its options (keyword arguments; any other is a
    ``TypeError``), each from ``verl/trainer/ppo/core_algos.py`` unless said:

    * ``"vanilla"`` (``compute_policy_loss_vanilla``; OpenRLHF ``policy_loss_type="ppo"``):
      ``r = exp(clamp(lr, +-log_ratio_clamp))``, ``max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high))``,
      with ``dual_clip = d`` ``min(., -A d)`` where ``A < 0``. Options ``clip_low=0.2, clip_high,
      dual_clip=None (> 1), log_ratio_clamp=20``. Stats clipfrac, clipfrac_lower, approx_kl.
    * ``"dppo_tv"`` / ``"dppo_kl"`` (``compute_policy_loss_dppo_tv`` / ``_kl``): ``-A sg(min(r, ratio_cap))
      logprobs`` where the token is inside the trust region, else 0. The region: TV ``-clip_low <=
      p - p_old`` (``A <= 0``), ``p - p_old <= clip_high`` (``A > 0``); KL: the binary KL
      ``p_old (old - logp) + (1 - p_old) log((1 - p_old + 1e-8) / (1 - p + 1e-8))`` at most
      ``clip_high`` or ``p <= p_old`` (``A > 0``), at most ``clip_low`` or ``p >= p_old`` (``A <= 0``).
      Options ``clip_low, clip_high`` (thresholds), ``ratio_cap=20`` (verl's ``clip_ratio_c``; its
      ``ActorConfig`` passes 3.0), ``log_ratio_clamp=20``. clipfrac = outside the region,
      clipfrac_lower = inside with ``r > ratio_cap``.
    * ``"gspo"`` (``compute_policy_loss_gspo``): one ratio per sequence ``s = exp(min(mean of lr
      over its valid tokens, log_ratio_clamp))``, then vanilla's clipped surrogate of ``s``
      (``dual_clip`` optional). ``gradient="token"`` (verl: ``s_t = sg(s) p_t / sg(p_t)``, each
      token's term differentiates through its own log-prob) or ``"sequence"`` (OpenRLHF
      ``policy_loss_type="gspo"``: through the sequence mean; pass ``log_ratio_clamp=None``
      as OpenRLHF, whose correction replaces ``old_logprobs`` by the rollout log-probs).
      Options ``clip_low, clip_high, dual_clip, log_ratio_clamp=10, gradient``. approx_kl unclamped.
    * ``"sapo"`` (``compute_policy_loss_sapo``): ``-A (4 / tau) sigmoid(tau (r - 1))``, ``tau =
      tau_pos`` where ``A > 0`` else ``tau_neg``. Options ``tau_pos=1, tau_neg=1.05,
      log_ratio_clamp=20``. verl always aggregates it as ``seq-mean-token-mean``.
    * ``"gpg"`` (``compute_policy_loss_gpg``): ``-A logprobs``. approx_kl from ``old_logprobs``.
    * ``"clip_cov"`` (``compute_policy_loss_clip_cov``): vanilla's surrogate (``r = exp(lr)``,
      no clamp, no dual clip), 0 on the tokens selected by covariance (see below). Options
      ``clip_low, clip_high, clip_cov_ratio=2e-4, clip_cov_lb=1, clip_cov_ub=5, generator``.
      clipfrac = the selected fraction.
    * ``"kl_cov"`` (``compute_policy_loss_kl_cov``): ``-A exp(lr)``, plus ``ppo_kl_coef |lr|`` on the
      selected tokens. Options ``kl_cov_ratio=2e-4, ppo_kl_coef=0.1``. Stats clipfrac (selected
      fraction), approx_kl, abs_kl (verl's ``ppo_kl`` for this mode).
    * ``"geo_mean"`` (``compute_policy_loss_geo_mean``, GMPO): per token ``lr' = sign(A) min(sign(A)
      lr, sign(A) clamp(lr, -clip_low, clip_high))``; per sequence ``L = -mean(A) exp(sum lr' /
      (n + 1e-8))`` (means as ``sum / (n + 1e-8)``), given to each of its valid tokens, so
      ``seq-mean-token-mean`` is verl's mean over sequences (verl divides by ``B``: pass
      ``global_seqs=B``). The coefficient is the geometric mean ``exp(sum log(c + 1e-10) / (n + 1e-8))``
      of the sequence's. clipfrac / clipfrac_lower: clamped tokens with ``A > 0`` / ``A < 0``.
    * ``"dro"`` (``compute_policy_loss_dro``): ``-(A logprobs - dro_beta / 2 lr**2)``; ``dro_beta > 0``
      required.
    * ``"cispo"`` (``compute_policy_loss_cispo``): ``-sg(clip(r, 1 - clip_low, 1 + clip_high)) A
      logprobs``. Options ``clip_low, clip_high, log_ratio_clamp=20``. clipfrac = ``r`` outside the range.
    * ``"bypass_mode"`` (``compute_policy_loss_bypass_mode``; ``old_logprobs`` are the rollout's):
      ``loss_type="ppo_clip"`` is vanilla (a ``rollout_correction`` only reports statistics, as
      verl), ``"reinforce"`` is ``-A logprobs c`` with ``c`` from ``rollout_correction`` on
      ``logprobs.detach() - old_logprobs`` (``compute_policy_loss_reinforce``). verl's rejection
      sampling (``rollout_rs``) is a mask the caller applies.

    Covariance selections (clip_cov, kl_cov) run in PyTorch before the kernels, over the valid
    tokens in row-major order, with verl's rules (``fastrlhf.reference.policy_loss.clip_cov_selection``,
    ``kl_cov_selection``): clip_cov draws with ``torch.randperm`` (``generator``, else the global
    CPU generator as verl: same seed, same tokens), kl_cov takes the top-k. Both read counts
    on the host (a sync; not capturable by ``torch.compile(fullgraph=True)``).

    Correction: ``is_weights`` (per-token weights, verl's precomputed ``rollout_is_weights``;
    ``is_weight_mean`` reported) or ``rollout_logprobs`` with ``rollout_correction``
    (:class:`RolloutCorrection`, computed in the kernels; in ``bypass_mode`` without
    ``rollout_logprobs``). ``geo_mean`` takes token-level corrections only.

    Args:
        logprobs: ``[B, T]`` (or ``[total]`` packed) float, the policy's log-probs; the only
            input with a gradient.
        old_logprobs, advantages, rollout_logprobs, is_weights: the same shape, float.
        mask: the same shape, bool/int/float; holes allowed, values are not weights.
        cu_seqlens: int32 ``[S + 1]`` offsets of packed sequences (from 0, non-decreasing, to
            ``total``; empty sequences allowed): inputs are 1-D, sequence ``s`` is tokens
            ``[cu[s], cu[s+1])``; every sequence-level quantity is per packed sequence and the
            result equals the padded one. ``seq-mean-token-sum-norm`` then needs ``loss_scale_factor``.
        backend: ``"auto"``, ``"torch"``, ``"triton"`` (``"cuda"``: plain padded vanilla only).

    Returns:
        ``(loss, stats)``: ``loss`` a 0-dim fp32 tensor (fp64 for fp64 inputs); ``stats`` detached
        0-dim tensors over this call's valid tokens (0 without any): the mode's (above) among
        ``clipfrac``, ``clipfrac_lower``, ``approx_kl`` (mean of ``-lr``, clamped where the mode
        clamps the token log-ratio), ``abs_kl``, plus the correction's.

    Gradient: w.r.t. ``logprobs`` only; invalid tokens get 0 and are never read into a result.
    Memory (triton): five sums and four counts per 1024 tokens; with a sequence-level quantity
    (GSPO, geo_mean, sequence corrections, ``seq-mean-*`` counts) a ``[5, S]`` table and five
    numbers per 4096 tokens (+ ``[S + 1]`` int32 chunk offsets packed); clip_cov / kl_cov a bool
    ``[B, T]`` selection. Backward allocates the gradient (GSPO ``gradient="sequence"``: also
    ``[S]`` and the per-sequence scratch). Deterministic: fixed-order sums, no atomics.

    >>> loss, stats = fastrlhf.policy_loss(logp, old_logp, adv, mask, mode="gspo", agg="seq-mean-token-mean")
    >>> loss, stats = fastrlhf.policy_loss(logp, old_logp, adv, mask, rollout_logprobs=rollout_logp,
    ...                                    rollout_correction=fastrlhf.RolloutCorrection("token", "truncate", 2.0))
    """
    _checks.choice("mode", mode, POLICY_LOSS_MODES)
    o = _options(mode, options)
    _check_layout(("logprobs", "old_logprobs", "advantages"), (logprobs, old_logprobs, advantages), mask, cu_seqlens)
    _checks.choice("agg", agg, AGG_MODES)
    if cu_seqlens is not None and agg == "seq-mean-token-sum-norm" and loss_scale_factor is None:
        raise ValueError("agg='seq-mean-token-sum-norm' with cu_seqlens needs loss_scale_factor (packed sequences "
                         "have no padded length T to default to)")
    if is_weights is not None:
        _check_extra("is_weights", is_weights, logprobs)
    if rollout_logprobs is not None:
        _check_extra("rollout_logprobs", rollout_logprobs, logprobs)
    if rollout_correction is not None and not isinstance(rollout_correction, RolloutCorrection):
        raise TypeError(f"rollout_correction must be a fastrlhf.RolloutCorrection, got "
                        f"{type(rollout_correction).__name__}")
    bypass = mode == "bypass_mode"
    if bypass and rollout_logprobs is not None:
        raise ValueError("mode='bypass_mode' takes the rollout's log-probs as old_logprobs: rollout_logprobs must "
                         "be None")
    if bypass and is_weights is not None:
        raise ValueError("mode='bypass_mode' computes its weights (rollout_correction): is_weights must be None")
    if not bypass and (rollout_logprobs is None) != (rollout_correction is None):
        raise ValueError("rollout_logprobs and rollout_correction go together: pass both or neither")
    if is_weights is not None and rollout_correction is not None:
        raise ValueError("pass is_weights or rollout_correction, not both")
    if mode == "geo_mean" and rollout_correction is not None and rollout_correction.level != "token":
        raise ValueError("mode='geo_mean' takes token-level corrections (its coefficient is their geometric mean "
                         f"per sequence), got level={rollout_correction.level!r}")
    counts = _ppo._counts(mask, global_tokens, global_seqs, loss_scale_factor)
    device = logprobs.device

    kmode, source, apply = mode, "rollout", True
    if mode == "gspo" and o["gradient"] == "sequence":
        kmode = "gspo_seq"
    if bypass:
        kmode = "vanilla" if o["loss_type"] == "ppo_clip" else "gpg"
        source, apply = "current", o["loss_type"] == "reinforce"
    keys = _STATS["gspo" if kmode == "gspo_seq" else kmode]
    if rollout_correction is not None:
        keys += ("is_weight_mean", "is_filtered_frac", "rollout_kl")
    elif is_weights is not None:
        keys += ("is_weight_mean",)

    if kmode == "vanilla" and cu_seqlens is None and rollout_correction is None and is_weights is None:
        name = resolve_backend(backend, device, "ppo")  # the PPO op, with its CUDA kernels
        return _ppo.policy_result(_ppo._policy_op(
            logprobs, old_logprobs, advantages, mask, o["clip_low"], o["clip_high"], o["dual_clip"],
            o["log_ratio_clamp"], agg, *counts, name))
    what = (f"loss mode {mode!r}" if kmode not in ("vanilla",) else
            "packed sequences (cu_seqlens)" if cu_seqlens is not None else "rollout correction")
    name = _cuda_refused(backend, device, what)

    selected = None
    if mode == "clip_cov":
        selected = ref.clip_cov_selection(logprobs, old_logprobs, advantages, mask, o["clip_low"], o["clip_high"],
                                          o["clip_cov_ratio"], o["clip_cov_lb"], o["clip_cov_ub"], o["generator"])
    elif mode == "kl_cov":
        selected = ref.kl_cov_selection(logprobs, advantages, mask, o["kl_cov_ratio"])
    loss, vec = _run(logprobs, old_logprobs, advantages, mask, kmode, agg, o, counts, rollout_logprobs,
                     rollout_correction, is_weights, selected, cu_seqlens, name, source, apply)
    return loss, _stat_dict(keys, vec)


# -------------------------------------------------- packed PPO losses (fastrlhf.ops.ppo uses these)
def packed_ppo_policy_loss(logprobs, old_logprobs, advantages, mask, cu_seqlens, clip_low, clip_high, dual_clip,
                           log_ratio_clamp, agg, counts, backend):
    """``ppo_policy_loss`` on packed input: the vanilla mode of the policy-loss op."""
    name = _cuda_refused(backend, logprobs.device, "packed sequences (cu_seqlens)")
    o = {"clip_low": clip_low, "clip_high": clip_high, "dual_clip": dual_clip, "log_ratio_clamp": log_ratio_clamp}
    loss, vec = _run(logprobs, old_logprobs, advantages, mask, "vanilla", agg, o, counts, None, None, None, None,
                     cu_seqlens, name)
    return loss, _stat_dict(_STATS["vanilla"], vec)


def packed_ppo_value_loss(values, old_values, returns, mask, cu_seqlens, clip, agg, counts, backend):
    """``ppo_value_loss`` on packed input: ``(loss, vf_clipfrac)``."""
    name = _cuda_refused(backend, values.device, "packed sequences (cu_seqlens)")
    loss, vec = _run(values, old_values, returns, mask, "value", agg, {"clip": clip}, counts, None, None, None,
                     None, cu_seqlens, name)
    return loss, vec[0]
