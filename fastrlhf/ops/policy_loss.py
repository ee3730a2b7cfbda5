"""The policy-loss family: PPO's clipped policy and value losses and every policy loss of
verl 0.9.1's registry and OpenRLHF 0.11.2's ``PolicyLoss``, with rollout correction, on padded
``[B, T]`` or packed ``[total]`` sequences, aggregated (``fastrlhf.ops.aggregation``).

Chain: public function (checks, the spec of ``fastrlhf.ops.policy_spec``, covariance selections,
backend choice) → ``torch.library`` custom op with fake and autograd registrations → the
backend's launchers (``fastrlhf.registry``). Two ops:

* the plain form (``fastrlhf::ppo_policy_loss`` / ``fastrlhf::ppo_value_loss``): PPO's policy and
  value losses on padded input without correction, on every backend (CUDA included): the
  launcher writes the loss, its statistics and the normalizing scale (on Triton one launch: a
  token pass whose last program adds the partial sums in a fixed order), an elementwise backward;
* the general op (``fastrlhf::policy_loss``): every mode, packed input, rollout correction, on
  ``triton`` (a per-sequence pass when a sequence-level quantity is needed, a token pass writing
  partial sums, an elementwise backward) or ``torch`` (the reference's per-token terms, their
  gradient by autograd: ``fastrlhf.eager.policy_loss``). ``backend="cuda"`` raises
  ``BackendUnavailableError`` saying so before any kernel.

Partial sums are added in a fixed order (same input, same bits) and normalized.
:func:`ppo_policy_loss` is ``policy_loss(mode="vanilla")``; :func:`ppo_value_loss` the value loss.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from fastrlhf import _checks
from fastrlhf._numerics import acc_dtype
from fastrlhf.backend import BackendUnavailableError, launchers, resolve_backend
from fastrlhf.ops import aggregation as agg_ops
from fastrlhf.ops.custom_op import custom_op
from fastrlhf.ops.policy_spec import (POLICY_LOSS_MODES, REQUIRED, RolloutCorrection, decode, encode, kernel_mode,
                                      needs_table, policy_loss_options, resolve_options, stats_of)
from fastrlhf.reference import policy_loss as ref

__all__ = ["POLICY_LOSS_MODES", "REQUIRED", "RolloutCorrection", "policy_loss", "policy_loss_options",
           "ppo_policy_loss", "ppo_value_loss"]

FAMILY = "policy_loss"


def _n_seqs(x: torch.Tensor, cu_seqlens) -> int:
    return cu_seqlens.numel() - 1 if cu_seqlens is not None else x.shape[0]


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


def _needs_rows(agg: str, global_seqs) -> bool:
    """Whether a plain form needs the rows' valid tokens: ``seq-mean-token-mean`` weighs each token
    by them, and a ``seq-mean-*`` mode without ``global_seqs`` counts the rows with one."""
    return agg == "seq-mean-token-mean" or (agg.startswith("seq-") and global_seqs is None)


def _aux_fake(x, agg, global_seqs, dtype):
    return x.new_empty((), dtype=dtype), x.new_empty(x.shape[0] if _needs_rows(agg, global_seqs) else 0,
                                                      dtype=torch.int64)


def _plain_result(outputs) -> tuple[torch.Tensor, dict]:
    """``(loss, stats)`` of ``_ppo_policy_op``'s outputs, the statistics by name (detached)."""
    loss, stats, _, _ = outputs
    return loss, dict(zip(stats_of("vanilla", None, False), stats.detach().unbind()))


def _none_but_first(ctx, grad):
    return (grad, *[None] * (len(ctx.needs_input_grad) - 1))


