"""Drop-in replacements for TRL's log-prob, entropy, fused-LM-head and DPO-loss code, and :func:`patch_trl`.

The functions keep the signatures and semantics of TRL 1.16.0 (``trl/trainer/utils.py``,
``trl/kernels/chunked_logprob.py`` and the loss block of ``DPOTrainer._compute_loss``) and
run on fastrlhf ops (:func:`fastrlhf.token_logprobs`, :func:`fastrlhf.linear_token_logprobs`,
:func:`fastrlhf.ops.dpo.dpo_loss`). The backend follows :func:`fastrlhf.use_backend` /
``FASTRLHF_BACKEND`` (``auto`` by default).

TRL 1.16's trainers (DPO, GRPO, RLOO, KTO, SFT) get their log-probs from a fused LM head
(``add_fused_lm_head``: the model's forward with ``fused_lm_head=True`` projects the hidden
states through ``trl.kernels.ChunkedLogProbFunction``); :func:`patch_trl` swaps that function
for :class:`FusedLMHead` (:func:`fastrlhf.linear_token_logprobs`), so one call switches every
one of them over.

Differences from TRL, all deliberate:

* ``-inf`` logits (a masked vocabulary) have probability 0: entropies stay finite where
  TRL's fallback gives NaN. An index outside ``[0, V)`` gives a NaN log-prob where TRL
  raises (no host sync to check it).
* Losses are never NaN on valid input: an empty ``sft`` batch gives 0, ``discopop`` is
  evaluated stably for large negative margins (TRL overflows to NaN there).
* The fused head accumulates ``grad_hidden`` over the vocabulary in fp32 and rounds once, as
  TRL does; its per-token statistics are computed in one pass with the log-prob.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections import Counter
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from fastrlhf import _checks
from fastrlhf._numerics import acc_dtype
from fastrlhf.backend import resolve_backend
from fastrlhf.integrations.common import NO_IGNORE_INDEX, entropy
from fastrlhf.integrations.patching import Patch, PatchSlot
from fastrlhf.ops import linear_logprobs as _ll
from fastrlhf.ops.dpo import dpo_loss as _dpo_op
from fastrlhf.ops.logprobs import token_logprobs

__all__ = [
    "LOSS_TYPES",
    "FusedLMHead",
    "TRLPatch",
    "dpo_loss",
    "entropy_from_logits",
    "patch_trl",
    "selective_log_softmax",
    "selective_log_softmax_and_entropy",
]


def _check_temperature(temperature) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a Python float, got {type(temperature).__name__}")
    if not temperature > 0:
        raise ValueError("temperature must be positive")
    return float(temperature)


def _apply_row_mask(x: torch.Tensor, row_mask: torch.Tensor | None) -> torch.Tensor:
    if row_mask is None:
        return x
    _checks.mask("row_mask", row_mask, x.shape, x.device)
    return torch.where(row_mask == 0, 0.0, x)


# ------------------------------------------------------------------------ log-probs
def _out_dtype(logits: torch.Tensor, out_dtype) -> torch.dtype:
    """TRL's contract: the logits' dtype, unless ``out_dtype`` asks for another float dtype."""
    if out_dtype is None:
        return logits.dtype
    if not isinstance(out_dtype, torch.dtype) or not out_dtype.is_floating_point:
        raise TypeError(f"out_dtype must be None or a floating torch.dtype, got {out_dtype!r}")
    return out_dtype


def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor, temperature: float = 1.0,
                          row_mask: torch.Tensor | None = None, *, out_dtype: torch.dtype | None = None
                          ) -> torch.Tensor:
    """``log_softmax(logits / temperature).gather(-1, index)``, as TRL's ``selective_log_softmax``.

    Args:
        logits: ``[..., V]`` bf16/fp16/fp32/fp64.
        index: int32/int64, either ``logits.shape[:-1]`` (one log-prob per row) or
            ``(*logits.shape[:-1], K)`` (``K`` log-probs per row, e.g. top-K).
        temperature: a float > 0 the logits are divided by.
        row_mask: ``None`` or a tensor of ``index``'s shape; where it is 0 the output is 0
            (with zero gradient).
        out_dtype: the dtype of the result; ``None`` (TRL's contract) is the logits' dtype,
            ``torch.float32`` keeps the fp32 log-probs unrounded.

    Returns:
        Log-probs of ``index``'s shape, computed in fp32 (fp64 for fp64 logits) and rounded once
        to ``out_dtype``; differentiable w.r.t. ``logits``.

    One pass of :func:`fastrlhf.token_logprobs` per row. With a trailing ``K`` it scores the
    selected index with the largest logit, and the others are offsets from it
    (``log p_k = z_k - z_top + log p_top``, ``z = logits / temperature``): ``K`` costs no
    extra pass over ``V``; only the gather's backward allocates an ``[..., V]`` gradient.
    """
    temperature = _check_temperature(temperature)
    _checks.tensor("logits", logits, _checks.FLOAT_DTYPES, min_dim=1)
    _checks.tensor("index", index, _checks.INDEX_DTYPES)
    dtype = _out_dtype(logits, out_dtype)
    lead = logits.shape[:-1]
    if index.dim() == logits.dim() - 1:
        _checks.same_shape("index", index, lead, "logits.shape[:-1]")
        out = token_logprobs(logits, index.long(), temperature=temperature, ignore_index=NO_IGNORE_INDEX)
        return _apply_row_mask(out, row_mask).to(dtype)
    if index.dim() != logits.dim() or index.shape[:-1] != lead:
        raise ValueError(f"index must have shape {tuple(lead)} or {(*lead, 'K')} (logits.shape "
                         f"{tuple(logits.shape)}), got {tuple(index.shape)}")
    index = index.long()
    acc = acc_dtype(logits)
    z = logits.gather(-1, index).to(acc) / temperature  # raises on an index outside [0, V)
    if index.shape[-1] == 0:
        return _apply_row_mask(z, row_mask).to(dtype)
    top = z.detach().argmax(-1, keepdim=True)
    logp_top = token_logprobs(logits, index.gather(-1, top).squeeze(-1), temperature=temperature,
                              ignore_index=NO_IGNORE_INDEX).unsqueeze(-1)
    out = (z - z.gather(-1, top)) + logp_top
    out = torch.where(z == float("-inf"), float("-inf"), out)  # a masked entry, even if all are
    return _apply_row_mask(out, row_mask).to(dtype)


def entropy_from_logits(logits: torch.Tensor, chunk_size: int = 128, *,
                        out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Entropy ``-sum(p * log p)`` of ``softmax(logits)`` over the last dim, as TRL's
    ``entropy_from_logits``.

    ``logits``: ``[..., V]`` (any float dtype). ``chunk_size`` is accepted for TRL's signature
    and unused: nothing ``[..., V]``-sized is materialized in fp32 by the kernel backends.
    Returns ``logits.shape[:-1]``, computed in fp32 (fp64 for fp64 logits) and returned in the
    logits' dtype as TRL does (``out_dtype=torch.float32`` keeps fp32), differentiable.
    """
    _checks.tensor("logits", logits, _checks.FLOAT_DTYPES, min_dim=1)
    _checks.integer("chunk_size", chunk_size)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    dtype = _out_dtype(logits, out_dtype)
    return entropy(logits).to(dtype)


def selective_log_softmax_and_entropy(logits: torch.Tensor, index: torch.Tensor,
                                      entropy_requires_grad: bool = True, temperature: float = 1.0,
                                      row_mask: torch.Tensor | None = None, *,
                                      out_dtype: torch.dtype | None = None):
    """``(log-probs of index, entropy)`` of ``softmax(logits / temperature)`` in one pass, as TRL's
    ``selective_log_softmax_and_entropy``.

    ``index`` has ``logits.shape[:-1]``; where ``row_mask`` is 0 both outputs are 0. With
    ``entropy_requires_grad=False`` the entropy is detached. Both computed in fp32 (fp64 for
    fp64 logits) and returned in the logits' dtype (``out_dtype`` as :func:`selective_log_softmax`).
    """
    temperature = _check_temperature(temperature)
    _checks.tensor("logits", logits, _checks.FLOAT_DTYPES, min_dim=1)
    _checks.tensor("index", index, _checks.INDEX_DTYPES)
    _checks.same_shape("index", index, logits.shape[:-1], "logits.shape[:-1]")
    dtype = _out_dtype(logits, out_dtype)
    logp, ent = token_logprobs(logits, index.long(), temperature=temperature,
                               ignore_index=NO_IGNORE_INDEX, return_entropy=True)
    if not entropy_requires_grad:
        ent = ent.detach()
    return _apply_row_mask(logp, row_mask).to(dtype), _apply_row_mask(ent, row_mask).to(dtype)


# ------------------------------------------------------------------- the fused LM head
class _LMHeadFunction(torch.autograd.Function):
    """TRL's ``ChunkedLogProbFunction`` contract on fastrlhf's linear log-prob ops: casts to the
    compute dtype inside (so ZeRO-3 can gather the weight again in backward), gradients in
    the inputs' dtypes, statistics other than the entropy without gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, softcap, logit_scale, names, compute_dtype,
                backend, design):
        ctx.set_materialize_grads(False)
        h = hidden.to(compute_dtype)
        w = weight.to(compute_dtype)
        b = None if bias is None else bias.to(compute_dtype)
        with_entropy = "entropy" in names
        with torch.autocast(hidden.device.type, enabled=False):
            logp, ent, stats, lsq, mean, top1 = _ll.linear_logprobs_op(
                h, w, b, targets, temperature, NO_IGNORE_INDEX, with_entropy, backend, logit_scale, softcap,
                "log_sum_sq_probs" in names, "mean_logits" in names, "is_top1" in names, design)
        ctx.save_for_backward(hidden, weight, bias, targets, stats, ent)
        ctx.args = (temperature, softcap, logit_scale, compute_dtype, backend, design, with_entropy)
        ctx.mark_non_differentiable(lsq, mean, top1)
        return logp, ent, lsq, mean, top1

    @staticmethod
    def backward(ctx, grad_logp, grad_ent, *_):
        hidden, weight, bias, targets, stats, ent = ctx.saved_tensors
        temperature, softcap, logit_scale, compute_dtype, backend, design, with_entropy = ctx.args
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        none = (None,) * 8
        if grad_logp is None and grad_ent is None or not (need_h or need_w or need_b):
            return (None, None, None, *none)
        if grad_logp is None:
            grad_logp = torch.zeros_like(stats[:, 0])
        with _gather_lm_head(weight, bias), torch.autocast(hidden.device.type, enabled=False):
            h = hidden.to(compute_dtype)
            w = weight.to(compute_dtype)
            b = None if bias is None else bias.to(compute_dtype)
            gh, gw, gb = _ll.linear_logprobs_backward_op(
                grad_logp.float(), grad_ent.float() if with_entropy and grad_ent is not None else None,
                h, w, b, targets, stats, ent, temperature, NO_IGNORE_INDEX, need_h, need_w, need_b and b is not None,
                backend, logit_scale, softcap, design=design)
        return (gh.to(hidden.dtype) if need_h else None, gw.to(weight.dtype) if need_w else None,
                gb.to(bias.dtype) if need_b and bias is not None else None, *none)


def _gather_lm_head(weight, bias):
    """TRL's ZeRO-3 gather of the LM head for a direct access (a null context without ZeRO-3)."""
    try:
        from trl.trainer.utils import maybe_gather_lm_head_ctx
    except ImportError:
        return contextlib.nullcontext()
    return maybe_gather_lm_head_ctx(weight, bias)


class FusedLMHead:
    """A stand-in for TRL 1.16's ``trl.kernels.ChunkedLogProbFunction`` (its ``apply`` contract),
    computed by :func:`fastrlhf.linear_token_logprobs`'s kernels; :func:`patch_trl` installs one.

    ``apply(hidden [N, H], weight [V, H], bias [V] | None, targets [N], temperature, chunk_size,
    final_logit_softcapping=None, logit_scale=1.0, outputs=(...))`` returns TRL's
    ``(log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1)``, each ``[N]`` fp32 (``is_top1``
    bool) or ``None`` when not in ``outputs``: ``z = softcap * tanh(logit_scale * y / softcap) /
    temperature`` on the logits ``y = hidden @ weight.T + bias``, computed in the autocast dtype
    (else the hidden states' dtype) with fp32 accumulation, the ``[N, V]`` logits never written.
    Gradients reach ``hidden``, ``weight`` and ``bias`` (in their dtypes) from the log-probs and
    the entropy; the other statistics have none, as in TRL. ``chunk_size`` is accepted and unused
    (fastrlhf picks its own blocks). Under DeepSpeed ZeRO-3 the backward gathers the head again
    with TRL's ``maybe_gather_lm_head_ctx``, as TRL's function does.

    ``backend`` / ``design``: as :func:`fastrlhf.linear_token_logprobs` (``"auto"`` follows
    :func:`fastrlhf.use_backend` and ``FASTRLHF_BACKEND`` at each call). ``calls`` counts the calls.
    """

    def __init__(self, backend: str = "auto", design: str = "auto"):
        self.backend = backend
        self.design = design
        self.calls = 0

    def apply(self, hidden, weight, bias, targets, temperature, chunk_size=None, final_logit_softcapping=None,
              logit_scale=1.0, outputs=("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")):
        names = tuple(n for n in outputs if n != "log_probs")
        device = hidden.device
        compute_dtype = (torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type)
                         else hidden.dtype)
        if compute_dtype not in _ll.COMPUTE_DTYPES:
            compute_dtype = torch.float32
        targets = targets.reshape(-1)
        _checks.tensor("hidden", hidden, _checks.FLOAT_DTYPES, dim=2)
        _checks.tensor("weight", weight, _checks.FLOAT_DTYPES, dim=2)
        if weight.shape[1] != hidden.shape[1] or weight.shape[0] == 0:
            raise ValueError(f"weight must have shape (V >= 1, {hidden.shape[1]}), got {tuple(weight.shape)}")
        if bias is not None:
            _checks.tensor("bias", bias, _checks.FLOAT_DTYPES)
            _checks.same_shape("bias", bias, weight.shape[:1], "weight.shape[0]")
        _checks.tensor("targets", targets, _checks.INDEX_DTYPES)
        _checks.same_shape("targets", targets, hidden.shape[:1], "hidden.shape[0]")
        _checks.positive("temperature", temperature)
        _checks.positive("logit_scale", logit_scale)
        _checks.optional_positive("final_logit_softcapping", final_logit_softcapping)
        _ll.check_outputs(names)
        backend = resolve_backend(self.backend, device, _ll.FAMILY)
        design = _ll.resolve_design(self.design, backend, device, compute_dtype, hidden.shape[-1])
        softcap = None if final_logit_softcapping is None else float(final_logit_softcapping)
        self.calls += 1
        logp, ent, lsq, mean, top1 = _LMHeadFunction.apply(
            hidden, weight, bias, targets, float(temperature), softcap, float(logit_scale), names, compute_dtype,
            backend, design)
        return (logp, ent if "entropy" in names else None, lsq if "log_sum_sq_probs" in names else None,
                mean if "mean_logits" in names else None, top1 if "is_top1" in names else None)


