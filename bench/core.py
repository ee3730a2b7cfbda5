"""What a benchmark case is, and which providers run it.

An op family module (``bench/families/<family>.py``) describes each op once, as an
:class:`Op` (its naive reference, its fastrlhf function, the peers whose semantics match,
which inputs get gradients, a small probe input for the correctness check), and returns
its :class:`Case` list for a :class:`Config` (tier ``smoke``, ``quick`` or ``full``).
A case is a cheap descriptor: nothing is allocated before the runner calls ``make``.

Providers, in the order tables list them:

* ``torch``           the naive reference (``fastrlhf.reference``), as trainers write it;
* ``torch.compile``   ``torch.compile`` of that same reference;
* ``liger``           Liger-Kernel, where an op of it has the same semantics;
* ``trl``             TRL's own fused LM head (``trl.kernels``), for the fused linear op;
* ``cce``             Cut Cross-Entropy (``cut-cross-entropy``), for the fused linear op;
* ``fastrlhf-triton`` the fastrlhf op with ``backend="triton"``;
* ``fastrlhf-cuda``   the fastrlhf op with ``backend="cuda"``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Callable
from typing import Any

import torch

from fastrlhf.registry import family_names

PROVIDERS = ("torch", "torch.compile", "liger", "trl", "cce", "fastrlhf-triton", "fastrlhf-cuda")
FASTRLHF = ("fastrlhf-triton", "fastrlhf-cuda")
MODES = ("fwd", "bwd", "fwd+bwd")
TIERS = ("smoke", "quick", "full")


@dataclasses.dataclass(frozen=True)
class Config:
    """Where and how big: ``tier`` is ``smoke`` (tiny, CPU), ``quick`` or ``full`` (GPU)."""

    device: torch.device
    tier: str = "full"

    @property
    def smoke(self) -> bool:
        return self.tier == "smoke"

    def pick(self, *, smoke, quick, full):
        """The value for this tier (shape lists differ per tier)."""
        return {"smoke": smoke, "quick": quick, "full": full}[self.tier]


@dataclasses.dataclass
class Impl:
    """One provider's implementation of an op: ``fn(**inputs)`` returns a tensor or a
    tuple of tensors, or ``fn`` is None and ``reason`` says why it cannot run.
    ``modes`` limits the modes it is timed in (a reason for the others goes in ``reason``);
    ``failed_check``: it failed or disagreed with the fp64 oracle on the probe; ``note``:
    what a reader of its numbers must know (printed under the tables)."""

    fn: Callable[..., Any] | None
    reason: str = ""
    modes: tuple[str, ...] = MODES
    failed_check: bool = False
    note: str = ""


@dataclasses.dataclass
class Op:
    """One benchmarked op.

    ``reference(**inputs)`` is the naive PyTorch reference; it is also the fp64 oracle of
    the correctness check (floating inputs upcast). ``fastrlhf(backend=..., **inputs)`` is
    the public op. ``peers`` maps a peer provider name to a factory ``f(device) -> Impl``
    (called lazily, so a missing package costs nothing until needed).
    ``grad_inputs`` name the inputs that get gradients (none: forward only). ``probe(device)``
    builds small inputs for the correctness check. ``compile_reason``, when set, says why
    ``torch.compile`` of the reference is not run.
    """

    name: str
    family: str
    reference: Callable[..., Any]
    fastrlhf: Callable[..., Any] | None
    probe: Callable[[torch.device], dict]
    grad_inputs: tuple[str, ...] = ()
    peers: dict[str, Callable[[torch.device], Impl]] = dataclasses.field(default_factory=dict)
    x_label: str = "size"
    fastrlhf_reason: str = ""
    compile_reason: str = ""
    rtol: float = 2e-2
    """Largest relative error ``||out - ref|| / ||ref||`` (and for gradients) against the fp64
    oracle on the probe; above it a provider is not timed (its semantics differ)."""
    rank: tuple[int, int] = (0, 0)
    """(family, op) position in the registry: the order of the reports (set when loaded)."""
    feature: str | None = None
    """A feature of the family the op needs beyond its plain form (``fastrlhf.registry``'s
    ``cuda_features``: a backend without it does not run the op)."""
    bwd_in_forward: bool = False
    """The op computes its gradients in forward (a one-pass loss): ``bwd`` alone is not timed."""

    @property
    def modes(self) -> tuple[str, ...]:
        if not self.grad_inputs:
            return ("fwd",)
        return ("fwd", "fwd+bwd") if self.bwd_in_forward else MODES


@dataclasses.dataclass
class Case:
    """One shape of one op. ``make(device)`` allocates the inputs (random, never zeros).
    ``bytes[mode]``: the fewest bytes the op must move in device memory in that mode (each
    input read once, each output written once). ``flops[mode]`` for matmul-bound ops, with
    ``mm(inputs, mode)`` returning a callable that runs the same GEMMs as bare ``torch.mm``."""

    op: Op
    label: str
    params: dict
    x: float
    make: Callable[[torch.device], dict]
    bytes: dict[str, int]
    flops: dict[str, int] | None = None
    mm: Callable[[dict, str], Callable[[], Any]] | None = None


# ------------------------------------------------------------------------ providers
def fastrlhf_impl(op: Op, provider: str, device: torch.device) -> Impl:
    """The fastrlhf op on the backend named by ``provider``, or why it cannot run here."""
    from fastrlhf.backend import BackendUnavailableError, resolve_backend

    if op.fastrlhf is None:
        return Impl(None, op.fastrlhf_reason or f"fastrlhf has no {op.name} op in this checkout")
    backend = provider.removeprefix("fastrlhf-")
    try:  # the op families of the benchmark are fastrlhf's (kernels per backend and family)
        resolve_backend(backend, device, op.family, op.feature)
    except BackendUnavailableError as exc:
        return Impl(None, str(exc))
    fn = op.fastrlhf

    def run(**inputs):
        return fn(backend=backend, **inputs)

    return Impl(run)


def liger_status(device: torch.device) -> str:
    """Empty when Liger-Kernel can run on ``device``, else the reason it cannot."""
    if importlib.util.find_spec("liger_kernel") is None:
        return "Liger-Kernel is not installed (pip install liger-kernel)"
    if device.type != "cuda":
        return f"Liger-Kernel needs CUDA tensors (got {device.type})"
    return ""


def as_tensors(out) -> tuple[torch.Tensor, ...]:
    """An op's outputs as a flat tuple of tensors: a tensor, or the tensors in a tuple/list,
    dicts (a loss's statistics) flattened in the order of their sorted keys."""
    if isinstance(out, torch.Tensor):
        return (out,)
    if isinstance(out, dict):
        out = [out[k] for k in sorted(out)]
    if isinstance(out, (tuple, list)):
        return tuple(t for item in out for t in as_tensors(item))
    return ()


# ---------------------------------------------------------------------- registry
FAMILIES = family_names()
"""Family modules under ``bench/families/``, in run order: one per family of ``fastrlhf.registry``,
with ``ops()`` (its :class:`Op` list, or raise ImportError while the fastrlhf op does not exist
yet) and ``cases(cfg)``."""


def load_family(name: str):
    """Import ``bench.families.<name>``; returns ``(module, "")`` or ``(None, reason)``."""
    import importlib

    try:
        return importlib.import_module(f"bench.families.{name}"), ""
    except ImportError as exc:  # the family's fastrlhf op is not in this checkout
        return None, f"family {name!r} cannot be loaded: {exc}"


def all_cases(cfg: Config, select: list[str] | None = None):
    """``(cases, unavailable)``: the cases of the selected families/ops, and a
    ``{family: reason}`` dict of the families that could not be loaded.

    ``select`` holds family names (``logprobs``) or op names (``token_logprobs``); None
    selects everything. An unknown name raises ValueError listing the known ones.
    """
    families, unavailable, known_ops = {}, {}, {}
    for f, fam in enumerate(FAMILIES):
        mod, why = load_family(fam)
        if mod is None:
            unavailable[fam] = why
            continue
        families[fam] = mod
        for i, op in enumerate(mod.ops()):
            known_ops[op.name] = fam
            op.rank = (f, i)
    if select:
        unknown = [s for s in select if s not in FAMILIES and s not in known_ops]
        if unknown:
            raise ValueError(f"--ops: unknown name(s) {unknown}; families: {list(FAMILIES)}, "
                             f"ops: {sorted(known_ops)}")
    cases = []
    for fam, mod in families.items():
        for case in mod.cases(cfg):
            if not select or fam in select or case.op.name in select:
                cases.append(case)
    if select:
        unavailable = {f: r for f, r in unavailable.items() if f in select}
    return cases, unavailable