def _plain_forward(launcher: str, inputs: tuple, mask, agg, counts, stats_shape: tuple, backend: str,
                   *args) -> tuple:
    """``(loss, stats, scale, row_counts)`` of a plain form: one launcher call fills the first three
    (``fastrlhf.triton.policy_loss.ppo_policy_fwd``); the row counts (int64 ``[B]``, or empty where
    not needed: :func:`_needs_rows`) are for the backward's weights."""
    dtype = acc_dtype(*inputs)
    rows = _needs_rows(agg, counts[1])
    row_counts = (mask != 0).sum(-1) if rows else torch.empty(0, dtype=torch.int64, device=mask.device)
    loss, stats, scale = (torch.empty(shape, dtype=dtype, device=mask.device) for shape in ((), stats_shape, ()))
    getattr(launchers(backend, FAMILY), launcher)(*inputs, mask, row_counts if rows else None, *args, agg, counts,
                                                  loss, stats, scale)
    return loss, stats, scale, row_counts


# ------------------------------------------------- the plain form: PPO policy loss op (+ CUDA)
@custom_op("fastrlhf::ppo_policy_loss", mutates_args=())
def _ppo_policy_op(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                   mask: torch.Tensor, clip_low: float, clip_high: float, dual_clip: float | None,
                   log_ratio_clamp: float | None, agg: str, global_tokens: torch.Tensor | None,
                   global_seqs: torch.Tensor | None, loss_scale_factor: torch.Tensor | None, backend: str
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, [clipfrac, clipfrac_lower, approx_kl], scale, row_counts)``; the last two for backward."""
    return _plain_forward("ppo_policy_fwd", (logprobs, old_logprobs, advantages), mask, agg,
                          (global_tokens, global_seqs, loss_scale_factor), (3,), backend,
                          *PolicyClip.of(clip_low, clip_high, dual_clip, log_ratio_clamp))


@_ppo_policy_op.register_fake
def _(logprobs, old_logprobs, advantages, mask, clip_low, clip_high, dual_clip, log_ratio_clamp,
      agg, global_tokens, global_seqs, loss_scale_factor, backend):
    dtype = acc_dtype(logprobs, old_logprobs, advantages)
    return (logprobs.new_empty((), dtype=dtype), logprobs.new_empty(3, dtype=dtype),
            *_aux_fake(logprobs, agg, global_seqs, dtype))


@custom_op("fastrlhf::ppo_policy_loss_backward", mutates_args=())
def _ppo_policy_bwd_op(grad: torch.Tensor, scale: torch.Tensor, logprobs: torch.Tensor,
                       old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                       row_counts: torch.Tensor, clip_low: float, clip_high: float,
                       dual_clip: float | None, log_ratio_clamp: float | None, agg: str,
                       backend: str) -> torch.Tensor:
    rows = row_counts if agg == "seq-mean-token-mean" else None
    dx = torch.empty(logprobs.shape, dtype=logprobs.dtype, device=logprobs.device)
    if dx.numel():
        launchers(backend, FAMILY).ppo_policy_bwd(
            grad, scale, logprobs, old_logprobs, advantages, mask, rows,
            *PolicyClip.of(clip_low, clip_high, dual_clip, log_ratio_clamp), dx)
    return dx


@_ppo_policy_bwd_op.register_fake
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
    return _none_but_first(ctx, _ppo_policy_bwd_op(grad, scale, logprobs, old_logprobs, advantages, mask, rows,
                                                   *ctx.args))


_ppo_policy_op.register_autograd(_policy_backward, setup_context=_policy_setup_context)


# ------------------------------------------------------------ the plain form: value loss op (+ CUDA)
@custom_op("fastrlhf::ppo_value_loss", mutates_args=())
def _value_op(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
              mask: torch.Tensor, clip: float | None, agg: str, global_tokens: torch.Tensor | None,
              global_seqs: torch.Tensor | None, loss_scale_factor: torch.Tensor | None, backend: str
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, vf_clipfrac, scale, row_counts)``; the last two for backward."""
    return _plain_forward("ppo_value_fwd", (values, old_values, returns), mask, agg,
                          (global_tokens, global_seqs, loss_scale_factor), (), backend, _inf(clip))


