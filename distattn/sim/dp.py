"""The data-parallel transfers of a step, as ``parallel.dp_mode`` issues them (:class:`DataParallel`,
:func:`dp_seconds`), each timed on the links it crosses; :mod:`.step` places them in the step.

Over the ``N = dp x cp`` ranks of one TP index, each rank holding ``1/tp`` of the weights:

* ``ddp``: whole fp32 parameters; the gradients all-reduced over all ``N`` ranks in DDP's buckets of
  :data:`DDP_BUCKET_BYTES`, each issued once its last gradient is ready in the backward (overlapped
  with the rest of it);
* ``fsdp``: FSDP2's ``fully_shard`` per block over all ``N`` ranks: each block's bf16 parameters
  gathered once per pass, its fp32 gradients reduce-scattered once; the root's (embedding, final
  norm, head) gathered at the start and reduced at the end;
* ``hsdp``: FSDP2 on a 2-D mesh: each block sharded over ``dp_shard`` consecutive ranks -- its gathers
  and reduce-scatters inside that group (NVLink where it fits in a node) -- and each block's gradient
  shard all-reduced across the ``N / dp_shard`` replicas (over the network card) right after its
  reduce-scatter;
* ``zero1`` (:mod:`distattn.train.zero1`): whole bf16 parameters on each rank; the fp32 gradients
  reduce-scattered over all ``N`` ranks in buckets of up to :data:`ZERO1_BUCKET_PARAMS` parameters
  filled in backward order, each issued when its last gradient is ready -- at most
  :data:`ZERO1_IN_FLIGHT` in flight: the backward waits for the oldest before it sends another --
  and, after the optimizer step, each bucket's updated bf16 parameters all-gathered over all ranks,
  in forward order, that many ahead: each block waits for its buckets just before it first runs in
  the next forward, and each wait sends the next. One reduce-scatter and one all-gather per bucket a
  step.

Buckets hold whole parameters in the order the trainer fills them (:func:`parameters`,
:func:`buckets`): the head's (output layer, final norm: the loss's backward), the blocks from the top,
the embedding last; a bucket is issued after the segment in which it fills (its block's last backward
piece: a little late for the block's first gradients, never early).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np

from .dp_memory import BUCKET_ELEMENTS
from .memory_model import DP_MODES

DDP_BUCKET_BYTES = 25 * 2**20        # torch DDP's bucket_cap_mb (25)
ZERO1_BUCKET_PARAMS = BUCKET_ELEMENTS   # the trainer's ZeRO-1 buckets (Megatron's 40M: distattn/train/zero1.py)
# zero1's buckets sent and not yet waited for, at most: gradients, and parameters (distattn.train.zero1.IN_FLIGHT)
ZERO1_IN_FLIGHT = 2
SHARDED = ("fsdp", "hsdp")           # modes that gather each block's parameters per pass
BUCKETED = ("ddp", "zero1")          # modes that reduce gradients in buckets


@dataclass(frozen=True, eq=False)
class Collective:
    """One transfer's per-rank seconds, its group -- ``span`` consecutive ranks (None: every rank of the
    step) -- and the link it queues on (:class:`~.replay.Op`)."""

    seconds: np.ndarray
    span: int | None
    link: str

    def on(self, n: int) -> "Collective":
        """The first ``n`` ranks' view (:func:`.per_batch.class_time` replays a share of the job's ranks)."""
        return Collective(self.seconds[:n], None if self.span is None else math.gcd(self.span, n), self.link)

    def group(self) -> int:
        return len(self.seconds) if self.span is None else self.span


@dataclass(frozen=True, eq=False)
class Buckets:
    """A bucketed mode's transfers: its parameters cut into buckets of ``per_bucket`` (:func:`buckets`),
    each reduced by ``reduce`` (fp32) and, zero1, gathered (``gather_bytes`` a parameter; None: no gathers);
    ``time(op, bytes)``: the seconds of ``op`` over the job's ranks. Laid out per layer count
    (:meth:`layout`): :func:`.per_batch.class_time` replays three and four layers of the model."""

    reduce: str
    per_bucket: float
    model: object
    tp: int
    gather_bytes: float | None
    time: Callable[[str, float], float]
    ranks: int

    def layout(self, n_layers: int) -> tuple[tuple, tuple, tuple]:
        """``(fills, gathers, needs)`` of :class:`DataParallel` for ``n_layers`` of the model's blocks."""
        fills, holds = buckets(parameters(self.model, self.tp, n_layers), self.per_bucket)

        def each(op, nbytes):
            return Collective(np.full(self.ranks, self.time(op, nbytes)), None, "nic")
        timed = tuple(tuple(each(self.reduce, p * 4) for p in fill) for fill in fills)
        if self.gather_bytes is None:
            return timed, (), ()
        issued = [p for fill in fills for p in fill]   # bucket k's parameters, in backward order
        order = list(range(len(issued)))[::-1]          # forward order: the embedding's bucket first
        position = {k: i for i, k in enumerate(order)}
        needs, seen = [], set()
        for held in holds[::-1]:   # forward segments: the embedding, the blocks from the bottom, the head
            new = sorted({position[k] for k in held} - seen)
            seen.update(new)
            needs.append(tuple(new))
        return timed, tuple(each("all_gather", issued[k] * self.gather_bytes) for k in order), tuple(needs)


