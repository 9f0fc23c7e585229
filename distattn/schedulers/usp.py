"""``usp``: 2-D context parallelism, Ulysses inside groups of ``U`` ranks, zigzag ring across ``R``
(Unified Sequence Parallelism, Fang & Zhao 2024).

``U`` is meant for fast links (inside a node), ``R`` for the slower ones. The
sequence is cut for the ring first, zigzag style (``2R`` chunks, ring rank
``r`` holding chunks ``r`` and ``2R-1-r``), then each ring rank's tokens are
split evenly over its ``U`` Ulysses ranks. For ``U = 2``, ``R = 2``::

    sequence          : |  c0   |  c1   |  c2   |  c3   |
    ring rank 0 holds : c0 c3          ring rank 1 holds : c1 c2
    (u=0, r=0) owns   : first half of [c0 c3]   (u=1, r=0): second half
    (u=0, r=1) owns   : first half of [c1 c2]   (u=1, r=1): second half

Forward on rank ``(u, r)``: all-to-all inside the Ulysses group turns
``[S/(UR), Hq, D]`` into ring rank ``r``'s tokens for ``Hq/U`` heads; zigzag ring
attention runs across the ``R`` ring ranks on those heads; the inverse
all-to-all returns ``[S/(UR), Hq, D]``. Uneven heads and ``Hkv < U`` work as in
``ulysses``, uneven lengths as in ``zigzag``.

The mesh: a 2-D ``DeviceMesh`` whose axes are named ``"ulysses"`` and
``"ring"`` (in either order; ``distattn.parallel.usp_mesh`` builds one with
Ulysses on consecutive ranks), or a 1-D group/mesh (or a dry world size) plus
the degree. Then group rank ``i`` is ``(u, r) = (i % U, i // U)``, and the
first plan on a group creates the two sub-groups it needs; later plans on the
same group find them again (:func:`distattn.comm.subgroups`), so a plan per
training step creates nothing. Creating them waits at most the group's
timeout and names a rank that never came.

The degree, with a 1-D mesh: ``ulysses_degree=U`` (a divisor of the world
size), or ``num_kv_heads=H`` and the default :func:`default_ulysses_degree`,
the largest divisor of the world size that divides ``H`` (``gcd(P, H)``), so
that Ulysses splits whole KV heads and never replicates one. The plan fixes
token ownership, which depends on ``U``, before it sees a tensor: that is why
the head count is a plan option and not read at the first attention. Given
both, ``ulysses_degree`` wins; attention then refuses K/V with another head
count than ``num_kv_heads``. Given neither, ``ValueError``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..comm import Comm, subgroups
from ..masks import MaskSlice, attention_flops
from ..parallel.mesh import MeshInfo
from ..plans import Plan
from .blocks import even_bounds
from .ring import RingPlan, build_ring_plan
from .ulysses import HeadExchange, HeadLayout, head_a2a_bytes, head_attention_bwd, head_attention_fwd
from .zigzag import zigzag_ranges


@dataclass(frozen=True, eq=False, kw_only=True)
class USPPlan(Plan):
    ulysses_degree: int
    coords: tuple[tuple[int, int], ...]          # flat group rank -> (u, r)
    ring: RingPlan = field(repr=False)           # zigzag over the R ring ranks (this rank's ring coordinate)
    ulysses_comm: Comm | None = field(default=None, repr=False)
    num_kv_heads: int | None = None              # the head count the plan was made for, if given

    def check_local_qkv(self, q, k, v) -> None:
        super().check_local_qkv(q, k, v)
        if self.num_kv_heads is not None and k.shape[1] != self.num_kv_heads:
            raise ValueError(f"k and v have {k.shape[1]} heads but this usp plan was made with "
                             f"num_kv_heads={self.num_kv_heads}: pass the model's KV head count to distattn.plan")

    def _members(self, ring_rank: int) -> tuple[int, ...]:
        """Token counts of the Ulysses ranks u = 0..U-1 holding ring rank ``ring_rank``'s tokens."""
        n = self.ring.num_tokens(ring_rank)
        return tuple(int(b - a) for a, b in zip(even_bounds(n, self.ulysses_degree),
                                                even_bounds(n, self.ulysses_degree)[1:]))

    def device_data(self):
        return self.ring.device_data()

    def compute_slices(self, rank: int) -> list[MaskSlice]:
        return self.ring.compute_slices(self.coords[rank][1])  # the ring rank's pairs, a share of the heads

    def visible_pairs(self, rank: int) -> int:
        return self.ring.visible_pairs(self.coords[rank][1])

    def rank_flops(self, rank, num_heads, num_kv_heads, head_dim) -> int:
        u, _ = self.coords[rank]
        share = HeadLayout.build(num_heads, num_kv_heads, self.ulysses_degree).share(u)
        return int(attention_flops(self.visible_pairs(rank), share, head_dim))

    def send_bytes(self, rank, num_heads, num_kv_heads, head_dim, dtype_bytes) -> int:
        u, r = self.coords[rank]
        layout = HeadLayout.build(num_heads, num_kv_heads, self.ulysses_degree)
        # the ring moves this rank's KV heads (one per query head where grouping had to be expanded)
        kv_heads = layout.share(u) if layout.expansion(u, num_heads // num_kv_heads) is not None else \
            layout.kv[u][1] - layout.kv[u][0]
        return (head_a2a_bytes(self._members(r), u, num_heads, num_kv_heads, head_dim, dtype_bytes)
                + self.ring.send_bytes(r, layout.share(u), kv_heads, head_dim, dtype_bytes))

    def bytes_sent(self) -> int:
        return self.ulysses_comm.bytes_sent + self.ring.bytes_sent() if self.ulysses_comm else 0

    @property
    def exchange(self) -> HeadExchange:
        u, r = self.coords[self.rank]
        return HeadExchange(self.ulysses_comm, u, self._members(r))

    def forward(self, q, k, v, scale):
        out, (num_heads, num_kv_heads, expand, inner) = head_attention_fwd(
            self.exchange, q, k, v, lambda qh, kh, vh: self.ring.forward(qh, kh, vh, scale), "usp forward")
        return out, (num_heads, num_kv_heads, expand, *inner)

    def backward(self, dout, saved, scale):
        num_heads, num_kv_heads, expand, *inner = saved
        return head_attention_bwd(self.exchange, dout, (num_heads, num_kv_heads, expand, tuple(inner)),
                                  lambda dout_h, ring_saved: self.ring.backward(dout_h, ring_saved, scale),
                                  "usp backward")


def default_ulysses_degree(world_size: int, num_kv_heads: int | None = None) -> int:
    """usp's Ulysses degree when none is given: the largest divisor of the CP size ``world_size``
    that divides ``num_kv_heads`` (``gcd``), so Ulysses splits whole KV heads.

    Without ``num_kv_heads`` (callers that do not know the model): the largest divisor up to the
    square root, a near-square mesh, which may not divide the KV heads -- pass them.
    """
    for name, val in (("world_size", world_size), ("num_kv_heads", num_kv_heads)):
        if val is not None and (isinstance(val, bool) or not isinstance(val, int) or val < 1):
            raise ValueError(f"{name} must be a positive int, got {val!r}")
    if num_kv_heads is not None:
        return math.gcd(world_size, num_kv_heads)
    return max(d for d in range(1, int(world_size ** 0.5) + 1) if world_size % d == 0)


def _degree(p: int, ulysses_degree, num_kv_heads) -> int:
    """U for a 1-D group of ``p`` ranks (see module docstring)."""
    if ulysses_degree is None:
        if num_kv_heads is None:
            raise ValueError("scheduler='usp' needs a 2-D DeviceMesh with axes ('ulysses', 'ring'), or a 1-D "
                             "group/mesh (or a dry world size) plus ulysses_degree=U or num_kv_heads=H (then "
                             "ulysses_degree defaults to the largest divisor of the world size that divides H)")
        return default_ulysses_degree(p, num_kv_heads)
    if isinstance(ulysses_degree, bool) or not isinstance(ulysses_degree, int) or ulysses_degree < 1 \
            or p % ulysses_degree:
        divisors = [d for d in range(1, p + 1) if p % d == 0]
        raise ValueError(f"ulysses_degree must divide the world size {p}: one of {divisors}, got {ulysses_degree!r}")
    return ulysses_degree


def _layout(mesh: MeshInfo, ulysses_degree, num_kv_heads):
    """(U, R, coords per flat rank, this rank's ulysses group, ring group) from the mesh argument."""
    dm = mesh.device_mesh
    if dm is not None and dm.ndim == 2:
        names = tuple(dm.mesh_dim_names or ())
        if set(names) != {"ulysses", "ring"}:
            raise ValueError(f"scheduler='usp' needs a 2-D DeviceMesh with mesh_dim_names ('ulysses', 'ring'), "
                             f"got {names or 'unnamed axes'}; build one with distattn.parallel.usp_mesh")
        size_u = dm.size(names.index("ulysses"))
        if ulysses_degree is not None and ulysses_degree != size_u:
            raise ValueError(f"ulysses_degree={ulysses_degree} disagrees with the mesh's 'ulysses' axis "
                             f"({size_u}); leave it out with a 2-D mesh")
        index = np.unravel_index(np.arange(dm.size()), tuple(dm.mesh.shape))
        coords = tuple(zip(index[names.index("ulysses")].tolist(), index[names.index("ring")].tolist()))
        return size_u, dm.size() // size_u, coords, dm["ulysses"].get_group(), dm["ring"].get_group()
    if dm is not None and dm.ndim > 2:
        raise ValueError(f"scheduler='usp' takes a 1-D or 2-D mesh, got {dm.ndim} axes")
    p = mesh.world_size
    u_deg = _degree(p, ulysses_degree, num_kv_heads)
    r_deg = p // u_deg
    coords = tuple((i % u_deg, i // u_deg) for i in range(p))
    if mesh.is_dry:
        return u_deg, r_deg, coords, None, None
    u, r = coords[mesh.rank]
    ulysses_ranks = [r * u_deg + j for j in range(u_deg)]
    ring_ranks = [j * u_deg + u for j in range(r_deg)]
    ulysses, ring = subgroups(mesh.group, [ulysses_ranks, ring_ranks], f"ulysses_degree={u_deg}",
                              "usp's process groups")
    return u_deg, r_deg, coords, ulysses, ring


def _cut(ranges, lo: int, hi: int):
    """Global ranges of local positions ``[lo, hi)`` of a token list made of ``ranges``."""
    out, offset = [], 0
    for s, e in ranges:
        a, b = max(lo - offset, 0), min(hi - offset, e - s)
        if a < b:
            out.append((s + a, s + b))
        offset += e - s
    return tuple(out)


def build(doc_lens, mesh, *, causal, window, backend, ulysses_degree: int | None = None,
          num_kv_heads: int | None = None) -> USPPlan:
    if num_kv_heads is not None and (isinstance(num_kv_heads, bool) or not isinstance(num_kv_heads, int)
                                     or num_kv_heads < 1):
        raise ValueError(f"num_kv_heads must be a positive int (the model's KV heads), got {num_kv_heads!r}")
    u_deg, r_deg, coords, ulysses_group, ring_group = _layout(mesh, ulysses_degree, num_kv_heads)
    ring_rank = None if mesh.is_dry else coords[mesh.rank][1]
    bounds, owner, slot = zigzag_ranges(doc_lens, r_deg)
    ring = build_ring_plan("zigzag", bounds, owner, doc_lens, MeshInfo(world_size=r_deg, rank=ring_rank,
                                                                        group=ring_group),
                           causal=causal, window=window, backend=backend, range_slot=slot)
    owned = []
    for u, r in coords:
        cuts = even_bounds(ring.num_tokens(r), u_deg)
        owned.append(_cut(ring.owned[r], int(cuts[u]), int(cuts[u + 1])))
    return USPPlan(scheduler="usp", doc_lens=doc_lens, causal=causal, window=window, backend=backend,
                   world_size=mesh.world_size, rank=mesh.rank, group=mesh.group, owned=tuple(owned),
                   ulysses_degree=u_deg, coords=coords, ring=ring, num_kv_heads=num_kv_heads,
                   ulysses_comm=Comm(ulysses_group) if ulysses_group is not None else None)
