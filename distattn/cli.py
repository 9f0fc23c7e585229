"""The ``distattn`` command line. Each subcommand is added when it works."""

from __future__ import annotations

import argparse
import json
import os
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


def _cmd_train(args) -> int:
    from .spawn import RankError
    from .train.config import load_config, validate
    from .train.trainer import run

    cfg = load_config(args.config)
    overrides = {}
    if args.steps is not None:
        overrides["train"] = {"steps": args.steps}
    if args.out is not None:
        overrides.setdefault("train", {})["out"] = args.out
    if args.scheduler is not None:
        overrides["parallel"] = {"scheduler": args.scheduler}
    cfg = validate(cfg.replace(**overrides))
    p = cfg.parallel
    # under a launcher every rank runs this command: only rank 0 talks
    talk = print if os.environ.get("RANK", "0") == "0" else (lambda *a, **k: None)
    talk(f"distattn train {args.config}: {cfg.world_size} rank(s) (dp {p.dp} x cp {p.cp}), scheduler {p.scheduler}, "
          f"{cfg.data.seq_len} tokens per sequence, {cfg.train.steps} steps -> {cfg.train.out}", flush=True)
    try:
        history = run(cfg, resume=args.resume)
    except RankError as exc:
        print(f"distattn train: a rank failed, stopping the job: {str(exc).splitlines()[0]}\n"
              f"rerun with --resume to continue from the last checkpoint under {cfg.train.out}/ckpt", file=sys.stderr)
        return 1
    if history:
        last = history[-1]
        mean_tps = sum(m["tokens_per_s"] for m in history) / len(history)
        talk(f"done: step {last['step'] + 1}, loss {last['loss']:.4f}, mean {mean_tps:,.0f} tokens/s; "
              f"metrics in {cfg.train.out}/metrics.jsonl")
    return 0


def _cmd_launch(args) -> int:
    import shlex
    import subprocess

    from .launch import LaunchOptions, sbatch_script, torchrun_command
    from .train.config import load_config

    cfg = load_config(args.config)
    opts = LaunchOptions(nodes=args.nodes, gpus_per_node=args.gpus_per_node, port=args.port, time=args.time,
                         partition=args.partition, account=args.account, max_restarts=args.max_restarts,
                         log_dir=args.log_dir)
    if args.backend == "ray":
        from .launch import RayOptions, ray_train

        ray_opts = RayOptions(address=args.ray_address, num_cpus=args.ray_num_cpus,
                              gpus_per_worker=1 if args.gpus_per_node else 0)
        if args.dry_run:
            print(f"Ray TorchTrainer: {cfg.world_size} workers, {ray_opts}")
            return 0
        if args.out is not None:
            cfg = cfg.replace(train={"out": args.out})
        metrics = ray_train(cfg, ray_opts, resume=args.resume)
        print(f"ray job done: step {metrics.get('step', -1) + 1}, loss {metrics.get('loss', float('nan')):.4f}; "
              f"metrics in {cfg.train.out}/metrics.jsonl")
        return 0
    if args.backend == "local":
        cmd = [sys.executable, "-m", "distattn.cli", "train", args.config] + (["--out", args.out] if args.out else []) \
            + (["--resume"] if args.resume else [])
    elif args.backend == "torchrun":
        cmd = torchrun_command(args.config, cfg, opts, args.out, args.resume, args.rdzv_host)
    else:
        script = sbatch_script(args.config, cfg, opts, args.out, args.resume)
        if args.dry_run:
            print(script)
            return 0
        from pathlib import Path

        from .launch import submit_sbatch, wait_slurm_job

        Path(opts.log_dir).mkdir(parents=True, exist_ok=True)
        path = Path(opts.log_dir) / f"distattn-{Path(args.config).stem}.sbatch"
        path.write_text(script)
        job_id = submit_sbatch(path)
        log = Path(opts.log_dir).resolve() / f"distattn-{Path(args.config).stem}-{job_id}.out"
        print(f"submitted job {job_id}: script {path}, log {log}", flush=True)
        if not args.wait:
            print(f"state: {wait_slurm_job(job_id, 0)} (squeue -j {job_id}; --wait follows it to the end)")
            return 0
        state = wait_slurm_job(job_id, args.wait_timeout,
                               on_change=lambda st: print(f"job {job_id}: {st}", flush=True))
        print(f"job {job_id} {state}; log {log}")
        return 0 if state == "COMPLETED" else 1
    if args.dry_run:
        print(shlex.join(cmd))
        return 0
    return subprocess.run(cmd).returncode


