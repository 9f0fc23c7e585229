"""Backend registry, input validation and the pinned ``attn_fwd``/``attn_bwd`` entry points."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from distattn.masks import check_window
from distattn.merge import acc_dtype

# fwd(q, k, v, cu_q, cu_k, q_offset, causal, window, scale) -> (out, lse)
FwdFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]
# bwd(dout, q, k, v, out, lse, cu_q, cu_k, q_offset, causal, window, scale) -> (dq, dk, dv)
# q_offset is None or an int tensor [n_seg] (validated) on the inputs' device.
BwdFn = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Backend:
    """A local attention implementation. ``devices``: device types it runs on (None: any)."""

    name: str
    fwd: FwdFn
    bwd: BwdFn
    devices: frozenset[str] | None = None


_BACKENDS: dict[str, Backend] = {}
# What "auto" tries, in order, per device type; the first registered one wins.
_AUTO_ORDER = {"cuda": ("triton", "reference"), "cpu": ("torch", "reference")}


def register_backend(backend: Backend) -> None:
    """Add (or replace) a backend under ``backend.name``."""
    if backend.name == "auto":
        raise ValueError("backend name 'auto' is reserved for automatic selection")
    _BACKENDS[backend.name] = backend


def available_backends() -> list[str]:
    return sorted(_BACKENDS)


def resolve_backend(name: str, device: torch.device) -> Backend:
    """The backend that ``name`` means for tensors on ``device``; ``ValueError`` if none fits."""
    if name == "auto":
        for candidate in _AUTO_ORDER.get(device.type, ("reference",)):
            if candidate in _BACKENDS:
                return _BACKENDS[candidate]
        raise ValueError(f"backend='auto' found no kernel for device {device}; registered: {available_backends()}")
    if name not in _BACKENDS:
        raise ValueError(f"backend={name!r} is unknown; choose 'auto' or one of {available_backends()}")
    backend = _BACKENDS[name]
    if backend.devices is not None and device.type not in backend.devices:
        raise ValueError(f"backend={name!r} runs on {sorted(backend.devices)} tensors, not {device.type}; "
                         f"use backend='auto'")
    return backend


def _check_cu(cu: torch.Tensor, total: int, name: str, tensor: str) -> list[int]:
    if not isinstance(cu, torch.Tensor) or cu.dim() != 1 or cu.dtype.is_floating_point:
        raise ValueError(f"{name} must be a 1-D integer tensor of segment offsets [0, ..., {total}]")
    bounds = cu.tolist()
    if len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != total:
        shown = bounds if len(bounds) <= 6 else [*bounds[:3], "...", *bounds[-2:]]
        raise ValueError(f"{name} must start at 0 and end at {tensor}.shape[0] = {total}, got {shown}")
    if any(b < a for a, b in zip(bounds, bounds[1:])):
        raise ValueError(f"{name} must be non-decreasing (segment lengths >= 0)")
    return bounds


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """``ValueError`` unless q ``[T, Hq, D]`` and k, v ``[T', Hkv, D]`` agree (dtype, device, GQA)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise ValueError(f"{name} must be a 3-D tensor [tokens, heads, head_dim], got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        if not t.dtype.is_floating_point:
            raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype}): cast them to one dtype")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v are on different devices ({q.device}, {k.device}, {v.device})")
    if k.shape != v.shape:
        raise ValueError(f"k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"head_dim mismatch: q has {q.shape[2]}, k/v have {k.shape[2]}")
    hq, hkv = q.shape[1], k.shape[1]
    if hkv == 0 or hq % hkv:
        raise ValueError(f"q heads ({hq}) must be a multiple of k/v heads ({hkv}) for GQA/MQA")


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                 cu_seqlens_k: torch.Tensor, q_offset: torch.Tensor | None, window: int | None,
                 scale: float | None) -> float:
    """Validate the pinned kernel inputs; returns the scale to use."""
    check_qkv(q, k, v)
    bq = _check_cu(cu_seqlens_q, q.shape[0], "cu_seqlens_q", "q")
    bk = _check_cu(cu_seqlens_k, k.shape[0], "cu_seqlens_k", "k")
    if len(bq) != len(bk):
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k describe different segment counts "
                         f"({len(bq) - 1} vs {len(bk) - 1})")
    if q_offset is not None and (not isinstance(q_offset, torch.Tensor) or q_offset.dtype.is_floating_point
                                 or tuple(q_offset.shape) != (len(bq) - 1,)):
        raise ValueError(f"q_offset must be None or a 1-D integer tensor with one entry per segment "
                         f"({len(bq) - 1})")
    check_window(window)
    if scale is None:
        return 1.0 / math.sqrt(q.shape[2])
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive finite float, got {scale!r}")
    return float(scale)


