"""Backend selection: which implementation of an op runs.

Backends:

* ``"torch"``  -- eager PyTorch launchers (``fastrlhf.eager.<family>``) computing the naive
  reference math (``fastrlhf.reference``); runs anywhere and is the CPU path.
* ``"triton"`` -- fused Triton kernels; needs CUDA tensors, or the Triton interpreter
  (``TRITON_INTERPRET=1`` set before ``triton`` is imported) for CPU tensors.
* ``"cuda"``   -- hand-written CUDA kernels from the compiled extension.
* ``"auto"``   -- the fastest available for the tensors' device: on CUDA tensors ``triton``,
  or ``cuda`` for the op families a measured table says it is faster for (or when Triton
  is not installed); on CPU ``torch``. Never the Triton interpreter.

The backend of a call is, in order of precedence: the op's ``backend=`` keyword when it is
not ``"auto"``, the innermost :func:`use_backend` block, the ``FASTRLHF_BACKEND``
environment variable, then the ``auto`` rule.

Batch-invariant mode (:func:`use_batch_invariant`, ``FASTRLHF_BATCH_INVARIANT=1`` or an op's
``batch_invariant=True``): the log-prob ops give each row the same bits whatever the batch around
it (see :func:`batch_invariant`). It is a family feature (``"batch_invariant"``): ``auto`` never
picks a backend without it, and naming one raises.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import threading

import torch

from fastrlhf import _cuda, registry
from fastrlhf.errors import BackendUnavailableError
from fastrlhf.interpreter import triton_interpreter

__all__ = ["BACKENDS", "BackendUnavailableError", "available_backends", "backend_status", "batch_invariant",
           "has_kernels", "launchers", "resolve_backend", "triton_interpreter", "use_backend", "use_batch_invariant"]

BACKENDS = ("torch", "triton", "cuda")
_CHOICES = BACKENDS + ("auto",)
_state = threading.local()


def _check_name(name: str, what: str) -> str:
    if not isinstance(name, str) or name not in _CHOICES:
        raise ValueError(f"{what} must be one of {_CHOICES}, got {name!r}")
    return name


@functools.lru_cache(maxsize=None)
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def backend_status(name: str, device: torch.device | str | None = None) -> tuple[bool, str]:
    """``(available, reason)`` of backend ``name`` for tensors on ``device``.

    With ``device=None`` the question is asked for the default CUDA device when there is
    one, else for the CPU. ``reason`` is an empty string when available.
    """
    _check_name(name, "backend")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if name in ("torch", "auto"):
        return True, ""
    if name == "triton":
        if not _triton_installed():
            return False, "the 'triton' package is not installed (pip install triton; Linux x86-64 only)"
        if device.type == "cuda":
            return True, ""
        if device.type == "cpu" and triton_interpreter():
            return True, ""
        return False, (f"Triton kernels need CUDA tensors (got {device.type}); set TRITON_INTERPRET=1 "
                       "before importing triton to run them on CPU under the (slow) interpreter")
    if device.type != "cuda":
        return False, f"the cuda backend needs CUDA tensors (got {device.type})"
    return _cuda.status()


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Names of the backends that can run on ``device`` (see :func:`backend_status`)."""
    return [b for b in BACKENDS if backend_status(b, device)[0]]


@contextlib.contextmanager
def use_backend(name: str):
    """Run the ops called inside the block on backend ``name`` (unless a call names its own).

    >>> with fastrlhf.use_backend("torch"):
    ...     logp = fastrlhf.token_logprobs(logits, labels)
    """
    _check_name(name, "backend")
    stack = _state.__dict__.setdefault("stack", [])
    stack.append(name)
    try:
        yield
    finally:
        stack.pop()


@contextlib.contextmanager
def use_batch_invariant(enabled: bool = True):
    """Run the log-prob ops called inside the block in batch-invariant mode (unless a call says
    otherwise): for the integrations, whose trainers call the ops without the keyword.

    >>> with fastrlhf.use_batch_invariant():
    ...     old_logp = fastrlhf.linear_token_logprobs(hidden, weight, labels)
    """
    stack = _state.__dict__.setdefault("invariant", [])
    stack.append(bool(enabled))
    try:
        yield
    finally:
        stack.pop()


