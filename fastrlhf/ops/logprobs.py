"""Token log-probs, entropy and sequence log-probs from logits.

Chain: public function (checks, backend choice) → ``torch.library`` custom op with fake and
autograd registrations → backend launcher (``fastrlhf.eager.logprobs``, ``fastrlhf.triton.logprobs``,
``fastrlhf.cuda.logprobs``), which fills the outputs the op allocates.
"""

from __future__ import annotations

import torch

from fastrlhf import _checks
from fastrlhf._numerics import acc_dtype
from fastrlhf._numerics import ordered_row_sum
from fastrlhf.backend import batch_invariant as invariant_mode
from fastrlhf.backend import launchers, resolve_backend
from fastrlhf.ops.custom_op import custom_op

__all__ = ["sequence_logprobs", "token_logprobs"]


# --------------------------------------------------------------------------- forward op
def _forward_outputs(logits, labels, with_entropy):
    """``(logp, entropy, stats)`` in the accumulation dtype: ``labels.shape``, the same (or
    ``[0]`` without entropy) and ``labels.shape + (2,)`` (row max and log-sum-exp, for backward)."""
    logp = logits.new_empty(labels.shape, dtype=acc_dtype(logits))
    entropy = torch.empty_like(logp) if with_entropy else logp.new_empty(0)
    return logp, entropy, logp.new_empty((*labels.shape, 2))


