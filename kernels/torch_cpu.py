"""``backend="torch"`` on CPU: PyTorch's fused CPU flash attention, per segment.

``aten._scaled_dot_product_flash_attention_for_cpu`` returns the log-sum-exp and
has a matching backward that takes the final ``out``/``lse``, which is what a
context-parallel block needs. It handles GQA natively but aligns ``is_causal``
top-left and takes masks only as dense additive tensors, so each segment is cut
into *tiles* that need at most a small mask:

* full attention: one tile, no mask;
* causal: the key prefix every query sees (no mask) plus the diagonal block
  (``is_causal``, aligned so that top-left equals the true geometry) and, for
  queries past the keys' end, the rest as a full tile; results merge by
  log-sum-exp;
* sliding window: query blocks of ``_BLOCK`` rows against only the keys the block
  can see, with an additive mask of ``_BLOCK x (_BLOCK + window)`` entries.

Rows that see no key are left out of every tile and keep ``out = 0``, ``lse = -inf``.
"""

from __future__ import annotations

from typing import Iterator

import torch

from distattn.masks import visible_keys
from distattn.merge import acc_dtype, merge_


_BLOCK = 256
_fwd_op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_bwd_op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward

# (q0, q1, k0, k1, is_causal, additive mask or None), segment-local coordinates
Tile = tuple[int, int, int, int, bool, "torch.Tensor | None"]


def _tiles(m: int, n: int, causal: bool, window: int | None, offset: int, dtype: torch.dtype) -> Iterator[Tile]:
    if m == 0 or n == 0:
        return
    if not causal and window is None:
        yield 0, m, 0, n, False, None
        return
    lo, hi = visible_keys(m, n, causal, window, offset)
    rows = (lo <= hi).nonzero()[0]
    if rows.size == 0:
        return
    r0, r1 = int(rows[0]), int(rows[-1]) + 1
    if window is None:
        # causal: every row sees keys [0, p0) (p0: first row's position); rows whose
        # position is still inside the keys form a top-left-aligned causal tile on
        # keys [p0, n); rows past the keys' end see [p0, n) entirely.
        p0 = int(hi[r0])
        if p0 > 0:
            yield r0, r1, 0, p0, False, None
        rc = min(r1, r0 + n - p0)
        yield r0, rc, p0, n, True, None
        if rc < r1:
            yield rc, r1, p0, n, False, None
        return
    for b0 in range(r0, r1, _BLOCK):
        b1 = min(b0 + _BLOCK, r1)
        k0, k1 = int(lo[b0]), int(hi[b1 - 1]) + 1
        j = torch.arange(k0, k1)
        keep = (j >= torch.from_numpy(lo[b0:b1]).unsqueeze(1)) & (j <= torch.from_numpy(hi[b0:b1]).unsqueeze(1))
        mask = torch.zeros(keep.shape, dtype=dtype).masked_fill_(~keep, float("-inf"))
        yield b0, b1, k0, k1, False, mask


def _bhld(x: torch.Tensor) -> torch.Tensor:
    """``[L, H, D]`` -> the op's ``[1, H, L, D]`` (a view)."""
    return x.transpose(0, 1).unsqueeze(0)


def torch_fwd(q, k, v, seg, causal, window, scale):
    dtype = acc_dtype(q.dtype)
    out = torch.zeros(q.shape, dtype=dtype)
    lse = torch.full(q.shape[:2], float("-inf"), dtype=dtype)
    for q0, q1, k0, k1, offset in seg.segments():
        for a, b, c, d, is_causal, mask in _tiles(q1 - q0, k1 - k0, causal, window, offset, q.dtype):
            o, l = _fwd_op(_bhld(q[q0 + a:q0 + b]), _bhld(k[k0 + c:k0 + d]), _bhld(v[k0 + c:k0 + d]),
                           0.0, is_causal, attn_mask=mask, scale=scale)
            merge_(out[q0 + a:q0 + b], lse[q0 + a:q0 + b], o[0].transpose(0, 1), l[0].transpose(0, 1))
    return out.to(q.dtype), lse


def torch_bwd(dout, q, k, v, out, lse, seg, causal, window, scale, delta=None):
    dtype = acc_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=dtype)
    dk = torch.zeros(k.shape, dtype=dtype)
    dv = torch.zeros(v.shape, dtype=dtype)
    for q0, q1, k0, k1, offset in seg.segments():
        for a, b, c, d, is_causal, mask in _tiles(q1 - q0, k1 - k0, causal, window, offset, q.dtype):
            rq, rk = slice(q0 + a, q0 + b), slice(k0 + c, k0 + d)
            g = _bwd_op(_bhld(dout[rq]), _bhld(q[rq]), _bhld(k[rk]), _bhld(v[rk]), _bhld(out[rq]),
                        lse[rq].transpose(0, 1).unsqueeze(0), 0.0, is_causal, attn_mask=mask, scale=scale)
            dq[rq] += g[0][0].transpose(0, 1)
            dk[rk] += g[1][0].transpose(0, 1)
            dv[rk] += g[2][0].transpose(0, 1)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
