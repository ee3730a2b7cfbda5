"""PPO clipped policy loss, clipped value loss and loss aggregation.

Chain: public function (checks, backend choice) → ``torch.library`` custom op with fake and
autograd registrations → backend launcher (``fastrlhf.triton.ppo``, ``fastrlhf.cuda.ppo``),
which fills per-tile partial sums that the op adds and normalizes here, or the reference
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

Packed sequences: with ``cu_seqlens`` (int32 ``[S + 1]``, flash-attention's varlen offsets) the
inputs are 1-D ``[total]`` and a "row" above is a packed sequence ``[cu[s], cu[s+1])`` (empty ones
allowed, holes still masked); the result equals the padded one. ``seq-mean-token-sum-norm`` then
needs ``loss_scale_factor`` (no padded length ``T`` to default to).

Fully masked rows count for nothing; a normalizing count ``<= 0`` (an all-zero mask, ``B = 0``,
``T = 0``) gives loss 0 and zero gradients, never NaN. Global counts are for data parallelism:
each rank passes the count summed over ranks and gets its share of the global loss; when the
data-parallel wrapper averages gradients over ranks (DDP/FSDP), also multiply the loss by the
world size (verl's ``dp_size`` factor). Pass counts that change every step as 0-dim tensors
(read on the device: no sync, no recompilation under ``torch.compile``; a CPU one is copied
to the inputs' device).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from fastrlhf import _checks
from fastrlhf._numerics import acc_dtype
from fastrlhf.backend import launchers, resolve_backend
from fastrlhf.reference import ppo as ref

AGG_MODES = ref.AGG_MODES


class PolicyClip(NamedTuple):
    """The policy kernels' clip arguments; an option that is off is ``inf`` (it changes nothing,
    so no kernel specializes on it)."""

    ratio_low: float  # 1 - clip_low
    ratio_high: float  # 1 + clip_high
    dual_clip: float
    log_ratio_clamp: float

    @classmethod
    def of(cls, clip_low, clip_high, dual_clip, log_ratio_clamp) -> PolicyClip:
        return cls(1.0 - clip_low, 1.0 + clip_high, _inf(dual_clip), _inf(log_ratio_clamp))


def _inf(x: float | None) -> float:
    return math.inf if x is None else x


# ------------------------------------------------------------ normalization (second stage)
def _safe_div(total: torch.Tensor, count) -> torch.Tensor:
    """``total / count`` (elementwise, ``count`` broadcast), and 0 where ``count <= 0``. Few
    small ops: on small batches the host's launches, not the kernels, set the time."""
    count = torch.as_tensor(count, dtype=total.dtype, device=total.device)
    return torch.where(count > 0, total / count, 0.0)


def _row_counts(mask: torch.Tensor, agg: str) -> torch.Tensor | None:
    """Valid tokens per row (int64 ``[B]``), by which ``seq-mean-token-mean`` weighs each token."""
    return (mask != 0).sum(-1) if agg == "seq-mean-token-mean" else None


def _scale(mask, agg, counts, dtype, n_tokens=None, row_counts=None) -> torch.Tensor:
    """0-dim ``scale`` with ``aggregate = scale * sum(w * loss)`` over the valid tokens (``w`` from
    :func:`_row_counts`), 0 when the normalizer is ``<= 0``. ``counts`` = (global_tokens,
    global_seqs, loss_scale_factor), each a 0-dim tensor or None (the local count);
    ``n_tokens`` / ``row_counts``: counts the kernels already made."""
    global_tokens, global_seqs, factor = counts
    one = torch.ones((), dtype=dtype, device=mask.device)
    if agg == "token-sum":
        return one
    if agg == "token-mean":
        if global_tokens is not None:
            return _safe_div(one, global_tokens)
        return _safe_div(one, (mask != 0).sum() if n_tokens is None else n_tokens)
    seqs = global_seqs
    if seqs is None:
        seqs = ((mask != 0).sum(-1) if row_counts is None else row_counts).gt(0).sum()
    if agg == "seq-mean-token-sum-norm":
        seqs = seqs * (mask.shape[-1] if factor is None else factor)
    return _safe_div(one, seqs)


