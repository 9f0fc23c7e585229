"""The AOT check's cases and how one compiles: the matrix (kernel x config x arch x dtype x head
dims x variant: :class:`Case`, :data:`VARIANTS`, :func:`matrix`), each kernel's ``ASTSource``
signature (:func:`aot_spec`), and compiling cases in clean spawned workers into rows
(:func:`compile_cases`: registers, stack, shared memory, ptxas spills, atomics and the steady-state
loop's MMA work, read with :mod:`.sass`). Shared by ``python -m distattn.kernels.aot`` (the whole
matrix: :mod:`.aot`) and ``python -m distattn.kernels.sass`` (one case's SASS: :mod:`.sass_cli`).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Iterator, TextIO

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from .. import triton_attn
from ..triton_attn import KERNELS
from ..triton_plan import SHARED_LIMIT, all_configs, block_dim, keep_config
from .sass import CLASSES, atomics, disassemble, full_tile_loop, loops, mma_macs, ptx_atomics

ARCHS = {80: "sm_80", 90: "sm_90a"}  # Triton compiles capability 90 for sm_90a (wgmma, TMA)
DTYPES = {"bf16": 2, "fp16": 2, "fp32": 4}  # element bytes
HEAD_DIMS = ((64, 64), (128, 128), (192, 128), (256, 256))  # (Q/K's, V's); 192/128 is MLA (DeepSeek-V2/V3)
MAX_HEAD_DIM = 256  # what the triton backend takes

VARIANTS = {  # constexprs of each variant the AOT check compiles: every (HAS_LO, HAS_HI, SOFTCAP), GQA, ROW64
    "full": dict(HAS_LO=False, HAS_HI=False, SOFTCAP=False, GROUP=1, ROW64=False),
    "causal": dict(HAS_LO=False, HAS_HI=True, SOFTCAP=False, GROUP=1, ROW64=False),
    "lo_only": dict(HAS_LO=True, HAS_HI=False, SOFTCAP=False, GROUP=1, ROW64=False),
    "band": dict(HAS_LO=True, HAS_HI=True, SOFTCAP=False, GROUP=1, ROW64=False),
    "gqa": dict(HAS_LO=False, HAS_HI=True, SOFTCAP=False, GROUP=4, ROW64=False),
    "full_softcap": dict(HAS_LO=False, HAS_HI=False, SOFTCAP=True, GROUP=1, ROW64=False),
    "softcap": dict(HAS_LO=False, HAS_HI=True, SOFTCAP=True, GROUP=1, ROW64=False),
    "lo_only_softcap": dict(HAS_LO=True, HAS_HI=False, SOFTCAP=True, GROUP=1, ROW64=False),
    "band_softcap": dict(HAS_LO=True, HAS_HI=True, SOFTCAP=True, GROUP=4, ROW64=False),
    "causal_row64": dict(HAS_LO=False, HAS_HI=True, SOFTCAP=False, GROUP=1, ROW64=True),  # a segment past 2^31
    # fp32 outputs from 16-bit inputs: the partial results executors merge or sum (varlen_fwd(partial=True))
    "causal_partial": dict(HAS_LO=False, HAS_HI=True, SOFTCAP=False, GROUP=1, ROW64=False),
    "band_softcap_partial": dict(HAS_LO=True, HAS_HI=True, SOFTCAP=True, GROUP=4, ROW64=False),
}
OUTPUTS = frozenset({"O", "DQ", "DK", "DV"})  # the pointers a ``*_partial`` variant stores fp32 through

# LSE/DELTA are [T, H] fp32: their strides (H and 1) need not be multiples of 16.
SMALL_STRIDES = frozenset({"stride_lt", "stride_lh", "stride_dt", "stride_dh"})


def aot_spec(kernel: str, dtype: str, head_dim: int, variant: str, head_dim_v: int | None = None):
    """``(jit function, signature, constexprs without BLOCK_M/BLOCK_N)`` of one kernel for Triton's
    ``ASTSource``; ``dtype`` is ``"bf16" | "fp16" | "fp32"``, ``head_dim`` Q/K's head dim and
    ``head_dim_v`` V's (default: the same). Pointer and stride arguments are the ones contiguous
    ``[T, H, D]`` tensors, or K and V views into one packed ``[T, H, Dqk + Dv]`` buffer, give
    (divisible by 16 where the launcher sees it). A ``*_partial`` variant's outputs are fp32."""
    fn = KERNELS[kernel].fn
    floats = {"qk_mult", "cap_in"}
    fp32_ptrs = {"LSE", "DELTA"} | (OUTPUTS if variant.endswith("_partial") else set())
    int_ptrs = {"CU_Q", "CU_K", "LO", "HI", "TILES"}
    head_dim_v = head_dim if head_dim_v is None else head_dim_v
    constexprs = dict(HEAD_DIM=head_dim, BLOCK_D=block_dim(head_dim), HEAD_DIM_V=head_dim_v,
                      BLOCK_DV=block_dim(head_dim_v), PRECISION="ieee" if dtype == "fp32" else "tf32",
                      **VARIANTS[variant])
    signature = {}
    for name in fn.arg_names:
        if name in constexprs or name in ("BLOCK_M", "BLOCK_N"):
            signature[name] = "constexpr"
        elif name in fp32_ptrs:
            signature[name] = "*fp32"
        elif name in int_ptrs:
            signature[name] = "*i32"
        elif name in floats:
            signature[name] = "fp32"
        elif name.startswith("stride"):
            signature[name] = "i32"
        else:
            signature[name] = "*" + dtype
    return fn, signature, constexprs