@dataclass(frozen=True, eq=False)
class DataParallel:
    """A step's data-parallel transfers (module docstring). Sharded modes: per block its ``gather``
    (each pass) and ``reduce`` (once), hsdp's ``replicate`` after it, and the root's. Bucketed modes:
    their :class:`Buckets`, laid out as ``fills[s]``, the buckets issued after backward segment ``s``
    (0: the head, ``1 + k``: the ``k``-th block from the top, last: the embedding); zero1's ``gathers``
    in forward order and ``needs[s]``, the indices of those forward segment ``s`` (0: the embedding,
    ``1 + i``: block ``i``, last: the head) waits for before it first runs."""

    mode: str
    gather: Collective | None = None
    reduce: Collective | None = None
    replicate: Collective | None = None
    root_gather: Collective | None = None
    root_reduce: Collective | None = None
    root_replicate: Collective | None = None
    buckets: Buckets | None = None

    @property
    def sharded(self) -> bool:
        return self.mode in SHARDED

    def on(self, n: int) -> "DataParallel":
        """The first ``n`` ranks' view of every transfer."""
        def cut(c):
            return None if c is None else c.on(n)
        return replace(self, gather=cut(self.gather), reduce=cut(self.reduce), replicate=cut(self.replicate),
                       root_gather=cut(self.root_gather), root_reduce=cut(self.root_reduce),
                       root_replicate=cut(self.root_replicate),
                       buckets=None if self.buckets is None else replace(self.buckets, ranks=n))


def parameters(model, tp: int = 1, n_layers: int | None = None) -> list[tuple[float, int]]:
    """``(size, segment)`` of each of one rank's parameters (``1/tp`` of each) in the order the trainer's
    buckets take them, its registration order reversed: the head's segment (an untied output layer,
    the final norm: 0), each block from the top (``1 + k``, its own parameters reversed), the embedding
    (last); ``n_layers`` blocks (None: the model's)."""
    m = model
    layers = m.n_layers if n_layers is None else n_layers
    hd = m.head_dim
    block = [m.dim, m.dim * hd * m.n_heads, m.dim * hd * m.n_kv_heads, m.dim * hd * m.n_kv_heads,
             m.dim * hd * m.n_heads, m.dim, *[m.dim * m.ffn_dim] * (3 if m.gated_mlp else 2)]
    block += [m.n_heads] if m.attention_sinks else []
    out = [] if m.tie_embeddings else [(m.vocab_size * m.dim / tp, 0)]
    out.append((m.dim / tp, 0))
    for k in range(layers):
        out += [(p / tp, 1 + k) for p in block[::-1]]
    return out + [(m.vocab_size * m.dim / tp, layers + 1)]


def buckets(params: list[tuple[float, int]], limit: float) -> tuple[list[list[float]], list[list[int]]]:
    """The trainer's buckets of whole ``params`` (:func:`parameters`) in order: one closes before a
    parameter that would take it past ``limit`` parameters (one larger alone). Per segment, the sizes
    of the buckets whose last parameter is in it (issued after it), and the indices of the buckets
    holding any of its parameters."""
    segments = 1 + max(seg for _, seg in params)
    fills: list[list[float]] = [[] for _ in range(segments)]
    holds: list[list[int]] = [[] for _ in range(segments)]
    size, last, count = 0.0, None, 0
    for p, seg in params:
        if size and size + p > limit:
            fills[last].append(size)
            size, count = 0.0, count + 1
        size, last = size + p, seg
        if not holds[seg] or holds[seg][-1] != count:
            holds[seg].append(count)
    fills[last].append(size)
    return fills, holds


