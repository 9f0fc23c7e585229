"""Planning helpers shared by the range schedulers: token ranges, their mask areas, kernel calls.

Ownership is described by ``bounds``: consecutive token ranges
``[bounds[i], bounds[i+1])`` partitioning the packed sequence, each owned by one
rank (ring: one range per rank; zigzag and allgather: two, or two per
document). Everything a planner needs follows from the document boundaries:

* :func:`range_pairs` -- visible (query, key) pairs between every two ranges
  that have any, vectorised over documents (dry plans of thousands of ranks
  and layouts with ranges per document use it);
* :func:`kernel_call` -- the varlen kernel call (:class:`KernelCall`) for ranges
  of queries against ranges of keys: one segment per shared document, trimmed to
  what the causal mask and window can see, with the ``q_offset`` that places the
  queries where they really are relative to the keys.

All of it is pure numpy: schedules use it to describe work, executors to get
their rank's kernel calls (:func:`distattn.executors.base.call_fwd`/``call_bwd``
run them).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..kernels import Varlen
from ..masks import MaskSlice, mask_area


def even_bounds(total: int, parts: int) -> np.ndarray:
    """``parts + 1`` boundaries cutting ``total`` tokens into parts that differ by at most one."""
    return (np.arange(parts + 1, dtype=np.int64) * total) // parts


def doc_bounds(doc_lens) -> tuple[np.ndarray, np.ndarray]:
    ends = np.cumsum(np.asarray(doc_lens, dtype=np.int64))
    return ends - np.asarray(doc_lens, dtype=np.int64), ends


def owned_ranges(bounds: np.ndarray, range_owner: np.ndarray, p: int) -> tuple:
    """Each rank's ranges ``(start, end)`` in local order (increasing global position)."""
    return tuple(tuple(zip(bounds[:-1][range_owner == r].tolist(), bounds[1:][range_owner == r].tolist()))
                 for r in range(p))


def local_rows(bounds: np.ndarray, range_owner: np.ndarray) -> np.ndarray:
    """Row of each range's first token in its owner's local buffer."""
    sizes = np.diff(bounds)
    out = np.zeros(len(sizes), dtype=np.int64)
    for r in np.unique(range_owner):
        mine = np.nonzero(range_owner == r)[0]
        out[mine] = np.cumsum(sizes[mine]) - sizes[mine]
    return out


def range_pairs(bounds: np.ndarray, doc_lens, causal: bool, window: int | None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Range pairs with visible (query, key) pairs: ``(i, j, area)``, sorted by ``(i, j)``; sparse,
    so a layout with ranges per document (thousands of ranges) costs what its documents do."""
    starts, ends = doc_bounds(doc_lens)
    first = np.searchsorted(bounds, starts, side="right") - 1
    last = np.searchsorted(bounds, ends - 1, side="right") - 1
    width = last - first + 1                      # ranges each document touches
    per_doc = width * width
    doc = np.repeat(np.arange(len(starts)), per_doc)
    idx = np.arange(per_doc.sum()) - np.repeat(np.cumsum(per_doc) - per_doc, per_doc)
    w = width[doc]
    i = first[doc] + idx // w
    j = first[doc] + idx % w
    s, e = starts[doc], ends[doc]
    qs, qe = np.maximum(bounds[i], s), np.minimum(bounds[i + 1], e)
    ks, ke = np.maximum(bounds[j], s), np.minimum(bounds[j + 1], e)
    area = mask_area(np.maximum(qe - qs, 0), np.maximum(ke - ks, 0), causal, window, qe - ke)
    # a range pair shared by several documents (short documents inside one range) sums them
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

    def slices(self, q_global: int, k_global: int, causal: bool, window: int | None) -> list[MaskSlice]:
        """The real segments as global mask slices, given the global token at local row 0 of the
        query view and of the KV buffer."""
        q0, k0 = q_global + self.q_lo, k_global + self.k_lo
        return [MaskSlice(q0 + a, q0 + b, k0 + c, k0 + d, causal, window)
                for a, b, c, d, _ in self.varlen.segments() if b > a and d > c]


def kernel_call(qa: np.ndarray, qb: np.ndarray, q_local: np.ndarray, ka: np.ndarray, kb: np.ndarray,
                k_local: np.ndarray, doc_lens, causal: bool, window: int | None) -> KernelCall | None:
    """One kernel call for several pairs ``n``: global queries ``[qa[n], qb[n])`` (at local row
    ``q_local[n]``) against global keys ``[ka[n], kb[n])`` (at buffer row ``k_local[n]``). The
    pairs must follow each other in local rows on both sides (a per-document layout: one pair
    per document); None when no pair is visible."""
    starts, ends = doc_bounds(doc_lens)
    # split every pair into the documents both of its ranges touch
    d0 = np.maximum(np.searchsorted(ends, qa, side="right"), np.searchsorted(ends, ka, side="right"))
    d1 = np.minimum(np.searchsorted(starts, qb, side="left"), np.searchsorted(starts, kb, side="left"))
    count = np.where((qb > qa) & (kb > ka), np.maximum(d1 - d0, 0), 0)
    pair = np.repeat(np.arange(len(qa)), count)
    doc = d0[pair] + np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count)
    if not len(doc):
        return None
    s, e = starts[doc], ends[doc]
    qs, qe = np.maximum(qa[pair], s), np.minimum(qb[pair], e)
    ks, ke = np.maximum(ka[pair], s), np.minimum(kb[pair], e)
    q_shift, k_shift = q_local[pair] - qa[pair], k_local[pair] - ka[pair]  # local row = global + shift
    # Trim what the mask hides: later keys (causal), far keys and queries (window).
    if causal:
        ke = np.minimum(ke, qe)
        qs = np.maximum(qs, ks)
    if window is not None:
        ks = np.maximum(ks, qs - window + 1)
        qe = np.minimum(qe, ke + window - 1)
        if not causal:
            ke = np.minimum(ke, qe + window - 1)
            qs = np.maximum(qs, ks - window + 1)
    keep = (qe > qs) & (ke > ks)
    area = np.where(keep, mask_area(np.maximum(qe - qs, 0), np.maximum(ke - ks, 0), causal, window, qe - ke), 0)
    keep &= area > 0
    if not keep.any():
        return None
    offs = (qe - ke)[keep]  # the geometry's offset: global positions, whatever the local rows
    qs, qe, ks, ke = qs[keep] + q_shift[keep], qe[keep] + q_shift[keep], ks[keep] + k_shift[keep], \
        ke[keep] + k_shift[keep]
    # cu_seqlens cannot skip rows: fill gaps between documents with segments that
    # have queries but no keys (rows stay out=0, lse=-inf) or keys but no queries.
    q_gap = qs - np.concatenate([[qs[0]], qe[:-1]])
    k_gap = ks - np.concatenate([[ks[0]], ke[:-1]])
    assert (q_gap >= 0).all() and (k_gap >= 0).all(), "pieces must follow each other in local rows"
    zeros = np.zeros_like(qs)
    lens_q = np.stack([q_gap, zeros, qe - qs], axis=1).ravel()
    lens_k = np.stack([zeros, k_gap, ke - ks], axis=1).ravel()
    offs = np.stack([zeros, zeros, offs], axis=1).ravel()
    used = (lens_q > 0) | (lens_k > 0)
    lens_q, lens_k, offs = lens_q[used], lens_k[used], offs[used]
    return KernelCall(q_lo=int(qs[0]), q_hi=int(qe[-1]), k_lo=int(ks[0]), k_hi=int(ke[-1]),
                      varlen=Varlen.from_lengths(lens_q, lens_k, offs), area=int(area.sum()))
