"""Trainer step time with ``train.compile`` on and off, side by side in one run:

    python -m distattn.bench.compiled_step [--config configs/tiny.yaml] [--cp 2] [--scheduler zigzag]
                                                 [--settings none full] [--seq-len 8192] [--steps 6]

For each ``train.activation_checkpointing`` setting, ``--cp`` ranks run ``--steps`` trainer steps
(``distattn.train.trainer.train``: the optimizer, the chunked loss, the config's dp_mode) eagerly and
then with every block compiled; step 1 of a compiled run includes compiling (dynamo + inductor, both
passes), so the step time is the median of the later steps. ``eager/compiled`` > 1: compiling
made the step faster. Data: a synthetic corpus of ``--doc-len``-token documents.

On a GPU the step is attention and GEMMs, and compiling fuses the elementwise work around them
(norms, RoPE, SwiGLU's gate): run it there for the number that matters. On CPU it says what
inductor's C++ kernels do against eager PyTorch for this model.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from ..schedulers import NAMES
from ..distributed.spawn import run_distributed
from .memory import check_positive, run_config, trainer_bench_parser, write_corpus
from ..train.config import CHECKPOINTING, load_config, validate
from ..train.trainer import train


def timed(cfg) -> dict:
    """Rank 0's step times of one run: the first step and the median of the others."""
    history = run_distributed(train, cfg.world_size, cfg, timeout=3600.0, collective_timeout=cfg.parallel.timeout_s)[0]
    times = [m["step_time_s"] for m in history]
    return {"first": times[0], "median": statistics.median(times[1:]), "loss": history[-1]["loss"]}


def _parser() -> argparse.ArgumentParser:
    parser = trainer_bench_parser("python -m distattn.bench.compiled_step", __doc__)
    parser.add_argument("--scheduler", default="zigzag", choices=NAMES)
    parser.add_argument("--settings", nargs="+", default=["none", "full"], choices=CHECKPOINTING,
                        help="train.activation_checkpointing settings to time")
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=6, help="steps per run (the first is left out of the median)")
    parser.add_argument("--doc-len", type=int, default=3000, help="tokens per synthetic document")
    return parser


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    check_positive(args, ("cp", "seq_len", "doc_len"))
    if args.steps < 2:
        raise ValueError(f"--steps must be >= 2 (the first step compiles; the others are timed), got {args.steps}")
    base = validate(load_config(args.config).replace(parallel={"cp": args.cp, "scheduler": args.scheduler}))
    start = time.perf_counter()
    print(f"distattn.bench.compiled_step: {args.config} model, cp {args.cp} ({args.scheduler}), fp32, "
          f"seq_len {args.seq_len}, {args.steps} steps a run", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="distattn-bench-compile-") as tmp:
        write_corpus(Path(tmp) / "corpus", base.model.vocab_size, args.doc_len)
        for mode in args.settings:
            row = {}
            for compiled in (False, True):
                cfg = run_config(base.replace(train={"compile": compiled}), args.scheduler, ("fp32", mode),
                                 args.seq_len, Path(tmp) / "corpus", Path(tmp) / f"run-{mode}-{compiled}", args.steps)
                print(f"[{time.perf_counter() - start:5.0f} s] {mode}, {'compiled' if compiled else 'eager'}",
                      flush=True)
                row[compiled] = timed(cfg)
            rows.append((mode, row))
    print(f"\nstep time, rank 0, median of steps 2..{args.steps} (first step: includes compiling):")
    print(f"  {'checkpointing':<14} {'eager s':>9} {'compiled s':>11} {'eager/compiled':>15} {'first eager s':>14} "
          f"{'first compiled s':>17} {'loss diff':>10}")
    for mode, r in rows:
        e, c = r[False], r[True]
        print(f"  {mode:<14} {e['median']:>9.3f} {c['median']:>11.3f} {e['median'] / c['median']:>15.2f} "
              f"{e['first']:>14.2f} {c['first']:>17.2f} {abs(e['loss'] - c['loss']):>10.2e}")
    print(f"({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
