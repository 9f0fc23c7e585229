"""``distattn simulate``: predict a training step per scheduler on a modelled cluster (:mod:`distattn.sim`), or
fit the simulator's CPU model to this machine's ``distattn bench`` runs (``--calibrate``)."""

from __future__ import annotations

import json
import re
import shutil
import sys
from dataclasses import replace

from ._args import (DOCLENS_HELP, MAX_DRAWS, MAX_GPUS, doc_pool, doclens_argument, examples, existing_file, output_file, positive_int,
                    positive_int_at_most, sequence_tokens)
from .cluster_cmds import probe_rank


def _network(path):
    from ..costmodel.network import profile_of

    return profile_of(path or None)


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
    from ..costmodel.network import NetworkProfile
    from ..distributed.spawn import run_distributed

    measured = []
    for w in worlds:
        print(f"probing gloo collectives on {w} ranks", flush=True)
        data = run_distributed(probe_rank, w, [2**k for k in range(12, 25, 2)], list(PROBED), 10, 2)[0]
        measured += NetworkProfile.from_json(data).rows
    return NetworkProfile(tuple(measured), source="gloo probe", backend="gloo", gpus_per_node=max(worlds))


class _Progress:
    """Progress on stderr (``--json`` keeps stdout to the JSON): on a terminal one line, rewritten at
    every draw; elsewhere (a log, a pipe) one line per setting, at its last draw."""

    def __init__(self, stream=None):
        self.stream = sys.stderr if stream is None else stream
        self.tty, self.shown = self.stream.isatty(), False

    def __call__(self, line: str) -> None:
        if self.tty:
            width = shutil.get_terminal_size().columns - 3
            self.stream.write(f"\r\033[K  {line[:width]}")
            self.stream.flush()
            self.shown = True
            return
        got = _DRAW.search(line)   # (sweep.run_draws' and per_batch's lines: "...: draw i of n: ...")
        if got is None or got[1] == got[2] or "does not fit" in line:
            print(f"  {line}", file=self.stream, flush=True)

    def close(self) -> None:
        """Clear a terminal's progress line (before the results print)."""
        if self.shown:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self.shown = False


_DRAW = re.compile(r"draw (\d+) of (\d+)")


