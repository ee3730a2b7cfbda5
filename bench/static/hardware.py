"""The GPU numbers every prediction uses, named once, with where they come from.

Throughput constants are for an H100 SXM (sm_90), the GPU the budgets are written for.
Per-SM limits are the CUDA occupancy limits of compute capability 9.0 and 8.0 (CUDA C++
Programming Guide, "Compute Capabilities" table; ``cuda_occupancy.h`` for the register
arithmetic).
"""

from __future__ import annotations

from dataclasses import dataclass

COPY_BYTES_PER_S = 3.0e12
"""H100 SXM device-to-device copy, bytes moved (read + written) per second: measured in this
workplace with ``bench`` (a 2 GiB ``torch.Tensor.copy_``)."""

GEMM_FLOPS = 800e12
"""H100 SXM bf16 dense GEMM, FLOP/s: ``torch.mm`` measured in this workplace."""

SM_COUNT = 132
"""Streaming multiprocessors of an H100 SXM."""

ISSUE_PER_S = SM_COUNT * 4 * 1 * 32 * 1.75e9
"""Thread-instructions the H100 SXM issues per second, ~29.6e12: 132 SMs x 4 schedulers per
SM x 1 warp-instruction per scheduler per cycle x 32 threads per warp x ~1.75 GHz (the
sustained clock under load; boost is 1.98 GHz). A warp-instruction predicated off for some
lanes still costs the issue slot of 32 threads."""


@dataclass(frozen=True)
class SMLimits:
    """Per-SM resources that bound how many blocks run at once."""

    registers: int = 65536  # 32-bit registers per SM
    register_unit: int = 256  # registers are allocated per warp in units of this many
    sub_partitions: int = 4  # register file split over the 4 schedulers
    max_regs_per_thread: int = 255
    max_threads: int = 2048
    max_warps: int = 64
    max_blocks: int = 32
    shared: int = 233472  # bytes of shared memory per SM (228 KiB)
    shared_per_block: int = 232448  # opt-in maximum for one block (227 KiB)
    shared_reserved_per_block: int = 1024  # the driver's reserve in every block
    shared_unit: int = 128  # shared memory allocation granularity, bytes


SM = {
    90: SMLimits(),
    80: SMLimits(shared=167936, shared_per_block=166912),  # A100: 164 KiB per SM, 163 KiB per block
}
