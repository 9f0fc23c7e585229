"""Every draw, and each row at its best CP size: what ``distattn simulate --draws N --sweep`` reports.

A step's time depends on which documents the global batch drew; one draw is an anecdote. Each row is
simulated on ``draws`` global batches (seeds ``seed .. seed + draws - 1``; every row trains the same
ones, so ratios between rows are paired per draw) and reports the median step time with its 10th and
90th percentiles, and the median of every other figure.

With ``sweep``, the global batch stays fixed (``batch`` sequences of ``seq_len``) and each row takes
its best (DP, CP) at the GPU count: every power-of-two CP size whose DP size divides the batch (the
rest of the batch becomes each replica's micro-batches) and whose setting fits the GPU's memory
(:mod:`.fit`), scored by its median over the first :data:`SWEEP_DRAWS` draws (from the smallest size
up, stopping at one :data:`GIVE_UP` times slower than the best so far); the chosen size then runs
every draw. The row names its CP, DP, checkpointing and memory; the sizes it tried are in
``sweep``. A row that fits at no size says so (``fits: false``) and has no time.

Ratios per draw, then summarised: ``over_ideal`` (the row's step over ``ideal``'s: >= 1) and
``speedup_vs_wlb`` (``wlb``'s step over the row's: above 1, the row is faster than WLB-LLM as users
run it).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

import numpy as np

from ..schedulers import spec
from .simulate import SimConfig, plan_context, simulate_row
from .workload import draw_chunks, row_of

SWEEP_DRAWS = 4
# what a draw measures (summarised by its median); the rest of a row is the setup
MEASURED = ("step_time_s", "tokens_per_s_per_gpu", "mfu", "compute_s", "exposed_comm_s", "comm_s", "stalled_s",
            "compute_imbalance", "dp_idle", "dp_imbalance", "held_share", "planning_s")
# the pinned keys of a row with no time (it fits no setting, or no CP size)
NO_TIME = {"cp": None, "dp": None, "checkpointing": None, "memory_gib": None, "fits": False, "step_time_s": None,
           "step_time_p10_s": None, "step_time_p90_s": None, "step_time_mean_s": None}
GIVE_UP = 1.5      # a CP size this much slower than the best so far ends the sweep
QUANTILES = {"p10": 10, "p90": 90}


def candidates(cfg: SimConfig, name: str, min_tokens: int = 1) -> list[int]:
    """The power-of-two CP sizes row ``name`` may run at on ``cfg``'s GPUs and global batch (module
    docstring; no batch: one sequence per replica, any DP size), each rank holding ``min_tokens`` of a
    sequence at least."""
    out, cp = [], 1
    entry = spec(row_of(name).entry)
    while cp * cfg.tp <= cfg.gpus:
        dp = cfg.gpus // (cp * cfg.tp)
        if cfg.gpus % (cp * cfg.tp) == 0 and (cfg.batch or dp) % dp == 0 and cfg.seq_len >= cp * min_tokens and \
                cfg.model.n_heads // cfg.tp >= entry.head_split(cp, plan_context(replace(cfg, cp=cp))):
            out.append(cp)
        cp *= 2
    return out


def pool_batches(pool) -> Callable[[SimConfig, int], list[list[int]]]:
    """Draw ``d`` of a config: :func:`~.workload.draw_chunks` of the length sample ``pool`` (None: the
    log-normal stand-in), seeded ``cfg.seed + d``."""
    return lambda cfg, d: draw_chunks(cfg.batch or cfg.dp, cfg.seq_len, pool, cfg.seed + d)


def run_draws(cfg: SimConfig, network, name: str, batches, draws: range,
              progress: Callable[[str], None] | None = None) -> list[dict]:
    """Row ``name``'s result on each draw of ``draws``: ``batches(cfg, d)`` gives draw ``d``'s
    sequences (:func:`pool_batches`)."""
    out = []
    for d in draws:
        result, _ = simulate_row(replace(cfg, seed=cfg.seed + d), network, name, batches(cfg, d))
        out.append(result)
        if progress is not None:
            step = result["step_time_s"]
            progress(f"{name} cp {cfg.cp}: draw {d + 1} of {draws.stop}: "
                     f"{'does not fit' if step is None else f'{step:.2f} s'}")
        if result["step_time_s"] is None:
            break   # the setting is the draws' alike: none fits
    return out


def summary(per_draw: list[dict]) -> dict:
    """One row from its draws: the first draw's fields (the setup: the same on every draw), what each
    draw measured (:data:`MEASURED`) as its median, step time also as its 10th and 90th percentiles,
    its mean and each draw's (``step_times_s``); ``draws``: how many."""
    row = {**NO_TIME, **per_draw[0], "draws": len(per_draw)}
    if row["step_time_s"] is None:
        return row
    for key in (k for k in MEASURED if k in row):
        row[key] = float(np.median([r[key] for r in per_draw]))
    steps = [r["step_time_s"] for r in per_draw]
    for name, q in QUANTILES.items():
        row[f"step_time_{name}_s"] = float(np.percentile(steps, q))
    row["step_time_mean_s"] = float(np.mean(steps))   # (DistCA's speedups are ratios of mean step times)
    row["step_times_s"] = steps                        # per draw: ratios to other rows pair them
    return row