@dataclass(frozen=True)
class Case:
    kernel: str
    config: tuple[int, int, int, int]  # (BLOCK_M, BLOCK_N, num_warps, num_stages)
    arch: int
    dtype: str
    head_dim: int  # Q/K's
    variant: str
    kept: bool  # whether the runtime autotuner tries this config there
    head_dim_v: int | None = None  # V's; None means head_dim (and is stored as it)

    def __post_init__(self):
        if self.head_dim_v is None:
            object.__setattr__(self, "head_dim_v", self.head_dim)

    @property
    def dims_name(self) -> str:
        return dims_name(self.head_dim, self.head_dim_v)

    @property
    def config_name(self) -> str:
        m, n, w, s = self.config
        return f"{m}x{n} w{w} s{s}"

    @property
    def label(self) -> str:
        return f"{self.kernel} {self.config_name} {ARCHS[self.arch]} {self.dtype} d{self.dims_name} {self.variant}"

    def row(self, status: str, **fields) -> dict:
        base = dict(kernel=self.kernel, config=self.config_name, arch=ARCHS[self.arch], dtype=self.dtype,
                    head_dim=self.head_dim, head_dim_v=self.head_dim_v, variant=self.variant, status=status,
                    registers=None, stack=None, shared=None, shared_dynamic=None, shared_static=None, seconds=None,
                    over_limit=False, atomics=None, spill_bytes=None, loop_mma=None, loop_macs=None,
                    tile_macs=tile_macs(self.kernel, self.config, self.head_dim, self.head_dim_v))
        return {**base, **fields}


def dims_name(head_dim: int, head_dim_v: int) -> str:
    """``"128"``, or ``"192/128"`` where V's head dim differs from Q/K's."""
    return str(head_dim) if head_dim == head_dim_v else f"{head_dim}/{head_dim_v}"


def matrix(kernels: list[str], archs: list[int], dtypes: list[str], head_dims: list, variants: list[str]
           ) -> list[Case]:
    """Every case, in table order; a kernel's configs are all those its autotuner lists. ``head_dims``:
    ``(Q/K's, V's)`` pairs, or ints meaning both."""
    pairs = [(h, h) if isinstance(h, int) else tuple(h) for h in head_dims]
    return [Case(k, tuple(c), a, d, h, v, keep_config(k, tuple(c), h, DTYPES[d], a, hv, VARIANTS[v]["ROW64"]), hv)
            for k in kernels for c in all_configs(k) for a in archs for d in dtypes
            for h, hv in pairs for v in variants]


