"""Runs cases: checks each provider against the fp64 oracle once per op, then measures
time, bandwidth, FLOP rate and peak memory for each (case, mode, provider).

Modes: ``fwd`` runs under ``torch.no_grad()`` (the log-probs of the old and reference
policies); ``fwd+bwd`` runs the op and ``torch.autograd.grad`` with fixed random upstream
gradients (never all ones: per-token weights are what trainers send); ``bwd`` times only
that ``autograd.grad`` call on a graph built once (``retain_graph=True``).
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable

import torch

from bench.core import FASTRLHF, Case, Config, Impl, Op, as_tensors, fastrlhf_impl
from bench.measure import Ceilings, peak_extra_bytes, sync, time_call, warm_call_ms


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def _rel_err(got: torch.Tensor, truth: torch.Tensor) -> float:
    """``||got - truth|| / ||truth||`` in fp64 (the absolute norm when ``truth`` is 0)."""
    if got.shape != truth.shape:
        return math.inf
    d = got.detach().double() - truth.detach().double()
    if not bool(torch.isfinite(d).all()):
        return math.inf
    scale = truth.detach().double().norm().item()
    return d.norm().item() / (scale if scale > 0 else 1.0)


def _free(device: torch.device, collect: bool = False) -> None:
    """Hand freed device memory back (so each measurement starts from its inputs alone).
    ``collect``: also run the garbage collector (after an exception, whose traceback holds
    frames and their tensors; otherwise reference counting frees everything and a full
    collection of dynamo's many objects costs a third of a second)."""
    if collect:
        gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


COMPILE_NOTE = ("torch.compile: inductor, default mode, automatic dynamic shapes; backward "
                "buffer donation off (the bwd mode times a backward alone, with retain_graph)")


def configure_compile() -> None:
    """Settings for the ``torch.compile`` provider (see ``COMPILE_NOTE``)."""
    import torch._dynamo.config as dynamo_config
    import torch._functorch.config as functorch_config

    # Every shape and mode of an op may get its own graph: never let dynamo fall back to
    # eager (silently) because its recompile limit was reached.
    for name in ("cache_size_limit", "recompile_limit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, 512)
    # A compiled backward that donates its saved buffers refuses retain_graph=True, which
    # timing a backward alone needs. Donation only lowers the backward's peak memory.
    if hasattr(functorch_config, "donated_buffer"):
        functorch_config.donated_buffer = False


class Runner:
    """Measures cases for a list of providers; ``log`` receives one line per result."""

    def __init__(self, cfg: Config, providers: list[str], log: Callable[[str], None] = print,
                 deadline: float | None = None):
        self.cfg = cfg
        self.device = cfg.device
        self.providers = providers
        self.log = log
        self.deadline = deadline
        self.ceilings = Ceilings(cfg.device)
        self._impls: dict[tuple[str, str], Impl] = {}
        self.errors: dict[tuple[str, str], dict] = {}
        self._probes: dict[str, tuple[dict, list, tuple, tuple]] = {}
        if "torch.compile" in providers:
            configure_compile()

    # ------------------------------------------------------------ providers + checking
    def impl(self, op: Op, provider: str) -> Impl:
        """The provider's implementation of ``op``, checked on the probe (cached per op)."""
        key = (op.name, provider)
        if key not in self._impls:
            impl = self._build(op, provider)
            if impl.fn is not None:
                impl = self._check(op, provider, impl)
            self._impls[key] = impl
        return self._impls[key]

    def _build(self, op: Op, provider: str) -> Impl:
        if provider == "torch":
            return Impl(op.reference)
        if provider == "torch.compile":
            if op.compile_reason:
                return Impl(None, op.compile_reason)
            return Impl(self._compile(op.reference))
        if provider in FASTRLHF:
            return fastrlhf_impl(op, provider, self.device)
        factory = op.peers.get(provider)
        if factory is None:
            return Impl(None, f"{provider} has no op with the semantics of {op.name}")
        try:
            return factory(self.device)
        except Exception as exc:  # noqa: BLE001  (a peer's import or API changed)
            return Impl(None, f"{provider} could not be set up: {_first_line(exc)}")

    def _compile(self, fn):
        # Smoke mode compiles with aot_eager (dynamo + AOTAutograd, no code generation):
        # inductor's C++ build on a 2-core CPU would take minutes, and no number is claimed.
        return torch.compile(fn, backend="aot_eager" if self.cfg.smoke else "inductor")

    def _probe(self, op: Op):
        """Probe inputs, upstream gradients and the fp64 oracle's outputs and gradients."""
        if op.name not in self._probes:
            torch.manual_seed(1234)
            inputs = op.probe(self.device)
            wide = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v
                    for k, v in inputs.items()}
            out, grads = self._evaluate(op, op.reference, wide, None)
            upstream = [torch.randn_like(o, dtype=torch.float64) for o in out]
            out, grads = self._evaluate(op, op.reference, wide, upstream)
            self._probes[op.name] = (inputs, upstream, out, grads)
        return self._probes[op.name]

    def _evaluate(self, op, fn, inputs, upstream):
        inputs = {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in inputs.items()}
        leaves = [inputs[k].requires_grad_(True) for k in op.grad_inputs]
        with torch.enable_grad():
            out = as_tensors(fn(**inputs))
            if upstream is None or not leaves:
                return out, ()
            pairs = [(o, g.to(o.dtype)) for o, g in zip(out, upstream) if o.requires_grad]
            if not pairs:
                return out, (None,) * len(leaves)
            grads = torch.autograd.grad([o for o, _ in pairs], leaves, [g for _, g in pairs],
                                        allow_unused=True)
        return out, grads

    def _check(self, op: Op, provider: str, impl: Impl) -> Impl:
        inputs, upstream, truth, truth_grads = self._probe(op)
        try:
            out, grads = self._evaluate(op, impl.fn, inputs, upstream if op.grad_inputs else None)
            sync(self.device)
        except Exception as exc:  # noqa: BLE001  (a failure here is a finding, not a crash)
            what = "torch.compile failed" if provider == "torch.compile" else "failed on the probe"
            return Impl(None, f"{what}: {_first_line(exc)}", failed_check=True)
        if len(out) != len(truth):
            return Impl(None, f"returns {len(out)} outputs, the reference {len(truth)}",
                        failed_check=True)
        err = {"out": max((_rel_err(a, b) for a, b in zip(out, truth)), default=0.0)}
        if truth_grads:
            err["grad"] = max((math.inf if a is None else _rel_err(a, b)
                               for a, b in zip(grads, truth_grads) if b is not None), default=0.0)
        self.errors[(op.name, provider)] = err
        tol = op.rtol
        if err["out"] > tol:
            return Impl(None, f"output differs from the fp64 reference on the probe (rel. error "
                              f"{err['out']:.2g} > {tol:g}): semantics do not match", failed_check=True)
        if err.get("grad", 0.0) > tol:
            return Impl(impl.fn, f"gradient differs from the fp64 reference on the probe (rel. error "
                                 f"{err['grad']:.2g} > {tol:g}): timed in fwd only", modes=("fwd",),
                        failed_check=True, note=impl.note)
        return impl

    # ---------------------------------------------------------------------- measuring
    def run_case(self, case: Case) -> list[dict]:
        records = []
        op = case.op
        for mode in op.modes:
            ceiling = self._ceilings(case, mode)
            for provider in self.providers:
                rec = {"family": op.family, "op": op.name, "case": case.label,
                       "params": case.params, "x": case.x, "x_label": op.x_label, "mode": mode,
                       "provider": provider, "bytes": case.bytes.get(mode),
                       "flops": (case.flops or {}).get(mode), **ceiling}
                rec.update(self._measure_one(case, mode, provider))
                if self.impl(op, provider).note:
                    rec["note"] = self.impl(op, provider).note
                if (op.name, provider) in self.errors:
                    rec["rel_err"] = self.errors[(op.name, provider)]
                _derive(rec)
                self.log(_line(rec))
                records.append(rec)
        return records

    def _ceilings(self, case: Case, mode: str) -> dict:
        out = {}
        if case.bytes.get(mode):
            c = self.ceilings.copy(case.bytes[mode])
            out.update(copy_ms=c["ms"], copy_bytes=c["bytes"])
        if case.mm is not None and (case.flops or {}).get(mode):
            try:
                run = case.mm(case.make(self.device), mode)
                first = warm_call_ms(run, self.device)
                out["mm_ms"] = time_call(run, self.device, warm_call_ms(run, self.device)
                                         if first < 1e4 else first)["ms"]
            except Exception as exc:  # noqa: BLE001  (out of memory, mostly: no ceiling then)
                out["mm_ms"] = None
                self.log(f"{case.op.name} {case.label} {mode}: torch.mm baseline not measured: "
                         f"{_first_line(exc)}")
                _free(self.device, collect=True)
            finally:
                run = None
                _free(self.device)
        return out

    def skip_reason(self, op: Op, mode: str, provider: str) -> str:
        """Why ``provider`` does not run ``op`` in ``mode`` here ("" when it does)."""
        impl = self.impl(op, provider)
        if impl.fn is None:
            return impl.reason
        if mode not in impl.modes:
            return impl.reason or f"not run in {mode} mode"
        return ""

    def _measure_one(self, case: Case, mode: str, provider: str) -> dict:
        if self.deadline is not None and time.monotonic() > self.deadline:
            return {"status": "skipped", "reason": "time budget (--max-minutes) used up"}
        why = self.skip_reason(case.op, mode, provider)
        if why:  # fastrlhf giving wrong results is an error; a peer's differing semantics are not
            bad = provider in FASTRLHF and self.impl(case.op, provider).failed_check
            return {"status": "error" if bad else "skipped", "reason": why}
        failed = True
        try:
            run, first = self.prepare(case, mode, provider)
            if self.cfg.smoke:  # one more call, timed on the host: it only has to run
                out = {"status": "ok", **time_call(run, self.device, first), "peak_extra_bytes": None}
            else:
                warm = warm_call_ms(run, self.device)
                peak = peak_extra_bytes(run, self.device)
                out = {"status": "ok", **time_call(run, self.device, warm), "peak_extra_bytes": peak}
            failed = False
            return out
        except torch.OutOfMemoryError as exc:
            return {"status": "skipped", "reason": f"out of memory at this size ({_first_line(exc)[:120]})"}
        except Exception as exc:  # noqa: BLE001  (recorded, and the smoke test fails on it)
            return {"status": "error", "reason": _first_line(exc)}
        finally:
            run = None
            _free(self.device, collect=failed)

    def prepare(self, case: Case, mode: str, provider: str):
        """``(run, first_ms)``: a closure running one ``mode`` call of ``provider`` on fresh
        inputs of ``case``, already called once (compiled, autotuned) in ``first_ms``."""
        run = self._closure(case, mode, self.impl(case.op, provider).fn)
        return run, warm_call_ms(run, self.device)

    def _closure(self, case: Case, mode: str, fn):
        inputs = case.make(self.device)
        if mode == "fwd":
            def run():
                with torch.no_grad():
                    return fn(**inputs)

            return run
        leaves = [inputs[k].requires_grad_(True) for k in case.op.grad_inputs]
        upstream: list[torch.Tensor] = []

        def forward():
            outs = [o for o in as_tensors(fn(**inputs)) if o.requires_grad]
            if not upstream:  # fixed, non-uniform upstream gradients, drawn once
                upstream.extend(torch.randn_like(o) for o in outs)
            return outs

        if mode == "fwd+bwd":
            def run():
                return torch.autograd.grad(forward(), leaves, upstream, allow_unused=True)

            return run
        outs = forward()

        def run():
            return torch.autograd.grad(outs, leaves, upstream, retain_graph=True, allow_unused=True)

        return run


def _derive(rec: dict) -> None:
    """Bandwidth, FLOP rate and the fractions of the ceilings, for a measured record."""
    ms = rec.get("ms")
    if rec.get("status") != "ok" or not ms:
        return
    if rec.get("bytes"):
        rec["GBps"] = rec["bytes"] / ms / 1e6
        if rec.get("copy_ms"):
            # the copy moved copy_bytes (= bytes, up to COPY_CAP or when memory was short): rates
            copy_rate = rec["copy_bytes"] / rec["copy_ms"]
            rec["copy_fraction"] = rec["bytes"] / ms / copy_rate
    if rec.get("flops"):
        rec["TFLOPs"] = rec["flops"] / ms / 1e9
        if rec.get("mm_ms"):
            rec["mm_fraction"] = rec["mm_ms"] / ms


def _line(rec: dict) -> str:
    head = f"{rec['op']:<22} {rec['case']:<26} {rec['mode']:<7} {rec['provider']:<15}"
    if rec["status"] != "ok":
        return f"{head} {rec['status']}: {rec['reason']}"
    parts = [f"{rec['ms']:10.3f} ms"]
    if "copy_fraction" in rec:
        parts.append(f"{100 * rec['copy_fraction']:5.1f}% of copy BW")
    if "mm_fraction" in rec:
        parts.append(f"{100 * rec['mm_fraction']:5.1f}% of torch.mm")
    if rec.get("peak_extra_bytes") is not None:
        parts.append(f"+{rec['peak_extra_bytes'] / 2**20:.0f} MiB")
    return f"{head} " + "  ".join(parts)