def batch_invariant(flag: bool | None = None) -> bool:
    """Whether a call runs in batch-invariant mode: its ``batch_invariant`` keyword when not None,
    else the innermost :func:`use_batch_invariant` block, else ``FASTRLHF_BATCH_INVARIANT`` (``1``).

    In that mode a row's results (log-prob, entropy, statistics, its own gradient rows) depend
    only on that row's data: not on the number of rows, their order, padding, packing, or free
    memory, bit for bit. Sums over rows (``grad_weight``, a loss) still depend on the batch; they
    are deterministic."""
    if flag is not None:
        return bool(flag)
    stack = getattr(_state, "invariant", None)
    if stack:
        return stack[-1]
    return os.environ.get("FASTRLHF_BATCH_INVARIANT", "0") not in ("", "0")


def _auto(device: torch.device, family: str | None, feature: str | None) -> str:
    """CPU: torch. CUDA: triton, or cuda where the measured table (``fastrlhf.cuda.
    dispatch_table``) says it is faster and the extension is already built (``auto`` never
    starts a build), or where Triton is not installed (then it builds); torch when neither runs."""
    if device.type != "cuda":
        return "torch"
    if family is not None and has_kernels("cuda", family, feature):
        from fastrlhf.cuda.dispatch_table import preferred  # noqa: PLC0415  (reads its JSON on first use)

        triton = _triton_installed()
        choice = preferred(family, torch.cuda.get_device_capability(device))
        if (choice == "cuda" or not triton) and _cuda.status(build=not triton)[0]:
            return "cuda"
    return "triton" if _triton_installed() else "torch"


def has_kernels(backend: str, family: str, feature: str | None = None) -> bool:
    """Whether ``backend`` has launchers for op ``family`` (``fastrlhf.registry``) and, when
    given, for ``feature`` of it (e.g. ``"packed"`` sequences): the torch and triton backends
    cover every feature, cuda those its registry entry lists."""
    fam = registry.find(family)
    if fam is None or backend not in fam.backends:
        return False
    return feature is None or backend != "cuda" or feature in fam.cuda_features


def resolve_backend(backend: str, device: torch.device, family: str | None = None,
                    feature: str | None = None) -> str:
    """The concrete backend (``torch``/``triton``/``cuda``) a call of an op of ``family`` (using
    ``feature``, see :func:`has_kernels`) runs on; ``auto`` never picks one without them.

    Raises ``ValueError`` for an unknown name and :class:`BackendUnavailableError` when the
    chosen backend cannot run on ``device`` or has no kernels for ``family`` and ``feature``.
    """
    name = _check_name(backend, "backend")
    if name == "auto":
        stack = getattr(_state, "stack", None)
        name = stack[-1] if stack else _check_name(os.environ.get("FASTRLHF_BACKEND", "auto"),
                                                  "FASTRLHF_BACKEND")
    return _concrete(name, device, family, feature)


@torch.compiler.assume_constant_result
def _concrete(name: str, device: torch.device, family: str | None, feature: str | None) -> str:
    """:func:`resolve_backend` once the name is known: run eagerly, also while ``torch.compile``
    traces a caller (a constant of the graph)."""
    if name == "auto":
        return _auto(device, family, feature)
    ok, why = backend_status(name, device)
    if ok and family is not None and not has_kernels(name, family, feature):
        what = f"{family} kernels" + (f" for {feature}" if feature else "")
        ok, why = False, f"it has no {what}; use backend='triton' or 'torch'"
    if not ok:
        raise BackendUnavailableError(f"fastrlhf backend {name!r} is unavailable: {why}")
    return name


def launchers(backend: str, family: str):
    """The launcher module of op ``family`` on ``backend`` (``fastrlhf.registry``): every backend's
    exposes the same functions with the same signatures."""
    return registry.launcher_module(backend, family)
