"""One micro-batch of every replica as the step replays it (:mod:`.step`'s :class:`~.step.MicroBatch`):
each nano-batch's schedules -- one per CP group, or one over the pool -- with their ranks' attention
rates from the kernel's speed on their segments (:mod:`.kernel`) and their transfers on the links,
merged into one program over every rank; the linear pieces' seconds; tensor parallelism's
collectives (the data-parallel transfers: :mod:`.dp`).

What repeats is made once. A group's plan is a function of its documents and the job alone, so the
last :data:`PLANS_KEPT` groups planned are kept with the seconds their planning took (:func:`_planned`):
a micro-batch that cannot be cut into two nano-batches plans at 2 what it planned at 1 (the sweep
tries both on the same draws), and ``--per-batch`` scores a layout's groups, then replays the best
layouts' same groups whole. The bounds (``wlb-ideal``, ``ideal``) take from a schedule only its
layout, its attention's total and its segments, so they are computed from the layout
(:func:`_bound_groups`) without the planner's pairs of ranges -- the same numbers (``tests/test_sim_fast.py``
holds them to the planned path), at a small fraction of the cost: a per-document layout's ranges
grow with the square of the CP size for every document."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, replace

import numpy as np

from ..costmodel.cost import attention_flops
from ..planning.layout import Layout
from ..planning.masks import mask_area
from ..planning.schedule import attention_program, layout_segments
from ..schedulers import spec
from .job import (Links, SimConfig, attn_shape, backward_option, comm_time, dry_schedule, laid_out, nano_docs,
                  plan_context)
from .kernel import AttentionKernel
from .replay import TimedProgram
from .step import MicroBatch
from .workload import Row, row_of

DIRECTIONS = ("forward", "backward")
PLANS_KEPT = 256   # groups' plans kept (module docstring): a sweep setting's draws, or a step's layouts
_PLANS: OrderedDict = OrderedDict()   # key -> (_Group, planning seconds, the network the key names by id)
_PLANS_LOCK = threading.Lock()        # (choose_step may run on the trainer's planning thread)


@dataclass(frozen=True, eq=False)
class _Group:
    """One schedule's program, its ranks' attention rates (FLOP/s) per direction, and its tokens."""

    program: object
    rates: dict
    tokens: np.ndarray
    ulysses: int | None


def _groups(cfg: SimConfig, name: str, docs_per_group: list, world: int, kernel: AttentionKernel,
            network) -> tuple[list[_Group], float]:
    """Row ``name``'s schedules, one per group of ``world`` ranks, and the seconds the slowest took to plan."""
    shape = attn_shape(cfg)
    context = plan_context(cfg, network)
    options = backward_option(cfg, name)
    # what a group's plan and rates depend on besides its documents (the network by identity: held in the entry)
    job = (name, world, replace(context, network=None), id(network), cfg.comm_dtype, tuple(sorted(options.items())),
           shape, kernel)
    groups, slowest = [], 0.0
    for docs in docs_per_group:
        group, seconds = _planned(job, [int(n) for n in docs], cfg, context, options, network)
        groups.append(group)
        slowest = max(slowest, seconds)
    return groups, slowest


def _planned(job: tuple, docs: list[int], cfg: SimConfig, context, options: dict, network) -> tuple[_Group, float]:
    """One group's :class:`_Group` and the seconds its planning took: kept from the last time the same
    documents were planned for the same ``job`` (module docstring), else planned now."""
    key = (*job, tuple(docs))
    with _PLANS_LOCK:
        hit = _PLANS.get(key)
        if hit is not None:
            _PLANS.move_to_end(key)
            return hit[0], hit[1]
    name, world, shape, kernel = job[0], job[1], job[6], job[7]
    start = time.perf_counter()
    schedule = dry_schedule(name, docs, world, context, comm_dtype=cfg.comm_dtype, **options)
    seconds = time.perf_counter() - start
    rates = _rates(row_of(name), schedule, docs, kernel, world, schedule.kernel_heads(shape))
    group = _Group(schedule.call_program(shape), rates, np.asarray(schedule.rank_tokens(), np.float64),
                   schedule.ulysses_degree)
    with _PLANS_LOCK:
        _PLANS[key] = (group, seconds, network)
        while len(_PLANS) > PLANS_KEPT:
            _PLANS.popitem(last=False)
    return group, seconds


