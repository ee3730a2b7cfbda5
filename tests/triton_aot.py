"""Compile Triton kernels ahead of time for real GPUs, with no GPU present.

The interpreter runs kernels as NumPy and misses what only the compiler checks (types of
loop-carried values, non-constexpr globals, unsupported ops). :func:`compile_for_gpus` runs
the whole Triton pipeline down to a cubin for sm_80 and sm_90, so a kernel that would not
compile on an A100/H100 fails CI here. It runs in a subprocess because the compiler cannot
run in a process where ``TRITON_INTERPRET=1`` was set before ``triton`` was imported.

A case is ``(module, kernel name, signature, constexprs, num_warps[, aligned])``:
``signature`` maps every argument to a Triton type string (``"*bf16"``, ``"i64"``, ``"fp32"``,
``"constexpr"``); a constexpr value written ``"tl.float32"`` means that ``triton.language``
dtype; ``aligned`` names the arguments (pointers, strides) to compile as divisible by 16, as
the launcher specializes them at run time for aligned tensors (this enables vectorized and
pipelined code paths). The launcher also turns an int argument equal to 1 (``T = 1``, a unit
stride) into a constant: compile such a case with that argument ``"constexpr"`` and value 1.

A kernel whose shared memory exceeds what one block may use on the arch also fails: the
compiler accepts it, the launch would raise ``OutOfResources`` on the GPU.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

ARCHS = (80, 90)
MAX_SHARED = {80: 166912, 90: 232448}
"""Bytes of shared memory one block may use (opt-in maximum): A100 163 KiB, H100 227 KiB."""


def compile_for_gpus(cases: list) -> None:
    """Compile every case for every arch in ARCHS, with this Triton and with each Python in
    ``FASTRLHF_AOT_PYTHONS`` (``:``-separated; ``scripts/test.sh`` adds one with the oldest
    Triton supported); fails the test with the compiler's error."""
    import pytest

    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    pythons = [sys.executable] + [p for p in os.environ.get("FASTRLHF_AOT_PYTHONS", "").split(":") if p]
    for python in pythons:
        proc = subprocess.run([python, "-m", "tests.triton_aot"], input=json.dumps(cases),
                              capture_output=True, text=True, env=env, cwd=root, timeout=600)
        if proc.returncode != 0:
            pytest.fail(f"Triton compile for sm_{ARCHS} failed ({python}):\n{proc.stderr[-6000:]}")


def _main() -> None:
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    for module, name, signature, constexprs, num_warps, *aligned in json.load(sys.stdin):
        kernel = getattr(importlib.import_module(module), name)
        constexprs = {k: getattr(tl, v[3:]) if isinstance(v, str) and v.startswith("tl.") else v
                      for k, v in constexprs.items()}
        names = list(signature)
        attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in (aligned[0] if aligned else [])}
        for arch in ARCHS:
            src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
            shared = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                    options={"num_warps": num_warps}).metadata.shared
            if shared > MAX_SHARED[arch]:
                sys.exit(f"{module}.{name} {constexprs}: {shared} bytes of shared memory, more than "
                         f"the {MAX_SHARED[arch]} a block may use on sm_{arch}")


if __name__ == "__main__":
    _main()
