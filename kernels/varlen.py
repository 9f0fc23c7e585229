"""The segment layout of one varlen kernel call, validated once and kept on the device.

A context-parallel step calls the local kernel many times with layouts known
when the batch is planned. :class:`Varlen` holds one such layout on the host
(``cu_q``, ``cu_k``, ``q_offset`` and the longest segments as Python ints);
:meth:`Varlen.prepare` copies it to a device once, together with whatever a
backend precomputes from it (the Triton backend's tile tables, the FlashAttention
backend's window groups). Kernel calls then launch without a host
synchronisation: no ``.tolist()``, no ``int(tensor.max())``, no pageable
host-to-device copy.

Shapes, for ``n`` segments: ``cu_q``/``cu_k`` int32 ``[n + 1]`` starting at 0,
non-decreasing; ``q_offset`` int32 ``[n]`` or None (semantics in
:func:`distattn.kernels.attn_fwd`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch


def _bounds(values, name: str, total: int | None, what: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1 or not (np.issubdtype(arr.dtype, np.integer) or arr.size == 0):
        raise ValueError(f"{name} must be a 1-D integer array of segment offsets")
    arr = arr.astype(np.int64)
    if arr.size < 2 or arr[0] != 0 or (total is not None and arr[-1] != total):
        shown = arr.tolist() if arr.size <= 6 else [*arr[:3].tolist(), "...", *arr[-2:].tolist()]
        end = f"{what}.shape[0] = {total}" if total is not None else "the total length"
        raise ValueError(f"{name} must start at 0 and end at {end}, got {shown}")
    if (np.diff(arr) < 0).any():
        raise ValueError(f"{name} must be non-decreasing (segment lengths >= 0)")
    if arr[-1] > np.iinfo(np.int32).max:
        raise ValueError(f"{name} addresses {arr[-1]} rows; the kernels index rows with int32")
    return arr.astype(np.int32)


@dataclass(frozen=True, eq=False)
class Varlen:
    """One kernel call's segments (see module docstring). Build with :meth:`build`."""

    cu_q: np.ndarray
    cu_k: np.ndarray
    q_offset: np.ndarray | None
    max_q: int
    max_k: int
    _cache: dict = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, cu_q, cu_k, q_offset=None, *, total_q: int | None = None, total_k: int | None = None
              ) -> "Varlen":
        """Validate host offsets (arrays, lists or CPU tensors); ``ValueError`` naming the bad one."""
        cu_q = _bounds(cu_q, "cu_seqlens_q", total_q, "q")
        cu_k = _bounds(cu_k, "cu_seqlens_k", total_k, "k")
        if cu_q.size != cu_k.size:
            raise ValueError(f"cu_seqlens_q and cu_seqlens_k describe different segment counts "
                             f"({cu_q.size - 1} vs {cu_k.size - 1})")
        if q_offset is not None:
            off = np.asarray(q_offset)
            if off.shape != (cu_q.size - 1,) or not (np.issubdtype(off.dtype, np.integer) or off.size == 0):
                raise ValueError(f"q_offset must be None or a 1-D integer tensor with one entry per segment "
                                 f"({cu_q.size - 1})")
            q_offset = None if not off.any() else off.astype(np.int32)
        return cls(cu_q, cu_k, q_offset, int(np.diff(cu_q).max(initial=0)), int(np.diff(cu_k).max(initial=0)))

    @classmethod
    def from_lengths(cls, q_lens, k_lens, q_offset=None) -> "Varlen":
        """A layout from per-segment query and key counts (the usual way a planner has them)."""
        return cls.build(np.concatenate([[0], np.cumsum(q_lens, dtype=np.int64)]),
                         np.concatenate([[0], np.cumsum(k_lens, dtype=np.int64)]), q_offset)

    @classmethod
    def from_tensors(cls, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, q_offset: torch.Tensor | None,
                     total_q: int, total_k: int) -> "Varlen":
        """The pinned ``attn_fwd``/``attn_bwd`` arguments as a layout. Reading device tensors back
        synchronises once; the given tensors are kept as the device copies."""
        for name, t in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k), ("q_offset", q_offset)):
            if t is None and name == "q_offset":
                continue
            if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.dtype.is_floating_point:
                raise ValueError(f"{name} must be a 1-D integer tensor" + (" or None" if name == "q_offset" else ""))
        host = [t.cpu().numpy() if t is not None else None for t in (cu_seqlens_q, cu_seqlens_k, q_offset)]
        seg = cls.build(*host, total_q=total_q, total_k=total_k)
        device = cu_seqlens_q.device
        if device.type != "cpu" and all(t is None or t.device == device for t in (cu_seqlens_k, q_offset)):
            to32 = lambda t: t if t.dtype == torch.int32 else t.to(torch.int32)  # noqa: E731
            seg._cache[("tensors", device)] = (to32(cu_seqlens_q), to32(cu_seqlens_k),
                                               to32(q_offset) if seg.q_offset is not None else None)
        return seg

    @property
    def num_segments(self) -> int:
        return self.cu_q.size - 1

    @property
    def total_q(self) -> int:
        return int(self.cu_q[-1])

    @property
    def total_k(self) -> int:
        return int(self.cu_k[-1])

    def segments(self):
        """``(q0, q1, k0, k1, offset)`` per segment, as Python ints (for host-side backends)."""
        offsets = self.q_offset.tolist() if self.q_offset is not None else [0] * self.num_segments
        bq, bk = self.cu_q.tolist(), self.cu_k.tolist()
        for i in range(self.num_segments):
            yield bq[i], bq[i + 1], bk[i], bk[i + 1], offsets[i]

    def tensors(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """int32 ``cu_q``, ``cu_k`` and ``q_offset`` (or None) on ``device``, copied once."""
        return self.cached(("tensors", torch.device(device)), lambda: tuple(
            torch.from_numpy(a).to(device) if a is not None else None
            for a in (self.cu_q, self.cu_k, self.q_offset)))

    def cached(self, key, build: Callable[[], Any]) -> Any:
        """``build()`` once per ``key`` (backends keep their per-layout precomputation here)."""
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]
