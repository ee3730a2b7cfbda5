"""KL estimators, KL-penalized per-token rewards, clipped importance weights and the KL
coefficient controllers.

Chain: public function (checks, backend choice) → ``torch.library`` custom op with fake and
autograd registrations → backend launcher (``fastrlhf.<backend>.kl``: ``eager``, ``triton``,
``cuda``), which fills the outputs the op allocates.
"""

from __future__ import annotations

import math

import torch

from fastrlhf import _checks
from fastrlhf._numerics import acc_dtype
from fastrlhf.backend import launchers, resolve_backend
from fastrlhf.ops.custom_op import custom_op
from fastrlhf.reference import kl as ref

__all__ = ["AdaptiveKLController", "FixedKLController", "importance_weights", "kl_penalized_rewards",
           "kl_penalty"]

ESTIMATORS = tuple(n + s for n in ref.ESTIMATORS for s in ("", "+"))


def _kernel_args(estimator: str, *bounds: float | None) -> tuple:
    """``(estimator number, straight-through, *bounds)`` as the kernels take them (the number
    ``reference.kl.CODES`` gives, ``EST`` in fastrlhf/triton/kl.py, kernels/kl.cu): a ``None``
    bound is ``inf``, which changes nothing (so no kernel specializes on it)."""
    name, straight = ref.parse_estimator(estimator)
    return ref.CODES.index(name), straight, *(math.inf if b is None else b for b in bounds)


def _per_token(logprobs, ref_logprobs):
    """A new contiguous tensor of the inputs' shape in their accumulation dtype."""
    return torch.empty(logprobs.shape, dtype=acc_dtype(logprobs, ref_logprobs), device=logprobs.device)


# ------------------------------------------------------------------------- kl_penalty op
@custom_op("fastrlhf::kl_penalty", mutates_args=())
def kl_penalty_op(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str,
                   clamp: float | None, log_ratio_clamp: float | None, backend: str) -> torch.Tensor:
    out = _per_token(logprobs, ref_logprobs)
    if out.numel():
        # the value of a "+" estimator is the plain one's
        est, _, clamp, log_ratio_clamp = _kernel_args(estimator, clamp, log_ratio_clamp)
        launchers(backend, "kl").kl_penalty_fwd(logprobs, ref_logprobs, est, clamp, log_ratio_clamp, out)
    return out


@kl_penalty_op.register_fake
def _(logprobs, ref_logprobs, estimator, clamp, log_ratio_clamp, backend):
    return _per_token(logprobs, ref_logprobs)


