"""``python -m bench --host``: what an op costs the host, apart from its kernels.

A trainer calls the loss, KL and advantage ops once per micro-batch; at the sizes of a
micro-batch a GPU runs their kernels in microseconds, so the Python and the aten calls
between the public call and the launches set the time. This measures them on the CPU, on
the op's small probe inputs (``Op.probe``), for one forward + backward (forward alone for an
op without gradients):

* ``fastrlhf`` -- the public op with ``backend="triton"`` and every Triton launch replaced by
  a no-op (:func:`stubbed_launches`): only the host work is left (checks, allocations, the
  aten calls, the launchers' Python);
* ``eager``    -- the same loss in plain PyTorch as trainers write it (:data:`TRAINER_FORMS`:
  the short form of verl / TRL, statistics included, without the reference's argument checks),
  or, for an op without one, fastrlhf's naive reference (``fastrlhf.reference``), on the same
  tensors: the bar the op's host cost must stay under.

Per op: microseconds per call (the fastest of ``REPEATS`` timings of ``CALLS`` calls each, after
a warm-up: noise on a shared machine only adds time) and the aten calls one call makes, counted
with ``torch.profiler`` at the top level (an aten op called by another aten op is not counted
again), and the Triton kernels it launches. The counts are exact and machine-independent; the
times are of this CPU and printed with its description.
"""

from __future__ import annotations

import contextlib
import importlib
import pkgutil
import platform
import time
from collections.abc import Callable, Iterator

import torch

from bench.core import Op, as_tensors, load_family

FAMILIES = ("kl", "advantages", "policy_loss", "dpo")
"""The families whose ops are called per micro-batch and are small enough to be host-bound."""
CALLS = 200
REPEATS = 7
ATEN_BUDGET = 12
"""The most top-level aten calls one forward + backward of an op may make, but for
:data:`ATEN_CEILINGS`."""
_SEQ_PASS = "the per-sequence pass's scratch (sequence table, chunk partials, chunk counts and tickets)"
ATEN_CEILINGS = {
    "policy_loss-gspo_packed": (19, f"{_SEQ_PASS}, the offsets' check (reads them on the host: .tolist()) and "
                                    "each packed sequence's first chunk (5 aten calls)"),
    "policy_loss-clip_cov": (55, "the covariance selection (top-k of the centred covariance) runs in PyTorch"),
}
"""Ops above :data:`ATEN_BUDGET` today: ``{name: (ceiling, what the calls above the budget are)}``."""


# ------------------------------------------------------- the eager forms trainers write
def _masked_mean(x, mask):
    return (x * mask).sum() / (mask.sum() + 1e-8)


def _ppo_policy(logprobs, old_logprobs, advantages, mask, clip_low=0.2, clip_high=0.28, dual_clip=3.0):
    log_ratio = torch.clamp(logprobs - old_logprobs, -20.0, 20.0)
    ratio = torch.exp(log_ratio)
    approx_kl = _masked_mean(-log_ratio, mask)
    loss1 = -advantages * ratio
    loss2 = -advantages * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    clipped = torch.maximum(loss1, loss2)
    clipfrac = _masked_mean(torch.gt(loss2, loss1).float(), mask)
    loss3 = -advantages * dual_clip
    negative = advantages < 0
    clipfrac_lower = _masked_mean(torch.gt(clipped, loss3) * negative.float(), mask)
    losses = torch.where(negative, torch.minimum(loss3, clipped), clipped)
    return _masked_mean(losses, mask), clipfrac, clipfrac_lower, approx_kl


def _ppo_value(values, old_values, returns, mask, clip=0.2):
    clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    loss1 = (values - returns) ** 2
    loss2 = (clipped - returns) ** 2
    return 0.5 * _masked_mean(torch.max(loss1, loss2), mask), _masked_mean(torch.gt(loss2, loss1).float(), mask)


