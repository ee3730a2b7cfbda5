"""What every Triton launcher shares."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for ints (``triton.cdiv`` costs microseconds per call on the host)."""
    return -(-a // b)


def flat(x: torch.Tensor) -> torch.Tensor:
    """``x`` for a kernel that indexes its elements flat, in memory order: ``x`` itself when
    contiguous (no aten call), else a contiguous copy. (A bool tensor goes as it is: Triton
    loads its bytes as int8.)"""
    return x if x.is_contiguous() else x.contiguous()


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


# ----------------------------------------------- one launch: the last program reduces
@triton.jit
def total(ptr, n, DT: tl.constexpr, RBLOCK: tl.constexpr):
    """The sum of ``ptr[0:n]`` in ``DT``, in a fixed order; read from L2 (``.cg``: written by other
    programs of this launch)."""
    acc = tl.zeros([RBLOCK], DT)
    for start in range(0, n, RBLOCK):
        offs = start + tl.arange(0, RBLOCK)
        acc += tl.load(ptr + offs, mask=offs < n, other=0, cache_modifier=".cg").to(DT)
    return tl.sum(acc, axis=0)


@triton.jit
def safe_div(num, den):
    """``num / den``, 0 where ``den <= 0`` (``fastrlhf.reference.aggregation.safe_div``)."""
    return tl.where(den > 0, num / tl.where(den > 0, den, 1.0), 0.0)


@triton.jit
def count_positive(ptr, n, RBLOCK: tl.constexpr):
    """How many of ``ptr[0:n]`` are ``> 0`` (int64)."""
    acc = tl.zeros([RBLOCK], tl.int64)
    for start in range(0, n, RBLOCK):
        offs = start + tl.arange(0, RBLOCK)
        acc += (tl.load(ptr + offs, mask=offs < n, other=0, cache_modifier=".cg") > 0).to(tl.int64)
    return tl.sum(acc, axis=0)


@triton.jit
def is_last(ticket_ptr, P):
    """Take this program's ticket (an int32 the launcher zeroed): whether it is the last of the
    ``P`` programs of the launch, which then may read what the others wrote (with ``.cg`` loads:
    :func:`total`). The barrier and the release order the program's stores before the ticket."""
    tl.debug_barrier()
    return tl.atomic_add(ticket_ptr, 1, sem="acq_rel", scope="gpu") == P - 1