def shard_of(cfg) -> int | None:
    """hsdp's shard group (``dp_shard``; unset: the ranks of one node, at most the job's), else None."""
    if cfg.dp_mode != "hsdp":
        return None
    return cfg.dp_shard or min(max(1, cfg.gpus_per_node // cfg.tp), cfg.ranks)


def dp_seconds(cfg, net) -> DataParallel | None:
    """``cfg.dp_mode``'s transfers (module docstring) over its ``dp x cp`` ranks on ``net`` (the network
    as a CP rank sees it: ``gpus_per_node / tp`` ranks to a node), or None on one rank (or where
    ``cfg.dp_transfers`` is off). bf16 gathers (the compute dtype, ``elem_bytes``), fp32 gradients."""
    n, m, tp = cfg.ranks, cfg.model, cfg.tp
    if cfg.dp_mode not in DP_MODES:
        raise ValueError(f"dp_mode {cfg.dp_mode!r}: choose one of {', '.join(DP_MODES)}")
    if n == 1 or not cfg.dp_transfers:
        return None
    gathered, reduced = cfg.elem_bytes / tp, 4 / tp

    def each(op, ranks, nbytes, span=None, link="nic", nodes=None):
        return Collective(np.full(n, float(net.time(op, ranks, nbytes, nodes))), span, link)
    if cfg.dp_mode == "fsdp":   # (every transfer on the network card's queue, as the FSDP rows were always timed)
        return DataParallel("fsdp", each("all_gather", n, m.block_params * gathered),
                            each("reduce_scatter", n, m.block_params * reduced),
                            root_gather=each("all_gather", n, m.root_params * gathered),
                            root_reduce=each("reduce_scatter", n, m.root_params * reduced))
    if cfg.dp_mode == "hsdp":
        return _hsdp(cfg, net, each)
    times: dict = {}

    def time(op, nbytes):   # (a bucketed mode's buckets are mostly of one size: each timed once)
        if (op, nbytes) not in times:
            times[op, nbytes] = float(net.time(op, n, nbytes))
        return times[op, nbytes]
    if cfg.dp_mode == "ddp":
        return DataParallel("ddp", buckets=Buckets("all_reduce", DDP_BUCKET_BYTES / 4, m, tp, None, time, n))
    return DataParallel("zero1", buckets=Buckets("reduce_scatter", ZERO1_BUCKET_PARAMS, m, tp, cfg.elem_bytes, time, n))


def _hsdp(cfg, net, each) -> DataParallel:
    """hsdp's transfers: gathers and reduce-scatters in groups of ``dp_shard`` consecutive ranks (NVLink
    where a group fits in a node), each gradient shard all-reduced over the replicas (one rank of each
    group: as many nodes as the groups' members span, the network card's queue)."""
    n, m, tp = cfg.ranks, cfg.model, cfg.tp
    shard = shard_of(cfg)
    per_node = max(1, cfg.gpus_per_node // tp)
    link = "nvlink" if shard <= per_node else "nic"
    gathered, reduced = cfg.elem_bytes / tp, 4 / tp
    replicas = n // shard
    # the replicas of a rank: every shard-th rank; those in one node share it
    nodes = max(1, min(replicas, math.ceil(replicas / max(1, per_node // shard))))
    if shard == 1:
        sharded = {}
    else:
        sharded = {"gather": each("all_gather", shard, m.block_params * gathered, shard, link),
                   "reduce": each("reduce_scatter", shard, m.block_params * reduced, shard, link),
                   "root_gather": each("all_gather", shard, m.root_params * gathered, shard, link),
                   "root_reduce": each("reduce_scatter", shard, m.root_params * reduced, shard, link)}
    across = {}
    if replicas > 1:
        across = {"replicate": each("all_reduce", replicas, m.block_params * reduced / shard, None, "nic", nodes),
                  "root_replicate": each("all_reduce", replicas, m.root_params * reduced / shard, None, "nic", nodes)}
    zero = Collective(np.zeros(n), shard, link)
    return DataParallel("hsdp", **{"gather": zero, "reduce": zero, "root_gather": zero, "root_reduce": zero,
                                   **sharded, **across})


__all__ = ["DDP_BUCKET_BYTES", "ZERO1_BUCKET_PARAMS", "ZERO1_IN_FLIGHT", "SHARDED", "BUCKETED", "Collective", "Buckets",
           "DataParallel", "parameters", "buckets", "shard_of", "dp_seconds"]
