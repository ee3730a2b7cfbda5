"""PPO clipped policy loss, clipped value loss and loss aggregation.

Chain: public function (checks, backend choice) → ``torch.library`` custom op with fake and
autograd registrations → backend launcher (``fastrlhf.triton.ppo``) or the reference
(``fastrlhf.reference.ppo``).

Aggregation modes (``agg``), over the valid tokens (``mask != 0``) of a ``[B, T]`` loss:

* ``"token-mean"``: sum / number of valid tokens (``global_tokens`` replaces that count).
* ``"token-sum"``: sum.
* ``"seq-mean-token-sum"``: sum / number of rows with a valid token (``global_seqs``
  replaces that count).
* ``"seq-mean-token-mean"``: sum over rows of (row sum / row token count), divided by the
  number of rows with a valid token (or ``global_seqs``).
* ``"seq-mean-token-sum-norm"``: sum / (number of rows with a valid token x
  ``loss_scale_factor``), the factor defaulting to ``T`` (Dr. GRPO; verl >= 0.9).
  ``global_seqs`` replaces the row count.

Fully masked rows count for nothing; a normalizing count ``<= 0`` (an all-zero mask, ``B = 0``,
``T = 0``) gives loss 0 and zero gradients, never NaN. Global counts are for data parallelism:
each rank passes the count summed over ranks and gets its share of the global loss; when the
data-parallel wrapper averages gradients over ranks (DDP/FSDP), also multiply the loss by the
world size (verl's ``dp_size`` factor). Pass counts that change every step as 0-dim tensors
(read on the device: no sync, no recompilation under ``torch.compile``).
"""

from __future__ import annotations

import torch

from fastrlhf import _checks
from fastrlhf._numerics import acc_dtype
from fastrlhf.backend import launchers, resolve_backend
from fastrlhf.reference import ppo as ref

AGG_MODES = ref.AGG_MODES


_NORMALIZER = {"token-mean": "global_tokens", "seq-mean-token-sum": "global_seqs",
               "seq-mean-token-mean": "global_seqs", "seq-mean-token-sum-norm": "loss_scale_factor"}
"""The keyword that overrides each mode's normalizer (``token-sum`` has none)."""


def _ref_counts(agg: str, denom) -> dict:
    """Keyword arguments of the reference for the normalizer ``denom`` of mode ``agg``."""
    if agg == "seq-mean-token-sum-norm" and denom is not None:  # denom = sequences x factor
        return {"global_seqs": 1, "loss_scale_factor": denom}
    return {_NORMALIZER[agg]: denom} if agg in _NORMALIZER else {}


def _fake_aux(x: torch.Tensor, agg: str, dtype: torch.dtype):
    scale = x.new_empty((), dtype=dtype)
    rows = x.new_empty(x.shape[0] if agg == "seq-mean-token-mean" else 0, dtype=torch.int64)
    return scale, rows


def _torch_aux(mask, agg, denom, dtype):
    scale, rows = ref.loss_scale(mask, agg, denom, dtype)
    return scale, (rows if rows is not None else torch.empty(0, dtype=torch.int64, device=mask.device))


# ----------------------------------------------------------------------- policy loss op
@torch.library.custom_op("fastrlhf::ppo_policy_loss", mutates_args=())
def _policy_op(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
               mask: torch.Tensor, clip_low: float, clip_high: float, dual_clip: float | None,
               log_ratio_clamp: float | None, agg: str, denom: float | None,
               denom_t: torch.Tensor | None, backend: str
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    denom = denom if denom_t is None else denom_t
    clips = (clip_low, clip_high, dual_clip, log_ratio_clamp)
    if backend != "torch":
        kernels = launchers(backend, "ppo")
        loss, stats, scale, rows = kernels.ppo_loss_fwd(False, logprobs, old_logprobs, advantages, mask,
                                                        clips, agg, denom)
        return loss, *stats, scale, rows
    with torch.no_grad():
        loss, stats = ref.ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip_low,
                                          clip_high, dual_clip, agg, log_ratio_clamp=log_ratio_clamp,
                                          **_ref_counts(agg, denom))
        scale, rows = _torch_aux(mask, agg, denom, loss.dtype)
        return loss, stats["clipfrac"], stats["clipfrac_lower"], stats["approx_kl"], scale, rows


