"""The command ``python -m distattn.kernels.sass``: compile one case of the AOT matrix (or read any
cubin) and list its SASS loops, innermost first, with what each body does and which is the
steady-state key tile (:mod:`.sass` reads the code, :mod:`.cases` compiles it).

Usage::

    python -m distattn.kernels.sass --kernel fwd --config 128,64,8,3 --dtype bf16 --head-dim 128 \\
        --variant causal --arch 90
    python -m distattn.kernels.sass --kernel bwd_dkv --config 32,128,4,3 --head-dim 192 --head-dim-v 128
    python -m distattn.kernels.sass --cubin kernel.cubin          # any cubin, e.g. another kernel's
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..triton_plan import keep_config
from . import sass
from .cases import DTYPES, VARIANTS, Case, compile_cases
from .sass import atomics, disassemble, full_tile_loop, instructions, loops


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m distattn.kernels.sass", description=sass.__doc__.split("\n\n")[0])
    parser.add_argument("--kernel", default="fwd")
    parser.add_argument("--config", default="128,64,8,3", help="BLOCK_M,BLOCK_N,num_warps,num_stages")
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--head-dim", type=int, default=128, help="Q/K's head dim")
    parser.add_argument("--head-dim-v", type=int, default=None, help="V's head dim (default: --head-dim)")
    parser.add_argument("--variant", default="causal")
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--cubin", type=Path, help="read this cubin instead of compiling a case")
    parser.add_argument("--dump", type=Path, help="also write the SASS text here")
    args = parser.parse_args(argv)
    if args.cubin is not None:
        cubin, title = args.cubin.read_bytes(), str(args.cubin)
    else:
        config = tuple(int(v) for v in args.config.split(","))
        case = Case(args.kernel, config, args.arch, args.dtype, args.head_dim, args.variant,
                    keep_config(args.kernel, config, args.head_dim, DTYPES[args.dtype], args.arch, args.head_dim_v,
                                VARIANTS[args.variant]["ROW64"]), args.head_dim_v)
        row = compile_cases([case], jobs=1, compile_pruned=True, keep_cubin=True, log=None)[0]
        if "cubin" not in row:
            print(f"{case.label}: {row['status']}: {row.get('error')}", file=sys.stderr)
            return 1
        cubin = row["cubin"]
        title = (f"{case.label}{'' if case.kept else ' (pruned there)'}: {row['registers']} registers, "
                 f"{row['stack']} B stack, {row['shared']} B shared")
    text = disassemble(cubin)
    if args.dump is not None:
        args.dump.write_text(text)
    found = loops(text)
    full = full_tile_loop(found)
    print(f"{title}: {len(instructions(text))} instructions, {len(found)} loops (innermost first), atomics: "
          f"{', '.join(atomics(text)) or 'none'}")
    for loop in found:
        print(loop.describe() + ("  <- steady state (MMA, fewest mask selects)" if loop is full else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
