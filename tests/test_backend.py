"""Backend selection, torch.library registration and torch.compile of the public ops."""

import subprocess
import sys

import pytest
import torch

import fastrlhf
from fastrlhf.backend import BackendUnavailableError, backend_status, resolve_backend

CPU = torch.device("cpu")


def test_precedence_keyword_block_env(monkeypatch):
    monkeypatch.setenv("FASTRLHF_BACKEND", "triton")
    assert resolve_backend("torch", CPU) == "torch"  # an explicit keyword wins
    with fastrlhf.use_backend("torch"):
        assert resolve_backend("auto", CPU) == "torch"  # then the innermost block
        with fastrlhf.use_backend("auto"):
            assert resolve_backend("auto", CPU) == "torch"  # auto picks torch on CPU
    monkeypatch.setenv("FASTRLHF_BACKEND", "torch")
    assert resolve_backend("auto", CPU) == "torch"  # then the environment


def test_auto_never_picks_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("FASTRLHF_BACKEND", raising=False)
    assert resolve_backend("auto", CPU) == "torch"


def test_unknown_and_unavailable_backends(monkeypatch):
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("numpy", CPU)
    with pytest.raises(ValueError, match="backend must be one of"):
        with fastrlhf.use_backend("fast"):
            pass
    monkeypatch.setenv("FASTRLHF_BACKEND", "nope")
    with pytest.raises(ValueError, match="FASTRLHF_BACKEND must be one of"):
        resolve_backend("auto", CPU)
    monkeypatch.delenv("FASTRLHF_BACKEND")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailableError, match="'triton' is unavailable: Triton kernels need CUDA"):
        fastrlhf.token_logprobs(torch.randn(2, 5), torch.zeros(2, dtype=torch.long), backend="triton")
    with pytest.raises(BackendUnavailableError, match="'cuda' is unavailable"):
        fastrlhf.token_logprobs(torch.randn(2, 5), torch.zeros(2, dtype=torch.long), backend="cuda")
    ok, why = backend_status("cuda", "cpu")
    assert not ok and why
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(BackendUnavailableError, match="'triton' is unavailable: it has no nope kernels"):
        resolve_backend("triton", CPU, "nope")


def test_info_command_runs():
    out = subprocess.run([sys.executable, "-m", "fastrlhf", "info"], capture_output=True, text=True,
                         check=True).stdout
    assert "fastrlhf" in out and "torch" in out and "backends on" in out


def test_opcheck_token_logprobs_ops():
    logits = torch.randn(3, 4, 11, requires_grad=True)
    labels = torch.randint(0, 11, (3, 4))
    labels[0, 0] = -100
    ops = torch.ops.fastrlhf
    for with_entropy in (False, True):
        torch.library.opcheck(ops.token_logprobs.default,
                              (logits, labels, 0.7, -100, with_entropy, False, "torch"))
    x = logits.detach()
    _, ent, stats = ops.token_logprobs(x, labels, 0.7, -100, True, False, "torch")
    g = torch.randn(3, 4)
    for grad_ent in (None, torch.randn(3, 4)):
        args = (g, grad_ent, x.clone(), labels, stats, ent, 0.7, -100, "torch")
        torch.library.opcheck(ops.token_logprobs_backward.default, args)
        torch.library.opcheck(ops.token_logprobs_backward_.default, args)


def test_compile_fullgraph_forward_and_backward():
    """A loss built on the ops compiles into one graph (torch backend on CPU)."""

    def loss_fn(logits, labels, mask):
        lp, ent = fastrlhf.token_logprobs(logits, labels, return_entropy=True, backend="torch")
        seq = fastrlhf.sequence_logprobs(logits, labels, mask, backend="torch")
        return -(lp * mask).sum() - 0.01 * ent.mean() - seq.mean()

    logits = torch.randn(2, 5, 13)
    labels = torch.randint(0, 13, (2, 5))
    mask = torch.ones(2, 5)
    compiled = torch.compile(loss_fn, fullgraph=True)
    x1 = logits.clone().requires_grad_(True)
    x2 = logits.clone().requires_grad_(True)
    compiled(x1, labels, mask).backward()
    loss_fn(x2, labels, mask).backward()
    torch.testing.assert_close(x1.grad, x2.grad)


def test_auto_picks_cuda_only_when_measured_faster_and_built(monkeypatch):
    """On a GPU whose row in the measured table says cuda, auto takes cuda only once the
    extension is built: it asks for the status without building (no minute-long first call)."""
    from fastrlhf import _cuda, backend
    from fastrlhf.cuda import dispatch_table

    asked = []
    built = [False]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(dispatch_table, "preferred", lambda family, capability=None: "cuda")
    monkeypatch.setattr(_cuda, "status", lambda build=True: asked.append(build) or (built[0], ""))
    cuda = torch.device("cuda")
    assert backend._auto(cuda, "logprobs", None) == "triton"
    built[0] = True
    assert backend._auto(cuda, "logprobs", None) == "cuda"
    assert asked == [False, False]
    assert backend._auto(cuda, "advantages", "whiten") == "triton"  # a feature cuda lacks
    assert backend._auto(cuda, "dpo", None) == "triton"  # a family without cuda kernels