def _cmd_nccl_parse(args) -> int:
    from .cluster.nccl import parse_nccl_tests_file

    print(json.dumps(parse_nccl_tests_file(args.file), indent=1))
    return 0


def _print_measurement(m) -> None:
    r = m.row()
    print(f"{r['op']:<15} {r['world_size']:>5} {r['size_bytes']:>12,} {r['time_us']:>12.1f} {r['algbw_gbs']:>9.3f} "
          f"{r['busbw_gbs']:>9.3f}", flush=True)


def _print_fits(profile) -> None:
    print(f"alpha-beta fits (t = alpha + factor * size / busbw), {profile.source}:")
    for (op, n), f in sorted(profile.fits.items()):
        print(f"  {op:<15} {n:>5} ranks  alpha {f.alpha_us:9.1f} us  busbw {f.busbw_gbs:9.3f} GB/s  ({f.points} sizes)")


def _probe_rank(sizes, ops, iters, warmup):
    from .cluster.probe import probe_profile

    return probe_profile(sizes, ops, iters, warmup, progress=_print_measurement).to_json()


def _cmd_probe(args) -> int:
    from .cluster.probe import parse_sizes
    from .cluster.profile import NetworkProfile

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
            data = _probe_rank(sizes, args.ops, args.iters, args.warmup)
        finally:
            dist.destroy_process_group()
        if os.environ["RANK"] != "0":
            return 0
    else:
        from .spawn import run_distributed

        print(f"distattn cluster probe: {args.world_size} local gloo ranks, {len(sizes)} sizes x {len(args.ops)} ops",
              flush=True)
        print(header, flush=True)
        data = run_distributed(_probe_rank, args.world_size, sizes, args.ops, args.iters, args.warmup,
                               timeout=args.timeout)[0]
    profile = NetworkProfile.from_json(data)
    profile.save(args.out)
    _print_fits(profile)
    print(f"profile written to {args.out}")
    return 0


def _cmd_nccl_tests(args) -> int:
    from .cluster.nccl_tests import run_nccl_tests
    from .cluster.probe import parse_sizes

    sizes = parse_sizes(args.sizes)
    profile = run_nccl_tests(args.bin_dir, args.gpus, min(sizes), max(sizes), ops=args.ops,
                             launcher=args.launcher, nodes=args.nodes, log_dir=args.log_dir,
                             progress=lambda line: print(line, flush=True))
    profile.save(args.out)
    _print_fits(profile)
    print(f"profile written to {args.out}")
    return 0


def _cmd_profile_fit(args) -> int:
    from .cluster.profile import NetworkProfile

    _print_fits(NetworkProfile.load(args.file))
    return 0


def _tokens(text: str) -> int:
    """``524288``, ``512K`` or ``1M`` tokens (K = 1024)."""
    from .cluster.profile import parse_size

    try:
        value = parse_size(text, "--seq-len")
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a token count like 131072, 128K or 1M, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive token count, got {text!r}")
    return value


def _doc_pool(path):
    """A document-length sample; documents over 64K repeated 4x as in DistCA's evaluation."""
    if path is None:
        return None
    from .doclens import load_doc_lens, upsample_long

    return upsample_long(load_doc_lens(path))


def _cmd_bench(args) -> int:
    from .bench.suite import BenchConfig, run_bench

    pool = _doc_pool(args.doclens)
    kw = dict(doc_pool=None if pool is None else tuple(int(x) for x in pool), peers=not args.no_peers)
    for name in ("world_sizes", "seq_lens", "masks", "schedulers", "repeats"):
        if getattr(args, name) is not None:
            kw[name] = tuple(getattr(args, name)) if name != "repeats" else args.repeats
    cfg = BenchConfig.quick(**kw) if args.quick else BenchConfig(**kw)
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
    from .cluster.profile import NetworkProfile, default_profile

    return NetworkProfile.load(path) if path else default_profile()


