"""CAD planning: the task table and its FLOPs-balanced placement (pure numpy, no processes).

Token space: the packed sequences of every CP group of the pool, concatenated
(group after group); slot ``i`` owns ``[bounds[i], bounds[i+1])``. A *segment*
is a query range of one document with the key range it sees; a *task* is one
segment, or a head/tail pair of segments of a long causal document; every
segment of a task is computed on the same rank. :class:`TaskTable` holds both
and the edits placement (:mod:`distattn.schedulers.cad_placement`) makes to them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..masks import mask_area
from .blocks import doc_bounds


@dataclass(frozen=True)
class Segments:
    """The plan's segments (global token indices) and where each is computed."""

    q0: np.ndarray
    q1: np.ndarray
    k0: np.ndarray
    k1: np.ndarray
    rank: np.ndarray   # computing slot
    area: np.ndarray


def key_span(q0, q1, ds, de, causal: bool, window: int | None):
    """Keys a query range ``[q0, q1)`` of document ``[ds, de)`` can see."""
    k0 = ds if window is None else np.maximum(ds, q0 - window + 1)
    if causal:
        k1 = q1
    else:
        k1 = de if window is None else np.minimum(de, q1 + window - 1)
    return k0, k1


def _ranges(first: np.ndarray, count: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(which, value)``: for each ``i``, ``first[i] .. first[i] + count[i] - 1`` tagged ``i``."""
    which = np.repeat(np.arange(len(first)), count)
    return which, first[which] + np.arange(len(which)) - np.repeat(np.cumsum(count) - count, count)


def _initial_tasks(doc_lens, bounds, causal, window, chunk):
    """Segments per document: one per owning slot, or head/tail pairs of ``chunk``-sized pieces
    for long causal documents (chunk i with its mirror: equal causal work per pair). Tasks are
    numbered in document order, a pair's head segment listed just before its tail."""
    ds_all, de_all = doc_bounds(doc_lens)
    n = de_all - ds_all
    long = (n > 2 * chunk) if causal else np.zeros(len(n), dtype=bool)
    # short documents: one task per slot they touch
    short = np.nonzero(~long)[0]
    first = np.searchsorted(bounds, ds_all[short], side="right") - 1
    last = np.searchsorted(bounds, de_all[short] - 1, side="right") - 1
    which, slot = _ranges(first, last - first + 1)
    d_s = short[which]
    s0, s1 = np.maximum(ds_all[d_s], bounds[slot]), np.minimum(de_all[d_s], bounds[slot + 1])
    keep = s1 > s0
    d_s, s0, s1, slot = d_s[keep], s0[keep], s1[keep], slot[keep]
    # long causal documents: pair j holds chunks j and 2k-1-j of 2k
    lng = np.nonzero(long)[0]
    k = -(-n[lng] // (2 * chunk))
    which, j = _ranges(np.zeros(len(lng), dtype=np.int64), k)
    d_l, kk, nn, base = lng[which], 2 * k[which], n[lng][which], ds_all[lng][which]
    h0, h1 = base + (j * nn) // kk, base + ((j + 1) * nn) // kk
    t0, t1 = base + ((kk - 1 - j) * nn) // kk, base + ((kk - j) * nn) // kk
    # tasks in document order (within a document: by slot, or by pair)
    t_doc = np.concatenate([d_s, d_l])
    order = np.lexsort((np.concatenate([slot, j]), t_doc))
    pair = np.concatenate([np.zeros(len(d_s), dtype=bool), np.ones(len(d_l), dtype=bool)])[order]
    head0, head1 = np.concatenate([s0, h0])[order], np.concatenate([s1, h1])[order]
    tail0, tail1 = np.concatenate([s0, t0])[order], np.concatenate([s1, t1])[order]
    count = 1 + pair
    task = np.repeat(np.arange(len(order)), count)
    second = np.arange(len(task)) - np.repeat(np.cumsum(count) - count, count) == 1
    q0 = np.where(second, tail0[task], head0[task]).astype(np.int64)
    q1 = np.where(second, tail1[task], head1[task]).astype(np.int64)
    home = (np.searchsorted(bounds, head0, side="right") - 1).astype(np.int64)
    doc = np.searchsorted(de_all, q0, side="right")
    k0, k1 = key_span(q0, q1, ds_all[doc], de_all[doc], causal, window)
    return q0, q1, k0, k1, doc, task, home


class TaskTable:
    """The segments and tasks of a plan, edited in place by the greedy migration.

    Segment columns: ``q0, q1, k0, k1, doc, area, seg_time, task``; task columns:
    ``t_rank, t_time, t_q`` (query tokens, float), ``t_k0, t_k1`` (key span) and
    ``t_seg`` (its segments: one, or head and tail with the tail ``-1`` once split).
    Migration keeps adding rows (a pair's tail, a cut's head), so columns hold spare
    capacity that doubles when full; only the first ``n_seg``/``n_task`` rows are live.
    """

    _SEG = ("q0", "q1", "k0", "k1", "doc", "area", "seg_time", "task")
    _TASK = ("t_rank", "t_time", "t_q", "t_k0", "t_k1", "t_seg")

    def __init__(self, doc_lens, bounds: np.ndarray, causal: bool, window: int | None, chunk: int, cost):
        self.causal, self.window, self.cost = causal, window, cost
        self.ds, self.de = doc_bounds(doc_lens)
        q0, q1, k0, k1, doc, task, home = _initial_tasks(doc_lens, bounds, causal, window, chunk)
        area = mask_area(q1 - q0, k1 - k0, causal, window, q1 - k1)
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
        return _split_point(self.q0[s], self.q1[s], self.ds[d], self.de[d], self.causal, self.window, self.cost, want)

    def _piece(self, a, b, d):
        k0, k1 = key_span(a, b, self.ds[d], self.de[d], self.causal, self.window)
        area = int(mask_area(b - a, k1 - k0, self.causal, self.window, b - k1))
        return k0, k1, area, float(self.cost.task_time([b - a], [k1 - k0], [area])[0])

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
        n = self.n_seg
        q0, q1, k0, k1, area = (a[:n].copy() for a in (self.q0, self.q1, self.k0, self.k1, self.area))
        return Segments(q0, q1, k0, k1, self.t_rank[self.task[:n]], area)


def _split_point(q0, q1, ds, de, causal, window, cost, want):
    """Query position x such that the head ``[q0, x)`` costs about ``want``; None if too small.
    The head's cost grows with x: narrow the bracket on a coarse grid, then finish exactly."""

    def head_times(xs):
        hk0, hk1 = key_span(np.full_like(xs, q0), xs, ds, de, causal, window)
        return cost.task_time(xs - q0, hk1 - hk0, mask_area(xs - q0, hk1 - hk0, causal, window, xs - hk1))

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
