"""Planning helpers shared by the range schedulers: token ranges, their mask areas, kernel calls.

Ownership is described by ``bounds``: consecutive token ranges
``[bounds[i], bounds[i+1])`` partitioning the packed sequence, each owned by one
rank (the runs of a :class:`~distattn.planning.layout.Shards`: one per rank for the contiguous layout, two
for zigzag, two per document for the document layout, any for an explicit one). Everything a
planner needs follows from the mask (:class:`~distattn.planning.masks.SliceMask`: the document mask, or any
slices):

* :func:`range_pairs` -- visible (query, key) pairs between every two ranges
  that have any, vectorised over the mask's slices (dry plans of thousands of ranks
  and layouts with ranges per document use it);
* :func:`kernel_calls` -- the varlen kernel calls (:class:`KernelCall`) for ranges
  of queries against ranges of keys: one segment per slice they share, trimmed to
  what its band can see, with the band relative to the segment's first query and key.

All of it is pure numpy: schedules use it to describe work, executors to get
their rank's kernel calls (:func:`distattn.executors.base.call_fwd`/``call_bwd``
run them).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..kernels import Varlen
from ..planning.masks import UNBOUNDED, MaskSlice, SliceMask, band_area, bound_or_none, shift_band


def rect_area(qs, qe, ks, ke, lo, hi) -> np.ndarray:
    """Visible pairs of rectangles ``[qs, qe) x [ks, ke)`` under global bands ``lo <= k - q <= hi``."""
    return band_area(np.maximum(qe - qs, 0), np.maximum(ke - ks, 0), lo - (ks - qs), hi - (ks - qs))


def range_pairs(bounds: np.ndarray, mask: SliceMask) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Range pairs with visible (query, key) pairs: ``(i, j, area)``, sorted by ``(i, j)``; sparse,
    so a layout with ranges per document (thousands of ranges) costs what its slices do."""
    q0, q1, k0, k1, lo, hi = mask.arrays
    fq = np.searchsorted(bounds, q0, side="right") - 1
    wq = np.searchsorted(bounds, q1 - 1, side="right") - fq       # ranges each slice's queries touch
    fk = np.searchsorted(bounds, k0, side="right") - 1
    wk = np.searchsorted(bounds, k1 - 1, side="right") - fk
    per = wq * wk
    sl = np.repeat(np.arange(len(q0)), per)
    idx = np.arange(per.sum()) - np.repeat(np.cumsum(per) - per, per)
    i = fq[sl] + idx // wk[sl]
    j = fk[sl] + idx % wk[sl]
    area = rect_area(np.maximum(bounds[i], q0[sl]), np.minimum(bounds[i + 1], q1[sl]),
                      np.maximum(bounds[j], k0[sl]), np.minimum(bounds[j + 1], k1[sl]), lo[sl], hi[sl])
    # a range pair shared by several slices (short documents inside one range) sums them
    n = len(bounds) - 1
    key, inverse = np.unique(i * n + j, return_inverse=True)
    total = np.zeros(len(key), dtype=np.int64)
    np.add.at(total, inverse, area)
    keep = total > 0
    return key[keep] // n, key[keep] % n, total[keep]


@dataclass(frozen=True)
class KernelCall:
    """Local query rows ``[q_lo, q_hi)`` against rows ``[k_lo, k_hi)`` of a KV buffer, as a varlen
    layout relative to those views (validated once, when planned)."""

    q_lo: int
    q_hi: int
    k_lo: int
    k_hi: int
    varlen: Varlen
    area: int

    def slices(self, q_global: int, k_global: int) -> list[MaskSlice]:
        """The real segments as global mask slices, given the global token at local row 0 of the
        query view and of the KV buffer."""
        q0, k0 = q_global + self.q_lo, k_global + self.k_lo
        out = []
        for a, b, c, d, lo, hi in self.varlen.segments():
            if b > a and d > c:
                shift = (k0 + c) - (q0 + a)  # global band = local band + (first key - first query)
                glo, ghi = shift_band(np.asarray(lo), np.asarray(hi), -shift)
                out.append(MaskSlice(q0 + a, q0 + b, k0 + c, k0 + d, bound_or_none(glo), bound_or_none(ghi)))
        return out