def _cmd_simulate(args) -> int:
    from .sim.simulate import GPUS, MODELS, SimConfig, default_cp, mesh_description, recommend, simulate

    if args.calibrate:
        return _calibrate(args)
    if args.model not in MODELS:
        raise ValueError(f"--model {args.model!r} is unknown; presets: {', '.join(MODELS)}")
    if args.gpus is None or args.seq_len is None:
        raise ValueError("--gpus and --seq-len are required (or --calibrate RESULTS_CSV)")
    model, gpu, net, pool = MODELS[args.model], GPUS[args.gpu], _network(args.network), _doc_pool(args.doclens)
    say = (lambda *a, **k: None) if args.json else print
    say(f"distattn simulate: {model.name} on {args.gpus} {gpu.name.upper()} ({args.gpus_per_node}/node), "
        f"{args.seq_len:,} tokens per sequence, network: {net.source}, documents: "
        f"{args.doclens or 'log-normal stand-in'}", flush=True)
    if args.auto:
        best, rows = recommend(model, args.gpus, args.seq_len, net, pool, gpu, args.gpus_per_node,
                               progress=lambda cp, got: say(f"  cp {cp}: {len(got)} schedulers simulated", flush=True))
    else:
        cp = args.cp or default_cp(model, args.gpus, args.seq_len)
        cfg = SimConfig(model, args.gpus, args.seq_len, cp, gpu=gpu, gpus_per_node=args.gpus_per_node,
                        ulysses_degree=args.ulysses_degree)
        rows = simulate(cfg, net, args.schedulers, pool)
        best = None
    if args.json:
        out = {"results": rows}
        if best is not None:
            out["recommended"] = dict(best, mesh=mesh_description(best, args.gpus_per_node))
        print(json.dumps(out))
        return 0
    print(f"{'scheduler':<10} {'cp':>5} {'dp':>5} {'step s':>8} {'tok/s/GPU':>10} {'MFU':>5} {'compute s':>9} "
          f"{'exposed s':>9} {'imb':>5} {'DP idle':>7} {'mem GB':>7}")
    for r in sorted(rows, key=lambda r: (r["cp"], r["step_time_s"])):
        print(f"{r['scheduler']:<10} {r['cp']:>5} {r['dp']:>5} {r['step_time_s']:>8.2f} "
              f"{r['tokens_per_s_per_gpu']:>10,.0f} {r['mfu']:>5.2f} {r['compute_s']:>9.2f} {r['exposed_comm_s']:>9.2f} "
              f"{r['compute_imbalance']:>5.2f} {r['dp_idle']:>7.0%} {r['memory_gb']:>6.0f}{'' if r['fits_memory'] else '!'}")
    print("compute s: the busiest GPU's compute; exposed s: the slowest GPU's communication not hidden; imb: max/mean "
          "compute over all GPUs; DP idle: mean share of the step replicas wait; ! exceeds GPU memory")
    if best is not None:
        print(f"recommended: {best['scheduler']}, {mesh_description(best, args.gpus_per_node)}: "
              f"{best['step_time_s']:.2f} s/step")
    return 0


