"""``distattn demo``, ``distattn train`` and ``distattn launch``: run schedulers and the main job."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import signal
import sys

from ..train.config.sections import SCHEDULERS
from ._args import examples, int_list, positive_int
from ._shell import distattn_command, tool_command


def _cmd_demo(args) -> int:
    from ..bench.demo import run_demo

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


def _add_overrides(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("overrides", nargs="*", metavar="SECTION.KEY=VALUE",
                        help=f"set any config key {what}, e.g. parallel.cp=8 train.lr=1e-4 model.softcap=null "
                             f"(the value is YAML; checked like the file's)")


def _config(args, flags: dict[str, object]):
    """The config file with the command line's overrides (``flags``: dotted key -> a flag's value or None)."""
    from ..train.config import load_config
    from ..train.config.overrides import parse_overrides

    return load_config(args.config, parse_overrides(args.overrides, flags))


def _train_config(args):
    return _config(args, {"train.steps": args.steps, "train.out": args.out, "parallel.scheduler": args.scheduler})


def _print_config(cfg) -> int:
    """``--print-config``: the resolved config as YAML, loadable as a config file."""
    import dataclasses

    import yaml

    print(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False), end="")
    return 0


def _stopped(exc, out) -> str:
    """One line for a run a signal stopped: the last step it finished and what a resume continues from."""
    from ..train.checkpoint.resume import usable_checkpoint

    history = exc.results[0] if exc.results else None   # rank 0's metrics
    saved = usable_checkpoint(out)
    after = f" after step {history[-1]['step']}" if history else ""
    where = f"; newest checkpoint {saved}, continue with --resume" if saved else \
        "; no step had finished, so no checkpoint was saved"
    why = " (Slurm's warning before the time limit)" if exc.signum == signal.SIGUSR1 else ""
    return f"distattn train: stopped by {signal.Signals(exc.signum).name}{why}{after}{where}"


def _dry_run(cfg, args, talk) -> int:
    """``--dry-run``: the config checked and its per-rank memory estimated; 0 when it fits, 1 when not."""
    from ..train.preflight import memory

    if not 0 < args.gpu_memory_gib < float("inf"):
        raise ValueError(f"--gpu-memory-gib must be a positive number of GiB (e.g. 80), got {args.gpu_memory_gib:g}")
    physical = memory.physical_memory_bytes()
    device = {"cpu": "cpu", "gpu": "cuda"}.get(args.estimate_for) or memory.local_device(cfg, physical)
    lines, fits = memory.report(cfg, device, int(args.gpu_memory_gib * memory.GIB), physical)
    talk(f"distattn train {args.config} --dry-run: the config is valid; no rank started, no data read, "
         f"{cfg.train.out} untouched")
    if args.estimate_for == "auto":
        lines.insert(0, "memory for " + ("GPU ranks (as CPU processes these ranks would not fit this machine; "
                                         "--estimate-for cpu to see them)" if device == "cuda" else
                                         "CPU ranks (local processes, as `distattn train` runs them without a "
                                         "launcher; --estimate-for gpu for GPUs)"))
    if args.max_seq_len:
        from ..train.preflight import capacity

        budget = int(args.gpu_memory_gib * memory.GIB) if device == "cuda" else (physical or 2**62)
        lines += capacity.report(cfg, budget, device)
    for line in lines:
        talk(line)
    talk(f"exit code {0 if fits else 1}: {'fits' if fits else 'does not fit'}")
    return 0 if fits else 1


def _prepare_out(cfg, out, resume, overwrite: bool, launched: bool, talk, allow_reshape: bool = False):
    """Rank 0, before any rank starts: ``out`` made ready (:func:`~distattn.train.preflight.prepare_out`),
    the config a resume trains with (another batch geometry only with ``allow_reshape``: the ranks say
    what changed), the room for a checkpoint checked. Returns ``(cfg, the checkpoint
    to start from or None)``, or None when the run has finished already."""
    from ..train.checkpoint import manifest, resume as resuming
    from ..train.preflight import checks as preflight
    from ..train.metrics import logged_rows

    note = logging.getLogger("distattn.train").info   # what the library says: --log-level filters it
    # local ranks share this disk: hash every file here, where a mismatch can still pick an older
    # checkpoint before any rank starts; under a launcher the ranks split the hashing
    start_from = preflight.prepare_out(cfg, resume, overwrite, say=note, checksums=not launched)
    newest = None
    if start_from is not None:
        newest = manifest.read(start_from)
        cfg = resuming.resume_config(cfg, newest, say=note, allow_reshape=allow_reshape)
        if newest.step >= cfg.train.steps:
            talk(f"distattn train: {out} already finished: checkpoint {start_from.name} is step {newest.step} "
                 f"of {cfg.train.steps}; raise --steps to train further")
            return None
        talk(f"resuming from {start_from} (step {newest.step} of {cfg.train.steps}; the learning rate decays "
             f"over {cfg.train.lr_decay_steps} steps)")
    resuming.check_room(cfg, out / "ckpt", newest)
    if newest is not None:   # every refusal is behind: drop a torn last line and the rows to retrain
        logged_rows(out / "metrics.jsonl", newest.step, say=note)
    return cfg, start_from


def _peer_line(exc, out, advice: str) -> str | None:
    """One line for a local run that a rank's death or silence stopped, naming that rank (the launcher saw
    it die or stay silent), the phase and the path; None for other failures."""
    import dataclasses

    from ..distributed.comm import PeerFailed, PeerFailure

    if isinstance(exc.original, PeerFailed):
        failure = exc.original.failure
    elif exc.crashed and min(exc.crashed) in exc.phases:   # it died before any peer noticed: its own phase
        failure = PeerFailure(*exc.phases[min(exc.crashed)])
    else:
        return None
    if failure.phase == "start-up":   # (the launcher's own start names no folder)
        failure = dataclasses.replace(failure, path=str(out))
    if exc.crashed:
        code = exc.crashed[min(exc.crashed)]
        signals = {-s.value: s.name for s in signal.Signals}
        died = f"died (killed by {signals[code]})" if code in signals else f"exited with code {code}"
        failure = failure.blame(exc.crashed, died)
    elif exc.silent:
        failure = failure.blame(exc.silent)
    return f"distattn train: {failure.line()}; the run stopped{advice}"


def _peer_failed(exc, out, rank: int) -> int:
    """Under a launcher: one line from rank 0, or from another rank when rank 0 is the one that failed or
    it cannot tell (each rank decides alone: the group is broken)."""
    import threading

    from ..train.checkpoint.resume import usable_checkpoint

    if threading.current_thread() is threading.main_thread():
        # the run is over: torchrun's SIGTERM to the ranks left (it saw the peer die) must not turn exit
        # code 1 into death by SIGTERM while this process prints and exits
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    blamed = exc.failure.ranks
    if rank == 0 or not blamed or 0 in blamed:
        saved = usable_checkpoint(out)
        advice = f"; rerun with --resume to continue from {saved}" if saved else ""
        print(f"distattn train: {exc}; the run stopped{advice}", file=sys.stderr)
    return 1


def _train_and_report(cfg, out, resume, talk, again: str, allow_reshape: bool = False) -> int:
    """Run the ranks; the command's exit code, with one line for a run that failed or was stopped (``again``:
    the command that continues the run, :func:`_done_lines`; ``allow_reshape``: ``--allow-reshape``)."""
    from ..distributed.comm import PeerFailed
    from ..distributed.spawn import RankError, Terminated
    from ..train.checkpoint import dcp as checkpoint
    from ..train.checkpoint.resume import usable_checkpoint
    from ..train.safe_io import WriteFailed
    from ..train.metrics import bar_can_draw
    from ..train.trainer import run

    launched = "RANK" in os.environ
    before = {} if launched else checkpoint.partials(out / "ckpt")
    try:
        # the command's console, whatever --log-level: a bar on a terminal, else one line per logged step
        history = run(cfg, resume=resume, progress="bar" if bar_can_draw() else "line", allow_reshape=allow_reshape)
    except PeerFailed as exc:   # under a launcher: this rank saw a peer die or fall silent
        return _peer_failed(exc, out, int(os.environ.get("RANK", "0")))
    except Terminated as exc:
        print(_stopped(exc, out), file=sys.stderr)
        return exc.exit_code
    except WriteFailed as exc:   # under a launcher: this rank's own
        print(f"distattn train: {exc}; newest good checkpoint: {usable_checkpoint(out) or 'none'}", file=sys.stderr)
        return 1
    except RankError as exc:
        checkpoint.drop_new_partials(out / "ckpt", before)
        saved = usable_checkpoint(out)
        advice = f"; rerun with --resume to continue from {saved}" if saved else ""
        peer = _peer_line(exc, out, advice)
        if peer is not None:
            print(peer, file=sys.stderr)
            return 1
        first = str(exc).splitlines()[0]
        for agreed in (": NonFinite: ", ": WriteFailed: "):   # every rank agrees on these: no one rank failed
            if agreed in first:
                print(f"distattn train: {first.split(agreed, 1)[1]}; newest good checkpoint: {saved or 'none'}",
                      file=sys.stderr)
                return 1
        print(f"distattn train: a rank failed, stopping the job: {first}{advice}", file=sys.stderr)
        return 1
    for line in _done_lines(history, out, again):
        talk(line)
    return 0


def _done_lines(history: list[dict], out, again: str) -> list[str]:
    """The end of a run that finished: its losses and speed, and where everything it wrote is (``again``:
    the command that trains the run further, ``--steps N`` left to add)."""
    from ..train.checkpoint.resume import usable_checkpoint

    if not history:
        return []
    first, last = history[0], history[-1]
    mean_tps = sum(m["tokens_per_s"] for m in history) / len(history)
    lines = [f"done: steps {first['step']}-{last['step']}, loss {first['loss']:.4f} -> {last['loss']:.4f}, mean "
             f"{mean_tps:,.0f} tokens/s", f"  metrics: {out}/metrics.jsonl"]
    if (out / "tb").is_dir():
        board = shlex.join([*tool_command("tensorboard", "tensorboard.main"), "--logdir", str(out / "tb")])
        lines.append(f"  TensorBoard: {board}")
    saved = usable_checkpoint(out)
    lines.append(f"  last checkpoint: {saved}; train further: {again} --resume --steps N" if saved else
                 "  no checkpoint verifies: see the lines above")
    return lines


def _cmd_train(args) -> int:
    from pathlib import Path

    from ..train.preflight import checks as preflight
    from ..train.checkpoint import resume as resuming

    cfg = _train_config(args)
    if args.print_config:
        return _print_config(cfg)
    p, out = cfg.parallel, Path(cfg.train.out)
    launched = "RANK" in os.environ
    # under a launcher every rank runs this command: rank 0 talks and owns the output folder
    rank0 = os.environ.get("RANK", "0") == "0"
    talk = print if rank0 else (lambda *a, **k: None)
    if args.dry_run:
        return _dry_run(cfg, args, talk)
    if args.max_seq_len:
        raise ValueError("--max-seq-len is a question for the estimate: add --dry-run")
    preflight.check_data(cfg)
    if not launched:
        preflight.check_memory(cfg, cfg.world_size)
    resume = resuming.resume_from(out, args.resume)
    # a torchrun restart that finds nothing to resume starts the run again
    restarted = resuming.restarted()
    overwrite = args.overwrite and not restarted or (restarted and not resume)
    lock = preflight.lock_out(out) if rank0 else None
    try:
        start_from = None
        if rank0:
            prepared = _prepare_out(cfg, out, resume, overwrite, launched, talk, args.allow_reshape)
            if prepared is None:
                return 0
            cfg, start_from = prepared
        talk(f"distattn train {args.config}: {cfg.world_size} rank(s) (dp {p.dp} x cp {p.cp}), scheduler "
             f"{p.scheduler}, {cfg.data.seq_len} tokens per sequence, {cfg.train.steps} steps -> {out}", flush=True)
        # a local run's checkpoint was hashed above, before any rank started: the ranks take it as it is
        verified = start_from if resume and not launched and start_from is not None else None
        scheduler = ["--scheduler", args.scheduler] if args.scheduler else []
        # (the executable as the user ran it: the printed command runs as written in the same shell)
        again = shlex.join([*distattn_command(), "train", args.config, *args.overrides, *scheduler, "--out", str(out)])
        return _train_and_report(cfg, out, verified or resume, talk, again, args.allow_reshape)
    finally:
        if lock is not None:
            lock.close()


def _cmd_launch(args) -> int:
    import shlex
    import subprocess

    from ..launch import LaunchOptions, local_command, sbatch_script, torchrun_command

    if args.rdzv_host is not None and args.backend != "torchrun":
        raise ValueError(f"--rdzv-host is for --backend torchrun; {args.backend} finds its peers itself")
    if args.backend == "local" and (args.nodes != 1 or args.gpus_per_node):
        raise ValueError("--backend local runs CPU processes on this machine; drop --nodes/--gpus-per-node or "
                         "choose --backend torchrun, slurm or ray")
    cfg = _config(args, {"train.out": args.out})
    opts = LaunchOptions(nodes=args.nodes, gpus_per_node=args.gpus_per_node, port=args.port, time=args.time,
                         partition=args.partition, account=args.account, max_restarts=args.max_restarts,
                         log_dir=args.log_dir, cpus_per_task=args.cpus_per_task, signal_lead=args.signal_lead)
    if args.backend == "ray":
        from ..launch import RayOptions, ray_train

        ray_opts = RayOptions(address=args.ray_address, num_cpus=args.ray_num_cpus,
                              gpus_per_worker=1 if args.gpus_per_node else 0)
        if args.dry_run:
            given = f"; {args.config} with {shlex.join(args.overrides)}" if args.overrides else ""
            print(f"Ray TorchTrainer: {cfg.world_size} workers, {ray_opts}{given}")
            return 0
        metrics = ray_train(cfg, ray_opts, resume=args.resume, allow_reshape=args.allow_reshape)
        print(f"ray job done: step {metrics.get('step', 0)}, loss {metrics.get('loss', float('nan')):.4f}; "
              f"metrics in {cfg.train.out}/metrics.jsonl")
        return 0
    if args.backend == "local":
        cmd = local_command(args.config, args.out, args.resume, args.overrides, args.allow_reshape)
    elif args.backend == "torchrun":
        cmd = torchrun_command(args.config, cfg, opts, args.out, args.resume, args.rdzv_host, args.overrides,
                               args.allow_reshape)
    else:
        script = sbatch_script(args.config, cfg, opts, args.out, args.resume, args.overrides, args.allow_reshape)
        if args.dry_run:
            print(script)
            return 0
        from pathlib import Path

        from ..launch import submit_sbatch, wait_slurm_job

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


def _add_demo(sub) -> None:
    demo = sub.add_parser(
        "demo", help="run every scheduler on local gloo ranks and compare with fp64 attention",
        description="Run each scheduler's forward and backward on N local gloo processes and print its time and "
                    "its error against fp64 attention of the same inputs on one device.",
        epilog=examples(".venv/bin/distattn demo",
                        ".venv/bin/distattn demo --world-size 8 --schedulers zigzag cad --seq-len 16384",
                        ".venv/bin/distattn demo --doc-lens 3000,120,1,12263 --window 512 --json"))
    demo.add_argument("--world-size", type=positive_int, default=4, help="number of gloo processes")
    demo.add_argument("--schedulers", nargs="+", default=None,
                      help="schedulers to run (default: every one that runs at this world size)")
    demo.add_argument("--seq-len", type=positive_int, default=4096,
                      help="tokens of the packed sequence of synthetic documents")
    demo.add_argument("--doc-lens", type=int_list, default=None,
                      help="comma-separated document lengths (overrides --seq-len)")
    demo.add_argument("--heads", type=positive_int, default=8, help="query heads")
    demo.add_argument("--kv-heads", type=positive_int, default=2, help="key/value heads (divides --heads)")
    demo.add_argument("--head-dim", type=positive_int, default=64, help="head dimension")
    demo.add_argument("--dtype", default="fp32", choices=["fp32", "fp64", "bf16", "fp16"], help="q/k/v dtype")
    demo.add_argument("--causal", action=argparse.BooleanOptionalAction, default=True,
                      help="causal attention within each document")
    demo.add_argument("--window", type=positive_int, default=None, help="sliding window in tokens (none: off)")
    demo.add_argument("--backend", default="auto", help="local kernel: auto, triton, torch or reference")
    demo.add_argument("--repeats", type=positive_int, default=3, help="timed rounds (the median is printed)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the inputs and synthetic documents")
    demo.add_argument("--ulysses-degree", type=positive_int, default=None,
                      help="usp's Ulysses group size (default: the scheduler's)")
    demo.add_argument("--json", action="store_true", help="print the rows as JSON")
    demo.set_defaults(func=_cmd_demo)


def _add_train(sub) -> None:
    train = sub.add_parser(
        "train", help="train the reference model on packed documents (the main job)",
        description="Train the Llama-style reference model with context parallelism. Without a launcher this "
                    "starts dp * cp local gloo processes; under torchrun/srun it joins the job's process group. "
                    "Writes OUT/metrics.jsonl, OUT/tb/ and checksummed checkpoints OUT/ckpt/step_N (a resume "
                    "uses the newest that verifies; `distattn ckpt verify` checks them). SIGTERM saves a "
                    "checkpoint at the next step boundary and exits 143; a first Ctrl-C does the same and exits "
                    "130, a second stops at once; SIGUSR1 (Slurm's --signal warning) does the same and exits 0.",
        epilog=examples(".venv/bin/distattn train configs/tiny.yaml",
                        ".venv/bin/distattn train configs/tiny.yaml --scheduler cad --steps 100 --out runs/cad",
                        ".venv/bin/distattn train configs/tiny.yaml parallel.cp=2 train.lr=1e-4 model.n_layers=2",
                        ".venv/bin/distattn train configs/tiny.yaml parallel.cp=2 --print-config",
                        ".venv/bin/distattn train configs/tiny.yaml --steps 200 --out runs/cad --resume",
                        ".venv/bin/distattn train configs/llama3-8b-128k-64gpu.yaml --dry-run",
                        ".venv/bin/distattn train configs/llama3-8b-128k-64gpu.yaml --dry-run --max-seq-len",
                        ".venv/bin/torchrun --nproc-per-node 8 -m distattn.cli train configs/llama3-8b-128k-64gpu.yaml"))
    train.add_argument("config", help="YAML run config, e.g. configs/tiny.yaml")
    _add_overrides(train, "(any number, after CONFIG)")
    train.add_argument("--steps", type=positive_int, default=None, help="override train.steps")
    train.add_argument("--scheduler", default=None,
                       help=f"override parallel.scheduler ({', '.join(SCHEDULERS)})")
    train.add_argument("--out", default=None, help="override train.out (metrics.jsonl, tb/, ckpt/)")
    train.add_argument("--print-config", action="store_true",
                       help="print the config as it would run (file, overrides and defaults, checked) as YAML and "
                            "exit 0; start nothing")
    run_mode = train.add_mutually_exclusive_group()
    run_mode.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in OUT/ckpt")
    run_mode.add_argument("--overwrite", action="store_true",
                          help="delete OUT's metrics, TensorBoard events and checkpoints first")
    train.add_argument("--allow-reshape", action="store_true",
                       help="with --resume (or a torchrun restart): continue even though data.seq_len, parallel.dp, "
                            "parallel.cp, the world size or data.packing differ from the checkpoint's, which trains "
                            "a different run (other batches); said once, and the first step's metrics row has "
                            "\"reshaped\". Without it such a resume is refused")
    train.add_argument("--dry-run", action="store_true",
                       help="validate the config and print parameters, tokens per rank and the per-rank memory "
                            "estimate (with every activation-checkpointing setting); start no rank, read no data, "
                            "touch no output folder. Exit 0 when it fits, 1 when it does not")
    train.add_argument("--max-seq-len", action="store_true",
                       help="--dry-run: also print the longest seq_len that fits, per activation-checkpointing "
                            "setting, with the MLP whole and tiled (train.mlp_chunk)")
    train.add_argument("--gpu-memory-gib", type=float, default=80.0, help="--dry-run: memory of one GPU")
    train.add_argument("--estimate-for", choices=["auto", "cpu", "gpu"], default="auto",
                       help="--dry-run: GPU ranks, or CPU processes on this machine; auto: cpu when the ranks fit "
                            "this machine as local processes (how `distattn train` runs without a launcher), else gpu")
    train.set_defaults(func=_cmd_train)


def _add_launch(sub) -> None:
    launch = sub.add_parser(
        "launch", help="run or submit a config: local processes, torchrun, a Slurm job or Ray Train",
        description="Run a config as local processes, print/run the torchrun command for one node, write and "
                    "submit a Slurm batch script, or run it on Ray Train. --dry-run prints what would run.",
        epilog=examples(".venv/bin/distattn launch configs/tiny.yaml --dry-run",
                        ".venv/bin/distattn launch configs/llama3-8b-128k-64gpu.yaml --backend slurm --nodes 8 "
                        "--gpus-per-node 8 --partition gpu --dry-run",
                        ".venv/bin/distattn launch configs/llama3-8b-128k-64gpu.yaml --backend torchrun --nodes 8 "
                        "--gpus-per-node 8 --rdzv-host node001 --dry-run",
                        ".venv/bin/distattn launch configs/tiny.yaml --backend ray --ray-num-cpus 4",
                        ".venv/bin/distattn launch configs/tiny.yaml parallel.cp=2 train.steps=10 "
                        "--backend torchrun --dry-run"))
    launch.add_argument("config", help="YAML run config")
    _add_overrides(launch, "for every rank (passed on as written)")
    launch.add_argument("--backend", choices=["local", "torchrun", "slurm", "ray"], default="local",
                        help="how to start the ranks")
    launch.add_argument("--nodes", type=positive_int, default=1, help="nodes the job spans")
    launch.add_argument("--gpus-per-node", type=int, default=0, help="GPUs (ranks) per node; 0: CPU processes "
                        "with gloo, dp * cp / --nodes per node")
    launch.add_argument("--dry-run", action="store_true", help="print the command or sbatch script, run nothing")
    launch.add_argument("--out", default=None, help="override train.out")
    launch.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    launch.add_argument("--allow-reshape", action="store_true",
                        help="passed on to distattn train: resume even though the batch geometry changed")
    launch.add_argument("--port", type=int, default=29500, help="rendezvous port")
    launch.add_argument("--rdzv-host", default=None,
                        help="torchrun: rendezvous host, the first node (required with --nodes > 1; one node: "
                             "127.0.0.1)")
    launch.add_argument("--max-restarts", type=int, default=0, help="torchrun restarts; training resumes itself")
    launch.add_argument("--time", default="01:00:00", help="slurm: time limit")
    launch.add_argument("--partition", default=None, help="slurm: partition (default: the cluster's)")
    launch.add_argument("--account", default=None, help="slurm: account (default: yours)")
    launch.add_argument("--log-dir", default="logs", help="slurm: where the script and job logs go")
    launch.add_argument("--cpus-per-task", type=int, default=None, help="slurm: cores of the one task per node "
                        "(torchrun and its ranks; default: one per rank of a node)")
    launch.add_argument("--signal-lead", type=int, default=120, help="slurm: SIGUSR1 this many seconds before "
                        "the time limit (--signal=USR1@N): the ranks checkpoint and exit 0; 0: no warning")
    launch.add_argument("--wait", action="store_true", help="slurm: follow the job until it ends; exit 1 unless "
                        "it COMPLETED")
    launch.add_argument("--wait-timeout", type=float, default=24 * 3600.0, help="slurm: seconds --wait gives up after")
    launch.add_argument("--ray-address", default=None,
                        help="ray: cluster address (default: RAY_ADDRESS, a cluster started here, else a local one)")
    launch.add_argument("--ray-num-cpus", type=int, default=None,
                        help="ray: CPUs of a new local cluster (default: all)")
    launch.set_defaults(func=_cmd_launch)


def add_parsers(sub) -> None:
    """The ``demo``, ``train`` and ``launch`` sub-commands, in the order ``distattn --help`` lists them."""
    _add_demo(sub)
    _add_train(sub)
    _add_launch(sub)