def _partials(x, n_sums, n_counts, dtype, kernels):
    """Empty partial sums ``[n_sums, P]`` and counts ``[n_counts, P]`` for the forward kernels."""
    P = -(-x.numel() // kernels.TOKENS_PER_PARTIAL)
    return (torch.empty((n_sums, P), dtype=dtype, device=x.device),
            torch.empty((n_counts, P), dtype=torch.int32, device=x.device))


def _reduce(sums, counts):
    """``(total, valid tokens, stats)`` from the partials, summed in a fixed order (same input,
    same bits): ``stats`` (1-D) are the clipped fractions (counts[1:] / valid) and, for the
    policy, the mean minus log-ratio (sums[1] / valid)."""
    s, c = sums.sum(1), counts.sum(1)
    return s[0], c[0], _safe_div(torch.cat([c[1:].to(s.dtype), s[1:]]), c[0])


def _or_empty(row_counts, mask):
    return row_counts if row_counts is not None else torch.empty(0, dtype=torch.int64, device=mask.device)


def _aux_fake(x, agg, dtype):
    return x.new_empty((), dtype=dtype), x.new_empty(x.shape[0] if agg == "seq-mean-token-mean" else 0,
                                                      dtype=torch.int64)


POLICY_STATS = ("clipfrac", "clipfrac_lower", "approx_kl")


def policy_result(outputs) -> tuple[torch.Tensor, dict]:
    """``(loss, stats)`` of ``_policy_op``'s outputs, the statistics by name (detached)."""
    loss, stats, _, _ = outputs
    return loss, dict(zip(POLICY_STATS, stats.detach().unbind()))


def _none_but_first(ctx, grad):
    return (grad, *[None] * (len(ctx.needs_input_grad) - 1))


# ----------------------------------------------------------------------- policy loss op
@torch.library.custom_op("fastrlhf::ppo_policy_loss", mutates_args=())
def _policy_op(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
               mask: torch.Tensor, clip_low: float, clip_high: float, dual_clip: float | None,
               log_ratio_clamp: float | None, agg: str, global_tokens: torch.Tensor | None,
               global_seqs: torch.Tensor | None, loss_scale_factor: torch.Tensor | None, backend: str
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, [clipfrac, clipfrac_lower, approx_kl], scale, row_counts)``; the last two for backward."""
    counts = (global_tokens, global_seqs, loss_scale_factor)
    dtype = acc_dtype(logprobs, old_logprobs, advantages)
    row_counts = _row_counts(mask, agg)
    if backend == "torch":
        with torch.no_grad():
            loss, stats = ref.ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip_low, clip_high,
                                              dual_clip, agg, *counts, log_ratio_clamp=log_ratio_clamp)
        return (loss, torch.stack([stats[k] for k in POLICY_STATS]),
                _scale(mask, agg, counts, dtype, row_counts=row_counts), _or_empty(row_counts, mask))
    kernels = launchers(backend, "ppo")
    sums, parts = _partials(logprobs, 2, 3, dtype, kernels)
    if logprobs.numel():
        kernels.ppo_policy_fwd(logprobs, old_logprobs, advantages, mask, row_counts,
                               *PolicyClip.of(clip_low, clip_high, dual_clip, log_ratio_clamp), sums, parts)
    total, n_tokens, stats = _reduce(sums, parts)
    scale = _scale(mask, agg, counts, dtype, n_tokens, row_counts)
    return total * scale, stats, scale, _or_empty(row_counts, mask)


@_policy_op.register_fake
def _(logprobs, old_logprobs, advantages, mask, clip_low, clip_high, dual_clip, log_ratio_clamp,
      agg, global_tokens, global_seqs, loss_scale_factor, backend):
    dtype = acc_dtype(logprobs, old_logprobs, advantages)
    return logprobs.new_empty((), dtype=dtype), logprobs.new_empty(3, dtype=dtype), *_aux_fake(logprobs, agg, dtype)


@torch.library.custom_op("fastrlhf::ppo_policy_loss_backward", mutates_args=())
def _policy_bwd_op(grad: torch.Tensor, scale: torch.Tensor, logprobs: torch.Tensor,
                   old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                   row_counts: torch.Tensor, clip_low: float, clip_high: float,
                   dual_clip: float | None, log_ratio_clamp: float | None, agg: str,
                   backend: str) -> torch.Tensor:
    rows = row_counts if agg == "seq-mean-token-mean" else None
    if backend == "torch":
        return ref.ppo_policy_loss_backward(grad, logprobs, old_logprobs, advantages, mask, scale, rows,
                                            clip_low, clip_high, dual_clip, log_ratio_clamp).contiguous()
    dx = torch.empty(logprobs.shape, dtype=logprobs.dtype, device=logprobs.device)
    if dx.numel():
        launchers(backend, "ppo").ppo_policy_bwd(
            grad, scale, logprobs, old_logprobs, advantages, mask, rows,
            *PolicyClip.of(clip_low, clip_high, dual_clip, log_ratio_clamp), dx)
    return dx


@_policy_bwd_op.register_fake
def _(grad, scale, logprobs, old_logprobs, advantages, mask, row_counts, clip_low, clip_high,
      dual_clip, log_ratio_clamp, agg, backend):
    return torch.empty_like(logprobs, memory_format=torch.contiguous_format)


def _policy_setup_context(ctx, inputs, output):
    logprobs, old_logprobs, advantages, mask, clip_low, clip_high, dual_clip, log_ratio_clamp, agg, *_, \
        backend = inputs
    ctx.save_for_backward(logprobs, old_logprobs, advantages, mask, output[2], output[3])
    ctx.set_materialize_grads(False)  # no zero-filled gradients of the statistics
    ctx.args = (clip_low, clip_high, dual_clip, log_ratio_clamp, agg, backend)


def _policy_backward(ctx, grad, *_):
    logprobs, old_logprobs, advantages, mask, scale, rows = ctx.saved_tensors
    if grad is None:
        grad = torch.zeros_like(scale)
    return _none_but_first(ctx, _policy_bwd_op(grad, scale, logprobs, old_logprobs, advantages, mask, rows,
                                               *ctx.args))


_policy_op.register_autograd(_policy_backward, setup_context=_policy_setup_context)


# ------------------------------------------------------------------------ value loss op
@torch.library.custom_op("fastrlhf::ppo_value_loss", mutates_args=())
def _value_op(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
              mask: torch.Tensor, clip: float | None, agg: str, global_tokens: torch.Tensor | None,
              global_seqs: torch.Tensor | None, loss_scale_factor: torch.Tensor | None, backend: str
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, vf_clipfrac, scale, row_counts)``; the last two for backward."""
    counts = (global_tokens, global_seqs, loss_scale_factor)
    dtype = acc_dtype(values, old_values, returns)
    row_counts = _row_counts(mask, agg)
    if backend == "torch":
        with torch.no_grad():
            loss, stats = ref.ppo_value_loss(values, old_values, returns, mask, clip, agg, *counts)
        return (loss, stats["vf_clipfrac"], _scale(mask, agg, counts, dtype, row_counts=row_counts),
                _or_empty(row_counts, mask))
    kernels = launchers(backend, "ppo")
    sums, parts = _partials(values, 1, 2, dtype, kernels)
    if values.numel():
        kernels.ppo_value_fwd(values, old_values, returns, mask, row_counts, _inf(clip), sums, parts)
    total, n_tokens, clipfrac = _reduce(sums, parts)
    scale = _scale(mask, agg, counts, dtype, n_tokens, row_counts)
    return total * scale, clipfrac.reshape(()), scale, _or_empty(row_counts, mask)


@_value_op.register_fake
def _(values, old_values, returns, mask, clip, agg, global_tokens, global_seqs, loss_scale_factor, backend):
    dtype = acc_dtype(values, old_values, returns)
    loss = values.new_empty((), dtype=dtype)
    return loss, torch.empty_like(loss), *_aux_fake(values, agg, dtype)


@torch.library.custom_op("fastrlhf::ppo_value_loss_backward", mutates_args=())
def _value_bwd_op(grad: torch.Tensor, scale: torch.Tensor, values: torch.Tensor,
                  old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                  row_counts: torch.Tensor, clip: float | None, agg: str, backend: str) -> torch.Tensor:
    rows = row_counts if agg == "seq-mean-token-mean" else None
    if backend == "torch":
        return ref.ppo_value_loss_backward(grad, values, old_values, returns, mask, scale, rows,
                                           clip).contiguous()
    dx = torch.empty(values.shape, dtype=values.dtype, device=values.device)
    if dx.numel():
        launchers(backend, "ppo").ppo_value_bwd(grad, scale, values, old_values, returns, mask, rows,
                                                _inf(clip), dx)
    return dx


@_value_bwd_op.register_fake
def _(grad, scale, values, old_values, returns, mask, row_counts, clip, agg, backend):
    return torch.empty_like(values, memory_format=torch.contiguous_format)


def _value_setup_context(ctx, inputs, output):
    values, old_values, returns, mask, clip, agg, *_, backend = inputs
    ctx.save_for_backward(values, old_values, returns, mask, output[2], output[3])
    ctx.set_materialize_grads(False)
    ctx.args = (clip, agg, backend)


def _value_backward(ctx, grad, *_):
    values, old_values, returns, mask, scale, rows = ctx.saved_tensors
    if grad is None:
        grad = torch.zeros_like(scale)
    return _none_but_first(ctx, _value_bwd_op(grad, scale, values, old_values, returns, mask, rows, *ctx.args))


_value_op.register_autograd(_value_backward, setup_context=_value_setup_context)


# ------------------------------------------------------------------------- public API
def _check_count(name: str, value, device: torch.device):
    """``None``, a finite Python number ``>= 0`` or a 0-dim real tensor on ``device`` (or on
    the CPU, like a scalar of a torch op: copied to ``device``)."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or value.dtype.is_complex or value.dtype == torch.bool:
            raise TypeError(f"{name} must be a Python number or a 0-dim int/float tensor, got a "
                            f"{value.dtype} tensor of shape {tuple(value.shape)}")
        if value.device.type == "cpu":
            return value.detach().to(device)
        _checks.same_device(name, value, device)
        return value.detach()
    return _checks.non_negative(name, value)


def _counts(mask, global_tokens, global_seqs, loss_scale_factor) -> tuple:
    """The three normalizer overrides, checked, as 0-dim tensors on the mask's device (a Python
    number is filled in on the device: no host-device copy) or None."""
    def one(name, value):
        value = _check_count(name, value, mask.device)
        if value is None or isinstance(value, torch.Tensor):
            return value
        return torch.full((), value, dtype=torch.float64, device=mask.device)

    return (one("global_tokens", global_tokens), one("global_seqs", global_seqs),
            one("loss_scale_factor", loss_scale_factor))


def _check_inputs(names, tensors, mask, cu_seqlens=None, agg=None, loss_scale_factor=None):
    _checks.matching(names, tensors, dim=2 if cu_seqlens is None else 1)
    _checks.mask("mask", mask, tensors[0].shape, tensors[0].device)
    if cu_seqlens is not None:
        _checks.cu_seqlens("cu_seqlens", cu_seqlens, tensors[0].shape[0], tensors[0].device)
        if agg == "seq-mean-token-sum-norm" and loss_scale_factor is None:
            raise ValueError("agg='seq-mean-token-sum-norm' with cu_seqlens needs loss_scale_factor (packed "
                             "sequences have no padded length T to default to)")


def ppo_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                    mask: torch.Tensor, *, clip_low: float = 0.2, clip_high: float | None = None,
                    dual_clip: float | None = None, agg: str = "token-mean", global_tokens=None,
                    global_seqs=None, loss_scale_factor=None, log_ratio_clamp: float | None = 20.0,
                    cu_seqlens: torch.Tensor | None = None, backend: str = "auto"):
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
        cu_seqlens: int32 ``[S + 1]`` packed-sequence offsets; the inputs are then ``[total]``
            (see the module docstring). Runs the policy-loss op (``fastrlhf.policy_loss``'s
            vanilla mode: triton or torch; the cuda backend has no packed kernels).
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

    >>> loss, stats = fastrlhf.ppo_policy_loss(logp, old_logp, adv, mask, clip_low=0.2, clip_high=0.28,
    ...                                        agg="token-mean", global_tokens=n_tokens_all_ranks)
    """
    _check_inputs(("logprobs", "old_logprobs", "advantages"), (logprobs, old_logprobs, advantages), mask,
                  cu_seqlens, agg, loss_scale_factor)
    clip_low = _checks.positive("clip_low", clip_low)
    clip_high = clip_low if clip_high is None else _checks.positive("clip_high", clip_high)
    if dual_clip is not None:
        _checks.positive("dual_clip", dual_clip)
        if dual_clip <= 1:
            raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
        dual_clip = float(dual_clip)
    log_ratio_clamp = _checks.optional_positive("log_ratio_clamp", log_ratio_clamp)
    _checks.choice("agg", agg, AGG_MODES)
    counts = _counts(mask, global_tokens, global_seqs, loss_scale_factor)
    if cu_seqlens is not None:
        from fastrlhf.ops.policy_loss import packed_ppo_policy_loss  # noqa: PLC0415  (it builds on this module)

        return packed_ppo_policy_loss(logprobs, old_logprobs, advantages, mask, cu_seqlens, clip_low, clip_high,
                                      dual_clip, log_ratio_clamp, agg, counts, backend)
    name = resolve_backend(backend, logprobs.device, "ppo")
    return policy_result(_policy_op(logprobs, old_logprobs, advantages, mask, clip_low, clip_high, dual_clip,
                                    log_ratio_clamp, agg, *counts, name))


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                   mask: torch.Tensor, *, clip: float | None = None, agg: str = "token-mean",
                   global_tokens=None, global_seqs=None, loss_scale_factor=None,
                   cu_seqlens: torch.Tensor | None = None, backend: str = "auto"):
    """The (clipped) value loss ``0.5 * agg(max((v - R)**2, (clip(v, old -+ clip) - R)**2))``.

    Args:
        values: ``[B, T]`` float, the critic's predictions; the only input with a gradient.
        old_values, returns: ``[B, T]`` float, on the same device.
        mask, agg, global_tokens, global_seqs, loss_scale_factor, cu_seqlens, backend: as
            :func:`ppo_policy_loss`.
        clip: ``None`` (plain ``0.5 * (v - R)**2``) or ``> 0``.

    Returns:
        ``(loss, {"vf_clipfrac": ...})``: 0-dim fp32 (fp64 for fp64 inputs); ``vf_clipfrac``
        is the fraction of valid tokens where the clipped term is strictly larger.

    >>> loss, stats = fastrlhf.ppo_value_loss(values, old_values, returns, mask, clip=0.2)
    """
    _check_inputs(("values", "old_values", "returns"), (values, old_values, returns), mask, cu_seqlens, agg,
                  loss_scale_factor)
    clip = _checks.optional_positive("clip", clip)
    _checks.choice("agg", agg, AGG_MODES)
    counts = _counts(mask, global_tokens, global_seqs, loss_scale_factor)
    if cu_seqlens is not None:
        from fastrlhf.ops.policy_loss import packed_ppo_value_loss  # noqa: PLC0415  (it builds on this module)

        loss, clipfrac = packed_ppo_value_loss(values, old_values, returns, mask, cu_seqlens, clip, agg, counts,
                                               backend)
        return loss, {"vf_clipfrac": clipfrac.detach()}
    name = resolve_backend(backend, values.device, "ppo")
    loss, clipfrac, _, _ = _value_op(values, old_values, returns, mask, clip, agg, *counts, name)
    return loss, {"vf_clipfrac": clipfrac.detach()}


