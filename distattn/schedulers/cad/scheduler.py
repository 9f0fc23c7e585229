"""``cad``: core-attention disaggregation -- attention tasks balanced by FLOPs over all ranks, in place.

(Efficient Long-context Language Model Training by Core Attention
Disaggregation; the DistCA system.) Packing balances tokens, so everything
but attention is balanced; attention of a document costs ~ its length
squared, so ranks holding long documents straggle. Core attention has no
weights and needs only its document's Q, K, V, so it can run anywhere.

Layout: by default ``shard`` gives every rank an equal, contiguous run of tokens (the
rest of the model sees a plain sequence split); any layout works (:mod:`distattn.planning.layout`):
tasks move, tokens stay where the layout put them. ``attention`` runs a task
table planned once per batch:

1. *Tasks.* Each document's queries are cut at the boundaries of the runs of
   tokens the ranks hold; every piece is a task (its queries plus the key prefix
   it sees) whose home is the rank holding it; a long causal document is first cut into chunks
   of at most a quarter of a rank's tokens (a chunk from its end, carrying the most work per
   query row, is the cheapest to move).
2. *Cost.* Each task's time comes from the cost model
   (:mod:`distattn.costmodel.cost`: a roofline by default, or a measured profile).
3. *Placement* (:mod:`distattn.schedulers.cad.placement`, the algorithm in its
   docstring). While the most loaded rank is more than ``epsilon`` (default
   0.04) above the mean: price every move of one of its tasks to an
   under-loaded rank as network seconds of the bytes it adds (queries, plus
   keys the destination neither owns nor already receives; intra- vs
   inter-node bandwidth of a ``network`` profile) per second of attention it
   takes off, within per-rank egress/ingress caps, and make the cheapest;
   a move that would overshoot cuts a task's queries so that the head moves
   (the head needs the shorter key prefix).

Execution, forward: one all-to-all sends every task's Q rows to the rank that
computes it and, per destination, the union of the key rows its tasks need
(each K/V row once per destination, however many tasks use it); the
destination runs all its tasks in one varlen kernel call; out and lse return
by all-to-all, and the worker keeps nothing (``backward="resend"``, the default,
DistCA's): the backward sends it Q, out, dout, lse and K/V again. With
``backward="keep"`` the worker keeps Q, K/V, out and lse instead and the
backward sends only dout. dq/dk/dv are computed on the worker and returned,
and dK/dV of keys that went to several ranks are summed (fp32) on the way.

The schedule is the task table (:class:`TaskSchedule`); :meth:`TaskSchedule.routes`
gives one slot's rows to send and receive and its kernel layout, which the
executor (:class:`distattn.executors.task_a2a.TaskExecutor`) runs.

**Pool.** ``distattn.plan(doc_lens, cp_group, scheduler="cad", pool=group)``
balances the attention of every CP group inside ``pool`` (e.g. all data-
parallel replicas, each with its own ``doc_lens``) over all the pool's ranks.
Contract: every rank of the pool calls ``plan`` (a collective over the pool:
document lengths are exchanged) and then ``attention`` together; each CP group
is a set of pool ranks; ``shard``/``unshard``/``position_ids`` stay within the
rank's own CP group and sequence; ``stats()`` lists every pool rank. Each group may use its own
layout (the ranks exchange the runs they hold with their document lengths).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from ...costmodel.network import NetworkProfile, default_profile
from ...costmodel.cost import TileCost
from ...kernels.speed import gpu_of, kernel_model
from ...kernels import Varlen
from ...planning.layout import Shards, covered_before
from ...planning.masks import MaskSlice, SliceMask, bound_or_none, shift_band
from ...planning.program import Builder, Program
from ...costmodel.tiles import TileModel
from ...planning.schedule import AttnShape, Phase, Schedule, imbalance
from ..blocks import layers
from .cast import Legs, Nodes, index_runs, key_legs, merge_intervals, query_legs
from .ledger import LinkCost, RowBytes
from .placement import place_tasks
from .planner import Segments


# what cad's attention servers keep for the backward (TaskSchedule.backward; distattn.plan(..., backward=...))
BACKWARDS = ("resend", "keep")
DEFAULT_GPU = "h100"   # the GPU a plan balances the kernel's seconds on, where nobody says (distattn.plan(..., gpu=))


@dataclass(frozen=True)
class Hop:
    """One hop's pairs that move rows (``q`` query rows and ``kv`` key rows from ``src`` to ``dst``;
    in hop 1 the diagonal, rows a slot keeps, included)."""

    src: np.ndarray
    dst: np.ndarray
    q: np.ndarray
    kv: np.ndarray

    @staticmethod
    def of(q_legs: Legs, kv_legs: Legs, hop: int, p: int) -> "Hop":
        q_src, q_dst, q_rows = q_legs.pairs(hop)
        kv_src, kv_dst, kv_rows = kv_legs.pairs(hop)
        keys, inverse = np.unique(np.concatenate([q_src * p + q_dst, kv_src * p + kv_dst]), return_inverse=True)
        q = np.bincount(inverse[:len(q_rows)], q_rows, minlength=len(keys)).astype(np.int64)
        kv = np.bincount(inverse[len(q_rows):], kv_rows, minlength=len(keys)).astype(np.int64)
        return Hop(keys // p, keys % p, q, kv)


@dataclass(frozen=True)
class Traffic:
    """Rows moved between slots, per hop (:mod:`distattn.schedulers.cad.cast`): ``hops[0]`` from
    the owners, later hops forwarded by relays. ``owner``/``comp``/``q``/``kv``: hop 1's."""

    hops: tuple[Hop, ...]
    nodes: Nodes

    @property
    def slots(self) -> int:
        return len(self.nodes.of)

    owner = property(lambda self: self.hops[0].src)
    comp = property(lambda self: self.hops[0].dst)
    q = property(lambda self: self.hops[0].q)
    kv = property(lambda self: self.hops[0].kv)

    def phase(self, direction: str, what: str, rows_bytes, back: bool, hops: int) -> Phase:
        """The all-to-alls of one kind of rows over hops ``1..hops`` (step ``h - 1`` is hop ``h``):
        ``rows_bytes(hop)`` per pair of the hop moves from ``src`` to ``dst`` (``back``: from ``dst`` to
        ``src``). Per slot and hop, ``amount``: the bytes it sends, ``inter_sent`` of them across nodes;
        ``intra``/``inter``: the larger of its sent and received bytes inside its node and across
        nodes (what an all-to-all waits for on each kind of link); ``peers``: the most slots it sends
        to or receives from (the all-to-all skips the others: its latency grows with these), and
        ``links`` which; ``kept``: the bytes of the rows it sends itself (in its buffers, on no link)."""
        p = self.slots
        parts, links = [], []
        for h, hop in enumerate(self.hops[:hops]):
            src, dst = (hop.dst, hop.src) if back else (hop.src, hop.dst)
            moved = np.where(src != dst, rows_bytes(hop), 0)
            local = self.nodes.same(src, dst)

            def per_slot(who, mask):
                return np.bincount(who, np.where(mask, moved, 0), minlength=p).astype(np.int64)
            peers = np.maximum(np.bincount(src, moved > 0, minlength=p), np.bincount(dst, moved > 0, minlength=p))
            kept = np.bincount(src, np.where(src == dst, rows_bytes(hop), 0), minlength=p).astype(np.int64)
            parts.append((per_slot(src, np.ones_like(local)), np.maximum(per_slot(src, local), per_slot(dst, local)),
                          np.maximum(per_slot(src, ~local), per_slot(dst, ~local)), per_slot(src, ~local),
                          peers.astype(np.int64), kept))
            links.append((np.full(int((moved > 0).sum()), h), src[moved > 0], dst[moved > 0]))
        amount, intra, inter, inter_sent, peers, kept = (np.concatenate(x) for x in zip(*parts))
        return Phase(direction, "all_to_all", what, p, np.tile(np.arange(p), hops), amount,
                     np.repeat(np.arange(hops), p), intra=intra, inter=inter, inter_sent=inter_sent, peers=peers,
                     kept=kept, links=tuple(np.concatenate(x).astype(np.int64) for x in zip(*links)))

    def matrices(self) -> tuple[np.ndarray, np.ndarray]:
        """Dense ``[owner, computing slot]`` matrices of hop 1's Q rows and K/V rows (small pools: tests)."""
        q, kv = (np.zeros((self.slots, self.slots), dtype=np.int64) for _ in range(2))
        np.add.at(q, (self.owner, self.comp), self.q)
        np.add.at(kv, (self.owner, self.comp), self.kv)
        return q, kv


