"""Local attention kernels behind one registry (``distattn.kernels``).

``attn_fwd``/``attn_bwd`` are the pinned entry points every scheduler calls.
Backends: ``triton`` (FlashAttention-2 style kernels for CUDA tensors; CPU
tensors only under Triton's interpreter, ``TRITON_INTERPRET=1``), ``torch``
(PyTorch's fused CPU flash attention), ``reference`` (dense math, exact in
fp64). ``backend="auto"`` picks ``triton`` for CUDA tensors and ``torch`` for
CPU tensors.
"""

from . import reference, torch_cpu
from .registry import (Backend, attn_bwd, attn_fwd, available_backends, register_backend,
                       resolve_backend)

register_backend(reference.BACKEND)
register_backend(torch_cpu.BACKEND)

try:  # triton is optional: without it the other backends still work
    from . import triton_attn
except ImportError:  # pragma: no cover - depends on the environment
    triton_attn = None
if triton_attn is not None:
    register_backend(Backend("triton", triton_attn.triton_fwd, triton_attn.triton_bwd,
                             devices=frozenset({"cuda", "cpu"} if triton_attn.INTERPRET else {"cuda"})))

__all__ = ["Backend", "attn_fwd", "attn_bwd", "available_backends", "register_backend", "resolve_backend"]
