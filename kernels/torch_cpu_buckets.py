"""The ``torch`` CPU backend's path for short segments: many documents in a few batched calls.

Run one by one, a segment of a few dozen tokens costs far more in Python and dispatch than in
arithmetic, so a layout of 10^5 short documents is dominated by per-call overhead. Segments whose
query and key counts are both at most ``_SHORT`` are instead grouped into *buckets* by their lengths
rounded up to a few steps (:func:`_pad`), and each bucket is gathered into zero-padded
``[B, L, H, D]`` tensors and computed with batched matmuls, ``_BUDGET`` score elements per call:
the number of calls grows with the number of distinct bucket shapes, not of documents.

The mask of a bucket is each segment's band (query ``i`` sees key ``j`` iff ``lo <= j - i <= hi``)
plus the padding; scores, softmax and gradients run in fp64 whatever the inputs (the fused
per-segment op's fp32 rounding, which tests hold other paths to, is not matched by reordered fp32
sums; with short documents the arithmetic is not the cost), with soft-capping,
GQA head groups and a value head dim of its own as in :mod:`.torch_math`, so the results equal the
per-segment paths' up to rounding. Rows that see no key keep ``out = 0``, ``lse = -inf``.
"""

from __future__ import annotations

import numpy as np
import torch

_SHORT = 128
_MIN_PAD = 8
_BUDGET = 1 << 20  # score elements per batched call: 8 MiB in fp64, small enough to stay off mmap


class Rest:
    """The segments left to the per-segment paths: only ``segments()``, which is all they read."""

    def __init__(self, rows: list[tuple[int, int, int, int, int, int]]):
        self._rows = rows

    def segments(self):
        return iter(self._rows)


def split_short(seg) -> tuple[np.ndarray | None, Rest]:
    """``(short, rest)``: ``short`` an int64 ``[6, n]`` array of ``(q0, q1, k0, k1, lo, hi)`` for the
    segments to batch (None if none), ``rest`` the others. Segments of a layout occupy consecutive
    query rows and keys (``cu_q``/``cu_k`` are running sums), so each row and key belongs to one
    segment at most: the batched results are written, not merged, next to the rest's."""
    cu_q, cu_k = seg.cu_q.astype(np.int64), seg.cu_k.astype(np.int64)
    lo, hi = seg.bands()
    table = np.stack([cu_q[:-1], cu_q[1:], cu_k[:-1], cu_k[1:], lo, hi])
    m, n = table[1] - table[0], table[3] - table[2]
    short = (m > 0) & (n > 0) & (m <= _SHORT) & (n <= _SHORT)
    if (m < 0).any() or (n < 0).any():  # not running sums (a hand-made Varlen): rows may be shared
        short[:] = False
    # empty segments produce nothing in any path
    long = ~short & (m > 0) & (n > 0)
    rest = Rest([tuple(r) for r in table[:, long].T.tolist()])
    return (table[:, short] if short.any() else None), rest


