"""The numeric contract of every op, stated once.

Inputs may be bf16, fp16, fp32 or fp64; max, sums, log-sum-exp and every reduction are
computed in the *accumulation dtype*, and float outputs (log-probs, losses, advantages,
statistics) are returned in it: fp32, or fp64 when any floating input is fp64. Gradients
take the dtype of the input they belong to. Kernels map it with
``fastrlhf.triton._common.tl_acc`` (Triton) and ``acc_of`` in ``csrc/checks.h`` (CUDA).
"""

from __future__ import annotations

import torch


def acc_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """``torch.float64`` when a tensor among ``tensors`` (``None`` skipped) is fp64, else ``torch.float32``."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32
