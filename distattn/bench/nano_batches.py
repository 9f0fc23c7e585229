"""Trainer step time with one and with two ping-ponged nano-batches (``parallel.nano_batches``), side by
side in one run, for one or more schedulers:

    python -m distattn.bench.nano_batches [--config configs/tiny.yaml] [--cp 4] [--scheduler cad [usp ...]]
                                                [--seq-len 16384] [--steps 6] [--rounds 2]

``--cp`` gloo ranks train ``--steps`` steps of the config's model on the Python standard library's
sources (real document lengths; the config's data section), with one nano-batch, then with two, per
scheduler, ``--rounds`` times alternating, so that drift of the machine hits every run alike. A
run's step time is the median of its steps after the first (rank 0's ``step_time_s``, which leaves
out the metrics' bookkeeping); the table gives each round and the medians, the share two
nano-batches save, and the largest difference of the runs' losses (the same batches and weights:
rounding only). Every scheduler's executor runs in stages (``distattn/executors/base.py``), so each
one's transfers can hide behind the other nano-batch. On CPU gloo runs the transfers on its own
threads beside the ranks' compute, which share the machine's cores: what this measures is the
overlap the code gets here, not on a GPU cluster.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from ..schedulers import NAMES
from ..distributed.spawn import run_distributed
from .memory import check_positive, trainer_bench_parser
from ..train.config import load_config, validate
from ..train.trainer import train


def _run(cfg) -> tuple[float, list[float]]:
    history = run_distributed(train, cfg.world_size, cfg, timeout=3600.0, collective_timeout=cfg.parallel.timeout_s)[0]
    return statistics.median(m["step_time_s"] for m in history[1:]), [m["loss"] for m in history]


def main(argv=None) -> int:
    parser = trainer_bench_parser("python -m distattn.bench.nano_batches", __doc__)
    parser.add_argument("--scheduler", nargs="+", default=["cad"], choices=NAMES,
                        help="one or more schedulers, measured side by side")
    parser.add_argument("--seq-len", type=int, default=16384)
    parser.add_argument("--steps", type=int, default=6, help="steps per run (the first is left out)")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each, alternating")
    parser.set_defaults(cp=4)
    args = parser.parse_args(argv)
    check_positive(args, ("cp", "seq_len", "rounds"))
    if args.steps < 2:
        raise ValueError(f"--steps must be >= 2 (the first step is left out), got {args.steps}")
    base = validate(load_config(args.config).replace(
        parallel={"dp": 1, "cp": args.cp},
        data={"seq_len": args.seq_len},
        train={"steps": args.steps, "ckpt_every": 10**6, "log_every": args.steps, "warmup_steps": 1}))
    names = list(dict.fromkeys(args.scheduler))
    print(f"distattn.bench.nano_batches: {args.config} model, cp {args.cp} ({', '.join(names)}), "
          f"seq_len {args.seq_len}, {args.steps} steps a run, {args.rounds} rounds", flush=True)
    start = time.perf_counter()
    times = {(name, nano): [] for name in names for nano in (1, 2)}
    losses: dict[str, list] = {name: [] for name in names}
    with tempfile.TemporaryDirectory(prefix="distattn-bench-nano-") as tmp:
        for r in range(args.rounds):
            for name in names:
                for nano in (1, 2):
                    cfg = validate(base.replace(parallel={"scheduler": name, "nano_batches": nano},
                                                train={"out": str(Path(tmp) / f"run-{r}-{name}-{nano}")}))
                    step, loss = _run(cfg)
                    times[name, nano].append(step)
                    losses[name].append(loss)
                    print(f"[{time.perf_counter() - start:5.0f} s] round {r + 1}, {name}, {nano} nano-batch(es): "
                          f"{step:.3f} s/step", flush=True)
    print(f"\nstep time (s), rank 0, median of steps 2..{args.steps}:")
    rounds = " ".join(f"{'round ' + str(r + 1):>9}" for r in range(args.rounds))
    print(f"  {'scheduler':<10} {'nano':>4} {rounds} {'median':>9} {'saved':>7} {'loss diff':>10}")
    for name in names:
        one = statistics.median(times[name, 1])
        diff = max(abs(a - b) for run in losses[name][1:] for a, b in zip(run, losses[name][0]))
        for nano in (1, 2):
            cells = " ".join(f"{t:>9.3f}" for t in times[name, nano])
            median = statistics.median(times[name, nano])
            tail = f" {1 - median / one:>7.1%} {diff:>10.1e}" if nano == 2 else ""
            print(f"  {name:<10} {nano:>4} {cells} {median:>9.3f}{tail}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
