"""pytest-benchmark set-up for ``pytest bench/``.

Without a GPU the Triton kernels run under the Triton interpreter on CPU tensors (set before
``triton`` is first imported, hence here), on the tiny ``smoke`` shapes: the suite runs,
and claims nothing. On a GPU it uses the ``quick`` shapes; ``FASTRLHF_BENCH_TIER`` (``smoke``,
``quick`` or ``full``) overrides the choice.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from bench.core import TIERS, Config  # noqa: E402
from bench.runner import Runner, configure_compile  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TIER = os.environ.get("FASTRLHF_BENCH_TIER", "quick" if DEVICE.type == "cuda" else "smoke")
if TIER not in TIERS:
    raise ValueError(f"FASTRLHF_BENCH_TIER must be one of {TIERS}, got {TIER!r}")
CONFIG = Config(device=DEVICE, tier=TIER)


@pytest.fixture(scope="session")
def bench_runner():
    """One runner for the session: each provider is checked against the fp64 oracle once
    per op (a fastrlhf backend that fails the check fails its benchmarks)."""
    configure_compile()
    return Runner(CONFIG, [], log=lambda line: None)
