"""The numeric contract of every op, stated once.

Inputs may be bf16, fp16, fp32 or fp64; max, sums, log-sum-exp and every reduction are
computed in the *accumulation dtype*, and float outputs (log-probs, losses, advantages,
statistics) are returned in it: fp32, or fp64 when any floating input is fp64. Gradients
take the dtype of the input they belong to. Kernels map it with
``fastrlhf.triton._common.tl_acc`` (Triton) and ``acc_of`` in ``csrc/checks.h`` (CUDA).

Whitening statistics (mean and variance of advantages, of a group's scores) are the one
exception: they accumulate in ``STATS_DTYPE`` = fp64 whatever the inputs, so that no finite
fp32, bf16 or fp16 input overflows them (the square of 1e20 does not fit in fp32) and
whitening stays scale-invariant; outputs still come in the accumulation dtype.
"""

from __future__ import annotations

import torch

STATS_DTYPE = torch.float64
"""Accumulation dtype of whitening statistics (see above)."""


def acc_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """``torch.float64`` when a tensor among ``tensors`` (``None`` skipped) is fp64, else ``torch.float32``."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


LANES = 64
"""Width of :func:`ordered_row_sum`'s partial sums."""


def ordered_row_sum(x: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """Sum over the last dim (``[...]``), or over each packed sequence of a 1-D ``x`` with
    ``cu_seqlens`` (``[S]``), in an order fixed by each element's position in its row alone:
    element ``j`` goes to lane ``j % 64``, lanes sum left to right from 0, then a fixed pairwise
    tree adds the lanes. Padding (zeros past the end), the batch and the row's place in it change
    no bit. Packed input is first padded into ``[S, longest]`` (one host read of the lengths).
    Differentiable; ``T / 64`` elementwise additions."""
    if cu_seqlens is not None:
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        longest = int(lengths.max()) if lengths.numel() else 0
        cols = torch.arange(longest, device=x.device)
        idx = cu_seqlens[:-1, None].long() + cols
        x = torch.where(cols < lengths[:, None], x[idx.clamp(max=max(x.numel() - 1, 0))] if x.numel() else
                        x.new_zeros(idx.shape), 0.0)
    T = x.shape[-1]
    blocks = -(-T // LANES)
    y = torch.nn.functional.pad(x, (0, blocks * LANES - T)).reshape(*x.shape[:-1], blocks, LANES)
    acc = x.new_zeros((*x.shape[:-1], LANES))
    for k in range(blocks):
        acc = acc + y[..., k, :]
    width = LANES
    while width > 1:
        width //= 2
        acc = acc[..., :width] + acc[..., width:]
    return acc[..., 0]
