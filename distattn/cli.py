"""The ``distattn`` command line. Each subcommand is added when it works."""

from __future__ import annotations

import argparse
import json
import sys


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None


def _cmd_demo(args) -> int:
    from .demo import run_demo

    doc_info = f"docs {args.doc_lens}" if args.doc_lens else f"synthetic documents, {args.seq_len} tokens"
    print(f"distattn demo: {args.world_size} gloo rank(s), {doc_info}, heads {args.heads}/{args.kv_heads} x "
          f"{args.head_dim}, {args.dtype}, causal={args.causal}, window={args.window}", flush=True)
    rows = run_demo(world_size=args.world_size, schedulers=args.schedulers, seq_len=args.seq_len,
                    doc_lens=args.doc_lens, heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim,
                    dtype=args.dtype, causal=args.causal, window=args.window, backend=args.backend,
                    repeats=args.repeats, seed=args.seed, ulysses_degree=args.ulysses_degree)
    if args.json:
        print(json.dumps({"rows": rows}))
        return 0
    print(f"{'scheduler':<10} {'fwd+bwd ms':>11} {'err out':>9} {'err dq':>9} {'err dk':>9} {'err dv':>9}")
    for r in rows:
        print(f"{r['scheduler']:<10} {r['ms']:>11.1f} {r['err_out']:>9.1e} {r['err_dq']:>9.1e} "
              f"{r['err_dk']:>9.1e} {r['err_dv']:>9.1e}")
    print("errors: max |x - x_ref|, x_ref = fp64 attention of the same (rounded) inputs on one device")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distattn", description="Exact context-parallel attention.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run every implemented scheduler on local gloo ranks vs fp64 reference")
    demo.add_argument("--world-size", type=int, default=4, help="number of gloo processes (default 4)")
    demo.add_argument("--schedulers", nargs="+", default=None, help="default: every one that runs at this size")
    demo.add_argument("--seq-len", type=int, default=4096, help="tokens of the packed sequence (default 4096)")
    demo.add_argument("--doc-lens", type=_int_list, default=None,
                      help="comma-separated document lengths (overrides --seq-len)")
    demo.add_argument("--heads", type=int, default=8)
    demo.add_argument("--kv-heads", type=int, default=2)
    demo.add_argument("--head-dim", type=int, default=64)
    demo.add_argument("--dtype", default="fp32", choices=["fp32", "fp64", "bf16", "fp16"])
    demo.add_argument("--causal", action=argparse.BooleanOptionalAction, default=True)
    demo.add_argument("--window", type=int, default=None, help="sliding window in tokens")
    demo.add_argument("--backend", default="auto")
    demo.add_argument("--repeats", type=int, default=3)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--ulysses-degree", type=int, default=None,
                      help="usp's Ulysses group size (default: largest divisor of the world size <= its sqrt)")
    demo.add_argument("--json", action="store_true", help="print the rows as JSON")
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as exc:
        print(f"distattn {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