def _pieces(qa, qb, ka, kb, mask: SliceMask):
    """Every (pair, slice) intersection of query ranges ``[qa, qb)`` x key ranges ``[ka, kb)`` with
    the mask's slices, trimmed to what the slice's band can see: ``(pair, qs, qe, ks, ke, lo, hi,
    area)`` with global positions and bands."""
    q0, q1, k0, k1, lo, hi = mask.arrays
    reach = np.maximum.accumulate(q1)                     # slices are sorted by q0
    first = np.searchsorted(reach, qa, side="right")      # candidates: slices [first, last)
    last = np.searchsorted(q0, qb, side="left")
    count = np.where((qb > qa) & (kb > ka), np.maximum(last - first, 0), 0)
    pair = np.repeat(np.arange(len(qa)), count)
    sl = np.repeat(first, count) + np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count)
    qs, qe = np.maximum(qa[pair], q0[sl]), np.minimum(qb[pair], q1[sl])
    ks, ke = np.maximum(ka[pair], k0[sl]), np.minimum(kb[pair], k1[sl])
    l, h = lo[sl], hi[sl]
    # trim what the band hides: keys no query of the piece reaches, then queries that reach no key
    ks, ke = np.maximum(ks, qs + l), np.minimum(ke, qe + h)
    qs, qe = np.maximum(qs, ks - h), np.minimum(qe, ke - l)
    area = rect_area(qs, qe, ks, ke, l, h)
    keep = area > 0
    return tuple(x[keep] for x in (pair, qs, qe, ks, ke, l, h, area))


def layers(qs, qe, ks, ke) -> np.ndarray:
    """Layer of each piece (sorted by local query start): pieces of one layer follow each other in
    local rows on both sides, as one varlen call needs. A document mask is one layer; slices that
    share query rows or keys (a shared question) need more, merged like ring blocks."""
    if (qs[1:] >= qe[:-1]).all() and (ks[1:] >= ke[:-1]).all():
        return np.zeros(len(qs), dtype=np.int64)
    layer = np.zeros(len(qs), dtype=np.int64)
    ends: list[tuple[int, int]] = []
    for n, (a, b, c, d) in enumerate(zip(qs.tolist(), qe.tolist(), ks.tolist(), ke.tolist())):
        for x, (q_end, k_end) in enumerate(ends):
            if a >= q_end and c >= k_end:
                break
        else:
            x = len(ends)
            ends.append((0, 0))
        ends[x] = (b, d)
        layer[n] = x
    return layer


def kernel_calls(qa: np.ndarray, qb: np.ndarray, q_local: np.ndarray, ka: np.ndarray, kb: np.ndarray,
                 k_local: np.ndarray, mask: SliceMask) -> tuple[KernelCall, ...]:
    """Kernel calls for several pairs ``n``: global queries ``[qa[n], qb[n])`` (at local row
    ``q_local[n]``) against global keys ``[ka[n], kb[n])`` (at buffer row ``k_local[n]``), each
    pair split into the mask's slices and trimmed to their bands. Usually one call; more when
    slices overlap in rows (see :func:`layers`); none when nothing is visible."""
    pair, qs, qe, ks, ke, lo, hi, area = _pieces(qa, qb, ka, kb, mask)
    if not len(pair):
        return ()
    shift = ks - qs                                      # the bands, relative to each piece's corner
    qs, qe = qs + (q_local - qa)[pair], qe + (q_local - qa)[pair]
    ks, ke = ks + (k_local - ka)[pair], ke + (k_local - ka)[pair]
    lo, hi = shift_band(lo, hi, shift)
    order = np.lexsort((ks, qs))
    qs, qe, ks, ke, lo, hi, area = (x[order] for x in (qs, qe, ks, ke, lo, hi, area))
    layer = layers(qs, qe, ks, ke)
    return tuple(_call(*(x[layer == n] for x in (qs, qe, ks, ke, lo, hi, area))) for n in range(layer.max() + 1))


def _call(qs, qe, ks, ke, lo, hi, area) -> KernelCall:
    # cu_seqlens cannot skip rows: fill gaps between pieces with segments that have queries but
    # no keys (rows stay out=0, lse=-inf) or keys but no queries.
    q_gap = qs - np.concatenate([[qs[0]], qe[:-1]])
    k_gap = ks - np.concatenate([[ks[0]], ke[:-1]])
    assert (q_gap >= 0).all() and (k_gap >= 0).all(), "pieces of a layer follow each other in local rows"
    zeros = np.zeros_like(qs)
    lens_q = np.stack([q_gap, zeros, qe - qs], axis=1).ravel()
    lens_k = np.stack([zeros, k_gap, ke - ks], axis=1).ravel()
    lo = np.stack([zeros - UNBOUNDED, zeros - UNBOUNDED, lo], axis=1).ravel()
    hi = np.stack([zeros + UNBOUNDED, zeros + UNBOUNDED, hi], axis=1).ravel()
    used = (lens_q > 0) | (lens_k > 0)
    return KernelCall(q_lo=int(qs[0]), q_hi=int(qe[-1]), k_lo=int(ks[0]), k_hi=int(ke[-1]),
                      varlen=Varlen.from_lengths(lens_q[used], lens_k[used], lo[used], hi[used]),
                      area=int(area.sum()))


def sequence_calls(mask: SliceMask, total: int) -> tuple[KernelCall, ...]:
    """The calls of the whole sequence against itself on one device (local attention, and Ulysses
    on its head shard)."""
    zero, end = np.zeros(1, dtype=np.int64), np.full(1, total, dtype=np.int64)
    return kernel_calls(zero, end, zero, zero, end, zero, mask)
