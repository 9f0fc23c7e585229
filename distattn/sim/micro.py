"""One micro-batch of every replica as the step replays it (:mod:`.step`'s :class:`~.step.MicroBatch`):
each nano-batch's schedules -- one per CP group, or one over the pool -- with their ranks' attention
rates from the kernel's speed on their segments (:mod:`.kernel`) and their transfers on the links,
merged into one program over every rank; the linear pieces' seconds; tensor parallelism's
collectives; and FSDP's per-block transfers (:func:`fsdp_seconds`)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from ..masks import mask_area
from ..schedule import attention_program
from ..schedulers import spec
from .job import (Links, SimConfig, attn_shape, backward_option, comm_time, dry_schedule, nano_docs,
                  plan_context)
from .kernel import AttentionKernel, kernel_heads
from .replay import TimedProgram
from .step import Fsdp, MicroBatch
from .workload import Row, row_of

DIRECTIONS = ("forward", "backward")


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
    groups, slowest = [], 0.0
    for docs in docs_per_group:
        start = time.perf_counter()
        schedule = dry_schedule(name, docs, world, context, comm_dtype=cfg.comm_dtype, **backward_option(cfg, name))
        slowest = max(slowest, time.perf_counter() - start)
        rates = _rates(row_of(name), schedule, docs, kernel, world, 4.0 * shape.num_heads * shape.head_dim,
                       kernel_heads(schedule, shape))
        groups.append(_Group(schedule.call_program(shape), rates, np.asarray(schedule.rank_tokens(), np.float64),
                             schedule.ulysses_degree))
    return groups, slowest


def _rates(row: Row, schedule, docs, kernel: AttentionKernel, world: int, pair_flops: float,
           heads: float | None = None) -> dict:
    """Per direction, each rank's attention FLOP/s at the kernel's speed on its segments
    (:meth:`~distattn.schedule.Schedule.kernel_segments`), ``heads`` query heads a call
    (:func:`~.kernel.kernel_heads`; a bound's: all). A bound's work is evened out over its ranks,
    so they all run at the speed of its segments together: the schedule's (``wlb-ideal``: per-document
    CP), or -- ``ideal``, whose attention no placement cuts -- every document whole."""
    if row.bound is None:
        return {d: kernel.rank_rates(schedule.kernel_segments(), world, d, pair_flops, heads) for d in DIRECTIONS}
    if row.bound == "all":
        q_len = np.asarray(docs, dtype=np.int64)
        area = mask_area(q_len, q_len, schedule.causal, schedule.window)
    else:
        _, q_len, area = schedule.kernel_segments()
    together = (np.zeros(len(q_len), dtype=np.int64), q_len, area)   # every segment on one rank
    return {d: np.full(world, kernel.rank_rates(together, 1, d, pair_flops)[0]) for d in DIRECTIONS}


def _bound(row: Row, groups: list[_Group], world: int, ranks: int) -> list[_Group]:
    """The bounds' groups: attention alone, evened out over each replica's ranks (``replica``) or over
    every rank (``all``)."""
    def forward(g):
        return sum(ph.total(world) for ph in g.program.phases if not ph.is_comm and ph.direction == "forward")
    overall = sum(forward(g).sum() for g in groups) / ranks
    return [_Group(attention_program(np.full(world, overall if row.bound == "all" else forward(g).mean()), world),
                   g.rates, g.tokens, None) for g in groups]


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


def micro_batch(cfg: SimConfig, name: str, replicas: list, kernel: AttentionKernel, links: Links) -> dict:
    """One micro-batch of every replica (``replicas[r]``: its documents): its :class:`~.step.MicroBatch`,
    the forward attention FLOPs of all replicas (MFU's), its Ulysses degree and its planning seconds."""
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
        if entry.pools:   # one schedule over the pool: every replica's sequence, balanced over all ranks
            docs, world = [[d for rep in cut for d in rep[n]]], cfg.ranks
        else:
            docs, world = [rep[n] for rep in cut], cfg.cp
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


def fsdp_seconds(cfg: SimConfig, net) -> Fsdp | None:
    """FSDP2's per-block and root transfers over the ``dp x cp`` ranks of a TP index: bf16 gathers
    (the compute dtype), fp32 reduce-scatters (``reduce_dtype``), each rank's ``1/tp`` of the weights."""
    n, m = cfg.ranks, cfg.model
    if not cfg.fsdp or n == 1:
        return None
    gathered, reduced = cfg.elem_bytes / cfg.tp, 4 / cfg.tp

    def each(op, params, nbytes):
        return np.full(n, float(net.time(op, n, params * nbytes)))
    return Fsdp(each("all_gather", m.block_params, gathered), each("reduce_scatter", m.block_params, reduced),
                each("all_gather", m.root_params, gathered), each("reduce_scatter", m.root_params, reduced))


__all__ = ["micro_batch", "fsdp_seconds"]
