"""Measuring variants on a real device: part times, peak memory, parity, the frontier.

* **Times**: each part between ``torch.cuda.synchronize()`` calls on the host clock (parts
  last tens of milliseconds or more); one untimed phase first (autotuning, caches, TRL's
  trainer construction), then the median (and min / max) of ``reps`` phases. On the CPU
  (``--smoke``) one timed phase: those times claim nothing.
* **Peak memory**: ``torch.cuda.max_memory_allocated`` during each part (reset before it),
  everything allocated included (both models' weights, the gradients, the batch).
* **Parity**: the loss and the global gradient norm (policy and value head) of the first
  phase, relative to ``naive``'s on the same batch and weights.
* **Frontier**: ``bench.e2e.search.frontier`` over completion lengths; a try that raises
  ``torch.OutOfMemoryError`` is a failure, after which the memory is freed and the search
  goes on.
"""

from __future__ import annotations

import contextlib
import gc
import math
import statistics
import time
from collections.abc import Callable

import torch

from bench.e2e import phase, search, step

PARITY_RTOL = 2e-2
"""Largest relative difference from ``naive`` of the loss and the gradient norm (bf16: the
benchmark's tolerance for bf16 ops)."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def grad_norm(setup: step.Setup) -> float:
    norms = [p.grad.float().norm() for p in setup.params if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


class Runner:
    """Measures (variant, setup, batch) on ``device``; ``log`` gets one line per result."""

    def __init__(self, device: torch.device, *, reps: int = 3, smoke: bool = False,
                 log: Callable[[str], None] = print, deadline: float | None = None):
        self.device = device
        self.reps = reps
        self.smoke = smoke
        self.log = log
        self.deadline = deadline

    def out_of_time(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _free(self, setup, collect: bool = True):
        """Drop the gradients and hand freed memory back; ``collect``: also run the garbage
        collector (after an exception, whose traceback holds frames and their tensors)."""
        step.zero_grads(setup)
        if collect:
            gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    @contextlib.contextmanager
    def _part(self, out: dict, part: str):
        self._sync()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        t0 = time.perf_counter()
        yield
        self._sync()
        out.setdefault("ms", {}).setdefault(part, []).append((time.perf_counter() - t0) * 1e3)
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
            out.setdefault("peak", {})[part] = max(out.get("peak", {}).get(part, 0), peak)

    # ------------------------------------------------------------------ one measurement
    def measure(self, variant, setup: step.Setup, batch: phase.Batch) -> dict:
        """Times, peaks, loss and gradient norm of ``variant``'s phase (``status`` ok /
        skipped with ``reason`` / error)."""
        why = variant.unavailable(setup.method, setup.model)
        if why:
            return {"status": "skipped", "reason": why}
        if self.out_of_time():
            return {"status": "skipped", "reason": "time budget (--max-seconds) used up"}
        failed = True
        try:
            step.zero_grads(setup)
            loss = float(step.run_phase(variant, setup, batch))
            result = {"status": "ok", "loss": loss, "grad_norm": grad_norm(setup)}
            acc: dict = {}
            for _ in range(1 if self.smoke else self.reps):
                step.zero_grads(setup)
                step.run_phase(variant, setup, batch, lambda part: self._part(acc, part))
            result["parts_ms"] = {p: statistics.median(v) for p, v in acc["ms"].items()}
            result["parts_range_ms"] = {p: [min(v), max(v)] for p, v in acc["ms"].items()}
            result["phase_ms"] = sum(result["parts_ms"].values())
            if acc.get("peak"):
                result["peak_bytes"] = acc["peak"]
                result["peak_phase_bytes"] = max(acc["peak"].values())
            failed = False
            return result
        except torch.OutOfMemoryError as exc:
            return {"status": "skipped", "reason": f"out of memory at this size ({_first_line(exc)[:120]})"}
        except Exception as exc:  # noqa: BLE001  (recorded; the smoke test fails on it)
            return {"status": "error", "reason": _first_line(exc)}
        finally:
            self._free(setup, collect=failed)

    # ---------------------------------------------------------------------- frontier
    def fits(self, variant, setup: step.Setup, completion_len: int, prompt_len: int) -> tuple[bool, int | None]:
        """Run one phase at ``completion_len``: ``(True, peak bytes)`` or ``(False, None)``
        when it runs out of memory (or the time budget is used up)."""
        if self.out_of_time():
            return False, None
        batch = phase.make_batch(setup.method, setup.vocab, completion_len, self.device, prompt_len=prompt_len)
        failed = True
        try:
            step.zero_grads(setup)
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            step.run_phase(variant, setup, batch)
            self._sync()
            failed = False
            return True, torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None
        except torch.OutOfMemoryError:
            return False, None
        finally:
            batch = None
            self._free(setup, collect=failed)

    def frontier(self, variant, setup: step.Setup, grid: list[int], step_len: int, prompt_len: int) -> dict:
        out = search.frontier(lambda L: self.fits(variant, setup, L, prompt_len), grid, step_len)
        L = out["completion_len"]
        out["tokens"] = phase.GROUP * (prompt_len + L) if L else 0
        if self.out_of_time():
            out["note"] = "time budget (--max-seconds) ran out during the search: a lower bound"
        return out


def parity(rec: dict, naive: dict | None) -> dict | None:
    """Relative differences of the loss and gradient norm from ``naive``'s, and whether both
    are within ``PARITY_RTOL``."""
    if not naive or naive.get("status") != "ok" or rec.get("status") != "ok":
        return None
    loss = step.rel_err(rec["loss"], naive["loss"])
    norm = step.rel_err(rec["grad_norm"], naive["grad_norm"])
    return {"loss_rel_err": loss, "grad_norm_rel_err": norm,
            "ok": bool(loss <= PARITY_RTOL and norm <= PARITY_RTOL and math.isfinite(loss + norm))}