def _gspo(logprobs, old_logprobs, advantages, mask, clip_low=0.2, clip_high=0.2):
    log_ratio = logprobs - old_logprobs
    lengths = mask.sum(-1)
    seq_log_ratio = (log_ratio * mask).sum(-1) / lengths.clamp(min=1)
    log_seq_ratio = torch.clamp(logprobs - logprobs.detach() + seq_log_ratio.detach().unsqueeze(-1), max=10.0)
    ratio = torch.exp(log_seq_ratio)
    loss1 = -advantages * ratio
    loss2 = -advantages * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    losses = torch.maximum(loss1, loss2)
    seq_losses = (losses * mask).sum(-1) / lengths.clamp(min=1)
    loss = _masked_mean(seq_losses, lengths > 0)
    return loss, _masked_mean(torch.gt(loss2, loss1).float(), mask), _masked_mean(-log_ratio, mask)


def _k3(logprobs, ref_logprobs, clamp=10.0, log_ratio_clamp=20.0):
    kl = torch.clamp(ref_logprobs - logprobs, -log_ratio_clamp, log_ratio_clamp)
    return torch.clamp(torch.exp(kl) - kl - 1, -clamp, clamp)


def _weights(logprobs, ref_logprobs, low=0.5, high=2.0, log_ratio_clamp=20.0):
    return torch.exp(torch.clamp(logprobs - ref_logprobs, -log_ratio_clamp, log_ratio_clamp)).clamp(low, high)


def _grpo(scores, group=16, eps=1e-6):
    grouped = scores.view(-1, group)
    return ((grouped - grouped.mean(-1, keepdim=True)) / (grouped.std(-1, keepdim=True) + eps)).view(-1)


def _dpo(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=0.1):
    logits = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    losses = -torch.nn.functional.logsigmoid(beta * logits)
    chosen = beta * (policy_chosen - ref_chosen).detach()
    rejected = beta * (policy_rejected - ref_rejected).detach()
    return losses.mean(), chosen.mean(), rejected.mean(), (chosen - rejected).mean(), (chosen > rejected).float().mean()


TRAINER_FORMS: dict[str, Callable] = {
    "ppo_policy_loss": _ppo_policy, "ppo_value_loss": _ppo_value, "policy_loss-gspo": _gspo,
    "kl_penalty": _k3, "importance_weights": _weights, "group_advantages": _grpo, "dpo_loss": _dpo}
"""The short eager forms (verl's ``compute_policy_loss_vanilla`` / ``_gspo``, ``compute_value_loss``,
``kl_penalty("low_var_kl")``, token-level truncated importance sampling, GRPO advantages; TRL's
sigmoid DPO loss and the means it logs), with the settings of the ops' benchmark entries."""


