"""The scheduler registry: one entry per scheduler, and everything the rest of the library needs to
know about one.

``distattn.plan``, the CLI's choices, the bench, the simulator, the trainer, its memory estimate and
the adapters read :data:`REGISTRY` instead of branching on scheduler names (``tests/test_layers.py``
checks that no code outside this package compares a scheduler's name). Importing this module imports
neither torch nor numpy, so ``--help`` stays fast.

Each entry names its planner's module (``build(doc_lens, mesh, *, causal, window, mask, shards,
**options)`` returns a :class:`~distattn.schedule.Schedule`, a pure function of the document lengths,
the token ownership, the mesh shape and the options), its default layout, and the facts callers ask
about: how it splits heads (a Ulysses axis, and the default degree), whether it can pool several CP
groups, whether only K/V travel. What it holds in memory is the schedule's
(:meth:`~distattn.schedule.Schedule.saved_bytes`, :meth:`~distattn.schedule.Schedule.buffer_bytes`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from importlib import import_module
from typing import Callable

HEADS = ("none", "world", "axis")


@dataclass(frozen=True)
class SchedulerSpec:
    name: str
    summary: str
    layout: str | None = "contiguous"   # default token layout; None: the planner's own (usp's 2-D split)
    module: str = ""                     # the planner's module (default: ``name``; zigzag is ring's)
    heads: str = "none"                  # query heads split over "none", the "world" (ulysses), or an "axis" (usp)
    pools: bool = False                  # balances the attention of several CP groups at once (``pool=``)
    moves_kv_only: bool = False          # only K/V (and dK/dV) travel; queries stay on their rank
    # nano-batches a micro-batch is cut into by default (distattn.pingpong): 2 where the executor has
    # stages whose transfers the other nano-batch's compute hides (cad), else 1
    nano_batches: int = 1

    def __post_init__(self):
        assert self.heads in HEADS, self.heads

    def planner(self) -> Callable:
        return import_module(f"{__name__}.{self.module or self.name}").build

    def own_shards(self, doc_lens, mesh, **options):
        """The layout of ``doc_lens`` on ``mesh`` (a :class:`~distattn.mesh.MeshInfo`) that a planner
        with no default ``layout`` makes itself: its module's ``own_shards(doc_lens, mesh, **options)``."""
        assert self.layout is None, f"{self.name}'s own layout is {self.layout!r}"
        return import_module(f"{__name__}.{self.module or self.name}").own_shards(doc_lens, mesh, **options)

    def accepts(self, option: str) -> bool:
        """The planner takes keyword ``option`` (e.g. cad's ``cost``, ``network``, ``overlap_s``)."""
        import inspect

        return option in inspect.signature(self.planner()).parameters

    def job_options(self, **job) -> dict:
        """The options the planner takes that describe the job it plans for, made by the planner's
        module (``planner_options(**job)``: cad's cost model and network; the keywords are its), so
        that every caller plans one job alike; ``{}`` for planners that need none."""
        make = getattr(import_module(f"{__name__}.{self.module or self.name}"), "planner_options", None)
        return {} if make is None else make(**job)

    def ulysses_degree(self, world_size: int, num_kv_heads: int | None = None, requested: int | None = None,
                       gpus_per_node: int | None = None) -> int:
        """Ranks the query heads are split over: every rank (``ulysses``), the Ulysses axis
        (``usp``: ``requested``, else :func:`default_ulysses_degree`), or 1."""
        if self.heads == "world":
            return world_size
        if self.heads == "axis" and world_size > 1:
            return requested or default_ulysses_degree(world_size, num_kv_heads, gpus_per_node)
        return 1

    def mesh_ulysses(self, world_size: int, num_kv_heads: int | None = None, requested: int | None = None,
                     gpus_per_node: int | None = None) -> int:
        """The Ulysses axis of the CP mesh this scheduler plans on (1: a 1-D CP mesh)."""
        return self.ulysses_degree(world_size, num_kv_heads, requested, gpus_per_node) if self.heads == "axis" else 1

    def plan_options(self, world_size: int, num_kv_heads: int | None = None, requested: int | None = None,
                     gpus_per_node: int | None = None, head_groups: int = 1) -> dict:
        """The options ``distattn.plan`` needs for a model with ``num_kv_heads`` KV heads on a 1-D CP
        group of ``world_size`` (usp: its Ulysses degree, and the head count it was made for;
        ulysses and usp: ``head_groups`` when more than one)."""
        groups = self.head_group_options(world_size, head_groups)
        if self.heads != "axis" or world_size == 1:
            return groups
        degree = self.ulysses_degree(world_size, num_kv_heads, requested, gpus_per_node)
        return {"ulysses_degree": degree, **({"num_kv_heads": num_kv_heads} if num_kv_heads is not None else {}),
                **groups}

    def head_group_options(self, world_size: int, head_groups: int) -> dict:
        """``{"head_groups": head_groups}`` where the plan takes it (heads split over ranks, more than
        one rank, more than one group), else ``{}``."""
        return {"head_groups": head_groups} if head_groups > 1 and self.heads != "none" and world_size > 1 else {}


def default_ulysses_degree(world_size: int, num_kv_heads: int | None = None, gpus_per_node: int | None = None) -> int:
    """usp's Ulysses degree when none is given: the largest divisor of the CP size ``world_size`` that
    divides ``num_kv_heads`` (so Ulysses splits whole KV heads) and, given ``gpus_per_node``, fits in
    a node (Ulysses' all-to-alls on the fast links).

    Without ``num_kv_heads`` (callers that do not know the model): the largest divisor up to the
    square root, a near-square mesh, which may not divide the KV heads -- pass them.
    """
    for name, value in (("world_size", world_size), ("num_kv_heads", num_kv_heads), ("gpus_per_node", gpus_per_node)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if num_kv_heads is None:
        return max(d for d in range(1, math.isqrt(world_size) + 1) if world_size % d == 0)
    both = math.gcd(world_size, num_kv_heads)
    return max(d for d in range(1, both + 1) if both % d == 0 and (gpus_per_node is None or d <= gpus_per_node))


REGISTRY: dict[str, SchedulerSpec] = {spec.name: spec for spec in (
    SchedulerSpec("ring", "contiguous shards, K/V passed around the ring", moves_kv_only=True),
    SchedulerSpec("zigzag", "the ring on chunks r and 2P-1-r", "zigzag", module="ring", moves_kv_only=True),
    SchedulerSpec("allgather", "zigzag chunks, K/V all-gathered", "zigzag", moves_kv_only=True),
    SchedulerSpec("ulysses", "contiguous shards, heads all-to-all", heads="world"),
    SchedulerSpec("usp", "Ulysses all-to-all inside groups, zigzag ring across them", None, heads="axis"),
    SchedulerSpec("cad", "contiguous shards, attention tasks balanced over all ranks", pools=True, nano_batches=2),
)}
NAMES: tuple[str, ...] = tuple(REGISTRY)
# world size 1: every scheduler is this one (``scheduler="local"`` asks for it by name)
LOCAL = SchedulerSpec("local", "one rank: one kernel call over the whole sequence")


def spec(name: str) -> SchedulerSpec:
    """The registry entry of ``name`` (``"local"`` included); ``ValueError`` naming the choices."""
    if name == LOCAL.name:
        return LOCAL
    if name not in REGISTRY:
        raise ValueError(f"scheduler={name!r} is unknown; choose one of {[*NAMES, LOCAL.name]}")
    return REGISTRY[name]