def _rates(row: Row, schedule, docs, kernel: AttentionKernel, world: int, heads: float) -> dict:
    """Per direction, each rank's attention FLOP/s at the kernel's speed on its segments
    (:meth:`~distattn.planning.schedule.Schedule.kernel_segments`), ``heads`` query heads a call
    (:meth:`~distattn.planning.schedule.Schedule.kernel_heads`); a bound's: :func:`_bound_rates`."""
    if row.bound is None:
        return {d: kernel.rank_rates(schedule.kernel_segments(), world, d, heads) for d in DIRECTIONS}
    return _bound_rates(docs, kernel, world, heads, schedule.causal, schedule.window)


def _bound(row: Row, groups: list[_Group], world: int, ranks: int) -> list[_Group]:
    """The bounds' groups: attention alone, evened out over each replica's ranks (``replica``) or over
    every rank (``all``)."""
    def forward(g):
        return sum(ph.total(world) for ph in g.program.phases if not ph.is_comm and ph.direction == "forward")
    return _evened(row, [forward(g) for g in groups], groups, world, ranks)


def _evened(row: Row, forward: list[np.ndarray], groups: list[_Group], world: int, ranks: int) -> list[_Group]:
    """:func:`_bound` of the groups' forward attention FLOPs per rank (``forward[k]``, int64)."""
    overall = sum(f.sum() for f in forward) / ranks
    return [_Group(attention_program(np.full(world, overall if row.bound == "all" else f.mean()), world),
                   g.rates, g.tokens, None) for f, g in zip(forward, groups)]


def _bound_groups(cfg: SimConfig, name: str, docs_per_group: list, world: int,
                  kernel: AttentionKernel) -> list[_Group] | None:
    """:func:`_bound` of :func:`_groups` without planning (module docstring): a schedule of the bound's
    row computes each rank's query rows against their documents' keys, so its forward FLOPs per rank,
    its tokens and its segments follow from its layout (:func:`distattn.planning.schedule.layout_segments`).
    None for a row whose scheduler lays tokens out itself (no layout to compute from)."""
    row = row_of(name)
    entry = spec(row.entry)
    kind = row.layout or entry.layout
    if kind is None:
        return None
    shape = attn_shape(cfg)
    forward, groups = [], []
    for docs in docs_per_group:
        lens = laid_out(name, docs, world)
        shards = Layout(kind).shards(lens, world)
        segments = layout_segments(shards, lens, True, None)   # (dry_schedule's document mask)
        area = np.zeros(world, dtype=np.int64)
        np.add.at(area, segments[0], segments[2])
        forward.append(attention_flops(area, shape.num_heads, shape.head_dim))
        rates = _bound_rates(docs, kernel, world, shape.num_heads)
        tokens = np.asarray([shards.num_tokens(r) for r in range(world)], np.float64)
        groups.append(_Group(None, rates, tokens, None))
    return _evened(row, forward, groups, world, cfg.ranks)


def _bound_rates(docs, kernel: AttentionKernel, world: int, heads: float, causal: bool = True,
                 window: int | None = None) -> dict:
    """The bounds' FLOP/s (``wlb-ideal``, ``ideal``): their work is evened out over their ranks, so
    every rank runs at the speed of the documents together, each whole on all ``heads`` -- the kernel's
    best case, which no placement that cuts a document beats."""
    q_len = np.asarray(docs, dtype=np.int64)
    together = (np.zeros(len(q_len), dtype=np.int64), q_len, mask_area(q_len, q_len, causal, window), q_len)
    return {d: np.full(world, kernel.rank_rates(together, 1, d, heads)[0]) for d in DIRECTIONS}


def _merged(groups: list[_Group], world: int, network, cfg: SimConfig) -> TimedProgram:
    """One timed program over the groups' ranks side by side (every group's program has the same
    instructions: they follow from the mesh and options, not the documents)."""
    per_node = cfg.gpus_per_node // cfg.tp

    def timed(g):
        attention = (lambda ph: np.asarray(ph.amount, np.float64) / g.rates[ph.direction][ph.rank])
        return TimedProgram.of(g.program, world, attention, lambda ph: comm_time(network, ph),
                               lambda ph: "nic" if ph.span > per_node else "nvlink")
    programs = [timed(g) for g in groups]
    first = programs[0]
    assert all(t.program.stages == first.program.stages for t in programs), "replicas' programs differ"
    keys = set().union(*(t.seconds for t in programs))
    zero, none = np.zeros(world), np.zeros(0, dtype=np.int64)
    links = {k: tuple(np.concatenate([t.links.get(k, (none, none))[j] + i * world for i, t in enumerate(programs)])
                      for j in (0, 1))
             for k in set().union(*(t.links for t in programs))}   # each group's pairs on its own ranks
    return TimedProgram(first.program, {k: np.concatenate([t.seconds.get(k, zero) for t in programs]) for k in keys},
                        links, first.link_of)