@_policy_op.register_fake
def _(logprobs, old_logprobs, advantages, mask, clip_low, clip_high, dual_clip, log_ratio_clamp,
      agg, denom, denom_t, backend):
    dtype = acc_dtype(logprobs, old_logprobs, advantages)
    loss = logprobs.new_empty((), dtype=dtype)
    return (loss, torch.empty_like(loss), torch.empty_like(loss), torch.empty_like(loss),
            *_fake_aux(logprobs, agg, dtype))


@torch.library.custom_op("fastrlhf::ppo_policy_loss_backward", mutates_args=())
def _policy_bwd_op(grad: torch.Tensor, scale: torch.Tensor, logprobs: torch.Tensor,
                   old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                   row_counts: torch.Tensor, clip_low: float, clip_high: float,
                   dual_clip: float | None, log_ratio_clamp: float | None, agg: str,
                   backend: str) -> torch.Tensor:
    clips = (clip_low, clip_high, dual_clip, log_ratio_clamp)
    if backend != "torch":
        kernels = launchers(backend, "ppo")
        return kernels.ppo_loss_bwd(False, grad, scale, logprobs, old_logprobs, advantages, mask, row_counts,
                                    clips, agg)
    rows = row_counts if agg == "seq-mean-token-mean" else None
    return ref.ppo_policy_loss_backward(grad, logprobs, old_logprobs, advantages, mask, scale, rows,
                                        *clips).contiguous()


@_policy_bwd_op.register_fake
def _(grad, scale, logprobs, old_logprobs, advantages, mask, row_counts, clip_low, clip_high,
      dual_clip, log_ratio_clamp, agg, backend):
    return torch.empty_like(logprobs, memory_format=torch.contiguous_format)


def _policy_setup_context(ctx, inputs, output):
    logprobs, old_logprobs, advantages, mask, clip_low, clip_high, dual_clip, log_ratio_clamp, agg, *_, \
        backend = inputs
    ctx.save_for_backward(logprobs, old_logprobs, advantages, mask, output[4], output[5])
    ctx.args = (clip_low, clip_high, dual_clip, log_ratio_clamp, agg, backend)


def _policy_backward(ctx, grad, *_):
    logprobs, old_logprobs, advantages, mask, scale, rows = ctx.saved_tensors
    if grad is None:
        grad = torch.zeros_like(scale)
    dlogp = _policy_bwd_op(grad, scale, logprobs, old_logprobs, advantages, mask, rows, *ctx.args)
    return (dlogp,) + (None,) * 11


_policy_op.register_autograd(_policy_backward, setup_context=_policy_setup_context)


