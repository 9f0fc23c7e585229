"""Meshes: the job's process groups, made in one place, and the ``mesh`` argument of :func:`distattn.plan`.

:func:`resolve_mesh` turns the ``mesh`` argument into one explicit description (:class:`MeshInfo`).

``mesh`` may be a 1-D ``DeviceMesh``, a 2-D ``DeviceMesh`` (for ``usp``), a
``ProcessGroup``, ``1`` (one device, no process group: a plan that runs), or an
``int`` world size above 1 for a dry plan. Groups are always
passed explicitly; nothing here keeps a module-level group.

Making groups must not hang past the collective timeout either. torch gives a
new group 30 minutes by default, whatever ``init_process_group(timeout=)``
said, and a gloo group connects to its peers when made. So :func:`init_mesh`
(and :func:`usp_mesh`) first let the ranks meet through the store (naming any
that never come within the default group's timeout) and give every group of
the mesh that timeout; a multi-axis mesh is flattened the same way.

The job's meshes come from one place, :class:`ParallelDims` (dp x cp, and the
Ulysses degree inside cp for ``usp``), in the style of torchtitan's
``ParallelDims``: the trainer, the bench (:func:`usp_mesh`) and DeepSpeed's
``SequenceParallelMPU.from_world`` all build through it. Its groups are made
once per process and found again by later builds and plans, so building twice
or planning every step creates no process group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from .comm import meet, subgroups
from ..planning.masks import check_positive_ints

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh


@dataclass(frozen=True)
class MeshInfo:
    world_size: int
    rank: int | None                      # None: dry plan
    group: Any = field(default=None, repr=False)        # ProcessGroup over all ranks of the mesh
    device_mesh: Any = field(default=None, repr=False)  # the DeviceMesh when one was given
    device: torch.device | None = None    # where this rank's tensors live (None: dry)

    @property
    def is_dry(self) -> bool:
        return self.rank is None

    def global_ranks(self) -> tuple[int, ...]:
        """The global rank of each mesh rank (a dry mesh: ``0..P-1``); with ``gpus_per_node`` they
        say which ranks share a node."""
        if self.is_dry or self.group is None or self.group is dist.group.WORLD:
            return tuple(range(self.world_size))
        return tuple(dist.get_process_group_ranks(self.group))


def _device_of(device_type: str) -> torch.device:
    if device_type == "cuda" and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(device_type if device_type != "cuda" else "cpu")


def group_device(group) -> torch.device:
    """The device a process group's tensors live on: the current CUDA device under NCCL, else CPU."""
    try:
        backend = dist.get_backend(group)
    except (RuntimeError, ValueError):
        backend = "gloo"
    return _device_of("cuda" if "nccl" in str(backend) else "cpu")


def resolve_mesh(mesh) -> MeshInfo:
    """Describe ``mesh`` (see module docstring); ``ValueError`` for anything else. A :class:`MeshInfo`
    passes as it is (:func:`distattn.runtime.api.dry_plan`'s dry world of any size)."""
    if isinstance(mesh, MeshInfo):
        return mesh
    if isinstance(mesh, bool):
        raise ValueError("mesh must be a DeviceMesh, a ProcessGroup or an int world size, got a bool")
    if isinstance(mesh, int):
        if mesh < 1:
            raise ValueError(f"mesh as an int is a world size (1: one device; more: a dry plan) and must be >= 1, "
                             f"got {mesh}")
        if mesh == 1:   # one device needs no process group: a live plan, its one rank computes alone
            return MeshInfo(world_size=1, rank=0, device=_device_of("cuda"))
        return MeshInfo(world_size=mesh, rank=None)
    if isinstance(mesh, dist.ProcessGroup):
        return MeshInfo(world_size=mesh.size(), rank=dist.get_rank(mesh), group=mesh, device=group_device(mesh))
    try:
        from torch.distributed.device_mesh import DeviceMesh
    except ImportError:  # pragma: no cover - torch without distributed
        DeviceMesh = ()
    if DeviceMesh and isinstance(mesh, DeviceMesh):
        if mesh.ndim == 1:
            return MeshInfo(world_size=mesh.size(), rank=mesh.get_local_rank(), group=mesh.get_group(),
                            device_mesh=mesh, device=_device_of(mesh.device_type))
        # Multi-axis meshes are flattened to one group; schedulers that use the axes
        # (usp) read them from device_mesh.
        group = _flat_group(mesh)
        return MeshInfo(world_size=mesh.size(), rank=dist.get_rank(group), group=group, device_mesh=mesh,
                        device=_device_of(mesh.device_type))
    if mesh is None:
        raise ValueError("mesh is None: pass a DeviceMesh, a ProcessGroup (e.g. torch.distributed.group.WORLD) "
                         "or an int world size for a dry plan")
    raise ValueError(f"mesh must be a DeviceMesh, a ProcessGroup or an int world size, got {type(mesh).__name__}")


