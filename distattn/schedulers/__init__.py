"""The scheduler registry: one entry per scheduler, and everything the rest of the library needs to
know about one.

``distattn.plan``, the CLI's choices, the bench, the simulator, the trainer, its memory estimate and
the adapters read :data:`REGISTRY` instead of branching on scheduler names (``tests/test_layers.py``
checks that no code outside this package compares a scheduler's name). Importing this module imports
neither torch nor numpy, so ``--help`` stays fast.

Each entry names its planner's module (``build(doc_lens, mesh, *, causal, window, mask, shards,
**options)`` returns a :class:`~distattn.planning.schedule.Schedule`, a pure function of the document lengths,
the token ownership, the mesh shape and the options), its default layout, its executor, and the facts
callers ask about: how many ranks split its heads, whether it can pool several CP groups, whether only
K/V travel. Callers never work out a scheduler's options: they describe the job
(:class:`PlanContext`) and the planner's module derives its own (``derive``, ``head_split``). What it holds in memory is the schedule's
(:meth:`~distattn.planning.schedule.Schedule.saved_bytes`, :meth:`~distattn.planning.schedule.Schedule.buffer_bytes`).

Adding a scheduler
------------------
Two files, when an executor of :data:`distattn.executors.EXECUTORS` can run its schedules:

1. ``distattn/schedulers/<name>.py``, the planner: ``build(doc_lens, mesh, *, causal, window, mask,
   shards, **options)`` returning a :class:`~distattn.planning.schedule.Schedule` whose ``scheduler`` is
   ``<name>`` (a subclass of its own, or the type the chosen executor runs); ``build``'s keywords
   beyond :data:`PLANNER_ARGUMENTS` are the scheduler's options. Where its entry says so, also
   ``own_shards(doc_lens, mesh, **options)`` (``layout=None``: the planner lays tokens out itself),
   ``derive(world_size, context, options, two_d)`` (options from a :class:`PlanContext`) and
   ``head_split(world_size, options)`` (ranks that split a query head set).
2. One ``SchedulerSpec(...)`` in :data:`REGISTRY` below: the name, a summary, the default layout,
   ``module=`` if the file has another name, ``executor=`` and the facts the rest of the library
   asks (``pools``, ``moves_kv_only``, ``nano_batches``, ``mesh_2d``).

Nothing else changes: ``distattn.plan``/``attention``, the CLI's ``--scheduler`` choices, the
trainer's config, the bench and the simulator (which replays the schedule's ``program``) read the
registry. A new communication pattern adds a third and fourth: ``distattn/executors/<pattern>.py``
(an :class:`~distattn.executors.base.Executor` running the schedule's ``program`` in order) and its
line in ``EXECUTORS`` (``distattn/executors/__init__.py``). ``tests/test_add_scheduler.py`` follows
steps 1 and 2 for a toy and checks it exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from importlib import import_module
from typing import Callable


@dataclass(frozen=True)
class PlanContext:
    """What planners derive their options from: the attention's head shape and the job around it.

    ``distattn.plan(..., context=PlanContext(num_heads=32, num_kv_heads=8))``: each scheduler's planner
    takes what it needs (``usp``: its Ulysses degree, ``ulysses_degree`` or else the largest divisor of
    the CP size that divides the KV heads and fits in a node of ``gpus_per_node``; ``ulysses``/``usp``:
    ``head_groups``;
    ``cad``: its cost model -- the tile model of the kernel on ``gpu``, or ``kernel`` itself -- from
    the head shape and ``dtype_bytes``, and ``network``), so every caller plans one job alike. Options
    passed to ``distattn.plan`` by name win over what a planner derives."""

    num_heads: int | None = None        # query heads of the attention (None: not known)
    num_kv_heads: int | None = None     # K/V heads (GQA/MQA: fewer than num_heads)
    head_groups: int = 1                # query heads moved and computed 1/head_groups at a time (ulysses, usp)
    head_dim: int = 128
    dtype_bytes: int = 2                # of q, k, v (2: bf16/fp16)
    gpus_per_node: int | None = None    # ranks on fast links (usp keeps its Ulysses axis inside them)
    ulysses_degree: int | None = None   # where a scheduler splits heads on an axis of the CP group (usp): its size
    peak_tflops: float | None = None    # the GPU's dense bf16 peak (None: an H100's)
    network: object = None              # a costmodel.network.NetworkProfile (None: NVLink in 8, InfiniBand across)
    gpu: str | None = None              # the GPU the job runs on (costmodel.model_shape.GPUS; None: an H100)
    kernel: object = None               # a distattn.costmodel.tiles.TileModel of its kernel (None: gpu's, kernel_speed)

    def __post_init__(self):
        for name in ("num_heads", "num_kv_heads", "gpus_per_node", "ulysses_degree"):
            _check_positive(name, getattr(self, name), optional=True)
        for name in ("head_groups", "head_dim", "dtype_bytes"):
            _check_positive(name, getattr(self, name))


def _check_positive(name: str, value, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"PlanContext.{name} must be a positive int{' or None' if optional else ''}, got {value!r}")


@dataclass(frozen=True)
class SchedulerSpec:
    name: str
    summary: str
    layout: str | None = "contiguous"   # default token layout; None: the planner's own (usp's 2-D split)
    module: str = ""                     # the planner's module (default: ``name``; zigzag is ring's)
    executor: str = "ring_p2p"           # the executor that runs its schedules (``distattn.executors.EXECUTORS``)
    pools: bool = False                  # balances the attention of several CP groups at once (``pool=``)
    moves_kv_only: bool = False          # only K/V (and dK/dV) travel; queries stay on their rank
    # nano-batches a micro-batch is cut into (distattn.runtime.pingpong) where nothing prices the choice: the
    # adapters, and the simulator without --sweep. The trainer takes the count the simulator prices
    # faster for its run (distattn/train/nano_default.py); --sweep tries both
    nano_batches: int = 1
    # plans on a 2-D ("ulysses", "ring") mesh whose "ulysses" axis is its head split (usp); the
    # trainer builds that mesh, the API reads a 2-D DeviceMesh's axes instead of deriving a degree
    mesh_2d: bool = False
    # its kernel calls follow the layout's runs (so a strided layout is planned in its ranks' order,
    # distattn.planning.strided); False: it gathers the whole sequence in order first (ulysses)
    follows_runs: bool = True

    def _module(self):
        return import_module(f"{__name__}.{self.module or self.name}")

    def planner(self) -> Callable:
        return self._module().build

    def own_shards(self, doc_lens, mesh, **options):
        """The layout of ``doc_lens`` on ``mesh`` (a :class:`~distattn.distributed.mesh.MeshInfo`) that a planner
        with no default ``layout`` makes itself: its module's ``own_shards(doc_lens, mesh, **options)``."""
        assert self.layout is None, f"{self.name}'s own layout is {self.layout!r}"
        return self._module().own_shards(doc_lens, mesh, **options)

    def option_names(self) -> tuple[str, ...]:
        """The options its planner takes (keywords of ``build`` beyond what ``distattn.plan`` passes
        itself), e.g. cad's ``pool``, ``epsilon``, ``cost``, ``network``, ``overlap_s``."""
        import inspect

        params = inspect.signature(self.planner()).parameters
        return tuple(sorted(set(params) - set(PLANNER_ARGUMENTS)))

    def taken(self, options: dict) -> dict:
        """Of ``options``, those its planner takes (:meth:`option_names`): a caller's option for the
        schedulers that have it, passed to whichever scheduler it plans with."""
        names = self.option_names()
        return {k: v for k, v in options.items() if k in names}

    def check_options(self, options: dict) -> None:
        """``ValueError`` naming the options its planner does not take."""
        unknown = sorted(set(options) - set(self.option_names()))
        if unknown:
            raise ValueError(f"unexpected option(s) {unknown} for scheduler={self.name!r}; "
                             f"it accepts {list(self.option_names())}")

    def derive(self, world_size: int, context: PlanContext | None, options: dict, two_d: bool = False) -> dict:
        """``options`` completed with what the planner derives from ``context`` on a CP group of
        ``world_size`` ranks (``two_d``: a 2-D mesh, whose axes fix a head split): its module's
        ``derive(world_size, context, options, two_d)``; options given by name win."""
        make = getattr(self._module(), "derive", None)
        if make is None or context is None:
            return dict(options)
        return {**make(world_size, context, options, two_d), **{k: v for k, v in options.items() if v is not None}}

    def head_split(self, world_size: int, context: PlanContext | None = None, **options) -> int:
        """Ranks each query head set is split over (``ulysses``: all; ``usp``: its Ulysses degree; else 1):
        a model needs at least this many query heads."""
        split = getattr(self._module(), "head_split", None)
        if split is None or world_size == 1:
            return 1
        return split(world_size, self.derive(world_size, context, options))

    def ulysses_axis(self, world_size: int, context: PlanContext | None = None, **options) -> int:
        """The ``"ulysses"`` axis of the 2-D CP mesh this scheduler plans on (1: a 1-D CP mesh)."""
        return self.head_split(world_size, context, **options) if self.mesh_2d else 1

    def nano_batches_for(self, requested: int | None = None, key: str = "nano_batches") -> int:
        """Nano-batches a micro-batch is cut into (:mod:`distattn.runtime.pingpong`): ``requested`` (1 or 2),
        or None for this scheduler's default (``nano_batches``: 2 for cad). ``key``: the caller's
        name of the argument, which the ``ValueError`` for anything else names."""
        if requested is None:
            return self.nano_batches
        if isinstance(requested, bool) or requested not in (1, 2):
            # both phrasings are pinned: the trainer's "must be 1 or 2", the adapter's "is not supported"
            raise ValueError(f"{key} must be 1 or 2: {key}={requested!r} is not supported; choose 1, 2 "
                             f"(nano-batches per micro-batch, ping-ponged through the layers) or None (unset: "
                             f"{self.name}'s default, {self.nano_batches})")
        return requested


