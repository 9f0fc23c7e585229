"""Balanced against stream packing (``data.packing``) in the trainer, side by side in one run:

    python -m distattn.bench.packing [--doclens PATH] [--steps N] [--seq-len 4096]

A heavy-tailed corpus -- ProLong's document lengths from ``--doclens`` (e.g.
``../shared/data/doclens/prolong.json``) divided by a factor that makes the mean document a
quarter of a sequence, or without the file the log-normal stand-in of :mod:`distattn.planning.doclens`
scaled the same way -- is written as a token file in a temporary folder. dp 2 x cp 2 (4 gloo
ranks, a small model, CPU) then train it twice in the same processes: every rank holds a trainer
with ``data.packing: stream`` and one with ``balanced`` and steps them in turn (which goes first
alternates), so that the machine's load falls on both alike. Both read the same stream of tokens.

Per step it prints each packing's DP imbalance (``dp_imbalance``: max / mean over the ranks of
tokens + pair_weight x visible causal pairs) and step time (rank 0's ``step_time_s``, which waits
for the slowest rank at the gradient all-reduce), and at the end the medians (steps after the
first) and their ratio. On CPU the ranks share the machine's cores: a rank waiting for another
frees its core, so step time follows the sum of the ranks' work more than the largest, and the gain
a GPU cluster gets from the lower imbalance shows here only in part.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from ..planning.doclens import load_doc_lens, pack
from ..distributed.spawn import run_distributed
from ..train.config import RunConfig, validate
from ..train.data.corpus import write_token_file

PACKINGS = ("stream", "balanced")
MODEL = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn_dim": 172, "vocab_size": 256}


def corpus_lengths(doclens: str | None, seq_len: int, tokens: int, seed: int = 0) -> tuple[np.ndarray, str]:
    """Document lengths of at least ``tokens`` tokens in all, drawn from ``doclens`` (a JSON list) or the
    log-normal stand-in, divided so the mean is ``seq_len / 4``; and a line saying which and how."""
    if doclens is not None:
        pool, name = load_doc_lens(doclens), Path(doclens).name
    else:
        pool, name = np.asarray(pack(2_000_000, seed=seed), dtype=np.int64), "log-normal stand-in (median 1900)"
    factor = float(pool.mean()) / (seq_len / 4)
    rng = np.random.default_rng(seed)
    draws = rng.choice(pool, size=int(4 * tokens / seq_len * 2) + 16)
    lens = np.maximum(1, np.round(draws / factor)).astype(np.int64)
    while lens.sum() < tokens:
        lens = np.concatenate([lens, lens])
    scaled = np.sort(lens)
    line = (f"{name}: {len(pool):,} lengths / {factor:.2f}: {len(lens):,} documents, median {int(np.median(scaled))}, "
            f"p99 {int(np.percentile(scaled, 99)):,}, max {int(scaled[-1]):,} tokens (seq_len {seq_len:,})")
    return lens, line


def configs(data: Path, out: Path, seq_len: int, steps: int) -> dict[str, RunConfig]:
    """The two runs: the same model, data and seeds, stream and balanced packing."""
    return {name: validate(RunConfig().replace(
        model=MODEL, data={"source": "tokens", "path": str(data), "seq_len": seq_len, "packing": name},
        parallel={"dp": 2, "cp": 2, "scheduler": "zigzag"},
        train={"steps": steps, "warmup_steps": 1, "ckpt_every": 10**6, "log_every": 10**6, "out": str(out / name)}))
        for name in PACKINGS}


def _side_by_side(runs: dict[str, RunConfig], steps: int) -> list[dict]:
    """On every rank: a trainer per packing, stepped in turn; rank 0 prints a line per step."""
    import torch.distributed as dist

    talk = dist.get_rank() == 0
    trainers, start = set_up(runs, lambda cfg: f"dp 2 x cp 2, zigzag, token_cap "
                                               f"{cfg.data.cap if cfg.packing == 'balanced' else '-'}")
    rows = []
    if talk:
        print(f"{'':8} {'step':>7}  {'stream: dp-imb':>14} {'s/step':>7}  {'balanced: dp-imb':>16} {'s/step':>7} "
              f"{'held':>4}  loss (stream, balanced)", flush=True)
    for step in range(steps):
        row = {}
        for name in (PACKINGS if step % 2 == 0 else PACKINGS[::-1]):
            row[name] = trainers[name].step()
        rows.append(row)
        if talk:
            s, b = row["stream"], row["balanced"]
            print(f"[{time.perf_counter() - start:4.0f} s] {step + 1:>3}/{steps:<3}  {s['dp_imbalance']:>14.3f} "
                  f"{s['step_time_s']:>7.3f}  {b['dp_imbalance']:>16.3f} {b['step_time_s']:>7.3f} "
                  f"{b['held_documents']:>4}  {s['loss']:.4f} {b['loss']:.4f}", flush=True)
    for trainer in trainers.values():
        trainer.close()
    return rows


def summary(rows: list[dict]) -> list[str]:
    """The medians (steps after the first) and means of both runs, and the ratio of step times."""
    later = rows[1:] or rows
    med = {n: statistics.median(r[n]["step_time_s"] for r in later) for n in PACKINGS}
    imb = {n: statistics.mean(r[n]["dp_imbalance"] for r in rows) for n in PACKINGS}
    worst = {n: max(r[n]["dp_imbalance"] for r in rows) for n in PACKINGS}
    held = sum(r["balanced"]["held_documents"] for r in rows)
    return [f"dp_imbalance, mean (max) over {len(rows)} steps: stream {imb['stream']:.3f} ({worst['stream']:.3f}), "
            f"balanced {imb['balanced']:.3f} ({worst['balanced']:.3f}); {held} piece(s) held in all",
            f"median step time, steps 2..{len(rows)}: stream {med['stream']:.3f} s, balanced {med['balanced']:.3f} s; "
            f"ratio stream / balanced {med['stream'] / med['balanced']:.3f}"]


def set_up(runs: dict[str, RunConfig], describe) -> tuple[dict, float]:
    """On every rank: each run's trainer set up quietly (the benches print their own lines); rank 0
    says ``describe(cfg)`` of each. Returns the trainers and the clock's start."""
    import torch.distributed as dist

    from ..train.trainer import Trainer

    trainers, start = {}, time.perf_counter()
    for name, cfg in runs.items():
        with contextlib.redirect_stdout(io.StringIO()):   # no progress bar: the benches' lines are the output
            trainers[name] = Trainer(cfg).setup()
        if dist.get_rank() == 0:
            print(f"[{time.perf_counter() - start:5.0f} s] {name} run set up: {describe(cfg)}", flush=True)
    return trainers, start


