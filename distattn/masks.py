"""Document masks as lists of slices, their area and FLOPs.

A mask over one packed sequence is a list of :class:`MaskSlice`: a block of
query rows ``[q_start, q_end)`` against a block of key columns
``[k_start, k_end)`` of one document, in global token positions, with a kind:

* ``full``   -- every query sees every key of the block;
* ``causal`` -- query at position ``g`` sees keys ``j <= g``;
* ``window`` -- additionally ``|g - j| < window`` (and ``j <= g`` if causal).

Inside one segment the same geometry is written relative to the keys: with
``m`` queries and ``n`` keys, query ``i`` sits at key position
``p = i + n - m + offset``. ``offset = 0`` is bottom-right alignment (the
queries are the last ``m`` positions of the keys: a shard of queries against
its document's key prefix); ``offset > 0`` puts the queries after the keys'
end (a block of earlier keys in a ring), ``offset < 0`` before it.

FLOPs follow the FlashAttention convention: forward = 4 * area * Hq * D,
backward = 2.5 * forward, where area counts the unmasked (query, key) pairs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

BWD_FLOPS_FACTOR = 2.5


def check_positive_ints(**values) -> None:
    """``ValueError`` naming the first of ``values`` that is not a positive int (a bool is not one)."""
    for name, val in values.items():
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise ValueError(f"{name} must be a positive int, got {val!r}")


def check_window(window: int | None) -> int | None:
    """Validate a sliding-window size (tokens) and return it as int or None."""
    if window is None:
        return None
    if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 1:
        raise ValueError(f"window must be a positive int (tokens) or None, got {window!r}")
    return int(window)


def as_doc_lens(doc_lens, *, name: str = "doc_lens") -> tuple[int, ...]:
    """Validate document lengths (list of ints or 1-D int tensor/array) into a tuple.

    Every length must be a positive integer; there must be at least one.
    """
    if isinstance(doc_lens, torch.Tensor):
        if doc_lens.dim() != 1 or doc_lens.dtype.is_floating_point or doc_lens.is_complex():
            raise ValueError(f"{name} must be a 1-D integer tensor, got shape {tuple(doc_lens.shape)} "
                             f"dtype {doc_lens.dtype}")
        values = doc_lens.tolist()
    elif isinstance(doc_lens, np.ndarray):
        if doc_lens.ndim != 1 or not np.issubdtype(doc_lens.dtype, np.integer):
            raise ValueError(f"{name} must be a 1-D integer array, got shape {doc_lens.shape} dtype {doc_lens.dtype}")
        values = doc_lens.tolist()
    elif isinstance(doc_lens, (list, tuple)):
        values = list(doc_lens)
    else:
        raise ValueError(f"{name} must be a list of ints or a 1-D int tensor, got {type(doc_lens).__name__}")
    if not values:
        raise ValueError(f"{name} is empty: pass at least one document length")
    for i, n in enumerate(values):
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
            raise ValueError(f"{name}[{i}] = {n!r} is not an int: document lengths are token counts")
        if n <= 0:
            raise ValueError(f"{name}[{i}] = {n}: document lengths must be positive; drop empty documents")
    return tuple(int(n) for n in values)


def cu_seqlens(lens: Sequence[int], device: torch.device | str | None = None) -> torch.Tensor:
    """Cumulative offsets ``[0, l0, l0+l1, ...]`` as int32, the varlen kernels' format."""
    out = torch.zeros(len(lens) + 1, dtype=torch.int32)
    if len(lens):
        out[1:] = torch.tensor(list(lens), dtype=torch.int64).cumsum(0)
    return out.to(device) if device is not None else out


