"""Running one training phase of a variant: the models of a (shape, method), the parts in
order, the gradients they leave.

``run_phase`` calls ``variant.ref`` and ``variant.old`` under ``torch.no_grad()``, then
``variant.train`` and ``backward()``; the optimizer never runs, gradients accumulate in the
parameters' ``.grad`` (``zero_grads`` drops them: each phase allocates its own, as a step does).
``around(part)``, when given, is a context manager wrapped around each part (timers,
memory counters).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import torch

from bench.e2e import models
from bench.e2e.phase import PARTS, Batch, Rollout


@dataclasses.dataclass
class Setup:
    """The policy, the frozen reference model (other random weights) and, for PPO, the value head."""

    shape: str
    method: str
    model: torch.nn.Module
    ref_model: torch.nn.Module
    value_head: torch.nn.Module | None
    checkpointing: bool

    @property
    def params(self) -> list[torch.nn.Parameter]:
        mods = [self.model] + ([self.value_head] if self.value_head is not None else [])
        return list({id(p): p for m in mods for p in m.parameters()}.values())

    @property
    def vocab(self) -> int:
        return self.model.config.vocab_size


def build_setup(shape: str, method: str, *, dtype: torch.dtype, device, checkpointing: bool = False) -> Setup:
    """Random models of ``shape`` for ``method`` (seeded: every variant gets the same weights)."""
    model = models.build(shape, dtype=dtype, device=device, seed=0)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ref_model = models.build(shape, dtype=dtype, device=device, seed=1, trainable=False)
    value_head = None
    if method == "ppo":
        torch.manual_seed(2)
        with torch.device(device):
            value_head = torch.nn.Linear(model.config.hidden_size, 1, dtype=dtype)
    return Setup(shape, method, model, ref_model, value_head, checkpointing)


def zero_grads(setup: Setup) -> None:
    for p in setup.params:
        p.grad = None


def run_part(variant, setup: Setup, batch: Batch, part: str, rollout: Rollout):
    """Run one part; returns ``(rollout, loss)`` (``loss`` None before ``train``)."""
    if part == "ref":
        with torch.no_grad():
            return variant.ref(setup.ref_model, batch), None
    if part == "old":
        with torch.no_grad():
            variant.old(setup.model, setup.value_head, batch, rollout)
        return rollout, None
    loss = variant.train(setup.model, setup.value_head, batch, rollout)
    loss.backward()
    return rollout, loss.detach()


def run_phase(variant, setup: Setup, batch: Batch, around=None) -> torch.Tensor:
    """One phase of ``variant`` on ``batch``; returns the (detached) loss."""
    around = around or (lambda part: contextlib.nullcontext())
    variant.bind(setup.model, setup.ref_model, setup.method)
    rollout, loss = Rollout(), None
    for part in PARTS[setup.method]:
        with around(part):
            rollout, loss = run_part(variant, setup, batch, part, rollout)
    return loss


def grad_vector(setup: Setup) -> torch.Tensor:
    """Every parameter's gradient, flattened, fp32 (fp64 for fp64 parameters; zeros where a
    parameter got none)."""
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                      .to(torch.promote_types(p.dtype, torch.float32)) for p in setup.params])


def rel_err(got: float, want: float) -> float:
    """``|got - want| / |want|`` (the absolute difference when ``want`` is 0)."""
    if not (math.isfinite(got) and math.isfinite(want)):
        return math.inf
    return abs(got - want) / (abs(want) or 1.0)