# ------------------------------------------------------------------------ value loss op
@torch.library.custom_op("fastrlhf::ppo_value_loss", mutates_args=())
def _value_op(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
              mask: torch.Tensor, clip: float | None, agg: str, denom: float | None,
              denom_t: torch.Tensor | None, backend: str
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    denom = denom if denom_t is None else denom_t
    if backend != "torch":
        kernels = launchers(backend, "ppo")
        loss, (clipfrac,), scale, rows = kernels.ppo_loss_fwd(True, values, old_values, returns, mask,
                                                              (clip,), agg, denom)
        return loss, clipfrac, scale, rows
    with torch.no_grad():
        loss, stats = ref.ppo_value_loss(values, old_values, returns, mask, clip, agg,
                                         **_ref_counts(agg, denom))
        return loss, stats["vf_clipfrac"], *_torch_aux(mask, agg, denom, loss.dtype)


@_value_op.register_fake
def _(values, old_values, returns, mask, clip, agg, denom, denom_t, backend):
    dtype = acc_dtype(values, old_values, returns)
    loss = values.new_empty((), dtype=dtype)
    return loss, torch.empty_like(loss), *_fake_aux(values, agg, dtype)


@torch.library.custom_op("fastrlhf::ppo_value_loss_backward", mutates_args=())
def _value_bwd_op(grad: torch.Tensor, scale: torch.Tensor, values: torch.Tensor,
                  old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                  row_counts: torch.Tensor, clip: float | None, agg: str, backend: str) -> torch.Tensor:
    if backend != "torch":
        kernels = launchers(backend, "ppo")
        return kernels.ppo_loss_bwd(True, grad, scale, values, old_values, returns, mask, row_counts, (clip,), agg)
    rows = row_counts if agg == "seq-mean-token-mean" else None
    return ref.ppo_value_loss_backward(grad, values, old_values, returns, mask, scale, rows,
                                       clip).contiguous()


@_value_bwd_op.register_fake
def _(grad, scale, values, old_values, returns, mask, row_counts, clip, agg, backend):
    return torch.empty_like(values, memory_format=torch.contiguous_format)


def _value_setup_context(ctx, inputs, output):
    values, old_values, returns, mask, clip, agg, *_, backend = inputs
    ctx.save_for_backward(values, old_values, returns, mask, output[2], output[3])
    ctx.args = (clip, agg, backend)


def _value_backward(ctx, grad, *_):
    values, old_values, returns, mask, scale, rows = ctx.saved_tensors
    if grad is None:
        grad = torch.zeros_like(scale)
    return (_value_bwd_op(grad, scale, values, old_values, returns, mask, rows, *ctx.args),) + (None,) * 8


_value_op.register_autograd(_value_backward, setup_context=_value_setup_context)


# ------------------------------------------------------------------------- public API
def _check_count(name: str, value, device: torch.device):
    """``None``, a finite Python number ``>= 0`` or a 0-dim real tensor on ``device``."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or value.dtype.is_complex or value.dtype == torch.bool:
            raise TypeError(f"{name} must be a Python number or a 0-dim int/float tensor, got a "
                            f"{value.dtype} tensor of shape {tuple(value.shape)}")
        _checks.same_device(name, value, device)
        return value.detach()
    return _checks.non_negative(name, value)


def _denom(agg, mask, global_tokens, global_seqs, loss_scale_factor):
    """``(float or None, tensor or None)``: the normalizer override that mode ``agg`` uses
    (``None``: the mode's local count, computed by the backend)."""
    device = mask.device
    counts = {"global_tokens": _check_count("global_tokens", global_tokens, device),
              "global_seqs": _check_count("global_seqs", global_seqs, device),
              "loss_scale_factor": _check_count("loss_scale_factor", loss_scale_factor, device)}
    if agg == "seq-mean-token-sum-norm":  # sequences x factor; either may be overridden
        seqs, factor = counts["global_seqs"], counts["loss_scale_factor"]
        if seqs is None and factor is None:
            return None, None
        if seqs is None:
            seqs = (mask != 0).any(-1).sum()
        value = seqs * (mask.shape[-1] if factor is None else factor)
    else:
        value = counts[_NORMALIZER[agg]] if agg in _NORMALIZER else None
    return (None, value) if isinstance(value, torch.Tensor) else (value, None)


def _check_inputs(names, tensors, mask):
    _checks.matching(names, tensors, dim=2)
    _checks.mask("mask", mask, tensors[0].shape, tensors[0].device)


def ppo_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                    mask: torch.Tensor, *, clip_low: float = 0.2, clip_high: float | None = None,
                    dual_clip: float | None = None, agg: str = "token-mean", global_tokens=None,
                    global_seqs=None, loss_scale_factor=None, log_ratio_clamp: float | None = 20.0,
                    backend: str = "auto"):
    """The clipped PPO surrogate loss (with optional asymmetric and dual clipping), aggregated.

    Per token: ``ratio = exp(clamp(logprobs - old_logprobs, +-log_ratio_clamp))``,
    ``loss = max(-A * ratio, -A * clip(ratio, 1 - clip_low, 1 + clip_high))`` and, with
    ``dual_clip = c``, for ``A < 0``: ``min(loss, -A * c)``. Then aggregated over the valid
    tokens by ``agg`` (see the module docstring for the modes and counts).

    Args:
        logprobs: ``[B, T]`` float, the policy's log-probs; the only input with a gradient.
        old_logprobs, advantages: ``[B, T]`` float (any float dtypes), on the same device.
        mask: ``[B, T]`` bool/int/float; a token is valid where ``mask != 0`` (holes allowed;
            the values are not weights).
        clip_low, clip_high: clip ranges ``> 0`` (``clip_high`` defaults to ``clip_low``).
        dual_clip: ``None`` or ``c > 1`` (3.0 is usual).
        agg: aggregation mode; ``global_tokens`` / ``global_seqs`` / ``loss_scale_factor``:
            ``None``, a number ``>= 0`` or a 0-dim tensor, used by the modes that need them.
        log_ratio_clamp: ``None`` or ``> 0``: the log-ratio is clamped before ``exp`` (20, as
            verl); the gradient is 0 where it is active.
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"cuda"``.

    Returns:
        ``(loss, stats)``: ``loss`` a 0-dim fp32 tensor (fp64 for fp64 inputs); ``stats`` a
        dict of detached 0-dim tensors over this call's valid tokens (local counts, never the
        global ones; 0 when there is no valid token):
        ``clipfrac`` (fraction where the clipped surrogate is strictly larger),
        ``clipfrac_lower`` (fraction where dual clip caps the loss; 0 without dual clip),
        ``approx_kl`` (mean of ``-clamped log-ratio``, verl's ``ppo_kl``).

    Gradient per valid token: ``-A * ratio * weight`` where the unclipped surrogate is
    chosen, else 0. Invalid tokens are never read into the loss (NaN there is harmless).
    Memory (triton): five partial sums per 1024 tokens; the ``seq-mean-token-*`` modes also
    count each row's valid tokens with a torch ``(mask != 0).sum(-1)`` (``[B]`` int64, one
    extra read of the mask; not needed for ``seq-mean-token-sum`` with ``global_seqs``).
    Backward allocates only the gradient.
    """
    _check_inputs(("logprobs", "old_logprobs", "advantages"), (logprobs, old_logprobs, advantages), mask)
    clip_low = _checks.positive("clip_low", clip_low)
    clip_high = clip_low if clip_high is None else _checks.positive("clip_high", clip_high)
    if dual_clip is not None:
        _checks.positive("dual_clip", dual_clip)
        if dual_clip <= 1:
            raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
        dual_clip = float(dual_clip)
    log_ratio_clamp = _checks.optional_positive("log_ratio_clamp", log_ratio_clamp)
    _checks.choice("agg", agg, AGG_MODES)
    denom, denom_t = _denom(agg, mask, global_tokens, global_seqs, loss_scale_factor)
    name = resolve_backend(backend, logprobs.device, "ppo")
    loss, clipfrac, lower, approx_kl, _, _ = _policy_op(
        logprobs, old_logprobs, advantages, mask, clip_low, clip_high, dual_clip, log_ratio_clamp,
        agg, denom, denom_t, name)
    return loss, {"clipfrac": clipfrac.detach(), "clipfrac_lower": lower.detach(),
                  "approx_kl": approx_kl.detach()}


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                   mask: torch.Tensor, *, clip: float | None = None, agg: str = "token-mean",
                   global_tokens=None, global_seqs=None, loss_scale_factor=None,
                   backend: str = "auto"):
    """The (clipped) value loss ``0.5 * agg(max((v - R)**2, (clip(v, old -+ clip) - R)**2))``.

    Args:
        values: ``[B, T]`` float, the critic's predictions; the only input with a gradient.
        old_values, returns: ``[B, T]`` float, on the same device.
        mask, agg, global_tokens, global_seqs, loss_scale_factor, backend: as
            :func:`ppo_policy_loss`.
        clip: ``None`` (plain ``0.5 * (v - R)**2``) or ``> 0``.

    Returns:
        ``(loss, {"vf_clipfrac": ...})``: 0-dim fp32 (fp64 for fp64 inputs); ``vf_clipfrac``
        is the fraction of valid tokens where the clipped term is strictly larger.
    """
    _check_inputs(("values", "old_values", "returns"), (values, old_values, returns), mask)
    clip = _checks.optional_positive("clip", clip)
    _checks.choice("agg", agg, AGG_MODES)
    denom, denom_t = _denom(agg, mask, global_tokens, global_seqs, loss_scale_factor)
    name = resolve_backend(backend, values.device, "ppo")
    loss, clipfrac, _, _ = _value_op(values, old_values, returns, mask, clip, agg, denom, denom_t, name)
    return loss, {"vf_clipfrac": clipfrac.detach()}


def aggregate(loss_mat: torch.Tensor, mask: torch.Tensor, mode: str = "token-mean", *,
              global_tokens=None, global_seqs=None, loss_scale_factor=None) -> torch.Tensor:
    """Aggregate a per-token ``[B, T]`` loss into a scalar, over the valid tokens (``mask != 0``).

    Modes and counts as in the module docstring. Plain differentiable PyTorch (no kernel):
    for any per-token loss (entropy bonus, KL loss, ...). Returns a 0-dim fp32 tensor (fp64
    for fp64 input); invalid tokens are selected away, never multiplied (NaN there is harmless).
    """
    _check_inputs(("loss_mat",), (loss_mat,), mask)
    _checks.choice("mode", mode, AGG_MODES)
    denom, denom_t = _denom(mode, mask, global_tokens, global_seqs, loss_scale_factor)
    return ref.aggregate(loss_mat, mask, mode, **_ref_counts(mode, denom if denom_t is None else denom_t))
