"""Turn the ``mesh`` argument of :func:`distattn.plan` into one explicit description.

``mesh`` may be a 1-D ``DeviceMesh``, a 2-D ``DeviceMesh`` (for ``usp``), a
``ProcessGroup``, or an ``int`` world size for a dry plan. Groups are always
passed explicitly; nothing here keeps a module-level group.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist


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
        group = mesh._flatten().get_group() if hasattr(mesh, "_flatten") else None
        if group is None:
            raise ValueError("this torch cannot flatten a multi-axis DeviceMesh; pass a ProcessGroup")
        return MeshInfo(world_size=mesh.size(), rank=dist.get_rank(group), group=group, device_mesh=mesh,
                        device=_device_of(mesh.device_type))
    if mesh is None:
        raise ValueError("mesh is None: pass a DeviceMesh, a ProcessGroup (e.g. torch.distributed.group.WORLD) "
                         "or an int world size for a dry plan")
    raise ValueError(f"mesh must be a DeviceMesh, a ProcessGroup or an int world size, got {type(mesh).__name__}")


def usp_mesh(device_type: str, ulysses_degree: int, world_size: int | None = None):
    """A 2-D ``DeviceMesh`` for ``scheduler="usp"``: axes ``("ring", "ulysses")`` with Ulysses on
    consecutive ranks (the fast links inside a node when ranks are numbered by node).

    Collective over the default process group; build it once and reuse it for every plan.
    """
    from torch.distributed.device_mesh import init_device_mesh

    world_size = world_size or dist.get_world_size()
    if isinstance(ulysses_degree, bool) or not isinstance(ulysses_degree, int) or ulysses_degree < 1 \
            or world_size % ulysses_degree:
        raise ValueError(f"ulysses_degree must be a positive divisor of the world size {world_size}, "
                         f"got {ulysses_degree!r}")
    return init_device_mesh(device_type, (world_size // ulysses_degree, ulysses_degree),
                            mesh_dim_names=("ring", "ulysses"))
