"""The CUDA backend builds on a machine without a GPU.

* every ``kernels/*.cu`` compiles with nvcc for sm_80 (C++17) and sm_90 (C++20: what torch
  >= 2.10 passes to nvcc), warnings as errors, with the defines torch's extension builds add
  (no implicit half/bf16 conversions);
* the ``csrc/*.cpp`` files parse with g++ against torch's headers (the CPU wheel ships them),
  all in one translation unit: torch's headers are parsed once (5 s instead of 5 s a file),
  so helpers in their anonymous namespaces need distinct names;
* a plain ``pip install .`` needs neither nvcc nor torch at build time, and ships the
  sources for the just-in-time build.

Compiles run two at a time (CI has two cores) from one module-level fixture, so each file
still gets its own readable test id.
"""

from __future__ import annotations

import concurrent.futures
import glob
import os
import re
import shutil
import subprocess
import sys
import sysconfig

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNELS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "kernels", "*.cu")))
HOST = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "csrc", "*.cpp")))
TARGETS = (("sm_80", "c++17"), ("sm_90", "c++20"))
# What torch.utils.cpp_extension adds to every nvcc command line.
TORCH_NVCC_DEFINES = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                      "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__"]
NVCC = shutil.which("nvcc")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found on PATH: the CUDA sources "
                                "cannot be compiled here (install the CUDA toolkit)")


def _read(*parts: str) -> str:
    with open(os.path.join(ROOT, *parts)) as f:
        return f.read()


def _run(cmd: list[str]) -> tuple[int, str]:
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300)
    return proc.returncode, (proc.stdout + proc.stderr).strip()


def _cuda_include() -> str:
    """nvcc's own include folder (cuda_runtime_api.h), as nvcc reports it."""
    out = subprocess.run([NVCC, "--dryrun", "-c", "x.cu"], check=False, capture_output=True, text=True).stderr
    found = re.search(r'INCLUDES="-I([^"]+?)"', out)
    if not found:
        pytest.fail(f"cannot find nvcc's include folder in its --dryrun output:\n{out[-2000:]}")
    return found.group(1).strip()


def _nvcc_cmd(name: str, arch: str, std: str, out_dir: str) -> list[str]:
    return [NVCC, f"-std={std}", "-O3", "--expt-relaxed-constexpr", *TORCH_NVCC_DEFINES,
            f"-gencode=arch=compute_{arch[3:]},code={arch}", "-Werror", "all-warnings",
            "-Xcompiler", "-Wall,-Wextra,-Werror", "-c", os.path.join(ROOT, "kernels", name),
            "-o", os.path.join(out_dir, f"{name}.{arch}.o")]


