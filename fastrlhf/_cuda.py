"""Finds, or builds on first use, the compiled CUDA extension behind ``backend="cuda"``.

Where the kernels come from, first match wins:

1. ``fastrlhf._C``, built ahead of time by ``FASTRLHF_BUILD_CUDA=1 pip install
   --no-build-isolation .`` (see ``setup.py``);
2. a just-in-time build of ``csrc/`` + ``kernels/`` by ``torch.utils.cpp_extension.load``
   (ninja), cached in ``$FASTRLHF_CACHE_DIR`` or ``${XDG_CACHE_HOME:-~/.cache}/fastrlhf``,
   in a folder keyed by a hash of the sources, the torch, CUDA and Python versions and the
   target archs: later processes load the cached library without compiling.
   ``TORCH_CUDA_ARCH_LIST`` picks the archs (default: those of the visible GPUs) and
   ``MAX_JOBS`` the number of parallel compile jobs. One line is printed while it builds.

The CUDA backend is optional: without it every op runs on the ``torch`` and ``triton``
backends, and :func:`status` says in one line why ``cuda`` cannot run. It never builds (and
is cheap) when there is no CUDA device.

The ops live in ``torch.ops.fastrlhf_cuda`` once the extension is loaded (:func:`ops`);
``fastrlhf.cuda.<family>`` holds their Python launchers.
"""

from __future__ import annotations

import glob
import hashlib
import importlib
import importlib.util
import os
import re
import sys
import threading

import torch

NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr"]
"""nvcc flags of both builds (torch adds -std, the arch flags and its own defines)."""
CXX_FLAGS = ["-O3"]
SOURCE_GLOBS = ("kernels/*.cu", "csrc/*.cpp")
HEADER_GLOBS = ("kernels/*.cuh", "csrc/*.h")

_lock = threading.Lock()
_module = None  # the loaded extension
_reason: str | None = None  # why it cannot load, once known


def source_root() -> str | None:
    """The folder holding ``kernels/`` and ``csrc/``: a source checkout (or editable install)
    beside the package, else the copy a wheel ships in ``fastrlhf/_ext_src``."""
    package = os.path.dirname(os.path.abspath(__file__))
    for root in (os.path.dirname(package), os.path.join(package, "_ext_src")):
        if os.path.isfile(os.path.join(root, "kernels", "launchers.cuh")):
            return root
    return None


def source_files(root: str, globs=SOURCE_GLOBS) -> list[str]:
    """Files under ``root`` matching ``globs``, as sorted paths relative to ``root``."""
    return sorted(os.path.relpath(p, root) for g in globs for p in glob.glob(os.path.join(root, g)))


def _arch() -> tuple[str, list[str]]:
    """``(key, nvcc flags)`` of the archs to build for: ``TORCH_CUDA_ARCH_LIST`` when set
    (torch turns it into flags), else every distinct capability of the visible GPUs."""
    env = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if env:
        return env, []
    caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    return (";".join(f"{a}.{b}" for a, b in caps),
            [f"-gencode=arch=compute_{a}{b},code=sm_{a}{b}" for a, b in caps])


def _cache_key(root: str, arch_key: str, flags: list[str], cuda_home: str) -> str:
    h = hashlib.sha256()
    for rel in source_files(root, SOURCE_GLOBS + HEADER_GLOBS):
        h.update(rel.encode() + b"\0")
        with open(os.path.join(root, rel), "rb") as f:
            h.update(f.read() + b"\0")
    h.update(repr((torch.__version__, torch.version.cuda, sys.version_info[:2], sys.platform,
                   arch_key, flags, NVCC_FLAGS, CXX_FLAGS, cuda_home)).encode())
    return h.hexdigest()[:16]