def divisibility_attrs(fn, signature: dict[str, str]) -> dict[tuple[int], list[list]]:
    """``ASTSource`` attrs marking what the launcher specializes as divisible by 16: every pointer
    and every stride but LSE/DELTA's. Triton 3.9 keys them by argument path (a 1-tuple of the
    position among all parameters, constexprs included); ``BaseBackend.parse_attr`` turns the
    launcher's ``"D"`` into this same ``[["tt.divisibility", 16]]``."""
    return {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
            if signature[name].startswith("*") or (name.startswith("stride_") and name not in SMALL_STRIDES)}


def parse_resource_usage(text: str) -> dict[str, dict[str, int]]:
    """``cuobjdump --dump-resource-usage`` output -> {function: {"REG": .., "STACK": .., "SHARED": ..}}."""
    usage, name = {}, None
    for line in text.splitlines():
        if match := re.match(r"\s*Function\s+(\S+?):?\s*$", line):
            name = match.group(1)
        elif name is not None and "REG:" in line:
            usage[name] = {k: int(v) for k, v in re.findall(r"([A-Z_]+(?:\[\d+\])?):(\d+)", line)}
            name = None
    return usage


def resource_usage(cubin: Path) -> dict[str, dict[str, int]]:
    tool = triton.knobs.nvidia.cuobjdump.path  # the wheel's own (no TRITON_* overrides here)
    out = subprocess.run([tool, "--dump-resource-usage", str(cubin)], capture_output=True, text=True, check=True)
    return parse_resource_usage(out.stdout)


def tile_macs(kernel: str, config: tuple, head_dim: int, head_dim_v: int) -> int:
    """Multiply-adds of one steady-state block of a kernel's loop: a ``BLOCK_M x BLOCK_N`` tile times
    the dots' inner widths (head dims padded to ``block_dim``). The forward's two dots (S = QK^T,
    O += PV) are ``D + Dv``; dK/dV recompute S and dP and add dV and dK: ``2 (D + Dv)``, twice the
    forward's; dQ recomputes S and dP and adds dQ: ``2 D + Dv``."""
    block_m, block_n = config[:2]
    d, dv = block_dim(head_dim), block_dim(head_dim_v)
    return block_m * block_n * {"fwd": d + dv, "bwd_dkv": 2 * (d + dv), "bwd_dq": 2 * d + dv}[kernel]