def _flat_group(mesh):
    """One group over every rank of a multi-axis mesh, in the mesh's row-major order."""
    ranks = mesh.mesh.flatten().tolist()
    if ranks == list(range(dist.get_world_size())):
        return dist.group.WORLD  # what torch's own flattening gives too
    if ranks == sorted(ranks):
        # Made once (later plans find it), after the world's ranks meet: every rank flattens
        # its own mesh at the same time, as torch's _flatten also requires.
        (group,) = subgroups(dist.group.WORLD, [ranks], "flatten", "flattening the DeviceMesh for distattn.plan")
        return group
    if not hasattr(mesh, "_flatten"):
        raise ValueError("this torch cannot flatten a multi-axis DeviceMesh; pass a ProcessGroup")
    return mesh._flatten().get_group()  # an unusual rank order: torch's flattening keeps it


def init_mesh(device_type: str, mesh_shape: tuple[int, ...], mesh_dim_names: tuple[str, ...]) -> DeviceMesh:
    """A ``DeviceMesh`` like ``torch.distributed.device_mesh.init_device_mesh`` (row-major ranks),
    whose process groups are made once per process: a later call for the same mesh (a second
    ``train()``, a second ``SequenceParallelMPU.from_world``) finds them again instead of making
    more (:func:`distattn.distributed.comm.subgroups`). It fails within the default group's timeout instead of
    hanging (see module docstring): the ranks meet first -- a ``ValueError`` names both sides when
    they ask for different meshes -- and every group waits as long as the default group does
    (``init_process_group(timeout=)``). An axis over the whole world is the default group.

    Collective over the default process group.
    """
    from torch.distributed.device_mesh import DeviceMesh

    shape, names = tuple(mesh_shape), tuple(mesh_dim_names)
    want = f"device_type={device_type!r}, mesh_shape={shape}, mesh_dim_names={names}"
    world, size, rank = dist.group.WORLD, dist.get_world_size(), dist.get_rank()
    for r, theirs in enumerate(meet(world, "device_mesh", want, "creating a DeviceMesh")):
        if theirs != want:
            raise ValueError(f"rank {rank} asked for a DeviceMesh with {want} but rank {r} for {theirs}: "
                             f"every rank must build the same mesh")
    if len(shape) != len(names) or math.prod(shape) != size:
        raise ValueError(f"mesh_shape {shape} must have one size per name in {names} and hold all {size} ranks")
    grid = torch.arange(size).reshape(shape)
    # this rank's line of ranks along each axis: the members of its group on that axis
    lines = [next(line for line in grid.movedim(axis, -1).reshape(-1, n).tolist() if rank in line)
             for axis, n in enumerate(shape)]
    made = iter(subgroups(world, [line for line in lines if len(line) < size], want, "creating a DeviceMesh"))
    groups = [world if len(line) == size else next(made) for line in lines]
    if len(groups) == 1:
        return DeviceMesh.from_group(groups[0], device_type, mesh_dim_names=names)
    return DeviceMesh.from_group(groups, device_type, mesh=grid, mesh_dim_names=names)


