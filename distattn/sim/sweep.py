"""Every draw, and each row at its best setting: what ``distattn simulate --draws N --sweep`` reports.

A step's time depends on which documents the global batch drew; one draw is an anecdote. Each row is
simulated on ``draws`` global batches (seeds ``seed .. seed + draws - 1``; every row trains the same
ones, so ratios between rows are paired per draw) and reports the median step time with its 10th and
90th percentiles, and the median of every other figure.

With ``sweep``, the global batch stays fixed (``batch`` sequences of ``seq_len``) and each row takes
its best setting at the GPU count -- what a user would write in the trainer's config:

* (DP, CP) (``parallel.dp``, ``parallel.cp``): every power-of-two CP size whose DP size divides the
  batch (the rest of the batch becomes each replica's micro-batches) and whose setting fits the GPU's
  memory (:mod:`.fit`: the cheapest activation checkpointing that fits, ``train.activation_checkpointing``);
* at each CP size, nano-batches 1 and 2 (``parallel.nano_batches``: one nano-batch's transfers hide
  behind the other's layers, at the price of shorter kernels; the scheduler's default first, so a tie
  keeps it) and, for ``usp``, each Ulysses degree that divides both the CP size and a TP rank's KV
  heads (``parallel.ulysses_degree``; the default degree first) -- :func:`settings`. A bound
  (``wlb-ideal``, ``ideal``) has no nano-batches; a setting given on the command line
  (``--nano-batches``, ``--ulysses-degree``) is kept, not swept.

Every setting is scored by its median step over the same first :data:`SWEEP_DRAWS` draws (CP sizes
from the smallest up, stopping at one whose best setting is :data:`GIVE_UP` times slower than the best
so far); the fastest then runs every draw. The row names its CP, DP, checkpointing, memory,
``nano_batches`` and ``ulysses_degree``; every setting it tried is in ``sweep``. A row that fits at no
size says so (``fits: false``) and has no time.

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
from .workload import WLB_WARMUP, draw_chunks, row_of

SWEEP_DRAWS = 4
# what a draw measures (summarised by its median); the rest of a row is the setup
MEASURED = ("step_time_s", "tokens_per_s_per_gpu", "mfu", "compute_s", "exposed_comm_s", "dp_exposed_s", "comm_s",
            "stalled_s",
            "compute_imbalance", "dp_idle", "dp_imbalance", "held_share", "planning_s", "wlb_work_share")
# the pinned keys of a row with no time (it fits no setting, or no CP size)
NO_TIME = {"cp": None, "dp": None, "checkpointing": None, "memory_gib": None, "fits": False, "step_time_s": None,
           "step_time_p10_s": None, "step_time_p90_s": None, "step_time_mean_s": None, "nano_batches": None,
           "ulysses_degree": None, "dp_mode": None, "dp_shard": None, "dp_exposed_s": None}
GIVE_UP = 1.5      # a CP size whose best setting is this much slower than the best so far ends the sweep
# what each setting the sweep tried reports (its row's keys)
TRIED = ("cp", "dp", "nano_batches", "ulysses_degree", "dp_mode", "dp_shard", "checkpointing", "memory_gib", "fits")
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


def settings(cfg: SimConfig, name: str, cp: int) -> list[dict]:
    """The settings row ``name`` is tried at on CP size ``cp``, as :class:`SimConfig` fields named as the
    trainer's config names them (``parallel.nano_batches``, ``parallel.ulysses_degree``): nano-batches
    1 and 2, the scheduler's default first (a bound: none to choose; ``cfg``'s when given), and for a
    scheduler with a Ulysses axis (``usp``) each degree dividing ``cp`` and a TP rank's KV heads, the
    default first (``cfg``'s when given; one rank: nothing to split)."""
    row = row_of(name)
    entry = spec(row.entry)
    if row.bound is not None or cfg.nano_batches is not None:
        nanos = [cfg.nano_batches]   # (a bound runs one whatever it is given)
    else:
        nanos = sorted((1, 2), key=lambda n: n != entry.nano_batches)
    degrees = [cfg.ulysses_degree]
    if entry.mesh_2d and cfg.ulysses_degree is None and cp > 1:
        kv = max(1, cfg.model.n_kv_heads // cfg.tp)
        default = entry.head_split(cp, plan_context(replace(cfg, cp=cp)))
        degrees = sorted((u for u in range(1, cp + 1) if cp % u == 0 and kv % u == 0), key=lambda u: (u != default, u))
    # the nano-batches innermost: a micro-batch that cannot be cut plans the same groups at 1 and 2
    # (:mod:`.micro` keeps the last plans)
    return [{"ulysses_degree": u, "nano_batches": n} for u in degrees for n in nanos]


def dp_modes(cfg: SimConfig) -> list[tuple[str, int | None]]:
    """The ``(parallel.dp_mode, parallel.dp_shard)`` pairs a sweep tries on ``cfg``'s ranks: ``ddp``,
    ``fsdp``, ``zero1``, and ``hsdp`` sharded over half a node, a node and two nodes (of a TP index's
    ranks), those that divide the ranks and are fewer (hsdp over every rank is fsdp)."""
    node = max(1, cfg.gpus_per_node // cfg.tp)
    shards = sorted({s for s in (node // 2, node, 2 * node) if 1 < s < cfg.ranks and cfg.ranks % s == 0})
    return [("ddp", None), ("fsdp", None), ("zero1", None), *[("hsdp", s) for s in shards]]


def pool_batches(pool) -> Callable[[SimConfig, int], list[list[int]]]:
    """Draw ``d`` of a config: :func:`~.workload.draw_chunks` of the length sample ``pool`` (None: the
    log-normal stand-in), seeded ``cfg.seed + d`` (the steps before the first, which WLB-LLM's queues
    remember: seeds counted down from 2**32)."""
    return lambda cfg, d: draw_chunks(cfg.batch or cfg.dp, cfg.seq_len, pool, (cfg.seed + d) % 2 ** 32)


def run_draws(cfg: SimConfig, network, name: str, batches, draws: range,
              progress: Callable[[str], None] | None = None) -> list[dict]:
    """Row ``name``'s result on each draw of ``draws``: ``batches(cfg, d)`` gives draw ``d``'s
    sequences (:func:`pool_batches`)."""
    out = []
    warmup = WLB_WARMUP if row_of(name).packing == "wlb" else 0   # the steps whose outliers it may still queue
    for d in draws:
        history = [batches(cfg, d - k) for k in range(warmup, 0, -1)]
        result, _ = simulate_row(replace(cfg, seed=cfg.seed + d), network, name, batches(cfg, d), history)
        out.append(result)
        if progress is not None:
            step = result["step_time_s"]
            progress(f"{_label(name, result)}: draw {d + 1} of {draws.stop}: "
                     f"{'does not fit' if step is None else f'{step:.2f} s'}")
        if result["step_time_s"] is None:
            break   # the setting is the draws' alike: none fits
    return out


def _label(name: str, result: dict) -> str:
    """``name cp C`` with the setting's nano-batches and Ulysses degree (progress lines)."""
    degree, shard = result.get("ulysses_degree"), result.get("dp_shard")
    return (f"{name} cp {result['cp']} nano {result.get('nano_batches')}"
            + ("" if degree is None else f" ulysses {degree}") + f" {result.get('dp_mode')}"
            + ("" if shard is None else f" {shard}"))


def summary(per_draw: list[dict]) -> dict:
    """One row from its draws: the first draw's fields (the setup: the same on every draw), what each
    draw measured (:data:`MEASURED`) as its median, step time also as its 10th and 90th percentiles,
    its mean and each draw's (``step_times_s``); ``draws``: how many."""
    row = {**NO_TIME, **per_draw[0], "draws": len(per_draw)}
    if row["step_time_s"] is None:
        return row
    for key in (k for k in MEASURED if k in per_draw[0]):
        row[key] = float(np.median([r[key] for r in per_draw]))
    steps = [r["step_time_s"] for r in per_draw]
    for name, q in QUANTILES.items():
        row[f"step_time_{name}_s"] = float(np.percentile(steps, q))
    row["step_time_mean_s"] = float(np.mean(steps))   # (DistCA's speedups are ratios of mean step times)
    row["step_times_s"] = steps                        # per draw: ratios to other rows pair them
    return row


def best_setting(cfg: SimConfig, network, name: str, batches, draws: int,
                 progress: Callable[[str], None] | None = None, scored: int = SWEEP_DRAWS,
                 modes: list[tuple[str, int | None]] | None = None) -> tuple[SimConfig | None, list[dict], list[dict]]:
    """(``cfg`` at the setting -- CP size, :func:`settings`, each of ``modes`` (:func:`dp_modes`; None:
    ``cfg``'s) -- with the lowest median step over the first ``scored`` draws, None where none fits; its
    draws so far; every setting tried: :data:`TRIED` and its medians ``step_time_s`` and ``dp_exposed_s``). CP sizes
    are tried
    from the smallest; once one's best setting is :data:`GIVE_UP` times slower than the best so far,
    larger ones (more communication, the ring's steps growing with them) are not tried. Every setting
    runs the same draws, so a choice is paired; a mode that does not fit the GPU is skipped."""
    tried: list[dict] = []
    best: tuple[SimConfig, float] | None = None
    kept: list[dict] = []
    last = None   # the best median at the CP size before
    for cp in candidates(cfg, name):
        if best is not None and last is not None and last > GIVE_UP * best[1]:
            break
        medians = []
        # the modes innermost: they change no plan (:mod:`.micro` keeps the last ones)
        for setting, (mode, shard) in [(s, m) for s in settings(cfg, name, cp)
                                       for m in (modes or [(cfg.dp_mode, cfg.dp_shard)])]:
            at = replace(cfg, cp=cp, **setting, dp_mode=mode, dp_shard=shard)
            got = run_draws(at, network, name, batches, range(min(draws, scored)), progress)
            head = got[0]
            median = float(np.median([r["step_time_s"] for r in got])) if head["fits"] else None
            exposed = float(np.median([r["dp_exposed_s"] for r in got])) if head["fits"] else None
            tried.append({**{k: head[k] for k in TRIED}, "step_time_s": median, "dp_exposed_s": exposed})
            if median is None:
                continue
            medians.append(median)
            if best is None or median < best[1]:
                best, kept = (at, median), got
        last = min(medians, default=None)
    return (None if best is None else best[0]), kept, tried


def rows(cfg: SimConfig, network, names, batches, draws: int, sweep: bool,
         progress: Callable[[str], None] | None = None, scored: int = SWEEP_DRAWS,
         modes: list[tuple[str, int | None]] | None = None) -> list[dict]:
    """Every row (``names``) over ``draws`` draws of ``batches`` (:func:`pool_batches`), each at its
    best setting with ``sweep`` (:func:`best_setting`, scored on the first ``scored`` draws, trying
    ``modes``: :func:`dp_modes`, None: ``cfg``'s; else at ``cfg``'s), with their ratios (module
    docstring). A bound tries the modes too: it is at the best one that fits, and stays a bound."""
    per_row: dict[str, list[dict]] = {}
    out = []
    for name in names:
        if sweep:
            at, got, tried = best_setting(cfg, network, name, batches, draws, progress, scored, modes)
            if at is None:
                out.append({**NO_TIME, "scheduler": name, "gpus": cfg.gpus, "tp": cfg.tp, "sweep": tried, "draws": 0})
                continue
            got += run_draws(at, network, name, batches, range(len(got), draws), progress)
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
              progress: Callable[[int, list[dict]], None] | None = None,
              modes: list[tuple[str, int | None]] | None = None) -> tuple[dict, list[dict]]:
    """``--auto``: every real row of ``names`` at every CP size it may run at (256 tokens a rank at
    least), one sequence per replica (so a larger CP trains fewer tokens per step), over ``draws``
    draws, each at the one of ``modes`` (:func:`dp_modes`; None: ``cfg``'s) with the most tokens/s per
    GPU that fits; the recommendation is the row with the most tokens/s per GPU among those that fit
    and ``distattn train`` runs (:data:`~distattn.schedulers.NAMES`: not ``wlb``, which stays in the rows
    for comparison), and every row. Step time alone would favour the largest CP degree. ``cfg``'s
    other settings (TP, packing, checkpointing, ...) hold."""
    from ..schedulers import NAMES
    from .presets import BOUNDS

    per_name = {n: candidates(replace(cfg, batch=None), n, 256) for n in names if n not in BOUNDS}
    found = []
    for cp in sorted({cp for sizes in per_name.values() for cp in sizes}):
        at = replace(cfg, cp=cp, batch=None)
        here = [n for n, sizes in per_name.items() if cp in sizes]
        best: dict[str, dict] = {}   # per scheduler, its fastest mode's row (the first that fits, on a tie)
        for mode, shard in modes or [(cfg.dp_mode, cfg.dp_shard)]:
            for r in rows(replace(at, dp_mode=mode, dp_shard=shard), network, here, pool_batches(pool), draws, False):
                held = best.get(r["scheduler"])
                if held is None or _faster(r, held):
                    best[r["scheduler"]] = r
        got = [best[n] for n in here if n in best]
        found += got
        if progress is not None:
            progress(cp, got)
    feasible = [r for r in found if r["fits"] and r["step_time_s"] is not None and r["scheduler"] in NAMES]
    if not feasible:
        raise ValueError(f"nothing fits {cfg.gpu.memory_gib:.0f} GiB per GPU for {cfg.model.name} at {cfg.seq_len} "
                         f"tokens on {cfg.gpus} GPUs; add GPUs or shorten --seq-len")
    return max(feasible, key=lambda r: (r["tokens_per_s_per_gpu"], -r["step_time_s"])), found


def _faster(r: dict, than: dict) -> bool:
    """Whether row ``r`` fits and trains more tokens/s per GPU than ``than`` (or ``than`` does not fit)."""
    if not r["fits"] or r["step_time_s"] is None:
        return False
    return not than["fits"] or than["step_time_s"] is None or r["tokens_per_s_per_gpu"] > than["tokens_per_s_per_gpu"]


def trainer_config(row: dict, cfg: SimConfig) -> dict:
    """Row ``row`` of a job on ``cfg`` as ``distattn train``'s config keys (``section.key`` -> value: each
    a ``key=value`` override): its scheduler, mesh, data-parallel mode, nano-batches, the setting of its
    scheduler (usp's Ulysses degree, cad's servers), its activation checkpointing, the dtype and the
    sequence length simulated. ``ValueError`` for a row the trainer cannot run (a bound, ``wlb``, TP)."""
    from ..schedulers import NAMES

    if row["scheduler"] not in NAMES:
        raise ValueError(f"row {row['scheduler']!r} is not a scheduler distattn train runs ({', '.join(NAMES)})")
    if row.get("tp", 1) != 1:
        raise ValueError(f"tp {row['tp']}: distattn train has no tensor parallelism; simulate with --tp 1")
    out = {"parallel.scheduler": row["scheduler"], "parallel.dp": row["dp"], "parallel.cp": row["cp"],
           "parallel.dp_mode": row["dp_mode"]}
    if row["dp_mode"] == "hsdp":
        out["parallel.dp_shard"] = row["dp_shard"]
    out["parallel.nano_batches"] = row["nano_batches"]
    if row.get("ulysses_degree") is not None:
        out["parallel.ulysses_degree"] = row["ulysses_degree"]
    if row.get("cad_backward") is not None:
        out["parallel.cad_backward"] = row["cad_backward"]
    out["train.activation_checkpointing"] = row["checkpointing"]
    if row.get("mlp_chunk"):
        out["train.mlp_chunk"] = row["mlp_chunk"]
    out["train.dtype"] = "bf16" if cfg.elem_bytes == 2 else "fp32"
    out["data.seq_len"] = cfg.seq_len
    return out


__all__ = ["SWEEP_DRAWS", "GIVE_UP", "TRIED", "candidates", "settings", "dp_modes", "pool_batches", "run_draws",
           "summary", "best_setting", "rows", "put_ratio", "recommend", "trainer_config"]
