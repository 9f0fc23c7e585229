"""Trainer integrations (``distattn.parallel``): the Megatron-core, DeepSpeed and HF transformers
adapters. The job's meshes are built by :mod:`distattn.distributed.mesh`; its names are re-exported here."""

from ..distributed.mesh import MeshInfo, ParallelDims, resolve_mesh, usp_mesh

__all__ = ["MeshInfo", "ParallelDims", "resolve_mesh", "usp_mesh"]
