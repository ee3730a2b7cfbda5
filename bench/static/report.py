"""Write the report: ``report.json`` (every row and budget check) and ``report.md`` (tables)."""

from __future__ import annotations

import json
import os

from bench.static import hardware
from bench.static.budgets import BUDGETS

LABEL = ("Predictions from compiled code (static analysis of SASS), not measurements: no GPU "
         "ran anything.")


def _fmt(x, digits=1) -> str:
    if x is None:
        return "—"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _widths(counts: dict) -> str:
    return " ".join(f"{bits}×{n}" for bits, n in counts.items()) or "—"


def _occupancy(row: dict) -> str:
    occ = row["occupancy"]
    if not occ:
        return "—"
    return f"{occ['blocks']}×{row['threads']} ({occ['fraction']:.0%}, {occ['limit'].split()[0]})"


def _bound(row: dict) -> tuple[str, str]:
    p = row["prediction"]
    if not p:
        return "—", "—"
    use = f"issue {p['issue_use']:.0%}"
    return f"{p['bound']} ({use})", f"{p['copy_share']:.0%}"


def _checks_of(row: dict, checks: list[dict]) -> str:
    mine = [c for c in checks if c["case"] == row["case"] and c["kernel"] == row["kernel"] + row["variant"]
            and c["arch"] == row["arch"]]
    if not mine:
        return ""
    bad = [c for c in mine if not c["ok"]]
    return f"✗ {len(bad)}/{len(mine)}" if bad else f"✓ {len(mine)}"


_MAIN = ("| case | kernel | grid × threads | regs | LDL/STL (in loops) | smem/block | occupancy "
         "(limit) | instr/elem | region instr | elem/thread | loads (bits×n) | stores | load chain "
         "| BAR | MUFU | tensor core | B/elem | predicted bound | % copy | budgets |")


def _main_row(r: dict, checks: list[dict]) -> str:
    g = r["region"]
    count = r["count"] or {}
    grid = "×".join(map(str, r["grid"])) if r["grid"] else "—"
    if r.get("waves") is not None and r["waves"] < 1:
        grid += f" ({r['waves']:.2f} wave)"
    region = f"{g['instructions']}" if g["found"] else "no loop"
    if g["found"] and g["span_instructions"] != g["instructions"]:
        region += f" of {g['span_instructions']}"
    mufu = " ".join(f"{k} {v}" for k, v in g["mufu"].items()) or "—"
    tc = f"{r['tensor_core_ops'][0].split('.')[0]} ×{r['tensor_core']}" if r["tensor_core"] else "—"
    bound, share = _bound(r)
    return (f"| {r['case']} | {r['kernel']}{r['variant']} | {grid} × {r['threads']} | {r['registers']} | "
            f"{r['spill_instrs']} ({r['local_in_loops']}) | {r['shared_per_block']} | {_occupancy(r)} | "
            f"{_fmt(count.get('per_elem'), 2)} | {region} | {_fmt(count.get('elems_per_thread'), 0)} | "
            f"{_widths(g['global_loads'])} | {_widths(g['global_stores'])} | {g['load_chain']} | "
            f"{g['barriers']} | {mufu} | {tc} | {_fmt((r['prediction'] or {}).get('bytes_per_elem'), 0)} | "
            f"{bound} | {share} | {_checks_of(r, checks)} |")


def _failures(checks: list[dict]) -> list[str]:
    bad = [c for c in checks if not c["ok"]]
    if not bad:
        return ["Every budget is met."]
    out = ["| case | kernel | sm | metric | value | limit | × limit |", "|---|---|---|---|---|---|---|"]
    for c in bad:
        out.append(f"| {c['case']} | {c['kernel']} | {c['arch']} | {c['metric']} | {_fmt(c['value'], 2)} | "
                   f"{c['op']} {c['limit']} | {_fmt(c['ratio'], 2)} |")
    return out


