"""CAD planning: the task table and its FLOPs-balanced placement (pure numpy, no processes).

Token space: the packed sequences of every CP group of the pool, concatenated
(group after group); slot ``i`` holds the runs of tokens the pool's
:class:`~distattn.layout.Shards` give it (one run for the contiguous layout). The mask's slices
(:class:`~distattn.masks.SliceMask`) form *groups* that share no query row
(:class:`RowGroups`: a document is one; a shared question's answers and the question's
keys they see are another), so every query row's attention is computed on one rank.
A *segment* is a query range of one group with the keys its slices let it see; a
*task* is one segment, or a head/tail pair of segments of a long causal document;
every segment of a task is computed on the same rank. :class:`TaskTable` holds both
and the edits placement (:mod:`distattn.schedulers.cad_placement`) makes to them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..layout import Shards
from ..masks import SliceMask
from .blocks import rect_area


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


def _initial_tasks(groups: RowGroups, slots: Shards, chunk):
    """Segments per group: one per run of tokens holding its queries (home: the run's slot), or
    head/tail pairs of ``chunk``-sized pieces for long causal documents (chunk i with its mirror: equal causal work per pair). Tasks
    are numbered in group order, a pair's head segment listed just before its tail."""
    ds_all, de_all = groups.q0, groups.q1
    n = de_all - ds_all
    long = groups.square_causal & (n > 2 * chunk)
    # short documents: one task per run they touch
    short = np.nonzero(~long)[0]
    which, run, s0, s1 = slots.cut(ds_all[short], de_all[short])
    d_s = short[which]
    # long causal documents: pair j holds chunks j and 2k-1-j of 2k
    lng = np.nonzero(long)[0]
    k = -(-n[lng] // (2 * chunk))
    which, j = _ranges(np.zeros(len(lng), dtype=np.int64), k)
    d_l, kk, nn, base = lng[which], 2 * k[which], n[lng][which], ds_all[lng][which]
    h0, h1 = base + (j * nn) // kk, base + ((j + 1) * nn) // kk
    t0, t1 = base + ((kk - 1 - j) * nn) // kk, base + ((kk - j) * nn) // kk
    # tasks in document order (within a document: by run, or by pair)
    t_doc = np.concatenate([d_s, d_l])
    order = np.lexsort((np.concatenate([run, j]), t_doc))
    pair = np.concatenate([np.zeros(len(d_s), dtype=bool), np.ones(len(d_l), dtype=bool)])[order]
    head0, head1 = np.concatenate([s0, h0])[order], np.concatenate([s1, h1])[order]
    tail0, tail1 = np.concatenate([s0, t0])[order], np.concatenate([s1, t1])[order]
    count = 1 + pair
    task = np.repeat(np.arange(len(order)), count)
    second = np.arange(len(task)) - np.repeat(np.cumsum(count) - count, count) == 1
    q0 = np.where(second, tail0[task], head0[task]).astype(np.int64)
    q1 = np.where(second, tail1[task], head1[task]).astype(np.int64)
    home = slots.owner_of(head0).astype(np.int64)
    doc = t_doc[order][task]
    return q0, q1, doc, task, home


class TaskTable:
    """The segments and tasks of a plan, edited in place by the greedy migration.

    Segment columns: ``q0, q1, k0, k1`` (key hull), ``doc`` (its group), ``area, seg_time, task``; task columns:
    ``t_rank, t_time, t_q`` (query tokens, float), ``t_k0, t_k1`` (key span) and
    ``t_seg`` (its segments: one, or head and tail with the tail ``-1`` once split).
    Migration keeps adding rows (a pair's tail, a cut's head), so columns hold spare
    capacity that doubles when full; only the first ``n_seg``/``n_task`` rows are live.
    """

    _SEG = ("q0", "q1", "k0", "k1", "doc", "area", "seg_time", "task")
    _TASK = ("t_rank", "t_time", "t_q", "t_k0", "t_k1", "t_seg")

    def __init__(self, mask: SliceMask, slots: Shards, chunk: int, cost):
        self.cost = cost
        self.groups = g = RowGroups(mask)
        # each group's tokens (queries and keys): the ranks owning them are natural destinations
        self.ds, self.de = np.minimum(g.q0, g.k0), np.maximum(g.q1, g.k1)
        q0, q1, doc, task, home = _initial_tasks(g, slots, chunk)
        k0, k1, area = g.spans(doc, q0, q1)
        seg_time = cost.task_time(q1 - q0, k1 - k0, area)
        self.q0, self.q1, self.k0, self.k1, self.doc, self.task = q0, q1, k0, k1, doc, task
        self.area, self.seg_time = area, seg_time
        n = self.n_task = len(home)
        self.n_seg = len(q0)
        self.t_rank = home
        self.t_time = np.bincount(task, seg_time, minlength=n)
        self.t_q = np.bincount(task, q1 - q0, minlength=n)
        self.t_k0 = np.full(n, np.iinfo(np.int64).max)
        self.t_k1 = np.zeros(n, dtype=np.int64)
        np.minimum.at(self.t_k0, task, k0)
        np.maximum.at(self.t_k1, task, k1)
        # _initial_tasks lists a task's segments consecutively, head first
        first, count = np.unique(task, return_index=True, return_counts=True)[1:]
        self.t_seg = np.stack([first, np.where(count > 1, first + 1, -1)], axis=1)
        self._on: dict[int, set[int]] = {}   # rank -> its tasks (the planner asks every round)
        for t, r in enumerate(home.tolist()):
            self._on.setdefault(r, set()).add(t)

    def _push(self, names: tuple[str, ...], count: str, values) -> int:
        row = getattr(self, count)
        if row == len(getattr(self, names[0])):
            for name in names:
                a = getattr(self, name)
                grown = np.empty((max(16, 2 * len(a)),) + a.shape[1:], dtype=a.dtype)
                grown[:len(a)] = a
                setattr(self, name, grown)
        for name, v in zip(names, values):
            getattr(self, name)[row] = v
        setattr(self, count, row + 1)
        return row

    def add_segment(self, q0, q1, k0, k1, doc, area, time, task) -> int:
        return self._push(self._SEG, "n_seg", (q0, q1, k0, k1, doc, area, time, task))

    def add_task(self, rank, time, q, k0, k1, seg) -> int:
        """A single-segment task; ``q`` (its query tokens) is stored as a float, like the sums."""
        row = self._push(self._TASK, "n_task", (rank, time, q, k0, k1, (seg, -1)))
        self._on.setdefault(int(rank), set()).add(row)
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

    def is_pair(self, t: int) -> bool:
        return bool(self.t_seg[t, 1] >= 0)

    def split_pair(self, t: int) -> int:
        """The tail of pair ``t`` becomes a new task on the same rank; returns its id."""
        head, tail = self.t_seg[t]
        self.task[tail] = self.n_task
        self.t_time[t] -= self.seg_time[tail]
        self.t_q[t] -= self.q1[tail] - self.q0[tail]
        self.t_k0[t], self.t_k1[t] = self.k0[head], self.k1[head]
        self.t_seg[t, 1] = -1
        return self.add_task(self.t_rank[t], self.seg_time[tail], self.q1[tail] - self.q0[tail],
                             self.k0[tail], self.k1[tail], tail)

    def split_point(self, t: int, want: float) -> int | None:
        s = self.t_seg[t, 0]
        d = self.doc[s]
        return _split_point(self.q0[s], self.q1[s], self.groups, d, self.cost, want)

    def _piece(self, a, b, d):
        (k0,), (k1,), (area,) = self.groups.spans([d], [a], [b])
        return k0, k1, int(area), float(self.cost.task_time([b - a], [k1 - k0], [area])[0])

    def cut(self, t: int, x: int, rank: int) -> tuple[float, float]:
        """Queries ``[q0, x)`` of single-segment task ``t`` become a new task on ``rank``; ``t``
        keeps ``[x, q1)``. Returns the change of ``t``'s time and the new task's time."""
        s = self.t_seg[t, 0]
        q0, q1, d = self.q0[s], self.q1[s], self.doc[s]
        hk0, hk1, h_area, h_time = self._piece(q0, x, d)
        tk0, tk1, t_area, tail_time = self._piece(x, q1, d)
        delta = tail_time - self.seg_time[s]
        self.q0[s], self.k0[s], self.k1[s], self.area[s], self.seg_time[s] = x, tk0, tk1, t_area, tail_time
        self.t_time[t], self.t_q[t], self.t_k0[t], self.t_k1[t] = tail_time, q1 - x, tk0, tk1
        head = self.add_segment(q0, x, hk0, hk1, d, h_area, h_time, self.n_task)
        self.add_task(rank, h_time, x - q0, hk0, hk1, head)
        return delta, h_time

    def segments(self) -> Segments:
        """The kernel segments: every table segment cut into its group's slices."""
        n = self.n_seg
        which, q0, q1, k0, k1, lo, hi, area = self.groups.pieces(self.doc[:n], self.q0[:n], self.q1[:n])
        return Segments(q0, q1, k0, k1, self.t_rank[self.task[:n]][which], area, lo, hi)


def _split_point(q0, q1, groups: RowGroups, d: int, cost, want):
    """Query position x such that the head ``[q0, x)`` of a segment of group ``d`` costs about
    ``want``; None if too small. The head's cost grows with x: narrow the bracket on a coarse grid,
    then finish exactly."""

    def head_times(xs):
        starts = np.full_like(xs, q0)
        hk0, hk1, area = groups.spans(np.full_like(xs, d), starts, xs)
        return cost.task_time(xs - q0, hk1 - hk0, area)

    lo, hi = int(q0) + 1, int(q1) - 1
    while hi - lo > 64:
        xs = np.unique(np.linspace(lo, hi, 513).astype(np.int64))
        i = int(np.searchsorted(head_times(xs), want))
        if i == 0 and xs[0] == q0 + 1:  # even one query costs more than want
            return None
        lo, hi = (int(xs[i - 1]) if i > 0 else lo), (int(xs[i]) if i < len(xs) else hi)
    xs = np.arange(lo, hi + 1, dtype=np.int64)
    if xs.size == 0:
        return None
    i = int(np.searchsorted(head_times(xs), want))
    if i == 0 and xs[0] == q0 + 1:
        return None
    return int(xs[min(i, xs.size - 1)])
