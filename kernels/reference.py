"""The ``reference`` backend: dense math per segment, exact in fp64.

Readable rather than fast: each segment builds its full score matrix and its
band mask (query ``i`` sees key ``j`` iff ``lo <= j - i <= hi``), soft-caps the
scores if asked (``c * tanh(s / c)``, before masking). It always computes in
fp64 and rounds the results to the input dtype (lse to fp32, or fp64 for fp64
inputs; with ``partial=True`` every result to the accumulator dtype), so it is
the most accurate backend at any dtype and the one the schedulers are tested
with for exactness.
"""

from __future__ import annotations

import torch

from distattn.kernels.merge import acc_dtype

from .registry import Backend


def band_mask(m: int, n: int, lo: int, hi: int, device=None) -> torch.Tensor:
    """Boolean ``[m, n]``: True where ``lo <= j - i <= hi``."""
    d = torch.arange(n, device=device).unsqueeze(0) - torch.arange(m, device=device).unsqueeze(1)
    return (d >= lo) & (d <= hi)


def _scores(q, k, lo, hi, scale, softcap, group):
    """``[Hq, m, n]`` scores (soft-capped) with masked entries at -inf, and ``tanh(s / c)`` or None."""
    s = torch.einsum("mhd,nhd->hmn", q, k.repeat_interleave(group, dim=1)) * scale
    t = None
    if softcap is not None:
        t = torch.tanh(s / softcap)
        s = softcap * t
    keep = band_mask(q.shape[0], k.shape[0], lo, hi, device=q.device)
    return s.masked_fill(~keep, float("-inf")), t


def _finite(lse):
    # Rows with no visible key have lse = -inf; exp(s - lse) would be NaN there.
    return torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)


def reference_fwd(q, k, v, seg, scale, softcap=None, partial=False):
    dtype = torch.float64
    group = q.shape[1] // k.shape[1]
    out = torch.zeros((*q.shape[:2], v.shape[2]), dtype=dtype, device=q.device)
    lse = torch.full(q.shape[:2], float("-inf"), dtype=dtype, device=q.device)
    for q0, q1, k0, k1, lo, hi in seg.segments():
        if q1 == q0 or k1 == k0:
            continue
        qs, ks, vs = (t.to(dtype) for t in (q[q0:q1], k[k0:k1], v[k0:k1]))
        s, _ = _scores(qs, ks, lo, hi, scale, softcap, group)
        l = torch.logsumexp(s, dim=-1)  # [Hq, m]
        p = torch.exp(s - _finite(l).unsqueeze(-1))
        out[q0:q1] = torch.einsum("hmn,nhd->mhd", p, vs.repeat_interleave(group, dim=1))
        lse[q0:q1] = l.transpose(0, 1)
    return out.to(acc_dtype(q.dtype) if partial else q.dtype), lse.to(acc_dtype(q.dtype))


def reference_bwd(dout, q, k, v, out, lse, seg, scale, softcap=None, delta=None, partial=False):
    dtype = torch.float64
    hq, hkv = q.shape[1], k.shape[1]
    group = hq // hkv
    dq = torch.zeros(q.shape, dtype=dtype, device=q.device)
    dk = torch.zeros(k.shape, dtype=dtype, device=q.device)
    dv = torch.zeros(v.shape, dtype=dtype, device=q.device)
    delta = (dout.to(dtype) * out.to(dtype)).sum(-1)  # [Tq, Hq], in fp64 whatever the caller has
    for q0, q1, k0, k1, lo, hi in seg.segments():
        if q1 == q0 or k1 == k0:
            continue
        qs, ks, vs, dos = (t.to(dtype) for t in (q[q0:q1], k[k0:k1], v[k0:k1], dout[q0:q1]))
        s, t = _scores(qs, ks, lo, hi, scale, softcap, group)
        p = torch.exp(s - _finite(lse[q0:q1].to(dtype)).transpose(0, 1).unsqueeze(-1))  # [Hq, m, n]
        v_rep = vs.repeat_interleave(group, dim=1)
        dp = torch.einsum("mhd,nhd->hmn", dos, v_rep)
        ds = p * (dp - delta[q0:q1].transpose(0, 1).unsqueeze(-1))
        if t is not None:
            ds = ds * (1 - t * t)
        dq[q0:q1] = torch.einsum("hmn,nhd->mhd", ds, ks.repeat_interleave(group, dim=1)) * scale
        n = k1 - k0
        dk[k0:k1] = (torch.einsum("hmn,mhd->nhd", ds, qs) * scale).view(n, hkv, group, -1).sum(2)
        dv[k0:k1] = torch.einsum("hmn,mhd->nhd", p, dos).view(n, hkv, group, -1).sum(2)
    dtype = acc_dtype(q.dtype) if partial else q.dtype
    return dq.to(dtype), dk.to(dtype), dv.to(dtype)


BACKEND = Backend("reference", reference_fwd, reference_bwd, partials=True)