def bench_args(prog: str, description: str, argv, doclens: bool = True, steps: int = 12) -> argparse.Namespace:
    """The arguments of a side-by-side training bench (this one's, ``bench_planning``'s and, without
    ``--doclens``, ``bench_auto``'s)."""
    parser = argparse.ArgumentParser(prog=f"python -m {prog}", description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    if doclens:
        parser.add_argument("--doclens", default=None, help="a JSON list of document lengths (ProLong's); default: "
                                                            "a log-normal stand-in")
    parser.add_argument("--steps", type=int, default=steps, help="steps of each run (the first is left out of medians)")
    parser.add_argument("--seq-len", type=int, default=4096, help="tokens per DP rank's sequence")
    parser.add_argument("--seed", type=int, default=0, help="the corpus's draw")
    args = parser.parse_args(argv)
    if args.steps < 2 or args.seq_len < 64:
        raise ValueError(f"--steps must be >= 2 and --seq-len >= 64, got {args.steps} and {args.seq_len}")
    return args


def run_side_by_side(prog: str, args, tokens: int, configs_of, side_by_side, ranks: int) -> list[dict]:
    """Write the heavy-tailed corpus of ``tokens`` tokens (:func:`corpus_lengths`) into a temporary
    folder, make the runs' configs there (``configs_of(data, out, seq_len, steps)``) and train them
    side by side on ``ranks`` gloo processes (``side_by_side(runs, steps)``): rank 0's rows."""
    lens, line = corpus_lengths(args.doclens, args.seq_len, tokens, args.seed)
    print(f"{prog}: {line}", flush=True)
    rng = np.random.default_rng(args.seed)
    with tempfile.TemporaryDirectory(prefix=f"{prog}-") as tmp:
        write_token_file(Path(tmp) / "corpus", [rng.integers(0, MODEL["vocab_size"], n) for n in lens])
        runs = configs_of(Path(tmp) / "corpus", Path(tmp), args.seq_len, args.steps)
        return run_distributed(side_by_side, ranks, runs, args.steps, timeout=3600.0)[0]


def main(argv=None) -> int:
    args = bench_args("distattn.bench.packing", __doc__, argv)
    rows = run_side_by_side("distattn.bench.packing", args, 2 * args.seq_len * args.steps, configs,
                            _side_by_side, 4)
    for text in summary(rows):
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
