"""``cad``: core-attention disaggregation -- attention tasks balanced by FLOPs over all ranks, in place.

(Efficient Long-context Language Model Training by Core Attention
Disaggregation; the DistCA system.) Packing balances tokens, so everything
but attention is balanced; attention of a document costs ~ its length
squared, so ranks holding long documents straggle. Core attention has no
weights and needs only its document's Q, K, V, so it can run anywhere.

Layout: ``shard`` gives every rank an equal, contiguous run of tokens (the
rest of the model sees a plain sequence split). ``attention`` runs a task
table planned once per batch:

1. *Tasks.* Each document's queries are cut at the rank boundaries; every
   piece is a task (its queries plus the key prefix it sees) whose home is the
   rank owning it. A long causal document is instead cut into ``2k`` equal
   chunks paired head with tail (chunk ``i`` with ``2k-1-i``), so each pair
   carries the same causal work.
2. *Cost.* Each task's time comes from the cost model
   (:mod:`distattn.cost`: a roofline by default, or a measured profile).
3. *Placement* (:mod:`distattn.schedulers.cad_placement`, the algorithm in its
   docstring). While the most loaded rank is more than ``epsilon`` (default
   0.04) above the mean: price every move of one of its tasks to an
   under-loaded rank as network seconds of the bytes it adds (queries, plus
   keys the destination neither owns nor already receives; intra- vs
   inter-node bandwidth of a ``network`` profile) per second of attention it
   takes off, within per-rank egress/ingress caps, and make the cheapest;
   a move that would overshoot splits a pair or cuts a task's queries so that
   the head moves (the head needs the shorter key prefix).

Execution, forward: one all-to-all sends every task's Q rows to the rank that
computes it and, per destination, the union of the key rows its tasks need
(each K/V row once per destination, however many tasks use it); the
destination runs all its tasks in one varlen kernel call and keeps Q, K/V,
out and lse; out returns by all-to-all. Backward sends only dout to the
workers; dq/dk/dv are computed there and returned, and dK/dV of keys that
went to several ranks are summed (fp32) by their owner.

The schedule is the task table (:class:`TaskSchedule`); :meth:`TaskSchedule.routes`
gives one slot's rows to send and receive and its kernel layout, which the
executor (:class:`distattn.executors.task_a2a.TaskExecutor`) runs.

**Pool.** ``distattn.plan(doc_lens, cp_group, scheduler="cad", pool=group)``
balances the attention of every CP group inside ``pool`` (e.g. all data-
parallel replicas, each with its own ``doc_lens``) over all the pool's ranks.
Contract: every rank of the pool calls ``plan`` (a collective over the pool:
document lengths are exchanged) and then ``attention`` together; each CP group
is a set of pool ranks; ``shard``/``unshard``/``position_ids`` stay within the
rank's own CP group and sequence; ``stats()`` lists every pool rank.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from ..cluster.profile import NetworkProfile
from ..cost import Roofline
from ..kernels import Varlen
from ..masks import MaskSlice, SliceMask, bound_or_none, shift_band
from ..schedule import AttnShape, Phase, Schedule
from .blocks import layers, even_bounds
from .cad_placement import LinkCost, RowBytes, place_tasks
from .cad_planner import Segments


def _merge_intervals(a0: np.ndarray, a1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(a0, kind="stable")
    a0, a1 = a0[order], a1[order]
    keep = a1 > a0
    a0, a1 = a0[keep], a1[keep]
    if a0.size == 0:
        return a0, a1
    reach = np.maximum.accumulate(a1)
    starts = np.concatenate([[True], a0[1:] > reach[:-1]])
    idx = np.nonzero(starts)[0]
    return a0[idx], np.maximum.reduceat(a1, idx)


def _covered_before(i0: np.ndarray, i1: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Tokens of the disjoint sorted intervals ``[i0, i1)`` below each ``x``."""
    if i0.size == 0:  # a slot with no task: nothing below anything
        return np.zeros(np.shape(x), dtype=np.int64)
    cum = np.concatenate([[0], np.cumsum(i1 - i0)])
    j = np.searchsorted(i0, x, side="right")  # intervals starting at or before x
    inside = np.where(j > 0, np.minimum(x, i1[np.maximum(j - 1, 0)]) - i0[np.maximum(j - 1, 0)], 0)
    return cum[np.maximum(j - 1, 0)] * (j > 0) + np.maximum(inside, 0)


