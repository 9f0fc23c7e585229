"""Process-group plumbing (``distattn.parallel``): mesh resolution now; DeviceMesh
construction and the Megatron-core / DeepSpeed / HF transformers adapters live here too."""

from .mesh import MeshInfo, ParallelDims, resolve_mesh, usp_mesh

__all__ = ["MeshInfo", "ParallelDims", "resolve_mesh", "usp_mesh"]
