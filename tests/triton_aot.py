"""Compile Triton kernels ahead of time for real GPUs, with no GPU present.

The interpreter runs kernels as NumPy and misses what only the compiler checks (types of
loop-carried values, non-constexpr globals, unsupported ops). :func:`compile_for_gpus` runs
the whole Triton pipeline down to a cubin for sm_80 and sm_90, so a kernel that would not
compile on an A100/H100 fails CI here. What it compiles is what the real launchers launch:
they run on ``meta`` tensors, their launches are captured and specialized exactly as Triton's
runtime would (``bench/static/capture.py``), and each distinct (kernel, specialization) is
compiled once per arch. The launches are those of the static report's Triton cases
(``bench/static/cases.py``, the headline shapes) and those of a test's own functions that
call launchers on other dtypes, shapes and layouts.

It runs in a subprocess because the compiler cannot run in a process where
``TRITON_INTERPRET=1`` was set before ``triton`` was imported. The capture runs there too:
each Python (``FASTRLHF_AOT_PYTHONS``, e.g. one with the oldest Triton supported) specializes
the launches as its own Triton does.

A kernel whose shared memory exceeds what one block may use on the arch also fails: the
compiler accepts it, the launch would raise ``OutOfResources`` on the GPU.
"""

from __future__ import annotations

import fnmatch
import importlib
import json
import os
import subprocess
import sys
from collections.abc import Callable

ARCHS = (80, 90)
MAX_SHARED = {80: 166912, 90: 232448}
"""Bytes of shared memory one block may use (opt-in maximum): A100 163 KiB, H100 227 KiB."""


def compile_for_gpus(cases: str | tuple[str, ...], *launches: Callable[[], object]) -> None:
    """Compile for every arch in ARCHS each distinct specialization launched by the static
    report's Triton cases whose names match ``cases`` (``fnmatch`` patterns, as ``python -m
    bench.static --only``) and by ``launches``: module-level functions (the subprocess imports
    them by name) that call ``fastrlhf.triton`` launchers on meta tensors. Runs with this
    Triton and with each Python in ``FASTRLHF_AOT_PYTHONS`` (``:``-separated;
    ``scripts/test.sh`` adds one with the oldest Triton supported); fails the test with the
    compiler's errors."""
    import pytest

    pytest.importorskip("triton")
    for fn in launches:
        if "<" in fn.__qualname__:
            raise ValueError(f"{fn.__qualname__}: launches must be module-level functions")
    request = json.dumps({"cases": [cases] if isinstance(cases, str) else list(cases),
                          "launches": [f"{fn.__module__}:{fn.__qualname__}" for fn in launches]})
    # "0", not unset: the subprocess imports test modules, whose conftest sets it by default
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    pythons = [sys.executable] + [p for p in os.environ.get("FASTRLHF_AOT_PYTHONS", "").split(":") if p]
    for python in pythons:
        proc = subprocess.run([python, "-m", "tests.triton_aot"], input=request,
                              capture_output=True, text=True, env=env, cwd=root, timeout=600)
        if proc.returncode != 0:
            pytest.fail(f"Triton compile for sm_{ARCHS} failed ({python}):\n{proc.stderr[-6000:]}")


def _launches(request: dict) -> list:
    from bench.static import capture, cases

    runs = []
    for pattern in request["cases"]:
        matched = [c for c in cases.TRITON_CASES if fnmatch.fnmatchcase(c.name, pattern)]
        if not matched:
            sys.exit(f"no Triton case of bench/static/cases.py matches {pattern!r}")
        runs += [(c.name, lambda c=c: cases.run_launcher(c)) for c in matched]
    for ref in request["launches"]:
        module, name = ref.split(":")
        runs.append((ref, getattr(importlib.import_module(module), name)))
    out = []
    for name, run in runs:
        with capture.capture() as launches:
            run()
        if not launches:
            sys.exit(f"{name} launched no Triton kernel")
        out += [(name, launch) for launch in launches]
    return out


def _main() -> None:
    from bench.static import capture

    launches = _launches(json.load(sys.stdin))
    failures, done = [], set()
    for arch in ARCHS:
        for source, launch in launches:
            spec = capture.specialize(launch, arch)
            if (arch, launch.fn, spec.key()) in done:
                continue
            done.add((arch, launch.fn, spec.key()))
            names = list(spec.signature)
            constexprs = {names[i[0]]: v for i, v in spec.constexprs.items()}
            what = f"{launch.name} for sm_{arch} (launched by {source}): {spec.signature} {constexprs}"
            try:
                shared = capture.compile_launch(launch, arch).metadata.shared
            except Exception as e:  # noqa: BLE001  (every failing kernel is reported)
                failures.append(f"{what}\n{str(e).strip()[-2000:]}")
                continue
            if shared > MAX_SHARED[arch]:
                failures.append(f"{what}\n{shared} bytes of shared memory, more than the "
                                f"{MAX_SHARED[arch]} a block may use on sm_{arch}")
    print(f"{len(done)} compiles (kernel specializations for sm_{ARCHS}), {len(failures)} failed")
    if failures:
        sys.exit("\n\n".join(failures))


if __name__ == "__main__":
    _main()
