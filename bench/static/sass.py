"""Read SASS (``cuobjdump -sass`` text): instructions, and what a sequence of them holds.

Counts are of the instructions given (``NOP`` excluded); which instructions to count (a
loop's iteration, the code run once per program) is ``cfg.py``'s business.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache

_LINE = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_FUNCTION = re.compile(r"^\s*Function\s*:\s*(\S+)")
_PRED = re.compile(r"^(@!?U?P[0-9T])\s+")
_TARGET = re.compile(r"0x([0-9a-f]+)\s*$")

GLOBAL_LOADS = ("LDG", "LDGSTS", "UTMALDG", "UBLKCP")
"""Opcodes that read global memory (``LDGSTS``: cp.async to shared; ``UTMALDG``/``UBLKCP``: TMA)."""
GLOBAL_STORES = ("STG", "UTMASTG", "ATOMG", "RED", "REDG")
LOCAL = ("LDL", "STL")
BARRIERS = ("BAR",)
TENSOR_CORE = ("HGMMA", "HMMA", "IMMA", "QGMMA", "IGMMA", "BGMMA")
_WIDTH_TOKENS = {"U8": 8, "S8": 8, "U16": 16, "S16": 16, "64": 64, "128": 128, "256": 256}


@dataclass(frozen=True)
class Instr:
    """One SASS instruction: byte address, predicate (``""``, ``"@P0"``, ``"@!P1"``),
    opcode with its modifiers (``"LDG.E.128"``) and the operand text."""

    addr: int
    pred: str
    opcode: str
    operands: str

    def __post_init__(self):
        object.__setattr__(self, "base", self.opcode.split(".")[0])

    base: str = field(init=False, repr=False, compare=False)  # "LDG" for "LDG.E.128"

    def operand_list(self) -> list[str]:
        """Operands split at top-level commas (``desc[UR4][R2.64+0x10]`` stays one)."""
        out, depth, cur = [], 0, ""
        for ch in self.operands:
            depth += ch == "["
            depth -= ch == "]"
            if ch == "," and depth == 0:
                out.append(cur.strip())
                cur = ""
            else:
                cur += ch
        return out + [cur.strip()] if cur.strip() else out

    def branch_target(self) -> int | None:
        """The address a ``BRA``/``JMP`` goes to (``None`` for other instructions)."""
        if self.base not in ("BRA", "JMP"):
            return None
        m = _TARGET.search(self.operands)
        return int(m.group(1), 16) if m else None


@lru_cache(maxsize=16)
def parse(text: str) -> dict[str, list[Instr]]:
    """Function name (as the cubin spells it) -> its instructions in address order (cached:
    one dump holds many functions; do not modify the lists)."""
    functions: dict[str, list[Instr]] = {}
    current: list[Instr] | None = None
    for line in text.splitlines():
        m = _FUNCTION.match(line)
        if m:
            current = functions.setdefault(m.group(1), [])
            continue
        m = _LINE.match(line)
        if m and current is not None:
            body = m.group(2)
            p = _PRED.match(body)
            pred = p.group(1) if p else ""
            body = body[p.end():] if p else body
            opcode, _, operands = body.partition(" ")
            current.append(Instr(int(m.group(1), 16), pred, opcode, operands.strip()))
    return functions


# ------------------------------------------------------------------ dependent global loads
_NO_DEST = {"STG", "STS", "STL", "ST", "RED", "REDG", "BAR", "BRA", "JMP", "BRX", "EXIT", "BSSY",
            "BSYNC", "WARPSYNC", "NOP", "CALL", "RET", "MEMBAR", "DEPBAR", "FENCE", "YIELD",
            "LDGDEPBAR", "ERRBAR", "CCTL", "KILL", "UTMASTG", "UTMALDG", "LDGSTS", "UBLKCP", "SYNCS"}
_LOADS = {"LDG", "LDS", "LDL", "LD", "LDC", "ATOMG", "ATOMS", "LDSM"}
_REG = re.compile(r"(?<![\w.])(U?R|U?P)(\d+)(\.64)?(?!\w)")


def _regs(text: str) -> list[str]:
    """Register and predicate names in an operand (``R2.64`` is ``R2`` and ``R3``)."""
    out = []
    for kind, num, wide in _REG.findall(text):
        out.append(f"{kind}{num}")
        if wide:
            out.append(f"{kind}{int(num) + 1}")
    return out


def _defs_uses(ins: Instr) -> tuple[list[str], list[str]]:
    """Registers an instruction writes and reads (its guard predicate is a read)."""
    ops = ins.operand_list()
    uses = _regs(ins.pred)
    if ins.base in _NO_DEST or not ops:
        return [], uses + [r for op in ops for r in _regs(op)]
    # A second predicate destination (ISETP P1, PT, ...), or SHFL's predicate-then-register
    # pair; IADD3 has up to two carry-out predicates (IADD3 R6, P0, P1, ...).
    n_dest = 2 if len(ops) > 1 and (re.fullmatch(r"U?P(\d|T)", ops[1]) or ops[0] == "PT") else 1
    if ins.base == "IADD3" and n_dest == 2 and len(ops) > 2 and re.fullmatch(r"U?P(\d|T)", ops[2]):
        n_dest = 3
    defs = [r for op in ops[:n_dest] for r in _regs(op)]
    count = width_bits(ins.opcode) // 32 if ins.base in _LOADS else (
        2 if ".WIDE" in ins.opcode or ins.base == "CS2R" or ins.base.startswith("D") else 1)
    if defs and defs[0].startswith("R") and count > 1:
        defs += [f"R{int(defs[0][1:]) + k}" for k in range(1, count)]
    return defs, uses + [r for op in ops[n_dest:] for r in _regs(op)]


def load_chain(path: list[Instr]) -> int:
    """The longest chain of global loads along ``path`` where a load's address or guard
    predicate depends on the data of an earlier one: 1 when the loads are independent, 2
    when some wait for others (two memory round trips in a row), 0 with no global load.

    A write under a guard predicate is seen as is by later readers under the same guard;
    other readers may still see the old value (either may reach them). Instructions that a
    conditional branch the path falls through could have skipped depend on its predicate."""
    depth: dict[str, int] = {}
    guarded: dict[str, dict[str, int]] = {}  # guard -> register -> depth written under it
    control: list[tuple[int, int]] = []  # (branch target, depth): skipped unless a predicate said not
    longest = 0
    for k, ins in enumerate(path):
        defs, uses = _defs_uses(ins)
        under = guarded.get(ins.pred, {})
        d = max((under.get(r, depth.get(r, 0)) for r in uses), default=0)
        control = [(end, cd) for end, cd in control if ins.addr < end]
        d = max([d] + [cd for _, cd in control])
        target = ins.branch_target()
        if ins.pred and target is not None and target > ins.addr and k + 1 < len(path) \
                and path[k + 1].addr < target:  # the path falls through a conditional branch
            control.append((target, d))
        if ins.base in GLOBAL_LOADS:
            d += 1
            longest = max(longest, d)
        for r in defs:
            if ins.pred:
                guarded.setdefault(ins.pred, {})[r] = d
                depth[r] = max(depth.get(r, 0), d)
            else:
                depth[r] = d
                for regs in guarded.values():
                    regs.pop(r, None)
            if r.startswith("P") or r.startswith("UP"):  # a new guard value: forget its writes
                for guard in [g for g in guarded if g.lstrip("@!") == r]:
                    del guarded[guard]
    return longest


# ----------------------------------------------------------------------------- counting
def width_bits(opcode: str) -> int:
    """Access width of a memory opcode in bits: ``LDG.E.128`` 128, ``LDG.E.U16`` 16,
    ``LDG.E`` 32 (no width token means 32 bits)."""
    for tok in opcode.split(".")[1:]:
        if tok in _WIDTH_TOKENS:
            return _WIDTH_TOKENS[tok]
    return 32


@dataclass
class Mix:
    """What a sequence of instructions holds (counts)."""

    instructions: int
    global_loads: dict[int, int]  # width in bits -> count
    global_stores: dict[int, int]
    load_opcodes: dict[str, int]  # full opcode (e.g. "LDG.E.128.CONSTANT") -> count
    store_opcodes: dict[str, int]
    local: int  # LDL + STL
    shared: int  # LDS/STS/LDSM/STSM
    barriers: int  # BAR.*
    tensor_core: int
    mufu: dict[str, int]  # "EX2" -> count
    int64: int  # carry halves of 64-bit integer arithmetic (*.X) and IMAD.WIDE*
    int_divides: int  # I2F.RP / I2F.U64.RP: the reciprocal start of an integer divide
    calls: int  # CALL.* (a subroutine: slow paths such as a full-precision divide)
    load_chain: int  # longest chain of dependent global loads (see load_chain)
    top: dict[str, int]  # the most frequent opcodes (base) -> count


def mix(instrs: list[Instr], top: int = 8) -> Mix:
    """Counts of ``instrs`` by kind (see :class:`Mix`); ``load_chain`` reads them in order."""
    instrs = [i for i in instrs if i.base != "NOP"]
    loads = [i.opcode for i in instrs if i.base in GLOBAL_LOADS]
    stores = [i.opcode for i in instrs if i.base in GLOBAL_STORES]
    bases = Counter(i.base for i in instrs)
    return Mix(
        instructions=len(instrs),
        global_loads=dict(sorted(Counter(width_bits(o) for o in loads).items(), reverse=True)),
        global_stores=dict(sorted(Counter(width_bits(o) for o in stores).items(), reverse=True)),
        load_opcodes=dict(Counter(loads).most_common()),
        store_opcodes=dict(Counter(stores).most_common()),
        local=sum(bases[b] for b in LOCAL),
        shared=sum(n for b, n in bases.items() if b in ("LDS", "STS", "LDSM", "STSM")),
        barriers=sum(bases[b] for b in BARRIERS),
        tensor_core=sum(bases[b] for b in TENSOR_CORE),
        mufu=dict(Counter(i.opcode.split(".")[1] for i in instrs if i.base == "MUFU").most_common()),
        int64=sum(1 for i in instrs if "X" in i.opcode.split(".")[1:] or i.opcode.startswith("IMAD.WIDE")),
        int_divides=sum(1 for i in instrs if i.base == "I2F" and ".RP" in i.opcode),
        calls=bases["CALL"],
        load_chain=load_chain(instrs),
        top=dict(bases.most_common(top)),
    )
