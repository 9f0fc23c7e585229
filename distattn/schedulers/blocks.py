"""Planning helpers shared by the block schedulers: token ranges, their mask areas, kernel blocks.

Ownership is described by ``bounds``: consecutive token ranges
``[bounds[i], bounds[i+1])`` partitioning the packed sequence, each owned by one
rank (ring: one range per rank; zigzag and allgather: two, or two per
document). Everything a planner needs follows from the document boundaries:

* :func:`range_pairs` -- visible (query, key) pairs between every two ranges
  that have any, vectorised over documents (dry plans of thousands of ranks
  and layouts with ranges per document use it);
* :func:`pieces_block` -- the varlen kernel call for ranges of queries against
  ranges of keys: one segment per shared document, trimmed to what the causal
  mask and window can see, with the ``q_offset`` that places the queries where
  they really are relative to the keys (:func:`pair_block`: one pair).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..kernels import Varlen, varlen_bwd, varlen_fwd
from ..masks import MaskSlice, mask_area
from ..merge import merge_


def even_bounds(total: int, parts: int) -> np.ndarray:
    """``parts + 1`` boundaries cutting ``total`` tokens into parts that differ by at most one."""
    return (np.arange(parts + 1, dtype=np.int64) * total) // parts


def doc_bounds(doc_lens) -> tuple[np.ndarray, np.ndarray]:
    ends = np.cumsum(np.asarray(doc_lens, dtype=np.int64))
    return ends - np.asarray(doc_lens, dtype=np.int64), ends


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
class Block:
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


def pair_block(q_range: tuple[int, int], q_local: int, k_range: tuple[int, int], k_local: int, doc_lens,
               causal: bool, window: int | None) -> Block | None:
    """The kernel call for global queries ``q_range`` (at local row ``q_local``) against global
    keys ``k_range`` (at buffer row ``k_local``); None when no pair is visible."""
    return pieces_block(*(np.asarray([x], dtype=np.int64) for x in (*q_range, q_local, *k_range, k_local)),
                        doc_lens, causal, window)


def pieces_block(qa: np.ndarray, qb: np.ndarray, q_local: np.ndarray, ka: np.ndarray, kb: np.ndarray,
                 k_local: np.ndarray, doc_lens, causal: bool, window: int | None) -> Block | None:
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
    return Block(q_lo=int(qs[0]), q_hi=int(qe[-1]), k_lo=int(ks[0]), k_hi=int(ke[-1]),
                 varlen=Varlen.from_lengths(lens_q, lens_k, offs), area=int(area.sum()))


def block_fwd(block: Block, q, kv, out_acc, lse_acc, *, causal, window, scale, backend) -> None:
    """Attention of ``block`` (``kv`` = stacked ``[2, T, Hkv, D]`` buffer), merged into the fp32
    accumulators ``out_acc [S_local, Hq, D]`` / ``lse_acc [S_local, Hq]``."""
    rows = slice(block.q_lo, block.q_hi)
    keys = slice(block.k_lo, block.k_hi)
    out, lse = varlen_fwd(q[rows], kv[0, keys], kv[1, keys], block.varlen, causal=causal, window=window,
                          scale=scale, backend=backend)
    merge_(out_acc[rows], lse_acc[rows], out, lse)


def block_bwd(block: Block, dout, q, kv, out, lse, delta, dq_acc, dkv_acc, *, causal, window, scale,
              backend) -> None:
    """Gradients of ``block`` given the final ``out``/``lse`` and ``delta = rowsum(dout * out)``
    (computed once per backward), added to fp32 ``dq_acc`` and ``dkv_acc [2, T, Hkv, D]`` (same
    layout as ``kv``)."""
    rows = slice(block.q_lo, block.q_hi)
    keys = slice(block.k_lo, block.k_hi)
    dq, dk, dv = varlen_bwd(dout[rows], q[rows], kv[0, keys], kv[1, keys], out[rows], lse[rows], block.varlen,
                            causal=causal, window=window, scale=scale, backend=backend, delta=delta[rows])
    dq_acc[rows] += dq
    dkv_acc[0, keys] += dk
    dkv_acc[1, keys] += dv
