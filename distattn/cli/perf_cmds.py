"""``distattn bench``: measure schedulers here; ``distattn simulate --calibrate``: predict this machine's bench."""

from __future__ import annotations

from ..schedulers import NAMES
from ._args import doc_pool, examples, existing_file, output_dir, positive_int, positive_int_list
from .cluster_cmds import probe_rank


def _cmd_bench(args) -> int:
    from ..bench.suite import BenchConfig, run_bench

    pool = doc_pool(args.doclens)
    kw = dict(doc_pool=None if pool is None else tuple(int(x) for x in pool), peers=not args.no_peers)
    for name in ("world_sizes", "seq_lens", "masks", "schedulers", "repeats"):
        if getattr(args, name) is not None:
            kw[name] = tuple(getattr(args, name)) if name != "repeats" else args.repeats
    cfg = BenchConfig.quick(**kw) if args.quick else BenchConfig(**kw)
    cfg.check()   # an unknown mask is refused before the header says what will run
    print(f"distattn bench{' --quick' if args.quick else ''}: world sizes {list(cfg.world_sizes)}, lengths "
          f"{list(cfg.seq_lens)}, masks {list(cfg.masks)}, {cfg.heads}/{cfg.kv_heads} heads x {cfg.head_dim}, "
          f"{cfg.dtype}, warm-up {cfg.warmup} + median of {cfg.repeats}", flush=True)
    rows = run_bench(cfg, args.out)
    print(f"\n{'scheduler':<18} {'world':>5} {'seq':>6} {'mask':<10} {'fwd+bwd ms':>10} {'GFLOP/s':>8} {'imb':>5} "
          f"{'send MB':>8} {'peak MB':>8}")
    for r in rows:
        print(f"{r['scheduler']:<18} {r['world_size']:>5} {r['seq_len']:>6} {r['mask']:<10} {r['fwd_bwd_ms']:>10.1f} "
              f"{r['tflops'] * 1e3:>8.1f} {r['flops_imbalance']:>5.2f} {r['send_bytes'] / 2**20:>8.1f} "
              f"{r['peak_mem_mb']:>8.0f}")
    print(f"results: {args.out}/results.csv, results.json, *.png, tb/")
    return 0


def _network(path):
    from ..network import NetworkProfile, default_profile

    return NetworkProfile.load(path) if path else default_profile()


def _calibrate(args) -> int:
    from ..bench.results import read_results

    # the inputs are checked before torch is imported and before the probes
    benches = {}
    for flag, path in (("--calibrate", args.calibrate), ("--holdout", args.holdout)):
        if path is None:
            continue
        try:
            benches[flag] = [r for r in read_results(path) if r["world_size"] > 1]
        except ValueError as exc:
            raise ValueError(f"{flag} {exc}") from None
        if not benches[flag]:
            raise ValueError(f"{flag} {path}: no multi-rank rows; run `distattn bench` first")
    pool = doc_pool(args.doclens)
    from ..sim.calib_report import report, starting_point

    fit_rows, score_rows = benches["--calibrate"], benches.get("--holdout")
    # a saved model's constants and profile, or this machine's: gloo probed at every world size either bench ran
    worlds = sorted({r["world_size"] for r in fit_rows + (score_rows or [])})
    start, net = starting_point(args.load_model, args.network, args.cores, lambda: _probe_gloo(worlds))
    report(fit_rows, score_rows, net, start, pool, args.save_model)
    return 0


def _probe_gloo(worlds: list[int]):
    """gloo's collectives timed here at each of ``worlds`` ranks (``distattn cluster probe``'s sizes
    4 KiB-16 MiB), as one network profile."""
    from ..cluster import PROBED
    from ..network import NetworkProfile
    from ..spawn import run_distributed

    measured = []
    for w in worlds:
        print(f"probing gloo collectives on {w} ranks", flush=True)
        data = run_distributed(probe_rank, w, [2**k for k in range(12, 25, 2)], list(PROBED), 10, 2)[0]
        measured += NetworkProfile.from_json(data).rows
    return NetworkProfile(tuple(measured), source="gloo probe", backend="gloo", gpus_per_node=max(worlds))


def add_parsers(sub) -> None:
    _add_bench(sub)


def _add_bench(sub) -> None:
    bench = sub.add_parser(
        "bench", help="real fwd+bwd runs of every scheduler -> results.csv/json, PNG plots, TensorBoard",
        description="Time forward+backward of every scheduler (and DeepSpeed's DistributedAttention) on local "
                    "gloo ranks across masks, lengths and world sizes; write results.csv/json, plots and "
                    "TensorBoard scalars.",
        epilog=examples("distattn bench --quick --out bench/quick",
                        "distattn bench --out bench/doc --world-sizes 2,4,8 --seq-lens 8192,16384 "
                        "--masks causal-doc --doclens lengths.json"))
    bench.add_argument("--quick", action="store_true", help="world sizes 2 and 4, 2K/4K tokens, masks causal, "
                       "causal-doc, window, prefix-lm, causal-blockwise (a few minutes on CPU)")
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
    bench.add_argument("--doclens", type=existing_file, default=None,
                       help="JSON document-length sample for the -doc masks (default: log-normal stand-in)")
    bench.add_argument("--no-peers", action="store_true", help="skip DeepSpeed's DistributedAttention")
    bench.set_defaults(func=_cmd_bench)
