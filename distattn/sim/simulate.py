"""``distattn simulate``: time the step the trainer runs, for every scheduler, on a model of a cluster.

The cluster (:mod:`.job`: :class:`SimConfig`): ``gpus`` GPUs, ``gpus_per_node`` per node, as ``tp``
tensor-parallel ranks x ``cp`` context-parallel ranks x ``dp`` replicas. One step trains a global
batch of ``batch`` sequences of ``seq_len`` tokens (:mod:`.workload`: drawn from a document-length
sample, packed over the replicas' micro-batches by the row's packing); each micro-batch is cut into
the scheduler's nano-batches as the trainer cuts it (``cad``: two, ping-ponged;
:mod:`distattn.runtime.pingpong`). For every row the planner code that runs in training builds the dry
schedules (``cad`` pools all replicas, as DistCA does), and the simulator replays the step the
trainer runs (:mod:`.micro`, :mod:`.step`, :mod:`.replay`): its layers' pieces in the trainer's
order, the recomputation its activation checkpointing runs (:mod:`.fit`: the cheapest setting that
fits the GPU), each attention stage as the executor's instructions
(:meth:`distattn.planning.schedule.Schedule.program`, checked against what the executors do on gloo by
``tests/test_program.py``), the data-parallel transfers ``dp_mode`` issues (:mod:`.dp`: ``ddp``,
``fsdp``, ``hsdp``, ``zero1``, each on the links it crosses), forward then backward, every rank at
once:

* compute: a layer's linear work ``6 * params_per_layer * tokens / tp`` at ``mfu`` of peak; each
  attention instruction's FLOPs at the kernel's measured speed for the rank's segments
  (:mod:`.kernel`); the output layer; all of it ``1 + comm_slowdown`` times slower while a transfer
  of the rank is in flight (:data:`~distattn.sim.replay.COMM_SLOWDOWN`);
* communication: each transfer's bytes timed on a :class:`~distattn.costmodel.network.NetworkProfile` (the
  group's span decides intra- or inter-node; cad's all-to-alls wait for the slower of their intra-
  and inter-node bytes), started and waited for where the code starts and waits for it, queued on the
  rank's NVLink or network card: hidden only behind what the rank computes in between;
* planning: the seconds the step's plans take to make (measured here, on this machine's CPU): hidden
  behind the step before when the trainer plans ahead (``planning: hidden``; a plan slower than
  the step shows), else added (``exposed``);
* the bounds (``wlb-ideal``, ``ideal``, :mod:`.workload`) have no communication.

The step ends when the slowest rank does (``dp_idle`` is the mean fraction of the step replicas
spend waiting for the slowest). ``exposed_comm_s`` is what communication adds to the step (the step
replayed with transfers taking no time, subtracted), ``dp_exposed_s`` what the data-parallel transfers
alone add (replayed with those alone taking no time); ``stalled_s`` the slowest rank's time at waits.
Each row names its ``dp_mode`` and ``dp_shard`` (hsdp's shard group, resolved; else None).
:func:`simulate_with_timelines` also gives every rank's timeline of the step: ``compute``,
``exposed_comm`` (its time at waits, for transfers or for the slower ranks they needed) and
``idle`` laid end to end (they sum to the step time; their order within the step is a
convention), and ``overlapped_comm``, its transfer time hidden behind compute; with ``trace``, each
replayed operation too, as a Chrome trace with the profiler's phase names (:mod:`.trace`). ``memory_gib`` is the
trainer's estimate of one GPU (:mod:`.fit`), ``fits`` whether the GPU holds it; ``mfu`` is the
trainer's: :meth:`ModelShape.model_flops <distattn.costmodel.model_shape.ModelShape.model_flops>` over the step
time and every GPU's dense bf16 peak. One call simulates one draw of the global batch;
:mod:`.sweep` runs many and sweeps each row's setting (CP size, nano-batches, usp's Ulysses
degree). Not modelled: pipeline parallelism, the optimizer step, kernel launch overheads.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from ..costmodel.model_shape import GPU, ModelShape
from ..planning.packing import DEFAULT_CAP_FACTOR, default_token_cap
from ..planning.program import BACKWARD, FORWARD
from ..planning.schedule import AttnShape
from ..schedulers import REGISTRY, spec
from . import fit
from .job import (SimConfig, attention_kernel, comm_time, default_cp, dry_schedule, nccl_size,
                  links_of, plan_context, with_planning)
from .dp import dp_seconds, shard_of
from .micro import micro_batch
from .presets import BOUNDS, GPUS, MODELS, SCHEDULERS
from .replay import TimedProgram, call_ops, replay, replay_three
from .trace import TRACED_RANKS, next_pid, row_events, write_trace
from .step import step_ops
from .workload import assign, assign_wlb, draw_chunks, row_of

# a rank's step, laid end to end: compute, then communication not hidden, then waiting for the slowest
# rank of its replica and the slowest replica. overlapped_comm runs during compute, not after it.
PHASES = ("compute", "exposed_comm", "idle", "overlapped_comm")
TIMELINE_COLUMNS = ("scheduler", "rank", "node", "replica", "cp_rank", "phase", "start_s", "end_s", "seconds")


def time_call(schedule, shape: AttnShape, network, kernel, streams: bool = True) -> dict[str, float]:
    """Seconds of one plain attention call of ``schedule`` -- its ``forward``, its ``backward`` and
    ``both`` back to back -- replayed (:mod:`.replay`) with each rank's attention at ``kernel``'s speed
    on its segments (:class:`~.kernel.AttentionKernel`): the slowest rank."""
    ranks = schedule.stat_ranks
    heads = schedule.kernel_heads(shape)
    rates = {d: kernel.rank_rates(schedule.kernel_segments(), ranks, d, heads) for d in ("forward", "backward")}
    timed = TimedProgram.of(schedule.call_program(shape), ranks,
                            lambda ph: np.asarray(ph.amount, np.float64) / rates[ph.direction][ph.rank],
                            lambda ph: comm_time(network, ph))
    return {name: float(replay(call_ops(timed, ranks, stages), ranks, streams=streams).end.max())
            for name, stages in (("forward", FORWARD), ("backward", BACKWARD), ("both", FORWARD + BACKWARD))}


def simulate(cfg: SimConfig, network, schedulers=SCHEDULERS, pool=None, replica_docs=None) -> list[dict]:
    """One result dict per scheduler (see module docstring); sorted as ``schedulers``."""
    return simulate_with_timelines(cfg, network, schedulers, pool, replica_docs)[0]


def simulate_with_timelines(cfg: SimConfig, network, schedulers=SCHEDULERS, pool=None,
                            replica_docs=None, trace: list | None = None) -> tuple[list[dict], list[dict]]:
    """(:func:`simulate`'s results, the per-rank timeline): one timeline row per scheduler, rank and
    phase (``TIMELINE_COLUMNS``, phases as ``PHASES``); ranks are numbered replica-major
    (``rank = replica * cp + cp_rank``), as the DP x CP mesh lays them out. ``replica_docs``: the
    global batch's sequences (default: :func:`~.workload.draw_chunks` of ``cfg.seed``). ``trace``: each
    row's step is appended to it as Chrome trace events (:mod:`.trace`, one more replay per row)."""
    cfg.check()
    chunks = replica_docs or draw_chunks(cfg.batch or cfg.dp, cfg.seq_len, pool, cfg.seed)
    results, timeline = [], []
    for name in schedulers:
        if name not in SCHEDULERS:
            raise ValueError(f"scheduler {name!r} is unknown; choose from {', '.join(SCHEDULERS)}")
        if cfg.model.n_heads // cfg.tp < spec(row_of(name).entry).head_split(cfg.cp, plan_context(cfg)):
            continue  # heads split over more ranks than there are heads
        events = None if trace is None else []
        result, run = simulate_row(cfg, network, name, chunks, events=events)
        results.append(result)
        if run is not None:
            timeline += _timeline(name, cfg, result["step_time_s"], run)
            if trace is not None:
                trace += row_events(events, name, cfg.ranks, next_pid(trace), result["planning_s"],
                                    cfg.planning == "hidden")
    return results, timeline


def simulate_row(cfg: SimConfig, network, name: str, chunks, history=(), events: list | None = None
                 ) -> tuple[dict, object]:
    """Row ``name`` on the global batch ``chunks``: its result and its replay (None: it fits no GPU).
    ``history``: the global batches of the steps before, oldest first (WLB-LLM's packing queues the
    outliers they left, :func:`~.workload.assign_wlb`; none: empty queues). ``events``: the step's
    operations appended as :func:`~.replay.replay` records them (its first :data:`~.trace.TRACED_RANKS`
    ranks)."""
    row, m = row_of(name), cfg.model
    entry = spec(row.entry)
    # the packer balances what the scheduler does not: attention pairs too, or tokens alone (cad's pool,
    # ideal), whose even tokens never need more than the trainer's default cap
    balance = 0.0 if entry.pools or row.bound == "all" else m.pair_weight()
    factor = cfg.token_cap_factor if balance else min(cfg.token_cap_factor, DEFAULT_CAP_FACTOR)
    cap = cfg.seq_len if cfg.packing == "stream" else default_token_cap(cfg.seq_len, factor)
    setting = fit.choose(cfg, entry.name, cap)
    result = {"scheduler": name, "gpus": cfg.gpus, "tp": cfg.tp, "cp": cfg.cp, "dp": cfg.dp, "seq_len": cfg.seq_len,
              "batch": len(chunks), "micro_batches": len(chunks) // cfg.dp, "model": m.name, "params": m.params,
              **row_setting(cfg, name), "dp_mode": cfg.dp_mode, "dp_shard": shard_of(cfg),
              "packing": cfg.packing, "checkpointing": setting.checkpointing, "mlp_chunk": setting.mlp_chunk,
              "memory_gib": setting.memory_gib, "fits": setting.fits,
              "memory_gb": setting.memory_gib, "fits_memory": setting.fits,   # (the names before issue 54)
              **({} if setting.cad_backward is None else {"cad_backward": setting.cad_backward})}
    if not setting.fits and cfg.activation_checkpointing is None:   # (a setting asked for is timed regardless)
        return dict(result, step_time_s=None), None
    cfg = fit.with_setting(cfg, setting)
    if row.packing == "wlb":
        packed = assign_wlb([*history, chunks], cfg.dp, len(chunks) // cfg.dp, m.pair_weight(), cap, cfg.seq_len,
                            cfg.seed)
    else:
        packed = assign(chunks, cfg.dp, len(chunks) // cfg.dp, cfg.packing, m.pair_weight(), balance, cap, cfg.seed)
    links, kernel = links_of(network, cfg), attention_kernel(cfg)
    micro = [micro_batch(cfg, name, replicas, kernel, links) for replicas in packed.micro]
    ops = step_ops([mb["micro"] for mb in micro], m.n_layers, cfg.activation_checkpointing, cfg.ranks,
                   dp_seconds(cfg, links.cp))
    run, still, no_dp = replay_three(ops, cfg.ranks, slowdown=cfg.comm_slowdown)
    if events is not None:
        replay(ops, cfg.ranks, slowdown=cfg.comm_slowdown, events=events, traced=min(cfg.ranks, TRACED_RANKS))
    busy = run.compute + run.stalled   # each rank's end (the clock only moves by compute and waits)
    planning = sum(mb["planning_s"] for mb in micro)
    step = float(busy.max())
    step = with_planning(cfg, step, planning)
    tokens = float(sum(mb["tokens"].sum() for mb in micro))
    share, timed = {}, step
    if row.packing == "wlb":   # its queues release more or less work than a global batch: scaled to one
        trained = [n for mb in packed.micro for rep in mb for n in rep]
        share = {"wlb_work_share": _work(cfg, kernel, trained) / _work(cfg, kernel, [n for c in chunks for n in c])}
        step = timed / share["wlb_work_share"]
    # what each replica computed: the rest of its step it waited in collectives with the slowest one
    rep_times = [float(run.compute[i * cfg.cp:(i + 1) * cfg.cp].max()) for i in range(cfg.dp)]
    slowest = int(np.argmax(busy))
    peak = cfg.gpu.peak_tflops * 1e12
    return dict(result, **{
        "step_time_s": step, "tokens_per_s_per_gpu": tokens / timed / cfg.gpus,
        "mfu": float(m.model_flops(tokens, sum(mb["flops_attn"] for mb in micro)) / timed / (peak * cfg.gpus)),
        "compute_s": float(run.compute.max()), "exposed_comm_s": max(float(busy.max() - still.end.max()), 0.0),
        # (summed as busy is: a step without data-parallel transfers gives exactly 0)
        "dp_exposed_s": max(float(busy.max() - (no_dp.compute + no_dp.stalled).max()), 0.0),
        "comm_s": float(run.comm[slowest]), "stalled_s": float(run.stalled[slowest]),
        "compute_imbalance": max(1.0, float(run.compute.max() / run.compute.mean())),  # 1 - ulp happens
        "dp_idle": float(np.mean([(timed - t) / timed for t in rep_times])), "dp_imbalance": packed.imbalance,
        "held_share": packed.held_tokens / max(1, sum(map(sum, chunks))), "planning_s": planning,
        "kernel": kernel.source, **share}), run


def _work(cfg: SimConfig, kernel, docs) -> float:
    """The seconds one GPU would spend on ``docs``' layers: linear at ``mfu`` and attention at the kernel's
    speed for each document whole, forward and backward (what a step's work is scaled by)."""
    m, lens = cfg.model, np.asarray(docs, dtype=np.float64)
    attention = sum(kernel.document_seconds(d, lens, m.n_heads).sum() for d in ("forward", "backward"))
    return m.n_layers * float(attention) + 6 * m.params * float(lens.sum()) / (cfg.gpu.peak_tflops * 1e12 * cfg.mfu)


def row_setting(cfg: SimConfig, name: str) -> dict:
    """Row ``name``'s setting on ``cfg`` as the trainer's config spells it: ``nano_batches``
    (``parallel.nano_batches``: ``cfg``'s or the scheduler's default; a bound runs one) and
    ``ulysses_degree`` (``parallel.ulysses_degree``: ``usp``'s, given or derived as its planner derives
    it; None for a scheduler without a Ulysses axis, or on one rank). A micro-batch of one document
    anywhere runs as one nano-batch, as in the trainer; the setting is what the config says."""
    row = row_of(name)
    entry = spec(row.entry)
    nano = 1 if row.bound is not None else entry.nano_batches_for(cfg.nano_batches, key="--nano-batches")
    degree = None
    if entry.mesh_2d and cfg.cp > 1:
        degree = entry.derive(cfg.cp, plan_context(cfg), {}).get("ulysses_degree")
    return {"nano_batches": nano, "ulysses_degree": degree}


def _timeline(name: str, cfg: SimConfig, step: float, run) -> list[dict]:
    """Per rank: its compute, the time it stood at waits (for transfers, or for the slower ranks a
    transfer needed) and its idle end of the step, laid end to end; and its transfers' time hidden
    while it computed."""
    rows = []
    for rank in range(cfg.ranks):
        c, e, comm = float(run.compute[rank]), float(run.stalled[rank]), float(run.comm[rank])
        spans = (("compute", 0.0, c), ("exposed_comm", c, c + e), ("idle", c + e, max(step, c + e)),
                 ("overlapped_comm", 0.0, max(comm - e, 0.0)))
        for phase, start, end in spans:
            rows.append({"scheduler": name, "rank": rank, "node": rank * cfg.tp // cfg.gpus_per_node,
                         "replica": rank // cfg.cp, "cp_rank": rank % cfg.cp, "phase": phase,
                         "start_s": start, "end_s": end, "seconds": end - start})
    return rows


def write_timeline(rows: list[dict], path: str | Path, trace: list[dict] | None = None) -> None:
    """Write :func:`simulate_with_timelines`' timeline to ``path``: its per-rank summary ``rows`` as CSV
    (``.csv``), or its ``trace`` as a Chrome trace (``.json``, :mod:`.trace`)."""
    path = Path(path)
    if path.suffix not in (".csv", ".json"):
        raise ValueError(f"--timeline {path}: name a .csv or .json file")
    if path.suffix == ".json":
        if trace is None:
            raise ValueError(f"--timeline {path}: a .json timeline is a Chrome trace: pass simulate_with_timelines' "
                             f"trace (trace=[]) as write_timeline's trace")
        write_trace(trace, path)
        return
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=TIMELINE_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def mesh_description(r: dict, gpus_per_node: int) -> str:
    cp, dp, tp = r["cp"], r["dp"], r.get("tp", 1)
    where = "within a node" if cp * tp <= gpus_per_node else f"across {cp * tp // gpus_per_node} nodes"
    lead = f"tp {tp} x " if tp > 1 else ""
    if r.get("ulysses_degree"):
        u = r["ulysses_degree"]
        return f"{lead}dp {dp} x cp {cp} = ulysses {u} (within a node) x ring {cp // u} (across nodes)"
    if r["scheduler"] in REGISTRY and REGISTRY[r["scheduler"]].pools:
        return f"{lead}dp {dp} x cp {cp} ({where}), attention balanced over the pool of all {r['gpus']} GPUs"
    return f"{lead}dp {dp} x cp {cp} ({where})"


__all__ = ["MODELS", "GPUS", "SCHEDULERS", "BOUNDS", "PHASES", "TIMELINE_COLUMNS", "ModelShape", "GPU", "SimConfig",
           "default_cp", "simulate", "simulate_with_timelines", "simulate_row", "write_timeline", "mesh_description",
           "plan_context", "dry_schedule", "time_call", "nccl_size", "comm_time", "links_of", "row_setting"]
