"""CAD planning: the task table and its FLOPs-balanced placement (pure numpy, no processes).

Token space: the packed sequences of every CP group of the pool, concatenated
(group after group); slot ``i`` owns ``[bounds[i], bounds[i+1])``. A *segment*
is a query range of one document with the key range it sees; a *task* is one
segment, or a head/tail pair of segments of a long causal document; every
segment of a task is computed on the same rank.
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


def _overlap(a0, a1, b0, b1):
    return np.maximum(np.minimum(a1, b1) - np.maximum(a0, b0), 0)


def place_tasks(doc_lens, bounds: np.ndarray, causal: bool, window: int | None, cost, epsilon: float = 0.1,
                chunk: int | None = None, q_bytes: float = 2.0, kv_bytes: float = 1.0) -> Segments:
    """Build the task table and move tasks from the most to the least loaded slot (see ``cad``).

    ``q_bytes``/``kv_bytes`` weigh a query token (Q out, O back) against a key token (K and V)
    when choosing the move with the fewest bytes per unit of work gained.
    """
    p = len(bounds) - 1
    chunk = chunk or max(128, int(bounds[-1] // p) // 4)
    q0, q1, k0, k1, doc, task, home = _initial_tasks(doc_lens, bounds, causal, window, chunk)
    ds_all, de_all = doc_bounds(doc_lens)
    area = mask_area(q1 - q0, k1 - k0, causal, window, q1 - k1)
    seg_time = cost.task_time(q1 - q0, k1 - k0, area)
    n_task = len(home)
    t_rank = home.copy()                                          # computing slot per task
    t_time = np.bincount(task, seg_time, minlength=n_task)
    t_q = np.bincount(task, q1 - q0, minlength=n_task)            # query tokens per task
    t_k0 = np.full(n_task, np.iinfo(np.int64).max)
    t_k1 = np.zeros(n_task, dtype=np.int64)
    np.minimum.at(t_k0, task, k0)                                 # key span per task
    np.maximum.at(t_k1, task, k1)
    load = np.bincount(t_rank, t_time, minlength=p)
    mean = load.sum() / p
    for _ in range(50 * p + 100):
        src, u = int(np.argmax(load)), int(np.argmin(load))
        if load[src] <= (1 + epsilon) * mean and load[u] >= (1 - epsilon) * mean:
            break
        cand = np.nonzero(t_rank == src)[0]
        want = min(load[src] - mean, mean - load[u])
        gain = np.minimum(t_time[cand], want)
        moved_kv = (t_k1[cand] - t_k0[cand]) - _overlap(t_k0[cand], t_k1[cand], bounds[u], bounds[u + 1])
        score = (q_bytes * t_q[cand] + kv_bytes * moved_kv) / np.maximum(gain, 1e-30)
        best = int(cand[np.argmin(score)])
        if t_time[best] <= want + epsilon * mean:  # fits: move it whole
            load[src] -= t_time[best]
            load[u] += t_time[best]
            t_rank[best] = u
            continue
        segs = np.nonzero(task == best)[0]
        if len(segs) > 1:  # a head/tail pair that overshoots: split it into its halves first
            s = segs[1]
            task[s] = n_task
            t_time[best] -= seg_time[s]
            t_q[best] -= q1[s] - q0[s]
            t_k0[best], t_k1[best] = k0[segs[0]], k1[segs[0]]
            t_time, t_q = np.append(t_time, seg_time[s]), np.append(t_q, q1[s] - q0[s])
            t_k0, t_k1, t_rank = np.append(t_k0, k0[s]), np.append(t_k1, k1[s]), np.append(t_rank, src)
            n_task += 1
            continue
        s = segs[0]
        d = doc[s]
        x = _split_point(q0[s], q1[s], ds_all[d], de_all[d], causal, window, cost, want)
        if x is None:
            break
        # the head [q0, x) moves to u as a new task: it needs fewer keys than the tail
        hk0, hk1 = key_span(q0[s], x, ds_all[d], de_all[d], causal, window)
        h_area = int(mask_area(x - q0[s], hk1 - hk0, causal, window, x - hk1))
        h_time = float(cost.task_time([x - q0[s]], [hk1 - hk0], [h_area])[0])
        tk0, tk1 = key_span(x, q1[s], ds_all[d], de_all[d], causal, window)
        t_area = int(mask_area(q1[s] - x, tk1 - tk0, causal, window, q1[s] - tk1))
        t_new = float(cost.task_time([q1[s] - x], [tk1 - tk0], [t_area])[0])
        q0, q1, k0, k1, doc = (np.append(a, v) for a, v in ((q0, q0[s]), (q1, x), (k0, hk0), (k1, hk1), (doc, d)))
        area, seg_time, task = np.append(area, h_area), np.append(seg_time, h_time), np.append(task, n_task)
        q0[s], k0[s], k1[s], area[s] = x, tk0, tk1, t_area
        load[src] += t_new - seg_time[s]
        t_time[best], t_q[best], t_k0[best], t_k1[best] = t_new, q1[s] - x, tk0, tk1
        seg_time[s] = t_new
        t_time, t_q = np.append(t_time, h_time), np.append(t_q, x - q0[-1])
        t_k0, t_k1, t_rank = np.append(t_k0, hk0), np.append(t_k1, hk1), np.append(t_rank, u)
        load[u] += h_time
        n_task += 1
    return Segments(q0, q1, k0, k1, t_rank[task], area)


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
