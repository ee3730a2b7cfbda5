"""The CUDA kernels' k3 (``kernels/kl_math.cuh``, what ``kernels/kl.cu`` evaluates), run on the
CPU: the header is plain C++ besides its ``__host__ __device__`` qualifiers, so g++ compiles it
into a small program here, in float and double, with and without fused multiply-adds (nvcc
contracts ``p * y + c`` into an FMA on the GPU; g++ does not unless asked). Its results are
checked against fp64 to a few ulps relative near a log-ratio of 0, as
tests/test_kl.py checks the torch and Triton backends (and the compiled CUDA kernels on a GPU).
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GXX = shutil.which("g++") or shutil.which("c++")

DRIVER = r"""
#include <cstdio>
#include "kl_math.cuh"

int main() {
  double x;
  while (std::scanf("%lf", &x) == 1) {
    const float f = static_cast<float>(x);
    std::printf("%a %a %a %a\n", static_cast<double>(fastrlhf::k3_value(f)),
                static_cast<double>(fastrlhf::k3_slope(f)), fastrlhf::k3_value(x), fastrlhf::k3_slope(x));
  }
  return 0;
}
"""


def _has_fma() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return " fma " in f.read()
    except OSError:
        return False


MODES = {"no-fma": ["-ffp-contract=off"], "fma": ["-mfma", "-ffp-contract=fast"]}


@pytest.fixture(scope="module")
def programs(tmp_path_factory):
    if GXX is None:
        pytest.skip("no C++ compiler (g++) on PATH")
    out = tmp_path_factory.mktemp("kl_math")
    src = out / "driver.cpp"
    src.write_text(DRIVER)
    built = {}
    for mode, flags in MODES.items():
        if mode == "fma" and not _has_fma():
            continue
        exe = out / f"driver-{mode}"
        proc = subprocess.run([GXX, "-std=c++17", "-O2", "-Wall", "-Wextra", "-Werror", *flags,
                               "-I", os.path.join(ROOT, "kernels"), str(src), "-o", str(exe)],
                              capture_output=True, text=True, check=False, timeout=120)
        assert proc.returncode == 0, f"g++ failed on kernels/kl_math.cuh ({mode}):\n{proc.stderr[-4000:]}"
        built[mode] = exe
    return built


def _run(exe, x: torch.Tensor):
    """(k3 float, slope float, k3 double, slope double) of fp64 inputs ``x`` (fp32 ones are
    ``x`` rounded to float first), as fp64 tensors."""
    text = "\n".join(repr(v) for v in x.tolist())
    proc = subprocess.run([str(exe)], input=text, capture_output=True, text=True, check=True, timeout=60)
    rows = [[float.fromhex(v) for v in line.split()] for line in proc.stdout.splitlines()]
    return torch.tensor(rows, dtype=torch.float64).unbind(1)


def _k3_exact(x: torch.Tensor) -> torch.Tensor:
    """exp(-x) - 1 + x by its series in fp64, to fp64 rounding for |x| <= 2."""
    return sum((-x) ** k * (1.0 / math.factorial(k)) for k in range(29, 1, -1))


@pytest.mark.parametrize("mode", list(MODES))
def test_cuda_k3_few_ulps_near_zero(programs, mode):
    if mode not in programs:
        pytest.skip("this CPU has no FMA instructions")
    neg = -torch.logspace(-7, math.log10(1.999), 300, dtype=torch.float64)
    pos = torch.logspace(-7, math.log10(0.999), 300, dtype=torch.float64)
    x = torch.cat([neg, pos, torch.linspace(-2, 1, 3001, dtype=torch.float64), torch.tensor([-0.113, 0.113])])
    v32, s32, v64, s64 = _run(programs[mode], x)
    for dtype, value, slope in ((torch.float32, v32, s32), (torch.float64, v64, s64)):
        xt = x.to(dtype).double()  # what the kernel sees
        exact, dexact = _k3_exact(xt), -torch.expm1(-xt)
        eps = torch.finfo(dtype).eps
        assert ((value - exact).abs() <= 4 * eps * exact).all(), dtype
        assert ((slope - dexact).abs() <= 4 * eps * dexact.abs()).all(), dtype
        assert value[x == 0].eq(0).all() and slope[x == 0].eq(0).all()


def test_cuda_k3_far_from_zero_and_special_values(programs):
    exe = next(iter(programs.values()))
    x = torch.cat([torch.linspace(-20, -2, 301, dtype=torch.float64), torch.linspace(1, 20, 301, dtype=torch.float64)])
    v32, s32, v64, s64 = _run(exe, x)
    for dtype, value, slope in ((torch.float32, v32, s32), (torch.float64, v64, s64)):
        xt = x.to(dtype).double()
        exact = torch.where(xt >= 1, torch.exp(-xt) + (xt - 1), torch.expm1(-xt) + xt)
        eps = torch.finfo(dtype).eps
        assert ((value - exact).abs() <= 4 * eps * exact).all(), dtype
        assert ((slope + torch.expm1(-xt)).abs() <= 4 * eps * torch.expm1(-xt).abs()).all(), dtype
    v32, s32, v64, s64 = _run(exe, torch.tensor([float("inf"), float("nan"), 200.0, -1000.0]))
    for value, slope in ((v32, s32), (v64, s64)):
        assert value[0] == math.inf and slope[0] == 1 and value[1].isnan() and slope[1].isnan()
        assert value[2] == 199 and value[3] == math.inf and slope[3] == -math.inf