def markdown(doc: dict) -> str:
    """The Markdown report of a report document (see :func:`document`)."""
    rows, checks = doc["rows"], doc["checks"]
    bad = sum(not c["ok"] for c in checks)
    v = doc["versions"]
    out = [
        "# Static performance report", "",
        f"**{LABEL}** Generated {doc['generated']} by `{doc['command']}` with "
        + ", ".join(f"{k} {val}" for k, val in v.items()) + ".", "",
        "Constants (H100 SXM, `bench/static/hardware.py`): device-to-device copy "
        f"{hardware.COPY_BYTES_PER_S / 1e12:.1f} TB/s and bf16 GEMM {hardware.GEMM_FLOPS / 1e12:.0f} "
        f"TFLOP/s (measured in this workplace); issue rate {hardware.ISSUE_PER_S / 1e12:.2f} T "
        "thread-instructions/s (132 SMs × 4 schedulers × 1 warp-instruction/cycle × 32 threads × "
        "1.75 GHz); per SM 64 K registers, 2048 threads, 64 warps, 32 blocks, 228 KiB shared memory.", "",
        f"## Budgets: {len(checks)} checked, {bad} fail", "",
        *_failures(checks), "",
    ]
    broken = [r for r in rows if not r["compiled"]]
    if broken:
        out += ["## Compile failures", ""]
        for r in broken:
            error = r["error"].replace("\n", " ⏎ ")
            out += [f"- sm_{r['arch']} {r['case']} `{r['kernel']}{r['variant']}` "
                    f"({', '.join(f'{k}={v}' for k, v in (r['specialization'] or {}).items())}): {error}"]
        out.append("")
    for arch in doc["archs"]:
        out += [f"## Kernels on sm_{arch}", ""]
        if arch != 90:
            out += ["Resources and counts only: the predictions use H100 constants.", ""]
        out += [_MAIN, "|" + "---|" * (_MAIN.count("|") - 1)]
        shown = [r for r in rows if r["arch"] == arch and r["compiled"] and not r["case"].startswith("cuda.all.")]
        out += [_main_row(r, checks) for r in shown]
        out.append("")
        out += [f"- {r['case']}: {r['notes']}" for r in shown if r.get("notes")]
        out.append("")
    out += ["## Every CUDA instantiation (`kernels/*.cu`)", "",
            "Main loop of each `__global__` instantiation (no per-element count: elements per iteration "
            "depend on the dtype; the case rows above have them).", "",
            "| sm | file | function | regs | LDL/STL (in loops) | static smem | main-loop instr | loads | stores |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["case"].startswith("cuda.all.") and r["compiled"]:
            g = r["region"]
            out.append(f"| {r['arch']} | {r['case'][len('cuda.all.'):]} | `{r['kernel']}` | {r['registers']} | "
                       f"{r['spill_instrs']} ({r['local_in_loops']}) | {r['shared_static']} | "
                       f"{g['instructions'] if g['found'] else 'no loop'} | {_widths(g['global_loads'])} | "
                       f"{_widths(g['global_stores'])} |")
    out += ["", "## Budget table (`bench/static/budgets.py`)", "",
            "| cases | kernels | sm | metric | limit | reason |", "|---|---|---|---|---|---|"]
    for b in BUDGETS:
        out.append(f"| `{b.cases}` | `{b.kernels}` | {b.arch or 'all'} | {b.metric} | {b.op} {b.limit} | {b.reason} |")
    if doc.get("uncovered"):
        out += ["", "Triton kernels no case launches (add a row to `bench/static/cases.py`): "
                + ", ".join(f"`{k}`" for k in doc["uncovered"]) + "."]
    out += ["", "## How to read it", "", METHOD]
    return "\n".join(out) + "\n"


METHOD = """\
- **Launch configuration**: the real launchers of `fastrlhf.triton` run on `meta` tensors of the
  case's shapes; each launch is captured and specialized by Triton's own binder (argument types,
  16-byte divisibility of pointers and ints, ints equal to 1 as constants), then compiled with
  `triton.compile` for the arch. `kernels/*.cu` are compiled with the extension's nvcc flags;
  their block sizes and elements per iteration are in the case table.
- **Counted region** (`bench/static/cases.py`): *main loop* (the innermost natural loop with a
  global load, one iteration), *outside loops* (the code run once per program: elementwise
  kernels), *whole kernel* (each loop once). The count is the **longest path** through the
  region, the costlier arm of every branch: an upper bound where a kernel branches on a runtime
  constant (`region instr` shows `path of span` when the region holds other arms).
- **instr/elem** = path instructions ÷ elements one thread handles in the region
  (`BLOCK / (32 × num_warps)` for Triton). **load chain**: 2 means a global load waits for the
  data of another one (its mask or address) along the path: two memory latencies per tile.
- **Prediction** (sm_90): memory floor = bytes/elem ÷ copy bandwidth; issue floor = instr/elem ÷
  issue rate; the larger binds and `% copy` is the memory floor over the binding one. `issue N %`
  is the share of issue slots the kernel needs to run at copy speed. It assumes enough warps and
  loads in flight to hide latency; occupancy, load chain and barriers (BAR per iteration) say
  where that may not hold.
"""


def document(rows: list[dict], checks: list[dict], archs: list[int], command: str, generated: str,
             versions: dict, uncovered: list[str]) -> dict:
    """The JSON document of one run."""
    return {
        "label": LABEL, "generated": generated, "command": command, "versions": versions, "archs": archs,
        "constants": {"copy_bytes_per_s": hardware.COPY_BYTES_PER_S, "gemm_flops": hardware.GEMM_FLOPS,
                      "issue_per_s": hardware.ISSUE_PER_S, "sm_count": hardware.SM_COUNT},
        "summary": {"checks": len(checks), "failed": sum(not c["ok"] for c in checks)},
        "budgets": [dict(b.__dict__) for b in BUDGETS],
        "checks": checks, "uncovered": uncovered, "rows": rows,
    }


def write(doc: dict, out: str) -> tuple[str, str]:
    """Write ``report.json`` and ``report.md`` under ``out``; returns their paths."""
    os.makedirs(out, exist_ok=True)
    paths = os.path.join(out, "report.json"), os.path.join(out, "report.md")
    with open(paths[0], "w") as f:
        json.dump(doc, f, indent=1, sort_keys=False)
        f.write("\n")
    with open(paths[1], "w") as f:
        f.write(markdown(doc))
    return paths
