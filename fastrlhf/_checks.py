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


def same_shape(name: str, x: torch.Tensor, shape: Sequence[int], expected: str = "") -> None:
    if tuple(x.shape) != tuple(shape):
        hint = f" ({expected})" if expected else ""
        raise ValueError(f"{name} must have shape {tuple(shape)}{hint}, got {tuple(x.shape)}")


def same_device(name: str, x: torch.Tensor, device: torch.device) -> None:
    if x.device != device:
        raise ValueError(f"{name} must be on {device} like the other inputs, got {x.device}")


def positive(name: str, value) -> float:
    """A finite Python number > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a Python float, got {type(value).__name__}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return float(value)


def integer(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a Python int, got {type(value).__name__}")
    return value
