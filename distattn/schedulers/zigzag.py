"""``zigzag``: ring attention with ``2P`` chunks, rank ``r`` owning chunks ``r`` and ``2P-1-r``.

Under a causal mask every rank then does the same work at every step (one
early and one late chunk each), which removes the ring's causal imbalance.
Chunk sizes differ by at most one token, so any length works without padding;
a document shorter than a chunk, or spanning many, is just a set of segments.
Execution is :class:`~distattn.schedulers.ring.RingPlan`'s: blocks that the
document mask leaves empty are neither computed nor forwarded.

Layout for ``P = 2`` (chunks ``c0..c3`` of the packed sequence)::

    sequence : | c0 | c1 | c2 | c3 |
    rank 0   : | c0 |           | c3 |   local order: c0, c3
    rank 1   :      | c1 | c2 |        local order: c1, c2
"""

from __future__ import annotations

import numpy as np

from .blocks import even_bounds
from .ring import RingPlan, build_ring_plan


def zigzag_owner(world_size: int) -> np.ndarray:
    """Owner rank of each of the ``2P`` chunks."""
    r = np.arange(world_size)
    return np.concatenate([r, r[::-1]])


def build(doc_lens, mesh, *, causal, window, backend) -> RingPlan:
    p = mesh.world_size
    return build_ring_plan("zigzag", even_bounds(sum(doc_lens), 2 * p), zigzag_owner(p), doc_lens, mesh,
                           causal=causal, window=window, backend=backend)
