"""Packaging hooks beyond pyproject.toml: the optional ahead-of-time CUDA build.

``pip install .`` builds a pure-Python package: no nvcc, no torch at build time. The CUDA
sources (``kernels/``, ``csrc/``) ship inside it (``fastrlhf/_ext_src/``) so that
``backend="cuda"`` can build them just in time on first use (``fastrlhf/_cuda.py``).

``FASTRLHF_BUILD_CUDA=1 pip install --no-build-isolation .`` also compiles the extension
``fastrlhf._C`` now (CUDAExtension + BuildExtension, ninja), against the torch installed in
this environment -- hence no build isolation: an extension must match the torch it runs with.
``TORCH_CUDA_ARCH_LIST`` picks the archs (default: the visible GPUs, else "8.0;9.0+PTX") and
``MAX_JOBS`` the number of parallel compile jobs.
"""

import importlib.util
import os
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))


class build_py_with_cuda_sources(build_py):
    """Copies kernels/ and csrc/ into the built package as fastrlhf/_ext_src/ (editable
    installs read them from the checkout instead)."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        for folder in ("kernels", "csrc"):
            src = os.path.join(HERE, folder)
            if os.path.isdir(src):
                dst = os.path.join(self.build_lib, "fastrlhf", "_ext_src", folder)
                shutil.copytree(src, dst, dirs_exist_ok=True)


def _cuda_extension():
    """``(ext_modules, cmdclass)`` of the ahead-of-time build."""
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as e:
        raise RuntimeError(
            "FASTRLHF_BUILD_CUDA=1 compiles against the torch you will run with, so torch must be "
            "importable while building: install torch first, then "
            "`FASTRLHF_BUILD_CUDA=1 pip install --no-build-isolation .`") from e
    if torch.version.cuda is None:
        raise RuntimeError(f"FASTRLHF_BUILD_CUDA=1 needs a CUDA build of torch; torch {torch.__version__} has no CUDA")
    if cpp_extension.CUDA_HOME is None:
        raise RuntimeError("FASTRLHF_BUILD_CUDA=1 needs nvcc (the CUDA toolkit); set CUDA_HOME")
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
        print("fastrlhf: no GPU visible and TORCH_CUDA_ARCH_LIST unset: building for 8.0;9.0+PTX")
    # One list of sources and flags for both builds: read them from fastrlhf/_cuda.py.
    spec = importlib.util.spec_from_file_location("_fastrlhf_cuda_build", os.path.join(HERE, "fastrlhf", "_cuda.py"))
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    ext = cpp_extension.CUDAExtension(
        name="fastrlhf._C",
        sources=build.source_files(HERE),
        include_dirs=[os.path.join(HERE, "kernels")],
        extra_compile_args={"cxx": build.CXX_FLAGS, "nvcc": build.NVCC_FLAGS},
    )
    return [ext], {"build_ext": cpp_extension.BuildExtension}


ext_modules, cmdclass = [], {"build_py": build_py_with_cuda_sources}
if os.environ.get("FASTRLHF_BUILD_CUDA", "0") == "1":
    ext_modules, extra = _cuda_extension()
    cmdclass.update(extra)

setup(ext_modules=ext_modules, cmdclass=cmdclass)
