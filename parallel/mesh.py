"""Where the mesh code used to live: it is :mod:`distattn.mesh` now (the core builds and reads
meshes; the adapters only use them). These names keep working."""

from ..mesh import MeshInfo, ParallelDims, group_device, init_mesh, resolve_mesh, usp_mesh

__all__ = ["MeshInfo", "ParallelDims", "group_device", "init_mesh", "resolve_mesh", "usp_mesh"]
