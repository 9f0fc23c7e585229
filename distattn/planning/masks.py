"""Attention masks as lists of slices (documents, MagiAttention-style slice masks) and their area.

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

The area (the unmasked (query, key) pairs) is what :mod:`distattn.costmodel.cost` turns into FLOPs and time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch


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
        if n > 2**40:   # (distattn.planning.doclens.MAX_DOC_LEN) past it, sums over documents overflow int64
            text = str(n) if len(str(n)) <= 24 else f"{str(n)[:16]}... ({len(str(n))} digits)"
            raise ValueError(f"{name}[{i}] = {text}: document lengths must be at most 2**40 tokens")
    return tuple(int(n) for n in values)


def batch_rows(doc_lens) -> tuple[tuple[int, ...], ...] | None:
    """The rows of a batched ``doc_lens`` -- a list with one list of document lengths per row of a
    ``[B, S]`` batch (or a 2-D int tensor/array), every row summing to the same ``S`` -- validated;
    None when ``doc_lens`` describes one packed sequence."""
    if isinstance(doc_lens, (torch.Tensor, np.ndarray)):
        if doc_lens.ndim != 2:
            return None
        rows = doc_lens.tolist()
    elif isinstance(doc_lens, (list, tuple)) and doc_lens and any(
            isinstance(row, (list, tuple, torch.Tensor, np.ndarray)) for row in doc_lens):
        rows = list(doc_lens)
        flat = [i for i, row in enumerate(rows) if not isinstance(row, (list, tuple, torch.Tensor, np.ndarray))]
        if flat:
            raise ValueError(f"doc_lens mixes rows and lengths (doc_lens[{flat[0]}] = {rows[flat[0]]!r}): pass one "
                             f"list of document lengths per batch row, or one flat list for one packed sequence")
    else:
        return None
    rows = tuple(as_doc_lens(row, name=f"doc_lens[{b}]") for b, row in enumerate(rows))
    sums = sorted({sum(row) for row in rows})
    if len(sums) > 1:
        raise ValueError(f"doc_lens rows sum to {sums[0]} .. {sums[-1]} tokens: every row of a [B, S] batch holds "
                         f"S tokens; pad the rows to one length (a padding document at a row's end)")
    return rows


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


def bound_or_none(x) -> int | None:
    """A stored bound as :class:`MaskSlice` takes it: None where it is ``±UNBOUNDED``."""
    return None if abs(int(x)) >= UNBOUNDED else int(x)


def shift_band(lo: np.ndarray, hi: np.ndarray, shift) -> tuple[np.ndarray, np.ndarray]:
    """Bands moved by ``shift`` (global -> relative to a segment's corner: ``shift = k0 - q0``),
    the unbounded sides left unbounded."""
    return np.where(lo <= -UNBOUNDED, lo, lo - shift), np.where(hi >= UNBOUNDED, hi, hi - shift)


def _bound(x: int | None, sign: int) -> int:
    return sign * UNBOUNDED if x is None else int(np.clip(x, -UNBOUNDED, UNBOUNDED))


@dataclass(frozen=True)
class MaskSlice:
    """Queries ``[q_start, q_end)`` against keys ``[k_start, k_end)``, global token positions; a
    pair ``(q, k)`` of the block is visible iff ``lo <= k - q <= hi`` (None: no bound). A document's
    causal mask is ``hi = 0``; a sliding window ``W`` adds ``lo = -(W - 1)`` (and ``hi = W - 1``
    without causality); MagiAttention's slice kinds are bands too (:class:`SliceMask`)."""

    q_start: int
    q_end: int
    k_start: int
    k_end: int
    lo: int | None = None
    hi: int | None = None

    def __post_init__(self):
        if not (0 <= self.q_start <= self.q_end and 0 <= self.k_start <= self.k_end):
            raise ValueError(f"MaskSlice ranges need 0 <= start <= end, got {self}")

    @classmethod
    def document(cls, q_start: int, q_end: int, k_start: int, k_end: int, causal: bool,
                 window: int | None = None) -> "MaskSlice":
        """A block of one document under its (causal, window) mask."""
        window = check_window(window)
        lo = None if window is None else -(window - 1)
        hi = 0 if causal else (None if window is None else window - 1)
        return cls(q_start, q_end, k_start, k_end, lo, hi)

    @property
    def q_len(self) -> int:
        return self.q_end - self.q_start

    @property
    def k_len(self) -> int:
        return self.k_end - self.k_start

    def local_band(self) -> tuple[int, int]:
        """``(lo, hi)`` relative to the block's first query and key (``lo <= j - i <= hi``)."""
        shift = self.k_start - self.q_start
        return _bound(self.lo, -1) - shift, _bound(self.hi, 1) - shift

    def area(self) -> int:
        return int(band_area(self.q_len, self.k_len, *self.local_band()))


def document_mask(doc_lens, causal: bool = True, window: int | None = None) -> list[MaskSlice]:
    """The mask of a packed sequence: one square slice per document, nothing across."""
    lens = as_doc_lens(doc_lens)
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
    return [MaskSlice.document(int(s), int(s + n), int(s), int(s + n), causal, window) for s, n in zip(starts, lens)]


def slices_area(slices: Sequence[MaskSlice]) -> int:
    """Total visible pairs of a list of slices (vectorised)."""
    if not slices:
        return 0
    q0, q1, k0, k1, lo, hi = (np.fromiter(x, dtype=np.int64, count=len(slices)) for x in zip(*(
        (s.q_start, s.q_end, s.k_start, s.k_end, _bound(s.lo, -1), _bound(s.hi, 1)) for s in slices)))
    return int(band_area(q1 - q0, k1 - k0, lo - (k0 - q0), hi - (k0 - q0)).sum())


KINDS = ("full", "causal", "inv_causal", "bi_causal")


class SliceMask:
    """An attention mask over one packed sequence as a list of slices (MagiAttention's AttnSlice).

    ``SliceMask([(q_start, q_end, k_start, k_end, kind), ...])``: queries ``[q_start, q_end)`` see
    keys ``[k_start, k_end)`` (global token positions) under ``kind``, with ``i``/``j`` the query's
    and key's index inside the slice, ``m``/``n`` its query and key counts:

    * ``"full"``: every pair;
    * ``"causal"``: bottom-right aligned, ``j <= i + n - m``;
    * ``"inv_causal"``: top-left aligned, ``j >= i``;
    * ``"bi_causal"``: both, ``i <= j <= i + n - m``.

    Slices may share keys or queries but not a visible (query, key) pair (``ValueError``); a pair
    in no slice is masked out, and a query row in none gives ``out = 0``. Every kind is a band of
    diagonals: internally each slice is stored as its rectangle and ``lo <= k - q <= hi`` in global
    positions (:class:`MaskSlice`), the form the planners and kernels use.
    Constructors: :meth:`documents`, :func:`shared_question`, :func:`prefix_lm`, :func:`causal_blockwise`.
    """

    def __init__(self, slices):
        if isinstance(slices, SliceMask):
            arrays = slices.arrays
        else:
            try:
                rows = [tuple(x) for x in slices]
            except TypeError:
                raise ValueError(f"SliceMask takes a list of (q_start, q_end, k_start, k_end, kind) tuples, "
                                 f"got {type(slices).__name__}") from None
            if not rows:
                raise ValueError("SliceMask needs at least one slice")
            arrays = _kinds_to_bands(rows)
        self._set(*arrays)
        self._check_disjoint()

    @classmethod
    def from_bands(cls, q0, q1, k0, k1, lo, hi, *, check: bool = True) -> "SliceMask":
        """Slices as arrays: rectangles and global diagonal bounds ``lo <= k - q <= hi``
        (``±UNBOUNDED``: none)."""
        mask = cls.__new__(cls)
        mask._set(q0, q1, k0, k1, lo, hi)
        if check:
            mask._check_disjoint()
        return mask

    @classmethod
    def documents(cls, doc_lens, causal: bool = True, window: int | None = None) -> "SliceMask":
        """The document mask: one square slice per document (causal and/or sliding window inside)."""
        lens = np.asarray(as_doc_lens(doc_lens), dtype=np.int64)
        window = check_window(window)
        starts = np.cumsum(lens) - lens
        lo = np.full(len(lens), -UNBOUNDED if window is None else -(window - 1), dtype=np.int64)
        hi = np.full(len(lens), 0 if causal else (UNBOUNDED if window is None else window - 1), dtype=np.int64)
        return cls.from_bands(starts, starts + lens, starts, starts + lens, lo, hi, check=False)

    def _set(self, q0, q1, k0, k1, lo, hi) -> None:
        q0, q1, k0, k1, lo, hi = (np.asarray(x, dtype=np.int64).reshape(-1) for x in (q0, q1, k0, k1, lo, hi))
        lo, hi = np.clip(lo, -UNBOUNDED, UNBOUNDED), np.clip(hi, -UNBOUNDED, UNBOUNDED)
        keep = band_area(q1 - q0, k1 - k0, lo - (k0 - q0), hi - (k0 - q0)) > 0  # empty slices change nothing
        order = np.lexsort((k0[keep], q0[keep]))
        self.arrays = tuple(x[keep][order] for x in (q0, q1, k0, k1, lo, hi))
        for a in self.arrays:
            a.setflags(write=False)
        self.q0, self.q1, self.k0, self.k1, self.lo, self.hi = self.arrays

    def _check_disjoint(self) -> None:
        """``ValueError`` if two slices share a visible pair (candidates: slices sharing query rows)."""
        q0, q1, k0, k1, lo, hi = self.arrays
        end = np.searchsorted(q0, q1, side="left")      # sorted by q0: slices after i starting before q1[i]
        count = np.maximum(end - np.arange(len(q0)) - 1, 0)
        i = np.repeat(np.arange(len(q0)), count)
        j = i + 1 + np.arange(len(i)) - np.repeat(np.cumsum(count) - count, count)
        qs, qe = np.maximum(q0[i], q0[j]), np.minimum(q1[i], q1[j])
        ks, ke = np.maximum(k0[i], k0[j]), np.minimum(k1[i], k1[j])
        both = band_area(np.maximum(qe - qs, 0), np.maximum(ke - ks, 0), np.maximum(lo[i], lo[j]) - (ks - qs),
                         np.minimum(hi[i], hi[j]) - (ks - qs))
        bad = np.nonzero(both > 0)[0]
        if len(bad):
            a, b = (self.slices()[x] for x in (i[bad[0]], j[bad[0]]))
            raise ValueError(f"SliceMask slices overlap in {int(both[bad[0]])} (query, key) pairs: {a} and {b}; "
                             f"slices may share rows or keys but not pairs -- split or trim one of them")

    def __len__(self) -> int:
        return len(self.q0)

    def __repr__(self) -> str:
        return f"SliceMask({len(self)} slices, {self.area()} visible pairs)"

    @property
    def end(self) -> int:
        """One past the last query or key position any slice uses."""
        return int(max(self.q1.max(initial=0), self.k1.max(initial=0)))

    def slices(self) -> list[MaskSlice]:
        return [MaskSlice(int(a), int(b), int(c), int(d), bound_or_none(e), bound_or_none(f)) for a, b, c, d, e, f in
                zip(*self.arrays)]

    def area(self) -> int:
        """Visible (query, key) pairs."""
        q0, q1, k0, k1, lo, hi = self.arrays
        return int(band_area(q1 - q0, k1 - k0, lo - (k0 - q0), hi - (k0 - q0)).sum())

    @property
    def rows_disjoint(self) -> bool:
        """No query row lies in two slices."""
        return bool((self.q0[1:] >= np.maximum.accumulate(self.q1)[:-1]).all()) if len(self) > 1 else True

    def check_length(self, total: int) -> None:
        if self.end > total:
            raise ValueError(f"mask reaches position {self.end} but the sequence has {total} tokens "
                             f"(sum of doc_lens): every slice must lie inside [0, {total})")

    def dense(self, total: int, device: torch.device | str | None = None) -> torch.Tensor:
        """Boolean ``[total, total]`` visibility (True = attend): for oracles and small tests."""
        self.check_length(total)
        q = torch.arange(total, device=device).unsqueeze(1)
        k = torch.arange(total, device=device).unsqueeze(0)
        keep = torch.zeros(total, total, dtype=torch.bool, device=device)
        for a, b, c, d, e, f in zip(*(x.tolist() for x in self.arrays)):
            diag = k[:, c:d] - q[a:b]
            keep[a:b, c:d] |= (diag >= e) & (diag <= f)
        return keep


def _kinds_to_bands(rows) -> tuple[np.ndarray, ...]:
    out = []
    for n, row in enumerate(rows):
        if len(row) != 5:
            raise ValueError(f"slice {n} = {row!r}: each slice is (q_start, q_end, k_start, k_end, kind)")
        *ends, kind = row
        for name, x in zip(("q_start", "q_end", "k_start", "k_end"), ends):
            if isinstance(x, bool) or not isinstance(x, (int, np.integer)) or x < 0:
                raise ValueError(f"slice {n}: {name} = {x!r} must be a non-negative int (a token position)")
        q0, q1, k0, k1 = (int(x) for x in ends)
        if q1 < q0 or k1 < k0:
            raise ValueError(f"slice {n} = {row!r}: needs q_start <= q_end and k_start <= k_end")
        if kind not in KINDS:
            raise ValueError(f"slice {n}: kind={kind!r} is unknown; choose one of {list(KINDS)}")
        lo = k0 - q0 if kind in ("inv_causal", "bi_causal") else -UNBOUNDED
        hi = k1 - q1 if kind in ("causal", "bi_causal") else UNBOUNDED
        out.append((q0, q1, k0, k1, lo, hi))
    return tuple(np.asarray(c, dtype=np.int64) for c in zip(*out))


def shared_question(question_len: int, answer_lens) -> SliceMask:
    """One question followed by several answers (reward modelling, GRPO-style rollouts packed with a
    shared prompt): the question is causal; each answer sees the whole question and itself causally,
    never another answer."""
    check_positive_ints(question_len=question_len)
    answers = as_doc_lens(answer_lens, name="answer_lens")
    ends = question_len + np.cumsum(answers)
    total = int(ends[-1])
    rows = [(0, question_len, 0, question_len, "causal"), (question_len, total, 0, question_len, "full")]
    rows += [(int(e - n), int(e), int(e - n), int(e), "causal") for e, n in zip(ends, answers)]
    return SliceMask(rows)


def prefix_lm(doc_lens, prefix_lens) -> SliceMask:
    """Prefix-LM documents: the first ``prefix_lens[d]`` tokens of document ``d`` see each other
    fully (bidirectional prefix), the rest is causal over the whole document so far."""
    lens = as_doc_lens(doc_lens)
    prefix = list(prefix_lens)
    if len(prefix) != len(lens):
        raise ValueError(f"prefix_lens has {len(prefix)} entries but doc_lens has {len(lens)}: one prefix per document")
    rows, start = [], 0
    for d, (n, p) in enumerate(zip(lens, prefix)):
        if isinstance(p, bool) or not isinstance(p, (int, np.integer)) or not 0 <= p <= n:
            raise ValueError(f"prefix_lens[{d}] = {p!r} must be an int in [0, {n}] (document {d} has {n} tokens)")
        if p:
            rows.append((start, start + p, start, start + p, "full"))
        if p < n:
            rows.append((start + p, start + n, start, start + n, "causal"))
        start += n
    return SliceMask(rows)


def causal_blockwise(block_lens) -> SliceMask:
    """Block-causal attention (e.g. video frames, chunked prefill): every token of block ``b`` sees
    every token of blocks ``0..b``."""
    lens = as_doc_lens(block_lens, name="block_lens")
    ends = np.cumsum(lens)
    return SliceMask([(int(e - n), int(e), 0, int(e), "full") for e, n in zip(ends, lens)])