@dataclass(frozen=True)
class ParallelDims:
    """The job's parallel layout -- ``dp`` data-parallel replicas of ``cp`` context-parallel ranks,
    ``ulysses`` of them (``usp``) splitting heads inside each CP group -- and the one place its
    process groups are made (:meth:`build`; a second build finds them again, and plans on its
    meshes make none).

        dims = ParallelDims(dp=2, cp=4, ulysses=2)
        mesh = dims.build("cuda")            # axes ("dp", "ring", "ulysses"); collective
        plan = distattn.plan(doc_lens, dims.cp_mesh(mesh), scheduler="usp")
        dp_group = mesh["dp"].get_group()
    """

    dp: int
    cp: int
    ulysses: int = 1

    def __post_init__(self):
        check_positive_ints(dp=self.dp, cp=self.cp, ulysses=self.ulysses)
        if self.cp % self.ulysses:
            raise ValueError(f"ulysses={self.ulysses} must divide cp={self.cp}")

    @property
    def world_size(self) -> int:
        return self.dp * self.cp

    @property
    def names(self) -> tuple[str, ...]:
        """Mesh axes, outermost first: CP ranks are consecutive, Ulysses ranks innermost (the fast
        links inside a node when ranks are numbered by node)."""
        return ("dp", "cp") if self.ulysses == 1 else ("dp", "ring", "ulysses")

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.dp, self.cp) if self.ulysses == 1 else (self.dp, self.cp // self.ulysses, self.ulysses)

    def build(self, device_type: str) -> DeviceMesh:
        """The ``DeviceMesh`` with axes :attr:`names` (collective over the default group, made with
        :func:`init_mesh`: fails within the timeout instead of hanging, made once per process)."""
        if dist.get_world_size() != self.world_size:
            raise ValueError(f"dp * cp = {self.world_size} but the job has {dist.get_world_size()} ranks: "
                             f"launch dp * cp ranks or change dp/cp")
        mesh = init_mesh(device_type, self.shape, self.names)
        if self.ulysses > 1 and self.dp > 1:
            # a plan on the 2-D cp sub-mesh also needs one group over all of it (resolve_mesh
            # flattens it): make it here with the rest, so that no plan makes a group
            _flat_group(self.cp_mesh(mesh))
        return mesh

    def dp_mesh(self, mesh: DeviceMesh, shard: int | None = None) -> DeviceMesh:
        """What data parallelism shards and reduces over: every rank of ``mesh`` as one axis (FSDP2,
        ZeRO-1), or with ``shard`` the 2-D ``("replicate", "shard")`` mesh of HSDP, each group of
        ``shard`` consecutive ranks (a node's, when ranks are numbered by node) sharding the parameters.
        Collective over the default group; made once per process (:func:`init_mesh`)."""
        if shard is None:
            return mesh._flatten("dp_cp")
        if self.world_size % shard:
            raise ValueError(f"shard={shard} must divide the {self.world_size} ranks")
        return init_mesh(mesh.device_type, (self.world_size // shard, shard), ("replicate", "shard"))

    def cp_mesh(self, mesh: DeviceMesh) -> DeviceMesh:
        """What ``distattn.plan`` takes for this rank's CP group: the ``"cp"`` axis, or for
        ``usp`` the 2-D ``("ring", "ulysses")`` sub-mesh."""
        return mesh["cp"] if self.ulysses == 1 else mesh["ring", "ulysses"]


def usp_mesh(device_type: str, ulysses_degree: int, world_size: int | None = None) -> DeviceMesh:
    """A 2-D ``DeviceMesh`` for ``scheduler="usp"``: axes ``("ring", "ulysses")`` with Ulysses on
    consecutive ranks, from :class:`ParallelDims` (one CP group over the whole world).

    Collective over the default process group; build it once and reuse it for every plan.
    """
    world_size = world_size or dist.get_world_size()
    if isinstance(ulysses_degree, bool) or not isinstance(ulysses_degree, int) or ulysses_degree < 1 \
            or world_size % ulysses_degree:
        raise ValueError(f"ulysses_degree must be a positive divisor of the world size {world_size}, "
                         f"got {ulysses_degree!r}")
    dims = ParallelDims(1, world_size, ulysses_degree)
    return dims.cp_mesh(dims.build(device_type))
