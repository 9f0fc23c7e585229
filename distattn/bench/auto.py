"""``parallel.scheduler/cp: auto`` against every fixed choice in the trainer, side by side in one run:

    python -m distattn.bench.auto [--steps N] [--seq-len 4096] [--seed 0]

The corpus mixes, in every step of ``2 x seq_len`` tokens, one long document (3/4 of a sequence)
with many short ones (1/128 to 1/32 of one). 8 gloo ranks (a small model, CPU) train it with
``dp 2`` sequences a step, once per choice: ``auto`` (``cp: auto``, ``scheduler: auto``, 8 ranks) and
each fixed ``(scheduler, cp 4)`` with balanced packing. Every rank holds one trainer per run and
steps them in turn (the first run alternates), so that the machine's load falls on all alike.

Per step it prints each run's step time (rank 0's ``step_time_s``, which waits for the slowest rank
at the gradient all-reduce) and ``auto``'s choice. At the end: medians over the steps after the first
of each run's measured and predicted step, the prediction's median error, and each fixed run's over
``auto``'s, measured and as the chooser's model has it. A prediction is the chooser's model of the
step (an H100 cluster's kernel and links with this small model: about 1e-4 s) calibrated to this
machine by the run's earlier steps (:mod:`distattn.train.step_calibration`, as the trainer reports
``auto``'s ``predicted_step_s``); the fixed runs' model seconds are the chooser's for the fixed choice
on the same sequences.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..distributed.spawn import run_distributed
from .packing import MODEL, bench_args, set_up
from ..train.config import RunConfig, validate
from ..train.data.corpus import write_token_file

FIXED = ("zigzag", "ulysses", "usp", "allgather")
CP = 4


def corpus(seq_len: int, steps: int, seed: int) -> list[np.ndarray]:
    """Per step: one document of ``3/4 seq_len`` tokens, then short ones up to ``2 x seq_len``."""
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(steps + 1):
        room = 2 * seq_len - 3 * seq_len // 4
        docs.append(rng.integers(0, MODEL["vocab_size"], 3 * seq_len // 4))
        while room > 0:
            n = min(room, int(rng.integers(max(1, seq_len // 128), seq_len // 32 + 2)))
            docs.append(rng.integers(0, MODEL["vocab_size"], n))
            room -= n
    return docs


def configs(data: Path, out: Path, seq_len: int, steps: int) -> dict[str, RunConfig]:
    train = {"steps": steps, "warmup_steps": 1, "ckpt_every": 10**6, "log_every": 10**6}
    base = {"model": MODEL, "data": {"source": "tokens", "path": str(data), "seq_len": seq_len}}
    runs = {"auto": {"dp": 2, "cp": "auto", "world_size": 8, "scheduler": "auto"}}
    runs.update({f"{name} cp {CP}": {"dp": 2, "cp": CP, "scheduler": name} for name in FIXED})
    return {name: validate(RunConfig().replace(**base, parallel=parallel, train={**train, "out": str(out / str(i))}))
            for i, (name, parallel) in enumerate(runs.items())}


def predicted_fixed(cfg: RunConfig, steps: int) -> dict[str, list[float]]:
    """Per fixed run, per step: the chooser's model of the fixed choice on the step's sequences
    (stream-cut, as the trainer cuts them; balanced packing deals them alike up to its cap)."""
    from ..sim.job import links_of
    from ..sim.dp import dp_seconds
    from ..sim.per_batch import balanced_layout, class_time, lengths_of
    from ..train.auto_plan import job_of, network_of
    from ..train.data.packer import Packer
    from ..train.data.corpus import TokenFileCorpus

    d = cfg.data
    packer = Packer(TokenFileCorpus(d.path), d.seq_len, seed=d.seed)
    job = replace(job_of(cfg), activation_checkpointing="none", mlp_chunk=0)
    links = links_of(network_of(cfg), job)
    dp = dp_seconds(job, links.cp)
    out = {f"{name} cp {CP}": [] for name in FIXED}
    for _ in range(steps):
        lens = [b - a for _ in range(2) for _, _, a, b in packer.cut(d.seq_len)]
        layout = balanced_layout(lens, 2, CP, 1, d.cap, cfg.model.shape.pair_weight())
        groups = [rounds for _, rounds in lengths_of(layout, lens)]
        for name in FIXED:
            out[f"{name} cp {CP}"].append(class_time(job, name, CP, groups, links, dp))
    return out


def _side_by_side(runs: dict[str, RunConfig], steps: int) -> list[dict]:
    import torch.distributed as dist

    talk = dist.get_rank() == 0
    trainers, start = set_up(runs, lambda cfg: f"dp {cfg.parallel.dp} x cp {cfg.parallel.cp}, "
                                               f"{cfg.parallel.scheduler}")
    names = list(runs)
    rows = []
    for step in range(steps):
        row = {}
        order = names[step % len(names):] + names[:step % len(names)]
        for name in order:
            row[name] = trainers[name].step()
        rows.append(row)
        if talk:
            times = "  ".join(f"{n} {row[n]['step_time_s']:.3f}" for n in names)
            choice = " ".join(f"{s}:{c}" for s, c in row["auto"]["choice"])
            print(f"[{time.perf_counter() - start:4.0f} s] step {step + 1}/{steps}: {times} s; auto chose {choice}",
                  flush=True)
    for trainer in trainers.values():
        trainer.close()
    return rows


def forecasts(model_s: list[float], measured_s: list[float]) -> list[float]:
    """Each step's predicted seconds on this machine: the model's, calibrated by the steps before it
    (:class:`~distattn.train.step_calibration.StepCalibration`, as the trainer does for ``auto``)."""
    from ..train.step_calibration import StepCalibration

    calibration, out = StepCalibration(), []
    for model, measured in zip(model_s, measured_s):
        out.append(calibration.predict(model))
        calibration.add(model, measured)
    return out


def summary(rows: list[dict], predicted: dict[str, list[float]]) -> list[str]:
    """The end of the bench: per run, the median measured and predicted step, the median error of the
    prediction (each step forecast from the steps before it; steps from the fourth, when the
    calibration has two steps behind it), and each run over ``auto``, measured and as the model has
    it. ``predicted``: each fixed run's model seconds per step (:func:`predicted_fixed`)."""
    later = range(1, len(rows)) if len(rows) > 1 else range(len(rows))
    scored = range(3, len(rows)) if len(rows) > 3 else later
    measured = {n: [r[n]["step_time_s"] for r in rows] for n in rows[0]}
    model = {"auto": [r["auto"].get("model_step_s", r["auto"]["predicted_step_s"]) for r in rows], **predicted}
    guess = {"auto": [r["auto"]["predicted_step_s"] for r in rows]}   # (the trainer's own forecast)
    guess.update({n: forecasts(p, measured[n]) for n, p in predicted.items()})

    def median(values, steps):
        return statistics.median(values[i] for i in steps)

    lines = [f"{'run':<16} {'measured s':>10} {'predicted s':>11} {'|error|':>8} {'measured / auto':>16} "
             f"{'model / auto':>13}"]
    for n in rows[0]:
        error = statistics.median(abs(guess[n][i] / measured[n][i] - 1) for i in scored)
        lines.append(f"{n:<16} {median(measured[n], later):>10.3f} {median(guess[n], later):>11.3f} {error:>8.1%} "
                     f"{median(measured[n], later) / median(measured['auto'], later):>16.2f} "
                     f"{median(model[n], later) / median(model['auto'], later):>13.2f}")
    late = sum(bool(r["auto"].get("choice_late")) for r in rows)
    lines.append(f"auto: its choice was late (the fixed choice ran) on {late} of {len(rows)} steps; the steps waited "
                 f"{statistics.median(r['auto']['planning_s'] for r in rows[1:] or rows):.3f} s (median) for plans "
                 f"that took {statistics.median(r['auto']['plan_made_s'] for r in rows):.3f} s to make")
    best = min((n for n in rows[0] if n != "auto"), key=lambda n: median(measured[n], later))
    lines.append(f"median step time, steps 2..{len(rows)}: auto {median(measured['auto'], later):.3f} s, the best "
                 f"fixed choice ({best}) {median(measured[best], later):.3f} s: "
                 f"{median(measured[best], later) / median(measured['auto'], later):.2f}x")
    return lines


def main(argv=None) -> int:
    args = bench_args("distattn.bench.auto", __doc__, argv, doclens=False, steps=10)
    with tempfile.TemporaryDirectory(prefix="bench_auto-") as tmp:
        write_token_file(Path(tmp) / "corpus", corpus(args.seq_len, args.steps, args.seed))
        runs = configs(Path(tmp) / "corpus", Path(tmp), args.seq_len, args.steps)
        print(f"distattn.bench.auto: {len(runs)} runs on 8 gloo ranks, {args.steps} steps of 2 x {args.seq_len} "
              f"tokens (one document of {3 * args.seq_len // 4} and short ones a step)", flush=True)
        rows = run_distributed(_side_by_side, 8, runs, args.steps, timeout=3600.0)[0]
        predicted = predicted_fixed(runs["auto"], args.steps)
    for text in summary(rows, predicted):
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
