"""Loss aggregation over the valid tokens: the modes, their normalizing counts, and
:func:`aggregate` for any per-token loss.

Modes (``agg``), over the valid tokens (``mask != 0``) of a ``[B, T]`` loss:

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
to the inputs' device). The normalizers themselves are stated once, in
``fastrlhf.reference.aggregation.denominator``.
"""

from __future__ import annotations

import torch

from fastrlhf import _checks
from fastrlhf.reference import aggregation as ref
from fastrlhf.reference.aggregation import AGG_MODES

__all__ = ["aggregate"]


def _count(name: str, value, device: torch.device):
    """``None``, a finite Python number ``>= 0`` (filled in on ``device``: no host-device copy) or a
    0-dim real tensor on ``device`` (or on the CPU, like a scalar of a torch op: copied)."""
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
    return torch.full((), _checks.non_negative(name, value), dtype=torch.float64, device=device)


def normalizer_counts(mask: torch.Tensor, global_tokens, global_seqs, loss_scale_factor) -> tuple:
    """The three normalizer overrides, checked, as 0-dim tensors on the mask's device or None."""
    return (_count("global_tokens", global_tokens, mask.device), _count("global_seqs", global_seqs, mask.device),
            _count("loss_scale_factor", loss_scale_factor, mask.device))


def check_layout(names, tensors, mask, cu_seqlens=None, agg=None, loss_scale_factor=None) -> None:
    """The inputs' layout: ``[B, T]``, or ``[total]`` with ``cu_seqlens``; ``agg`` one of
    :data:`AGG_MODES` (when given), with the ``loss_scale_factor`` packed input needs."""
    _checks.matching(names, tensors, dim=2 if cu_seqlens is None else 1)
    _checks.mask("mask", mask, tensors[0].shape, tensors[0].device)
    if cu_seqlens is not None:
        _checks.cu_seqlens("cu_seqlens", cu_seqlens, tensors[0].shape[0], tensors[0].device)
    if agg is not None:
        _checks.choice("agg", agg, AGG_MODES)
        if cu_seqlens is not None and agg == "seq-mean-token-sum-norm" and loss_scale_factor is None:
            raise ValueError("agg='seq-mean-token-sum-norm' with cu_seqlens needs loss_scale_factor (packed "
                             "sequences have no padded length T to default to)")


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
    _checks.choice("mode", mode, AGG_MODES)
    check_layout(("loss_mat",), (loss_mat,), mask, cu_seqlens, mode, loss_scale_factor)
    return ref.aggregate(loss_mat, mask, mode, *normalizer_counts(mask, global_tokens, global_seqs,
                                                                  loss_scale_factor), cu_seqlens=cu_seqlens)
