"""Read a kernel's machine code (SASS) without a GPU: disassemble a cubin, find its loops and count
what each loop body does (MMAs, loads, exp, FMA/FMUL/FADD, mask selects, ...), and list a kernel's
atomic instructions (:func:`atomics`, :func:`ptx_atomics`: the backward is deterministic only
without them; ``python -m distattn.kernels.aot`` checks every kernel).

A loop is closed by a backward branch (``BRA`` to an earlier address); its body is every
instruction from the target to the branch, inclusive. The forward kernel streams key blocks in loops
over masked and over *full* blocks; the full one has the MMAs and no mask selects (FSEL): its
instruction count is the cost of one steady-state key tile.

The command ``python -m distattn.kernels.sass`` (one case compiled, its loops listed) is
:mod:`.sass_cli`.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import triton

# Read-modify-writes of memory whose order between programs is up to the hardware: atomics and
# reductions to global or shared memory, and the TMA / bulk-copy reductions. Not REDUX, a warp's
# reduction in registers.
ATOMIC_OPCODES = frozenset({"ATOM", "ATOMG", "ATOMS", "RED", "REDG", "REDAS", "UTMAREDG", "UBLKRED"})
# Instruction classes counted per loop, by opcode (MUFU.EX2 by opcode and modifier).
CLASSES = {
    "mma": {"HMMA", "HGMMA", "IMMA", "DMMA", "QGMMA", "IGMMA"},
    "load": {"LDG", "LDGSTS", "LDS", "LDSM", "UTMALDG", "LD"},
    "store": {"STG", "STS", "ST", "STSM"},
    "local": {"LDL", "STL"},  # register spills
    "ffma": {"FFMA"}, "fmul": {"FMUL"}, "fadd": {"FADD"}, "fmnmx": {"FMNMX"},
    "select": {"FSEL"},  # float selects: where a mask is applied to scores / probabilities
    "int_select": {"SEL", "USEL"},  # e.g. the pipeline's stage index wrapping around
    "compare": {"FSETP", "ISETP", "PLOP3", "P2R", "R2P"},
    "convert": {"F2FP", "F2F", "I2F", "F2I"},
    "shuffle": {"SHFL"},
    "atomic": ATOMIC_OPCODES,
    "sync": {"BAR", "WARPGROUP", "DEPBAR", "LDGDEPBAR", "WARPSYNC", "ARRIVES", "SYNCS", "MEMBAR", "FENCE"},
}
_LINE = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
# The same in PTX: atom.*, red.*, cp.reduce.async.bulk* (not redux.sync, a warp reduction in registers)
_PTX_ATOMIC = re.compile(r"^\s*(?:@!?%\w+\s+)?((?:atom|red|cp\.reduce\.async\.bulk)\.[\w.:]*)", re.MULTILINE)


@dataclass
class Instruction:
    address: int
    opcode: str  # with modifiers, e.g. "MUFU.EX2", "HGMMA.64x64x16.F32.BF16"
    text: str


@dataclass
class Loop:
    start: int  # address of the branch target (first instruction of the body)
    end: int  # address of the backward branch
    instructions: list[Instruction] = field(default_factory=list)
    depth: int = 0  # how many other loops contain this one

    @property
    def size(self) -> int:
        return len(self.instructions)

    @property
    def counts(self) -> dict[str, int]:
        """Instructions per class (see ``CLASSES``), plus ``exp`` (MUFU.EX2) and ``other``."""
        counts = Counter()
        for ins in self.instructions:
            base = ins.opcode.split(".")[0]
            kind = next((k for k, ops in CLASSES.items() if base in ops), "other")
            if ins.opcode.startswith("MUFU.EX2"):
                kind = "exp"
            counts[kind] += 1
        return dict(counts)

    def describe(self) -> str:
        counts = self.counts
        parts = ", ".join(f"{k} {counts[k]}" for k in ("mma", "load", "exp", "ffma", "fmul", "fadd", "fmnmx",
                                                          "select", "int_select", "compare", "convert", "shuffle",
                                                          "store", "local", "sync", "atomic", "other")
                          if counts.get(k))
        return f"loop {self.start:#06x}-{self.end:#06x} depth {self.depth}: {self.size} instructions ({parts})"


def disassemble(cubin: bytes) -> str:
    """SASS text of a cubin, from the Triton wheel's ``cuobjdump -sass``."""
    with tempfile.TemporaryDirectory(prefix="distattn-sass-") as tmp:
        path = Path(tmp, "kernel.cubin")
        path.write_bytes(cubin)
        out = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "-sass", str(path)], capture_output=True,
                             text=True, check=True)
    return out.stdout


