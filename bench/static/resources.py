"""Per-kernel resources from ``cuobjdump -res-usage`` and the occupancy they allow.

Occupancy follows ``cudaOccupancyMaxActiveBlocksPerMultiprocessor`` (``cuda_occupancy.h``):
registers are allocated per warp, ``ceil(regs * 32 / 256) * 256`` each, from four
sub-partitions of a quarter of the register file; shared memory per block is the kernel's
static and dynamic shared memory plus the driver's 1 KiB reserve, in 128-byte units; then
the thread, warp and block limits of the SM. The smallest of these block counts binds.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from bench.static.hardware import SMLimits

_FUNCTION = re.compile(r"^\s*Function\s+(.+?):\s*$")
_FIELDS = re.compile(r"(REG|STACK|SHARED|LOCAL):(\d+)")


@dataclass(frozen=True)
class Resources:
    """What ``cuobjdump -res-usage`` says of one function (bytes, except ``registers``).

    ``shared`` is the static shared memory as the cubin declares it: on sm_90 it includes
    the 1 KiB system reserve when the kernel addresses shared memory at all."""

    registers: int
    stack: int
    shared: int
    local: int


def parse_res_usage(text: str) -> dict[str, Resources]:
    """Function name -> its resources."""
    out: dict[str, Resources] = {}
    name = None
    for line in text.splitlines():
        m = _FUNCTION.match(line)
        if m:
            name = m.group(1)
            continue
        fields = dict(_FIELDS.findall(line))
        if name is not None and "REG" in fields:
            out[name] = Resources(int(fields["REG"]), int(fields.get("STACK", 0)),
                                  int(fields.get("SHARED", 0)), int(fields.get("LOCAL", 0)))
            name = None
    return out


@dataclass(frozen=True)
class Occupancy:
    """Resident blocks and warps per SM, and which limit binds."""

    blocks: int
    warps: int
    fraction: float  # warps / max warps per SM
    limit: str  # "registers", "shared memory", "threads" or "blocks"
    by_limit: dict  # limit -> blocks it allows


def _round_up(x: int, unit: int) -> int:
    return -(-x // unit) * unit


def shared_per_block(static: int, dynamic: int, arch: int, sm: SMLimits) -> int:
    """Bytes of shared memory one block holds on the SM: the static part without the
    reserve that sm_90 cubins fold into it, the dynamic part, and the reserve once."""
    if arch >= 90 and static >= sm.shared_reserved_per_block:
        static -= sm.shared_reserved_per_block
    return _round_up(static + dynamic, sm.shared_unit) + sm.shared_reserved_per_block


def occupancy(registers: int, threads: int, shared: int, sm: SMLimits) -> Occupancy:
    """Occupancy of blocks of ``threads`` threads using ``registers`` per thread and
    ``shared`` bytes of shared memory per block (as :func:`shared_per_block` gives)."""
    warps = -(-threads // 32)
    regs_per_warp = _round_up(max(registers, 1) * 32, sm.register_unit)
    warps_per_partition = (sm.registers // sm.sub_partitions) // regs_per_warp
    by_regs = (warps_per_partition * sm.sub_partitions) // warps
    if regs_per_warp * _round_up(warps, sm.sub_partitions) > sm.registers:
        by_regs = 0  # the launch check assumes every sub-partition gets a whole round of warps
    by_limit = {  # on a tie the SM's own limits are named first: the kernel's resources are not the cause
        "threads": min(sm.max_threads // threads, sm.max_warps // warps),
        "blocks": sm.max_blocks,
        "registers": by_regs,
        "shared memory": sm.shared // shared if shared else sm.max_blocks,
    }
    limit = min(by_limit, key=lambda k: (by_limit[k], list(by_limit).index(k)))
    blocks = by_limit[limit]
    return Occupancy(blocks, blocks * warps, blocks * warps / sm.max_warps, limit, by_limit)