def visible_keys(q_len: int, k_len: int, causal: bool, window: int | None, offset: int = 0
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Per query row of one segment, the inclusive key range ``[lo, hi]`` it sees.

    Rows with ``lo > hi`` see no key. Both ranges are non-decreasing in the row
    index, so the rows that see something are contiguous.
    """
    p = np.arange(q_len, dtype=np.int64) + (k_len - q_len + offset)
    lo = np.zeros(q_len, dtype=np.int64)
    hi = np.full(q_len, k_len - 1, dtype=np.int64)
    if causal:
        hi = np.minimum(hi, p)
    if window is not None:
        lo = np.maximum(lo, p - window + 1)
        if not causal:
            hi = np.minimum(hi, p + window - 1)
    return lo, hi


def dense_mask(q_len: int, k_len: int, causal: bool, window: int | None, offset: int = 0,
               device: torch.device | str | None = None) -> torch.Tensor:
    """Boolean ``[q_len, k_len]`` visibility of one segment (True = attend)."""
    p = torch.arange(q_len, device=device).unsqueeze(1) + (k_len - q_len + offset)
    j = torch.arange(k_len, device=device).unsqueeze(0)
    keep = torch.ones(q_len, k_len, dtype=torch.bool, device=device)
    if causal:
        keep &= j <= p
    if window is not None:
        keep &= (p - j).abs() < window
    return keep


# A bound that never cuts: |j - i| of any segment stays far below it (int32 in the kernels).
UNBOUNDED = 1 << 30


def band(q_len, k_len, causal: bool, window: int | None, offset=0) -> tuple[np.ndarray, np.ndarray]:
    """The (causal, window, offset) geometry as a *band* per segment: query row ``i`` sees key
    ``j`` iff ``lo <= j - i <= hi`` (``-UNBOUNDED``/``UNBOUNDED``: no bound). Vectorised."""
    m = np.asarray(q_len, dtype=np.int64)
    shift = np.asarray(k_len, dtype=np.int64) - m + np.asarray(offset, dtype=np.int64)
    shift = np.broadcast_to(shift, np.broadcast_shapes(shift.shape, m.shape))
    lo = np.full(shift.shape, -UNBOUNDED, dtype=np.int64) if window is None else shift - window + 1
    if causal:
        hi = shift.copy()
    else:
        hi = np.full(shift.shape, UNBOUNDED, dtype=np.int64) if window is None else shift + window - 1
    return lo, hi


def _tri(t: np.ndarray) -> np.ndarray:
    """sum_{x <= t} max(x, 0) = t (t + 1) / 2 for t >= 0, else 0."""
    t = np.maximum(t, 0)
    return t * (t + 1) // 2


def _pairs_below(m: np.ndarray, n: np.ndarray, c: np.ndarray) -> np.ndarray:
    """#{(i, j): 0 <= i < m, 0 <= j < n, j - i <= c}: sum over i of clip(i + c + 1, 0, n)."""
    c = np.clip(c, -m - 1, n + 1)  # beyond these the count no longer changes (and stays small)
    return _tri(c + m) - _tri(c) - _tri(c + m - n) + _tri(c - n)


def band_area(q_len, k_len, lo, hi) -> np.ndarray:
    """Visible pairs per segment of ``m`` queries and ``n`` keys with band ``lo <= j - i <= hi``
    (closed form, vectorised)."""
    m = np.asarray(q_len, dtype=np.int64)
    n = np.asarray(k_len, dtype=np.int64)
    lo, hi = np.asarray(lo, dtype=np.int64), np.asarray(hi, dtype=np.int64)
    area = _pairs_below(m, n, hi) - _pairs_below(m, n, lo - 1)
    return np.where((m > 0) & (n > 0), np.maximum(area, 0), 0)


def mask_area(q_lens, k_lens, causal: bool, window: int | None, offsets=0) -> np.ndarray:
    """Number of visible (query, key) pairs per segment, in closed form (vectorised).

    ``q_lens``/``k_lens``/``offsets`` are arrays (or scalars) per segment; semantics
    as in :func:`visible_keys`.
    """
    return band_area(q_lens, k_lens, *band(q_lens, k_lens, causal, window, offsets))


@dataclass(frozen=True)
class MaskSlice:
    """Queries ``[q_start, q_end)`` against keys ``[k_start, k_end)`` of one document with one
    kind of mask; positions are global, so the geometry's offset is ``q_end - k_end``."""

    q_start: int
    q_end: int
    k_start: int
    k_end: int
    causal: bool
    window: int | None = None

    def __post_init__(self):
        if not (0 <= self.q_start <= self.q_end and 0 <= self.k_start <= self.k_end):
            raise ValueError(f"MaskSlice ranges need 0 <= start <= end, got {self}")
        check_window(self.window)

    @property
    def kind(self) -> str:
        if self.window is not None:
            return "window"
        return "causal" if self.causal else "full"

    @property
    def q_len(self) -> int:
        return self.q_end - self.q_start

    @property
    def k_len(self) -> int:
        return self.k_end - self.k_start

    @property
    def offset(self) -> int:
        return self.q_end - self.k_end

    def area(self) -> int:
        return int(mask_area([self.q_len], [self.k_len], self.causal, self.window, [self.offset])[0])


def document_mask(doc_lens, causal: bool = True, window: int | None = None) -> list[MaskSlice]:
    """The mask of a packed sequence: one square slice per document, nothing across."""
    lens = as_doc_lens(doc_lens)
    window = check_window(window)
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
    return [MaskSlice(int(s), int(s + n), int(s), int(s + n), causal, window) for s, n in zip(starts, lens)]


def slices_area(slices: Sequence[MaskSlice]) -> int:
    """Total visible pairs of a list of slices (vectorised per (causal, window) group)."""
    total = 0
    groups: dict[tuple[bool, int | None], list[MaskSlice]] = {}
    for s in slices:
        groups.setdefault((s.causal, s.window), []).append(s)
    for (causal, window), group in groups.items():
        q = np.fromiter((s.q_len for s in group), dtype=np.int64, count=len(group))
        k = np.fromiter((s.k_len for s in group), dtype=np.int64, count=len(group))
        off = np.fromiter((s.offset for s in group), dtype=np.int64, count=len(group))
        total += int(mask_area(q, k, causal, window, off).sum())
    return total


def attention_flops(area: int | np.ndarray, num_heads: int, head_dim: int, backward: bool = False):
    """Forward (or backward, 2.5x) FLOPs of attention over ``area`` visible pairs."""
    fwd = 4 * area * num_heads * head_dim
    return fwd * BWD_FLOPS_FACTOR if backward else fwd


def document_flops(doc_lens, causal: bool, window: int | None, num_heads: int, head_dim: int) -> float:
    """Forward plus backward attention FLOPs of a packed sequence (backward = 2.5x forward)."""
    lens = np.asarray(doc_lens, dtype=np.int64)
    area = int(mask_area(lens, lens, causal, window).sum())
    return (1 + BWD_FLOPS_FACTOR) * float(attention_flops(area, num_heads, head_dim))


def next_token_labels(tokens: torch.Tensor, doc_lens) -> torch.Tensor:
    """``[S]`` labels: the next token of the same document, -100 on each document's last token
    (the loss never crosses a document boundary)."""
    labels = torch.full_like(tokens, -100)
    labels[:-1] = tokens[1:]
    ends = torch.tensor(doc_lens, device=tokens.device).cumsum(0) - 1
    labels[ends] = -100
    return labels