def aggregate(loss_mat: torch.Tensor, mask: torch.Tensor, mode: str = "token-mean", *,
              global_tokens=None, global_seqs=None, loss_scale_factor=None,
              cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """Aggregate a per-token ``[B, T]`` (or packed ``[total]`` with ``cu_seqlens``) loss into a
    scalar, over the valid tokens (``mask != 0``).

    Modes and counts as in the module docstring. Plain differentiable PyTorch (no kernel):
    for any per-token loss (entropy bonus, KL loss, ...). Returns a 0-dim fp32 tensor (fp64
    for fp64 input); invalid tokens are selected away, never multiplied (NaN there is harmless).
    Packed: each token is weighted by its sequence (a ``cumsum`` of the mask, int64 ``[total]``,
    gives the sequence counts; no host sync, no atomics), the result equals the padded one.

    >>> loss = fastrlhf.aggregate(per_token_loss, mask, "seq-mean-token-mean")
    """
    _check_inputs(("loss_mat",), (loss_mat,), mask, cu_seqlens, mode, loss_scale_factor)
    _checks.choice("mode", mode, AGG_MODES)
    return ref.aggregate(loss_mat, mask, mode, *_counts(mask, global_tokens, global_seqs, loss_scale_factor),
                         cu_seqlens=cu_seqlens)