def _config(args, model, gpu, batch):
    from ..sim.kernel import AttentionKernel
    from ..sim.simulate import SimConfig, default_cp

    kernel = AttentionKernel.measured(gpu, model.head_dim, args.kernel_table)
    cp = args.cp or default_cp(model, args.gpus // args.tp, args.seq_len)
    return SimConfig(model, args.gpus, args.seq_len, cp, gpu=gpu, gpus_per_node=args.gpus_per_node,
                     ulysses_degree=args.ulysses_degree, nano_batches=args.nano_batches, comm_dtype=args.comm_dtype,
                     activation_checkpointing=None if args.checkpointing == "auto" else args.checkpointing,
                     mlp_chunk=args.mlp_chunk, tp=args.tp, batch=batch, packing=args.packing,
                     token_cap_factor=args.token_cap_factor, kernel=kernel, planning=args.planning, seed=args.seed,
                     cad_backward=args.cad_backward, dp_mode=args.dp_mode or "fsdp", dp_shard=args.dp_shard,
                     **({} if args.comm_slowdown is None else {"comm_slowdown": args.comm_slowdown}))


# What simulate prices in minutes (measured on a 2-core CPU, llama3-8b at 64K: one draw of the nine rows took
# 23 s on 64 GPUs, 95 s on 1,024 and 246 s on 4,096 -- linear in the GPUs past start-up, cad's pooled plan the
# largest share): above MAX_SIM_GPUS one row's first draw alone takes minutes with nothing to show, so it is
# refused; below it a run estimated past WARN_MINUTES is warned of.
MAX_SIM_GPUS = 16384
SECONDS_PER_GPU_DRAW = 0.006   # per row
WARN_MINUTES = 10


def _pricing_minutes(args) -> float:
    """About how long the rows' draws take (a sweep's other settings reuse their plans: not counted)."""
    return SECONDS_PER_GPU_DRAW * args.gpus * args.draws * len(args.schedulers) / 60


def _check_simulate(args, models) -> None:
    """The flags of a simulation (not --calibrate): each refusal names the flag and the fix."""
    calibrating = [f"--{name.replace('_', '-')}" for name in ("holdout", "save_model", "load_model", "cores")
                   if getattr(args, name) is not None]
    if calibrating:
        raise ValueError(f"{', '.join(calibrating)} go with --calibrate FIT_CSV: add it, or drop them")
    if args.model not in models:
        raise ValueError(f"--model {args.model!r} is unknown; presets: {', '.join(models)}")
    if args.gpus is None or args.seq_len is None:
        raise ValueError("--gpus and --seq-len are required (or --calibrate RESULTS_CSV)")
    if args.gpus > MAX_SIM_GPUS:
        raise ValueError(f"--gpus {args.gpus:,}: simulate prices at most {MAX_SIM_GPUS:,} GPUs (one draw of one row "
                         f"takes minutes there); simulate a smaller job")
    if args.timeline is not None and not args.timeline.endswith((".csv", ".json")):
        raise ValueError(f"--timeline {args.timeline}: name a .csv or .json file")
    if args.sweep and args.cp is not None:
        raise ValueError("--sweep chooses each row's CP size: drop --cp, or drop --sweep to fix it")
    if args.auto and (args.sweep or args.cp is not None or args.per_batch):
        raise ValueError("--auto tries every CP size with one sequence per replica: drop --sweep, --cp and --per-batch")
    if args.auto and args.tp != 1:
        raise ValueError(f"--auto recommends a config `distattn train` runs, which has no tensor parallelism: "
                         f"drop --tp {args.tp}")


def _cmd_simulate(args) -> int:
    if args.calibrate:
        return _calibrate(args)
    from ..sim import sweep
    from ..sim.job import Links
    from ..sim.simulate import GPUS, MODELS, mesh_description, simulate_with_timelines, write_timeline
    from ..sim.trace import TRACED_RANKS
    from ..sim.workload import default_batch

    _check_simulate(args, MODELS)
    model, gpu, pool = MODELS[args.model], GPUS[args.gpu], doc_pool(args.doclens)
    # --per-batch compares with each row at its best CP size unless --cp fixes it
    swept = args.sweep or (args.per_batch and args.cp is None)
    batch = args.batch or (default_batch(args.gpus, args.seq_len) if swept else None)
    cfg = _config(args, model, gpu, batch)
    cfg.check()
    net = Links.of(_network(args.network), cfg.gpus_per_node, cfg.tp)   # one record of the fits asked
    say = (lambda *a, **k: None) if args.json else print
    say(f"distattn simulate: {model.name} on {args.gpus} {gpu.name.upper()} ({args.gpus_per_node}/node, tp {cfg.tp}), "
        f"{args.seq_len:,} tokens per sequence, {batch or cfg.dp} per global batch, {args.draws} draws, "
        f"{cfg.packing} packing, network: {net.node.source}, documents: {args.doclens or 'log-normal stand-in'}",
        flush=True)
    if args.verbose:
        print(f"  kernel: {cfg.kernel.source}", file=sys.stderr)
    if (minutes := _pricing_minutes(args)) > WARN_MINUTES:
        print(f"distattn simulate: warning: about {minutes:.0f} minutes to price ({args.gpus:,} GPUs x {args.draws} "
              f"draws x {len(args.schedulers)} rows); fewer --draws or --schedulers take less", file=sys.stderr,
              flush=True)
    best = None
    # the data-parallel modes tried where the setting is chosen (--dp-mode fixes it)
    modes = sweep.dp_modes(cfg) if args.dp_mode is None else None
    if args.auto:
        best, rows = sweep.recommend(cfg, net, args.schedulers, pool, args.draws,
                                     lambda cp, got: say(f"  cp {cp}: {len(got)} schedulers simulated", flush=True),
                                     modes)
        best = dict(best, mesh=mesh_description(best, args.gpus_per_node), config=sweep.trainer_config(best, cfg))
    else:
        progress = _Progress()
        try:
            rows = sweep.rows(cfg, net, args.schedulers, sweep.pool_batches(pool), args.draws, swept, progress,
                              modes=modes if swept else None)
            if args.per_batch:
                from ..sim.per_batch import per_batch_row

                rows.append(per_batch_row(cfg, net, sweep.pool_batches(pool), args.draws, rows, progress=progress))
        finally:
            progress.close()
    if args.timeline is not None:   # of the first draw, at each row's CP size
        timed = [r for r in ([best] if best else rows) if r.get("step_time_s") is not None]
        lines, trace = [], ([] if args.timeline.endswith(".json") else None)
        for r in timed:
            at = replace(cfg, cp=r["cp"], tp=r.get("tp", cfg.tp), dp_mode=r.get("dp_mode") or cfg.dp_mode,
                         dp_shard=r.get("dp_shard"))
            lines += simulate_with_timelines(at, net, [r["scheduler"]], pool, trace=trace)[1]
        write_timeline(lines, args.timeline, trace)
        what = (f"a Chrome trace of each row's first draw, its first {TRACED_RANKS} ranks at most: open it in "
                f"ui.perfetto.dev" if trace is not None else "each rank's phases of each row's first draw")
        print(f"timeline: wrote {args.timeline}: {what}", file=sys.stderr, flush=True)
    if args.verbose:
        _print_links(net)
    if args.json:
        print(json.dumps({"results": rows, **({"recommended": best} if best else {})}))
        return 0
    _print_table(rows, args.gpus_per_node)
    if best is not None:
        print("config: " + " ".join(f"{k}={v}" for k, v in best["config"].items()))
        print(f"recommended: {best['scheduler']}, {best['mesh']}, {_mode(best)}: {best['tokens_per_s_per_gpu']:,.0f} "
              f"tokens/s per GPU, {best['step_time_s']:.2f} s/step")
    return 0


def _mode(r: dict) -> str:
    """A row's data-parallel mode as the table names it: ``hsdp 8`` (its shard group), else the mode."""
    return f"{r['dp_mode']}" + ("" if r.get("dp_shard") is None else f" {r['dp_shard']}")


def _print_table(rows: list[dict], gpus_per_node: int) -> None:
    print(f"{'scheduler':<11} {'tp':>3} {'cp':>4} {'dp':>4} {'nb':>2} {'U':>2} {'dp mode':<8} {'ckpt':<10} "
          f"{'mem GiB':>7} {'step s':>7} {'p10-p90':>11} {'tok/s/GPU':>9} {'MFU':>5} {'exposed':>7} {'dp exp':>6} {'imb':>5} "
          f"{'DP idle':>7} {'/ideal':>6} {'vs wlb':>6}")
    for r in rows:
        if r["scheduler"] == "per-batch":
            continue
        name = r["scheduler"] + (f" {r['cad_backward']}" if r.get("cad_backward") else "")
        if r.get("step_time_s") is None:
            print(f"{name:<11} fits no setting in the GPU's memory"
                  + (f" (at cp {r['cp']}: {r['memory_gib']:.0f} GiB)" if "cp" in r else ""))
            continue
        spread = f"{r.get('step_time_p10_s', r['step_time_s']):.2f}-{r.get('step_time_p90_s', r['step_time_s']):.2f}"
        ckpt = r["checkpointing"] + ("+mlp" if r["mlp_chunk"] else "")
        degree = "-" if r.get("ulysses_degree") is None else r["ulysses_degree"]
        print(f"{name:<11} {r['tp']:>3} {r['cp']:>4} {r['dp']:>4} {r.get('nano_batches', '-'):>2} {degree:>2} "
              f"{_mode(r):<8} {ckpt:<10} {r['memory_gib']:>7.1f} "
              f"{r['step_time_s']:>7.2f} {spread:>11} {r['tokens_per_s_per_gpu']:>9,.0f} {r['mfu']:>5.2f} "
              f"{r['exposed_comm_s']:>7.2f} {r['dp_exposed_s']:>6.2f} {r['compute_imbalance']:>5.2f} "
              f"{r['dp_idle']:>7.0%} {_ratio(r, 'over_ideal'):>6} {_ratio(r, 'speedup_vs_wlb'):>6}")
    print("nb: nano-batches per micro-batch (parallel.nano_batches); U: usp's Ulysses degree (parallel.ulysses_degree); "
          "dp mode: parallel.dp_mode (hsdp: with its parallel.dp_shard); --sweep tries all three")
    print("step s: median over the draws (p10-p90: their 10th and 90th percentiles); ckpt: the cheapest activation "
          "checkpointing that fits (+mlp: the MLP tiled; cad resend|keep: what its attention servers keep); exposed: "
          "what communication adds to the step (dp exp: what the data-parallel transfers alone add); imb: max/mean "
          "compute over all GPUs; DP idle: mean share of the step replicas wait; /ideal: step over ideal's; vs wlb: "
          "wlb's step over the row's (medians of the per-draw ratios)")
    for r in rows:
        if r["scheduler"] == "per-batch":
            _print_per_batch(r)


def _print_per_batch(r: dict) -> None:
    best = r.get("best_fixed")
    against = "" if best is None else (
        f"; {r['speedup_vs_best_fixed']:.2f}x the best fixed choice, {best['scheduler']} cp {best['cp']} "
        f"(p10-p90 {r['speedup_vs_best_fixed_p10']:.2f}-{r['speedup_vs_best_fixed_p90']:.2f})")
    print(f"per-batch: {r['step_time_s']:.2f} s/step (p10-p90 {r['step_time_p10_s']:.2f}-{r['step_time_p90_s']:.2f}), "
          f"{r['checkpointing']}, {r['groups']:.0f} CP groups a step, chosen in {r['planning_s']:.2f} s a step "
          f"(median; the screen's fits, once: {r.get('screen_fit_s', 0.0):.1f} s){against}")
    total = sum(r["choices"].values())
    print("  micro-batches by (scheduler, cp): " + ", ".join(f"{k} {v / total:.0%}" for k, v in r["choices"].items()))


def _print_links(links) -> None:
    """``--verbose``: every fit the simulation asked the network for, and the rows each was fitted on
    (to stderr: ``--json`` keeps stdout to the JSON)."""
    print(f"network fits used ({links.node.source}):", file=sys.stderr)
    for view in {id(v): v for v in (links.node, links.cp)}.values():
        for op, n, nodes in view.asked():
            print("\n".join(view.describe_fit(op, n, nodes)), file=sys.stderr)


def _ratio(r: dict, key: str) -> str:
    return f"{r[key]:.2f}" if key in r else "-"


def add_parsers(sub) -> None:
    from ..sim.presets import GPUS, MODELS, PACKINGS, SCHEDULERS

    sim = sub.add_parser(
        "simulate", help="predict step time per scheduler on a modelled cluster; --sweep picks each one's CP",
        description="Predict a training step of each scheduler on a cluster you describe: dry plans of the real "
                    "planners replayed on a compute, memory and network model, over many draws of the global batch. "
                    "--sweep gives each scheduler its best setting (CP size, nano-batches, usp's Ulysses degree); "
                    "--auto recommends a mesh; --calibrate checks the model against a bench run.",
        epilog=examples(".venv/bin/distattn simulate --gpus 64 --seq-len 128K --draws 4",
                        ".venv/bin/distattn simulate --gpus 512 --seq-len 512K --gpu h200 --sweep --network h100 --json",
                        ".venv/bin/distattn simulate --gpus 256 --seq-len 512K --gpu h200 --tp 8 --sweep",
                        ".venv/bin/distattn simulate --calibrate bench/quick/results.csv"))
    _job_arguments(sim, GPUS, MODELS)
    _step_arguments(sim, PACKINGS, SCHEDULERS)
    _output_arguments(sim)
    sim.set_defaults(func=_cmd_simulate)


def _job_arguments(sim, gpus, models) -> None:
    """The job simulated: its GPUs, lengths, model, parallelism, network and documents."""
    from ..costmodel.network_csv import network_argument, network_help   # light: no numpy while parsers are built

    sim.add_argument("--gpus", type=positive_int_at_most(MAX_GPUS, "GPUs"), default=None,
                     help="GPUs in the job (required unless --calibrate)")
    sim.add_argument("--seq-len", type=sequence_tokens, default=None,
                     help="tokens per packed sequence, e.g. 512K (required unless --calibrate)")
    sim.add_argument("--model", default="llama3-8b", choices=sorted(models), help="model preset")
    sim.add_argument("--cp", type=positive_int, default=None, help="context-parallel degree (default: <= 16K tokens "
                     "per GPU; --sweep tries every one)")
    sim.add_argument("--tp", type=positive_int, default=1, help="tensor-parallel ranks per CP rank, inside a node "
                     "(default 1)")
    sim.add_argument("--batch", type=positive_int_at_most(MAX_GPUS, "sequences per global batch"), default=None,
                     help="sequences of --seq-len per global batch (default: one per replica; with --sweep, 16K "
                          "tokens per GPU)")
    sim.add_argument("--ulysses-degree", type=positive_int, default=None, help="usp: Ulysses group (default: a node)")
    sim.add_argument("--gpu", default="h100", choices=sorted(gpus), help="GPU preset")
    sim.add_argument("--gpus-per-node", type=positive_int, default=8, help="GPUs per node")
    sim.add_argument("--network", type=network_argument, default=None, metavar="NAME_OR_PATH",
                     help=network_help("NVLink 360 GB/s + IB 45 GB/s assumed"))
    sim.add_argument("--doclens", type=doclens_argument, default=None, metavar="NAME_OR_PATH",
                     help=DOCLENS_HELP)


def _step_arguments(sim, packings, schedulers) -> None:
    """How each row's step is drawn and timed."""
    sim.add_argument("--schedulers", nargs="+", default=list(schedulers), choices=schedulers,
                     help="rows to simulate (wlb: WLB-LLM -- per-document CP, K/V all-gathered, its outlier-queue "
                          "packing; wlb-ideal, ideal: bounds)")
    sim.add_argument("--draws", type=positive_int_at_most(MAX_DRAWS, "draws"), default=16,
                     help="global batches drawn per row (seeds --seed ...); medians and p10/p90 over them "
                          "(default 16)")
    sim.add_argument("--seed", type=int, default=0, help="the first draw's seed (default 0)")
    sim.add_argument("--sweep", action="store_true",
                     help="give each row its best setting for a fixed global batch (--batch): CP size, "
                          "nano-batches 1|2 and usp's Ulysses degree (--nano-batches/--ulysses-degree fix them)")
    sim.add_argument("--packing", choices=packings, default="balanced",
                     help="how the global batch is dealt to replicas' micro-batches (default: balanced)")
    sim.add_argument("--token-cap-factor", type=float, default=1.25,
                     help="balanced packing: most tokens a micro-batch holds, in sequences (default 1.25)")
    sim.add_argument("--checkpointing", choices=("auto", "none", "selective", "full", "offload"), default="auto",
                     help="activation checkpointing timed (default: the cheapest that fits each row)")
    sim.add_argument("--mlp-chunk", type=int, default=None, help="with --checkpointing: train.mlp_chunk")
    sim.add_argument("--kernel-table", type=existing_file, default=None, metavar="CSV",
                     help="attention latency per document length (L, cp, tp, duration_per_doc ms), shaping the "
                          "kernel's speed over segment length (default: flat at the GPU report's 32K speed)")
    sim.add_argument("--comm-slowdown", type=float, default=None,
                     help="compute runs this much slower while the GPU's own transfers are in flight (default 0.19: "
                          "Lee et al. 2025's average, distattn.sim.replay.COMM_SLOWDOWN)")
    sim.add_argument("--planning", choices=("hidden", "exposed", "ignored"), default="hidden",
                     help="plans made in the background during the step before (hidden), in the step (exposed), "
                          "or not counted (ignored: no wall-clock time in the result)")
    sim.add_argument("--nano-batches", type=int, choices=(1, 2), default=None,
                     help="nano-batches per micro-batch, ping-ponged through the layers as the trainer does "
                          "(default: each scheduler's, 2 for cad)")
    sim.add_argument("--dp-mode", choices=("ddp", "fsdp", "hsdp", "zero1"), default=None,
                     help="how the dp x cp ranks share the model, as parallel.dp_mode: ddp, fsdp (FSDP2 over every "
                          "rank), hsdp (FSDP2 inside groups of --dp-shard ranks, replicated across them) or zero1 "
                          "(whole bf16 parameters, gradients and optimizer sharded); default: fsdp, and --sweep and "
                          "--auto try every mode")
    sim.add_argument("--dp-shard", type=positive_int, default=None,
                     help="with --dp-mode hsdp: the ranks sharding each block, as parallel.dp_shard (default: a node's)")
    sim.add_argument("--cad-backward", choices=("auto", "resend", "keep"), default="auto",
                     help="cad's attention servers: resend (keep nothing received; the backward sends it again), "
                          "keep, or auto (default: keep where it fits at the checkpointing resend needs, as "
                          "parallel.cad_backward)")
    sim.add_argument("--comm-dtype", choices=("fp8",), default=None,
                     help="Q, K, V, out and dout travel as FP8 (distattn.plan(comm_dtype='fp8')); default: "
                          "their own dtype")


def _output_arguments(sim) -> None:
    """What is reported beside the rows (--auto, --per-batch, --timeline) and --calibrate's flags."""
    sim.add_argument("--auto", action="store_true",
                     help="try every CP degree (one sequence per replica, --draws draws each) and recommend the most "
                          "tokens/s per GPU that fits")
    sim.add_argument("--per-batch", action="store_true",
                     help="also choose each step's CP groups and their schedulers from its documents "
                          "(distattn.sim.per_batch) and compare with the best fixed row (implies --sweep "
                          "unless --cp is given)")
    sim.add_argument("--timeline", type=output_file, default=None, metavar="PATH",
                     help="write each rank's compute/communication/idle spans of the first draw (.csv or .json; "
                          "with --auto, of the recommendation)")
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
    sim.add_argument("--verbose", action="store_true", help="also print the kernel table and network rows used")
    sim.add_argument("--json", action="store_true", help="print the results as JSON")