def _rows(i0, i1, lo, hi) -> np.ndarray:
    """Indices (relative to ``lo``) of tokens of intervals ``[i0, i1)`` inside ``[lo, hi)``."""
    a, b = np.maximum(i0, lo), np.minimum(i1, hi)
    keep = b > a
    return np.concatenate([np.arange(x, y) for x, y in zip(a[keep], b[keep])] or [np.zeros(0, np.int64)]) - lo


def _split_over(bounds: np.ndarray, a: np.ndarray, b: np.ndarray, tag: np.ndarray):
    """Intervals ``[a, b)`` (with a ``tag`` each) cut at ``bounds``: ``(owner slot, tag, length)`` per piece."""
    keep = b > a
    a, b, tag = a[keep], b[keep], tag[keep]
    first = np.searchsorted(bounds, a, side="right") - 1
    n = np.searchsorted(bounds, b - 1, side="right") - first   # slots each interval touches
    which = np.repeat(np.arange(len(a)), n)
    owner = first[which] + np.arange(len(which)) - np.repeat(np.cumsum(n) - n, n)
    length = np.minimum(b[which], bounds[owner + 1]) - np.maximum(a[which], bounds[owner])
    return owner, tag[which], length


@dataclass(frozen=True)
class Traffic:
    """Rows moved from owner slots to computing slots (``q`` query rows, ``kv`` key rows), one entry
    per pair that moves any; the diagonal (rows a slot keeps) is included."""

    owner: np.ndarray
    comp: np.ndarray
    q: np.ndarray
    kv: np.ndarray
    slots: int
    gpus_per_node: int

    def phase(self, direction: str, what: str, rows_bytes: np.ndarray, to_workers: bool) -> Phase:
        """An all-to-all moving ``rows_bytes`` per pair, owners to workers or back. ``amount``: bytes a
        slot sends; ``intra``/``inter``: the larger of its sent and received bytes inside its node
        and across nodes (what an all-to-all waits for on each kind of link)."""
        src, dst = (self.owner, self.comp) if to_workers else (self.comp, self.owner)
        moved = np.where(src != dst, rows_bytes, 0)
        local = (src // self.gpus_per_node) == (dst // self.gpus_per_node)
        p = self.slots

        def per_slot(who, mask):
            return np.bincount(who, np.where(mask, moved, 0), minlength=p)
        sent = per_slot(src, np.ones_like(local))
        intra = np.maximum(per_slot(src, local), per_slot(dst, local))
        inter = np.maximum(per_slot(src, ~local), per_slot(dst, ~local))
        return Phase(direction, "all_to_all", what, p, np.arange(p), sent.astype(np.int64),
                     np.zeros(p, dtype=np.int64), overlaps="layers", intra=intra, inter=inter)

    def matrices(self) -> tuple[np.ndarray, np.ndarray]:
        """Dense ``[owner, computing slot]`` matrices of Q rows and K/V rows (small pools: tests, tables)."""
        q, kv = (np.zeros((self.slots, self.slots), dtype=np.int64) for _ in range(2))
        np.add.at(q, (self.owner, self.comp), self.q)
        np.add.at(kv, (self.owner, self.comp), self.kv)
        return q, kv


@dataclass(frozen=True)
class Route:
    """Rows of one kind (Q, or K/V) between one slot and every slot."""

    send: tuple[np.ndarray, ...]    # per slot: my local rows that slot needs
    recv: tuple[int, ...]           # per slot: rows I receive from it (in slot order)

    @property
    def back(self) -> np.ndarray:
        """The sent rows in slot order: where results for them come back."""
        return np.concatenate(self.send).astype(np.int64)

    def sent(self) -> tuple[int, ...]:
        return tuple(len(r) for r in self.send)


@dataclass(frozen=True)
class WorkerCall:
    """One varlen call of a slot's tasks: segments whose query rows do not overlap."""

    varlen: Varlen
    q_index: np.ndarray | None          # per segment query row -> row of my Q buffer (None: all rows, in order)
    kv_index: np.ndarray                # per segment key row -> row of my received K/V buffer


@dataclass(frozen=True)
class TaskRoutes:
    """One slot's part of the task table: the routes of the all-to-alls and the kernel calls (one,
    unless slices of a group share query rows: their partial results merge on the slot)."""

    q: Route
    kv: Route
    calls: tuple[WorkerCall, ...]


@dataclass(frozen=True)
class Pool:
    """The CP groups of a pool, as one token space (see module docstring): every group's documents
    in slot order, the slots' token ranges and the pool-group rank of each slot."""

    docs: tuple[int, ...]
    bounds: np.ndarray
    slot_ranks: tuple[int, ...]


@dataclass(frozen=True, eq=False, kw_only=True)
class TaskSchedule(Schedule):
    segments: Segments = field(repr=False)
    bounds: np.ndarray = field(repr=False)          # token ranges of the pool's slots
    slot_ranks: tuple[int, ...]                     # pool-group rank of each slot
    gpus_per_node: int = 8                          # slots ``i`` and ``j`` share a node if ``i // g == j // g``

    @property
    def pool_size(self) -> int:
        return len(self.bounds) - 1

    @property
    def stat_ranks(self) -> int:
        return self.pool_size

    def rank_tokens(self) -> list[int]:
        return [int(x) for x in np.diff(self.bounds)]

    def compute_slices(self, rank: int) -> list[MaskSlice]:
        s = self.segments
        mine = s.rank == rank
        return [MaskSlice(int(a), int(b), int(c), int(d), bound_or_none(e), bound_or_none(f))
                for a, b, c, d, e, f in zip(s.q0[mine], s.q1[mine], s.k0[mine], s.k1[mine], s.lo[mine], s.hi[mine])]

    def visible_pairs(self, rank: int) -> int:
        return int(self.segments.area[self.segments.rank == rank].sum())

    def traffic(self) -> "Traffic":
        """Rows moved between every (owner slot, computing slot) pair that moves any (sparse)."""
        return self._traffic

    @cached_property
    def _traffic(self) -> "Traffic":   # phases() and buffer_bytes() both read it
        s, bounds, p = self.segments, self.bounds, self.pool_size
        # Q and K/V: the union of each computing slot's query (key) ranges, split over the slots
        # owning them; offsetting slot c by c * (T + 1) keeps the slots' intervals apart, so one
        # merge does every slot at once
        span = int(bounds[-1]) + 1
        u0, u1 = _merge_intervals(s.q0 + s.rank * span, s.q1 + s.rank * span)
        comp = u0 // span
        q_owner, q_comp, q_rows = _split_over(bounds, u0 - comp * span, u1 - comp * span, comp)
        u0, u1 = _merge_intervals(s.k0 + s.rank * span, s.k1 + s.rank * span)
        comp = u0 // span
        kv_owner, kv_comp, kv_rows = _split_over(bounds, u0 - comp * span, u1 - comp * span, comp)
        keys, inverse = np.unique(np.concatenate([q_owner * p + q_comp, kv_owner * p + kv_comp]), return_inverse=True)
        q = np.bincount(inverse[:len(q_rows)], q_rows, minlength=len(keys)).astype(np.int64)
        kv = np.bincount(inverse[len(q_rows):], kv_rows, minlength=len(keys)).astype(np.int64)
        return Traffic(keys // p, keys % p, q, kv, p, self.gpus_per_node)

    def phases(self, shape: AttnShape) -> list[Phase]:
        """Forward: Q and K/V to the workers, attention, out back (lse stays with the worker); backward: dout to the
        workers (they kept Q, K/V, out and lse), attention, dQ and fp32 dK/dV back. Each all-to-all
        is issued ahead of the other nano-batch's computation under
        :func:`distattn.pingpong.ping_pong` (``overlaps="layers"``); a plain ``attention`` call waits
        for each. Every transfer's bytes are split into what stays inside a node and what crosses."""
        p, tr = self.pool_size, self.traffic()
        q_b = shape.row_bytes(shape.num_heads)
        dkv_b = 2 * shape.row_bytes(shape.num_kv_heads, acc=True)
        area = np.bincount(self.segments.rank, self.segments.area, minlength=p).astype(np.int64)
        flops = shape.flops(area)
        return [
            tr.phase("forward", "Q, K/V to workers", tr.q * q_b + tr.kv * shape.kv_row, to_workers=True),
            Phase.per_rank("forward", "attention", "attention", p, flops),
            tr.phase("forward", "out to owners", tr.q * q_b, to_workers=False),
            tr.phase("backward", "dout to workers", tr.q * q_b, to_workers=True),
            Phase.per_rank("backward", "attention", "attention", p, flops * 2.5),
            tr.phase("backward", "dQ, dK/dV to owners", tr.q * q_b + tr.kv * dkv_b, to_workers=False),
        ]

    def buffer_bytes(self, shape: AttnShape) -> np.ndarray:
        """What a worker keeps from forward to backward: its tasks' Q, out, lse, K and V, and the
        dout that arrives in backward."""
        tr = self.traffic()
        q_rows = np.bincount(tr.comp, tr.q, minlength=self.pool_size)
        kv_rows = np.bincount(tr.comp, tr.kv, minlength=self.pool_size)
        lse_b = shape.num_heads * shape.acc_bytes
        return q_rows * (3 * shape.row_bytes(shape.num_heads) + lse_b) + kv_rows * shape.kv_row

    def routes(self, slot: int) -> TaskRoutes:
        """What ``slot`` sends where and receives from whom, and its kernel calls."""
        seg, bounds = self.segments, self.bounds
        lo, hi = bounds[slot], bounds[slot + 1]
        q_send, kv_send = [], []
        for c in range(self.pool_size):
            mine = seg.rank == c
            q_send.append(_rows(*_merge_intervals(seg.q0[mine], seg.q1[mine]), lo, hi))
            kv_send.append(_rows(*_merge_intervals(seg.k0[mine], seg.k1[mine]), lo, hi))
        mine = np.nonzero(seg.rank == slot)[0]
        mine = mine[np.lexsort((seg.k0[mine], seg.q0[mine]))]
        q0, q1, k0, k1, b_lo, b_hi = (x[mine] for x in (seg.q0, seg.q1, seg.k0, seg.k1, seg.lo, seg.hi))
        qu0, qu1 = _merge_intervals(q0, q1)
        ku0, ku1 = _merge_intervals(k0, k1)
        q_start, k_start = _covered_before(qu0, qu1, q0), _covered_before(ku0, ku1, k0)
        shift = k0 - q0  # the bands, relative to each segment's first query and key
        b_lo, b_hi = shift_band(b_lo, b_hi, shift)
        layer = layers(q0, q1, np.zeros_like(q0), np.zeros_like(q0)) if mine.size else np.zeros(0, np.int64)
        calls = []
        for n in range(int(layer.max(initial=0)) + 1):
            at = layer == n
            q_index = _index(q_start[at], (q1 - q0)[at])
            whole = n == 0 and layer.max(initial=0) == 0 and np.array_equal(q_index, np.arange(len(q_index)))
            # a slot with no task (fewer tokens than ranks) still runs one empty kernel call: no special path
            varlen = Varlen.from_lengths((q1 - q0)[at], (k1 - k0)[at], b_lo[at], b_hi[at]) if at.any() \
                else Varlen.from_lengths([0], [0])
            calls.append(WorkerCall(varlen, None if whole else q_index, _index(k_start[at], (k1 - k0)[at])))
        return TaskRoutes(Route(tuple(q_send), tuple(int(x) for x in np.diff(_covered_before(qu0, qu1, bounds)))),
                          Route(tuple(kv_send), tuple(int(x) for x in np.diff(_covered_before(ku0, ku1, bounds)))),
                          tuple(calls))


def _index(starts: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """Rows ``starts[i] .. starts[i] + lens[i] - 1``, concatenated."""
    return np.concatenate([np.arange(s, s + n) for s, n in zip(starts, lens)] or [np.zeros(0, np.int64)]).astype(
        np.int64)


def build(doc_lens, mesh, *, causal, window, mask: SliceMask, pool: Pool | None = None, epsilon: float = 0.04,
          cost=None, network=None, overlap_s: float | None = None) -> TaskSchedule:
    """``pool``: the pool's layout (:func:`distattn.executors.task_a2a.gather_pool` makes it from
    a process group when ``distattn.plan`` is given ``pool=group``). ``cost``: the attention cost
    model (:mod:`distattn.cost`, default :class:`~distattn.cost.Roofline`; a roofline's head shape
    also sizes the rows moves send); ``network``: the
    :class:`~distattn.cluster.profile.NetworkProfile` moves are priced on (default: NVLink in a node
    of 8, InfiniBand between nodes). ``overlap_s``: seconds per layer (forward + backward) each rank
    computes besides attention -- what :func:`distattn.pingpong.ping_pong` hides transfers behind;
    given, a move is made only if it saves more attention time than the communication it adds
    beyond what that and the rank's attention hide. None (default): moves balance FLOPs within
    the byte caps, whatever their communication costs."""
    if not isinstance(epsilon, (int, float)) or not 0 <= epsilon < 1:
        raise ValueError(f"epsilon must be in [0, 1) (allowed load above/below the mean), got {epsilon!r}")
    if network is not None and not isinstance(network, NetworkProfile):
        raise ValueError(f"network must be a distattn.cluster.profile.NetworkProfile, got {type(network).__name__}")
    if overlap_s is not None and (isinstance(overlap_s, bool) or not isinstance(overlap_s, (int, float))
                                  or not overlap_s >= 0):
        raise ValueError(f"overlap_s must be None or seconds >= 0 (computation per layer that hides transfers), "
                         f"got {overlap_s!r}")
    if pool is None:
        pool = Pool(tuple(doc_lens), even_bounds(sum(doc_lens), mesh.world_size), tuple(range(mesh.world_size)))
    else:  # the pool's token space: every CP group's documents (distattn.plan refuses mask= with pool=)
        mask = SliceMask.documents(pool.docs, causal, window)
    cost = cost or Roofline()
    links = LinkCost.of(network, len(pool.bounds) - 1)
    rows = RowBytes.of(cost.num_heads, cost.num_kv_heads, cost.head_dim, cost.dtype_bytes) \
        if isinstance(cost, Roofline) else RowBytes.of()
    segments = place_tasks(mask, pool.bounds, cost, epsilon, links=links, rows=rows,
                           overlap_s=overlap_s)
    own = even_bounds(sum(doc_lens), mesh.world_size)
    return TaskSchedule(scheduler="cad", doc_lens=doc_lens, causal=causal, window=window,
                        world_size=mesh.world_size, mask=mask,
                        owned=tuple(((int(a), int(b)),) for a, b in zip(own, own[1:])),
                        segments=segments, bounds=pool.bounds, slot_ranks=pool.slot_ranks,
                        gpus_per_node=links.gpus_per_node)