@dataclass(frozen=True)
class Route:
    """One hop of one kind of rows (Q, or K/V) between one slot and every slot: per slot, the global
    tokens sent to it (hop 1: the sender's own; later hops: tokens it received in an earlier hop)
    and received from it, each in global order."""

    send: tuple[np.ndarray, ...]
    recv: tuple[np.ndarray, ...]


@dataclass(frozen=True)
class WorkerCall:
    """One varlen call of a slot's tasks: segments whose query rows do not overlap."""

    varlen: Varlen
    q_index: np.ndarray | None          # per segment query row -> row of my queries, q_tokens (None: all, in order)
    kv_index: np.ndarray                # per segment key row -> row of my K/V union (kv_tokens)


@dataclass(frozen=True)
class TaskRoutes:
    """One slot's part of the task table: the routes of the all-to-alls and the kernel calls (one,
    unless slices of a group share query rows: their partial results merge on the slot)."""

    q: tuple[Route, ...]            # per hop (the schedule's Q hops)
    kv: tuple[Route, ...]           # per hop (the schedule's K/V hops)
    calls: tuple[WorkerCall, ...]   # query rows index ``q_tokens``, key rows ``kv_tokens``
    q_tokens: np.ndarray            # the global tokens of my tasks' queries, sorted
    kv_tokens: np.ndarray           # the global tokens of my K/V union, sorted


