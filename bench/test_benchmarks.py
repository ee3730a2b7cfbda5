"""The benchmark suite as pytest-benchmark tests, for regression tracking on GPU runners:

    pytest bench/ --benchmark-only --benchmark-json=bench.json
    pytest bench/ --benchmark-only --benchmark-compare --benchmark-compare-fail=median:10%

One test per (op, shape, mode, provider), grouped by (op, shape, mode) so the providers of a
group are compared side by side. Each round is one call followed by a device synchronize
(and one before it, outside the timing), so host timers see the GPU work, not its launch.
The reference numbers (cold L2, bandwidth, memory) come from ``python -m bench``.
"""

import time

import pytest
import torch

from bench.conftest import CONFIG
from bench.core import FASTRLHF, PROVIDERS, all_cases
from bench.measure import sync

ROUND_BUDGET_S = 0.5
"""Aim for about this much timed work per test (at least 5 and at most 100 rounds)."""

CASES, _ = all_cases(CONFIG)


def _applies(op, provider) -> bool:
    """Leave out pairs that can never run: a peer without such an op, a compile ruled out."""
    if provider == "torch.compile":
        return not op.compile_reason
    return provider in ("torch", *FASTRLHF) or provider in op.peers


PARAMS = [pytest.param(case, mode, provider, id=f"{case.op.name}-{case.label}-{mode}-{provider}")
          for case in CASES for mode in case.op.modes for provider in PROVIDERS
          if _applies(case.op, provider)]


@pytest.mark.parametrize(("case", "mode", "provider"), PARAMS)
def test_benchmark(benchmark, bench_runner, case, mode, provider):
    why = bench_runner.skip_reason(case.op, mode, provider)
    if why:
        if provider in FASTRLHF and bench_runner.impl(case.op, provider).failed_check:
            pytest.fail(f"{provider}: {why}")  # fastrlhf's own op gives wrong results
        pytest.skip(why)
    device = bench_runner.device
    try:
        run, _ = bench_runner.prepare(case, mode, provider)
    except torch.OutOfMemoryError:
        pytest.skip("out of memory at this size")

    def timed():
        run()
        sync(device)

    t0 = time.perf_counter()
    timed()
    first = time.perf_counter() - t0
    rounds = max(5, min(100, int(ROUND_BUDGET_S / max(first, 1e-6)))) if device.type == "cuda" else 1
    benchmark.group = f"{case.op.name}-{case.label}-{mode}"
    benchmark.extra_info.update(op=case.op.name, case=case.label, mode=mode, provider=provider,
                                tier=CONFIG.tier, bytes=case.bytes.get(mode),
                                flops=(case.flops or {}).get(mode))
    benchmark.pedantic(timed, setup=lambda: sync(device), rounds=rounds, iterations=1,
                       warmup_rounds=1 if device.type == "cuda" else 0)
    stats = getattr(benchmark, "stats", None)
    median = getattr(getattr(stats, "stats", None), "median", None)
    if median and case.bytes.get(mode):
        benchmark.extra_info["GBps"] = case.bytes[mode] / median / 1e9

