"""``distattn cluster ...``: measure and describe the network (nccl-tests logs, probes, fits)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING

from ..cluster import PROBED
from ..costmodel.network_csv import network_argument, network_help
from ._args import (command_group, examples, existing_file, non_negative_int, output_dir, output_file,
                    positive_float, positive_int)

if TYPE_CHECKING:   # --help imports no numpy
    from ..costmodel.network import NetworkProfile


def _cmd_nccl_parse(args) -> int:
    from ..cluster.nccl import write_nccl_json

    write_nccl_json(args.file, sys.stdout)
    return 0


def _print_measurement(m) -> None:
    r = m.row()
    print(f"{r['op']:<15} {r['world_size']:>5} {r['size_bytes']:>12,} {r['time_us']:>12.1f} {r['algbw_gbs']:>9.3f} "
          f"{r['busbw_gbs']:>9.3f}", flush=True)


def print_fits(profile) -> None:
    print("\n".join(profile.describe_fits()))


def probe_rank(sizes, ops, iters, warmup):
    """One rank of a probe (module level: ``run_distributed`` pickles it by name)."""
    from ..cluster.probe import probe_profile

    return probe_profile(sizes, ops, iters, warmup, progress=_print_measurement).to_json()


def _save_profile(profile: NetworkProfile, out: str) -> int:
    """Write a measured profile to ``out`` and print its fits: the end of ``probe`` and ``nccl-tests`` alike."""
    profile.save(out)
    print_fits(profile)
    print(f"profile written to {out}")
    return 0


def _cmd_probe(args) -> int:
    from ..cluster.probe import parse_sizes
    from ..costmodel.network import NetworkProfile

    sizes = parse_sizes(args.sizes)
    header = f"{'op':<15} {'ranks':>5} {'size_bytes':>12} {'time_us':>12} {'algbw':>9} {'busbw':>9}"
    if "RANK" in os.environ:  # under torchrun/srun: measure this job's process group
        import torch
        import torch.distributed as dist

        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        try:
            if dist.get_rank() == 0:
                print(header, flush=True)
            data = probe_rank(sizes, args.ops, args.iters, args.warmup)
        finally:
            dist.destroy_process_group()
        if os.environ["RANK"] != "0":
            return 0
    else:
        from ..distributed.spawn import run_distributed

        if args.world_size < 2:
            raise ValueError(f"--world-size {args.world_size}: a probe needs at least 2 ranks (a collective on one "
                             "rank moves nothing)")
        print(f"distattn cluster probe: {args.world_size} local gloo ranks, {len(sizes)} sizes x {len(args.ops)} ops",
              flush=True)
        print(header, flush=True)
        data = run_distributed(probe_rank, args.world_size, sizes, args.ops, args.iters, args.warmup,
                               timeout=args.timeout)[0]
    profile = NetworkProfile.from_json(data)
    return _save_profile(profile, args.out)


def _cmd_nccl_tests(args) -> int:
    from ..cluster.nccl_tests import run_nccl_tests
    from ..cluster.probe import parse_sizes

    sizes = parse_sizes(args.sizes)
    profile = run_nccl_tests(args.bin_dir, args.gpus, min(sizes), max(sizes), ops=args.ops,
                             launcher=args.launcher, nodes=args.nodes, log_dir=args.log_dir,
                             progress=lambda line: print(line, flush=True))
    return _save_profile(profile, args.out)


def _cmd_profile_fit(args) -> int:
    from ..costmodel.network import profile_of

    profile = profile_of(args.file)
    print_fits(profile)
    if args.check:
        if not profile.strict:
            raise SystemExit("distattn cluster fit: error: --check scores a published (strict) profile's rule; "
                             f"{args.file} is not one (a folder of published CSVs, or the h100 profile)")
        print_check(profile.check())
    return 0


def _fit_on(text: str) -> tuple[str, str]:
    """``--fit-on KEY=VALUE``: the rows a fit sees (``cp=1``: whole documents)."""
    key, _, value = text.partition("=")
    if key not in ("L", "cp", "tp", "direction", "backend") or not value:
        raise argparse.ArgumentTypeError(f"--fit-on {text!r}: give KEY=VALUE with KEY one of L, cp, tp, direction, "
                                         f"backend (e.g. cp=1)")
    return key, value


def _cmd_kernel_fit(args) -> int:
    import json

    import numpy as np

    from ..costmodel.tiles import check, fit, read_table

    rows = read_table(args.table)
    inside = [args.fit_on is None or str(getattr(r, args.fit_on[0])) == args.fit_on[1] for r in rows]
    seen = [r for r, ok in zip(rows, inside) if ok]
    if len(seen) < 4:
        raise SystemExit(f"distattn cluster kernel-fit: error: --fit-on {'='.join(args.fit_on)} leaves "
                         f"{len(seen)} of {len(rows)} rows; a fit needs at least 4")
    print(f"fitting the tile model to {len(seen)} of {len(rows)} rows of {args.table} ...", file=sys.stderr,
          flush=True)
    model = fit(seen, source=f"tiles fitted to {os.path.basename(args.table)}")
    checked = check(model, rows)
    held = [c for c, ok in zip(checked, inside) if not ok]

    def summary(cs) -> dict:
        errors = np.abs([c["error"] for c in cs]) if cs else np.zeros(0)
        return {"median_error": float(np.median(errors)) if cs else None,
                "worst_error": float(errors.max()) if cs else None}
    f, b = model.forward, model.backward
    out = {"table": args.table, "fit_on": None if args.fit_on is None else "=".join(args.fit_on),
           "model": {"sms": model.sms, "call_us": model.call_s * 1e6, "fixed_iterations": f.fixed,
                     "forward_iter_us": f.iter_s * 1e6, "backward_iter_us": b.iter_s * 1e6, "lone": f.lone},
           "rows": checked, **summary(checked),
           **{f"predicted_{k}": v for k, v in summary(held).items()}}
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    print(model.describe())
    if args.check:
        print(f"{'L':>7} {'cp':>3} {'tp':>3} {'q_len':>7} {'k_len':>7} {'heads':>5} {'direction':<9} "
              f"{'measured ms':>12} {'model ms':>10} {'error':>7}{'  (held out)' if held else ''}")
        for c, ok in zip(checked, inside):
            print(f"{c['L']:>7} {c['cp']:>3} {c['tp']:>3} {c['q_len']:>7} {c['k_len']:>7} {c['heads']:>5g} "
                  f"{c['direction']:<9} {c['measured_ms']:>12.4f} {c['model_ms']:>10.4f} {c['error']:>+7.1%}"
                  f"{'' if ok else '  *'}")
    print(f"|model / measured - 1| over {len(rows)} rows: median {out['median_error']:.1%}, "
          f"worst {out['worst_error']:.1%}")
    if held:
        print(f"the {len(held)} rows the fit did not see: median {out['predicted_median_error']:.1%}, "
              f"worst {out['predicted_worst_error']:.1%}")
    return 0


def print_check(rows) -> None:
    """``--check``: per op and scope, the relative time error of each measured configuration's own fit and
    of the rule's price with it left out (:meth:`distattn.costmodel.network.NetworkProfile.check`)."""
    def pct(x):
        return "-" if x is None else f"{x:.1%}"
    print("time error per op and scope, median / worst over the measured sizes: the fit used, and the rule's price "
          "with the configuration's rows left out")
    print(f"  {'op':<15} {'scope':<9} {'configs':>7} {'sizes':>5}  {'fit':>15}  {'left out':>15}")
    for r in rows:
        print(f"  {r['op']:<15} {r['scope']:<9} {r['configs']:>7} {r['points']:>5}  "
              f"{pct(r['fit_median']):>7} {pct(r['fit_worst']):>7}  {pct(r['left_out_median']):>7} "
              f"{pct(r['left_out_worst']):>7}")