# what distattn.plan passes every planner itself (the rest of build's keywords are options)
PLANNER_ARGUMENTS = ("doc_lens", "mesh", "shards", "scheduler", "comm_dtype", "causal", "window", "mask")


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
    SchedulerSpec("allgather", "zigzag chunks, K/V all-gathered", "zigzag", executor="gather", moves_kv_only=True),
    SchedulerSpec("ulysses", "contiguous shards, heads all-to-all", executor="heads", follows_runs=False),
    SchedulerSpec("usp", "Ulysses all-to-all inside groups, zigzag ring across them", None, executor="usp",
                  mesh_2d=True),
    SchedulerSpec("cad", "contiguous shards, attention tasks balanced over all ranks", executor="tasks", pools=True,
                  nano_batches=2),
)}
NAMES: tuple[str, ...] = tuple(REGISTRY)
# world size 1: every scheduler is this one (``scheduler="local"`` asks for it by name)
LOCAL = SchedulerSpec("local", "one rank: one kernel call over the whole sequence", executor="local")


def spec(name: str) -> SchedulerSpec:
    """The registry entry of ``name`` (``"local"`` included); ``ValueError`` naming the choices."""
    if name == LOCAL.name:
        return LOCAL
    if name not in REGISTRY:
        raise ValueError(f"scheduler={name!r} is unknown; choose one of {[*NAMES, LOCAL.name]}")
    return REGISTRY[name]