@custom_op("fastrlhf::kl_penalty_backward", mutates_args=())
def _kl_penalty_bwd_op(grad: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                       estimator: str, clamp: float | None, log_ratio_clamp: float | None,
                       want_logp: bool, want_ref: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    dlogp, dref = _gradients(logprobs, ref_logprobs, want_logp, want_ref)
    if logprobs.numel() and (want_logp or want_ref):
        launchers(backend, "kl").kl_penalty_bwd(grad, logprobs, ref_logprobs,
                                                *_kernel_args(estimator, clamp, log_ratio_clamp), dlogp, dref)
    return dlogp, dref


def _gradients(logprobs, ref_logprobs, want_logp, want_ref):
    """New contiguous gradients in the inputs' dtypes; an unwanted one is empty (not written)."""
    return (torch.empty(logprobs.shape if want_logp else 0, dtype=logprobs.dtype, device=logprobs.device),
            torch.empty(ref_logprobs.shape if want_ref else 0, dtype=ref_logprobs.dtype, device=logprobs.device))


@_kl_penalty_bwd_op.register_fake
def _(grad, logprobs, ref_logprobs, estimator, clamp, log_ratio_clamp, want_logp, want_ref, backend):
    return _gradients(logprobs, ref_logprobs, want_logp, want_ref)


def _setup_context(ctx, inputs, output):
    logprobs, ref_logprobs, *ctx.args = inputs
    ctx.save_for_backward(logprobs, ref_logprobs)


def _autograd_backward(ctx, grad):
    logprobs, ref_logprobs = ctx.saved_tensors
    want_logp, want_ref = ctx.needs_input_grad[:2]
    estimator, clamp, log_ratio_clamp, backend = ctx.args
    dlogp, dref = _kl_penalty_bwd_op(grad, logprobs, ref_logprobs, estimator, clamp,
                                     log_ratio_clamp, want_logp, want_ref, backend)
    return (dlogp if want_logp else None), (dref if want_ref else None), None, None, None, None


kl_penalty_op.register_autograd(_autograd_backward, setup_context=_setup_context)


# ---------------------------------------------------------------- importance_weights op
def _bounds(*bounds: float | None) -> tuple[float, ...]:
    """The kernels' form of optional bounds: ``low`` None is ``-inf``, the others ``inf``."""
    low, *rest = bounds
    return (-math.inf if low is None else low, *(math.inf if b is None else b for b in rest))


@custom_op("fastrlhf::importance_weights", mutates_args=())
def _weights_op(logprobs: torch.Tensor, old_logprobs: torch.Tensor, low: float | None, high: float | None,
                log_ratio_clamp: float | None, backend: str) -> torch.Tensor:
    out = _per_token(logprobs, old_logprobs)
    if out.numel():
        launchers(backend, "kl").importance_weights_fwd(logprobs, old_logprobs, *_bounds(low, high, log_ratio_clamp),
                                                        out)
    return out


@_weights_op.register_fake
def _(logprobs, old_logprobs, low, high, log_ratio_clamp, backend):
    return _per_token(logprobs, old_logprobs)


@custom_op("fastrlhf::importance_weights_backward", mutates_args=())
def _weights_bwd_op(grad: torch.Tensor, logprobs: torch.Tensor, old_logprobs: torch.Tensor, low: float | None,
                    high: float | None, log_ratio_clamp: float | None, want_logp: bool, want_old: bool,
                    backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    dlogp, dold = _gradients(logprobs, old_logprobs, want_logp, want_old)
    if logprobs.numel() and (want_logp or want_old):
        launchers(backend, "kl").importance_weights_bwd(grad, logprobs, old_logprobs,
                                                        *_bounds(low, high, log_ratio_clamp), dlogp, dold)
    return dlogp, dold


@_weights_bwd_op.register_fake
def _(grad, logprobs, old_logprobs, low, high, log_ratio_clamp, want_logp, want_old, backend):
    return _gradients(logprobs, old_logprobs, want_logp, want_old)


def _weights_backward(ctx, grad):
    want_logp, want_old = ctx.needs_input_grad[:2]
    dlogp, dold = _weights_bwd_op(grad, *ctx.saved_tensors, *ctx.args, want_logp, want_old, ctx.backend)
    return (dlogp if want_logp else None), (dold if want_old else None), None, None, None, None


def _weights_setup_context(ctx, inputs, output):
    logprobs, old_logprobs, *args, ctx.backend = inputs
    ctx.args = args
    ctx.save_for_backward(logprobs, old_logprobs)


_weights_op.register_autograd(_weights_backward, setup_context=_weights_setup_context)


# ---------------------------------------------------------------- kl_penalized_rewards op
@custom_op("fastrlhf::kl_penalized_rewards", mutates_args=())
def _kl_rewards_op(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                   mask: torch.Tensor, kl_coef: float, kl_coef_t: torch.Tensor | None, estimator: str,
                   kl_clamp: float | None, log_ratio_clamp: float | None, score_clip: float | None,
                   cu_seqlens: torch.Tensor | None, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    rewards, kl = _per_token(logprobs, ref_logprobs), _per_token(logprobs, ref_logprobs)
    if rewards.numel():
        est, _, *bounds = _kernel_args(estimator, kl_clamp, log_ratio_clamp, score_clip)
        launchers(backend, "kl").kl_penalized_rewards_fwd(scores, logprobs, ref_logprobs, mask, kl_coef,
                                                          kl_coef_t, est, *bounds, rewards, kl,
                                                          *([] if cu_seqlens is None else [cu_seqlens]))
    return rewards, kl


@_kl_rewards_op.register_fake
def _(scores, logprobs, ref_logprobs, mask, kl_coef, kl_coef_t, estimator, kl_clamp,
      log_ratio_clamp, score_clip, cu_seqlens, backend):
    return _per_token(logprobs, ref_logprobs), _per_token(logprobs, ref_logprobs)


# ------------------------------------------------------------------------- public API
def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, *, estimator: str = "k1",
               clamp: float | None = None, log_ratio_clamp: float | None = None,
               backend: str = "auto") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from the log-ratio ``lr = logprobs - ref_logprobs``.

    Estimators: ``"k1"`` = ``lr``; ``"abs"`` = ``|lr|``; ``"k2"`` (alias ``"mse"``) =
    ``0.5 * lr**2``; ``"k3"`` (alias ``"low_var_kl"``) = ``exp(-lr) - 1 + lr``. Appending
    ``"+"`` (``"k3+"``, ``"k1+"``, ...) makes it straight-through: the forward value of the
    estimator, the gradient of ``k2`` (``lr``, on the unclamped log-ratio, clamps ignored).

    Args:
        logprobs, ref_logprobs: float tensors of one shape (any; bf16/fp16/fp32/fp64, dtypes may
            differ), on one device. Both get gradients.
        clamp: ``None`` or a float ``c > 0``: the estimate is clamped to ``[-c, c]``
            (the OpenRLHF convention is ``clamp=10`` for every estimator).
        log_ratio_clamp: ``None`` or a float ``c > 0``: ``lr`` is clamped to ``[-c, c]``
            before the estimator. verl's k3 is ``estimator="k3", log_ratio_clamp=20, clamp=10``.
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"cuda"`` (see ``fastrlhf.backend``).

    Returns:
        The estimate, fp32 (fp64 when an input is fp64), of ``logprobs.shape``.

    Precision: every estimate and gradient is within a few ulps (relative) of the exact value on
    every backend; ``k3`` near ``lr = 0`` too, where ``exp(-lr) - 1 + lr`` written directly
    cancels (1e-5 relative error at ``lr = -0.11`` in fp32): fastrlhf takes the Taylor series of
    ``e**y - 1 - y`` for ``-2 < lr < 1`` and ``expm1`` / cancellation-free closed forms beyond
    (``fastrlhf.reference.kl.k3_parts``). The gradient of ``k3`` is ``-expm1(-lr)``. (Beyond the
    series range, fp32 Triton on a GPU adds the error of its fast ``exp``, growing with ``|lr|``.)

    Gradients (non-``+`` estimators) are those of the formula and 0 where a clamp is active
    (strictly beyond its bound); ``abs`` has gradient 0 at ``lr = 0``. Without clamps ``k3``
    overflows to ``+inf`` (gradient ``-inf``) for ``lr < -88`` in fp32: set ``log_ratio_clamp``.
    Memory (triton): the output; backward allocates only the gradients asked for.
    """
    _checks.matching(("logprobs", "ref_logprobs"), (logprobs, ref_logprobs))
    _checks.choice("estimator", estimator, ESTIMATORS)
    clamp = _checks.optional_positive("clamp", clamp)
    log_ratio_clamp = _checks.optional_positive("log_ratio_clamp", log_ratio_clamp)
    name = resolve_backend(backend, logprobs.device, "kl")
    return kl_penalty_op(logprobs, ref_logprobs, estimator, clamp, log_ratio_clamp, name)


def importance_weights(logprobs: torch.Tensor, old_logprobs: torch.Tensor, *, low: float | None = None,
                       high: float | None = 2.0, log_ratio_clamp: float | None = 20.0,
                       backend: str = "auto") -> torch.Tensor:
    """Per-token clipped importance weights ``clamp(exp(clamp(lr, +-log_ratio_clamp)), low, high)`` of
    the log-ratio ``lr = logprobs - old_logprobs``.

    The defaults are verl's token-level truncated importance sampling against the rollout engine
    (``rollout_is="token"``, ``rollout_is_threshold=2``: ``importance_weights(old_logprobs,
    rollout_logprobs)``, detached, is its ``rollout_is_weights``); ``low`` adds a lower bound (a
    band, e.g. ``(0.5, 5.0)``). Weights a trainer multiplies into a loss are detached; the op
    also differentiates (``d weight / d lr = weight`` where no clamp is active, else 0), for
    losses that use the clipped ratio itself.

    Args:
        logprobs, old_logprobs: float tensors of one shape (any; bf16/fp16/fp32/fp64, dtypes may
            differ), on one device. Both get gradients.
        low, high: ``None`` (no bound) or a float; ``0 <= low <= high``, ``high > 0``.
        log_ratio_clamp: ``None`` or a float ``c > 0``: ``lr`` is clamped to ``[-c, c]`` before
            ``exp`` (verl's 20: no overflow).
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` (see ``fastrlhf.backend``).

    Returns:
        The weights, fp32 (fp64 when an input is fp64), of ``logprobs.shape``; never negative.
        Memory (triton): the output; backward allocates only the gradients asked for.

    >>> w = fastrlhf.importance_weights(old_logp, rollout_logp, high=2.0).detach()
    """
    _checks.matching(("logprobs", "old_logprobs"), (logprobs, old_logprobs))
    low = None if low is None else _checks.non_negative("low", low)
    high = _checks.optional_positive("high", high)
    if low is not None and high is not None and low > high:
        raise ValueError(f"low must be <= high, got low={low} and high={high}")
    log_ratio_clamp = _checks.optional_positive("log_ratio_clamp", log_ratio_clamp)
    name = resolve_backend(backend, logprobs.device, "kl", "importance_weights")
    return _weights_op(logprobs, old_logprobs, low, high, log_ratio_clamp, name)


def kl_penalized_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                         mask: torch.Tensor, *, kl_coef, estimator: str = "k1",
                         kl_clamp: float | None = None, log_ratio_clamp: float | None = None,
                         score_clip: float | None = None, cu_seqlens: torch.Tensor | None = None,
                         backend: str = "auto"):
    """Per-token PPO rewards: a KL penalty on every valid token plus the sequence score at the end.

    ``rewards[b, t] = -kl_coef * kl[b, t]`` where ``mask[b, t] != 0`` (holes allowed), 0
    elsewhere; the score of row ``b`` (clipped to ``+-score_clip`` first, when given) is added
    at the row's last valid token. A row with no valid token gets no score (all zeros).

    Args:
        scores: ``[B]`` float sequence scores (reward-model outputs).
        logprobs, ref_logprobs: ``[B, T]`` float; read in place when the last dim has unit stride.
        mask: ``[B, T]`` bool, integer or float; a token is valid where ``mask != 0``.
        kl_coef: a Python float ``>= 0`` (a negative one would reward divergence: ``ValueError``),
            or a 0-dim float tensor on the inputs' device (read on the device: an adaptive
            coefficient neither syncs nor recompiles under ``torch.compile``; its sign is not
            checked, as that would read it on the host).
        estimator, kl_clamp, log_ratio_clamp: as ``estimator``, ``clamp`` and
            ``log_ratio_clamp`` of :func:`kl_penalty`.
        score_clip: ``None`` or a float ``c > 0`` (OpenRLHF clips scores to ``+-10``).

    Returns:
        ``(rewards, kl)``, both ``[B, T]`` fp32 (fp64 when a log-prob input is fp64); ``kl`` is
        0 outside the mask. Outputs carry no gradient (trainers compute rewards under
        ``no_grad``); inputs that require grad are read detached.

    Packed sequences: with ``cu_seqlens`` (int32 ``[S + 1]``, see ``fastrlhf._checks.cu_seqlens``)
    ``logprobs``, ``ref_logprobs`` and ``mask`` are 1-D ``[total]``, ``scores`` is ``[S]`` and
    each sequence gets its score at its own last valid token; outputs are ``[total]``.

    Memory (triton): the two outputs, nothing else; one kernel.

    >>> rewards, kl = fastrlhf.kl_penalized_rewards(scores, logp, ref_logp, mask, kl_coef=0.05, estimator="k3")
    """
    packed_layout = cu_seqlens is not None
    _checks.matching(("logprobs", "ref_logprobs"), (logprobs, ref_logprobs), dim=1 if packed_layout else 2)
    B = _checks.cu_seqlens("cu_seqlens", cu_seqlens, logprobs.numel(), logprobs.device) if packed_layout \
        else logprobs.shape[0]
    _checks.tensor("scores", scores, _checks.FLOAT_DTYPES, dim=1)
    _checks.same_shape("scores", scores, (B,), "one per sequence")
    _checks.same_device("scores", scores, logprobs.device)
    _checks.mask("mask", mask, logprobs.shape, logprobs.device)
    _checks.choice("estimator", estimator, ESTIMATORS)
    kl_clamp = _checks.optional_positive("kl_clamp", kl_clamp)
    log_ratio_clamp = _checks.optional_positive("log_ratio_clamp", log_ratio_clamp)
    score_clip = _checks.optional_positive("score_clip", score_clip)
    coef, coef_t = _check_coef(kl_coef, logprobs.device)
    name = resolve_backend(backend, logprobs.device, "kl", "packed" if packed_layout else None)
    return _kl_rewards_op(scores.detach(), logprobs.detach(), ref_logprobs.detach(), mask.detach(), coef,
                          coef_t, estimator, kl_clamp, log_ratio_clamp, score_clip, cu_seqlens, name)


def _check_coef(kl_coef, device: torch.device) -> tuple[float, torch.Tensor | None]:
    if isinstance(kl_coef, torch.Tensor):
        if not kl_coef.is_floating_point() or kl_coef.dim() != 0:
            raise TypeError(f"kl_coef must be a Python float or a 0-dim float tensor, got a "
                            f"{kl_coef.dtype} tensor of shape {tuple(kl_coef.shape)}")
        _checks.same_device("kl_coef", kl_coef, device)
        return 0.0, kl_coef.detach()
    if isinstance(kl_coef, bool) or not isinstance(kl_coef, (int, float)):
        raise TypeError(f"kl_coef must be a Python float or a 0-dim float tensor, got {type(kl_coef).__name__}")
    return _checks.non_negative("kl_coef", kl_coef), None


# ---------------------------------------------------------------------- controllers
class FixedKLController:
    """A constant KL coefficient: ``.value`` never changes; ``update`` is a no-op."""

    def __init__(self, coef: float):
        self.value = _checks.non_negative("coef", coef)

    def update(self, current_kl=None, n_steps: int = 1) -> float:
        return self.value


class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al. 2019; as in verl and OpenRLHF).

    ``update(current_kl, n_steps)``: ``err = clip(current_kl / target - 1, -0.2, 0.2)``, then
    ``value *= 1 + err * min(n_steps / horizon, 1)``. ``current_kl`` may be a float or a 0-dim
    tensor (read with one host sync, once per update). Returns the new ``.value``.

    The step fraction ``n_steps / horizon`` is capped at 1, so one update moves the
    coefficient by at most 20 % and it never turns negative. verl 0.9.1 and OpenRLHF 0.11.2
    leave it uncapped, which makes the factor negative (a coefficient that rewards
    divergence) once ``n_steps > 5 * horizon``; while ``n_steps <= horizon`` (the usual case)
    the two agree exactly.
    """

    def __init__(self, init_coef: float, target: float, horizon: float):
        self.value = _checks.non_negative("init_coef", init_coef)
        self.target = _checks.positive("target", target)
        self.horizon = _checks.positive("horizon", horizon)

    def update(self, current_kl, n_steps: int) -> float:
        kl = float(current_kl)
        if not math.isfinite(kl):
            raise ValueError(f"current_kl must be finite, got {kl}")
        _checks.integer("n_steps", n_steps)
        if n_steps < 0:
            raise ValueError(f"n_steps must be >= 0, got {n_steps}")
        err = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + err * min(n_steps / self.horizon, 1.0)
        return self.value
