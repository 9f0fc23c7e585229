"""``zigzag``: ring attention with ``2P`` chunks, rank ``r`` owning chunks ``r`` and ``2P-1-r``.

Under a causal mask every rank then does the same work at every step (one
early and one late chunk each), which removes the ring's causal imbalance.
The schedule is :class:`~distattn.schedulers.ring.RingSchedule` (and so is the
execution): blocks that the document mask leaves empty are neither computed nor
forwarded.

``layout="sequence"`` (default) cuts the packed sequence into ``2P`` chunks
that differ by at most one token, so any length works without padding; a
document shorter than a chunk, or spanning many, is just a set of segments.
Layout for ``P = 2`` (chunks ``c0..c3`` of the packed sequence)::

    sequence : | c0 | c1 | c2 | c3 |
    rank 0   : | c0 |           | c3 |   local order: c0, c3
    rank 1   :      | c1 | c2 |        local order: c1, c2

``layout="document"`` cuts *every document* into ``2P`` equal chunks and rank
``r`` holds chunks ``r`` and ``2P-1-r`` of each, documents in order: the split
of TransformerEngine's and Megatron's THD format under context parallelism
(``thd_get_partitioned_indices``), whose RoPE positions assume it. Every
document length must be a multiple of ``2P`` (Megatron pads them so). For
``P = 2`` and documents ``a`` (8 tokens) and ``b`` (4 tokens)::

    rank 0   : a0 a1 | a6 a7 | b0 | b3
    rank 1   : a2 a3 | a4 a5 | b1 | b2

Both layouts balance causal work; the document layout also balances every
document on its own, at the price of ``4P`` ranges per document for the
kernels (one call per slot pair and step still covers all of them).
"""

from __future__ import annotations

import numpy as np

from .blocks import doc_bounds, even_bounds
from .ring import RingSchedule, ring_schedule

from . import LAYOUTS


def zigzag_owner(world_size: int) -> np.ndarray:
    """Owner rank of each of the ``2P`` chunks."""
    r = np.arange(world_size)
    return np.concatenate([r, r[::-1]])


def zigzag_ranges(doc_lens, p: int, layout: str = "sequence") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(bounds, owner, slot)`` of the zigzag ranges: ``2P`` chunks of the sequence, or of every
    document (see module docstring); slot 0 holds each rank's early chunks, slot 1 its late ones."""
    chunks = 2 * p
    if layout == "sequence":
        return even_bounds(sum(doc_lens), chunks), zigzag_owner(p), (np.arange(chunks) >= p).astype(np.int64)
    if layout != "document":
        raise ValueError(f"layout={layout!r} is unknown; choose one of {list(LAYOUTS)}")
    lens = np.asarray(doc_lens, dtype=np.int64)
    bad = np.nonzero(lens % chunks)[0]
    if len(bad):
        d = int(bad[0])
        raise ValueError(f"layout='document' cuts every document into 2 * cp = {chunks} equal chunks, but document "
                         f"{d} has {int(lens[d])} tokens ({len(bad)} of {len(lens)} documents are not multiples of "
                         f"{chunks}): pad each document to a multiple of {chunks}, as Megatron does for THD under "
                         f"context parallelism")
    starts, _ = doc_bounds(lens)
    bounds = (starts[:, None] + np.arange(chunks)[None, :] * (lens // chunks)[:, None]).ravel()
    bounds = np.append(bounds, lens.sum())
    owner = np.tile(zigzag_owner(p), len(lens))
    slot = np.tile((np.arange(chunks) >= p).astype(np.int64), len(lens))
    return bounds, owner, slot


def build(doc_lens, mesh, *, causal, window, mask, layout: str = "sequence") -> RingSchedule:
    bounds, owner, slot = zigzag_ranges(doc_lens, mesh.world_size, layout)
    return ring_schedule("zigzag", bounds, owner, doc_lens, mesh.world_size, causal=causal, window=window,
                         mask=mask, range_slot=slot)