# ------------------------------------------------------------------------------ DPO
LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard",
              "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
_F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
_F_DIVERGENCE_LOSSES = {"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"}
_LENGTH_LOSSES = {"ipo", "sigmoid_norm", "sft"}


def _f_scores(logratios: torch.Tensor, f_divergence_type: str, alpha: float, dtype: torch.dtype):
    """TRL's ``f'(t)`` of the implicit-reward log-ratios (``reverse_kl`` is the identity)."""
    if f_divergence_type == "forward_kl":
        return 1 - torch.exp(-logratios)
    if f_divergence_type == "js_divergence":
        return math.log(2) + F.logsigmoid(logratios)
    if f_divergence_type == "alpha_divergence" and abs(alpha - 1.0) >= 1e-6:
        cap = 11.0 if dtype == torch.float16 else 80.0  # TRL's bound: exp stays finite in the input dtype
        return (torch.exp(((alpha - 1.0) * logratios).clamp(max=cap)) - 1.0) / (alpha - 1.0)
    return logratios


def _mean(x: torch.Tensor) -> torch.Tensor:
    return x.sum() / max(x.numel(), 1)


def _discopop(delta: torch.Tensor, beta: float, tau: float) -> torch.Tensor:
    """DiscoPOP per pair: ``-logsig(z) (1 - sig(z / tau)) + exp(-z) sig(z / tau)``, ``z = beta * delta``;
    the second product is ``exp(-z + logsig(z / tau))``, finite where ``exp(-z)`` overflows."""
    z = beta * delta
    return -F.logsigmoid(z) * torch.sigmoid(-z / tau) + torch.exp(F.logsigmoid(z / tau) - z)


