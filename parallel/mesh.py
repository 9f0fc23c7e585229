"""Turn the ``mesh`` argument of :func:`distattn.plan` into one explicit description.

``mesh`` may be a 1-D ``DeviceMesh``, a 2-D ``DeviceMesh`` (for ``usp``), a
``ProcessGroup``, or an ``int`` world size for a dry plan. Groups are always
passed explicitly; nothing here keeps a module-level group.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch.distributed as dist


@dataclass(frozen=True)
class MeshInfo:
    world_size: int
    rank: int | None                      # None: dry plan
    group: Any = field(default=None, repr=False)        # ProcessGroup over all ranks of the mesh
    device_mesh: Any = field(default=None, repr=False)  # the DeviceMesh when one was given

    @property
    def is_dry(self) -> bool:
        return self.rank is None


def resolve_mesh(mesh) -> MeshInfo:
    """Describe ``mesh`` (see module docstring); ``ValueError`` for anything else."""
    if isinstance(mesh, bool):
        raise ValueError("mesh must be a DeviceMesh, a ProcessGroup or an int world size, got a bool")
    if isinstance(mesh, int):
        if mesh < 1:
            raise ValueError(f"mesh as an int is a dry world size and must be >= 1, got {mesh}")
        return MeshInfo(world_size=mesh, rank=None)
    if isinstance(mesh, dist.ProcessGroup):
        return MeshInfo(world_size=mesh.size(), rank=dist.get_rank(mesh), group=mesh)
    try:
        from torch.distributed.device_mesh import DeviceMesh
    except ImportError:  # pragma: no cover - torch without distributed
        DeviceMesh = ()
    if DeviceMesh and isinstance(mesh, DeviceMesh):
        if mesh.ndim == 1:
            return MeshInfo(world_size=mesh.size(), rank=mesh.get_local_rank(), group=mesh.get_group(),
                            device_mesh=mesh)
        # Multi-axis meshes are flattened to one group; schedulers that use the axes
        # (usp) read them from device_mesh.
        group = mesh._flatten().get_group() if hasattr(mesh, "_flatten") else None
        if group is None:
            raise ValueError("this torch cannot flatten a multi-axis DeviceMesh; pass a ProcessGroup")
        return MeshInfo(world_size=mesh.size(), rank=dist.get_rank(group), group=group, device_mesh=mesh)
    if mesh is None:
        raise ValueError("mesh is None: pass a DeviceMesh, a ProcessGroup (e.g. torch.distributed.group.WORLD) "
                         "or an int world size for a dry plan")
    raise ValueError(f"mesh must be a DeviceMesh, a ProcessGroup or an int world size, got {type(mesh).__name__}")