def add_parsers(sub) -> None:
    cluster_sub = command_group(
        sub, "cluster", help="measure and describe the cluster's network",
        description="Measure the network (nccl-tests binaries, or collectives through torch.distributed) into a "
                    "profile JSON that `distattn simulate --network` reads, and inspect profiles and logs.",
        epilog=examples(".venv/bin/distattn cluster probe --world-size 4 --out net.json",
                        ".venv/bin/distattn cluster nccl-tests --bin-dir nccl-tests/build --gpus 8 --out h100.json",
                        ".venv/bin/distattn cluster nccl-parse all_gather_perf.log",
                        ".venv/bin/distattn cluster fit h100.json",
                        ".venv/bin/distattn cluster kernel-fit attn_latency_h100.csv --check"))

    nccl = cluster_sub.add_parser(
        "nccl-parse", help="nccl-tests output -> JSON rows and average bus bandwidth",
        description="Parse a saved nccl-tests log (streamed: any size) into JSON rows and the average bus "
                    "bandwidth.",
        epilog=examples(".venv/bin/distattn cluster nccl-parse all_gather_perf.log > all_gather.json"))
    nccl.add_argument("file", type=existing_file, help="a saved nccl-tests log (stdout of e.g. all_gather_perf)")
    nccl.set_defaults(func=_cmd_nccl_parse)

    probe = cluster_sub.add_parser(
        "probe", help="time collectives through torch.distributed -> network profile JSON",
        description="Time all_gather/reduce_scatter/all_to_all/send_recv through torch.distributed: on local "
                    "gloo ranks, or on the job's process group under torchrun/srun.",
        epilog=examples(".venv/bin/distattn cluster probe --world-size 4 --sizes 4K:16M --out net.json",
                        ".venv/bin/torchrun --nproc-per-node 8 -m distattn.cli cluster probe --sizes 1M:1G --out h100.json"))
    probe.add_argument("--world-size", type=positive_int, default=4, help="local gloo ranks when not under a launcher")
    probe.add_argument("--sizes", default="4K:16M", help="LO:HI (powers of two) or a comma list of byte sizes")
    probe.add_argument("--ops", nargs="+", default=list(PROBED), choices=PROBED, help="collectives to time")
    probe.add_argument("--iters", type=positive_int, default=5, help="timed iterations per size")
    probe.add_argument("--warmup", type=non_negative_int, default=2, help="untimed iterations per size")
    probe.add_argument("--timeout", type=positive_float, default=600.0,
                       help="seconds before the local ranks are stopped")
    probe.add_argument("--out", type=output_file, default="network_profile.json", help="profile JSON to write")
    probe.set_defaults(func=_cmd_probe)

    tests = cluster_sub.add_parser(
        "nccl-tests", help="run nccl-tests binaries -> network profile JSON",
        description="Run nccl-tests binaries (build them with cluster/build_nccl_tests.sh) and fit a profile.",
        epilog=examples(".venv/bin/distattn cluster nccl-tests --bin-dir nccl-tests/build --gpus 8 --out node.json",
                        ".venv/bin/distattn cluster nccl-tests --bin-dir nccl-tests/build --gpus 8 --nodes 4 "
                        "--launcher 'srun -N4 --ntasks-per-node=1' --out 4nodes.json"))
    tests.add_argument("--bin-dir", required=True, help="nccl-tests build/ folder with all_gather_perf etc.")
    tests.add_argument("--gpus", type=positive_int, default=8, help="GPUs per process (-g)")
    tests.add_argument("--nodes", type=positive_int, default=1, help="nodes the launcher spans (for the profile)")
    tests.add_argument("--launcher", default="", help="prefix for multi-node runs, e.g. 'srun -N4 --ntasks-per-node=1'"
                       " or 'mpirun -np 4'")
    tests.add_argument("--sizes", default="1M:1G", help="LO:HI in bytes")
    tests.add_argument("--ops", nargs="+", default=list(PROBED), choices=PROBED, help="collectives to run")
    tests.add_argument("--log-dir", type=output_dir, default=None, help="keep each binary's raw output here")
    tests.add_argument("--out", type=output_file, default="network_profile.json", help="profile JSON to write")
    tests.set_defaults(func=_cmd_nccl_tests)

    fit = cluster_sub.add_parser(
        "fit", help="print the alpha-beta fits of a profile (JSON, CSV or a folder of published CSVs)",
        description="Print each collective's alpha-beta fit (latency and bus bandwidth) of a profile, one per "
                    "measured (op, ranks, nodes). A folder reads every published-format CSV in it "
                    "(op,ngpu,nodes,dtype,size_bytes,time_us,algbw_gbs,busbw_gbs,source).",
        epilog=examples(".venv/bin/distattn cluster fit network_profile.json", ".venv/bin/distattn cluster fit h100",
                        ".venv/bin/distattn cluster fit ../shared/data/profiles/published --check"))
    fit.add_argument("file", type=network_argument, metavar="NAME_OR_PATH",
                     help=network_help("none, it is required"))
    fit.add_argument("--check", action="store_true",
                     help="also score the rule that prices unmeasured configurations (strict profiles): each "
                          "measured configuration priced with its own rows left out, error per op and scope")
    fit.set_defaults(func=_cmd_profile_fit)

    kernel = cluster_sub.add_parser(
        "kernel-fit", help="fit the attention kernel's tile model to a latency table; rows measured vs modelled",
        description="Fit the attention kernel's tile model (distattn.costmodel.tiles: CTAs in waves over the SMs, per "
                    "direction, each a fixed cost plus its loop iterations) to a latency table: rows L,cp,tp,"
                    "duration_per_doc (ms, DistCA's profiler: L/cp query rows of a causal document, read as forward "
                    "+ backward) or q_len,k_len,heads,direction,ms[,segments,backend] (the GPU report's kernel "
                    "rows: python -m distattn.kernels.bench --table).",
        epilog=examples(".venv/bin/distattn cluster kernel-fit ../shared/data/profiles/attn_latency_h100.csv --check",
                        ".venv/bin/distattn cluster kernel-fit ../shared/data/profiles/attn_latency_h100.csv "
                        "--fit-on cp=1 "
                        "--json"))
    kernel.add_argument("table", type=existing_file, metavar="TABLE", help="a latency table (CSV)")
    kernel.add_argument("--check", action="store_true", help="print every row, measured against modelled")
    kernel.add_argument("--fit-on", type=_fit_on, default=None, metavar="KEY=VALUE",
                        help="fit on the rows with KEY=VALUE only (e.g. cp=1: whole documents) and predict the rest")
    kernel.add_argument("--json", action="store_true",
                        help="print JSON: the model, rows (L, cp, tp, measured_ms, model_ms, error), median_error, "
                             "worst_error, and predicted_* over the rows --fit-on left out")
    kernel.set_defaults(func=_cmd_kernel_fit)
