"""``distattn bench`` and ``distattn simulate``: measure schedulers here, predict them on clusters."""

from __future__ import annotations

import json
import os

from ..schedulers import NAMES
from ._args import (doc_pool, examples, existing_file, output_dir, output_file, positive_int, positive_int_list,
                    tokens)
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


def _cmd_simulate(args) -> int:
    if args.calibrate:
        return _calibrate(args)
    from ..sim.simulate import (GPUS, MODELS, SimConfig, default_cp, mesh_description, recommend,
                                simulate_with_timelines, write_timeline)

    if args.model not in MODELS:
        raise ValueError(f"--model {args.model!r} is unknown; presets: {', '.join(MODELS)}")
    if args.gpus is None or args.seq_len is None:
        raise ValueError("--gpus and --seq-len are required (or --calibrate RESULTS_CSV)")
    if args.timeline is not None and not args.timeline.endswith((".csv", ".json")):
        raise ValueError(f"--timeline {args.timeline}: name a .csv or .json file")
    model, gpu, net, pool = MODELS[args.model], GPUS[args.gpu], _network(args.network), doc_pool(args.doclens)
    say = (lambda *a, **k: None) if args.json else print
    say(f"distattn simulate: {model.name} on {args.gpus} {gpu.name.upper()} ({args.gpus_per_node}/node), "
        f"{args.seq_len:,} tokens per sequence, network: {net.source}, documents: "
        f"{args.doclens or 'log-normal stand-in'}", flush=True)
    if args.auto:
        best, rows = recommend(model, args.gpus, args.seq_len, net, pool, gpu, args.gpus_per_node,
                               progress=lambda cp, got: say(f"  cp {cp}: {len(got)} schedulers simulated", flush=True))
        if args.timeline is not None:  # the timeline of the recommendation only
            cfg = SimConfig(model, args.gpus, args.seq_len, best["cp"], gpu=gpu, gpus_per_node=args.gpus_per_node)
            write_timeline(simulate_with_timelines(cfg, net, [best["scheduler"]], pool)[1], args.timeline)
    else:
        cp = args.cp or default_cp(model, args.gpus, args.seq_len)
        cfg = SimConfig(model, args.gpus, args.seq_len, cp, gpu=gpu, gpus_per_node=args.gpus_per_node,
                        ulysses_degree=args.ulysses_degree, nano_batches=args.nano_batches,
                        comm_dtype=args.comm_dtype)
        rows, timeline = simulate_with_timelines(cfg, net, args.schedulers, pool)
        if args.timeline is not None:
            write_timeline(timeline, args.timeline)
        best = None
    if args.json:
        out = {"results": rows}
        if best is not None:
            out["recommended"] = dict(best, mesh=mesh_description(best, args.gpus_per_node))
        print(json.dumps(out))
        return 0
    print(f"{'scheduler':<10} {'cp':>5} {'dp':>5} {'step s':>8} {'tok/s/GPU':>10} {'MFU':>5} {'compute s':>9} "
          f"{'exposed s':>9} {'imb':>5} {'DP idle':>7} {'mem GiB':>7}")
    for r in sorted(rows, key=lambda r: (r["cp"], r["step_time_s"])):
        print(f"{r['scheduler']:<10} {r['cp']:>5} {r['dp']:>5} {r['step_time_s']:>8.2f} "
              f"{r['tokens_per_s_per_gpu']:>10,.0f} {r['mfu']:>5.2f} {r['compute_s']:>9.2f} "
              f"{r['exposed_comm_s']:>9.2f} {r['compute_imbalance']:>5.2f} {r['dp_idle']:>7.0%} "
              f"{r['memory_gb']:>6.0f}{'' if r['fits_memory'] else '!'}")
    print("compute s: the busiest GPU's compute; exposed s: what communication adds to the step (the step replayed "
          "with transfers taking no time, subtracted); imb: max/mean compute over all GPUs; DP idle: mean share of the "
          "step replicas wait; ! exceeds GPU memory")
    if best is not None:
        print(f"recommended: {best['scheduler']}, {mesh_description(best, args.gpus_per_node)}: "
              f"{best['tokens_per_s_per_gpu']:,.0f} tokens/s per GPU, {best['step_time_s']:.2f} s/step")
    return 0


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
    start, net = starting_point(args.load_model, args.network, args.cores,
                                sorted({r["world_size"] for r in fit_rows + (score_rows or [])}))
    report(fit_rows, score_rows, net, start, pool, args.save_model)
    return 0


