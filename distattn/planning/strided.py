"""Strided layouts run as bands: a stripe (rank ``r`` holds positions ``r, r + P, r + 2P, ...`` of each
document) and any layout repeating with a period inside a document, planned in its ranks' order instead of a
kernel segment per token.

Striped Attention (Brandon et al., 2023): with tokens dealt round-robin, rank ``r``'s queries against rank
``s``'s keys are a causal mask shifted by one diagonal (the diagonal included where ``s <= r``, excluded where
``s > r``). In general, where a document's owners repeat with period ``D`` (a stripe: ``D = P``; blocks of
``b`` tokens dealt round-robin: ``D = bP``), the document's positions ``c, c + D, c + 2D, ...`` (its *class*
``c``) are one rank's, and a band ``lo <= k - q <= hi`` between classes ``c`` and ``e`` is the band
``ceil((lo - d) / D) <= j - i <= floor((hi - d) / D)`` between their ``i``-th and ``j``-th tokens
(``d = e - c``)::

    document of 8 tokens on P = 2 (stripe):     rank 0: t0 t2 t4 t6      rank 1: t1 t3 t5 t7
    the schedule's order of the document:       t0 t2 t4 t6 | t1 t3 t5 t7
    causal, rank 0's queries vs rank 1's keys:  k - q = 2 (j - i) + 1 <= 0  ->  j - i <= -1

:func:`reorder` finds such documents and lays each one's classes out consecutively, a rank's classes side by
side: the schedule runs on that order (each class one run, each (class, class) pair one band slice), so a
kernel call carries a segment per class and document, not per token. Documents whose runs are long enough
keep their order. ``distattn.plan`` does it for every layout and every scheduler whose kernel calls follow
the layout's runs (all but ``ulysses``, which gathers the whole sequence in order; not under ``cad``'s
``pool=``), batched rows included; ``plan.shard``, ``unshard`` and ``position_ids`` keep the caller's layout
(``plan.layout``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from .layout import Shards, cut_intervals, doc_bounds, index_runs, token_index
from .masks import UNBOUNDED, SliceMask

# a document whose runs average fewer tokens than this is worth reordering; plan.stats() calls a plan whose
# kernel segments average fewer on some rank fragmented
FRAGMENTED = 8
_CANDIDATES = 8    # periods tried per document (_period)


@dataclass(frozen=True, eq=False)
class Reordered:
    """A layout planned in its ranks' order: the schedule's ``shards`` and ``mask`` (over the reordered
    sequence; every document keeps its span ``[start, end)``) and the caller's layout ``given``, whose
    ``order[r]`` takes rank ``r``'s local tokens to the schedule's compute order."""

    shards: Shards
    mask: SliceMask
    given: Shards


@dataclass(frozen=True)
class _Pieces:
    """Arithmetic progressions of tokens: ``x0 + i * stride`` for ``i < count``, at ``at .. at + count`` in the
    reordered sequence, held by ``owner``. Per document (``bounds``: theirs, ``[documents + 1]``): its
    ``period`` (1: kept in place) and where its classes start (``first``) in ``by_class``, the pieces of the
    classes in (document, class) order."""

    x0: np.ndarray
    stride: np.ndarray
    count: np.ndarray
    at: np.ndarray
    owner: np.ndarray
    bounds: np.ndarray
    period: np.ndarray
    first: np.ndarray
    by_class: np.ndarray


def _period(owner: np.ndarray) -> int | None:
    """The period of a document's owners (token by token), if any: the smallest shift from the document's
    second run to a later run of the same owner that maps the owners onto themselves. (The second run, as
    a document may begin inside a block; the first few such runs, as an owner may hold several classes.)"""
    starts = np.flatnonzero(owner[1:] != owner[:-1]) + 1
    if not len(starts):
        return None
    later = starts[1:][owner[starts[1:]] == owner[starts[0]]][:_CANDIDATES]
    for d in (later - starts[0]).tolist():
        if np.array_equal(owner[d:], owner[:-d]):
            return d
    return None


def _pieces(doc_lens, shards: Shards) -> _Pieces | None:
    """Every token in one progression: a periodic document's classes (stride its period, laid out by owner,
    then class), any other document's runs (stride 1, in place); None when no document is worth reordering."""
    lens = np.asarray(doc_lens, dtype=np.int64)
    starts, ends = doc_bounds(lens)
    cuts = np.searchsorted(shards.bounds, ends) - np.searchsorted(shards.bounds, starts, side="right")
    # the runs' cuts bound each document's runs from above: where no document can average under FRAGMENTED
    # tokens a run there is nothing to reorder, and no per-token work is done (a named layout's plans stay cheap)
    if (lens >= FRAGMENTED * (cuts + 1)).all():
        return None
    owner_of = np.repeat(shards.owner, np.diff(shards.bounds))
    run_start = np.ones(len(owner_of), dtype=bool)      # a new owner, or a new document
    run_start[1:] = owner_of[1:] != owner_of[:-1]
    run_start[starts] = True
    runs_per_doc = np.add.reduceat(run_start, starts)
    period = np.ones(len(lens), dtype=np.int64)
    for d in np.flatnonzero(lens < FRAGMENTED * runs_per_doc).tolist():
        found = _period(owner_of[starts[d]:ends[d]])
        if found is not None and min(found, lens[d]) < runs_per_doc[d]:
            period[d] = found
    if (period == 1).all():
        return None
    # the runs of the documents kept, cut at document boundaries
    a = np.flatnonzero(run_start)
    b = np.append(a[1:], len(owner_of))
    kept = period[np.searchsorted(starts, a, side="right") - 1] == 1
    runs = (a[kept], np.ones(kept.sum(), np.int64), (b - a)[kept], a[kept], owner_of[a[kept]])
    # the classes of the periodic ones: document d's class c is its tokens c, c + D, ...
    periodic = np.flatnonzero(period > 1)
    ncls = np.minimum(period[periodic], lens[periodic])
    cdoc = np.repeat(periodic, ncls)
    c = index_runs(np.zeros(len(ncls)), ncls)
    x0, stride = starts[cdoc] + c, period[cdoc]
    count, owner = (lens[cdoc] - c + stride - 1) // stride, owner_of[x0]
    order = np.lexsort((c, owner, cdoc))                     # by document, then owner, then class
    x0, stride, count, owner, sdoc = x0[order], stride[order], count[order], owner[order], cdoc[order]
    before = np.cumsum(count) - count
    at = starts[sdoc] + before - before[np.searchsorted(sdoc, sdoc)]    # restart at each document's start
    first = np.full(len(lens), -1, dtype=np.int64)
    first[periodic] = np.cumsum(ncls) - ncls
    by_class = len(runs[0]) + np.argsort(order)              # class table -> piece
    return _Pieces(*(np.concatenate([r, k]) for r, k in zip(runs, (x0, stride, count, at, owner))),
                   np.append(starts, ends[-1:]), period, first, by_class)


