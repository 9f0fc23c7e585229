"""Attention in plain PyTorch ops, block by block, on any device: the ``torch`` backend's path for
what PyTorch's fused kernels cannot do (logit soft-capping; v with a head dim of its own, MLA).

Per segment, query blocks of up to ``_ROWS`` rows (fewer when the keys are many, so that a block's
scores stay under ``_BUDGET`` elements) against only the keys the block's band can reach; scores,
softmax and gradients in the accumulator dtype (fp32, fp64 for fp64 inputs). The backward follows
the kernels' contract: it takes the rows' *final* ``out``/``lse``, uses ``P = exp(s - lse)`` and
``Delta = rowsum(dout * out)`` (or the ``delta`` given), so blocks of keys differentiate
independently. With ``softcap = c`` the score ``s = scale * q.k`` becomes ``c * tanh(s / c)``
before masking, and the backward multiplies ``dS`` by ``1 - tanh(s / c)^2``.

The loops run on the host over Python ints of the layout: no device synchronisation.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from distattn.kernels.merge import acc_dtype

_ROWS = 256
_BUDGET = 1 << 24  # score elements per block: 64 MiB in fp32


def row_ranges(m: int, n: int, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    """Per query row of a segment (``m`` queries, ``n`` keys, band ``lo <= j - i <= hi``), the
    inclusive key range ``[first, last]`` it sees; ``first > last``: none. Both non-decreasing."""
    i = np.arange(m, dtype=np.int64)
    return np.maximum(i + lo, 0), np.minimum(i + hi, n - 1)


def live_rows(m: int, n: int, lo: int, hi: int) -> tuple[int, int]:
    """``[r0, r1)``: the rows of a segment that see at least one key (they are contiguous)."""
    if m == 0 or n == 0 or lo > hi:
        return 0, 0
    r0, r1 = max(0, -hi), min(m, n - lo)
    return (r0, r1) if r0 < r1 else (0, 0)


def blocks(m: int, n: int, lo: int, hi: int, heads: int) -> Iterator[tuple[int, int, int, int]]:
    """``(b0, b1, k0, k1)``: query rows ``[b0, b1)`` of a segment against keys ``[k0, k1)``, every
    key any of these rows sees; together the blocks cover the live rows once."""
    r0, r1 = live_rows(m, n, lo, hi)
    if r0 == r1:
        return
    width = min(n, hi - lo + 1)
    rows = int(np.clip(_BUDGET // (max(heads, 1) * (width + _ROWS)), 16, _ROWS))
    for b0 in range(r0, r1, rows):
        b1 = min(b0 + rows, r1)
        yield b0, b1, max(0, b0 + lo), min(n, b1 + hi)


def band_keep(b0: int, b1: int, k0: int, k1: int, lo: int, hi: int, device) -> torch.Tensor:
    """Boolean ``[b1 - b0, k1 - k0]``: which (row, key) pairs of the block the band keeps."""
    d = torch.arange(k0, k1, device=device).unsqueeze(0) - torch.arange(b0, b1, device=device).unsqueeze(1)
    return (d >= lo) & (d <= hi)


def _scores(qb, kb, scale, softcap):
    """``[Hkv, g, b, n]`` (capped) scores and ``tanh(s / c)`` (None without softcap)."""
    s = torch.einsum("bhgd,nhd->hgbn", qb, kb) * scale
    if softcap is None:
        return s, None
    t = torch.tanh(s / softcap)
    return t * softcap, t


def _grouped(x: torch.Tensor, hkv: int) -> torch.Tensor:
    """``[T, Hq, D]`` -> ``[T, Hkv, g, D]`` (a view)."""
    return x.view(x.shape[0], hkv, x.shape[1] // hkv, *x.shape[2:])


def math_fwd(q, k, v, seg, scale: float, softcap: float | None):
    dtype = acc_dtype(q.dtype)
    hq, hkv = q.shape[1], k.shape[1]
    out = torch.zeros((*q.shape[:2], v.shape[2]), dtype=dtype, device=q.device)
    lse = torch.full(q.shape[:2], float("-inf"), dtype=dtype, device=q.device)
    for q0, q1, k0, k1, lo, hi in seg.segments():
        for b0, b1, c0, c1 in blocks(q1 - q0, k1 - k0, lo, hi, hq):
            rq, rk = slice(q0 + b0, q0 + b1), slice(k0 + c0, k0 + c1)
            s, _ = _scores(_grouped(q[rq].to(dtype), hkv), k[rk].to(dtype), scale, softcap)
            s = s.masked_fill(~band_keep(b0, b1, c0, c1, lo, hi, q.device), float("-inf"))
            l = torch.logsumexp(s, -1)  # [Hkv, g, b]: every row of a block sees a key
            p = torch.exp(s - l.unsqueeze(-1))
            out[rq] = torch.einsum("hgbn,nhd->bhgd", p, v[rk].to(dtype)).reshape(b1 - b0, hq, -1)
            lse[rq] = l.permute(2, 0, 1).reshape(b1 - b0, hq)
    return out.to(q.dtype), lse


def math_bwd(dout, q, k, v, out, lse, seg, scale: float, softcap: float | None, delta=None):
    dtype = acc_dtype(q.dtype)
    hq, hkv = q.shape[1], k.shape[1]
    dq = torch.zeros(q.shape, dtype=dtype, device=q.device)
    dk = torch.zeros(k.shape, dtype=dtype, device=q.device)
    dv = torch.zeros(v.shape, dtype=dtype, device=q.device)
    delta = (dout.to(dtype) * out.to(dtype)).sum(-1) if delta is None else delta.to(dtype)
    # a row with lse = -inf saw no key anywhere: give it P = 0 rather than exp(s + inf)
    lse = lse.to(dtype).masked_fill(torch.isneginf(lse), float("inf"))
    for q0, q1, k0, k1, lo, hi in seg.segments():
        for b0, b1, c0, c1 in blocks(q1 - q0, k1 - k0, lo, hi, hq):
            rq, rk = slice(q0 + b0, q0 + b1), slice(k0 + c0, k0 + c1)
            qb, dob = _grouped(q[rq].to(dtype), hkv), _grouped(dout[rq].to(dtype), hkv)
            kb, vb = k[rk].to(dtype), v[rk].to(dtype)
            s, t = _scores(qb, kb, scale, softcap)
            s = s.masked_fill(~band_keep(b0, b1, c0, c1, lo, hi, q.device), float("-inf"))
            p = torch.exp(s - _grouped(lse[rq], hkv).permute(1, 2, 0).unsqueeze(-1))
            dp = torch.einsum("bhgd,nhd->hgbn", dob, vb)
            ds = p * (dp - _grouped(delta[rq], hkv).permute(1, 2, 0).unsqueeze(-1))
            if t is not None:
                ds = ds * (1 - t * t)
            dq[rq] += (torch.einsum("hgbn,nhd->bhgd", ds, kb) * scale).reshape(b1 - b0, hq, -1)
            dk[rk] += torch.einsum("hgbn,bhgd->nhd", ds, qb) * scale
            dv[rk] += torch.einsum("hgbn,bhgd->nhd", p, dob)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
