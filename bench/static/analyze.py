"""One report row per (case, kernel variant, arch): resources, occupancy, the counted region's
instruction mix and the per-element count.

A row is a plain dict (it goes to JSON as is); budgets address its fields by dotted paths
such as ``"count.per_elem"`` or ``"region.narrowest_load_bits"``.
"""

from __future__ import annotations

from bench.static import sass
from bench.static.cfg import CFG
from bench.static.hardware import SM
from bench.static.resources import occupancy, parse_res_usage, shared_per_block

REGIONS = {"loop": "main loop", "straight": "outside loops", "kernel": "whole kernel",
           "tensor-core": "main loop"}


def _region(graph: CFG, mode: str) -> tuple[list[sass.Instr] | None, int]:
    """The path counted per element under ``mode`` (``None``: no main loop) and the number
    of instructions in the region it runs through (every branch arm)."""
    if mode in ("loop", "tensor-core"):
        lp = graph.main_loop()
        return (graph.iteration_path(lp), len(graph.loop_instrs(lp))) if lp else (None, 0)
    if mode == "straight":
        looped = {b for lp in graph.loops for b in lp.blocks}
        once = [i for b in graph.order if b not in looped for i in graph.block_instrs(b)]
        return graph.kernel_path(enter_loops=False), len(once)
    reachable = [i for b in graph.order for i in graph.block_instrs(b)]
    return graph.kernel_path(enter_loops=True), len(reachable)


def _mix_dict(m: sass.Mix) -> dict:
    d = dict(m.__dict__)
    d["global_loads"] = {str(k): v for k, v in m.global_loads.items()}
    d["global_stores"] = {str(k): v for k, v in m.global_stores.items()}
    d["narrowest_load_bits"] = min(m.global_loads) if m.global_loads else None
    d["narrowest_store_bits"] = min(m.global_stores) if m.global_stores else None
    return d


def analyze(sass_text: str, res_text: str, function: str, *, arch: int, threads: int,
            dynamic_shared: int, mode: str, elems_per_thread: float | None) -> dict:
    """The row fields of one compiled function.

    ``mode``: how it is counted per element (see ``cases.py``); ``elems_per_thread``: the
    elements one thread handles per counted region (``None``: no per-element count).
    """
    instrs = sass.parse(sass_text)[function]
    res = parse_res_usage(res_text)[function]
    sm = SM[arch]
    smem = shared_per_block(res.shared, dynamic_shared, arch, sm)
    occ = occupancy(res.registers, threads, smem, sm)
    graph = CFG(instrs)
    path, region_size = _region(graph, mode)
    mix = sass.mix(path or [])
    in_loops = {i for lp in graph.loops for i in graph.loop_instrs(lp)}
    row = {
        "threads": threads,
        "registers": res.registers,
        "stack_bytes": res.stack,
        "local_bytes": res.local,
        "shared_static": res.shared,
        "shared_dynamic": dynamic_shared,
        "shared_per_block": smem,
        "occupancy": {"blocks": occ.blocks, "warps": occ.warps, "fraction": round(occ.fraction, 4),
                      "limit": occ.limit, "by_limit": occ.by_limit},
        "instructions": sum(i.base != "NOP" for i in instrs),
        "spill_instrs": sum(i.base in sass.LOCAL for i in instrs),  # register spills or local arrays
        "local_in_loops": sum(i.base in sass.LOCAL for i in in_loops),
        "tensor_core": sum(i.base in sass.TENSOR_CORE for i in instrs),
        "tensor_core_ops": sorted({i.opcode for i in instrs if i.base in sass.TENSOR_CORE}),
        "loops": len(graph.loops),
        "region": {"what": REGIONS[mode], "found": path is not None, "span_instructions": region_size,
                   **_mix_dict(mix)},
        "count": None,
    }
    if mode != "tensor-core" and path is not None and elems_per_thread:
        row["count"] = {"mode": mode, "elems_per_thread": elems_per_thread,
                        "per_elem": round(mix.instructions / elems_per_thread, 3)}
    return row
