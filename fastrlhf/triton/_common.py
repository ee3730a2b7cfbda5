"""What every Triton launcher shares."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def flat(x: torch.Tensor) -> torch.Tensor:
    """``x`` for a kernel that indexes its elements flat, in memory order: ``x`` itself when
    contiguous (no aten call), else a contiguous copy; a bool tensor as a uint8 view."""
    if not x.is_contiguous():
        x = x.contiguous()
    return x.view(torch.uint8) if x.dtype == torch.bool else x


def tl_acc(dtype: torch.dtype):
    """The Triton accumulation type of an accumulation dtype (``fastrlhf._numerics.acc_dtype``)."""
    return tl.float64 if dtype == torch.float64 else tl.float32


@triton.jit
def narrow(x, ptr):
    """``x`` in the element type of ``ptr``, a 16-bit one by way of fp32. An fp64 value goes to
    bf16 in two roundings (they differ from one only where the first lands on a bf16 tie): the
    Triton interpreter turns fp64 straight into bf16 bits that are wrong (zeros and NaNs), and
    fp64 accumulation with a 16-bit gradient is the mixed-dtype case (bf16 log-probs, fp64
    advantages)."""
    ty = ptr.dtype.element_ty
    if ty.primitive_bitwidth < 32:
        return x.to(tl.float32).to(ty)
    return x.to(ty)
