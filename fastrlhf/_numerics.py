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
