"""The op registry: every op family, its public ops and the launcher module of each backend.

This table is the one list of families. The dispatcher (``fastrlhf.backend``) finds launchers
here, the CUDA dispatch table, the benchmark suite (``bench/families/<family>.py``) and the
tests read their family lists from it. Adding a family, or a backend to one, is one entry here;
adding an op to a family is not (its ops are what ``fastrlhf`` exports from the family's ops
modules; see ``docs/adding-an-op.md``).

A launcher module exposes the same functions with the same signatures on every backend that
has it: the ops allocate the outputs, a launcher fills those it is given.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field

__all__ = ["FAMILIES", "Family", "family", "family_names", "find", "launcher_module"]


@dataclass(frozen=True)
class Family:
    """One op family: ``backends`` (backend -> launcher module), ``op_modules`` (the modules under
    ``fastrlhf.ops`` defining its public ops; default: ``fastrlhf.ops.<name>``) and
    ``cuda_features``: what the ``cuda`` launchers cover beyond the family's plain form
    (``fastrlhf.backend.has_kernels``; the torch and triton launchers cover every feature)."""

    name: str
    backends: dict[str, str]
    op_modules: tuple[str, ...] = field(default=())
    cuda_features: tuple[str, ...] = field(default=())

    @property
    def ops(self) -> tuple[str, ...]:
        """The family's public ops: the functions ``fastrlhf`` exports from its ops modules."""
        api = importlib.import_module("fastrlhf")  # by name, at call time: the package imports this module
        modules = {f"fastrlhf.ops.{m}" for m in self.op_modules or (self.name,)}
        return tuple(n for n in api.__all__
                     if inspect.isfunction(fn := getattr(api, n)) and fn.__module__ in modules)


FAMILIES: tuple[Family, ...] = (
    Family("logprobs", {"torch": "fastrlhf.eager.logprobs", "triton": "fastrlhf.triton.logprobs",
                        "cuda": "fastrlhf.cuda.logprobs"}),
    Family("linear_logprobs", {"torch": "fastrlhf.eager.linear_logprobs",
                               "triton": "fastrlhf.triton.linear_logprobs"}, op_modules=("linear_logprobs", "linear_loss")),
    Family("kl", {"torch": "fastrlhf.eager.kl", "triton": "fastrlhf.triton.kl", "cuda": "fastrlhf.cuda.kl"}),
    Family("advantages", {"torch": "fastrlhf.eager.advantages", "triton": "fastrlhf.triton.advantages",
                          "cuda": "fastrlhf.cuda.advantages"}),
    Family("policy_loss", {"torch": "fastrlhf.eager.policy_loss", "triton": "fastrlhf.triton.policy_loss",
                           "cuda": "fastrlhf.cuda.policy_loss"}, op_modules=("policy_loss", "aggregation")),
    Family("dpo", {"torch": "fastrlhf.eager.dpo", "triton": "fastrlhf.triton.dpo"}),
)
"""Every family, in the order the benchmark runs and reports them."""

_BY_NAME = {f.name: f for f in FAMILIES}


def family_names(backend: str | None = None) -> tuple[str, ...]:
    """The families' names; with ``backend``, those with launchers on it."""
    return tuple(f.name for f in FAMILIES if backend is None or backend in f.backends)


def find(name: str) -> Family | None:
    """The family called ``name``, or None (one dict lookup: the dispatcher asks on every call)."""
    return _BY_NAME.get(name)


def family(name: str) -> Family:
    """The family called ``name``; ``KeyError`` naming the known ones otherwise."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"no op family {name!r}; families: {', '.join(_BY_NAME)}") from None


def launcher_module(backend: str, name: str):
    """The launcher module of family ``name`` on ``backend`` (imported; builds nothing)."""
    return importlib.import_module(family(name).backends[backend])
