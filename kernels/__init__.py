"""Local attention kernels behind one registry (``distattn.kernels``).

``attn_fwd``/``attn_bwd`` are the pinned entry points; schedulers call
``varlen_fwd``/``varlen_bwd`` with a :class:`Varlen` layout their plan
validated and prepared once (no host synchronisation per call). A layout
carries its mask as a *band* per segment (query ``i`` sees key ``j`` iff
``lo <= j - i <= hi``); every call takes the softmax ``scale`` and an optional
logit ``softcap``, and ``attn_fwd``/``attn_bwd`` also attention ``sinks``. Backends:

* ``triton``: FlashAttention-2 style kernels for CUDA tensors (CPU tensors only
  under Triton's interpreter, ``TRITON_INTERPRET=1``);
* ``torch``: PyTorch's own fused kernels, the CPU flash attention on CPU and the
  FlashAttention-2 varlen kernels on CUDA;
* ``reference``: dense math, exact in fp64.

``backend="auto"`` picks ``torch`` for CPU tensors. For CUDA tensors it picks per call and per
direction (forward, backward) from a table of measured speeds (:mod:`.auto`): ``torch``
(FlashAttention-2) where the table measured it faster at the GPU's arch and head dim and
FlashAttention takes the call (fp16/bf16, one head dim, a multiple of 8 up to 256, no soft-cap, a
band it can express; never the backward of a deterministic run), else ``triton`` (so always
``triton`` on GPUs the table has no row for). On an H100 that is ``torch`` for the backward at head
dim >= 128 and ``triton`` for everything else.

Beside the backends: :mod:`.merge`, the fp32 log-sum-exp merge of partial results every backend and
executor shares, and :mod:`.speed`, the kernels' measured speed as the tile model the planners price with.
"""

from . import reference, torch_cpu, torch_cuda
from .registry import (Backend, attn_bwd, attn_fwd, available_backends, check_qkv, check_sinks, check_softcap,
                       prepare, register_backend, resolve_backend, varlen_bwd, varlen_fwd)
from .varlen import Varlen


def _by_device(cpu, cuda):
    def run(q, *args):
        return (cuda if q.device.type == "cuda" else cpu)(q, *args)
    return run


register_backend(reference.BACKEND)
register_backend(Backend("torch", _by_device(torch_cpu.torch_fwd, torch_cuda.flash_fwd),
                         _by_device(torch_cpu.torch_bwd, torch_cuda.flash_bwd), devices=frozenset({"cpu", "cuda"}),
                         prepare=torch_cuda.prepare))

try:  # triton is optional: without it the other backends still work
    from . import triton_attn
except ImportError:  # pragma: no cover - depends on the environment
    triton_attn = None
if triton_attn is not None:
    register_backend(Backend("triton", triton_attn.triton_fwd, triton_attn.triton_bwd,
                             devices=frozenset({"cuda", "cpu"} if triton_attn.INTERPRET else {"cuda"}),
                             prepare=triton_attn.prepare, partials=True))

__all__ = ["Backend", "Varlen", "attn_fwd", "attn_bwd", "available_backends", "check_qkv", "check_sinks",
           "check_softcap", "prepare", "register_backend", "resolve_backend", "varlen_fwd", "varlen_bwd"]
