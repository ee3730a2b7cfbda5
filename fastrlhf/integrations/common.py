"""Tensor helpers the drop-ins of several integrations share (TRL, verl, OpenRLHF)."""

from __future__ import annotations

import torch

from fastrlhf.ops.logprobs import token_logprobs

__all__ = ["NO_IGNORE_INDEX", "entropy", "gather_or_zero", "next_valid"]

NO_IGNORE_INDEX = -(2**63)
"""An ``ignore_index`` no int64 label equals: for peers that ignore no label index."""


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy ``-sum(p * log p)`` of ``softmax(logits)`` over the last dim, of ``logits.shape[:-1]``:
    fp32 (fp64 for fp64 logits), differentiable, one streaming pass of :func:`fastrlhf.token_logprobs`."""
    labels = torch.zeros(logits.shape[:-1], dtype=torch.int64, device=logits.device)
    return token_logprobs(logits, labels, ignore_index=NO_IGNORE_INDEX, return_entropy=True)[1]


def next_valid(valid: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` int64 from a ``[B, T]`` bool ``valid``: the first index ``s >= t`` where
    ``valid[b, s]``, or ``T`` where there is none (after a row's last valid token)."""
    T = valid.shape[-1]
    pos = torch.where(valid, torch.arange(T, device=valid.device), T)
    return pos.flip(-1).cummin(-1).values.flip(-1) if T else pos


def gather_or_zero(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[b, index[b, t]]`` for ``[B, T]`` ``x`` and an int64 ``index`` in ``[0, T]``; 0 where
    ``index == T`` (as :func:`next_valid` gives past a row's last valid token)."""
    return torch.cat([x, x.new_zeros(x.shape[0], 1)], -1).gather(-1, index)
