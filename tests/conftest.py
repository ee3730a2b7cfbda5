"""Shared test set-up.

Without a GPU the Triton kernels run under the Triton interpreter on CPU tensors: the
variable must be set before ``triton`` is first imported, hence here. With a GPU the same
tests run the compiled kernels on CUDA tensors.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from fastrlhf.backend import backend_status, has_kernels  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = [b for b in ("triton", "cuda")
            if (b != "cuda" or os.environ.get("FASTRLHF_TEST_CUDA", "1") != "0") and backend_status(b, DEVICE)[0]]
"""Backends under test besides the reference (triton here, triton and cuda on a GPU;
``FASTRLHF_TEST_CUDA=0`` leaves cuda out, as scripts/gpu_check.sh does while it builds)."""


def family_backends(family: str) -> list[str]:
    """The reference and every backend here with kernels for op ``family``."""
    return ["torch"] + [b for b in BACKENDS if has_kernels(b, family)]


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(params=["torch"] + BACKENDS)
def backend(request):
    """Every backend that runs on this machine, the torch reference included; in a test
    module with ``FAMILY = "<op family>"``, those without kernels for it are skipped."""
    family = getattr(request.module, "FAMILY", None)
    if family is not None and not has_kernels(request.param, family):
        pytest.skip(f"backend {request.param!r} has no {family} kernels")
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _nan_filled_empty(monkeypatch):
    """Floating tensors from torch.empty / empty_like / new_empty start as NaN, so an
    output element a kernel forgets to write shows up in the comparisons."""

    def nan_fill(fn):
        def wrapped(*args, **kwargs):
            out = fn(*args, **kwargs)
            if out.is_floating_point():
                with torch.no_grad():  # (torch.compile may ask for a leaf that requires grad)
                    out.fill_(float("nan"))
            return out

        return wrapped

    monkeypatch.setattr(torch, "empty", nan_fill(torch.empty))
    monkeypatch.setattr(torch, "empty_like", nan_fill(torch.empty_like))
    monkeypatch.setattr(torch.Tensor, "new_empty", nan_fill(torch.Tensor.new_empty))
