"""Control flow of one SASS function: basic blocks, natural loops, longest paths.

* **Blocks** start at the entry, at every branch target and after every branch or exit.
  ``CALL`` returns to the next instruction (its subroutine is not followed), so code
  reached only by calls (slow paths placed after ``EXIT``) is in no path. An indirect
  ``BRX`` (a switch's jump table) may go to every block that nothing else reaches.
* A **loop** is a natural loop: an edge to a block that dominates its source is a back
  edge, and the loop of a head is every block that reaches one of its back edges without
  passing the head. Out-of-line blocks that jump back into a loop are part of it.
* The **main loop** is the innermost loop whose blocks hold a global load (``LDG``,
  ``LDGSTS``, TMA): the loop that streams the big dimension. With several, the one whose
  loads add up to the most bits (a 16-byte pack loop over a scalar head or tail loop),
  then the one with the most instructions.
* A **path** is the longest sequence of instructions (``NOP`` not counted) one thread can
  run through a region, each conditional branch going the costlier way: one arm of a
  branch on a runtime constant (a loss type, a dtype), the valid arm of a mask test.
  Through a loop's iteration it ends at the back edge; through a kernel it either skips
  inner loops (the code run once per program) or runs each once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from bench.static.sass import GLOBAL_LOADS, Instr, width_bits

_BRANCHES = ("BRA", "JMP", "BRX", "JMX")
_ENDS = ("EXIT", "RET", "BRX", "JMX")  # no fall-through when unpredicated
_CALL = re.compile(r"0x([0-9a-f]+)\s*$")


@dataclass(frozen=True)
class Loop:
    head: int  # block index
    blocks: frozenset  # block indices, the head included


class CFG:
    """Blocks, edges, dominators and natural loops of one function's instructions."""

    def __init__(self, instrs: list[Instr]):
        self.instrs = instrs
        index = {ins.addr: k for k, ins in enumerate(instrs)}
        leaders = {0}
        for k, ins in enumerate(instrs):
            target = ins.branch_target()
            if target is not None and target in index:
                leaders.add(index[target])
            if ins.base in _BRANCHES or ins.base in _ENDS:
                leaders.add(k + 1)
        starts = sorted(s for s in leaders if s < len(instrs))
        self.ranges = [(s, e) for s, e in zip(starts, starts[1:] + [len(instrs)])]
        block_of = {s: b for b, (s, _) in enumerate(self.ranges)}
        self.succ: list[list[int]] = []
        for b, (s, e) in enumerate(self.ranges):
            last = instrs[e - 1]
            out = []
            target = last.branch_target()
            if target is not None and target in index:
                out.append(block_of[index[target]])
            ends = last.base in _BRANCHES or last.base in _ENDS
            if (last.pred or not ends) and e < len(instrs):
                out.append(b + 1)
            self.succ.append(out)
        # An indirect branch (BRX: a switch's jump table) may go to any block nothing else
        # reaches, other than a subroutine (a CALL target) or the closing trap (BRA to itself).
        called = {index.get(int(m.group(1), 16)) for i in instrs if i.base == "CALL"
                  for m in [_CALL.search(i.operands)] if m}
        reached = {t for out in self.succ for t in out}
        orphans = [b for b, (s, e) in enumerate(self.ranges)
                   if b and b not in reached and s not in called and instrs[s].branch_target() != instrs[s].addr]
        for b, (s, e) in enumerate(self.ranges):
            if instrs[e - 1].base in ("BRX", "JMX"):
                self.succ[b] += orphans
        self.succ = [list(dict.fromkeys(out)) for out in self.succ]
        self.order = self._reverse_postorder()
        self.preds: dict[int, list[int]] = {b: [] for b in self.order}
        for b in self.order:
            for s in self.succ[b]:
                self.preds[s].append(b)
        self.idom = self._dominators()
        self.loops = self._natural_loops()

    # ------------------------------------------------------------------------ structure
    def block_instrs(self, b: int) -> list[Instr]:
        s, e = self.ranges[b]
        return [i for i in self.instrs[s:e] if i.base != "NOP"]

    def _reverse_postorder(self) -> list[int]:
        seen, post, stack = {0}, [], [(0, iter(self.succ[0]))]
        while stack:
            b, it = stack[-1]
            nxt = next((s for s in it if s not in seen), None)
            if nxt is None:
                post.append(b)
                stack.pop()
            else:
                seen.add(nxt)
                stack.append((nxt, iter(self.succ[nxt])))
        return post[::-1]

    def _dominators(self) -> dict[int, int]:
        """Immediate dominators (Cooper, Harvey, Kennedy) of the blocks reachable from entry."""
        rank = {b: i for i, b in enumerate(self.order)}
        preds = self.preds
        idom = {0: 0}
        changed = True
        while changed:
            changed = False
            for b in self.order[1:]:
                done = [p for p in preds[b] if p in idom]
                new = done[0]
                for p in done[1:]:
                    a, c = p, new
                    while a != c:
                        while rank[a] > rank[c]:
                            a = idom[a]
                        while rank[c] > rank[a]:
                            c = idom[c]
                    new = a
                if idom.get(b) != new:
                    idom[b] = new
                    changed = True
        return idom

    def dominates(self, a: int, b: int) -> bool:
        while b != a and self.idom[b] != b:
            b = self.idom[b]
        return a == b

    def _natural_loops(self) -> list[Loop]:
        bodies: dict[int, set[int]] = {}
        for b in self.order:
            for h in self.succ[b]:
                if h in self.idom and self.dominates(h, b):
                    body = bodies.setdefault(h, {h})
                    stack = [b]
                    while stack:
                        x = stack.pop()
                        if x not in body:
                            body.add(x)
                            stack.extend(self.preds[x])
        return [Loop(h, frozenset(body)) for h, body in sorted(bodies.items())]

    def loop_instrs(self, loop: Loop) -> list[Instr]:
        return [i for b in sorted(loop.blocks) for i in self.block_instrs(b)]

    def main_loop(self) -> Loop | None:
        """The innermost loop loading the most bits from global memory (then the one with
        the most instructions), or ``None``."""
        best, best_key = None, (0, 0)
        for lp in self.loops:
            if any(o.blocks < lp.blocks for o in self.loops):
                continue
            ins = self.loop_instrs(lp)
            key = (sum(width_bits(i.opcode) for i in ins if i.base in GLOBAL_LOADS), len(ins))
            if key[0] and key > best_key:
                best, best_key = lp, key
        return best

    # ---------------------------------------------------------------------------- paths
    def iteration_path(self, loop: Loop) -> list[Instr]:
        """The longest path through one iteration of ``loop``, from its head."""
        return self._longest(set(loop.blocks), loop.head, loop.head, enter_loops=True)

    def kernel_path(self, enter_loops: bool) -> list[Instr]:
        """The longest path from the entry; inner loops skipped, or each run once."""
        return self._longest(set(self.order), 0, None, enter_loops)

    def _longest(self, nodes: set, entry: int, head: int | None, enter_loops: bool) -> list[Instr]:
        """Longest path from ``entry`` within ``nodes``; edges back to ``head`` end it, loops
        inside ``nodes`` (other than ``head``'s) are single steps to their exits."""
        inner = [lp for lp in self.loops if lp.head != head and lp.blocks <= nodes]
        top = [lp for lp in inner if not any(lp.blocks < o.blocks for o in inner)]
        owner = {b: lp for lp in top for b in lp.blocks}

        def step(b: int) -> int:
            return owner[b].head if b in owner else b

        def succs(r: int) -> list[int]:
            sources = owner[r].blocks if r in owner else [r]
            out = {step(s) for b in sources for s in self.succ[b]
                   if s in nodes and s != head and not (r in owner and s in owner[r].blocks)}
            return sorted(out)

        weights: dict[int, list[Instr]] = {}

        def weight(r: int) -> list[Instr]:
            if r not in weights:
                if r not in owner:
                    weights[r] = self.block_instrs(r)
                else:
                    weights[r] = self.iteration_path(owner[r]) if enter_loops else []
            return weights[r]

        best: dict[int, tuple[int, int | None]] = {}
        for r in self._postorder(step(entry), succs):
            options = [(best[s][0], s) for s in succs(r) if s in best]
            length, nxt = max(options, default=(0, None))
            best[r] = (length + len(weight(r)), nxt)
        path, r = [], step(entry)
        while r is not None:
            path += weight(r)
            r = best[r][1]
        return path

    @staticmethod
    def _postorder(root: int, succs) -> list[int]:
        """Nodes reachable from ``root``, each after its successors (an edge closing a cycle,
        which only an irreducible graph has, is ignored)."""
        seen, post, stack = {root}, [], [(root, iter(succs(root)))]
        while stack:
            r, it = stack[-1]
            nxt = next((s for s in it if s not in seen), None)
            if nxt is None:
                post.append(r)
                stack.pop()
            else:
                seen.add(nxt)
                stack.append((nxt, iter(succs(nxt))))
        return post
