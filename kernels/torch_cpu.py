"""``backend="torch"`` on CPU: PyTorch's fused CPU flash attention, per segment.

``aten._scaled_dot_product_flash_attention_for_cpu`` returns the log-sum-exp and
has a matching backward that takes the final ``out``/``lse``, which is what a
context-parallel block needs. It handles GQA natively but aligns ``is_causal``
top-left and takes masks only as dense additive tensors, so each segment's band
(query ``i`` sees key ``j`` iff ``lo <= j - i <= hi``) is cut into *tiles* that
need at most a small mask:

* no bound: one tile, no mask;
* only ``hi`` bounded (bottom-right causal, or causal shifted anyhow): the key
  prefix every live query sees (no mask), the diagonal block (``is_causal``,
  aligned so that top-left equals the true geometry) and, for queries past the
  keys' end, the rest as a full tile;
* ``lo`` bounded (windows, "inverse causal" ``j >= i``, two-sided bands): query
  blocks of ``_BLOCK`` rows; the keys all rows of a block see form one unmasked
  tile, the ragged key ranges left and right of it (at most a block wide) tiles
  with an additive mask over just the rows that see something there; a block
  whose common keys are few is one masked tile.

Partial results merge by log-sum-exp. Rows that see no key are left out of
every tile and keep ``out = 0``, ``lse = -inf``.

Segments of at most 128 queries and keys skip all this: :mod:`.torch_cpu_buckets` computes them
in a few batched calls, since one call per short document costs far more than its arithmetic
(``per_document=True`` turns that off, for comparisons).

Logit soft-capping (``softcap``) and a value head dim of its own (MLA: q/k 192, v 128) go
through :mod:`.torch_math` instead (plain PyTorch ops, block by block, forward and a
hand-written backward): the fused op has no soft-cap and wants one head dim.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from distattn.planning.masks import UNBOUNDED
from distattn.kernels.merge import acc_dtype, merge_

from .torch_cpu_buckets import short_bwd, short_fwd, split_short
from .torch_math import live_rows, math_bwd, math_fwd, row_ranges

_BLOCK = 256
_fwd_op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_bwd_op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward

# (q0, q1, k0, k1, is_causal, additive mask or None), segment-local coordinates
Tile = tuple[int, int, int, int, bool, "torch.Tensor | None"]


def _masked(first: np.ndarray, last: np.ndarray, b0: int, b1: int, k0: int, k1: int, dtype) -> torch.Tensor:
    j = torch.arange(k0, k1)
    keep = (j >= torch.from_numpy(first[b0:b1]).unsqueeze(1)) & (j <= torch.from_numpy(last[b0:b1]).unsqueeze(1))
    return torch.zeros(keep.shape, dtype=dtype).masked_fill_(~keep, float("-inf"))


def _tile_bounds(m: int, n: int, lo: int, hi: int, ranges=None) -> Iterator[tuple[int, int, int, int, bool, bool]]:
    """``(q0, q1, k0, k1, is_causal, masked)`` of each tile (module docstring), no mask built;
    ``ranges``: the band's ``row_ranges`` when the caller has them."""
    r0, r1 = live_rows(m, n, lo, hi)
    if r0 == r1:
        return
    if lo <= -UNBOUNDED and hi >= UNBOUNDED:
        yield 0, m, 0, n, False, False
        return
    first, last = ranges if ranges is not None else row_ranges(m, n, lo, hi)
    if lo <= -UNBOUNDED:
        # every live row sees keys [0, p0) (p0: the first live row's last key); rows whose last
        # key is still inside the keys form a top-left-aligned causal tile on keys [p0, n); rows
        # past the keys' end see [p0, n) entirely.
        p0 = int(last[r0])
        if p0 > 0:
            yield r0, r1, 0, p0, False, False
        rc = min(r1, r0 + n - p0)
        yield r0, rc, p0, n, True, False
        if rc < r1:
            yield rc, r1, p0, n, False, False
        return
    for b0 in range(r0, r1, _BLOCK):
        b1 = min(b0 + _BLOCK, r1)
        k0, k1 = int(first[b0]), int(last[b1 - 1]) + 1
        common0, common1 = int(first[b1 - 1]), int(last[b0]) + 1  # keys every row of the block sees
        if common1 - common0 < _BLOCK // 2:
            yield b0, b1, k0, k1, False, True
            continue
        if k0 < common0:  # rows whose first key lies left of the common keys
            e = b0 + int(np.searchsorted(first[b0:b1], common0, side="left"))
            yield b0, e, k0, common0, False, True
        yield b0, b1, common0, common1, False, False
        if common1 < k1:  # rows whose last key lies right of them
            s = b0 + int(np.searchsorted(last[b0:b1], common1 - 1, side="right"))
            yield s, b1, common1, k1, False, True


def _tiles(m: int, n: int, lo: int, hi: int, dtype: torch.dtype) -> Iterator[Tile]:
    first, last = row_ranges(m, n, lo, hi)
    for a, b, c, d, is_causal, masked in _tile_bounds(m, n, lo, hi, (first, last)):
        yield a, b, c, d, is_causal, _masked(first, last, a, b, c, d, dtype) if masked else None


