"""Turn the ``mesh`` argument of :func:`distattn.plan` into one explicit description.

``mesh`` may be a 1-D ``DeviceMesh``, a 2-D ``DeviceMesh`` (for ``usp``), a
``ProcessGroup``, or an ``int`` world size for a dry plan. Groups are always
passed explicitly; nothing here keeps a module-level group.

Making groups must not hang past the collective timeout either. torch gives a
new group 30 minutes by default, whatever ``init_process_group(timeout=)``
said, and a gloo group connects to its peers when made. So :func:`init_mesh`
(and :func:`usp_mesh`) first let the ranks meet through the store (naming any
that never come within the default group's timeout) and give every group of
the mesh that timeout; a multi-axis mesh is flattened the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

from ..comm import group_timeout, meet, subgroups

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
    """Describe ``mesh`` (see module docstring); ``ValueError`` for anything else."""
    if isinstance(mesh, bool):
        raise ValueError("mesh must be a DeviceMesh, a ProcessGroup or an int world size, got a bool")
    if isinstance(mesh, int):
        if mesh < 1:
            raise ValueError(f"mesh as an int is a dry world size and must be >= 1, got {mesh}")
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
    """``torch.distributed.device_mesh.init_device_mesh`` that fails within the default group's
    timeout instead of hanging (see module docstring): the ranks meet first -- a ``ValueError``
    names both sides when they ask for different meshes -- and every group of the mesh then waits
    as long as the default group does (``init_process_group(timeout=)``).

    Collective over the default process group.
    """
    from torch.distributed.device_mesh import init_device_mesh

    want = f"device_type={device_type!r}, mesh_shape={tuple(mesh_shape)}, mesh_dim_names={tuple(mesh_dim_names)}"
    world = dist.group.WORLD
    for r, theirs in enumerate(meet(world, "device_mesh", want, "creating a DeviceMesh")):
        if theirs != want:
            raise ValueError(f"rank {dist.get_rank()} asked for a DeviceMesh with {want} but rank {r} for {theirs}: "
                             f"every rank must build the same mesh")
    mesh = init_device_mesh(device_type, tuple(mesh_shape), mesh_dim_names=tuple(mesh_dim_names))
    timeout = group_timeout(world)
    for name in mesh_dim_names:
        group = mesh[name].get_group()
        if group is not world and group_timeout(group) != timeout:
            c10d._set_pg_timeout(timeout, group)
    return mesh


def usp_mesh(device_type: str, ulysses_degree: int, world_size: int | None = None) -> DeviceMesh:
    """A 2-D ``DeviceMesh`` for ``scheduler="usp"``: axes ``("ring", "ulysses")`` with Ulysses on
    consecutive ranks (the fast links inside a node when ranks are numbered by node).

    Collective over the default process group, made with :func:`init_mesh` (a rank that never
    comes is named within the timeout instead of a hang); build it once and reuse it for every plan.
    """
    world_size = world_size or dist.get_world_size()
    if isinstance(ulysses_degree, bool) or not isinstance(ulysses_degree, int) or ulysses_degree < 1 \
            or world_size % ulysses_degree:
        raise ValueError(f"ulysses_degree must be a positive divisor of the world size {world_size}, "
                         f"got {ulysses_degree!r}")
    return init_mesh(device_type, (world_size // ulysses_degree, ulysses_degree), ("ring", "ulysses"))
