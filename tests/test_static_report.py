"""The static performance report (``python -m bench.static``): its SASS reading on fixed
snippets, and every budget on a fresh run.

The report compiles kernels, which the Triton compiler cannot do in a process where
``TRITON_INTERPRET=1`` was set (``tests/conftest.py`` sets it on machines without a GPU), so
it runs in a subprocess, once per test session (shared by pytest-xdist workers). Budget
tests are parametrized from the committed ``bench/results/static-sm90/report.json``, one id
per (case, kernel, arch, metric): ``pytest tests/test_static_report.py -k test_budget``.
Today's kernels miss several budgets; the report says by how much.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from bench.static import sass
from bench.static.cfg import CFG
from bench.static.hardware import SM
from bench.static.predict import issue_budget, predict
from bench.static.resources import occupancy, parse_res_usage, shared_per_block

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMITTED = os.path.join(ROOT, "bench", "results", "static-sm90", "report.json")


def _sass(*lines: str, name: str = "k") -> str:
    """cuobjdump-style text of one function: an instruction every 16 bytes."""
    body = "\n".join(f"        /*{16 * i:04x}*/                   {text} ;   /* 0x000fe20000000f00 */\n"
                     "                                                             /* 0x000fe20000000f00 */"
                     for i, text in enumerate(lines))
    return f"\tcode for sm_90\n\t\tFunction : {name}\n\t.headerflags\t@\"EF_CUDA_SM90\"\n{body}\n"


def _instrs(*lines: str) -> list[sass.Instr]:
    return sass.parse(_sass(*lines))["k"]


# -------------------------------------------------------------------------------- parsing
def test_parse_predicates_opcodes_operands():
    f = sass.parse(_sass("MOV R1, c[0x0][0x28]", "@!P0 LDG.E.128 R4, desc[UR6][R2.64+0x1000]",
                         "@P1 BRA 0x0", name="_token_kernel"))
    (name, ins), = f.items()
    assert name == "_token_kernel"
    assert [(i.addr, i.pred, i.base) for i in ins] == [(0, "", "MOV"), (16, "@!P0", "LDG"), (32, "@P1", "BRA")]
    assert ins[1].opcode == "LDG.E.128" and ins[1].operand_list() == ["R4", "desc[UR6][R2.64+0x1000]"]
    assert ins[2].branch_target() == 0 and ins[0].branch_target() is None


@pytest.mark.parametrize("opcode, bits", [("LDG.E.128", 128), ("LDG.E.128.CONSTANT", 128), ("LDG.E.64", 64),
                                          ("LDG.E", 32), ("LDG.E.EF", 32), ("LDG.E.U16", 16),
                                          ("STG.E.U8", 8), ("LDG.E.S16.CONSTANT", 16),
                                          ("LDGSTS.E.BYPASS.128", 128)])
def test_width_of_memory_opcodes(opcode, bits):
    assert sass.width_bits(opcode) == bits


def test_mix_counts_by_kind():
    m = sass.mix(_instrs("LDG.E.128 R4, desc[UR4][R2.64]", "LDG.E.U16 R8, desc[UR4][R2.64]",
                         "MUFU.EX2 R9, R8", "MUFU.EX2 R10, R9", "BAR.SYNC.DEFER_BLOCKING 0x0",
                         "IMAD.WIDE R2, R0, 0x2, R2", "IADD3.X R3, R3, RZ, RZ, P0, !PT",
                         "STL [R1], R4", "HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], R24", "NOP",
                         "STG.E.128 desc[UR4][R6.64], R4"))
    assert m.instructions == 10  # NOP not counted
    assert m.global_loads == {128: 1, 16: 1} and m.global_stores == {128: 1}
    assert (m.mufu, m.barriers, m.local, m.tensor_core, m.int64) == ({"EX2": 2}, 1, 1, 1, 2)


def test_res_usage():
    text = (" Function _token_logprobs_fwd_kernel:\n  REG:53 STACK:0 SHARED:1024 LOCAL:0 CONSTANT[0]:608\n"
            " Function _Z3fooPf:\n  REG:255 STACK:8 SHARED:0 LOCAL:8 CONSTANT[0]:352\n")
    res = parse_res_usage(text)
    assert res["_token_logprobs_fwd_kernel"].registers == 53
    assert (res["_Z3fooPf"].stack, res["_Z3fooPf"].local) == (8, 8)


# -------------------------------------------------------------------------- control flow
_LOOP = ("MOV R0, RZ",                           # 0x00
         "LDG.E.128 R4, desc[UR4][R2.64]",       # 0x10  loop head
         "FADD R0, R0, R4",                      # 0x20
         "ISETP.GE.AND P0, PT, R0, 0x10, PT",    # 0x30
         "@!P0 BRA 0x10",                        # 0x40  back edge
         "EXIT",                                 # 0x50
         "BRA 0x60")                             # 0x60  the trap after EXIT: no loop


def test_one_loop_and_its_path():
    g = CFG(_instrs(*_LOOP))
    assert len(g.loops) == 1
    lp = g.main_loop()
    assert [i.addr for i in g.iteration_path(lp)] == [0x10, 0x20, 0x30, 0x40]


def test_main_loop_is_the_innermost_loop_loading_most():
    ins = _instrs("MOV R0, RZ",                           # 0x00
                  "LDG.E.U16 R9, desc[UR4][R2.64]",       # 0x10 outer head (a scalar load)
                  "LDG.E.128 R4, desc[UR4][R2.64]",       # 0x20 inner head
                  "@P1 BRA 0x20",                         # 0x30 inner back edge
                  "LDG.E R5, desc[UR4][R6.64]",           # 0x40 another innermost loop, narrower
                  "@P2 BRA 0x40",                         # 0x50
                  "@P0 BRA 0x10",                         # 0x60 outer back edge
                  "EXIT")
    g = CFG(ins)
    assert len(g.loops) == 3
    assert [i.addr for i in g.loop_instrs(g.main_loop())] == [0x20, 0x30]


def test_out_of_line_block_is_part_of_its_loop():
    # ptxas may move a rare arm after the loop; it jumps back into the middle of the body.
    ins = _instrs("MOV R0, RZ",                           # 0x00
                  "LDG.E R4, desc[UR4][R2.64]",           # 0x10 head
                  "@P1 BRA 0x60",                         # 0x20 to the out-of-line arm
                  "FADD R0, R0, R4",                      # 0x30 rejoin point
                  "@P0 BRA 0x10",                         # 0x40 back edge
                  "EXIT",                                 # 0x50
                  "FMUL R4, R4, R4",                      # 0x60 out-of-line arm
                  "FMUL R4, R4, R4",                      # 0x70
                  "BRA 0x30")                             # 0x80 back into the loop: not a loop of its own
    g = CFG(ins)
    assert len(g.loops) == 1
    path = g.iteration_path(g.main_loop())
    assert [i.addr for i in path] == [0x10, 0x20, 0x60, 0x70, 0x80, 0x30, 0x40]  # the costlier arm


def test_longest_path_takes_the_costlier_arm_and_skips_loops_when_asked():
    ins = _instrs("ISETP.NE.AND P0, PT, R0, RZ, PT",      # 0x00
                  "@P0 BRA 0x50",                         # 0x10
                  "FADD R1, R1, R1",                      # 0x20 arm A (3 instructions)
                  "FADD R1, R1, R1",                      # 0x30
                  "BRA 0x60",                             # 0x40
                  "FMUL R1, R1, R1",                      # 0x50 arm B (1 instruction)
                  "LDG.E R2, desc[UR4][R4.64]",           # 0x60 a loop
                  "@P1 BRA 0x60",                         # 0x70
                  "EXIT")                                 # 0x80
    g = CFG(ins)
    once = [i.addr for i in g.kernel_path(enter_loops=False)]
    assert once == [0x00, 0x10, 0x20, 0x30, 0x40, 0x80]
    assert [i.addr for i in g.kernel_path(enter_loops=True)] == [0x00, 0x10, 0x20, 0x30, 0x40, 0x60, 0x70, 0x80]


def test_indirect_branch_reaches_the_jump_table_targets():
    ins = _instrs("BRX R2 -0x20",                         # 0x00 a switch
                  "MOV R1, 0x1",                          # 0x10 case 0
                  "BRA 0x40",                             # 0x20
                  "MOV R1, 0x2",                          # 0x30 case 1: only the table reaches it
                  "EXIT")                                 # 0x40
    g = CFG(ins)
    assert len(g.order) == 4  # every block is reachable


# ------------------------------------------------------------------------ dependent loads
def test_load_chain():
    independent = _instrs("LDG.E R4, desc[UR4][R2.64]", "LDG.E R5, desc[UR4][R6.64]", "FADD R7, R4, R5")
    assert sass.load_chain(independent) == 1
    masked = _instrs("LDG.E.U8 R4, desc[UR4][R2.64]", "ISETP.NE.AND P0, PT, R4, RZ, PT",
                     "@P0 LDG.E R5, desc[UR4][R6.64]")  # a load guarded by a loaded mask
    assert sass.load_chain(masked) == 2
    # the loaded register is reused for a new address under the same guard as the next load
    reused = _instrs("LDG.E.128 R8, desc[UR4][R10.64]", "@!P0 LEA R8, P1, R12, c[0x0][0x160], 0x1",
                     "@!P0 LEA.HI.X R9, R12, c[0x0][0x164], R13, 0x1, P1", "@!P0 LDG.E.128 R8, desc[UR4][R8.64]")
    assert sass.load_chain(reused) == 1
    skipped = _instrs("LDG.E.U8 R4, desc[UR4][R2.64]", "ISETP.EQ.AND P0, PT, R4, RZ, PT",
                      "@P0 BRA 0x40", "LDG.E R5, desc[UR4][R6.64]", "EXIT")  # `if (!mask) continue;`
    assert sass.load_chain(skipped) == 2
    # IADD3's two carry-outs are written, not read: the next address does not wait on the load
    carries = _instrs("LDG.E R4, desc[UR4][R2.64]", "IADD3 R6, P0, P1, R8, R9, RZ",
                      "IADD3.X R7, R10, RZ, RZ, P0, P1", "LDG.E R5, desc[UR4][R6.64]")
    assert sass.load_chain(carries) == 1


# ------------------------------------------------------------------- occupancy, prediction
@pytest.mark.parametrize("regs, threads, smem, blocks, limit", [
    (53, 256, 1152, 4, "registers"),       # token log-probs forward: 56 regs/thread allocated
    (32, 256, 1024, 8, "threads"),         # 2048 threads: registers allow as many
    (120, 128, 1664, 4, "registers"),      # GAE: 16 warps, 25 %
    (211, 256, 99328, 1, "registers"),     # a GEMM tile
    (64, 128, 99328, 2, "shared memory"),  # 2 x 97 KiB fit in 228 KiB
    (16, 32, 1024, 32, "blocks"),          # tiny blocks: 32 per SM
    (255, 512, 1024, 0, "registers"),      # 255 x 512 > 64 K registers: no block fits
])
def test_occupancy(regs, threads, smem, blocks, limit):
    occ = occupancy(regs, threads, smem, SM[90])
    assert (occ.blocks, occ.limit) == (blocks, limit)
    assert occ.fraction == blocks * threads / 32 / 64


def test_shared_per_block_counts_the_reserve_once():
    assert shared_per_block(0, 0, 90, SM[90]) == 1024
    assert shared_per_block(1024, 32, 90, SM[90]) == 128 + 1024  # sm_90 folds the reserve in
    assert shared_per_block(256, 0, 80, SM[80]) == 256 + 1024


def test_prediction():
    assert round(issue_budget(2), 1) == 19.7  # issue 11: the budget of a 2-byte element
    p = predict(2, 13.7)
    assert p["bound"] == "memory" and p["copy_share"] == 1.0
    p = predict(17, 202.6)
    assert p["bound"] == "issue" and p["copy_share"] == pytest.approx(issue_budget(17) / 202.6, abs=1e-3)


# ------------------------------------------------------------------------ the full report
def _committed_checks() -> list[dict]:
    if not os.path.isfile(COMMITTED):
        return []
    with open(COMMITTED) as f:
        return json.load(f)["checks"]


@pytest.fixture(scope="session")
def report(tmp_path_factory) -> dict:
    """A fresh report (``python -m bench.static --no-fail``), made once per test run."""
    pytest.importorskip("triton")
    from bench.static.build import tool

    for name, path in (("cuobjdump", tool("cuobjdump")), ("nvcc", shutil.which("nvcc"))):
        if path is None:
            pytest.skip(f"{name} not found: the static report needs it to compile and read kernels")
    from filelock import FileLock

    run = os.environ.get("PYTEST_XDIST_TESTRUNUID")  # one report for all xdist workers of a run
    base = tmp_path_factory.getbasetemp()
    out = base.parent / f"static-report-{run}" if run else base / "static-report"
    with FileLock(str(out) + ".lock"):
        path = out / "report.json"
        if not path.exists():
            env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
            proc = subprocess.run([sys.executable, "-m", "bench.static", "--no-fail", "--out", str(out)],
                                  cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
            if proc.returncode != 0:
                pytest.fail(f"python -m bench.static failed:\n{proc.stderr[-6000:]}")
        with open(path) as f:
            return json.load(f)


def test_report_covers_every_kernel(report):
    assert report["uncovered"] == [], "add a case for these kernels to bench/static/cases.py"
    assert report["label"].startswith("Predictions from compiled code")
    assert {r["arch"] for r in report["rows"]} == {80, 90}


def test_committed_report_is_current(report):
    """The committed report has the same budget checks as a fresh run (regenerate it with
    ``python -m bench.static --no-fail`` after changing cases, budgets or kernels)."""
    assert sorted(c["id"] for c in _committed_checks()) == sorted(c["id"] for c in report["checks"])


def test_specialization_follows_triton_runtime(report):
    rows = {(r["case"], r["arch"]): r for r in report["rows"] if r["backend"] == "triton"}
    aligned = rows[("token_logprobs.fwd.V151936", 90)]["specialization"]
    odd = rows[("token_logprobs.fwd.V151655", 90)]["specialization"]
    sliced = rows[("token_logprobs.fwd.sliced-V151936", 90)]["specialization"]
    # rows of a contiguous [N, V] are r * sx1; a sliced [8, 2049, V][:, :-1] is read in place
    assert aligned["x_ptr"] == "*bf16/16" and aligned["sx1"] == "i32/16" and aligned["V"] == "i32/16"
    assert odd["x_ptr"] == "*bf16/16" and odd["sx1"] == "i32" and odd["V"] == "i32"
    assert sliced["sx0"] == "i32/16" and sliced["D1"] == "i32/16" and sliced["sx1"] == "i32/16"
    assert aligned["c"] == "fp32" and aligned["BLOCK_V"] == "8192" and aligned["PREFETCH"] == "True"
    gae = rows[("gae.B8192-T2048", 90)]["specialization"]
    assert gae["NC"] == "1" and gae["m_ptr"] == "*u8/16"  # an int equal to 1 is a constant


@pytest.mark.parametrize("check_id", [c["id"] for c in _committed_checks()])
def test_budget(report, check_id):
    fresh = {c["id"]: c for c in report["checks"]}
    if check_id not in fresh:
        pytest.fail(f"{check_id}: not in a fresh report (regenerate bench/results/static-sm90)")
    c = fresh[check_id]
    assert c["ok"], (f"{c['kernel']} ({c['case']}, sm_{c['arch']}): {c['metric']} = {c['value']}, "
                     f"budget {c['op']} {c['limit']}: {report['budgets'][c['budget']]['reason']}")