def _check_lengths(name: str, x, like: torch.Tensor) -> torch.Tensor:
    if x is None:
        raise ValueError(f"{name} is required by loss types {sorted(_LENGTH_LOSSES)} (the number of "
                         f"completion tokens of each sequence)")
    _checks.tensor(name, x)
    _checks.same_shape(name, x, like.shape, "chosen_logps.shape")
    _checks.same_device(name, x, like.device)
    return x.to(like.dtype)


def dpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
             ref_rejected_logps: torch.Tensor, *, beta: float = 0.1,
             loss_type: str | Sequence[str] = "sigmoid", loss_weights: Sequence[float] | None = None,
             label_smoothing: float = 0.0, chosen_lengths: torch.Tensor | None = None,
             rejected_lengths: torch.Tensor | None = None, f_divergence_type: str = "reverse_kl",
             f_alpha_divergence_coef: float = 0.5, discopop_tau: float = 0.05):
    """The DPO-family loss of TRL 1.16.0's ``DPOTrainer`` from sequence log-probs.

    Reproduces the loss block of ``DPOTrainer._compute_loss`` (TRL 1.16.0) after the
    sequence log-probs are known: every ``loss_type`` of TRL, a list of them combined
    with ``loss_weights``, ``label_smoothing``, ``f_divergence_type`` and ``discopop_tau``,
    with TRL's ``DPOConfig`` names and defaults. Runs on :func:`fastrlhf.ops.dpo.dpo_loss`
    (``bco_pair`` is two of its sigmoid losses, ``aot``/``aot_unpaired`` its sigmoid loss on
    sorted log-ratios); ``discopop`` and ``sft`` are a few ``[B]``-sized torch ops.

    Args:
        chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps: ``[B]`` summed
            completion log-probs (any float dtype, one device); TRL's ``ld_alpha`` weighting,
            if used, is already in them. Gradients flow to all four.
        beta: a float > 0. loss_type: one name of :data:`LOSS_TYPES` or a list of them.
        loss_weights: one weight per loss type (default 1 each).
        label_smoothing: read by ``robust`` (``[0, 0.5)``), ``exo_pair`` (``(0, 1)``: TRL
            rejects 0), ``aot`` and ``aot_unpaired``; TRL 1.16's ``sigmoid`` ignores it.
        chosen_lengths, rejected_lengths: ``[B]`` completion token counts, required by
            ``ipo`` and ``sigmoid_norm`` (log-ratios divided by ``max(length, 1)``) and ``sft``
            (``-sum(chosen_logps) / sum(chosen_lengths)``, 0 when there is no token).

    Returns:
        ``(loss, metrics)``: ``loss`` the fp32 weighted sum of the batch means (fp64 for
        fp64 inputs, 0 for an empty batch); ``metrics`` detached 0-dim tensors with TRL's
        logged names: ``rewards/chosen``, ``rewards/rejected`` (means of ``beta * (pi - ref)``),
        ``rewards/margins``, ``rewards/accuracies``, ``logps/chosen``, ``logps/rejected``.
        Not covered: TRL's WPO ``use_weighting`` (it needs per-token probabilities).
        f-divergence scores stay fp32 (TRL rounds alpha-divergence scores to the input dtype).
    """
    names = ("chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps")
    xs = (chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    for name, x in zip(names, xs):
        _checks.tensor(name, x, _checks.FLOAT_DTYPES, dim=1)
        _checks.same_shape(name, x, chosen_logps.shape, "chosen_logps.shape")
        _checks.same_device(name, x, chosen_logps.device)
    beta = _checks.positive("beta", beta)
    types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    for t in types:
        if t not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES} or a list of them, got {t!r}")
    weights = [1.0] * len(types) if loss_weights is None else [float(w) for w in loss_weights]
    if len(weights) != len(types):
        raise ValueError(f"loss_weights must have one weight per loss type ({len(types)}), got {len(weights)}")
    if f_divergence_type not in _F_DIVERGENCES:
        raise ValueError(f"f_divergence_type must be one of {_F_DIVERGENCES}, got {f_divergence_type!r}")
    if f_divergence_type != "reverse_kl" and not set(types) <= _F_DIVERGENCE_LOSSES:
        raise ValueError(f"f_divergence_type={f_divergence_type!r} works only with loss types "
                         f"{sorted(_F_DIVERGENCE_LOSSES)}, got {types}")
    if "exo_pair" in types and label_smoothing == 0.0:
        raise ValueError("label_smoothing must be > 0 for loss_type 'exo_pair' (the EXO paper uses 1e-3)")
    _checks.positive("discopop_tau", discopop_tau)

    dtype = acc_dtype(*xs)
    pc, pr, rc, rr = (x.to(dtype) for x in xs)
    chosen_lr, rejected_lr = pc - rc, pr - rr
    chosen_s = _f_scores(chosen_lr, f_divergence_type, f_alpha_divergence_coef, chosen_logps.dtype)
    rejected_s = _f_scores(rejected_lr, f_divergence_type, f_alpha_divergence_coef, chosen_logps.dtype)
    zero = torch.zeros_like(pc)
    if _LENGTH_LOSSES & set(types):
        n_chosen = _check_lengths("chosen_lengths", chosen_lengths, pc)
        if set(types) & {"ipo", "sigmoid_norm"}:
            n_rejected = _check_lengths("rejected_lengths", rejected_lengths, pc)

    def op(a, b, kind, eps=0.0):  # the op's loss of h = a - b (a, b: implicit rewards / beta)
        return _dpo_op(a, b, zero, zero, beta=beta, loss_type=kind, label_smoothing=eps)[0]

    loss = zero.new_zeros(())
    for kind, weight in zip(types, weights):
        if kind in ("sigmoid", "hinge"):
            term = op(chosen_s, rejected_s, kind)
        elif kind in ("robust", "exo_pair"):
            term = op(chosen_s, rejected_s, kind, label_smoothing)
        elif kind in ("ipo", "sigmoid_norm"):
            term = op(chosen_s / n_chosen.clamp(min=1), rejected_s / n_rejected.clamp(min=1),
                      "ipo" if kind == "ipo" else "sigmoid")
        elif kind in ("nca_pair", "sppo_hard", "apo_zero", "apo_down"):
            term = op(chosen_lr, rejected_lr, kind)
        elif kind == "bco_pair":  # -logsig(beta a) - logsig(-beta b)
            term = op(chosen_lr, zero, "sigmoid") + op(zero, rejected_lr, "sigmoid")
        elif kind == "aot":
            term = op(torch.sort(pc - pr).values, torch.sort(rc - rr).values, "sigmoid", label_smoothing)
        elif kind == "aot_unpaired":
            term = op(torch.sort(chosen_lr).values, torch.sort(rejected_lr).values, "sigmoid",
                      label_smoothing)
        elif kind == "discopop":
            term = _mean(_discopop(chosen_s - rejected_s, beta, float(discopop_tau)))
        else:  # sft: the NLL of the chosen completions, per token
            n = n_chosen.sum()
            term = torch.where(n > 0, -pc.sum() / torch.where(n > 0, n, 1.0), 0.0)
        loss = loss + weight * term

    with torch.no_grad():
        chosen_r, rejected_r = beta * chosen_lr, beta * rejected_lr
        metrics = {"rewards/chosen": _mean(chosen_r), "rewards/rejected": _mean(rejected_r),
                   "rewards/margins": _mean(chosen_r - rejected_r),
                   "rewards/accuracies": _mean((chosen_r > rejected_r).to(dtype)),
                   "logps/chosen": _mean(pc), "logps/rejected": _mean(pr)}
    return loss, {k: v.detach() for k, v in metrics.items()}