@custom_op("fastrlhf::token_logprobs", mutates_args=())
def token_logprobs_op(logits: torch.Tensor, labels: torch.Tensor, temperature: float,
                       ignore_index: int, with_entropy: bool, inplace_backward: bool,
                       backend: str, invariant: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    out = _forward_outputs(logits, labels, with_entropy)
    if labels.numel():
        launchers(backend, "logprobs").token_logprobs_fwd(logits, labels, temperature, ignore_index,
                                                          with_entropy, *out, **({"invariant": True} if invariant
                                                                                 else {}))
    return out


@token_logprobs_op.register_fake
def _(logits, labels, temperature, ignore_index, with_entropy, inplace_backward, backend, invariant=False):
    return _forward_outputs(logits, labels, with_entropy)


# -------------------------------------------------------------------------- backward ops
def _backward(grad_logp, grad_entropy, logits, labels, stats, entropy, temperature,
              ignore_index, backend, inplace):
    """``d loss / d logits`` in the logits' dtype: a new tensor, or ``logits`` overwritten."""
    dx = logits if inplace else torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    if labels.numel():
        launchers(backend, "logprobs").token_logprobs_bwd(grad_logp, grad_entropy, logits, labels, stats,
                                                          entropy, temperature, ignore_index, dx)
    return dx


@custom_op("fastrlhf::token_logprobs_backward", mutates_args=())
def token_logprobs_backward_op(grad_logp: torch.Tensor, grad_entropy: torch.Tensor | None,
                           logits: torch.Tensor, labels: torch.Tensor, stats: torch.Tensor,
                           entropy: torch.Tensor, temperature: float, ignore_index: int,
                           backend: str) -> torch.Tensor:
    return _backward(grad_logp, grad_entropy, logits, labels, stats, entropy, temperature,
                     ignore_index, backend, inplace=False)


@token_logprobs_backward_op.register_fake
def _(grad_logp, grad_entropy, logits, labels, stats, entropy, temperature, ignore_index, backend):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


@custom_op("fastrlhf::token_logprobs_backward_", mutates_args=("logits",))
def _token_logprobs_bwd_inplace_op(grad_logp: torch.Tensor, grad_entropy: torch.Tensor | None,
                                   logits: torch.Tensor, labels: torch.Tensor, stats: torch.Tensor,
                                   entropy: torch.Tensor, temperature: float, ignore_index: int,
                                   backend: str) -> None:
    _backward(grad_logp, grad_entropy, logits, labels, stats, entropy, temperature,
              ignore_index, backend, inplace=True)


def _setup_context(ctx, inputs, output):
    logits, labels, temperature, ignore_index, with_entropy, inplace_backward, backend, _ = inputs
    logp, ent, stats = output
    ctx.save_for_backward(logits, labels, stats, ent)
    ctx.args = (temperature, ignore_index, backend)
    ctx.with_entropy = with_entropy
    ctx.inplace = inplace_backward


def _autograd_backward(ctx, grad_logp, grad_entropy, _grad_stats):
    logits, labels, stats, ent = ctx.saved_tensors
    if grad_logp is None:
        grad_logp = torch.zeros_like(stats[..., 0])
    if not ctx.with_entropy:
        grad_entropy = None
    args = (grad_logp, grad_entropy, logits, labels, stats, ent, *ctx.args)
    if ctx.inplace:
        _token_logprobs_bwd_inplace_op(*args)
        dx = logits
    else:
        dx = token_logprobs_backward_op(*args)
    return dx, None, None, None, None, None, None, None


token_logprobs_op.register_autograd(_autograd_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------ public API
def check_logits_labels(logits, labels, temperature, ignore_index, inplace_backward=False):
    _checks.tensor("logits", logits, _checks.FLOAT_DTYPES, min_dim=1)
    _checks.tensor("labels", labels, _checks.INDEX_DTYPES)
    _checks.same_shape("labels", labels, logits.shape[:-1], "logits.shape[:-1]")
    _checks.same_device("labels", labels, logits.device)
    if logits.shape[-1] == 0:
        raise ValueError(f"logits must have a vocabulary dimension V >= 1, got shape {tuple(logits.shape)}")
    if logits.stride(-1) != 1 and logits.shape[-1] > 1:
        raise ValueError(f"logits must have unit stride on the last dimension (call .contiguous()), "
                         f"got strides {logits.stride()}")
    _checks.positive("temperature", temperature)
    _checks.integer("ignore_index", ignore_index)
    if inplace_backward:
        _checks.writable_in_place("logits", logits, "inplace_backward=True")


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, *, temperature: float = 1.0,
                   ignore_index: int = -100, return_entropy: bool = False,
                   inplace_backward: bool = False, batch_invariant: bool | None = None, backend: str = "auto"):
    """Log-probability of each label under ``softmax(logits / temperature)``, and its entropy.

    Computes ``log_softmax(logits / temperature, -1).gather(-1, labels[..., None])[..., 0]``
    in one streaming pass over each row, without a scaled or fp32 copy of the logits.

    Args:
        logits: ``[..., V]`` bf16/fp16/fp32/fp64, unit stride on the last dim. Other strides
            are free: ``logits[:, :-1]`` or a transposed batch is read in place (only a
            layout needing three separate leading strides is copied).
        labels: int32/int64 of shape ``logits.shape[:-1]``.
        temperature: a float > 0 the logits are divided by (inside the kernel).
        ignore_index: labels equal to it get log-prob 0, entropy 0 and zero gradient.
        return_entropy: also return the entropy ``-sum(p * log p)`` of each row.
        inplace_backward: write the gradient w.r.t. ``logits`` into ``logits``' own buffer,
            saving a whole ``[..., V]`` tensor. Only when nothing else needs the logits later;
            logits whose elements share memory (an expanded view) raise ``ValueError``.
        batch_invariant: each row's bits independent of the batch around it (``None``: the mode
            of ``fastrlhf.use_batch_invariant``); on triton every row is read from its first
            element (no per-row realignment of rows off a 16-byte boundary), on torch PyTorch's
            row reductions (shape-stable on the CPU); cuda has no such mode.
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"cuda"`` (see ``fastrlhf.backend``).

    Returns:
        ``logp`` of ``labels.shape``, fp32 (fp64 for fp64 logits), always ``<= 0``;
        ``(logp, entropy)`` with ``return_entropy=True``.

    Semantics: ``-inf`` logits (a masked vocabulary) have probability 0; a row needs at
    least one finite logit, and ``+inf``/NaN logits give NaN. A label outside ``[0, V)``
    other than ``ignore_index`` is never read out of bounds: its log-prob is NaN, its
    entropy is still computed, and its log-prob's gradient is that of ``-logsumexp``
    alone (the label's logit is not in this tensor, as with vocab-sharded logits).

    Memory (triton): forward allocates the outputs and two fp32 values per row (the max
    and log-sum-exp, kept for backward); backward allocates only the gradient, nothing with
    ``inplace_backward``. The gradient has the logits' dtype. The ``torch`` backend
    materializes fp32 ``[..., V]`` tensors.

    >>> logp = fastrlhf.token_logprobs(logits[:, :-1], input_ids[:, 1:])             # [B, T - 1]
    >>> logp, ent = fastrlhf.token_logprobs(logits, labels, temperature=0.7, return_entropy=True)
    """
    check_logits_labels(logits, labels, temperature, ignore_index, inplace_backward)
    invariant = invariant_mode(batch_invariant)
    name = resolve_backend(backend, logits.device, "logprobs", "batch_invariant" if invariant else None)
    logp, ent, _ = token_logprobs_op(logits, labels, float(temperature), ignore_index,
                                      bool(return_entropy), bool(inplace_backward), name, invariant)
    return (logp, ent) if return_entropy else logp


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, *,
                      average: bool = False, temperature: float = 1.0, ignore_index: int = -100,
                      inplace_backward: bool = False, cu_seqlens: torch.Tensor | None = None,
                      batch_invariant: bool | None = None, backend: str = "auto") -> torch.Tensor:
    """Per-sequence log-prob: the masked sum of the token log-probs over the last label dim.

    Args:
        logits: ``[..., T, V]``; labels: ``[..., T]`` (see :func:`token_logprobs`).
        mask: ``[..., T]``, any dtype; a token counts where ``mask != 0`` and its label is
            not ``ignore_index`` (holes are allowed).
        average: divide by the number of counted tokens (IPO-style length normalization).
        cu_seqlens: packed sequences: ``logits`` ``[total, V]``, ``labels`` and ``mask``
            ``[total]``, and sequence ``s`` is ``[cu_seqlens[s], cu_seqlens[s + 1])`` (int32
            ``[S + 1]``); the sums are segment sums (``torch.segment_reduce``, no padding).
        batch_invariant: as :func:`token_logprobs`; the sums then run in a fixed order from each
            sequence's first token (``fastrlhf._numerics.ordered_row_sum``), so that a sequence gives
            the same bits alone, padded, packed or in any batch.

    Returns:
        fp32 ``[...]`` (``[S]`` packed); a sequence with no counted token gives 0 (sum and mean).

    >>> chosen_logps = fastrlhf.sequence_logprobs(logits[:, :-1], input_ids[:, 1:], response_mask[:, 1:])
    """
    check_logits_labels(logits, labels, temperature, ignore_index)
    if labels.dim() < 1:
        raise ValueError(f"labels must have a sequence dimension, got shape {tuple(labels.shape)}")
    _checks.mask("mask", mask, labels.shape, labels.device)
    if cu_seqlens is not None:
        _checks.tensor("labels", labels, dim=1)
        _checks.cu_seqlens("cu_seqlens", cu_seqlens, labels.numel(), labels.device)
    invariant = invariant_mode(batch_invariant)
    logp = token_logprobs(logits, labels, temperature=temperature, ignore_index=ignore_index,
                          inplace_backward=inplace_backward, batch_invariant=invariant, backend=backend)
    valid = (mask != 0) & (labels != ignore_index)
    terms = torch.where(valid, logp, 0.0)
    if invariant:
        total, count = ordered_row_sum(terms, cu_seqlens), ordered_row_sum(valid.to(terms.dtype), cu_seqlens)
    elif cu_seqlens is None:
        total, count = terms.sum(-1), valid.sum(-1)
    else:
        total = torch.segment_reduce(terms, "sum", offsets=cu_seqlens, axis=0)
        count = torch.segment_reduce(valid.to(terms.dtype), "sum", offsets=cu_seqlens, axis=0)
    return total / count.clamp(min=1) if average else total
