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

Any other layout (:mod:`distattn.planning.layout`) works too: ring rank ``r`` then holds the union of its
Ulysses ranks' tokens, the ring runs on those, and when the all-to-all's concatenation (member
after member) is not the union in global order, the head shards are permuted once after it and
once before the way back (:meth:`USPSchedule.gather_order`).

The mesh: a 2-D ``DeviceMesh`` whose axes are named ``"ulysses"`` and
``"ring"`` (in either order; :func:`distattn.distributed.mesh.usp_mesh` builds one with
Ulysses on consecutive ranks), or a 1-D group/mesh (or a dry world size) plus
the degree. Then group rank ``i`` is ``(u, r) = (i % U, i // U)``, and the
first plan on a group creates the two sub-groups it needs (the executor,
:class:`distattn.executors.head_a2a.HeadExecutor` around a
:class:`~distattn.executors.ring_p2p.RingExecutor`); later plans on the same
group find them again (:func:`distattn.distributed.comm.subgroups`), so a plan per
training step creates nothing. Creating them waits at most the group's
timeout and names a rank that never came.

The degree, with a 1-D mesh (:func:`ulysses_degree_for`, the one rule every caller uses):
``ulysses_degree=U`` (a divisor of the world size), or ``num_kv_heads=H`` and the default
:func:`default_ulysses_degree`, the largest divisor of the world size that divides ``H``
(``gcd(P, H)``), so that Ulysses splits whole KV heads and never replicates one. The plan fixes
token ownership, which depends on ``U``, before it sees a tensor: that is why
the head count is a plan option and not read at the first attention. Given
both, ``ulysses_degree`` wins; attention then refuses K/V with another head
count than ``num_kv_heads``. Given neither, ``ValueError``.
(``distattn.plan(..., context=PlanContext(num_heads, num_kv_heads))`` derives both for a model.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from ..planning.layout import Layout, Shards, even_bounds
from ..planning.masks import MaskSlice
from ..planning.program import Program
from ..planning.schedule import AttnShape, Phase, Schedule
from . import default_ulysses_degree
from .ring import RingSchedule, ring_schedule
from .ulysses import (HeadLayout, check_head_groups, gathered_order, head_exchange_program, head_grad_bytes,
                      head_parts, head_saved_bytes)

__all__ = ["USPSchedule", "build", "default_ulysses_degree", "ulysses_degree_for"]


def ulysses_degree_for(world_size: int, ulysses_degree: int | None = None, num_kv_heads: int | None = None,
                       gpus_per_node: int | None = None) -> int:
    """usp's Ulysses degree on a 1-D group of ``world_size`` ranks: ``ulysses_degree`` when given (a
    2-D mesh's axis fixes it instead), else :func:`default_ulysses_degree` of the KV heads and the
    GPUs per node. Planning (:func:`build`), deriving from a context (:func:`derive`) and sizing a
    model's head split (:func:`head_split`) all ask here, so they agree."""
    if ulysses_degree is not None:
        return ulysses_degree
    return default_ulysses_degree(world_size, num_kv_heads, gpus_per_node)


@dataclass(frozen=True, eq=False, kw_only=True)
class USPSchedule(Schedule):
    ulysses_degree: int
    coords: tuple[tuple[int, int], ...]          # flat group rank -> (u, r)
    ring: RingSchedule = field(repr=False)       # the ring over the R ring ranks' tokens
    num_kv_heads: int | None = None              # the head count the plan was made for, if given
    head_groups: int = 1                         # query heads moved 1/head_groups of a share at a time (ulysses)
    keeps_local_out = False                      # it keeps head shards of its ring rank's tokens

    def check_heads(self, num_heads: int, num_kv_heads: int) -> None:
        if self.num_kv_heads is not None and num_kv_heads != self.num_kv_heads:
            raise ValueError(f"k and v have {num_kv_heads} heads but this usp plan was made with "
                             f"num_kv_heads={self.num_kv_heads}: pass the model's KV head count to distattn.plan")

    def kernel_heads(self, shape: AttnShape) -> float:
        """A share of the heads per rank (its Ulysses group splits them), in ``head_groups`` calls."""
        return shape.num_heads / self.ulysses_degree / self.head_groups

    def members(self, ring_rank: int) -> tuple[int, ...]:
        """Token counts of the Ulysses ranks u = 0..U-1 holding ring rank ``ring_rank``'s tokens."""
        return tuple(self.num_tokens(int(i)) for i in self.flat[ring_rank])

    def gather_order(self, ring_rank: int) -> np.ndarray | None:
        """The head all-to-all's rows of ring rank ``ring_rank`` in its ring order (None: already)."""
        return gathered_order(self.shards, self.flat[ring_rank].tolist())

    def compute_slices(self, rank: int) -> list[MaskSlice]:
        return self.ring.compute_slices(self.coords[rank][1])  # the ring rank's pairs, a share of the heads

    def visible_pairs(self, rank: int) -> int:
        return self.ring.visible_pairs(self.coords[rank][1])

    def kernel_segments(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Each rank runs its ring rank's segments (on its share of the heads)."""
        ring_rank, q_len, area, k_len = self.ring.kernel_segments()
        u = self.ulysses_degree
        return self.flat[ring_rank].ravel(), np.repeat(q_len, u), np.repeat(area, u), np.repeat(k_len, u)

    @cached_property
    def flat(self) -> np.ndarray:
        """``[R, U]``: the flat rank of ``(u, r)``."""
        flat = np.zeros((self.ring.world_size, self.ulysses_degree), dtype=np.int64)
        for i, (u, r) in enumerate(self.coords):
            flat[r, u] = i
        return flat

    def program(self, shape: AttnShape) -> Program:
        """Ulysses all-to-alls around the zigzag ring (:func:`head_exchange_program`); per head group,
        each Ulysses rank ``u`` runs the ring on its query heads of the group (its KV heads expanded to
        one per query head where GQA grouping needs it)."""
        u_deg, flat = self.ulysses_degree, self.flat
        parts = head_parts(shape, u_deg, self.head_groups)

        def inner(g):   # the U rings (the same instructions; each on its ranks, with its heads), as one
            rings = [self.ring.program(shape, q, kv) for q, kv in parts[g]]
            return Program(tuple(_flat_phase(phases, flat) for phases in zip(*(r.phases for r in rings))),
                           rings[0].stages)
        tokens = np.asarray([self.members(r) for r in range(self.ring.world_size)], dtype=np.int64)
        return head_exchange_program(shape, tokens, flat, u_deg, self.head_groups, inner, "usp ulysses")

    def saved_bytes(self, shape: AttnShape) -> np.ndarray:
        """The head-sharded q, k, v, out and lse of the ring rank's tokens."""
        return head_saved_bytes(shape, [(self.ring.num_tokens(r), u) for u, r in self.coords], self.ulysses_degree)

    def grad_bytes(self, shape: AttnShape) -> np.ndarray:
        return head_grad_bytes(shape, [(self.ring.num_tokens(r), u) for u, r in self.coords], self.ulysses_degree,
                               self.head_groups)

    def buffer_bytes(self, shape: AttnShape) -> np.ndarray:
        """The ring's K/V blocks for one head group's KV heads, and its head shard of dout (q, k, v,
        out: saved; ``head_groups``)."""
        layout = HeadLayout.build(shape.num_heads, shape.num_kv_heads, self.ulysses_degree)
        group, g = shape.num_heads // shape.num_kv_heads, self.head_groups
        ring = self.ring.buffer_bytes(shape)
        out = np.zeros(self.world_size)
        for i, (u, r) in enumerate(self.coords):
            heads = -(-layout.computed_kv_heads(u, group) // g)
            out[i] = ring[r] * heads / shape.num_kv_heads + \
                self.ring.num_tokens(r) * shape.row_bytes(-(-layout.share(u) // g))
        return out


def _flat_phase(phases, flat: np.ndarray) -> Phase:
    """One phase of each of the U rings (ring ``u`` on the flat ranks ``flat[:, u]``), as one."""
    def cat(get):
        return np.concatenate([get(ph, u) for u, ph in enumerate(phases)])
    first = phases[0]
    links = None if first.links is None else (cat(lambda ph, u: ph.links[0]), cat(lambda ph, u: flat[ph.links[1], u]),
                                              cat(lambda ph, u: flat[ph.links[2], u]))
    return Phase(first.direction, first.op, f"usp ring: {first.what}", first.span, cat(lambda ph, u: flat[ph.rank, u]),
                 cat(lambda ph, u: ph.amount), cat(lambda ph, u: ph.steps), links=links)


def _degree(p: int, ulysses_degree, num_kv_heads) -> int:
    """U for a 1-D group of ``p`` ranks (:func:`ulysses_degree_for`), checked: a plan refuses a degree
    that does not divide ``p``, and a default without the KV heads (a near-square guess could split
    one)."""
    if ulysses_degree is None and num_kv_heads is None:
        raise ValueError("scheduler='usp' needs a 2-D DeviceMesh with axes ('ulysses', 'ring'), or a 1-D "
                         "group/mesh (or a dry world size) plus ulysses_degree=U or num_kv_heads=H (then "
                         "ulysses_degree defaults to the largest divisor of the world size that divides H)")
    if ulysses_degree is not None and (isinstance(ulysses_degree, bool) or not isinstance(ulysses_degree, int)
                                       or ulysses_degree < 1 or p % ulysses_degree):
        divisors = [d for d in range(1, p + 1) if p % d == 0]
        raise ValueError(f"ulysses_degree must divide the world size {p}: one of {divisors}, got {ulysses_degree!r}")
    return ulysses_degree_for(p, ulysses_degree, num_kv_heads)


def _cut(ranges, lo: int, hi: int):
    """Global ranges of local positions ``[lo, hi)`` of a token list made of ``ranges``."""
    out, offset = [], 0
    for s, e in ranges:
        a, b = max(lo - offset, 0), min(hi - offset, e - s)
        if a < b:
            out.append((s + a, s + b))
        offset += e - s
    return tuple(out)


def _coords(mesh, ulysses_degree, num_kv_heads) -> tuple[int, tuple[tuple[int, int], ...]]:
    """(U, (u, r) per flat rank) from the mesh argument (its axes only: no process group is made)."""
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
        return size_u, tuple(zip(index[names.index("ulysses")].tolist(), index[names.index("ring")].tolist()))
    if dm is not None and dm.ndim > 2:
        raise ValueError(f"scheduler='usp' takes a 1-D or 2-D mesh, got {dm.ndim} axes")
    u_deg = _degree(mesh.world_size, ulysses_degree, num_kv_heads)
    return u_deg, tuple((i % u_deg, i // u_deg) for i in range(mesh.world_size))


def own_shards(doc_lens, mesh, *, ulysses_degree: int | None = None, num_kv_heads: int | None = None,
               **_) -> Shards:
    """usp's own layout (module docstring): zigzag over the ring ranks, each ring rank's tokens split
    evenly over its Ulysses ranks; each piece keeps its zigzag chunk's slot."""
    u_deg, coords = _coords(mesh, ulysses_degree, num_kv_heads)
    ring = Layout("zigzag").shards(doc_lens, mesh.world_size // u_deg)
    pieces = []
    for rank, (u, r) in enumerate(coords):
        cuts = even_bounds(ring.num_tokens(r), u_deg)
        pieces += [(s, e, rank) for s, e in _cut(ring.owned[r], int(cuts[u]), int(cuts[u + 1]))]
    pieces.sort()
    starts = np.asarray([s for s, _, _ in pieces], dtype=np.int64)
    slot = ring.slot[np.searchsorted(ring.bounds, starts, side="right") - 1]
    return Shards.from_bounds(np.append(starts, sum(doc_lens)), np.asarray([o for *_, o in pieces]),
                              mesh.world_size, slot)


def build(doc_lens, mesh, *, causal, window, mask, shards: Shards | None = None, ulysses_degree: int | None = None,
          num_kv_heads: int | None = None, head_groups: int = 1) -> USPSchedule:
    """``shards``: the layout (None: usp's own, see module docstring)."""
    if num_kv_heads is not None and (isinstance(num_kv_heads, bool) or not isinstance(num_kv_heads, int)
                                     or num_kv_heads < 1):
        raise ValueError(f"num_kv_heads must be a positive int (the model's KV heads), got {num_kv_heads!r}")
    u_deg, coords = _coords(mesh, ulysses_degree, num_kv_heads)
    r_deg = mesh.world_size // u_deg
    if shards is None:
        shards = own_shards(doc_lens, mesh, ulysses_degree=ulysses_degree, num_kv_heads=num_kv_heads)
    ring_shards = shards.regroup(np.asarray([r for _, r in coords]), r_deg)
    ring = ring_schedule("zigzag", ring_shards, doc_lens, causal=causal, window=window, mask=mask,
                         span=mesh.world_size)
    return USPSchedule(scheduler="usp", doc_lens=doc_lens, causal=causal, window=window, world_size=mesh.world_size,
                       shards=shards, mask=mask, ulysses_degree=u_deg, coords=coords, ring=ring,
                       num_kv_heads=num_kv_heads, head_groups=check_head_groups(head_groups))


def derive(world_size: int, context, options: dict, two_d: bool = False) -> dict:
    """What usp takes from a :class:`~distattn.schedulers.PlanContext`: the KV head count (its plans
    then refuse other K/V heads), ``head_groups``, and -- on a 1-D group, unless given -- its Ulysses
    degree (:func:`ulysses_degree_for` of the context's; a 2-D mesh's axis fixes it)."""
    if world_size == 1:   # nothing to split
        return {}
    out = {"head_groups": context.head_groups} if context.head_groups > 1 else {}
    kv = options.get("num_kv_heads") or context.num_kv_heads
    if kv is not None:
        out["num_kv_heads"] = kv
    if not two_d and options.get("ulysses_degree") is None:
        out["ulysses_degree"] = ulysses_degree_for(world_size, context.ulysses_degree, kv, context.gpus_per_node)
    return out


def head_split(world_size: int, options: dict) -> int:
    """The Ulysses degree: given (or derived from a context), else the default of the KV heads (without
    them, a near-square mesh: what a context without KV heads plans; ``build`` alone refuses it)."""
    return ulysses_degree_for(world_size, options.get("ulysses_degree"), options.get("num_kv_heads"))
