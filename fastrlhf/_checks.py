"""Input checks shared by the public ops: they raise before any kernel runs.

Every message names the argument, what was expected and what was given.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)


def _names(dtypes: Sequence[torch.dtype]) -> str:
    return "/".join(str(d).removeprefix("torch.") for d in dtypes)


def tensor(name: str, x, dtypes: Sequence[torch.dtype] | None = None, *,
           min_dim: int = 0, dim: int | None = None) -> torch.Tensor:
    """Check that ``x`` is a tensor with one of ``dtypes`` and the expected rank."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if dtypes is not None and x.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype {_names(dtypes)}, got {x.dtype}")
    if dim is not None and x.dim() != dim:
        raise ValueError(f"{name} must have {dim} dimension(s), got shape {tuple(x.shape)}")
    if x.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dimension(s), got shape {tuple(x.shape)}")
    return x


def mask(name: str, x, shape: Sequence[int], device: torch.device) -> torch.Tensor:
    """Check a mask: a bool, integer or floating tensor of ``shape`` on ``device``."""
    tensor(name, x)
    if x.dtype.is_complex:
        raise TypeError(f"{name} must be a bool, integer or floating tensor, got {x.dtype}")
    same_shape(name, x, shape)
    same_device(name, x, device)
    return x


def matching(names: Sequence[str], tensors: Sequence, dtypes: Sequence[torch.dtype] = FLOAT_DTYPES,
             *, dim: int | None = None) -> None:
    """Check tensors that go together: each with one of ``dtypes``, all of the first one's
    shape (which must have ``dim`` dimensions when given) and on its device."""
    first = tensor(names[0], tensors[0], dtypes, dim=dim)
    for name, x in zip(names[1:], tensors[1:]):
        tensor(name, x, dtypes)
        same_shape(name, x, first.shape, f"{names[0]}.shape")
        same_device(name, x, first.device)


def writable_in_place(name: str, x: torch.Tensor, why: str) -> None:
    """Check that no two elements of ``x`` share memory, so that writing every element (``why``)
    is well defined: with the dims sorted by stride, each stride must pass the farthest offset
    the smaller ones reach. An expanded (stride-0) or otherwise overlapping view fails, as do
    the rare interleaved layouts this rule cannot prove safe."""
    reach = 0
    for stride, size in sorted((abs(st), n) for n, st in zip(x.shape, x.stride()) if n > 1):
        if stride <= reach:
            raise ValueError(f"{name} must not have elements that share memory for {why} (got shape "
                             f"{tuple(x.shape)}, strides {x.stride()}; an expanded view?): pass a "
                             f".contiguous() tensor or do not ask for it")
        reach += stride * (size - 1)


def cu_seqlens(name: str, offsets, total: int, device: torch.device) -> int:
    """Check packed-sequence offsets (flash-attention's varlen convention) and return the number
    of sequences ``S``: an int32 tensor ``[S + 1]`` on ``device``, starting at 0,
    non-decreasing (empty sequences allowed), ending at ``total`` (the packed length).

    The values are read on the host (one device sync for CUDA offsets) in eager mode; under
    ``torch.compile`` and while a CUDA graph is being captured only dtype, shape and device are
    checked (reading would break the graph, or the capture).
    """
    tensor(name, offsets, (torch.int32,), dim=1)
    same_device(name, offsets, device)
    if offsets.numel() < 1:
        raise ValueError(f"{name} must hold at least one offset (0), got shape {tuple(offsets.shape)}")
    if not (torch.compiler.is_compiling() or capturing(offsets)):
        values = offsets.tolist()
        if values[0] != 0:
            raise ValueError(f"{name} must start at 0, got {values[0]}")
        if values[-1] != total:
            raise ValueError(f"{name} must end at the packed length {total}, got {values[-1]}")
        steps = [(i, b - a) for i, (a, b) in enumerate(zip(values, values[1:])) if b < a]
        if steps:
            raise ValueError(f"{name} must be non-decreasing, got {values[steps[0][0]]} then "
                             f"{values[steps[0][0] + 1]} at index {steps[0][0]}")
    return offsets.numel() - 1


def capturing(x: torch.Tensor) -> bool:
    """Whether ``x`` is a CUDA tensor and its device's current stream is capturing a CUDA graph
    (reading a value on the host would end the capture)."""
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


def same_shape(name: str, x: torch.Tensor, shape: Sequence[int], expected: str = "") -> None:
    if tuple(x.shape) != tuple(shape):
        hint = f" ({expected})" if expected else ""
        raise ValueError(f"{name} must have shape {tuple(shape)}{hint}, got {tuple(x.shape)}")


def same_device(name: str, x: torch.Tensor, device: torch.device) -> None:
    if x.device != device:
        raise ValueError(f"{name} must be on {device} like the other inputs, got {x.device}")


def number(name: str, value) -> float:
    """A finite Python number (``bool`` is not one), as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a Python float, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)


def positive(name: str, value) -> float:
    """A finite Python number > 0."""
    if number(name, value) <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return float(value)


def non_negative(name: str, value) -> float:
    """A finite Python number >= 0."""
    if number(name, value) < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return float(value)


def optional_positive(name: str, value) -> float | None:
    """``None``, or a finite Python number > 0."""
    return None if value is None else positive(name, value)


def unit_interval(name: str, value) -> float:
    """A Python number in ``[0, 1]``."""
    if not 0.0 <= number(name, value) <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return float(value)


def integer(name: str, value) -> int:
    """A Python int that fits in int64 (kernels and index tensors are int64 at most)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a Python int, got {type(value).__name__}")
    if not -(2**63) <= value < 2**63:
        raise ValueError(f"{name} must fit in int64, got {value}")
    return value


def choice(name: str, value, choices: Sequence[str]) -> str:
    """One of the strings ``choices``."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value
