"""The segment layout of one varlen kernel call, validated once and kept on the device.

A context-parallel step calls the local kernel many times with layouts known
when the batch is planned. :class:`Varlen` holds one such layout on the host
(``cu_q``, ``cu_k``, the per-segment band ``lo``/``hi`` and the longest segments
as Python ints); :meth:`Varlen.tensors` copies it to a device once, and
backends keep whatever they precompute from it (the Triton backend's tile
tables, the FlashAttention backend's window groups) in :meth:`Varlen.cached`.
Kernel calls then launch without a host synchronisation: no ``.tolist()``, no
``int(tensor.max())``, no pageable host-to-device copy.

Shapes, for ``n`` segments: ``cu_q``/``cu_k`` int32 ``[n + 1]`` starting at 0,
non-decreasing; ``lo``/``hi`` int32 ``[n]`` or None.

The mask is a *band* per segment: in segment ``s`` with ``m`` queries and ``n``
keys, local query row ``i`` sees local key ``j`` iff ``lo[s] <= j - i <= hi[s]``
(relative to the segment's first query and first key, whatever ``m`` and ``n``).
``±UNBOUNDED`` (:data:`distattn.planning.masks.UNBOUNDED` = 2**30) means no bound; a bound
that cuts nothing in its segment (``lo <= -(m - 1)``, ``hi >= n - 1``) is stored
as such, and an array left with no bound at all is stored as None. Examples, for
a segment of ``m`` queries at the end of ``n`` keys (``d = n - m``): full
attention ``(-U, U)``; bottom-right causal ``(-U, d)``; causal window ``W``
``(d - W + 1, d)``; top-left causal ``(-U, 0)``; "inverse causal" ``j >= i`` ``(0, U)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from distattn.planning.masks import UNBOUNDED, band, check_window


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


def _host(x):
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x


def _band(values, name: str, count: int, sign: int, cuts: np.ndarray) -> np.ndarray | None:
    """Validated band bound: int32 ``[count]`` clipped to ±UNBOUNDED, bounds that cut nothing
    (``cuts`` False) set to ``sign * UNBOUNDED``; None when no bound is left."""
    if values is None:
        return None
    arr = np.asarray(_host(values))
    if arr.shape != (count,) or not (np.issubdtype(arr.dtype, np.integer) or arr.size == 0):
        raise ValueError(f"{name} must be None or a 1-D integer array with one entry per segment ({count}), "
                         f"got shape {arr.shape} dtype {arr.dtype}")
    arr = np.clip(arr.astype(np.int64), -UNBOUNDED, UNBOUNDED)
    arr = np.where(cuts(arr), arr, sign * UNBOUNDED)
    return None if (arr == sign * UNBOUNDED).all() else arr.astype(np.int32)


@dataclass(frozen=True, eq=False)
class Varlen:
    """One kernel call's segments and their band mask (see module docstring). Build with
    :meth:`build`, :meth:`from_lengths`, :meth:`from_geometry` or :meth:`from_tensors`."""

    cu_q: np.ndarray
    cu_k: np.ndarray
    lo: np.ndarray | None
    hi: np.ndarray | None
    max_q: int
    max_k: int
    _cache: dict = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, cu_q, cu_k, lo=None, hi=None, *, total_q: int | None = None, total_k: int | None = None
              ) -> "Varlen":
        """Validate host offsets and bands (arrays, lists or CPU tensors); ``ValueError`` naming the bad one.

        ``lo``/``hi``: None (no bound in any segment) or one int per segment, ``±UNBOUNDED`` for none.
        """
        cu_q = _bounds(_host(cu_q), "cu_seqlens_q", total_q, "q")
        cu_k = _bounds(_host(cu_k), "cu_seqlens_k", total_k, "k")
        if cu_q.size != cu_k.size:
            raise ValueError(f"cu_seqlens_q and cu_seqlens_k describe different segment counts "
                             f"({cu_q.size - 1} vs {cu_k.size - 1})")
        m, n = np.diff(cu_q).astype(np.int64), np.diff(cu_k).astype(np.int64)
        live = (m > 0) & (n > 0)
        lo = _band(lo, "lo", m.size, -1, lambda a: live & (a > -(m - 1)))
        hi = _band(hi, "hi", m.size, 1, lambda a: live & (a < n - 1))
        return cls(cu_q, cu_k, lo, hi, int(m.max(initial=0)), int(n.max(initial=0)))

    @classmethod
    def from_lengths(cls, q_lens, k_lens, lo=None, hi=None) -> "Varlen":
        """A layout from per-segment query and key counts (the usual way a planner has them)."""
        return cls.build(np.concatenate([[0], np.cumsum(q_lens, dtype=np.int64)]),
                         np.concatenate([[0], np.cumsum(k_lens, dtype=np.int64)]), lo, hi)

    @classmethod
    def from_geometry(cls, q_lens, k_lens, causal: bool, window: int | None, offset=0) -> "Varlen":
        """A layout under the (causal, window, offset) geometry of :func:`distattn.planning.masks.band`:
        query ``i`` of a segment sits at key position ``i + n - m + offset`` (bottom-right for 0)."""
        q_lens, k_lens = np.asarray(q_lens, dtype=np.int64), np.asarray(k_lens, dtype=np.int64)
        lo, hi = band(q_lens, k_lens, bool(causal), check_window(window), offset)
        return cls.from_lengths(q_lens, k_lens, lo, hi)

    @classmethod
    def from_tensors(cls, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, q_offset: torch.Tensor | None,
                     total_q: int, total_k: int, causal: bool = True, window: int | None = None) -> "Varlen":
        """The pinned ``attn_fwd``/``attn_bwd`` arguments as a layout. Reading device tensors back
        synchronises once; the given offset tensors are kept as the device copies."""
        for name, t in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k), ("q_offset", q_offset)):
            if t is None and name == "q_offset":
                continue
            if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.dtype.is_floating_point or t.is_complex():
                raise ValueError(f"{name} must be a 1-D integer tensor" + (" or None" if name == "q_offset" else ""))
        window = check_window(window)
        cu_q = _bounds(cu_seqlens_q.cpu().numpy(), "cu_seqlens_q", total_q, "q")
        cu_k = _bounds(cu_seqlens_k.cpu().numpy(), "cu_seqlens_k", total_k, "k")
        offset = 0
        if q_offset is not None:
            if q_offset.shape != (cu_q.size - 1,):
                raise ValueError(f"q_offset must be None or a 1-D integer tensor with one entry per segment "
                                 f"({cu_q.size - 1}), got shape {tuple(q_offset.shape)}")
            offset = q_offset.cpu().numpy().astype(np.int64)
        if cu_q.size != cu_k.size:
            raise ValueError(f"cu_seqlens_q and cu_seqlens_k describe different segment counts "
                             f"({cu_q.size - 1} vs {cu_k.size - 1})")
        lo, hi = band(np.diff(cu_q), np.diff(cu_k), bool(causal), window, offset)
        seg = cls.build(cu_q, cu_k, lo, hi, total_q=total_q, total_k=total_k)
        device = cu_seqlens_q.device
        if device.type != "cpu" and cu_seqlens_k.device == device:
            to32 = lambda t: t if t.dtype == torch.int32 else t.to(torch.int32)  # noqa: E731
            seg._cache[("tensors", device)] = (to32(cu_seqlens_q), to32(cu_seqlens_k),
                                               *(torch.from_numpy(a).to(device) if a is not None else None
                                                 for a in (seg.lo, seg.hi)))
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

    def bands(self) -> tuple[np.ndarray, np.ndarray]:
        """int64 ``(lo, hi)`` ``[n]`` with ``±UNBOUNDED`` where a bound is absent."""
        count = self.num_segments
        lo = self.lo.astype(np.int64) if self.lo is not None else np.full(count, -UNBOUNDED, dtype=np.int64)
        hi = self.hi.astype(np.int64) if self.hi is not None else np.full(count, UNBOUNDED, dtype=np.int64)
        return lo, hi

    def segments(self):
        """``(q0, q1, k0, k1, lo, hi)`` per segment, as Python ints (``±UNBOUNDED`` where absent)."""
        lo, hi = (b.tolist() for b in self.bands())
        bq, bk = self.cu_q.tolist(), self.cu_k.tolist()
        for i in range(self.num_segments):
            yield bq[i], bq[i + 1], bk[i], bk[i + 1], lo[i], hi[i]

    def tensors(self, device: torch.device
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """int32 ``cu_q``, ``cu_k``, ``lo`` and ``hi`` (None when absent) on ``device``, copied once."""
        return self.cached(("tensors", torch.device(device)), lambda: tuple(
            torch.from_numpy(a).to(device) if a is not None else None
            for a in (self.cu_q, self.cu_k, self.lo, self.hi)))

    def cached(self, key, build: Callable[[], Any]) -> Any:
        """``build()`` once per ``key`` (backends keep their per-layout precomputation here)."""
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]