def add_parsers(sub) -> None:
    _add_bench(sub)
    _add_simulate(sub)


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


def _add_simulate(sub) -> None:
    from ..sim.presets import GPUS, MODELS, SCHEDULERS

    sim = sub.add_parser(
        "simulate", help="predict step time per scheduler on a modelled cluster; --auto recommends a mesh",
        description="Predict a training step of each scheduler on a cluster you describe: dry plans of the real "
                    "planners on a compute and network cost model. --auto tries every CP degree and recommends "
                    "the highest tokens/s per GPU that fits; --calibrate checks the model against a bench run.",
        epilog=examples("distattn simulate --gpus 64 --seq-len 128K",
                        "distattn simulate --gpus 512 --seq-len 512K --gpu h200 --auto --network h200.json",
                        "distattn simulate --calibrate bench/quick/results.csv"))
    sim.add_argument("--gpus", type=positive_int, default=None, help="GPUs in the job (required unless --calibrate)")
    sim.add_argument("--seq-len", type=tokens, default=None,
                     help="tokens per packed sequence, e.g. 512K (required unless --calibrate)")
    sim.add_argument("--model", default="llama3-8b", choices=sorted(MODELS), help="model preset")
    sim.add_argument("--cp", type=positive_int, default=None, help="context-parallel degree (default: <= 16K tokens "
                     "per GPU)")
    sim.add_argument("--ulysses-degree", type=positive_int, default=None, help="usp: Ulysses group (default: a node)")
    sim.add_argument("--gpu", default="h100", choices=sorted(GPUS), help="GPU preset")
    sim.add_argument("--gpus-per-node", type=positive_int, default=8, help="GPUs per node")
    sim.add_argument("--network", type=existing_file, default=None,
                     help="profile JSON (distattn cluster probe/nccl-tests) or nccl_perf CSV (default: NVLink "
                          "360 GB/s + IB 45 GB/s assumed)")
    sim.add_argument("--doclens", type=existing_file, default=None,
                     help="JSON document-length sample (default: log-normal stand-in)")
    sim.add_argument("--schedulers", nargs="+", default=list(SCHEDULERS), choices=SCHEDULERS,
                     help="schedulers to simulate")
    sim.add_argument("--nano-batches", type=int, choices=(1, 2), default=None,
                     help="nano-batches per micro-batch, ping-ponged through the layers as the trainer does "
                          "(default: each scheduler's, 2 for cad)")
    sim.add_argument("--comm-dtype", choices=("fp8",), default=None,
                     help="Q, K, V, out and dout travel as FP8 (distattn.plan(comm_dtype='fp8')); default: "
                          "their own dtype")
    sim.add_argument("--auto", action="store_true",
                     help="try every CP degree and recommend the most tokens/s per GPU that fits")
    sim.add_argument("--timeline", type=output_file, default=None, metavar="PATH",
                     help="write each rank's compute/communication/idle spans (.csv or .json; with --auto, of "
                          "the recommendation)")
    sim.add_argument("--calibrate", type=existing_file, default=None, metavar="FIT_CSV",
                     help="fit the CPU model to a `distattn bench` results.csv from this machine and compare "
                          "its predictions with every row")
    sim.add_argument("--holdout", type=existing_file, default=None, metavar="SCORE_CSV",
                     help="with --calibrate: score the fitted model on this other bench, which the fit never sees")
    sim.add_argument("--save-model", type=output_file, default=None, metavar="PATH",
                     help="with --calibrate: write the fitted model (machine and network profile) as JSON")
    sim.add_argument("--load-model", type=existing_file, default=None, metavar="PATH",
                     help="with --calibrate: start from a --save-model file (its measured constants and network "
                          "profile: nothing is measured here)")
    sim.add_argument("--cores", type=positive_int, default=None,
                     help="with --calibrate: the cores of the machine the benches ran on (default: the model's, "
                          "else this one's)")
    sim.add_argument("--json", action="store_true", help="print the results as JSON")
    sim.set_defaults(func=_cmd_simulate)