class _NoLaunch:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args)`` only counts the launch."""

    launches = 0

    def __getitem__(self, grid):
        return self

    def __call__(self, *args, **kwargs):
        _NoLaunch.launches += 1


@contextlib.contextmanager
def stubbed_launches() -> Iterator[None]:
    """Replace every Triton kernel of ``fastrlhf.triton`` by a no-op for the block (the
    launchers look kernels up as module globals, so the launchers' own Python still runs)."""
    import triton

    import fastrlhf.triton as pkg

    kinds = tuple(k for k in (getattr(triton.runtime, "JITFunction", None),
                              getattr(triton.runtime.interpreter, "InterpretedFunction", None)) if k)
    saved = []
    # every module imported first: one imported while stubs are in place would keep them
    modules = [importlib.import_module(f"{pkg.__name__}.{info.name}") for info in pkgutil.iter_modules(pkg.__path__)]
    for mod in modules:
        for name, obj in vars(mod).items():
            if isinstance(obj, kinds):
                saved.append((mod, name, obj))
                setattr(mod, name, _NoLaunch())
    try:
        yield
    finally:
        for mod, name, obj in saved:
            setattr(mod, name, obj)


def step(op: Op, fn: Callable, inputs: dict) -> Callable[[], object]:
    """One forward + backward of ``fn`` on ``inputs`` (forward alone without ``grad_inputs``),
    the upstream gradients drawn once."""
    leaves = [inputs[k].requires_grad_(True) for k in op.grad_inputs]
    if not leaves:
        return lambda: fn(**inputs)
    upstream: list[torch.Tensor] = []

    def run():
        outs = [o for o in as_tensors(fn(**inputs)) if o.requires_grad]
        if not upstream:
            upstream.extend(torch.randn_like(o) for o in outs)
        return torch.autograd.grad(outs, leaves, upstream, allow_unused=True)

    return run


def aten_calls(run: Callable[[], object]) -> list[str]:
    """The names of the top-level aten calls of one ``run()``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()

    def nested(ev) -> bool:
        parent = ev.cpu_parent
        while parent is not None:
            if parent.name.startswith("aten::"):
                return True
            parent = parent.cpu_parent
        return False

    return [ev.name for ev in prof.events() if ev.name.startswith("aten::") and not nested(ev)]


def micros(run: Callable[[], object]) -> float:
    """Microseconds per ``run()``: the fastest of ``REPEATS`` timings of ``CALLS`` calls."""
    for _ in range(CALLS // 4):
        run()
    times = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        for _ in range(CALLS):
            run()
        times.append((time.perf_counter() - t0) / CALLS * 1e6)
    return min(times)


def host_ops(select: list[str] | None = None) -> list[Op]:
    """The ops measured: those of :data:`FAMILIES`, or of the selected families / op names."""
    ops = []
    for fam in FAMILIES:
        mod, why = load_family(fam)
        if mod is None:
            raise RuntimeError(why)
        ops += [op for op in mod.ops() if not select or fam in select or op.name in select]
    return ops


def measure(op: Op, *, timed: bool = True) -> dict:
    """``{"op", "grad", "eager": {...}, "fastrlhf": {...}}``, each side with ``aten`` (the count),
    ``calls`` (their names), ``launches`` (Triton kernels launched) and, when ``timed``, ``us``."""
    device = torch.device("cpu")
    torch.manual_seed(0)
    probe = op.probe(device)
    sides = {"eager": TRAINER_FORMS.get(op.name, op.reference),
             "fastrlhf": lambda **kw: op.fastrlhf(backend="triton", **kw)}
    row = {"op": op.name, "grad": bool(op.grad_inputs)}
    with stubbed_launches():
        for side, fn in sides.items():
            inputs = {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in probe.items()}
            run = step(op, fn, inputs)
            run()  # first call: caches, lazy imports
            _NoLaunch.launches = 0
            names = aten_calls(run)
            row[side] = {"aten": len(names), "calls": names, "launches": _NoLaunch.launches}
            if timed:
                row[side]["us"] = micros(run)
    return row


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def aten_ceiling(name: str) -> int:
    return ATEN_CEILINGS.get(name, (ATEN_BUDGET, ""))[0]


def table(rows: list[dict]) -> str:
    """A Markdown table of :func:`measure` rows, then the ceilings above :data:`ATEN_BUDGET`."""
    lines = ["| op | direction | fastrlhf µs | eager µs | ratio | fastrlhf aten calls (ceiling) | eager aten calls | "
             "Triton launches |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        f, e = r["fastrlhf"], r["eager"]
        lines.append(f"| {r['op']} | {'fwd+bwd' if r['grad'] else 'fwd'} | {f['us']:.0f} | {e['us']:.0f} | "
                     f"{f['us'] / e['us']:.2f}× | {f['aten']} ({aten_ceiling(r['op'])}) | {e['aten']} | "
                     f"{f['launches']} |")
    lines += ["", f"Ceilings above {ATEN_BUDGET} aten calls:", ""]
    lines += [f"- {name}: {n}, {why}" for name, (n, why) in ATEN_CEILINGS.items()]
    return "\n".join(lines)


def main(select: list[str] | None, verbose: bool = False) -> list[dict]:
    rows = []
    for op in host_ops(select):
        rows.append(measure(op))
        if verbose:
            print(f"{op.name}: {', '.join(rows[-1]['fastrlhf']['calls'])}", flush=True)
    return rows
