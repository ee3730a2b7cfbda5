"""Packed (padding-free) sequences in the references: padded out, computed, packed back.

A packed batch is 1-D ``[total]`` tensors whose sequence ``s`` is positions
``[cu_seqlens[s], cu_seqlens[s + 1])`` (flash-attention's varlen convention). The references
take the naive route the kernels avoid: a ``[S, L_max]`` padded copy (zeros past each
sequence's end, so a padded mask is 0 there), the padded op, then the valid positions back.
"""

from __future__ import annotations

import torch


def _positions(cu_seqlens: torch.Tensor) -> torch.Tensor:
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    width = int(lengths.max()) if lengths.numel() else 0
    return torch.arange(width, device=cu_seqlens.device) < lengths[:, None]  # [S, L_max]


def pad(cu_seqlens: torch.Tensor, *xs: torch.Tensor) -> list[torch.Tensor]:
    """``[S, L_max]`` copies of packed ``[total]`` tensors, zero past each sequence's end."""
    where = _positions(cu_seqlens)
    out = []
    for x in xs:
        y = x.new_zeros(where.shape)
        y[where] = x
        out.append(y)
    return out


def unpad(cu_seqlens: torch.Tensor, *ys: torch.Tensor) -> list[torch.Tensor]:
    """The packed ``[total]`` values of padded ``[S, L_max]`` tensors."""
    where = _positions(cu_seqlens)
    return [y[where] for y in ys]