def cache_dir() -> str:
    """Where just-in-time builds are kept (one sub-folder per key)."""
    base = os.environ.get("FASTRLHF_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "fastrlhf")
    return os.path.join(base, "cuda")


def _first_error_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in lines:
        if re.search(r"\berror\b", ln, re.IGNORECASE) and not ln.startswith("Error building extension"):
            return ln[:300]
    return (lines[0] if lines else "unknown error")[:300]


def _import_file(name: str, path: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _jit_load():
    """The extension from the cache, built there first when missing; ``(module, reason)``."""
    from torch.utils import cpp_extension  # imports setuptools: only here

    root = source_root()
    if root is None:
        return None, "its sources (kernels/, csrc/) are not in this installation of fastrlhf"
    arch_key, arch_flags = _arch()
    cuda_home = cpp_extension.CUDA_HOME or ""
    key = _cache_key(root, arch_key, arch_flags, cuda_home)
    name = f"fastrlhf_cuda_{key}"
    build_dir = os.path.join(cache_dir(), key)
    library = os.path.join(build_dir, name + (".pyd" if sys.platform == "win32" else ".so"))
    stale = ""
    if os.path.isfile(library):
        try:
            return _import_file(name, library), ""
        except Exception as e:  # noqa: BLE001  (a link cut short, or one still running elsewhere:
            # the locked build below waits for it or redoes what is stale)
            stale = (f"the cached build {library} does not load ({_first_error_line(str(e))}; "
                     f"delete {build_dir} to rebuild); ")
    if not (cuda_home and os.path.isfile(os.path.join(cuda_home, "bin", "nvcc"))):
        return None, stale + (f"nvcc not found: install the CUDA toolkit for CUDA {torch.version.cuda} "
                              "(or set CUDA_HOME) to build the extension")
    if not cpp_extension.is_ninja_available():
        return None, stale + "ninja not found (pip install ninja) to build the extension"
    print(f"fastrlhf: building the CUDA extension for sm {arch_key} (first use only, about a minute; "
          f"cached in {build_dir})", file=sys.stderr, flush=True)
    log = os.path.join(build_dir, "build-error.log")
    try:
        os.makedirs(build_dir, exist_ok=True)
        module = cpp_extension.load(
            name=name, sources=[os.path.join(root, s) for s in source_files(root)],
            extra_include_paths=[os.path.join(root, "kernels")], extra_cflags=CXX_FLAGS,
            extra_cuda_cflags=NVCC_FLAGS + arch_flags, build_directory=build_dir, verbose=False)
    except Exception as e:  # noqa: BLE001  (any failure means: no cuda backend, say why)
        try:
            with open(log, "w") as f:
                f.write(str(e))
        except OSError:
            log = "not written"
        return None, stale + f"build failed: {_first_error_line(str(e))} (full log: {log})"
    return module, ""


def _load(build: bool):
    global _module, _reason
    if _module is not None or _reason is not None:
        return
    if not torch.cuda.is_available():
        cpu_build = " (this torch is a CPU-only build)" if torch.version.cuda is None else ""
        _reason = "no CUDA device" + cpu_build
        return
    if torch.version.hip is not None:
        _reason = "the cuda backend needs an NVIDIA CUDA build of torch (this one is ROCm)"
        return
    aot_error = ""
    if importlib.util.find_spec("fastrlhf._C") is not None:
        try:
            _module = importlib.import_module("fastrlhf._C")
        except ImportError as e:  # built against another torch, typically
            aot_error = f"fastrlhf._C does not load ({str(e).splitlines()[0][:200]}); "
    if _module is None:
        if not build:
            return
        _module, why = _jit_load()
        if _module is None:
            _reason = aot_error + why
            return
    device = torch.cuda.current_device()
    err = _module.check_device(device)
    if err:
        cap = "".join(map(str, torch.cuda.get_device_capability(device)))
        _reason = (f"the CUDA extension has no code for this GPU (sm_{cap}; built for "
                   f"{_module.build_info()['archs']}): {err}")
        _module = None


def status(build: bool = True) -> tuple[bool, str]:
    """``(available, reason)`` of the cuda backend; ``reason`` is one line, ``""`` when available.

    Loads the extension, building it first (once, cached) when ``build`` and no build exists.
    With ``build=False`` a missing build gives ``(False, "not built yet ...")`` and is not
    remembered. Without a CUDA device this returns at once.
    """
    with _lock:
        _load(build)
    if _module is not None:
        return True, ""
    if _reason is not None:
        return False, _reason
    return False, "not built yet: the first use of backend='cuda' builds it (about a minute)"


def ops():
    """``torch.ops.fastrlhf_cuda``, the extension loaded (or built) first.

    Raises ``fastrlhf.errors.BackendUnavailableError`` with the reason when it cannot load.
    """
    ok, why = status()
    if not ok:
        # Imported here: setup.py loads this file alone, without the package.
        from fastrlhf.errors import BackendUnavailableError  # noqa: PLC0415

        raise BackendUnavailableError(f"fastrlhf backend 'cuda' is unavailable: {why}")
    return torch.ops.fastrlhf_cuda


def build_info() -> dict:
    """What the loaded extension was built with (cuda, torch, archs, compiler) and its module."""
    ops()
    return {**_module.build_info(), "module": _module.__name__}
