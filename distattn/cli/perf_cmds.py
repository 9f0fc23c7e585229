"""``distattn bench``: measure every scheduler on this machine."""

from __future__ import annotations

from pathlib import Path

from ..schedulers import NAMES
from ._args import DOCLENS_HELP, doc_pool, doclens_argument, examples, output_dir, positive_int, positive_int_list


def _cmd_bench(args) -> int:
    from ..bench.suite import BenchConfig, run_bench

    pool = doc_pool(args.doclens)
    kw = dict(doc_pool=None if pool is None else tuple(int(x) for x in pool))
    if args.peers is not None:   # else the suite's: DeepSpeed's row in the full bench, not in --quick
        kw["peers"] = args.peers
    for name in ("world_sizes", "seq_lens", "masks", "schedulers", "repeats"):
        if getattr(args, name) is not None:
            kw[name] = tuple(getattr(args, name)) if name != "repeats" else args.repeats
    cfg = BenchConfig.quick(**kw) if args.quick else BenchConfig(**kw)
    cfg.check()   # an unknown mask is refused before the header says what will run
    print(f"distattn bench{' --quick' if args.quick else ''}: world sizes {list(cfg.world_sizes)}, lengths "
          f"{list(cfg.seq_lens)}, masks {list(cfg.masks)}, {cfg.heads}/{cfg.kv_heads} heads x {cfg.head_dim}, "
          f"{cfg.dtype}, warm-up {cfg.warmup} + median of {cfg.repeats}", flush=True)
    rows = run_bench(cfg, args.out)
    print("\n" + results_table(rows))
    print(f"results: {Path(args.out) / 'results.csv'}, results.json, *.png, tb/")
    return 0


def results_table(rows: list[dict]) -> str:
    """The runs as an aligned text table: the name columns as wide as their longest entry."""
    name_w = max([len("scheduler")] + [len(str(r["scheduler"])) for r in rows])
    mask_w = max([len("mask")] + [len(str(r["mask"])) for r in rows])
    lines = [f"{'scheduler':<{name_w}} {'world':>5} {'seq':>7} {'mask':<{mask_w}} {'fwd+bwd ms':>10} {'GFLOP/s':>8} "
             f"{'imb':>5} {'send MB':>8} {'peak MB':>8}"]
    for r in rows:
        lines.append(f"{r['scheduler']:<{name_w}} {r['world_size']:>5} {r['seq_len']:>7} {r['mask']:<{mask_w}} "
                     f"{r['fwd_bwd_ms']:>10.1f} {r['tflops'] * 1e3:>8.1f} {r['flops_imbalance']:>5.2f} "
                     f"{r['send_bytes'] / 2**20:>8.1f} {r['peak_mem_mb']:>8.0f}")
    return "\n".join(lines)


def add_parsers(sub) -> None:
    _add_bench(sub)


def _add_bench(sub) -> None:
    bench = sub.add_parser(
        "bench", help="real fwd+bwd runs of every scheduler -> results.csv/json, PNG plots, TensorBoard",
        description="Time forward+backward of every scheduler (and DeepSpeed's DistributedAttention) on local "
                    "gloo ranks across masks, lengths and world sizes; write results.csv/json, plots and "
                    "TensorBoard scalars.",
        epilog=examples(".venv/bin/distattn bench --quick --out bench/quick",
                        ".venv/bin/distattn bench --out bench/doc --world-sizes 2,4,8 --seq-lens 8192,16384 "
                        "--masks causal-doc --doclens sample"))
    bench.add_argument("--quick", action="store_true", help="world sizes 2 and 4, 2K/4K tokens, masks causal, "
                       "causal-doc, window, prefix-lm, causal-blockwise, without DeepSpeed's row "
                       "(a few minutes on CPU)")
    bench.add_argument("--out", required=True, type=output_dir,
                       help="folder for results.csv, results.json, *.png, tb/")
    bench.add_argument("--world-sizes", type=positive_int_list, default=None,
                       help="comma-separated (default: the suite's)")
    bench.add_argument("--seq-lens", type=positive_int_list, default=None,
                       help="comma-separated tokens (default: the suite's)")
    bench.add_argument("--masks", nargs="+", default=None,
                       help="any of causal, full, causal-doc, full-doc, window, shared-question, prefix-lm, "
                       "causal-blockwise (default: all)")
    bench.add_argument("--schedulers", nargs="+", default=None, choices=NAMES, help="default: all")
    bench.add_argument("--repeats", type=positive_int, default=None, help="timed rounds, the median kept "
                       "(default: the suite's)")
    bench.add_argument("--doclens", type=doclens_argument, default=None, metavar="NAME_OR_PATH",
                       help="for the -doc masks: " + DOCLENS_HELP)
    peers = bench.add_mutually_exclusive_group()
    peers.add_argument("--peers", dest="peers", action="store_true", default=None,
                       help="run DeepSpeed's DistributedAttention too (the default, except with --quick: on CPU its "
                       "first run compiles a C++ op for about 3 minutes, once)")
    peers.add_argument("--no-peers", dest="peers", action="store_false", default=None,
                       help="skip DeepSpeed's DistributedAttention")
    bench.set_defaults(func=_cmd_bench)