def _computed_pairs(rows: int, keys: int, is_causal: bool) -> int:
    """Pairs the fused op computes for a tile: PyTorch's CPU flash kernel (FlashAttentionKernel.cpp)
    runs blocks of 256 query rows (64 from 192 rows, else 32) against blocks of 512 keys; with
    ``is_causal`` a query block stops at the key block holding its last row's diagonal, which it
    computes whole."""
    if not is_causal:
        return rows * keys
    split = 256 if rows >= 768 else 64 if rows >= 192 else 32
    start = np.arange(0, rows, split)
    block = np.minimum(split, rows - start)
    last = np.minimum(start + block, keys)
    return int(np.sum(block * np.minimum(-(-last // 512) * 512, keys)))


def tile_shapes(m: int, n: int, lo: int, hi: int) -> list[tuple[int, int, int, bool]]:
    """``(rows, keys, pairs computed, masked)`` of each fused call one segment makes (``m`` queries,
    ``n`` keys, band ``lo <= j - i <= hi``): what ``simulate --calibrate`` costs this backend by. A
    masked tile computes its whole rectangle (the mask is added to every score), an ``is_causal`` one
    its blocks up to the diagonal (:func:`_computed_pairs`)."""
    return [(b - a, d - c, _computed_pairs(b - a, d - c, is_causal), masked)
            for a, b, c, d, is_causal, masked in _tile_bounds(m, n, lo, hi)]


def _bhld(x: torch.Tensor) -> torch.Tensor:
    """``[L, H, D]`` -> the op's ``[1, H, L, D]`` (a view)."""
    return x.transpose(0, 1).unsqueeze(0)


def _fused_fwd(q, k, v, seg, scale):
    dtype = acc_dtype(q.dtype)
    out = torch.zeros(q.shape, dtype=dtype)
    lse = torch.full(q.shape[:2], float("-inf"), dtype=dtype)
    for q0, q1, k0, k1, lo, hi in seg.segments():
        for a, b, c, d, is_causal, mask in _tiles(q1 - q0, k1 - k0, lo, hi, q.dtype):
            o, l = _fwd_op(_bhld(q[q0 + a:q0 + b]), _bhld(k[k0 + c:k0 + d]), _bhld(v[k0 + c:k0 + d]),
                           0.0, is_causal, attn_mask=mask, scale=scale)
            merge_(out[q0 + a:q0 + b], lse[q0 + a:q0 + b], o[0].transpose(0, 1), l[0].transpose(0, 1))
    return out.to(q.dtype), lse


def _fused_bwd(dout, q, k, v, out, lse, seg, scale):
    dtype = acc_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=dtype)
    dk = torch.zeros(k.shape, dtype=dtype)
    dv = torch.zeros(v.shape, dtype=dtype)
    for q0, q1, k0, k1, lo, hi in seg.segments():
        for a, b, c, d, is_causal, mask in _tiles(q1 - q0, k1 - k0, lo, hi, q.dtype):
            rq, rk = slice(q0 + a, q0 + b), slice(k0 + c, k0 + d)
            g = _bwd_op(_bhld(dout[rq]), _bhld(q[rq]), _bhld(k[rk]), _bhld(v[rk]), _bhld(out[rq]),
                        lse[rq].transpose(0, 1).unsqueeze(0), 0.0, is_causal, attn_mask=mask, scale=scale)
            dq[rq] += g[0][0].transpose(0, 1)
            dk[rk] += g[1][0].transpose(0, 1)
            dv[rk] += g[2][0].transpose(0, 1)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _needs_math(q, v, softcap) -> bool:
    return softcap is not None or v.shape[-1] != q.shape[-1]


def torch_fwd(q, k, v, seg, scale, softcap=None, *, per_document: bool = False):
    """``per_document``: run every segment on its own, short ones included (the path before
    bucketing, kept for the before/after benchmark)."""
    short, rest = (None, seg) if per_document else split_short(seg)
    if _needs_math(q, v, softcap):
        out, lse = math_fwd(q, k, v, rest, scale, softcap)
    else:
        out, lse = _fused_fwd(q, k, v, rest, scale)
    if short is not None:
        short_fwd(q, k, v, short, scale, softcap, out, lse)
    return out, lse


def torch_bwd(dout, q, k, v, out, lse, seg, scale, softcap=None, delta=None, *, per_document: bool = False):
    short, rest = (None, seg) if per_document else split_short(seg)
    if _needs_math(q, v, softcap):
        grads = math_bwd(dout, q, k, v, out, lse, rest, scale, softcap, delta)
    else:
        grads = _fused_bwd(dout, q, k, v, out, lse, rest, scale)
    if short is None:
        return grads
    # the batched part is in fp64; the two parts' rows and keys are disjoint
    # (split_short), so adding the already rounded rest rounds nothing twice
    extra = short_bwd(dout, q, k, v, out, lse, short, scale, softcap, delta)
    return tuple((e + g.to(e.dtype)).to(g.dtype) for e, g in zip(extra, grads))
