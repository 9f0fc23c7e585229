"""A step's exposed planning time with and without planning ahead (``parallel.plan_ahead``), side by side:

    python -m distattn.bench.plan_ahead [--doclens PATH] [--steps N] [--seq-len 4096]

8 gloo ranks (dp 2 x cp 4, a small model, CPU) train ``scheduler: cad`` pooled over all 8 ranks (two
nano-batches, one plan each, every step) on a heavy-tailed corpus: ProLong's document lengths from
``--doclens`` (e.g. ``../shared/data/doclens/prolong.json``), or the log-normal stand-in of
:mod:`distattn.planning.doclens`, scaled as :func:`distattn.bench.packing.corpus_lengths` scales them and
written as a token file in a temporary folder. Every rank holds two trainers on the same data and
seeds, ``plan_ahead: false`` and ``true``, and steps them in turn (which goes first alternates), so
the machine's load falls on both alike.

Fair to both: after each step of the plan-ahead trainer, this waits for the next step's plans the
thread is still making before the other trainer steps (so the thread never runs behind the other
trainer's step), and charges that wait to the next step's exposed planning and step time -- what
that step would have waited for them at its start had it started at once.

Per step it prints each run's exposed planning (``planning_s``: the seconds the step waited for its
batch and plans, max over the ranks), the seconds making them took (``plan_made_s``) and the step
time (``step_time_s``), and at the end the medians (steps after the first, which plans inline in
both runs) and their ratios. On CPU the thread shares the machine's cores with the ranks' compute,
so hidden planning still costs core time here; on GPUs the host thread is idle while kernels run.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from .packing import MODEL, bench_args, run_side_by_side, set_up
from ..train.config import RunConfig, validate

RUNS = ("inline", "ahead")   # parallel.plan_ahead false, true
DP, CP = 2, 4


def configs(data: Path, out: Path, seq_len: int, steps: int) -> dict[str, RunConfig]:
    """The two runs: the same model, data and seeds; cad pooled over dp 2 x cp 4; plan_ahead off and on."""
    return {name: validate(RunConfig().replace(
        model=MODEL, data={"source": "tokens", "path": str(data), "seq_len": seq_len},
        parallel={"dp": DP, "cp": CP, "scheduler": "cad", "plan_ahead": name == "ahead"},
        train={"steps": steps, "warmup_steps": 1, "ckpt_every": 10**6, "log_every": 10**6, "out": str(out / name)}))
        for name in RUNS}


def _settled(trainer) -> float:
    """Wait for the plans the trainer's thread is making (if any); the seconds waited, max over the ranks."""
    import torch
    import torch.distributed as dist

    waited = torch.tensor([trainer.ahead.wait()], dtype=torch.float64)
    dist.all_reduce(waited, op=dist.ReduceOp.MAX)
    return float(waited)


def _line(step: int, steps: int, row: dict, elapsed: float) -> str:
    cells = "  ".join(f"{row[n]['planning_s']:>9.3f} {row[n]['plan_made_s']:>8.3f} {row[n]['step_time_s']:>7.3f}"
                      for n in RUNS)
    losses = f"{row['inline']['loss']:.4f} {row['ahead']['loss']:.4f}"
    return f"[{elapsed:5.0f} s] {step:>3}/{steps:<3}  {cells}  loss {losses}"


def _side_by_side(runs: dict[str, RunConfig], steps: int) -> list[dict]:
    """On every rank: a trainer per run, stepped in turn; rank 0 prints a line per step."""
    import torch.distributed as dist

    talk = dist.get_rank() == 0
    trainers, start = set_up(runs, lambda cfg: f"dp {DP} x cp {CP}, cad pooled over {DP * CP} ranks, "
                                               f"plan_ahead {cfg.parallel.plan_ahead}")
    if talk:
        head = "  ".join(f"{n + ': wait':>9} {'made':>8} {'s/step':>7}" for n in RUNS)
        print(f"{'':9} {'step':>7}  {head}  (seconds; wait = exposed planning)", flush=True)
    rows, owed = [], 0.0
    for step in range(steps):
        row = {}
        for name in (RUNS if step % 2 == 0 else RUNS[::-1]):
            m = dict(trainers[name].step())
            if name == "ahead":   # the wait left over from the step before is this step's (module docstring)
                m["planning_s"] += owed
                m["step_time_s"] += owed
                owed = _settled(trainers[name])
            row[name] = m
        rows.append(row)
        if talk:
            print(_line(step + 1, steps, row, time.perf_counter() - start), flush=True)
    for trainer in trainers.values():
        trainer.close()
    return rows


def summary(rows: list[dict]) -> list[str]:
    """Medians over the steps after the first (both plan it inline), and the ratios inline / ahead."""
    later = rows[1:] or rows
    med = {(n, key): statistics.median(r[n][key] for r in later) for n in RUNS
           for key in ("planning_s", "plan_made_s", "step_time_s")}

    def ratio(key: str) -> str:
        return f"{med['inline', key] / med['ahead', key]:.1f}x" if med["ahead", key] > 0 else "inf"
    span = f"steps 2..{len(rows)}"
    return [f"median exposed planning, {span}: inline {med['inline', 'planning_s']:.4f} s, ahead "
            f"{med['ahead', 'planning_s']:.4f} s (ratio inline / ahead {ratio('planning_s')}); making the plans took "
            f"{med['inline', 'plan_made_s']:.4f} s and {med['ahead', 'plan_made_s']:.4f} s",
            f"median step time, {span}: inline {med['inline', 'step_time_s']:.3f} s, ahead "
            f"{med['ahead', 'step_time_s']:.3f} s (ratio inline / ahead {ratio('step_time_s')})"]


def main(argv=None) -> int:
    args = bench_args("distattn.bench.plan_ahead", __doc__, argv)
    rows = run_side_by_side("distattn.bench.plan_ahead", args, DP * args.seq_len * args.steps, configs,
                            _side_by_side, DP * CP)
    for text in summary(rows):
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
