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
3. *Greedy migration.* While some rank is more than ``epsilon`` from the mean
   load: take the most and the least loaded ranks; among the former's tasks
   pick the one with the fewest bytes moved per unit of work gained (query
   tokens, plus key tokens the receiver does not own) and move it; if it would
   overshoot, split a pair into its halves, or cut a single task's queries so
   that the head moves (the head needs the shorter key prefix).

Execution, forward: one all-to-all sends every task's Q rows to the rank that
computes it and, per destination, the union of the key rows its tasks need
(each K/V row once per destination, however many tasks use it); the
destination runs all its tasks in one varlen kernel call; out and lse return
by all-to-all. Backward keeps no state on the computing rank: Q, K, V, out,
dout and lse are sent again, dq/dk/dv computed there and returned, and dK/dV
of keys that went to several ranks are summed (fp32) by their owner.

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

import numpy as np

from ..cost import Roofline
from ..kernels import Varlen
from ..masks import MaskSlice
from ..schedule import AttnShape, Phase, Schedule
from .blocks import even_bounds
from .cad_planner import Segments, place_tasks


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
class TaskRoutes:
    """One slot's part of the task table: the routes of the all-to-alls and the kernel layout."""

    q: Route
    kv: Route
    varlen: Varlen                      # my tasks: queries as received, keys as gathered by kv_index
    kv_index: np.ndarray                # per segment key row -> row of my received K/V buffer


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
        return [MaskSlice(int(a), int(b), int(c), int(d), self.causal, self.window)
                for a, b, c, d in zip(s.q0[mine], s.q1[mine], s.k0[mine], s.k1[mine])]

    def visible_pairs(self, rank: int) -> int:
        return int(self.segments.area[self.segments.rank == rank].sum())

    def traffic(self) -> tuple[np.ndarray, np.ndarray]:
        """``[owner slot, computing slot]`` matrices of Q rows and K/V rows moved (diagonal: kept)."""
        p, s = self.pool_size, self.segments
        q_rows = np.zeros((p, p), dtype=np.int64)
        kv_rows = np.zeros((p, p), dtype=np.int64)
        for c in range(p):
            mine = s.rank == c
            order = np.argsort(s.q0[mine], kind="stable")
            q_rows[:, c] = np.diff(_covered_before(s.q0[mine][order], s.q1[mine][order], self.bounds))
            u0, u1 = _merge_intervals(s.k0[mine], s.k1[mine])
            kv_rows[:, c] = np.diff(_covered_before(u0, u1, self.bounds))
        return q_rows, kv_rows

    def phases(self, shape: AttnShape) -> list[Phase]:
        """Forward: Q and K/V to the workers, attention, out and lse back; backward: Q, out, dout, lse
        and K/V out again, attention, dQ and fp32 dK/dV back. Every all-to-all runs under the other
        nano-batch's layer (``overlaps="layers"``), DistCA's ping-pong. The executor does so for the
        forward dispatch (``prefetch``, :func:`distattn.pingpong.ping_pong`); the other transfers it
        still waits for (issue 18)."""
        p = self.pool_size
        q_rows, kv_rows = self.traffic()
        np.fill_diagonal(q_rows, 0)
        np.fill_diagonal(kv_rows, 0)
        q_out, kv_out, q_back = q_rows.sum(1), kv_rows.sum(1), q_rows.sum(0)
        q_b, lse_b = shape.row_bytes(shape.num_heads), shape.num_heads * shape.acc_bytes
        dkv_b = 2 * shape.row_bytes(shape.num_kv_heads, acc=True)
        area = np.bincount(self.segments.rank, self.segments.area, minlength=p).astype(np.int64)
        flops = shape.flops(area)

        def a2a(direction, what, amount):
            return Phase.per_rank(direction, "all_to_all", what, p, amount, overlaps="layers")

        return [
            a2a("forward", "Q, K/V to workers", q_out * q_b + kv_out * shape.kv_row),
            Phase.per_rank("forward", "attention", "attention", p, flops),
            a2a("forward", "out, lse to owners", q_back * (q_b + lse_b)),
            a2a("backward", "Q, out, dout, lse, K/V to workers", q_out * (3 * q_b + lse_b) + kv_out * shape.kv_row),
            Phase.per_rank("backward", "attention", "attention", p, flops * 2.5),
            a2a("backward", "dQ, dK/dV to owners", q_back * q_b + kv_rows.sum(0) * dkv_b),
        ]

    def buffer_bytes(self, shape: AttnShape) -> np.ndarray:
        """What a worker receives: its tasks' Q (and out), K and V."""
        q_rows, kv_rows = self.traffic()
        q_b = shape.row_bytes(shape.num_heads)
        return q_rows.sum(0) * 2 * q_b + kv_rows.sum(0) * shape.kv_row

    def routes(self, slot: int) -> TaskRoutes:
        """What ``slot`` sends where and receives from whom, and its kernel layout."""
        seg, bounds = self.segments, self.bounds
        lo, hi = bounds[slot], bounds[slot + 1]
        q_send, kv_send = [], []
        for c in range(self.pool_size):
            mine = seg.rank == c
            order = np.argsort(seg.q0[mine], kind="stable")
            q_send.append(_rows(seg.q0[mine][order], seg.q1[mine][order], lo, hi))
            u0, u1 = _merge_intervals(seg.k0[mine], seg.k1[mine])
            kv_send.append(_rows(u0, u1, lo, hi))
        mine = np.nonzero(seg.rank == slot)[0]
        mine = mine[np.argsort(seg.q0[mine], kind="stable")]
        q0, q1, k0, k1 = seg.q0[mine], seg.q1[mine], seg.k0[mine], seg.k1[mine]
        u0, u1 = _merge_intervals(k0, k1)
        start = _covered_before(u0, u1, k0)
        kv_index = np.concatenate([np.arange(s, s + n) for s, n in zip(start, k1 - k0)] or [np.zeros(0, np.int64)])
        # a slot with no task (fewer tokens than ranks) still runs one empty kernel call: no special path
        varlen = Varlen.from_lengths(q1 - q0, k1 - k0, q1 - k1) if mine.size else Varlen.from_lengths([0], [0])
        return TaskRoutes(Route(tuple(q_send), tuple(int(x) for x in np.diff(_covered_before(q0, q1, bounds)))),
                          Route(tuple(kv_send), tuple(int(x) for x in np.diff(_covered_before(u0, u1, bounds)))),
                          varlen, kv_index.astype(np.int64))


def build(doc_lens, mesh, *, causal, window, pool: Pool | None = None, epsilon: float = 0.1,
          cost=None) -> TaskSchedule:
    """``pool``: the pool's layout (:func:`distattn.executors.task_a2a.gather_pool` makes it from
    a process group when ``distattn.plan`` is given ``pool=group``)."""
    if not isinstance(epsilon, (int, float)) or not 0 <= epsilon < 1:
        raise ValueError(f"epsilon must be in [0, 1) (allowed load above/below the mean), got {epsilon!r}")
    if pool is None:
        pool = Pool(tuple(doc_lens), even_bounds(sum(doc_lens), mesh.world_size), tuple(range(mesh.world_size)))
    segments = place_tasks(list(pool.docs), pool.bounds, causal, window, cost or Roofline(), epsilon)
    own = even_bounds(sum(doc_lens), mesh.world_size)
    return TaskSchedule(scheduler="cad", doc_lens=doc_lens, causal=causal, window=window,
                        world_size=mesh.world_size, owned=tuple(((int(a), int(b)),) for a, b in zip(own, own[1:])),
                        segments=segments, bounds=pool.bounds, slot_ranks=pool.slot_ranks)
