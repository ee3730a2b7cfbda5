"""The op registry: every op family, its public ops and the launcher module of each backend.

This table is the one list of families. The dispatcher (``fastrlhf.backend``) finds launchers
here, the CUDA dispatch table, the benchmark suite (``bench/families/<family>.py``), the static
report and the tests read their family lists from it. Adding a family, or a backend to one, is
one entry here (see ``docs/adding-an-op.md``).

A launcher module exposes the same functions with the same signatures on every backend that
has it: the ops allocate the outputs, a launcher fills those it is given.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

__all__ = ["FAMILIES", "Family", "family", "family_names", "launcher_module"]


@dataclass(frozen=True)
class Family:
    """One op family: ``ops`` (names in ``fastrlhf``), ``backends`` (backend -> launcher module)
    and ``cuda_features``: what the ``cuda`` launchers cover beyond the family's plain form
    (``fastrlhf.backend.has_kernels``; the torch and triton launchers cover every feature)."""

    name: str
    ops: tuple[str, ...]
    backends: dict[str, str]
    cuda_features: tuple[str, ...] = field(default=())


def _three(name: str, cuda: bool = True) -> dict[str, str]:
    """``torch`` / ``triton`` (/ ``cuda``) launcher modules of family ``name``."""
    out = {"torch": f"fastrlhf.eager.{name}", "triton": f"fastrlhf.triton.{name}"}
    if cuda:
        out["cuda"] = f"fastrlhf.cuda.{name}"
    return out


FAMILIES: tuple[Family, ...] = (
    Family("logprobs", ("token_logprobs", "sequence_logprobs"), _three("logprobs")),
    Family("linear_logprobs", ("linear_token_logprobs",), _three("linear_logprobs", cuda=False)),
    Family("kl", ("kl_penalty", "kl_penalized_rewards"), _three("kl")),
    Family("advantages", ("gae", "discounted_returns", "group_advantages", "masked_whiten"), _three("advantages")),
    Family("policy_loss", ("policy_loss", "ppo_policy_loss", "ppo_value_loss", "aggregate"), _three("policy_loss")),
    Family("dpo", ("dpo_loss", "bradley_terry_loss", "choice_loss"), _three("dpo", cuda=False)),
)
"""Every family, in the order the benchmark runs and reports them."""

_BY_NAME = {f.name: f for f in FAMILIES}


def family_names(backend: str | None = None) -> tuple[str, ...]:
    """The families' names; with ``backend``, those with launchers on it."""
    return tuple(f.name for f in FAMILIES if backend is None or backend in f.backends)


def family(name: str) -> Family:
    """The family called ``name``; ``KeyError`` naming the known ones otherwise."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"no op family {name!r}; families: {', '.join(_BY_NAME)}") from None


def launcher_module(backend: str, name: str):
    """The launcher module of family ``name`` on ``backend`` (imported; builds nothing)."""
    return importlib.import_module(family(name).backends[backend])