def micro_batch(cfg: SimConfig, name: str, replicas: list, kernel: AttentionKernel, links: Links,
                pool: bool = True) -> dict:
    """One micro-batch of every replica (``replicas[r]``: its documents): its :class:`~.step.MicroBatch`,
    the forward attention FLOPs of all replicas (MFU's), its Ulysses degree and its planning seconds.
    ``pool=False``: a scheduler that pools (``cad``) plans each replica's CP group alone, as a group of
    a per-batch step runs it (:mod:`.per_batch`)."""
    row, m = row_of(name), cfg.model
    entry = spec(row.entry)
    nano = 1 if row.bound else entry.nano_batches_for(cfg.nano_batches)
    # a replica without documents this micro-batch still runs the collectives: one token stands in
    replicas = [docs or [1] for docs in replicas]
    cut = [nano_docs(rep, nano, m) for rep in replicas]
    nano = min(len(c) for c in cut)
    cut = [c if len(c) == nano else [rep] for c, rep in zip(cut, replicas)]   # replicas cut alike
    programs, pre, post, tp, tokens_all, flops_attn, planning, ulysses = [], [], [], [], [], 0.0, 0.0, None
    for n in range(nano):
        if entry.pools and pool:   # one schedule over the pool: every replica's sequence, balanced over all ranks
            docs, world = [[d for rep in cut for d in rep[n]]], cfg.ranks
        else:
            docs, world = [rep[n] for rep in cut], cfg.cp
        groups = _bound_groups(cfg, name, docs, world, kernel) if row.bound else None
        if groups is None:
            groups, seconds = _groups(cfg, name, docs, world, kernel, links.cp)
            if row.bound:
                groups = _bound(row, groups, world, cfg.ranks)
            else:
                planning += seconds
        for g in groups:   # MFU counts the forward's attention (the trainer's model_flops), all TP ranks
            flops_attn += cfg.tp * sum(float(ph.total(world).sum()) for ph in g.program.phases
                                       if not ph.is_comm and ph.direction == "forward")
        programs.append(_merged(groups, world, links.cp, cfg))
        tokens = np.concatenate([g.tokens for g in groups])
        tokens_all.append(tokens)
        a, b = _layer_seconds(cfg, tokens)
        pre.append(a)
        post.append(b)
        tp.append(_tp_seconds(cfg, links.node, tokens))
        ulysses = groups[0].ulysses
    head = 6 * m.vocab_size * m.dim * sum(tokens_all) / (cfg.gpu.peak_tflops * 1e12 * cfg.mfu * cfg.tp)
    mb = MicroBatch(programs, pre, post, head, tp if cfg.tp > 1 else None)
    return {"micro": mb, "flops_attn": flops_attn, "ulysses": ulysses, "planning_s": planning,
            "tokens": sum(tokens_all)}


def _layer_seconds(cfg: SimConfig, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per rank, forward seconds of a layer's ``pre`` (QKV projection) and ``post`` (output
    projection and MLP) on ``tokens``, a TP rank's share."""
    m, rate = cfg.model, cfg.gpu.peak_tflops * 1e12 * cfg.mfu * cfg.tp
    return 2 * m.qkv_params * tokens / rate, 2 * (m.layer_matmul_params - m.qkv_params) * tokens / rate


def _tp_seconds(cfg: SimConfig, node, tokens: np.ndarray) -> np.ndarray:
    """Per rank, one linear piece's sequence-parallel all-gather and reduce-scatter over its TP group."""
    if cfg.tp == 1:
        return np.zeros_like(tokens)
    size = tokens * cfg.model.dim * cfg.elem_bytes
    return node.time("all_gather", cfg.tp, size) + node.time("reduce_scatter", cfg.tp, size)


__all__ = ["micro_batch"]
