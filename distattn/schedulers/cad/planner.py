"""CAD planning: the task table and its FLOPs-balanced placement (pure numpy, no processes).

Token space: the packed sequences of every CP group of the pool, concatenated
(group after group); slot ``i`` holds the runs of tokens the pool's
:class:`~distattn.planning.layout.Shards` give it (one run for the contiguous layout). The mask's slices
(:class:`~distattn.planning.masks.SliceMask`) form *groups* that share no query row
(:class:`RowGroups`: a document is one; a shared question's answers and the question's
keys they see are another), so every query row's attention is computed on one rank.
A *task* is a query range of one group with the keys its slices let it see, computed on one
rank. :class:`TaskTable` holds them and the edits placement
(:mod:`distattn.schedulers.cad.placement`) makes to them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...planning.layout import Shards
from ...planning.masks import SliceMask
from ..blocks import rect_area


@dataclass(frozen=True)
class Segments:
    """The plan's segments (global token indices) and where each is computed."""

    q0: np.ndarray
    q1: np.ndarray
    k0: np.ndarray
    k1: np.ndarray
    rank: np.ndarray   # computing slot
    area: np.ndarray
    lo: np.ndarray     # the slice's band, global (lo <= k - q <= hi)
    hi: np.ndarray


def _ranges(first: np.ndarray, count: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(which, value)``: for each ``i``, ``first[i] .. first[i] + count[i] - 1`` tagged ``i``."""
    which = np.repeat(np.arange(len(first)), count)
    return which, first[which] + np.arange(len(which)) - np.repeat(np.cumsum(count) - count, count)


class RowGroups:
    """The mask's slices in groups sharing no query row: CAD's unit of work (module docstring).
    Arrays per group: query range ``q0, q1``, key hull ``k0, k1``, its slices ``first .. first +
    count - 1`` (the mask is sorted by query start, so a group's slices are consecutive)."""

    def __init__(self, mask: SliceMask):
        self.slices = mask.arrays
        q0, q1, k0, k1, lo, hi = mask.arrays
        reach = np.maximum.accumulate(q1)
        self.first = np.nonzero(np.concatenate([[True], q0[1:] >= reach[:-1]]))[0]
        self.count = np.diff(np.append(self.first, len(q0)))
        self.q0, self.q1 = q0[self.first], np.maximum.reduceat(q1, self.first)
        self.k0, self.k1 = np.minimum.reduceat(k0, self.first), np.maximum.reduceat(k1, self.first)
        f = self.first
        self.square_causal = (self.count == 1) & (q0[f] == k0[f]) & (q1[f] == k1[f]) & (hi[f] == 0)
        self.plain_causal = self.square_causal & (lo[f] <= q0[f] - q1[f] + 1)   # ... and no window

    def pieces(self, g, a, b):
        """The kernel segments of query ranges ``[a[i], b[i])`` of groups ``g[i]``: one per slice
        with visible pairs, ``(i, q0, q1, k0, k1, lo, hi, area)`` (global positions and bands)."""
        g, a, b = (np.asarray(x, dtype=np.int64) for x in (g, a, b))
        which, m = _ranges(self.first[g], self.count[g])
        sq0, sq1, sk0, sk1, lo, hi = (x[m] for x in self.slices)
        qs, qe = np.maximum(a[which], sq0), np.minimum(b[which], sq1)
        ks, ke = key_span(qs, qe, sk0, sk1, lo, hi)
        area = rect_area(qs, qe, ks, ke, lo, hi)
        keep = area > 0
        return tuple(x[keep] for x in (which, qs, qe, ks, ke, lo, hi, area))

    def spans(self, g, a, b) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(k0, k1, area)`` per query range: the hull of the keys it sees and its visible pairs."""
        g, a, b = (np.atleast_1d(np.asarray(x, dtype=np.int64)) for x in (g, a, b))
        if self.plain_causal[g].all():   # causal documents without windows, in closed form (the common case)
            start, end = self.q0[g], self.q1[g]
            a, b = np.clip(a, start, end), np.clip(b, start, end)
            area = (b - start) * (b - start + 1) // 2 - (a - start) * (a - start + 1) // 2
            return start, np.where(b > a, b, start), area
        which, _, _, ks, ke, _, _, area = self.pieces(g, a, b)
        n = len(a)
        k0 = np.full(n, np.iinfo(np.int64).max)
        k1 = np.full(n, np.iinfo(np.int64).min)
        np.minimum.at(k0, which, ks)
        np.maximum.at(k1, which, ke)
        empty = k1 < k0
        start = self.k0[g]
        return np.where(empty, start, k0), np.where(empty, start, k1), np.bincount(which, area, minlength=n).astype(
            np.int64)


def key_span(q0, q1, k0, k1, lo, hi):
    """Keys of a slice (keys ``[k0, k1)``, band ``lo <= k - q <= hi``) that queries ``[q0, q1)`` see."""
    return np.maximum(k0, q0 + lo), np.maximum(np.minimum(k1, q1 + hi), np.maximum(k0, q0 + lo))


def _initial_tasks(groups: RowGroups, slots: Shards, chunk: int):
    """``(q0, q1, group, home)`` per task: each group's queries cut at the runs of tokens the slots
    hold, and a long causal document first into chunks of at most ``chunk`` queries; a task's home
    is the slot holding its queries. (Chunks of one document are not paired head with tail: a
    chunk from the end carries the most work per query row, so it is the cheapest to move.)"""
    n = groups.q1 - groups.q0
    pieces = np.where(groups.square_causal, -(-n // chunk), 1)
    g, i = _ranges(np.zeros(len(n), dtype=np.int64), pieces)
    start, size, count = groups.q0[g], n[g], pieces[g]
    which, run, q0, q1 = slots.cut(start + i * size // count, start + (i + 1) * size // count)
    return q0.astype(np.int64), q1.astype(np.int64), g[which], slots.owner[run].astype(np.int64)


class TaskTable:
    """The tasks of a plan, edited in place by the greedy migration.

    Columns per task: ``q0, q1`` (its queries), ``doc`` (its group), ``area`` (visible pairs), and
    ``t_rank, t_time, t_q`` (query tokens, float), ``t_k0, t_k1`` (key hull). Cuts add tasks, so
    columns hold spare capacity that doubles when full; only the first ``n_task`` rows are live.
    """

    _COLUMNS = ("q0", "q1", "doc", "area", "t_rank", "t_time", "t_q", "t_k0", "t_k1")

    def __init__(self, mask: SliceMask, slots: Shards, chunk: int, cost):
        self.cost = cost
        self.groups = g = RowGroups(mask)
        # each group's tokens (queries and keys): the ranks owning them are natural destinations
        self.ds, self.de = np.minimum(g.q0, g.k0), np.maximum(g.q1, g.k1)
        self.q0, self.q1, self.doc, self.t_rank = _initial_tasks(g, slots, chunk)
        self.t_k0, self.t_k1, self.area = g.spans(self.doc, self.q0, self.q1)
        self.t_q = (self.q1 - self.q0).astype(np.float64)
        self.t_time = cost.task_time(self.t_q, self.t_k1 - self.t_k0, self.area)
        self.n_task = len(self.q0)
        self._on: dict[int, set[int]] = {}   # rank -> its tasks (the planner asks every round)
        for t, r in enumerate(self.t_rank.tolist()):
            self._on.setdefault(r, set()).add(t)

    def _add(self, values) -> int:
        row = self.n_task
        if row == len(self.q0):
            for name in self._COLUMNS:
                a = getattr(self, name)
                grown = np.empty(max(16, 2 * len(a)), dtype=a.dtype)
                grown[:len(a)] = a
                setattr(self, name, grown)
        for name, v in zip(self._COLUMNS, values):
            getattr(self, name)[row] = v
        self.n_task = row + 1
        self._on.setdefault(int(self.t_rank[row]), set()).add(row)
        return row

    def load(self, p: int) -> np.ndarray:
        n = self.n_task
        return np.bincount(self.t_rank[:n], self.t_time[:n], minlength=p)

    def tasks_on(self, rank: int) -> np.ndarray:
        return np.asarray(sorted(self._on.get(rank, ())), dtype=np.int64)

    def move(self, t: int, rank: int) -> None:
        self._on[int(self.t_rank[t])].discard(t)
        self._on.setdefault(rank, set()).add(t)
        self.t_rank[t] = rank

    def split_point(self, t: int, want: float) -> int | None:
        return _split_point(self.q0[t], self.q1[t], self.groups, self.doc[t], self.cost, want)

    @property
    def min_rows(self) -> int:
        """The fewest query rows a cut is worth where balance does not need fewer: the cost model's
        ``min_task_rows`` (a tile model's: as many rows as its backward's fixed cost in loop
        iterations), 1 for a model without one."""
        return max(1, int(getattr(self.cost, "min_task_rows", 1)))

    def cuts(self, t: int, points: int = 129) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(x, head, tail)``: up to ``points`` places to cut task ``t`` and the times of its head
        ``[q0, x)`` and tail ``[x, q1)`` there (the tail keeps the task's key span: its fixed cost)."""
        q0, q1, d = int(self.q0[t]), int(self.q1[t]), int(self.doc[t])
        xs = np.unique(np.linspace(q0 + 1, q1 - 1, max(0, min(q1 - q0 - 1, points))).astype(np.int64))
        n = len(xs)
        k0, k1, area = self.groups.spans(np.full(2 * n, d), np.concatenate([np.full(n, q0), xs]),
                                         np.concatenate([xs, np.full(n, q1)]))
        times = self.cost.task_time(np.concatenate([xs - q0, q1 - xs]), k1 - k0, area)
        return xs, times[:n], times[n:]

    def piece_time(self, t: int, x: int) -> float:
        """The time of the head ``[q0, x)`` of task ``t``."""
        return self._piece(int(self.q0[t]), x, int(self.doc[t]))[3]

    def _piece(self, a, b, d):
        (k0,), (k1,), (area,) = self.groups.spans([d], [a], [b])
        return k0, k1, int(area), float(self.cost.task_time([b - a], [k1 - k0], [area])[0])

    def cut(self, t: int, x: int, rank: int) -> tuple[float, float]:
        """Queries ``[q0, x)`` of task ``t`` become a new task on ``rank``; ``t`` keeps ``[x, q1)``.
        Returns the change of ``t``'s time and the new task's time."""
        q0, q1, d = self.q0[t], self.q1[t], self.doc[t]
        hk0, hk1, h_area, h_time = self._piece(q0, x, d)
        tk0, tk1, t_area, tail_time = self._piece(x, q1, d)
        delta = tail_time - self.t_time[t]
        self.q0[t], self.area[t] = x, t_area
        self.t_time[t], self.t_q[t], self.t_k0[t], self.t_k1[t] = tail_time, q1 - x, tk0, tk1
        self._add((q0, x, d, h_area, rank, h_time, x - q0, hk0, hk1))
        return delta, h_time

    def segments(self) -> Segments:
        """The kernel segments: every task cut into its group's slices, tasks of one group that meet on
        one rank merged first (one segment's keys serve both: the backward runs their key blocks once)."""
        n = self.n_task
        rank, doc, q0, q1 = self.t_rank[:n], self.doc[:n], self.q0[:n], self.q1[:n]
        order = np.lexsort((q0, doc, rank))
        rank, doc, q0, q1 = rank[order], doc[order], q0[order], q1[order]
        joins = np.concatenate([[False], (rank[1:] == rank[:-1]) & (doc[1:] == doc[:-1]) & (q0[1:] == q1[:-1])])
        first = np.nonzero(~joins)[0]
        last = np.append(first[1:], n) - 1
        rank, doc, q0, q1 = rank[first], doc[first], q0[first], q1[last]
        which, q0, q1, k0, k1, lo, hi, area = self.groups.pieces(doc, q0, q1)
        return Segments(q0, q1, k0, k1, rank[which], area, lo, hi)


def _split_point(q0, q1, groups: RowGroups, d: int, cost, want):
    """Query position x such that the head ``[q0, x)`` of a segment of group ``d`` costs about
    ``want``; None if too small. The head's cost grows with x: one grid of up to 1025 points,
    then linear between the two around ``want`` (the cost is smooth in x; one pass, not several:
    placement splits thousands of tasks)."""
    lo, hi = int(q0) + 1, int(q1) - 1
    if hi < lo:
        return None
    xs = (np.arange(lo, hi + 1, dtype=np.int64) if hi - lo < 1025 else
          np.linspace(lo, hi, 1025).astype(np.int64))          # distinct: spacing above 1
    hk0, hk1, area = groups.spans(np.full_like(xs, d), np.full_like(xs, q0), xs)
    times = cost.task_time(xs - q0, hk1 - hk0, area)
    i = int(np.searchsorted(times, want))
    if i == 0:      # even one query costs more than want
        return None
    if i == len(xs):
        return int(xs[-1])
    step = (want - times[i - 1]) / max(times[i] - times[i - 1], 1e-300)
    return int(min(xs[i - 1] + np.ceil(step * (xs[i] - xs[i - 1])), xs[i]))
