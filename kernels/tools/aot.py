"""Compile every Triton kernel of the ``triton`` backend for real NVIDIA GPUs, without a GPU.

Each case (kernel x config of ``all_configs``: ``CONFIGS``, the fallback and the fp32 config; x
arch x dtype x head dims x variant of :data:`VARIANTS`: every combination of the band's
``HAS_LO``/``HAS_HI`` and ``SOFTCAP`` a call can take, and GQA) goes through Triton's
ahead-of-time path, ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``, with
the divisibility the runtime launcher would specialize on, in a spawned worker whose environment
has no ``TRITON_*`` overrides and a fresh cache. The wheel's ``cuobjdump`` then reads registers,
stack and shared memory from the cubin, and its SASS (and the PTX) are searched for atomic
instructions (``ATOM``/``RED``, ``atom.``/``red.``: see :func:`.sass.atomics`): the backward is
deterministic because dK/dV take one program per key tile and no kernel uses any. Configs the
autotuner prunes on a target (``keep_config``) are never launched: they are listed as ``pruned``
and only compiled with ``--all`` (then never a failure).

Each row also says how well the compiled code uses the machine: ``spill_bytes``, ptxas's own report
of spill stores plus loads (``ptxas -v``, which Triton prints when asked), and the matrix work of
the steady-state loop (:func:`.sass.full_tile_loop`): ``loop_macs``, the multiply-adds its MMA
instructions do per program and pass (``HGMMA`` per warpgroup on sm_90a, ``HMMA`` per warp), against
``tile_macs``, what the tile's dots need (:func:`.cases.tile_macs`: the backward's dK/dV loop twice the
forward's per tile, dQ's 1.5 times). Equal means no dot is computed twice by two warps, and on sm_90a
``loop_mma`` lists only ``HGMMA`` (wgmma) instructions.

Head dims are Q/K's and V's: ``192/128`` names the pair (MLA), a single number both. The default
matrix has 64, 128, 192/128 and 256.

Usage::

    python -m distattn.kernels.aot                     # the whole matrix, one table row per case
    python -m distattn.kernels.aot --json --jobs 8     # {"rows": [...], "summary": {...}}
    python -m distattn.kernels.aot --kernels fwd --arch 90 --dtypes bf16 --head-dims 128 \\
        --variants causal,band_softcap
    python -m distattn.kernels.aot --head-dims 192/128,128 --arch 80,90   # MLA beside 128
    python -m distattn.kernels.aot --all               # compile the pruned configs too

Exit status 1 when a kept config fails to compile or needs more shared memory per block than its
target has, or when any compiled kernel has an atomic instruction; 0 otherwise. Progress goes to
stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from ..triton_attn import KERNELS
from .cases import ARCHS, DTYPES, HEAD_DIMS, MAX_HEAD_DIM, VARIANTS, compile_cases, dims_name, matrix


def _name(row: dict) -> str:  # as Case.label
    dims = dims_name(row["head_dim"], row["head_dim_v"])
    return f"{row['kernel']} {row['config']} {row['arch']} {row['dtype']} d{dims} {row['variant']}"


def summarize(rows: list[dict], wall_seconds: float) -> dict:
    """Compiles, failures (kept cases), kept cases over the shared limit, compiled cases with atomic
    instructions (``atomics``: "case: opcodes"), kept cases that spill registers (``spilled``: ptxas's
    spill stores + loads) or whose steady-state loop's MMAs differ from their tile's dots
    (``mma_mismatch``), worst stack, times."""
    compiled = [r for r in rows if r["registers"] is not None]
    kept = [r for r in compiled if r["status"] == "ok"]
    worst = max(kept, key=lambda r: r["stack"], default=None)
    return dict(cases=len(rows), compiles=sum(r["status"] != "pruned" for r in rows),
                failures=sum(r["status"] == "error" for r in rows),
                failed=[_name(r) for r in rows if r["status"] == "error"],
                pruned=sum(r["status"].startswith("pruned") for r in rows),
                over_limit=[_name(r) for r in kept if r["over_limit"]],
                pruned_over_limit=sum(r["over_limit"] for r in compiled if r["status"] != "ok"),
                atomics=[f"{_name(r)}: {' '.join(r['atomics'])}" for r in compiled if r["atomics"]],
                spilled=[f"{_name(r)}: {r['spill_bytes']} B" for r in kept if r["spill_bytes"]],
                # 16-bit kernels whose steady-state loop does other matrix work than its tile's dots
                # (fp32 "ieee" dots run without tensor cores: no MMA to count)
                mma_mismatch=[f"{_name(r)}: {r['loop_macs']} vs {r['tile_macs']}" for r in kept
                              if r["dtype"] != "fp32" and r["loop_macs"] != r["tile_macs"]],
                worst_stack=worst["stack"] if worst else None, worst_stack_case=_name(worst) if worst else None,
                max_shared={arch: max((r["shared"] for r in kept if r["arch"] == arch), default=None)
                            for arch in sorted({r["arch"] for r in kept})},
                compile_seconds=round(sum(r["seconds"] or 0 for r in rows), 1), wall_seconds=round(wall_seconds, 1))


def format_table(rows: list[dict]) -> str:
    columns = ("kernel", "config", "arch", "dtype", "head_dim", "head_dim_v", "variant", "status", "registers",
               "stack", "spill_bytes", "shared", "loop_macs", "tile_macs", "atomics", "seconds")

    def show(row: dict, column: str) -> str:
        value = row[column]
        if value is None:
            return "-"
        if column == "atomics":  # the opcodes found, "0" for none
            return " ".join(value) or "0"
        return str(value) + ("!" if column == "shared" and row["over_limit"] else "")

    cells = [[show(r, c) for c in columns] for r in rows]
    widths = [max(len(c), *(len(line[i]) for line in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(line, widths)) for line in cells]
    lines += [f"error {_name(r)}: {r['error']}" for r in rows if r.get("error")]
    return "\n".join(lines)


def _list(kind, choices):
    def parse(text: str) -> list:
        values = [kind(v) for v in text.split(",") if v]
        if bad := [v for v in values if v not in choices]:
            raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {list(choices)}")
        return values
    return parse


def _head_dims(text: str) -> list[tuple[int, int]]:
    """``"64,192/128"`` -> ``[(64, 64), (192, 128)]``: a pair is (Q/K's, V's) head dim, a number both."""
    pairs = []
    for item in (v for v in text.split(",") if v):
        try:
            dims = [int(d) for d in item.split("/")]
        except ValueError:
            dims = []
        if len(dims) not in (1, 2) or not all(1 <= d <= MAX_HEAD_DIM for d in dims):
            raise argparse.ArgumentTypeError(f"head dims {item!r}: want D or DQK/DV, each in 1..{MAX_HEAD_DIM}")
        pairs.append((dims[0], dims[-1]))
    return pairs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m distattn.kernels.aot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=_list(int, ARCHS), default=list(ARCHS), help="e.g. 80,90")
    parser.add_argument("--dtypes", type=_list(str, DTYPES), default=list(DTYPES))
    parser.add_argument("--head-dims", type=_head_dims, default=list(HEAD_DIMS),
                        help="e.g. 64,192/128: Q/K's/V's head dim, one number for both")
    parser.add_argument("--kernels", type=_list(str, KERNELS), default=list(KERNELS))
    parser.add_argument("--variants", type=_list(str, VARIANTS), default=list(VARIANTS))
    parser.add_argument("--jobs", type=int, default=os.cpu_count(), help="parallel compiles (default: all cores)")
    parser.add_argument("--all", action="store_true", help="compile pruned configs too (never a failure)")
    parser.add_argument("--json", action="store_true", help='print {"rows": [...], "summary": {...}}')
    args = parser.parse_args(argv)
    start = time.perf_counter()
    cases = matrix(args.kernels, args.arch, args.dtypes, args.head_dims, args.variants)
    rows = compile_cases(cases, args.jobs, compile_pruned=args.all)
    summary = summarize(rows, time.perf_counter() - start)
    if args.json:
        print(json.dumps({"rows": rows, "summary": summary}, indent=1))
    else:
        print(format_table(rows))
        print(json.dumps(summary, indent=1))
    return 1 if summary["failures"] or summary["over_limit"] or summary["atomics"] else 0


if __name__ == "__main__":
    sys.exit(main())
