"""Capture the Triton launches a launcher makes, without a GPU and without launching.

The real launchers of ``fastrlhf.triton`` run on ``device="meta"`` tensors (shapes, dtypes
and strides, no memory) while ``JITFunction.run`` (what ``kernel[grid](...)`` calls) is
replaced by a recorder. Each record is then specialized for a target exactly as Triton's
runtime would: Triton's own binder (``create_function_from_signature``, the code a launch
runs) maps every argument to its type and ``tt.divisibility`` attribute, and
``JITFunction._pack_args`` turns that into the signature, constexprs, attributes and
options that ``triton.compile`` takes.

A meta tensor reports ``data_ptr() == storage_offset * element_size`` (base address 0), so
Triton treats its pointer as 16-byte aligned exactly when a tensor at that offset into a
fresh CUDA allocation (256-byte aligned) would be; :func:`capture` checks this holds. A meta
tensor's device is ``meta``: a launcher that picks code by device (the ``FAST`` exp2 of
``fastrlhf.triton.logprobs``) takes the CPU path unless the tensor goes through :func:`on_cuda`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from triton.backends.compiler import GPUTarget
from triton.compiler.compiler import make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature


@dataclass
class Launch:
    """One captured ``kernel[grid](*args, **kwargs)``."""

    fn: JITFunction
    grid: tuple
    args: tuple
    kwargs: dict

    @property
    def name(self) -> str:
        return self.fn.fn.__name__


@dataclass
class Specialization:
    """What ``triton.compile`` needs for one launch on one target (as the runtime builds it)."""

    signature: dict  # argument name -> Triton type ("*bf16", "i32", "constexpr", ...)
    constexprs: dict  # (index,) -> value
    attrs: dict  # (index,) -> [["tt.divisibility", 16]] or []
    options: dict  # backend options: num_warps, num_stages, ...

    def key(self) -> str:
        """A string that is equal for launches that compile to the same binary."""
        return repr((self.signature, sorted(self.constexprs.items(), key=repr),
                     sorted(self.attrs.items()), sorted(self.options.items())))


def _check_meta_pointer(x: torch.Tensor) -> None:
    if x.device.type == "meta" and x.data_ptr() != x.storage_offset() * x.element_size():
        raise RuntimeError("this torch gives meta tensors a base address: 16-byte alignment "
                           "of a launch argument can no longer be derived from data_ptr()")


@contextlib.contextmanager
def capture():
    """Within the block, Triton launches are recorded in the yielded list, not run."""
    launches: list[Launch] = []
    run = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        for a in args:
            if isinstance(a, torch.Tensor):
                _check_meta_pointer(a)
        launches.append(Launch(self, tuple(grid) if not callable(grid) else grid, args, kwargs))

    JITFunction.run = record
    try:
        yield launches
    finally:
        JITFunction.run = run


class _OnCuda(torch.Tensor):
    @property
    def device(self) -> torch.device:
        return torch.device("cuda")


def on_cuda(x: torch.Tensor) -> torch.Tensor:
    """``x`` (its data, shape and strides), whose ``.device`` says ``cuda`` to a launcher;
    what it computes from ``x`` stays on ``x``'s own device."""
    return x.as_subclass(_OnCuda)


def specialize(launch: Launch, arch: int) -> Specialization:
    """The runtime's specialization of ``launch`` for ``sm_<arch>``."""
    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(launch.fn.signature, launch.fn.params, backend)
    bound, spec, options = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = launch.fn._pack_args(backend, launch.kwargs, bound,
                                                                 spec, options)
    return Specialization(signature, constexprs, attrs, options.__dict__)


def compile_launch(launch: Launch, arch: int):
    """``triton.compile`` of ``launch`` for ``sm_<arch>``, specialized as the runtime would."""
    import triton
    from triton.compiler import ASTSource

    spec = specialize(launch, arch)
    return triton.compile(ASTSource(launch.fn, spec.signature, spec.constexprs, spec.attrs),
                          target=GPUTarget("cuda", arch, 32), options=spec.options)