def _host_cmd(out_dir: str, stub_dir: str) -> list[str] | None:
    try:
        from torch.utils.cpp_extension import include_paths
    except ImportError:
        return None
    gxx = shutil.which("g++") or shutil.which("c++")
    if gxx is None:
        return None
    unity = os.path.join(out_dir, "csrc_all.cpp")
    with open(unity, "w") as f:
        f.writelines(f'#include "{os.path.join(ROOT, "csrc", h)}"\n' for h in HOST)
    system = [*include_paths(), _cuda_include(), stub_dir, sysconfig.get_paths()["include"]]
    return [gxx, "-std=c++17", "-fsyntax-only", "-Wall", "-Wextra", "-Werror",
            "-DTORCH_EXTENSION_NAME=_C", "-I", os.path.join(ROOT, "kernels"),
            *[a for d in system for a in ("-isystem", d)], unity]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """``{(file, target) or "host": (returncode, output)}`` of every compile, two at a time."""
    out_dir = str(tmp_path_factory.mktemp("cuda_build"))
    # The CPU wheel of torch lacks the one generated header of c10/cuda; a CUDA build of
    # torch has it with this content. Everything else is torch's real headers.
    stub = os.path.join(out_dir, "stub")
    os.makedirs(os.path.join(stub, "c10", "cuda", "impl"))
    with open(os.path.join(stub, "c10", "cuda", "impl", "cuda_cmake_macros.h"), "w") as f:
        f.write("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    jobs = {}
    host = _host_cmd(out_dir, stub)
    if host is not None:
        jobs["host"] = host  # the longest job first
    jobs.update({(k, arch): _nvcc_cmd(k, arch, std, out_dir) for k in KERNELS for arch, std in TARGETS})
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        futures = {key: pool.submit(_run, cmd) for key, cmd in jobs.items()}
        return {key: f.result() for key, f in futures.items()}


@needs_nvcc
@pytest.mark.parametrize("target", [t[0] for t in TARGETS])
@pytest.mark.parametrize("name", KERNELS)
def test_kernel_compiles(results, name, target):
    code, out = results[(name, target)]
    assert code == 0, f"nvcc failed on kernels/{name} for {target}:\n{out[-6000:]}"


@needs_nvcc
def test_host_sources_parse(results):
    if "host" not in results:
        pytest.skip("needs torch's headers (torch.utils.cpp_extension) and g++")
    code, out = results["host"]
    assert code == 0, f"g++ -fsyntax-only failed on csrc/:\n{out[-6000:]}"


def test_every_launcher_is_defined_once():
    """Each C-ABI launcher declared in kernels/launchers.cuh is defined in one kernels/*.cu."""
    declared = set(re.findall(r"\b(fastrlhf_\w+)\s*\(", _read("kernels", "launchers.cuh")))
    defined = [name for k in KERNELS
               for name in re.findall(r'extern "C"[^;{(]*?\b(fastrlhf_\w+)\s*\(', _read("kernels", k))]
    assert sorted(defined) == sorted(declared)


def test_plain_install_needs_no_nvcc_and_no_torch(tmp_path):
    """``pip install .`` of a copy of the project, with an nvcc that fails the build if it is
    ever called and a torch that cannot be imported: the sources ship, no extension is built."""
    src = tmp_path / "src"
    src.mkdir()
    for item in ("pyproject.toml", "setup.py", "README.md", "fastrlhf", "kernels", "csrc"):
        copy = shutil.copytree if os.path.isdir(os.path.join(ROOT, item)) else shutil.copy
        copy(os.path.join(ROOT, item), src / item)
    trap = tmp_path / "trap"
    (trap / "torch").mkdir(parents=True)
    (trap / "torch" / "__init__.py").write_text("raise ImportError('a plain build imported torch')\n")
    (trap / "nvcc").write_text("#!/bin/sh\necho 'a plain build ran nvcc' >&2\nexit 1\n")
    (trap / "nvcc").chmod(0o755)
    env = {**os.environ, "PATH": f"{trap}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(trap),
           "FASTRLHF_BUILD_CUDA": "0", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    target = tmp_path / "site"
    # No build isolation: this runs offline with the setuptools at hand (pyproject's
    # build requirements are setuptools and wheel only).
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                           "--no-build-isolation", "--no-cache-dir", "--target", str(target),
                           str(src)], check=False, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    shipped = {os.path.relpath(p, target / "fastrlhf" / "_ext_src")
               for p in glob.glob(str(target / "fastrlhf" / "_ext_src" / "*" / "*"))}
    assert {f"kernels/{k}" for k in KERNELS} | {f"csrc/{h}" for h in HOST} <= shipped
    assert "kernels/launchers.cuh" in shipped
    assert not glob.glob(str(target / "fastrlhf" / "_C*"))
    if '"fastrlhf.cuda" = ["dispatch_table.json"]' not in _read("pyproject.toml"):
        pytest.skip("pyproject.toml does not list fastrlhf/cuda/dispatch_table.json as package data "
                    "([tool.setuptools.package-data] \"fastrlhf.cuda\" = [\"dispatch_table.json\"]): "
                    "a wheel would fall back to triton everywhere")
    assert (target / "fastrlhf" / "cuda" / "dispatch_table.json").is_file()  # auto's measured table


def test_every_op_schema_has_a_cuda_impl():
    """Each op defined in csrc/module.cpp is implemented for CUDA once in csrc/, and back."""
    text = {h: _read("csrc", h) for h in HOST}
    defined = re.findall(r'm\.def\("(\w+)\(', text["module.cpp"])
    implemented = [name for t in text.values() for name in re.findall(r'm\.impl\("(\w+)"', t)]
    assert defined and sorted(defined) == sorted(implemented)


# ------------------------------------------------- finding and building the extension
def test_status_without_a_device_is_one_line_and_builds_nothing(monkeypatch):
    import torch
    from torch.utils import cpp_extension

    from fastrlhf import _cuda

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: status() may build here")
    monkeypatch.setattr(cpp_extension, "load", lambda *a, **k: pytest.fail("status() tried to build"))
    ok, why = _cuda.status()
    assert not ok and why.startswith("no CUDA device") and "\n" not in why


def test_build_failure_reason_is_the_first_error_line():
    from fastrlhf._cuda import _first_error_line

    log = ("Error building extension 'fastrlhf_cuda_0123': [1/3] nvcc ... -c kernels/kl.cu\n"
           "FAILED: kl.cuda.o\n"
           "/src/kernels/kl.cu(12): error: identifier \"foo\" is undefined\n"
           "1 error detected in the compilation of \"kl.cu\".\n")
    assert _first_error_line(log) == '/src/kernels/kl.cu(12): error: identifier "foo" is undefined'
    assert _first_error_line("The detected CUDA version (12.1) mismatches torch's (13.0)") \
        .startswith("The detected CUDA version")


def test_a_cached_build_that_does_not_load_is_rebuilt_not_raised(tmp_path, monkeypatch):
    """A library cut short (a killed link, or another process still linking it) must not
    escape as an ImportError from status(): the locked build runs, and if that fails too the
    reason names the cached file."""
    from torch.utils import cpp_extension

    from fastrlhf import _cuda

    fake_cuda = tmp_path / "cuda"
    (fake_cuda / "bin").mkdir(parents=True)
    (fake_cuda / "bin" / "nvcc").write_text("")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(fake_cuda))
    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: True)
    monkeypatch.setenv("FASTRLHF_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    key = _cuda._cache_key(_cuda.source_root(), "9.0", [], str(fake_cuda))
    build_dir = os.path.join(_cuda.cache_dir(), key)
    os.makedirs(build_dir)
    with open(os.path.join(build_dir, f"fastrlhf_cuda_{key}.so"), "wb") as f:
        f.write(b"\x7fELF cut short")

    monkeypatch.setattr(cpp_extension, "load", lambda **kw: "rebuilt")
    assert _cuda._jit_load() == ("rebuilt", "")

    def fails(**kw):
        raise ImportError(f"{build_dir}/x.so: file too short")

    monkeypatch.setattr(cpp_extension, "load", fails)
    module, why = _cuda._jit_load()
    assert module is None and "does not load" in why and "build failed" in why and "\n" not in why


def test_cache_key_follows_sources_and_archs(tmp_path):
    from fastrlhf import _cuda

    for folder in ("kernels", "csrc"):
        shutil.copytree(os.path.join(ROOT, folder), tmp_path / folder)
    key = _cuda._cache_key(str(tmp_path), "9.0", [], "/usr/local/cuda")
    assert key == _cuda._cache_key(str(tmp_path), "9.0", [], "/usr/local/cuda")
    assert key != _cuda._cache_key(str(tmp_path), "8.0;9.0", [], "/usr/local/cuda")
    with open(tmp_path / "kernels" / "common.cuh", "a") as f:
        f.write("// a header changed\n")
    assert key != _cuda._cache_key(str(tmp_path), "9.0", [], "/usr/local/cuda")
    assert set(_cuda.source_files(str(tmp_path))) == {f"kernels/{k}" for k in KERNELS} | {f"csrc/{h}" for h in HOST}


# ------------------------------------------------------------------ auto's table
def test_dispatch_table_from_benchmark_results(tmp_path):
    """cuda is picked per family only when measurably faster than Triton; a regenerated
    table is written as JSON, keeps the rows of other GPUs, and is what load() and choose()
    read."""
    import json

    from fastrlhf.cuda import dispatch_table as dt

    assert {dt.preferred(f) for f in dt.FAMILIES} == {"triton"}  # until measured
    assert dt.preferred("dpo", (9, 0)) == "triton"

    def rec(family, case, provider, ms, status="ok"):
        return {"family": family, "op": family, "case": case, "mode": "fwd", "provider": provider,
                "ms": ms, "status": status}

    records = [rec("logprobs", "a", "fastrlhf-triton", 2.0), rec("logprobs", "a", "fastrlhf-cuda", 1.0),
               rec("logprobs", "b", "fastrlhf-triton", 1.0), rec("logprobs", "b", "fastrlhf-cuda", 0.9),
               rec("kl", "a", "fastrlhf-triton", 1.0), rec("kl", "a", "fastrlhf-cuda", 0.99),
               rec("ppo", "a", "fastrlhf-triton", 1.0), rec("ppo", "a", "fastrlhf-cuda", 0.1, "error"),
               rec("advantages", "a", "torch", 0.1)]
    assert dt.table_from_records(records) == {"logprobs": "cuda", "advantages": "triton",
                                              "kl": "triton", "policy_loss": "triton"}
    results = tmp_path / "h100"
    results.mkdir()
    (results / "logprobs.json").write_text(json.dumps({"env": {"sm": "9.0"}, "records": records}))
    path = tmp_path / "table.json"
    shutil.copy(dt.PATH, path)
    before = json.loads(path.read_text())
    before["rows"]["8.0"] = {"kl": "cuda"}  # measured earlier on another GPU: kept
    path.write_text(json.dumps(before))
    dt.regenerate([str(results)], path)
    regenerated = dt.load(path)
    assert regenerated["sources"] == {"9.0": [str(results)]}
    assert dt.choose(regenerated, "logprobs", (9, 0)) == "cuda"
    assert dt.choose(regenerated, "kl", "9.0") == "triton"
    assert dt.choose(regenerated, "kl", "8.0") == "cuda"
    assert dt.choose(regenerated, "logprobs", "7.5") == "triton"  # never measured: default row
    assert dt.load(tmp_path / "absent.json")["rows"] == {"default": dt.DEFAULT_ROW}


def test_dispatch_table_shipped_is_valid_and_read_once(monkeypatch):
    """The JSON beside the module is well formed; preferred() reads it once per process."""
    import json

    from fastrlhf.cuda import dispatch_table as dt

    dt.validate(json.loads(dt.PATH.read_text()), str(dt.PATH))
    dt.table.cache_clear()
    reads = []
    real = dt.load
    monkeypatch.setattr(dt, "load", lambda path=dt.PATH: reads.append(path) or real(path))
    for family in dt.FAMILIES * 3:
        dt.preferred(family, (9, 0))
    assert reads == [dt.PATH]
    dt.table.cache_clear()


@pytest.mark.parametrize("doc, message", [
    ([], "expected an object with a 'rows' object"),
    ({"rows": {"9.0": {}}}, "must have a 'default' row"),
    ({"rows": {"default": {"logprobs": "tpu"}}}, "row 'default' must map families"),
    ({"rows": {"default": {"dpo": "cuda"}}}, "row 'default' must map families"),
    ({"rows": {"default": {}}, "sources": {"9.0": "h100"}}, "'sources' must map capabilities"),
])
def test_dispatch_table_bad_files_are_named(tmp_path, doc, message):
    import json

    from fastrlhf.cuda import dispatch_table as dt

    path = tmp_path / "table.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=message):
        dt.load(path)
    path.write_text("{ not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        dt.load(path)
