"""Compile kernels to sm_XX cubins (no GPU needed) and dump them with ``cuobjdump``.

Triton kernels go through ``triton.compile`` with the runtime's specialization of the
captured launch (``capture.specialize``); ``kernels/*.cu`` through ``nvcc -cubin`` with the
CUDA extension's flags (``fastrlhf._cuda.NVCC_FLAGS``, torch's ``COMMON_NVCC_FLAGS`` and the
C++ standard torch builds with, which does not change the generated code). ``cuobjdump``
comes with Triton's NVIDIA backend; the CUDA toolkit's copy is used when Triton has none.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tool(name: str) -> str | None:
    """Path of a CUDA binary tool (``cuobjdump``, ``ptxas``, ``cu++filt``), or ``None``."""
    try:
        import triton

        bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
        if os.access(bundled, os.X_OK):
            return bundled
    except ImportError:
        pass
    return shutil.which(name)


@dataclass
class Dump:
    """``cuobjdump -sass`` and ``-res-usage`` of one cubin."""

    sass: str
    res_usage: str


def dump(cubin: bytes) -> Dump:
    """Disassemble a cubin."""
    cuobjdump = tool("cuobjdump")
    if cuobjdump is None:
        raise RuntimeError("cuobjdump not found (it ships with Triton's NVIDIA backend and the CUDA toolkit)")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return Dump(*(subprocess.run([cuobjdump, flag, f.name], check=True, capture_output=True,
                                     text=True).stdout for flag in ("-sass", "-res-usage")))


@dataclass
class TritonBinary:
    """A compiled Triton kernel: its dump, the function name, the launch's dynamic shared
    memory (bytes) and warps."""

    dump: Dump
    function: str
    dynamic_shared: int
    num_warps: int


def compile_triton(launch, arch: int) -> TritonBinary:
    """Compile a captured launch for ``sm_<arch>`` as the runtime would specialize it."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from bench.static.capture import specialize

    spec = specialize(launch, arch)
    kernel = triton.compile(ASTSource(launch.fn, spec.signature, spec.constexprs, spec.attrs),
                            target=GPUTarget("cuda", arch, 32), options=spec.options)
    md = kernel.metadata
    return TritonBinary(dump(kernel.asm["cubin"]), md.name, md.shared, md.num_warps)


def nvcc_flags(arch: int) -> list[str]:
    """The extension's nvcc flags for one arch, ``-cubin`` instead of an object file."""
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS

    from fastrlhf._cuda import NVCC_FLAGS

    return [*NVCC_FLAGS, *COMMON_NVCC_FLAGS, "-std=c++20",  # the standard torch >= 2.10 passes
            f"-gencode=arch=compute_{arch},code=sm_{arch}", "-I", os.path.join(ROOT, "kernels"), "-cubin"]


def compile_cuda(source: str, arch: int) -> Dump:
    """Compile ``kernels/<source>`` for ``sm_<arch>`` and dump it."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise RuntimeError("nvcc not found")
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "k.cubin")
        subprocess.run([nvcc, *nvcc_flags(arch), os.path.join(ROOT, "kernels", source), "-o", out],
                       check=True, capture_output=True, text=True)
        with open(out, "rb") as f:
            return dump(f.read())


def demangle(names: list[str]) -> dict[str, str]:
    """Mangled -> demangled C++ names (``cu++filt``, else ``c++filt``; unchanged without one)."""
    filt = tool("cu++filt") or shutil.which("c++filt")
    if filt is None or not names:
        return {n: n for n in names}
    out = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True, check=True)
    return dict(zip(names, out.stdout.splitlines()))


def _ptxas(arch: int) -> str | None:
    """The ptxas Triton compiles ``sm_<arch>`` with (its signature varies by version)."""
    from triton.backends.nvidia import compiler

    try:
        return compiler.get_ptxas(arch).path
    except TypeError:
        return compiler.get_ptxas().path


def versions(archs: list[int]) -> dict[str, str]:
    """Versions of what produced the report: Triton, torch, and each CUDA tool used."""
    import platform

    import torch
    import triton

    out = {"triton": triton.__version__, "torch": torch.__version__, "python": platform.python_version()}
    tools = [("nvcc", shutil.which("nvcc")), ("cuobjdump", tool("cuobjdump"))]
    tools += [(f"ptxas (Triton, sm_{a})", _ptxas(a)) for a in archs]
    for name, path in tools:
        if path:
            text = subprocess.run([path, "--version"], capture_output=True, text=True).stdout
            out[name] = next((ln.split(",")[-1].strip() for ln in text.splitlines() if "release" in ln), "?")
    return out
