"""CAD planning: the task table and its FLOPs-balanced placement (pure numpy, no processes).

Token space: the packed sequences of every CP group of the pool, concatenated
(group after group); slot ``i`` owns ``[bounds[i], bounds[i+1])``. A *segment*
is a query range of one document with the key range it sees; a *task* is one
segment, or a head/tail pair of segments of a long causal document; every
segment of a task is computed on the same rank. :class:`TaskTable` holds both
and the edits the greedy migration of :func:`place_tasks` makes to them.
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


def _initial_tasks(doc_lens, bounds, causal, window, chunk):
    """Segments per document: one per owning slot, or head/tail pairs of ``chunk``-sized pieces
    for long causal documents (chunk i with its mirror: equal causal work per pair)."""
    ds_all, de_all = doc_bounds(doc_lens)
    q0, q1, task, home = [], [], [], []
    n_task = 0
    for ds, de in zip(ds_all.tolist(), de_all.tolist()):
        n = de - ds
        if causal and n > 2 * chunk:
            k = -(-n // (2 * chunk))
            cuts = ds + (np.arange(2 * k + 1) * n) // (2 * k)
            for j in range(k):
                for c in (j, 2 * k - 1 - j):
                    q0.append(cuts[c])
                    q1.append(cuts[c + 1])
                    task.append(n_task)
                home.append(int(np.searchsorted(bounds, cuts[j], side="right") - 1))
                n_task += 1
            continue
        first = int(np.searchsorted(bounds, ds, side="right") - 1)
        last = int(np.searchsorted(bounds, de - 1, side="right") - 1)
        for r in range(first, last + 1):
            a, b = max(ds, bounds[r]), min(de, bounds[r + 1])
            if a < b:
                q0.append(a)
                q1.append(b)
                task.append(n_task)
                home.append(r)
                n_task += 1
    q0, q1 = np.asarray(q0, dtype=np.int64), np.asarray(q1, dtype=np.int64)
    doc = np.searchsorted(de_all, q0, side="right")
    k0, k1 = key_span(q0, q1, ds_all[doc], de_all[doc], causal, window)
    return q0, q1, k0, k1, doc, np.asarray(task), np.asarray(home, dtype=np.int64)


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
        return self._push(self._TASK, "n_task", (rank, time, q, k0, k1, (seg, -1)))

    def load(self, p: int) -> np.ndarray:
        n = self.n_task
        return np.bincount(self.t_rank[:n], self.t_time[:n], minlength=p)

    def cheapest(self, src: int, lo: int, hi: int, want: float, q_bytes: float, kv_bytes: float) -> int:
        """The task of ``src`` with the fewest bytes sent per unit of ``want`` it would take off,
        moving to a slot that owns the keys ``[lo, hi)``; ties go to the lowest task id."""
        cand = np.nonzero(self.t_rank[:self.n_task] == src)[0]
        k0, k1 = self.t_k0[cand], self.t_k1[cand]
        gain = np.minimum(self.t_time[cand], want)
        moved_kv = (k1 - k0) - np.maximum(np.minimum(k1, hi) - np.maximum(k0, lo), 0)
        score = (q_bytes * self.t_q[cand] + kv_bytes * moved_kv) / np.maximum(gain, 1e-30)
        return int(cand[np.argmin(score)])

    def move(self, t: int, rank: int) -> None:
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


def place_tasks(doc_lens, bounds: np.ndarray, causal: bool, window: int | None, cost, epsilon: float = 0.1,
                chunk: int | None = None, q_bytes: float = 2.0, kv_bytes: float = 1.0) -> Segments:
    """Build the task table and move tasks from the most to the least loaded slot (see ``cad``).

    ``q_bytes``/``kv_bytes`` weigh a query token (Q out, O back) against a key token (K and V)
    when choosing the move with the fewest bytes per unit of work gained.
    """
    p = len(bounds) - 1
    chunk = chunk or max(128, int(bounds[-1] // p) // 4)
    table = TaskTable(doc_lens, bounds, causal, window, chunk, cost)
    load = table.load(p)
    mean = load.sum() / p
    for _ in range(50 * p + 100):
        src, u = int(np.argmax(load)), int(np.argmin(load))
        if load[src] <= (1 + epsilon) * mean and load[u] >= (1 - epsilon) * mean:
            break
        want = min(load[src] - mean, mean - load[u])
        best = table.cheapest(src, bounds[u], bounds[u + 1], want, q_bytes, kv_bytes)
        work = table.t_time[best]
        if work <= want + epsilon * mean:  # fits: move it whole
            table.move(best, u)
            load[src] -= work
            load[u] += work
        elif table.is_pair(best):  # overshoots: its halves may fit
            table.split_pair(best)
        else:  # the head moves: it needs fewer keys than the tail
            x = table.split_point(best, want)
            if x is None:
                break
            tail_change, head_time = table.cut(best, x, u)
            load[src] += tail_change
            load[u] += head_time
    return table.segments()


def _split_point(q0, q1, ds, de, causal, window, cost, want):
    """Query position x such that the head ``[q0, x)`` costs about ``want``; None if too small.
    The head's cost grows with x: narrow the bracket on a coarse grid, then finish exactly."""

    def head_times(xs):
        hk0, hk1 = key_span(np.full_like(xs, q0), xs, ds, de, causal, window)
        return cost.task_time(xs - q0, hk1 - hk0, mask_area(xs - q0, hk1 - hk0, causal, window, xs - hk1))

    lo, hi = int(q0) + 1, int(q1) - 1
    while hi - lo > 64:
        xs = np.unique(np.linspace(lo, hi, 33).astype(np.int64))
        i = int(np.searchsorted(head_times(xs), want))
        lo, hi = (int(xs[i - 1]) if i > 0 else lo), (int(xs[i]) if i < len(xs) else hi)
    xs = np.arange(lo, hi + 1, dtype=np.int64)
    if xs.size == 0:
        return None
    i = int(np.searchsorted(head_times(xs), want))
    if i == 0 and xs[0] == q0 + 1:
        return None
    return int(xs[min(i, xs.size - 1)])