def _sides(a: np.ndarray, b: np.ndarray, pieces: _Pieces) -> tuple[np.ndarray, ...]:
    """Intervals ``[a[i], b[i])`` as progressions: ``(i, x0, stride, count, at)`` per non-empty piece."""
    i, doc, u, v = cut_intervals(pieces.bounds, a, b)
    flat = pieces.period[doc] == 1    # a kept document's tokens are in place: one progression of stride 1
    out = [(i[flat], u[flat], np.ones(flat.sum(), np.int64), (v - u)[flat], u[flat])]
    i, doc, u, v = i[~flat], doc[~flat], u[~flat], v[~flat]
    ncls = np.minimum(pieces.period[doc], np.diff(pieces.bounds)[doc])
    piece = pieces.by_class[index_runs(pieces.first[doc], ncls)]    # each class of the document
    i, u, v = (np.repeat(x, ncls) for x in (i, u, v))
    x0, stride, at = pieces.x0[piece], pieces.stride[piece], pieces.at[piece]
    lo = np.maximum(-((x0 - u) // stride), 0)         # ceil((u - x0) / stride): the first index at or after u
    hi = np.minimum(-((x0 - v) // stride), pieces.count[piece])
    out.append((i, x0 + lo * stride, stride, hi - lo, at + lo))
    i, x0, stride, count, at = (np.concatenate(col) for col in zip(*out))
    good = count > 0
    order = np.argsort(i[good], kind="stable")
    return tuple(x[good][order] for x in (i, x0, stride, count, at))


def _mask(mask: SliceMask, pieces: _Pieces) -> SliceMask | None:
    """``mask`` over the reordered sequence: each slice cut into its (query progression, key progression)
    pairs, each one band. None when a pair of different strides is partly visible (no band describes it)."""
    q0, q1, k0, k1, lo, hi = mask.arrays
    qi, qx, qs, qn, qa = _sides(q0, q1, pieces)
    ki, kx, ks, kn, ka = _sides(k0, k1, pieces)
    nk = np.bincount(ki, minlength=len(q0))
    reps = nk[qi]                                      # each query piece meets its slice's key pieces
    qp = np.repeat(np.arange(len(qi)), reps)
    kp = index_runs((np.cumsum(nk) - nk)[qi], reps)
    s = qi[qp]
    lo, hi = lo[s], hi[s]
    dq, dk = qx[qp], kx[kp]
    sq, sk, mq, mk = qs[qp], ks[kp], qn[qp], kn[kp]
    stride = np.where(mq == 1, sk, sq)
    same = (sq == sk) | (mq == 1) | (mk == 1)
    # a pair of two strides is one slice only where its band cuts nothing (all visible) or everything
    low, high = dk - (dq + (mq - 1) * sq), dk + (mk - 1) * sk - dq       # its smallest and largest k - q
    whole = (low >= lo) & (high <= hi)
    none = (high < lo) | (low > hi)
    if not (same | whole | none).all():
        return None
    delta, shift = dk - dq, ka[kp] - qa[qp]
    new_lo = np.where(lo <= -UNBOUNDED, -UNBOUNDED, -((delta - lo) // stride) + shift)  # ceil((lo - delta) / s)
    new_hi = np.where(hi >= UNBOUNDED, UNBOUNDED, (hi - delta) // stride + shift)
    new_lo, new_hi = np.where(same, new_lo, -UNBOUNDED), np.where(same, new_hi, UNBOUNDED)
    keep = ~none
    a, ka_ = qa[qp][keep], ka[kp][keep]
    return SliceMask.from_bands(a, a + mq[keep], ka_, ka_ + mk[keep], new_lo[keep], new_hi[keep], check=False)


def reorder(doc_lens, shards: Shards, mask: SliceMask) -> Reordered | None:
    """``shards`` (a layout of ``doc_lens``) and ``mask`` planned in the ranks' order (module docstring), or
    None when no document's owners are both fragmented (runs under :data:`FRAGMENTED` tokens on average)
    and periodic, or when ``mask`` has a slice no band can carry there."""
    pieces = _pieces(doc_lens, shards)
    moved = None if pieces is None else _mask(mask, pieces)
    if moved is None:
        return None
    order = np.argsort(pieces.at, kind="stable")
    at, owner = pieces.at[order], pieces.owner[order]
    new_run = np.ones(len(at), dtype=bool)
    new_run[1:] = owner[1:] != owner[:-1]
    run_shards = Shards.from_bounds(np.append(at[new_run], shards.total), owner[new_run], shards.world_size)
    # where each token went
    n = pieces.count
    step = index_runs(np.zeros(len(n)), n)
    position = np.empty(shards.total, dtype=np.int64)
    position[np.repeat(pieces.x0, n) + step * np.repeat(pieces.stride, n)] = np.repeat(pieces.at, n) + step
    orders = []
    for ranges in shards.owned:
        went = position[token_index(ranges)]
        orders.append(None if went.size < 2 or (np.diff(went) > 0).all() else np.argsort(went, kind="stable"))
    return Reordered(run_shards, moved, dataclasses.replace(shards, order=tuple(orders)))