# ---------------------------------------------------------------------------- patching
_FUNCTIONS = {"selective_log_softmax": selective_log_softmax,
              "entropy_from_logits": entropy_from_logits,
              "selective_log_softmax_and_entropy": selective_log_softmax_and_entropy}
_HEAD = "ChunkedLogProbFunction"
_slot = PatchSlot()


class TRLPatch(Patch):
    """What :func:`patch_trl` changed; :meth:`undo` puts TRL's objects back wherever a loaded
    ``trl`` module holds a fastrlhf one (also in modules imported after the patch). Calling it
    twice is harmless.

    ``originals`` / ``installed``: TRL's name -> TRL's object / what replaced it. ``calls``
    counts the calls TRL made into fastrlhf through the patch, by TRL's name
    (``"ChunkedLogProbFunction"`` for the fused LM head), from ``counts`` (the counter the
    installed functions increment). ``head`` is the installed :class:`FusedLMHead`. Also a
    context manager: ``with patch_trl(): ...`` undoes on exit.
    """

    def __init__(self, originals: dict, installed: dict, head: FusedLMHead | None, counts: Counter | None = None):
        super().__init__()
        self.originals = originals
        self.installed = installed
        self.head = head
        self._calls = Counter() if counts is None else counts

    @property
    def calls(self) -> Counter:
        counts = Counter(self._calls)
        if self.head is not None:
            counts[_HEAD] = self.head.calls
        return counts


