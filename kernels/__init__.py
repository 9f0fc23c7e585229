"""Local attention kernels behind one registry (``distattn.kernels``).

``attn_fwd``/``attn_bwd`` are the pinned entry points every scheduler calls.
Backends: ``torch`` (PyTorch's fused CPU flash attention), ``reference``
(dense math, exact in fp64). ``backend="auto"`` picks ``torch`` for CPU tensors
and, on CUDA, ``triton`` once registered (``reference`` until then).
"""

from . import reference, torch_cpu
from .registry import (Backend, attn_bwd, attn_fwd, available_backends, register_backend,
                       resolve_backend)

register_backend(reference.BACKEND)
register_backend(torch_cpu.BACKEND)

__all__ = ["Backend", "attn_fwd", "attn_bwd", "available_backends", "register_backend", "resolve_backend"]