def best_cp(cfg: SimConfig, network, name: str, batches, draws: int,
            progress: Callable[[str], None] | None = None,
            scored: int = SWEEP_DRAWS) -> tuple[int | None, list[dict], list[dict]]:
    """(the CP size with the lowest median step over the first ``scored`` draws, its draws so far, every size
    tried: ``{cp, dp, checkpointing, memory_gib, fits, step_time_s}``). Sizes are tried from the
    smallest; once one is :data:`GIVE_UP` times slower than the best so far, larger ones (more
    communication, the ring's steps growing with them) are not tried."""
    tried, best, kept = [], None, []
    for cp in candidates(cfg, name):
        if best is not None and tried[-1]["step_time_s"] is not None and tried[-1]["step_time_s"] > GIVE_UP * best[1]:
            break
        got = run_draws(replace(cfg, cp=cp), network, name, batches, range(min(draws, scored)), progress)
        head = got[0]
        median = float(np.median([r["step_time_s"] for r in got])) if head["fits"] else None
        tried.append({"cp": cp, "dp": head["dp"], "checkpointing": head["checkpointing"],
                      "memory_gib": head["memory_gib"], "fits": head["fits"], "step_time_s": median})
        if median is not None and (best is None or median < best[1]):
            best, kept = (cp, median), got
    return (None if best is None else best[0]), kept, tried


def rows(cfg: SimConfig, network, names, batches, draws: int, sweep: bool,
         progress: Callable[[str], None] | None = None, scored: int = SWEEP_DRAWS) -> list[dict]:
    """Every row (``names``) over ``draws`` draws of ``batches`` (:func:`pool_batches`), each at its
    best CP size with ``sweep`` (scored on the first ``scored`` draws; else at ``cfg.cp``), with their
    ratios (module docstring)."""
    per_row: dict[str, list[dict]] = {}
    out = []
    for name in names:
        if sweep:
            cp, got, tried = best_cp(cfg, network, name, batches, draws, progress, scored)
            if cp is None:
                out.append({**NO_TIME, "scheduler": name, "gpus": cfg.gpus, "tp": cfg.tp, "sweep": tried, "draws": 0})
                continue
            got += run_draws(replace(cfg, cp=cp), network, name, batches, range(len(got), draws), progress)
        else:
            tried = None
            got = run_draws(cfg, network, name, batches, range(draws), progress)
        row = summary(got)
        if tried is not None:
            row["sweep"] = tried
        per_row[name] = got
        out.append(row)
    return _with_ratios(out, per_row)


def _with_ratios(out: list[dict], per_row: dict[str, list[dict]]) -> list[dict]:
    """Each row's ``over_ideal`` and ``speedup_vs_wlb``, per draw then summarised."""
    def steps(name):
        got = per_row.get(name)
        return None if not got or got[0]["step_time_s"] is None else np.asarray([r["step_time_s"] for r in got])
    for row in out:
        mine = steps(row["scheduler"])
        for key, ref, flip in (("over_ideal", "ideal", False), ("speedup_vs_wlb", "wlb", True)):
            other = steps(ref)
            if mine is None or other is None or len(other) != len(mine):
                continue
            put_ratio(row, key, other / mine if flip else mine / other)
    return out


def put_ratio(row: dict, key: str, ratio: np.ndarray) -> None:
    """``row[key]``: the median of per-draw ``ratio``, and ``row[key + "_p10"]``, ``_p90``: its quantiles."""
    row[key] = float(np.median(ratio))
    for name, q in QUANTILES.items():
        row[f"{key}_{name}"] = float(np.percentile(ratio, q))


def recommend(cfg: SimConfig, network, names, pool=None, draws: int = 1,
              progress: Callable[[int, list[dict]], None] | None = None) -> tuple[dict, list[dict]]:
    """``--auto``: every real row of ``names`` at every CP size it may run at (256 tokens a rank at
    least), one sequence per replica (so a larger CP trains fewer tokens per step), over ``draws``
    draws: the row with the most tokens/s per GPU among those that fit, and every row. Step time alone
    would favour the largest CP degree. ``cfg``'s other settings (TP, packing, checkpointing, ...) hold."""
    from .presets import BOUNDS

    per_name = {n: candidates(replace(cfg, batch=None), n, 256) for n in names if n not in BOUNDS}
    found = []
    for cp in sorted({cp for sizes in per_name.values() for cp in sizes}):
        at = replace(cfg, cp=cp, batch=None)
        got = rows(at, network, [n for n, sizes in per_name.items() if cp in sizes], pool_batches(pool), draws, False)
        found += got
        if progress is not None:
            progress(cp, got)
    feasible = [r for r in found if r["fits"] and r["step_time_s"] is not None]
    if not feasible:
        raise ValueError(f"nothing fits {cfg.gpu.memory_gib:.0f} GiB per GPU for {cfg.model.name} at {cfg.seq_len} "
                         f"tokens on {cfg.gpus} GPUs; add GPUs or shorten --seq-len")
    return max(feasible, key=lambda r: (r["tokens_per_s_per_gpu"], -r["step_time_s"])), found


__all__ = ["SWEEP_DRAWS", "candidates", "pool_batches", "run_draws", "summary", "best_cp", "rows", "put_ratio",
           "recommend"]
