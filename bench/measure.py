"""Timers, peak memory, the copy-bandwidth ceiling, and the environment.

On a GPU every time is a median of CUDA-event timings after warm-up with the L2 flushed
before each repetition (``triton.testing.do_bench``; a call slower than ``SLOW_MS`` gets a
few event-timed repetitions instead, with the same flush). On the CPU (smoke mode) one
``time.perf_counter`` call after one warm-up call: those numbers mean nothing and are never
claimed.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import platform
import shlex
import subprocess
import time
from collections.abc import Callable

import torch

QUANTILES = (0.2, 0.5, 0.8)
SLOW_MS = 100.0
"""A call slower than this is timed with ``SLOW_REPS`` event-timed repetitions: do_bench
would spend seconds estimating it, and its spread is small next to its length."""
SLOW_REPS = 3
_FLUSH_BYTES = 256 * 2**20  # larger than any L2 in sight (H100 50 MB, H200 60 MB)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device, first_ms: float) -> dict:
    """Time ``fn`` (already warmed up; ``first_ms`` is the length of a warm call).

    Returns ``{"ms": median, "q20": ..., "q80": ..., "timer": what measured it}``.
    """
    if device.type != "cuda":  # smoke mode: no number is claimed
        t0 = time.perf_counter()
        fn()
        ms = (time.perf_counter() - t0) * 1e3
        return {"ms": ms, "q20": ms, "q80": ms, "timer": "time.perf_counter, 1 call (smoke)"}
    if first_ms > SLOW_MS:
        return _time_slow(fn, device)
    from triton.testing import do_bench

    q20, med, q80 = do_bench(fn, warmup=25, rep=100, quantiles=list(QUANTILES))
    return {"ms": med, "q20": q20, "q80": q80,
            "timer": "triton.testing.do_bench(warmup=25, rep=100), L2 flushed"}


def _time_slow(fn, device) -> dict:
    flush = torch.empty(_FLUSH_BYTES, dtype=torch.int8, device=device)
    times = []
    for _ in range(SLOW_REPS):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return {"ms": times[len(times) // 2], "q20": times[0], "q80": times[-1],
            "timer": f"CUDA events x{SLOW_REPS} (call > {SLOW_MS:g} ms), L2 flushed"}


def warm_call_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Run ``fn`` once, synchronized, and return its wall time in ms."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return (time.perf_counter() - t0) * 1e3


def peak_extra_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    """Peak memory ``fn`` allocates above what is allocated before it (the inputs, and in
    backward mode the forward's saved tensors). None on the CPU (not measured)."""
    if device.type != "cuda":
        return None
    sync(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    sync(device)
    return max(torch.cuda.max_memory_allocated(device) - before, 0)


COPY_CAP = 8 * 2**30
"""Largest copy timed (bytes read + written): the copy bandwidth is flat long before, and a
larger one would compete with the do_bench flush buffer for memory next to a huge op."""


class Ceilings:
    """The device-to-device copy time for a byte count, measured in this run and cached.

    A copy of ``nbytes / 2`` bytes reads and writes ``nbytes`` in all, the same traffic as an
    op that must move ``nbytes``: the ratio of the two rates is the op's fraction of the copy
    bandwidth at its own size (small ops are compared with small copies; past ``COPY_CAP``
    with a copy of that size).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self._copy: dict[int, dict] = {}

    def copy(self, nbytes: int) -> dict:
        """``{"bytes": moved, "ms": median}`` of a copy moving ``nbytes`` (read + write)."""
        half = max(min(nbytes, COPY_CAP) // 2, 1)
        if half not in self._copy:
            self._copy[half] = self._measure_copy(half)
        return self._copy[half]

    def _measure_copy(self, half: int) -> dict:
        while True:
            try:
                src = torch.empty(half, dtype=torch.uint8, device=self.device).random_()
                dst = torch.empty_like(src)
                break
            except torch.OutOfMemoryError:  # bandwidth is flat at such sizes: a smaller copy will do
                half //= 2

        def run():
            dst.copy_(src)

        t = time_call(run, self.device, warm_call_ms(run, self.device))
        return {"bytes": 2 * half, "ms": t["ms"]}

    def peak_copy(self) -> dict:
        """A large copy (2 GiB moved on a GPU): the device's copy bandwidth for the record."""
        nbytes = 2 * 2**30 if self.device.type == "cuda" else 2**24
        c = self.copy(nbytes)
        return {**c, "GBps": c["bytes"] / c["ms"] / 1e6}


# -------------------------------------------------------------------- environment
def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _driver() -> str | None:
    try:
        import pynvml  # nvidia-ml-py

        pynvml.nvmlInit()
        v = pynvml.nvmlSystemGetDriverVersion()
        return v.decode() if isinstance(v, bytes) else v
    except Exception:  # noqa: BLE001  (no NVML: ask nvidia-smi)
        pass
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True)
        return out.stdout.strip().splitlines()[0]
    except Exception:  # noqa: BLE001
        return None


def environment(device: torch.device, argv: list[str]) -> dict:
    """GPU, driver, CUDA, torch, triton (and peers') versions, the command and the date."""
    import fastrlhf

    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in argv),
        "device": str(device),
        "gpu": None,
        "driver": None,
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "liger_kernel": _version("liger-kernel"),
        "fastrlhf": fastrlhf.__version__,
        "python": platform.python_version(),
        "platform": f"{platform.system()} {platform.machine()}",
        "cpu": platform.processor() or platform.machine(),
    }
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(gpu=p.name, driver=_driver(), sm=f"{p.major}.{p.minor}",
                   multiprocessors=p.multi_processor_count,
                   memory_GiB=round(p.total_memory / 2**30, 1),
                   l2_MB=round(getattr(p, "L2_cache_size", 0) / 1e6, 1) or None)
    return env


def gpu_slug(env: dict) -> str:
    """Folder name for a GPU: ``NVIDIA H100 80GB HBM3`` -> ``nvidia-h100-80gb-hbm3``."""
    name = env.get("gpu") or "cpu"
    return "-".join("".join(c if c.isalnum() else " " for c in name.lower()).split())