def _calibrate(args) -> int:
    from .bench.suite import read_results
    from .cluster.probe import PROBED
    from .sim.calibrate import calibrate

    rows = [r for r in read_results(args.calibrate) if r["world_size"] > 1]
    if not rows:
        raise ValueError(f"--calibrate {args.calibrate}: no multi-rank rows; run `distattn bench` first")
    if args.network:
        net = _network(args.network)
    else:  # measure gloo here at the bench's world sizes
        from .cluster.profile import NetworkProfile
        from .spawn import run_distributed

        measured, worlds = [], sorted({r["world_size"] for r in rows})
        for w in worlds:
            print(f"probing gloo collectives on {w} ranks", flush=True)
            data = run_distributed(_probe_rank, w, [2**k for k in range(12, 25, 2)], list(PROBED), 3, 1)[0]
            measured += NetworkProfile.from_json(data).rows
        net = NetworkProfile(tuple(measured), source="gloo probe", backend="gloo", gpus_per_node=max(worlds))
    out, per, rate = calibrate(rows, net, pool=_doc_pool(args.doclens))
    print(f"attention: {rate / 1e9:.1f} GFLOP/s per process with all cores; network: {net.source}")
    print(f"{'scheduler':<18} {'world':>5} {'seq':>6} {'mask':<10} {'measured ms':>11} {'predicted ms':>12} {'error':>7}")
    for r in out:
        print(f"{r['scheduler']:<18} {r['world_size']:>5} {r['seq_len']:>6} {r['mask']:<10} {r['fwd_bwd_ms']:>11.1f} "
              f"{r['predicted_ms']:>12.1f} {r['error']:>+7.0%}")
    print("median |error| per scheduler: " + ", ".join(f"{k} {v:.0%}" for k, v in per.items()))
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

    train = sub.add_parser("train", help="train the reference model on packed documents (the main job)")
    train.add_argument("config", help="YAML run config, e.g. configs/tiny.yaml")
    train.add_argument("--steps", type=int, default=None, help="override train.steps")
    train.add_argument("--scheduler", default=None, help="override parallel.scheduler")
    train.add_argument("--out", default=None, help="override train.out (metrics.jsonl, tb/, ckpt/)")
    train.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in OUT/ckpt")
    train.set_defaults(func=_cmd_train)

    launch = sub.add_parser("launch", help="run or submit a config: local processes, torchrun, a Slurm job or Ray Train")
    launch.add_argument("config")
    launch.add_argument("--backend", choices=["local", "torchrun", "slurm", "ray"], default="local")
    launch.add_argument("--nodes", type=int, default=1)
    launch.add_argument("--gpus-per-node", type=int, default=0, help="0: CPU processes with gloo")
    launch.add_argument("--dry-run", action="store_true", help="print the command or sbatch script, run nothing")
    launch.add_argument("--out", default=None, help="override train.out")
    launch.add_argument("--resume", action="store_true")
    launch.add_argument("--port", type=int, default=29500, help="c10d rendezvous port")
    launch.add_argument("--rdzv-host", default="localhost", help="torchrun: rendezvous host (the first node)")
    launch.add_argument("--max-restarts", type=int, default=0, help="torchrun restarts; training resumes itself")
    launch.add_argument("--time", default="01:00:00", help="slurm: time limit")
    launch.add_argument("--partition", default=None, help="slurm: partition")
    launch.add_argument("--account", default=None, help="slurm: account")
    launch.add_argument("--log-dir", default="logs", help="slurm: where the script and job logs go")
    launch.add_argument("--wait", action="store_true", help="slurm: follow the job until it ends; exit 1 unless "
                        "it COMPLETED")
    launch.add_argument("--wait-timeout", type=float, default=24 * 3600.0, help="slurm: seconds --wait gives up after")
    launch.add_argument("--ray-address", default=None,
                        help="ray: cluster address (default: RAY_ADDRESS, a cluster started here, else a local one)")
    launch.add_argument("--ray-num-cpus", type=int, default=None, help="ray: CPUs of a new local cluster")
    launch.set_defaults(func=_cmd_launch)

    cluster = sub.add_parser("cluster", help="measure and describe the cluster's network")
    cluster_sub = cluster.add_subparsers(dest="cluster_command", required=True)
    nccl = cluster_sub.add_parser("nccl-parse", help="nccl-tests output -> JSON rows and average bus bandwidth")
    nccl.add_argument("file", help="a saved nccl-tests log (stdout of e.g. all_gather_perf)")
    nccl.set_defaults(func=_cmd_nccl_parse)
    from .cluster.probe import PROBED

    probe = cluster_sub.add_parser("probe", help="time all_gather/reduce_scatter/all_to_all/send_recv through "
                                   "torch.distributed -> network profile JSON (local gloo ranks, or the job's "
                                   "process group under torchrun)")
    probe.add_argument("--world-size", type=int, default=4, help="local gloo ranks when not under a launcher")
    probe.add_argument("--sizes", default="4K:16M", help="LO:HI (powers of two) or a comma list (default 4K:16M)")
    probe.add_argument("--ops", nargs="+", default=list(PROBED), choices=PROBED)
    probe.add_argument("--iters", type=int, default=5)
    probe.add_argument("--warmup", type=int, default=2)
    probe.add_argument("--timeout", type=float, default=600.0, help="seconds before the local ranks are stopped")
    probe.add_argument("--out", default="network_profile.json")
    probe.set_defaults(func=_cmd_probe)
    tests = cluster_sub.add_parser("nccl-tests", help="run nccl-tests binaries (build: cluster/build_nccl_tests.sh) "
                                   "-> network profile JSON")
    tests.add_argument("--bin-dir", required=True, help="nccl-tests build/ folder with all_gather_perf etc.")
    tests.add_argument("--gpus", type=int, default=8, help="GPUs per process (-g), default 8")
    tests.add_argument("--nodes", type=int, default=1, help="nodes the launcher spans (for the profile)")
    tests.add_argument("--launcher", default="", help="prefix for multi-node runs, e.g. 'srun -N4 --ntasks-per-node=1'"
                       " or 'mpirun -np 4'")
    tests.add_argument("--sizes", default="1M:1G", help="LO:HI in bytes (default 1M:1G)")
    tests.add_argument("--ops", nargs="+", default=list(PROBED), choices=PROBED)
    tests.add_argument("--log-dir", default=None, help="keep each binary's raw output here")
    tests.add_argument("--out", default="network_profile.json")
    tests.set_defaults(func=_cmd_nccl_tests)
    bench = sub.add_parser("bench", help="real fwd+bwd runs of every scheduler across masks, lengths and world "
                           "sizes -> results.csv/json, PNG plots, TensorBoard")
    bench.add_argument("--quick", action="store_true", help="world sizes 2 and 4, 2K/4K tokens (a few minutes on CPU)")
    bench.add_argument("--out", required=True, help="folder for results.csv, results.json, *.png, tb/")
    bench.add_argument("--world-sizes", type=_int_list, default=None)
    bench.add_argument("--seq-lens", type=_int_list, default=None)
    bench.add_argument("--masks", nargs="+", default=None, help="causal full causal-doc full-doc window")
    bench.add_argument("--schedulers", nargs="+", default=None)
    bench.add_argument("--repeats", type=int, default=None, help="timed rounds (median kept)")
    bench.add_argument("--doclens", default=None, help="JSON document-length sample for the -doc masks")
    bench.add_argument("--no-peers", action="store_true", help="skip DeepSpeed's DistributedAttention")
    bench.set_defaults(func=_cmd_bench)

    from .sim.simulate import GPUS, MODELS, SCHEDULERS

    sim = sub.add_parser("simulate", help="predict step time per scheduler on a modelled cluster (dry plans on a "
                         "cost model); --auto recommends a scheduler and mesh; --calibrate checks it against bench")
    sim.add_argument("--gpus", type=int, default=None)
    sim.add_argument("--seq-len", type=_tokens, default=None, help="tokens per packed sequence, e.g. 512K")
    sim.add_argument("--model", default="llama3-8b", help=f"preset: {', '.join(MODELS)}")
    sim.add_argument("--cp", type=int, default=None, help="context-parallel degree (default: <= 16K tokens per GPU)")
    sim.add_argument("--ulysses-degree", type=int, default=None, help="usp: Ulysses group (default: a node)")
    sim.add_argument("--gpu", default="h100", choices=sorted(GPUS))
    sim.add_argument("--gpus-per-node", type=int, default=8)
    sim.add_argument("--network", default=None, help="profile JSON (distattn cluster probe/nccl-tests) or "
                     "nccl_perf CSV (default: NVLink 360 GB/s + IB 45 GB/s assumed)")
    sim.add_argument("--doclens", default=None, help="JSON document-length sample (default: log-normal stand-in)")
    sim.add_argument("--schedulers", nargs="+", default=list(SCHEDULERS), choices=SCHEDULERS)
    sim.add_argument("--auto", action="store_true", help="try every CP degree and recommend the fastest that fits")
    sim.add_argument("--calibrate", default=None, metavar="RESULTS_CSV",
                     help="compare predictions with a `distattn bench` results.csv from this machine")
    sim.add_argument("--json", action="store_true")
    sim.set_defaults(func=_cmd_simulate)

    fit = cluster_sub.add_parser("fit", help="print the alpha-beta fits of a profile (JSON or nccl_perf CSV)")
    fit.add_argument("file")
    fit.set_defaults(func=_cmd_profile_fit)
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