def attn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
             cu_seqlens_k: torch.Tensor, *, causal: bool = True, window: int | None = None,
             scale: float | None = None, backend: str = "auto", q_offset: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Varlen attention forward over a packed batch of segments.

    Args:
        q: ``[Tq, Hq, D]``; k, v: ``[Tk, Hkv, D]`` with ``Hq % Hkv == 0`` (GQA/MQA).
        cu_seqlens_q, cu_seqlens_k: int ``[n_seg + 1]`` offsets. Segment ``i`` of q,
            ``q[cu_q[i]:cu_q[i+1]]``, attends to ``k/v[cu_k[i]:cu_k[i+1]]`` only.
        causal: bottom-right aligned: with ``m`` queries and ``n`` keys, query ``i``
            sits at key position ``i + n - m`` and sees keys at or before it.
        window: if set, a query at position ``p`` sees only keys ``j`` with ``|p - j| < window``.
        scale: softmax scale, default ``1/sqrt(D)``.
        backend: ``"auto"`` (torch on CPU, triton/reference on CUDA), ``"torch"``, ``"reference"``, ...
        q_offset: extension, int ``[n_seg]`` or None: shifts segment ``i``'s queries to key
            position ``r + n - m + q_offset[i]`` (positive: queries after the keys' end, as for
            a block of earlier keys in a ring). None means 0: bottom-right alignment.

    Returns:
        ``out [Tq, Hq, D]`` in q's dtype and ``lse [Tq, Hq]`` (natural log; fp32, or fp64
        for fp64 inputs). Rows that see no key give ``out = 0`` and ``lse = -inf``.
    """
    scale = check_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, q_offset, window, scale)
    impl = resolve_backend(backend, q.device)
    with torch.no_grad():
        return impl.fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, q_offset, bool(causal), window, scale)


def attn_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
             lse: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, *, causal: bool = True,
             window: int | None = None, scale: float | None = None, backend: str = "auto",
             q_offset: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Varlen attention backward; arguments as :func:`attn_fwd`.

    ``out``/``lse`` are the row's *final* output and log-sum-exp, which may come from
    merging several key blocks: the gradient returned is then this block's share
    (``P = exp(s - lse)``, ``Delta = rowsum(dout * out)``), so blocks can be
    differentiated independently and their dq summed.

    Returns ``dq [Tq, Hq, D]``, ``dk, dv [Tk, Hkv, D]`` in the inputs' dtype.
    """
    scale = check_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, q_offset, window, scale)
    if dout.shape != q.shape or out.shape != q.shape:
        raise ValueError(f"dout and out must have q's shape {tuple(q.shape)}, got {tuple(dout.shape)} "
                         f"and {tuple(out.shape)}")
    if lse.shape != q.shape[:2]:
        raise ValueError(f"lse must have shape [Tq, Hq] = {tuple(q.shape[:2])}, got {tuple(lse.shape)}")
    if lse.dtype != acc_dtype(q.dtype):
        lse = lse.to(acc_dtype(q.dtype))
    impl = resolve_backend(backend, q.device)
    with torch.no_grad():
        return impl.bwd(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, q_offset, bool(causal), window,
                        scale)


def segments(cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, q_offset: torch.Tensor | None):
    """Yield ``(q0, q1, k0, k1, offset)`` per segment; helper for the CPU backends."""
    bq, bk = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    offsets = q_offset.tolist() if q_offset is not None else [0] * (len(bq) - 1)
    for i in range(len(bq) - 1):
        yield bq[i], bq[i + 1], bk[i], bk[i + 1], offsets[i]