def _counting(name: str, fn, counts: Counter):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        counts[name] += 1
        return fn(*args, **kwargs)

    return wrapper


def _make_patch(backend: str, design: str, fused_lm_head: bool) -> TRLPatch:
    try:
        from trl.trainer import utils
    except ImportError as e:
        raise ImportError(f"patch_trl needs TRL installed (pip install trl): {e}") from e
    originals = {name: getattr(utils, name) for name in _FUNCTIONS if hasattr(utils, name)}
    counts = Counter()
    installed = {name: _counting(name, _FUNCTIONS[name], counts) for name in originals}
    head = None
    if fused_lm_head:
        try:
            from trl.kernels import chunked_logprob
        except ImportError:
            chunked_logprob = None
        original_head = getattr(chunked_logprob, _HEAD, None)
        if original_head is not None:
            head = FusedLMHead(backend=backend, design=design)
            originals[_HEAD] = original_head
            installed[_HEAD] = head
    patch = TRLPatch(originals, installed, head, counts)
    for name, original in originals.items():
        patch.rebind(original, installed[name], "trl", name)
    return patch


def patch_trl(*, backend: str = "auto", design: str = "auto", fused_lm_head: bool = True) -> TRLPatch:
    """Switch the installed TRL over to fastrlhf: its trainers' fused LM head and its log-prob
    functions.

    * The fused LM head: ``trl.kernels.ChunkedLogProbFunction`` (bound in ``trl.kernels``,
      ``trl.kernels.chunked_logprob`` and ``trl.trainer.utils``) becomes a :class:`FusedLMHead`.
      A model given TRL's fused head (``add_fused_lm_head``, which ``DPOTrainer``,
      ``GRPOTrainer``, ``RLOOTrainer``, ``KTOTrainer`` and ``SFTTrainer`` call in their
      ``__init__``) looks the function up at each forward, so models patched before or after
      the call both run on fastrlhf. ``fused_lm_head=False`` leaves it to TRL.
    * ``selective_log_softmax``, ``entropy_from_logits``, ``selective_log_softmax_and_entropy``
      (``trl.trainer.utils`` and every loaded ``trl`` module that imported them, e.g. the
      experimental CPO / ORPO trainers) become the functions of this module, with TRL's dtype
      contract; modules imported later pick them up from ``trl.trainer.utils``.

    TRL's DPO loss is computed inline in ``DPOTrainer._compute_loss`` (1.16), so there is no
    function to swap: call :func:`dpo_loss` from a subclass. Patching twice returns the active
    patch. ``backend`` / ``design`` are those of :func:`fastrlhf.linear_token_logprobs` for the
    fused head (``"auto"``: :func:`fastrlhf.use_backend`, ``FASTRLHF_BACKEND``, then the device).

    Returns a :class:`TRLPatch` (``.calls`` counts the calls into fastrlhf); ``.undo()`` (or
    leaving its ``with`` block) restores TRL. Raises ``ImportError`` when TRL is not installed.

    >>> import fastrlhf.integrations.trl
    >>> fastrlhf.integrations.trl.patch_trl()   # then build and train any TRL trainer as usual
    """
    return _slot.get_or_make(lambda: _make_patch(backend, design, fused_lm_head))
