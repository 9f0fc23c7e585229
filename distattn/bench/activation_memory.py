"""Device memory per token, measured in real training steps, next to the estimate's:

    python -m distattn.bench.activation_memory [--settings none full offload offload+tiled]
                                                     [--lens 2048 4096 8192] [--cp 2] [--scheduler zigzag]

For each setting (``train.activation_checkpointing``, ``+tiled``: with ``train.mlp_chunk
--mlp-chunk``) and each length, ``--cp`` CPU ranks run ``--steps`` trainer steps of the config's
model (``distattn.train.trainer.train``: DDP/FSDP, the optimizer, the chunked loss) under
:class:`distattn.bench.memtrack.TensorMemory`, which counts the live tensor bytes on the device --
what a GPU's allocator holds, without glibc's retention, and without what offload moved to host
memory. The peak (max over ranks) is fitted by least squares over the lengths: its slope is the
measured bytes per token. The estimate's slope is fitted the same way from
``distattn.train.preflight.memory.estimate`` of each run's config (GPU accounting: device bytes only), given
the same document lengths. ``est/meas`` is their ratio.

Data: a synthetic corpus of ``--doc-len``-token documents (written to a temporary folder); the
default length lets documents straddle the zigzag chunks, so K/V and dK/dV do move between ranks.
Default settings on two CPU cores: about 2 minutes. Measured there (Nov 2026): est/meas 1.000
(none), 1.013 (full), 1.005 (offload), 1.007 (offload+tiled).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from ..schedulers import NAMES
from ..distributed.spawn import run_distributed
from .memory import check_positive, doc_lens, run_config, trainer_bench_parser, write_corpus
from ..train.config import CHECKPOINTING, RunConfig, load_config, validate
from ..train.preflight.memory import estimate
from .memtrack import TensorMemory
from ..train.trainer import train

DEFAULT_SETTINGS = ("none", "full", "offload", "offload+tiled")


def parse_setting(text: str) -> tuple[str, bool]:
    """``"offload+tiled"`` -> ``("offload", True)``; ``ValueError`` naming ``--settings`` otherwise."""
    mode, plus, tiled = text.partition("+")
    if mode not in CHECKPOINTING or (plus and tiled != "tiled"):
        raise ValueError(f"--settings: {text!r} is not CHECKPOINTING or CHECKPOINTING+tiled with CHECKPOINTING in "
                         f"{', '.join(CHECKPOINTING)} (e.g. offload+tiled)")
    return mode, bool(plus)


def _tracked_rank(cfg: RunConfig) -> int:
    with TensorMemory("cpu") as mem:
        train(cfg)
    return mem.peak


def slope(lens, values) -> float:
    """Least-squares bytes per token through ``(len, value)`` points."""
    return float(np.polyfit(np.asarray(lens, dtype=float), np.asarray(values, dtype=float), 1)[0])


def measure(base: RunConfig, setting: tuple[str, bool], args, tmp: Path) -> dict:
    """Peaks (measured, estimated) per length and both slopes for one setting."""
    mode, tiled = setting
    peaks, estimates = [], []
    for n in args.lens:
        cfg = run_config(base.replace(train={"mlp_chunk": args.mlp_chunk if tiled else 0}), args.scheduler,
                         ("fp32", mode), n, tmp / "corpus", tmp / f"run-{mode}-{tiled}-{n}", args.steps)
        try:
            peaks.append(max(run_distributed(_tracked_rank, cfg.world_size, cfg, timeout=1800.0,
                                             collective_timeout=cfg.parallel.timeout_s)))
        finally:
            shutil.rmtree(cfg.train.out, ignore_errors=True)
        est = estimate(cfg, "cuda", doc_lens(n, args.doc_len))
        estimates.append(est.total - est.runtime)
        print(f"    seq_len {n:>6}: measured {peaks[-1] / 2**20:8.1f} MiB, estimate {estimates[-1] / 2**20:8.1f} MiB",
              flush=True)
    return {"peaks": peaks, "estimates": estimates, "measured": slope(args.lens, peaks),
            "estimated": slope(args.lens, estimates)}


def _parser() -> argparse.ArgumentParser:
    parser = trainer_bench_parser("python -m distattn.bench.activation_memory", __doc__)
    parser.add_argument("--scheduler", default="zigzag", choices=NAMES)
    parser.add_argument("--head-groups", type=int, default=1, help="parallel.head_groups (ulysses, usp)")
    parser.add_argument("--settings", nargs="+", default=list(DEFAULT_SETTINGS),
                        help="CHECKPOINTING or CHECKPOINTING+tiled (the MLP --mlp-chunk tokens at a time)")
    parser.add_argument("--lens", type=int, nargs="+", default=[4096, 8192, 16384],
                        help="sequence lengths (at least three) the slopes are fitted over")
    parser.add_argument("--mlp-chunk", type=int, default=256, help="train.mlp_chunk of the +tiled settings")
    parser.add_argument("--steps", type=int, default=2, help="trainer steps per run (step 2 has AdamW's state)")
    parser.add_argument("--doc-len", type=int, default=3000, help="tokens per synthetic document")
    return parser


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    settings = [parse_setting(s) for s in args.settings]
    if len(set(args.lens)) < 3 or min(args.lens) < 1:
        raise ValueError(f"--lens: at least three different positive lengths, got {args.lens}")
    check_positive(args, ("cp", "mlp_chunk", "steps", "doc_len", "head_groups"))
    base = validate(load_config(args.config).replace(parallel={"cp": args.cp, "scheduler": args.scheduler,
                                                                "head_groups": args.head_groups}))
    start = time.perf_counter()
    print(f"distattn.bench.activation_memory: {args.config} model, cp {args.cp} ({args.scheduler}, head_groups "
          f"{args.head_groups}), fp32, "
          f"lengths {args.lens}, {args.steps} steps a run", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="distattn-bench-actmem-") as tmp:
        write_corpus(Path(tmp) / "corpus", base.model.vocab_size, args.doc_len)
        for setting, name in zip(settings, args.settings):
            print(f"[{time.perf_counter() - start:5.0f} s] {name}", flush=True)
            rows.append((name, measure(base, setting, args, Path(tmp))))
    print(f"\ndevice bytes per token (slope over {len(args.lens)} lengths; peak = max over ranks of live tensors):")
    print(f"  {'setting':<16} {'measured B/tok':>15} {'estimate B/tok':>15} {'est/meas':>9}")
    for name, r in rows:
        print(f"  {name:<16} {r['measured']:>15,.0f} {r['estimated']:>15,.0f} {r['estimated'] / r['measured']:>9.3f}")
    print(f"({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