@_value_op.register_fake
def _(values, old_values, returns, mask, clip, agg, global_tokens, global_seqs, loss_scale_factor, backend):
    dtype = acc_dtype(values, old_values, returns)
    loss = values.new_empty((), dtype=dtype)
    return loss, torch.empty_like(loss), *_aux_fake(values, agg, global_seqs, dtype)


@custom_op("fastrlhf::ppo_value_loss_backward", mutates_args=())
def _value_bwd_op(grad: torch.Tensor, scale: torch.Tensor, values: torch.Tensor,
                  old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                  row_counts: torch.Tensor, clip: float | None, agg: str, backend: str) -> torch.Tensor:
    rows = row_counts if agg == "seq-mean-token-mean" else None
    dx = torch.empty(values.shape, dtype=values.dtype, device=values.device)
    if dx.numel():
        launchers(backend, FAMILY).ppo_value_bwd(grad, scale, values, old_values, returns, mask, rows,
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


# ------------------------------------------------------------- the general op (forward / backward)
def _chunk_starts(cu_seqlens: torch.Tensor, chunk: int) -> torch.Tensor:
    """int32 ``[S + 1]``: the first chunk of each packed sequence, ``len // chunk + 1`` chunks each
    (one more than needed when ``chunk`` divides ``len``: an empty sequence still has a chunk)."""
    starts = torch.zeros(cu_seqlens.shape, dtype=torch.int32, device=cu_seqlens.device)
    torch.cumsum(cu_seqlens.diff() // chunk + 1, 0, out=starts[1:])
    return starts


def _seq_pass(kernels, x, cu_seqlens, spec, what, table, gseq=None):
    """Run the per-sequence pass of the launchers (``chunk_starts`` computed here for packed input)."""
    if table.shape[1] == 0:
        return
    starts = _chunk_starts(cu_seqlens, kernels.SEQ_CHUNK) if cu_seqlens is not None else None
    kernels.policy_seq_pass(*x, cu_seqlens, starts, spec, what, table, gseq)


_N_STATS = len(ref.STATS)


@custom_op("fastrlhf::policy_loss", mutates_args=())
def general_op(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
               rollout_logprobs: torch.Tensor | None, is_weights: torch.Tensor | None, selected: torch.Tensor | None,
               cu_seqlens: torch.Tensor | None, global_tokens: torch.Tensor | None, global_seqs: torch.Tensor | None,
               loss_scale_factor: torch.Tensor | None, mode: str, agg: str, correction: str, params: list[float],
               backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, stats [len(STATS)], scale, sequence table)``; the last two for backward."""
    spec = decode(mode, agg, correction, params)
    counts = (global_tokens, global_seqs, loss_scale_factor)
    dtype = acc_dtype(logprobs, old_logprobs, advantages, rollout_logprobs, is_weights)
    dev = logprobs.device
    kernels = launchers(backend, FAMILY)
    x = (logprobs, old_logprobs, advantages, mask, rollout_logprobs, is_weights)
    table = None
    if needs_table(spec, global_seqs):
        table = torch.empty((kernels.TABLE_ROWS, _n_seqs(logprobs, cu_seqlens)), dtype=dtype, device=dev)
        _seq_pass(kernels, x, cu_seqlens, spec, kernels.seq_work(spec), table)
    loss, stats, scale = (torch.empty(shape, dtype=dtype, device=dev) for shape in ((), _N_STATS, ()))
    kernels.policy_loss_fwd(*x, selected, cu_seqlens, table, spec, counts, loss, stats, scale)
    return loss, stats, scale, table if table is not None else torch.empty((0, 0), dtype=dtype, device=dev)


@general_op.register_fake
def _(logprobs, old_logprobs, advantages, mask, rollout_logprobs, is_weights, selected, cu_seqlens, global_tokens,
      global_seqs, loss_scale_factor, mode, agg, correction, params, backend):
    dtype = acc_dtype(logprobs, old_logprobs, advantages, rollout_logprobs, is_weights)
    spec = decode(mode, agg, correction, params)
    rows = launchers(backend, FAMILY).TABLE_ROWS if needs_table(spec, global_seqs) else 0
    seqs = _n_seqs(logprobs, cu_seqlens) if rows else 0
    loss = logprobs.new_empty((), dtype=dtype)
    return (loss, logprobs.new_empty(_N_STATS, dtype=dtype), logprobs.new_empty((), dtype=dtype),
            logprobs.new_empty((rows, seqs), dtype=dtype))


@custom_op("fastrlhf::policy_loss_backward", mutates_args=())
def _policy_bwd_op(grad: torch.Tensor, scale: torch.Tensor, table: torch.Tensor, logprobs: torch.Tensor,
                   old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                   rollout_logprobs: torch.Tensor | None, is_weights: torch.Tensor | None,
                   selected: torch.Tensor | None, cu_seqlens: torch.Tensor | None, global_tokens: torch.Tensor | None,
                   global_seqs: torch.Tensor | None, loss_scale_factor: torch.Tensor | None, mode: str, agg: str,
                   correction: str, params: list[float], backend: str) -> torch.Tensor:
    spec = decode(mode, agg, correction, params)
    kernels = launchers(backend, FAMILY)
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
    ctx.set_materialize_grads(False)  # no zero-filled gradients of the statistics
    ctx.args = inputs[11:]


def _backward(ctx, grad, *_):
    *x, scale, table = ctx.saved_tensors
    if grad is None:
        grad = torch.zeros((), dtype=scale.dtype, device=x[0].device)
    dx = _policy_bwd_op(grad, scale, table, *x, *ctx.args)
    return (dx, *[None] * (len(ctx.needs_input_grad) - 1))


general_op.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------- public API
def _check_extra(name, x, like):
    _checks.tensor(name, x, _checks.FLOAT_DTYPES)
    _checks.same_shape(name, x, like.shape, "logprobs.shape")
    _checks.same_device(name, x, like.device)


def _cuda_refused(backend: str, device: torch.device, what: str) -> str:
    """The backend of a call the CUDA kernels do not cover: ``auto`` never picks cuda for it."""
    name = resolve_backend(backend, device, None)
    if name == "cuda":
        raise BackendUnavailableError(f"the cuda backend has no kernels for {what}; use backend='triton' or 'torch'")
    return name


def _run(logprobs, old_logprobs, advantages, mask, kmode, agg, o, counts, rollout_logprobs, corr, is_weights,
         selected, cu_seqlens, name, source="rollout", apply=True):
    """``(loss, stats vector)`` of the general op."""
    correction, params = encode(o, corr, source, apply)
    loss, stats, _, _ = general_op(logprobs, old_logprobs, advantages, mask, rollout_logprobs, is_weights, selected,
                                   cu_seqlens, *counts, kmode, agg, correction, params, name)
    return loss, stats.detach()


def named_stats(keys, vec) -> dict:
    """The statistics ``keys`` (names of ``reference.policy_loss.STATS``) of the general op's vector."""
    stats = vec.unbind()
    return {k: stats[ref.STATS.index(k)] for k in keys}


def checked_call(logprobs, old_logprobs, advantages, mask, mode, agg, global_tokens, global_seqs, loss_scale_factor,
                 rollout_logprobs, rollout_correction, is_weights, cu_seqlens, options) -> tuple[dict, tuple]:
    """The checks of a :func:`policy_loss` call (``TypeError`` / ``ValueError`` naming the argument):
    ``(the mode's options, the normalizer counts)``."""
    _checks.choice("mode", mode, POLICY_LOSS_MODES)
    o = resolve_options(mode, options)
    agg_ops.check_layout(("logprobs", "old_logprobs", "advantages"), (logprobs, old_logprobs, advantages), mask,
                         cu_seqlens, agg, loss_scale_factor)
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
    return o, agg_ops.normalizer_counts(mask, global_tokens, global_seqs, loss_scale_factor)


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                *, mode: str = "vanilla", agg: str = "token-mean", global_tokens=None, global_seqs=None,
                loss_scale_factor=None, rollout_logprobs: torch.Tensor | None = None,
                rollout_correction: RolloutCorrection | None = None, is_weights: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None, backend: str = "auto", **options):
    """A policy loss of verl 0.9.1's registry or OpenRLHF 0.11.2's ``PolicyLoss``, fused, aggregated.

    Per valid token (``mask != 0``), with ``lr = logprobs - old_logprobs``, ``A`` the advantage,
    ``clip_high`` defaulting to ``clip_low``, ``sg`` a stop-gradient, then multiplied by the
    correction coefficient ``c`` (``is_weights``, or ``rollout_correction``; 1 without) and
    aggregated by ``agg`` (``fastrlhf.ops.aggregation``: token-mean, token-sum, seq-mean-token-sum,
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
    o, counts = checked_call(logprobs, old_logprobs, advantages, mask, mode, agg, global_tokens, global_seqs,
                             loss_scale_factor, rollout_logprobs, rollout_correction, is_weights, cu_seqlens, options)
    device = logprobs.device
    kmode, source, apply = kernel_mode(mode, o)
    if kmode == "vanilla" and cu_seqlens is None and rollout_correction is None and is_weights is None:
        name = resolve_backend(backend, device, FAMILY)  # the plain form, with its CUDA kernels
        return _plain_result(_ppo_policy_op(logprobs, old_logprobs, advantages, mask, o["clip_low"], o["clip_high"],
                                            o["dual_clip"], o["log_ratio_clamp"], agg, *counts, name))
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
    return loss, named_stats(stats_of(kmode, rollout_correction, is_weights is not None), vec)


# ------------------------------------------------------------------- the PPO forms
def ppo_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                    mask: torch.Tensor, *, clip_low: float = 0.2, clip_high: float | None = None,
                    dual_clip: float | None = None, agg: str = "token-mean", global_tokens=None,
                    global_seqs=None, loss_scale_factor=None, log_ratio_clamp: float | None = 20.0,
                    cu_seqlens: torch.Tensor | None = None, backend: str = "auto"):
    """The clipped PPO surrogate loss (with optional asymmetric and dual clipping), aggregated:
    ``policy_loss(mode="vanilla")`` with its options as named arguments.

    Per token: ``ratio = exp(clamp(logprobs - old_logprobs, +-log_ratio_clamp))``,
    ``loss = max(-A * ratio, -A * clip(ratio, 1 - clip_low, 1 + clip_high))`` and, with
    ``dual_clip = c``, for ``A < 0``: ``min(loss, -A * c)``. Then aggregated over the valid
    tokens by ``agg`` (see ``fastrlhf.ops.aggregation`` for the modes and counts).

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
            (see ``fastrlhf.ops.aggregation``; triton or torch: the cuda backend has no packed kernels).
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
    return policy_loss(logprobs, old_logprobs, advantages, mask, mode="vanilla", agg=agg, global_tokens=global_tokens,
                       global_seqs=global_seqs, loss_scale_factor=loss_scale_factor, cu_seqlens=cu_seqlens,
                       backend=backend, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip,
                       log_ratio_clamp=log_ratio_clamp)


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
    agg_ops.check_layout(("values", "old_values", "returns"), (values, old_values, returns), mask, cu_seqlens, agg,
                         loss_scale_factor)
    clip = _checks.optional_positive("clip", clip)
    counts = agg_ops.normalizer_counts(mask, global_tokens, global_seqs, loss_scale_factor)
    if cu_seqlens is None:
        name = resolve_backend(backend, values.device, FAMILY)
        loss, clipfrac, _, _ = _value_op(values, old_values, returns, mask, clip, agg, *counts, name)
    else:
        name = _cuda_refused(backend, values.device, "packed sequences (cu_seqlens)")
        loss, vec = _run(values, old_values, returns, mask, "value", agg, {"clip": clip}, counts, None, None, None,
                         None, cu_seqlens, name)
        clipfrac = vec[0]
    return loss, {"vf_clipfrac": clipfrac.detach()}
