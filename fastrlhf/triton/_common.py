"""What every Triton launcher shares."""

from __future__ import annotations

import torch
import triton.language as tl


def tl_acc(dtype: torch.dtype):
    """The Triton accumulation type of an accumulation dtype (``fastrlhf._numerics.acc_dtype``)."""
    return tl.float64 if dtype == torch.float64 else tl.float32