@dataclass(frozen=True)
class Pool:
    """The CP groups of a pool, as one token space (see module docstring): every group's documents
    in slot order, the runs of tokens each slot holds, the pool-group rank of each slot and its
    global rank (which ranks share a node: ``global_rank // gpus_per_node``)."""

    docs: tuple[int, ...]
    slots: Shards
    slot_ranks: tuple[int, ...]
    global_ranks: tuple[int, ...]

    @staticmethod
    def of(groups, slot_ranks=None, global_ranks=None) -> "Pool":
        """The pool of CP groups ``groups``: ``(doc_lens, shards)`` each, in slot order (group after
        group, each group's ranks in order); ``slot_ranks``/``global_ranks``: the pool-group rank and
        global rank of each slot (default: the slot itself, as for a dry pool)."""
        docs, owned = [], []
        for lens, shards in groups:
            offset = sum(docs)
            docs += list(lens)
            owned += [tuple((a + offset, b + offset) for a, b in zip(*(x.tolist() for x in shards.rank_runs(r))))
                      for r in range(shards.world_size)]
        slot_ranks = tuple(range(len(owned))) if slot_ranks is None else tuple(slot_ranks)
        global_ranks = slot_ranks if global_ranks is None else tuple(global_ranks)
        return Pool(tuple(docs), Shards.from_owned(owned, sum(docs)), slot_ranks, global_ranks)