def instructions(sass: str) -> list[Instruction]:
    """The instructions of ``cuobjdump -sass`` text (one kernel), in address order."""
    found = []
    for line in sass.splitlines():
        if match := _LINE.match(line):
            text = match.group(2)
            op = re.sub(r"^@!?U?P[0-9T]+\s+", "", text).split()[0]
            found.append(Instruction(int(match.group(1), 16), op, text))
    return found


def atomics(sass: str) -> list[str]:
    """The atomic instructions of ``cuobjdump -sass`` text (opcodes with modifiers, e.g.
    ``RED.E.ADD.F32.FTZ.RN.STRONG.GPU``), in address order; see ``ATOMIC_OPCODES``."""
    return [ins.opcode for ins in instructions(sass) if ins.opcode.split(".")[0] in ATOMIC_OPCODES]


def ptx_atomics(ptx: str) -> list[str]:
    """The atomic instructions of PTX text (``atom.*``, ``red.*``, ``cp.reduce.async.bulk*``), in order."""
    return _PTX_ATOMIC.findall(ptx)


def _target(ins: Instruction, ops: tuple[str, ...] = ("BRA",)) -> int | None:
    found = re.findall(r"0x([0-9a-f]+)", ins.text) if ins.opcode.split(".")[0] in ops else []
    return int(found[-1], 16) if found else None


def _reachable(code: list[Instruction], blocked: int) -> set[int]:
    """Instruction indices reachable from the entry without passing through index ``blocked``."""
    index = {ins.address: i for i, ins in enumerate(code)}
    seen, todo = set(), [0]
    while todo:
        i = todo.pop()
        if i in seen or i == blocked or i >= len(code):
            continue
        seen.add(i)
        ins, base = code[i], code[i].opcode.split(".")[0]
        conditional = ins.text.startswith("@") or base == "CALL"  # ptxas also leaves loops by CALL.REL.NOINC
        if (target := _target(ins, ("BRA", "CALL"))) is not None and target in index:
            todo.append(index[target])
            if conditional:
                todo.append(i + 1)
        elif base not in ("EXIT", "RET", "KILL") or conditional:
            todo.append(i + 1)
    return seen


def loops(sass: str) -> list[Loop]:
    """Loops closed by backward branches, innermost first (then by address). A backward branch
    closes a loop when its target dominates it: that leaves out the jumps back from out-of-line
    blocks after the EXIT (mbarrier waits) to the instruction after their call site. Branches back
    to the same target make one loop ending at the last of them."""
    code = instructions(sass)
    index = {ins.address: i for i, ins in enumerate(code)}
    ends: dict[int, int] = {}
    for i, ins in enumerate(code):
        target = _target(ins)
        if target is None or target >= ins.address or target not in index:  # forward, or the `BRA self` trap
            continue
        if i not in _reachable(code, blocked=index[target]):  # every path to the branch passes the target
            ends[target] = max(ends.get(target, 0), ins.address)
    found = [Loop(s, e, [i for i in code if s <= i.address <= e]) for s, e in ends.items()]
    for loop in found:
        loop.depth = sum(o is not loop and o.start <= loop.start and loop.end <= o.end for o in found)
    return sorted(found, key=lambda loop: (-loop.depth, loop.start))


def full_tile_loop(found: list[Loop]) -> Loop | None:
    """The steady-state loop: one with MMAs and no mask selects (FSEL; the fewest, then the fewest
    instructions, if every MMA loop has some)."""
    with_mma = [loop for loop in found if loop.counts.get("mma")]
    return min(with_mma, key=lambda loop: (loop.counts.get("select", 0), loop.size), default=None)


_GMMA_SHAPE = re.compile(r"^[A-Z]*GMMA\.(\d+)x(\d+)x(\d+)")  # HGMMA.64x128x16.F32.BF16: m x n x k
_MMA_SHAPE = re.compile(r"^[A-Z]MMA\.(\d{2})(\d)(\d+)")  # HMMA.16816.F32.BF16: m16 n8 k16; HMMA.1688: k8


def mma_macs(loop: Loop, num_warps: int) -> int:
    """Multiply-adds one pass of ``loop`` does per program (CTA): a warpgroup-wide ``*GMMA`` (sm_90a
    wgmma, issued by each of a warpgroup's 4 warps) counts once per warpgroup, a warp-wide ``*MMA``
    (mma.sync) once per warp. Compared with a tile's dots (:func:`.cases.tile_macs`), it says whether
    the compiled loop does exactly the tile's matrix work, no more."""
    per_warpgroup = per_warp = 0
    for ins in loop.instructions:
        if match := _GMMA_SHAPE.match(ins.opcode):
            m, n, k = map(int, match.groups())
            per_warpgroup += m * n * k
        elif match := _MMA_SHAPE.match(ins.opcode):
            m, n, k = map(int, match.groups())
            per_warp += m * n * k
    return per_warpgroup * (num_warps // 4) + per_warp * num_warps