def spill_bytes(ptxas_log: str) -> int | None:
    """Bytes of spill stores plus spill loads in ``ptxas -v``'s report (every function of the cubin);
    None when there is no report (no ``Used N registers`` line: Triton printed nothing)."""
    if not re.search(r"Used \d+ registers", ptxas_log):
        return None
    return sum(int(stores) + int(loads) for stores, loads in
               re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", ptxas_log))


def compile_case(case: Case, keep_cubin: bool = False) -> dict:
    """Compile one case in this process (whose environment must hold no TRITON_* overrides: use
    :func:`compile_cases`) and return its row; ``keep_cubin`` adds the cubin bytes as ``"cubin"``.
    The row's ``atomics`` lists the atomic instructions of its SASS and PTX (none expected)."""
    fn, signature, constexprs = aot_spec(case.kernel, case.dtype, case.head_dim, case.variant, case.head_dim_v)
    block_m, block_n, warps, stages = case.config
    status = "ok" if case.kept else "pruned-compiled"
    with tempfile.TemporaryDirectory(prefix="distattn-aot-") as tmp:
        os.environ["TRITON_CACHE_DIR"] = tmp  # a fresh cache: every case really compiles
        start = time.perf_counter()
        try:
            source = ASTSource(fn, signature, dict(constexprs, BLOCK_M=block_m, BLOCK_N=block_n),
                               divisibility_attrs(fn, signature))
            ptxas_log = io.StringIO()  # Triton prints ptxas's -v report (registers, spills) when asked
            with triton.knobs.nvidia.scope(), contextlib.redirect_stdout(ptxas_log):
                triton.knobs.nvidia.dump_ptxas_log = True
                kernel = triton.compile(source, target=GPUTarget("cuda", case.arch, 32),
                                        options=dict(num_warps=warps, num_stages=stages, enable_fp_fusion=True))
            seconds = time.perf_counter() - start
            Path(tmp, "kernel.cubin").write_bytes(kernel.asm["cubin"])
            usage = resource_usage(Path(tmp, "kernel.cubin"))[kernel.metadata.name]
            sass = disassemble(kernel.asm["cubin"])
            found = atomics(sass) + ptx_atomics(kernel.asm["ptx"])
            steady = full_tile_loop(loops(sass))
        except Exception as exc:  # noqa: BLE001 - a failed compile is a row, not a crash
            message = " ".join(f"{type(exc).__name__}: {exc}".split())
            return case.row("error" if case.kept else "pruned-error", error=message[-1500:],
                            seconds=round(time.perf_counter() - start, 2))
    # Triton's buffers are *dynamic* shared memory (metadata.shared, the launch's smem argument);
    # cuobjdump's SHARED is the *static* part ptxas adds on its own (1 KiB with wgmma on sm_90a).
    # A block needs both: Triton's launcher opts into `optin - static` dynamic bytes, so the
    # launch requirement checked against the limit is their sum (>= either figure).
    dynamic, static = int(kernel.metadata.shared), usage.get("SHARED", 0)
    row = case.row(status, registers=usage.get("REG"), stack=usage.get("STACK"), shared=dynamic + static,
                   shared_dynamic=dynamic, shared_static=static, seconds=round(seconds, 2),
                   over_limit=dynamic + static > SHARED_LIMIT[case.arch], atomics=sorted(set(found)),
                   spill_bytes=spill_bytes(ptxas_log.getvalue()),
                   loop_mma=None if steady is None else sorted({i.opcode for i in steady.instructions
                                                                if i.opcode.split(".")[0] in CLASSES["mma"]}),
                   loop_macs=None if steady is None else mma_macs(steady, warps))
    return {**row, "cubin": kernel.asm["cubin"]} if keep_cubin else row


def _check_worker() -> None:
    """Pool initializer: the kernels module must have been imported without the interpreter."""
    if triton_attn.INTERPRET or os.environ.get("TRITON_INTERPRET"):
        raise RuntimeError("an AOT worker imported the kernels under TRITON_INTERPRET")


@contextlib.contextmanager
def _without_triton_env() -> Iterator[None]:
    """Drop TRITON_* from this process's environment while the pool's workers are spawned: a
    spawned worker re-imports the main module (and with it triton_attn, which reads
    TRITON_INTERPRET) before any initializer runs, so the parent's environment must be clean."""
    saved = {key: os.environ.pop(key) for key in list(os.environ) if key.startswith("TRITON_")}
    try:
        yield
    finally:
        os.environ.update(saved)


def compile_cases(cases: list[Case], jobs: int | None = None, compile_pruned: bool = False,
                  keep_cubin: bool = False, log: TextIO | None = sys.stderr) -> list[dict]:
    """Rows of ``cases`` in order, compiling kept cases (and pruned ones with ``compile_pruned``)
    on ``jobs`` spawned workers; progress lines go to ``log``."""
    todo = [c for c in cases if c.kept or compile_pruned]
    todo.sort(key=lambda c: (-c.head_dim, c.kernel == "fwd", c.dtype == "fp32"))  # the slowest first
    done: dict[Case, dict] = {}
    start, step = time.perf_counter(), max(1, min(25, len(todo) // 50))
    with _without_triton_env(), ProcessPoolExecutor(max_workers=jobs or os.cpu_count(), mp_context=get_context("spawn"),
                                                    initializer=_check_worker) as pool:
        futures = {pool.submit(compile_case, case, keep_cubin): case for case in todo}
        for i, future in enumerate(as_completed(futures), 1):
            case = futures[future]
            try:
                done[case] = future.result()
            except Exception as exc:  # noqa: BLE001 - a crashed worker (BrokenProcessPool)
                done[case] = case.row("error" if case.kept else "pruned-error", error=f"{type(exc).__name__}: {exc}")
            if log is not None and (i % step == 0 or i == len(todo) or done[case]["status"].endswith("error")):
                print(f"[{i}/{len(todo)}] {time.perf_counter() - start:.0f}s {case.label}: {done[case]['status']}",
                      file=log, flush=True)
    return [done.get(case) or case.row("pruned") for case in cases]