@dataclass(frozen=True, eq=False, kw_only=True)
class TaskSchedule(Schedule):
    segments: Segments = field(repr=False)
    slots: Shards = field(repr=False)               # the pool's token space: the runs each slot holds
    slot_ranks: tuple[int, ...]                     # pool-group rank of each slot
    nodes: Nodes = field(repr=False)                # the node of each slot (routes: cast.py)
    fanout: int | None = None                       # child nodes per node of a K/V tree (None: tree_fanout)
    # "resend": workers keep nothing received, the backward sends their rows again; "keep": they keep
    # them (distattn.executors.task_a2a)
    backward: str = "resend"
    cost: object = field(default=None, repr=False, compare=False)   # the cost model the tasks were balanced on

    @property
    def keeps_local_out(self) -> bool:
        """``resend``: the owner keeps its own q, k, v, out and lse (out: the tensor wo reads);
        ``keep``: the worker keeps its tasks' rows."""
        return self.backward == "resend"

    @property
    def pool_size(self) -> int:
        return self.slots.world_size

    @property
    def stat_ranks(self) -> int:
        return self.pool_size

    def rank_tokens(self) -> list[int]:
        return [self.slots.num_tokens(c) for c in range(self.pool_size)]

    def compute_slices(self, rank: int) -> list[MaskSlice]:
        s = self.segments
        mine = s.rank == rank
        return [MaskSlice(int(a), int(b), int(c), int(d), bound_or_none(e), bound_or_none(f))
                for a, b, c, d, e, f in zip(s.q0[mine], s.q1[mine], s.k0[mine], s.k1[mine], s.lo[mine], s.hi[mine])]

    def visible_pairs(self, rank: int) -> int:
        return int(self.segments.area[self.segments.rank == rank].sum())

    def kernel_segments(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The tasks each slot computes, wherever their rows live."""
        s = self.segments
        return s.rank, s.q1 - s.q0, s.area, s.k1 - s.k0

    def extra_stats(self) -> dict:
        """``seconds``: each slot's forward + backward attention seconds by the cost model its tasks were
        balanced on (the kernel's tiles on the plan's GPU, :mod:`distattn.costmodel.tiles`, for the model's heads
        the plan was made for), and ``seconds_imbalance`` (max / mean): what placement evens out."""
        if self.cost is None:
            return {}
        s = self.segments
        seconds = np.bincount(s.rank, self.cost.task_time(s.q1 - s.q0, s.k1 - s.k0, s.area), minlength=self.pool_size)
        return {"seconds": seconds.tolist(), "seconds_imbalance": imbalance(seconds.tolist())}

    def traffic(self) -> "Traffic":
        """Rows moved between every (sender, receiver) pair that moves any, per hop (sparse)."""
        return self._traffic

    @cached_property
    def _legs(self) -> tuple[Legs, Legs]:
        """Q legs and K/V legs (:mod:`~distattn.schedulers.cad.cast`)."""
        s, slots = self.segments, self.slots
        # the union of each computing slot's query (key) ranges; offsetting slot c by c * (T + 1)
        # keeps the slots' intervals apart, so one merge does every slot at once
        span = slots.total + 1

        def union(a0, a1):
            u0, u1 = merge_intervals(a0 + s.rank * span, a1 + s.rank * span)
            comp = u0 // span
            return comp, u0 - comp * span, u1 - comp * span
        q_legs = query_legs(*union(s.q0, s.q1), slots, self.nodes)
        # what each node moves across nodes before its key trees, in key rows (a query row weighs
        # what it costs over forward and backward, Llama-3 sizes): relays go where little moves
        node = self.nodes.dense
        far = node[q_legs.src] != node[q_legs.dst]
        rows = RowBytes.of(resend=self.backward == "resend")
        load = np.bincount(np.concatenate([node[q_legs.src[far]], node[q_legs.dst[far]]]),
                           np.tile(q_legs.rows[far], 2), self.nodes.count) * (rows.q / rows.kv)
        return q_legs, key_legs(*union(s.k0, s.k1), slots, self.nodes, self.fanout, load)

    @property
    def hops(self) -> tuple[int, int]:
        """All-to-alls of Q rows and of K/V rows, each way."""
        return self._legs[0].hops, self._legs[1].hops

    @cached_property
    def _traffic(self) -> "Traffic":   # phases() and buffer_bytes() both read it
        q_legs, kv_legs = self._legs
        return Traffic(tuple(Hop.of(q_legs, kv_legs, h, self.pool_size) for h in range(1, max(self.hops) + 1)),
                       self.nodes)

    def program(self, shape: AttnShape) -> Program:
        """:class:`~distattn.executors.task_a2a.TaskExecutor`'s stages. Forward: Q and K/V to the
        workers hop by hop (:mod:`~distattn.schedulers.cad.cast`; every later hop chained to the one
        before when the first starts), attention, out back up the hops (``resend``: and lse; ``keep``:
        lse stays with the worker). Backward: dout to the workers (``keep``: they kept Q, K/V, out
        and lse) or Q, out, dout and lse in one buffer and K/V again (``resend``), attention, dQ and
        fp32 dK/dV back up the same hops (partials summed at every relay). Each all-to-all's bytes
        are split into what stays inside a node and what crosses (step ``h - 1`` of a phase is hop
        ``h``)."""
        p, tr = self.pool_size, self.traffic()
        hq, hkv = self.hops
        resend = self.backward == "resend"
        q_b, q_w = shape.row_bytes(shape.num_heads), shape.wire_row(shape.num_heads)   # dQ's row; Q/out/dout's
        kv_w, dkv_b = 2 * shape.wire_row(shape.num_kv_heads), 2 * shape.row_bytes(shape.num_kv_heads, acc=True)
        lse_b = shape.num_heads * shape.acc_bytes
        area = np.bincount(self.segments.rank, self.segments.area, minlength=p).astype(np.int64)
        flops = shape.flops(area)
        b = Builder()

        def rows_phase(direction, what, row_bytes, back=False, hops=hq):
            return b.phase(tr.phase(direction, what, row_bytes, back, hops))
        q_in = rows_phase("forward", "Q to workers", lambda hop: hop.q * q_w)
        kv_in = rows_phase("forward", "K/V to workers", lambda hop: hop.kv * kv_w, hops=hkv)
        attn = b.phase(Phase.per_rank("forward", "attention", "attention", p, flops))
        out = rows_phase("forward", "out to owners", lambda hop: hop.q * q_w, True)
        lse = rows_phase("forward", "lse to owners", lambda hop: hop.q * lse_b, True) if resend else None
        if resend:
            rows = rows_phase("backward", "Q, out, dout, lse to workers", lambda hop: hop.q * (3 * q_w + lse_b))
            kv_again = rows_phase("backward", "K/V to workers", lambda hop: hop.kv * kv_w, hops=hkv)
        else:
            rows, kv_again = rows_phase("backward", "dout to workers", lambda hop: hop.q * q_w), None
        b_attn = b.phase(Phase.per_rank("backward", "attention", "attention", p, flops * 2.5))
        dq = rows_phase("backward", "dQ to owners", lambda hop: hop.q * q_b, True)
        dkv = rows_phase("backward", "dK/dV to owners", lambda hop: hop.kv * dkv_b, True, hkv)

        def to_workers(stage, *phases):        # first hops, then Cast.advance: each later hop once the one before is in
            for phase, hops in phases:
                b.start(stage, phase)
            for phase, hops in phases:
                for h in range(1, hops):
                    b.chain(stage, phase, h, after=h - 1)

        def back(stage, *phases):              # last hops, then Cast.back_advance: up the hops, summed on the way
            for phase, hops in phases:
                b.start(stage, phase, hops - 1)
            for phase, hops in phases:
                for h in range(hops - 1, 0, -1):
                    b.chain(stage, phase, h - 1, after=h)
        to_workers("dispatch", (q_in, hq), (kv_in, hkv))
        b.wait("compute", q_in, hq - 1)
        b.wait("compute", kv_in, hkv - 1)
        b.run("compute", attn)
        back("compute", *[(phase, hq) for phase in (out, lse)[:1 + resend]])
        for phase in (out, lse)[:1 + resend]:
            b.wait("finish", phase, 0)
        to_workers("start_backward", (rows, hq), *([(kv_again, hkv)] if resend else []))
        b.wait("compute_backward", rows, hq - 1)
        if resend:
            b.wait("compute_backward", kv_again, hkv - 1)
        b.run("compute_backward", b_attn)
        back("compute_backward", (dq, hq), (dkv, hkv))
        b.wait("finish_backward", dq, 0)
        b.wait("finish_backward", dkv, 0)
        return b.build()

    def _received_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """Per slot, the Q rows and K/V rows it receives over every hop (a relay's forwarded ones included)."""
        p = self.pool_size
        return tuple(sum(np.bincount(hop.dst, getattr(hop, kind), minlength=p) for hop in self.traffic().hops)
                     for kind in ("q", "kv"))

    def saved_bytes(self, shape: AttnShape) -> np.ndarray:
        """From forward to backward: ``resend``, the slot's own q, k, v, out and lse (as the ring
        schedulers); ``keep``, the worker's received task rows -- Q, out, lse and the K/V union (a
        relay's forwarded rows included)."""
        if self.backward == "resend":
            return super().saved_bytes(shape)
        q_rows, kv_rows = self._received_rows()
        return q_rows * (2 * shape.row_bytes(shape.num_heads) + shape.num_heads * shape.acc_bytes) + \
            kv_rows * shape.kv_row

    def buffer_bytes(self, shape: AttnShape) -> np.ndarray:
        """What a worker receives for its backward, at the backward's peak: dout (``keep``), or Q, out,
        dout, lse and the K/V union (``resend``); and the slot's results on their way back, dQ and
        fp32 dK/dV of every row it received (:meth:`grad_bytes` counts its accumulators)."""
        q_rows, kv_rows = self._received_rows()
        q_row, lse_b = shape.row_bytes(shape.num_heads), shape.num_heads * shape.acc_bytes
        received = q_rows * (3 * q_row + lse_b) + kv_rows * shape.kv_row if self.backward == "resend" \
            else q_rows * q_row
        return received + q_rows * q_row + kv_rows * 2 * shape.row_bytes(shape.num_kv_heads, acc=True)

    def grad_bytes(self, shape: AttnShape) -> np.ndarray:
        """The worker's fp32 dQ and dK/dV accumulators over the rows it computes on, and the owner's
        dQ, dK, dV of its own tokens."""
        q_rows, kv_rows = self._received_rows()
        acc = q_rows * shape.row_bytes(shape.num_heads, acc=True) + kv_rows * 2 * shape.row_bytes(
            shape.num_kv_heads, acc=True)
        own = np.asarray(self.rank_tokens(), dtype=np.int64) * shape.row_bytes(shape.num_heads + 2 * shape.num_kv_heads)
        return acc + own

    def routes(self, slot: int) -> TaskRoutes:
        """What ``slot`` sends where and receives from whom, and its kernel calls (key rows indexed
        into its K/V union, in global order)."""
        seg = self.segments
        q_legs, kv_legs = self._legs
        mine = np.nonzero(seg.rank == slot)[0]
        mine = mine[np.lexsort((seg.k0[mine], seg.q0[mine]))]
        q0, q1, k0, k1, b_lo, b_hi = (x[mine] for x in (seg.q0, seg.q1, seg.k0, seg.k1, seg.lo, seg.hi))
        qu0, qu1 = merge_intervals(q0, q1)
        ku0, ku1 = merge_intervals(k0, k1)
        q_start, k_start = covered_before(qu0, qu1, q0), covered_before(ku0, ku1, k0)
        shift = k0 - q0  # the bands, relative to each segment's first query and key
        b_lo, b_hi = shift_band(b_lo, b_hi, shift)
        layer = layers(q0, q1, np.zeros_like(q0), np.zeros_like(q0)) if mine.size else np.zeros(0, np.int64)
        calls = []
        for n in range(int(layer.max(initial=0)) + 1):
            at = layer == n
            q_index = index_runs(q_start[at], (q1 - q0)[at])
            whole = n == 0 and layer.max(initial=0) == 0 and np.array_equal(q_index, np.arange(len(q_index)))
            # a slot with no task (fewer tokens than ranks) still runs one empty kernel call: no special path
            varlen = Varlen.from_lengths((q1 - q0)[at], (k1 - k0)[at], b_lo[at], b_hi[at]) if at.any() \
                else Varlen.from_lengths([0], [0])
            calls.append(WorkerCall(varlen, None if whole else q_index, index_runs(k_start[at], (k1 - k0)[at])))
        p = self.pool_size
        routes = [tuple(Route(legs.per_peer(h, slot, p, sending=True), legs.per_peer(h, slot, p, sending=False))
                        for h in range(1, legs.hops + 1)) for legs in (q_legs, kv_legs)]
        return TaskRoutes(*routes, tuple(calls), index_runs(qu0, qu1 - qu0), index_runs(ku0, ku1 - ku0))


def planner_options(*, num_heads: int = 32, num_kv_heads: int = 8, head_dim: int = 128, dtype_bytes: int = 2,
                    gpu: str | None = None, kernel: TileModel | None = None, network=None) -> dict:
    """The options cad plans a job with -- the one place they are made, so training, the adapters'
    callers, ``distattn simulate``, ``python -m distattn.sim.cad_table`` and ``python -m
    distattn.bench.cad_balance`` plan the same job alike: the tile model of the kernel on the GPU
    (``kernel``, else :func:`~distattn.kernels.speed.kernel_model` of ``gpu``, default an H100) on the
    model's attention, and the network profile (default: NVLink in a node of 8, InfiniBand between
    nodes)."""
    tiles = kernel if kernel is not None else kernel_model(gpu or DEFAULT_GPU, head_dim)
    cost = TileCost(tiles, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, dtype_bytes=dtype_bytes)
    return {"cost": cost, "network": network if network is not None else default_profile()}


def derive(world_size: int, context, options: dict, two_d: bool = False) -> dict:
    """What cad takes from a :class:`~distattn.schedulers.PlanContext`: :func:`planner_options` of its
    head shape, dtype, GPU (``gpu=`` given to ``distattn.plan`` wins over the context's) and network;
    nothing from a context without the query and KV heads (the cost model's shape is a guess either
    way: :func:`build` plans one GPU's default)."""
    if context.num_heads is None or context.num_kv_heads is None:
        return {}
    return planner_options(num_heads=context.num_heads, num_kv_heads=context.num_kv_heads, head_dim=context.head_dim,
                           dtype_bytes=context.dtype_bytes, gpu=options.get("gpu", context.gpu),
                           kernel=None if "gpu" in options else context.kernel, network=context.network)


def build(doc_lens, mesh, *, causal, window, mask: SliceMask, shards: Shards, pool: Pool | None = None,
          epsilon: float = 0.04, cost=None, gpu: str = DEFAULT_GPU, network=None, overlap_s: float | None = None,
          comm_dtype: str | None = None, backward: str = "resend") -> TaskSchedule:
    """``shards``: the tokens each rank of the CP group holds. ``pool``: the pool's token space (:func:`distattn.executors.task_a2a.gather_pool` makes it from
    a process group when ``distattn.plan`` is given ``pool=group``). ``cost``: the attention cost
    model (:mod:`distattn.costmodel.cost`; its head shape also sizes the rows moves send), default the tile
    model of the kernel on ``gpu`` (:class:`~distattn.costmodel.cost.TileCost`: ``"h100"``, ``"h200"``, ...;
    ``distattn.costmodel.model_shape.GPUS``) on Llama-3 8B's heads, which a ``PlanContext`` with the model's
    heads replaces (:func:`derive`); ``network``: the
    :class:`~distattn.costmodel.network.NetworkProfile` moves are priced on (default: NVLink in a node
    of 8, InfiniBand between nodes). ``overlap_s``: seconds per layer (forward + backward) each rank
    computes besides attention -- what :func:`distattn.runtime.pingpong.ping_pong` hides transfers behind;
    given, a move is made only if it saves more attention time than the communication it adds
    beyond what that and the rank's attention hide. None (default): moves balance FLOPs within
    the byte caps, whatever their communication costs. ``comm_dtype``: how rows travel
    (``distattn.plan``'s; ``"fp8"`` prices moved rows at their FP8 bytes). ``backward``: ``"resend"``
    (default, DistCA's): the workers keep nothing they received and the backward sends them their rows
    again; ``"keep"``: they keep them for the backward, which then sends only dout -- less traffic,
    the busiest worker's received rows in memory (:mod:`distattn.executors.task_a2a`)."""
    if backward not in BACKWARDS:
        raise ValueError(f"backward must be one of {', '.join(map(repr, BACKWARDS))} (what cad's attention servers "
                         f"keep for the backward), got {backward!r}")
    if not isinstance(epsilon, (int, float)) or not 0 <= epsilon < 1:
        raise ValueError(f"epsilon must be in [0, 1) (allowed load above/below the mean), got {epsilon!r}")
    if network is not None and not isinstance(network, NetworkProfile):
        raise ValueError(f"network must be a distattn.costmodel.network.NetworkProfile, got {type(network).__name__}")
    if overlap_s is not None and (isinstance(overlap_s, bool) or not isinstance(overlap_s, (int, float))
                                  or not overlap_s >= 0):
        raise ValueError(f"overlap_s must be None or seconds >= 0 (computation per layer that hides transfers), "
                         f"got {overlap_s!r}")
    if pool is None:
        pool = Pool(tuple(doc_lens), shards, tuple(range(mesh.world_size)), mesh.global_ranks())
    else:  # the pool's token space: every CP group's documents (distattn.plan refuses mask= with pool=)
        mask = SliceMask.documents(pool.docs, causal, window)
    gpu_of(gpu)   # ValueError naming the GPUs distattn knows
    cost = cost or planner_options(gpu=gpu)["cost"]
    links = LinkCost.of(network, pool.slots.world_size)
    nodes = Nodes(np.asarray(pool.global_ranks, dtype=np.int64) // links.gpus_per_node)
    fp8 = comm_dtype == "fp8"
    resend = backward == "resend"
    shape = [getattr(cost, name, None) for name in ("num_heads", "num_kv_heads", "head_dim", "dtype_bytes")]
    rows = RowBytes.of(*shape, fp8, resend) if None not in shape else RowBytes.of(comm_fp8=fp8, resend=resend)
    segments = place_tasks(mask, pool.slots, cost, epsilon, links=links, rows=rows, overlap_s=overlap_s,
                           nodes=nodes)
    return TaskSchedule(scheduler="cad", doc_lens=doc_lens, causal=causal, window=window,
                        world_size=mesh.world_size, mask=mask, shards=shards,
                        segments=segments, slots=pool.slots, slot_ranks=pool.slot_ranks, nodes=nodes,
                        backward=backward, cost=cost)