def _pad(x: np.ndarray) -> np.ndarray:
    """Padded length: a multiple of 8 up to 64, of 16 above. Powers of two would pad a 20-token
    document to 32 (2.6x the scores); these steps waste at most 1.4x and still give 12 shapes."""
    step = np.where(x > 64, 16, _MIN_PAD)
    return -(-np.maximum(x, 1) // step) * step


def chunks(short: np.ndarray, heads: int):
    """``(table, Lq, Lk)`` per batched call: the segments' columns of ``short`` sharing padded
    lengths ``Lq``/``Lk``, at most ``_BUDGET`` score elements per call."""
    pq, pk = _pad(short[1] - short[0]), _pad(short[3] - short[2])
    keys = pq * (2 * _SHORT + 1) + pk
    for key in np.unique(keys):
        cols = short[:, keys == key]
        lq, lk = int(key // (2 * _SHORT + 1)), int(key % (2 * _SHORT + 1))
        per_call = max(1, _BUDGET // (heads * lq * lk))
        for c in range(0, cols.shape[1], per_call):
            yield cols[:, c:c + per_call], lq, lk


def _index(start: torch.Tensor, count: torch.Tensor, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, pad]`` row indices of each segment (padding repeats its first row, so every index is in
    range) and which of them are real."""
    ar = torch.arange(pad)
    valid = ar < count.unsqueeze(1)
    return torch.where(valid, start.unsqueeze(1) + ar, start.unsqueeze(1)), valid


class _Batch:
    """One batched call's geometry: gather indices and the ``[B, 1, 1, Lq, Lk]`` keep-mask."""

    def __init__(self, cols: np.ndarray, lq: int, lk: int):
        t = torch.from_numpy(np.ascontiguousarray(cols))
        self.qi, self.qv = _index(t[0], t[1] - t[0], lq)
        self.ki, self.kv = _index(t[2], t[3] - t[2], lk)
        d = torch.arange(lk).unsqueeze(0) - torch.arange(lq).unsqueeze(1)  # j - i
        band = (d >= t[4].view(-1, 1, 1)) & (d <= t[5].view(-1, 1, 1))
        self.keep = (band & self.qv.unsqueeze(2) & self.kv.unsqueeze(1))[:, None, None]

    def rows(self, x: torch.Tensor, dtype: torch.dtype, hkv: int) -> torch.Tensor:
        """Query-side ``[T, Hq, ...]`` -> ``[B, Lq, Hkv, g, ...]`` in ``dtype``."""
        g = x[self.qi].to(dtype)
        return g.view(*g.shape[:2], hkv, x.shape[1] // hkv, *x.shape[2:])

    def keys(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return x[self.ki].to(dtype)


def _scores(b: _Batch, qb, kb, scale: float, softcap: float | None):
    """Masked ``[B, Hkv, g, Lq, Lk]`` (capped) scores and ``tanh(s / c)`` (None without softcap)."""
    s = torch.einsum("blhgd,bnhd->bhgln", qb, kb) * scale
    t = None
    if softcap is not None:
        t = torch.tanh(s / softcap)
        s = t * softcap
    return s.masked_fill(~b.keep, float("-inf")), t


def _per_row(x: torch.Tensor) -> torch.Tensor:
    """``[B, Lq, Hkv, g]`` -> ``[B, Hkv, g, Lq, 1]``, to broadcast over the keys."""
    return x.permute(0, 2, 3, 1).unsqueeze(-1)


def short_fwd(q, k, v, short: np.ndarray, scale: float, softcap: float | None,
              out: torch.Tensor, lse: torch.Tensor) -> None:
    """Attention of the ``short`` segments, written into their rows of ``out`` and ``lse`` (cast
    to their dtypes)."""
    dtype = torch.float64
    hq, hkv = q.shape[1], k.shape[1]
    for cols, lq, lk in chunks(short, hq):
        b = _Batch(cols, lq, lk)
        s, _ = _scores(b, b.rows(q, dtype, hkv), b.keys(k, dtype), scale, softcap)
        l = torch.logsumexp(s, -1)  # [B, Hkv, g, Lq]
        # a row that sees no key: l = -inf; subtracting +inf gives P = 0 rather than NaN
        p = torch.exp(s - l.masked_fill(torch.isneginf(l), float("inf")).unsqueeze(-1))
        o = torch.einsum("bhgln,bnhd->blhgd", p, b.keys(v, dtype))
        rows = b.qi[b.qv]
        out[rows] = o.reshape(*o.shape[:2], hq, -1)[b.qv].to(out.dtype)
        lse[rows] = l.permute(0, 3, 1, 2).reshape(*o.shape[:2], hq)[b.qv].to(lse.dtype)


def short_bwd(dout, q, k, v, out, lse, short: np.ndarray, scale: float, softcap: float | None,
              delta: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``dq, dk, dv`` (fp64, zero outside the ``short`` segments) from the rows' final
    ``out``/``lse``: ``P = exp(s - lse)``, ``dS = P * (dP - Delta)``, as :func:`.torch_math.math_bwd`."""
    dtype = torch.float64
    hq, hkv = q.shape[1], k.shape[1]
    dq = torch.zeros(q.shape, dtype=dtype)
    dk = torch.zeros(k.shape, dtype=dtype)
    dv = torch.zeros(v.shape, dtype=dtype)
    delta = (dout.to(dtype) * out.to(dtype)).sum(-1) if delta is None else delta.to(dtype)
    lse = lse.to(dtype).masked_fill(torch.isneginf(lse), float("inf"))
    for cols, lq, lk in chunks(short, hq):
        b = _Batch(cols, lq, lk)
        qb, dob, kb, vb = b.rows(q, dtype, hkv), b.rows(dout, dtype, hkv), b.keys(k, dtype), b.keys(v, dtype)
        s, t = _scores(b, qb, kb, scale, softcap)
        p = torch.exp(s - _per_row(b.rows(lse, dtype, hkv)))
        dp = torch.einsum("blhgd,bnhd->bhgln", dob, vb)
        ds = p * (dp - _per_row(b.rows(delta, dtype, hkv)))
        if t is not None:
            ds = ds * (1 - t * t)
        g = torch.einsum("bhgln,bnhd->blhgd", ds, kb) * scale
        # a layout's segments hold consecutive, disjoint rows and keys: assign, no accumulation
        dq[b.qi[b.qv]] = g.reshape(*g.shape[:2], hq, -1)[b.qv]
        dk[b.ki[b.kv]] = (torch.einsum("bhgln,blhgd->bnhd", ds, qb) * scale)[b.kv]
        dv[b.ki[b.kv]] = torch.einsum("bhgln,blhgd->bnhd", p, dob)[b.kv]
    return dq, dk, dv
