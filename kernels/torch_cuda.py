"""``backend="torch"`` on CUDA: PyTorch's own FlashAttention-2 varlen kernels.

``aten._flash_attention_forward``/``_backward`` (what
``torch.nn.attention.varlen.varlen_attn`` runs) take packed ``[T, H, D]``
tensors with ``cu_seqlens``, GQA without copies, a sliding window
``(left, right)`` around each query's bottom-right aligned position, and return
the log-sum-exp, ``[Hq, Tq]`` in natural log. The backward takes ``out`` and
``lse`` as arguments, so it accepts the *global* ones a context-parallel step
has merged (as ring-flash-attention does with flash-attn's varlen backward).

Our band maps onto the window: in a segment with ``m`` queries and ``n`` keys,
query ``i`` sees key ``j`` iff ``lo <= j - i <= hi``; FlashAttention puts query
``i`` at key position ``i + n - m`` and lets it see ``[i + n - m - left, i + n - m + right]``, so

* ``left = (n - m) - lo``, ``right = hi - (n - m)`` (``-1`` = unbounded, and bounds that
  cut nothing in the segment become ``-1``);
* a bound that cuts but comes out negative (queries sitting before their keys' end,
  ``q_offset < 0``, or a window past the keys) cannot be said: ``ValueError``, use
  ``backend="triton"``.

The window is one per kernel call, so segments are grouped by it when a plan is
prepared; one group (the usual case: every segment bottom-right aligned, or
ring blocks whose keys all precede the queries) is one call on the tensors as
they are, several groups gather their rows. FlashAttention marks rows that see
no key with ``lse = +inf``; ours is ``-inf`` both ways.

Logit soft-capping (``softcap``) and a value head dim of its own (MLA) run
:mod:`.torch_math` (plain PyTorch ops, any band, any float dtype): PyTorch's
FlashAttention ops take no soft-cap and one head dim.

FlashAttention computes fp16/bf16 with ``head_dim`` a multiple of 8 up to 256;
use ``backend="triton"`` for fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from distattn.planning.masks import UNBOUNDED, band_area
from distattn.kernels.merge import acc_dtype

from .torch_math import math_bwd, math_fwd
from .varlen import Varlen

_fwd_op = getattr(torch.ops.aten, "_flash_attention_forward", None)
_bwd_op = getattr(torch.ops.aten, "_flash_attention_backward", None)
# the forward with the window arguments (torch >= 2.5)
_HAS_OPS = _fwd_op is not None and "window_size_left" in str(_fwd_op.default._schema)


@dataclass(frozen=True)
class _Group:
    left: int
    right: int
    cu_q: torch.Tensor
    cu_k: torch.Tensor
    max_q: int
    max_k: int
    q_index: torch.Tensor | None  # rows to gather (None: the whole tensors, as they are)
    k_index: torch.Tensor | None


def _windows(seg: Varlen) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per segment: FlashAttention's ``(left, right)`` (-1: unbounded), whether any pair is visible,
    and whether the band cannot be said as a window (a visible segment with a bound that cuts but is negative)."""
    m, n = np.diff(seg.cu_q).astype(np.int64), np.diff(seg.cu_k).astype(np.int64)
    lo, hi = seg.bands()
    visible = band_area(m, n, lo, hi) > 0
    free_lo, free_hi = lo <= -UNBOUNDED, hi >= UNBOUNDED
    left = np.where(free_lo, -1, (n - m) - lo)
    right = np.where(free_hi, -1, hi - (n - m))
    # -1 means unbounded to FlashAttention: a bound that is really negative cannot be expressed
    bad = visible & ((~free_lo & (left < 0)) | (~free_hi & (right < 0)))
    return left, right, visible, bad


def windows(seg: Varlen) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per segment: FlashAttention's ``(left, right)`` (-1: unbounded) and whether any pair is visible;
    ``ValueError`` when a segment's band cannot be said as a window (see :func:`expressible`)."""
    left, right, visible, bad = _windows(seg)
    if bad.any():
        m, n = np.diff(seg.cu_q), np.diff(seg.cu_k)
        lo, hi = seg.bands()
        s = int(np.nonzero(bad)[0][0])
        raise ValueError(f"backend='torch' on CUDA cannot express segment {s}'s band (lo={int(lo[s])}, hi="
                         f"{int(hi[s])} with {int(m[s])} queries, {int(n[s])} keys): FlashAttention's window "
                         f"cannot cut keys right of a query's bottom-right position or left of the one before it "
                         f"(queries before their keys' end, q_offset < 0, or a window past the keys); "
                         f"use backend='triton'")
    return left, right, visible


def expressible(seg: Varlen) -> bool:
    """Whether every segment's band is a FlashAttention window (:func:`windows` would not raise);
    computed once per layout."""
    return seg.cached("flash-expressible", lambda: not _windows(seg)[3].any())


def _same(bound: np.ndarray, candidate: int, cover: np.ndarray) -> np.ndarray:
    """Whether ``candidate`` cuts a segment's keys where ``bound`` does (both reaching ``cover`` or
    beyond, or unbounded, cut nothing)."""
    def cut(x):
        return np.where((x < 0) | (x >= cover), cover, x)
    return cut(bound) == cut(np.full_like(bound, candidate))


def _assign(seg: Varlen) -> list[tuple[tuple[int, int], np.ndarray]]:
    """Segments grouped by the window they can share, the window most rows use first."""
    left, right, visible = windows(seg)
    m, n = np.diff(seg.cu_q).astype(np.int64), np.diff(seg.cu_k).astype(np.int64)
    todo, out = visible.copy(), []
    while todo.any():
        pairs, inverse = np.unique(np.stack([left[todo], right[todo]], 1), axis=0, return_inverse=True)
        l, r = (int(x) for x in pairs[np.argmax(np.bincount(inverse.ravel(), weights=m[todo]))])
        hit = todo & _same(left, l, n - 1) & _same(right, r, m - 1)
        out.append(((l, r), np.nonzero(hit)[0]))
        todo &= ~hit
    return out


def _groups(seg: Varlen, device: torch.device) -> list[_Group]:
    assigned = _assign(seg)
    m, n = np.diff(seg.cu_q), np.diff(seg.cu_k)
    if len(assigned) == 1 and len(assigned[0][1]) == int(((m > 0) & (n > 0)).sum()):
        # one call on the tensors as they are: the other segments have no rows or no keys
        cu_q, cu_k, *_ = seg.tensors(device)
        (l, r), _ = assigned[0]
        return [_Group(l, r, cu_q, cu_k, seg.max_q, seg.max_k, None, None)]
    calls = []
    for (l, r), idx in assigned:
        lens_q, lens_k = m[idx], n[idx]
        rows = lambda cu, lens: np.concatenate([np.arange(a, a + c) for a, c in zip(cu[idx], lens)])  # noqa: E731
        sub = Varlen.from_lengths(lens_q, lens_k)
        cu_q, cu_k, *_ = sub.tensors(device)
        calls.append(_Group(l, r, cu_q, cu_k, sub.max_q, sub.max_k, torch.from_numpy(rows(seg.cu_q, lens_q)).to(device),
                            torch.from_numpy(rows(seg.cu_k, lens_k)).to(device)))
    return calls


def groups(seg: Varlen, device: torch.device) -> list[_Group]:
    """The kernel calls of ``seg`` (built and copied to ``device`` once)."""
    return seg.cached(("flash", torch.device(device)), lambda: _groups(seg, torch.device(device)))


def prepare(seg: Varlen, device: torch.device) -> None:
    """Build the window groups (CUDA only: the CPU kernel needs nothing prepared). A band
    FlashAttention cannot express raises here, at plan time."""
    if device.type == "cuda":
        groups(seg, device)


def _refusal(q: torch.Tensor) -> str | None:
    """Why FlashAttention cannot take ``q`` ``[T, H, D]`` (its dtype, its head dim, this torch), or None."""
    if not _HAS_OPS:
        return (f"backend='torch' on CUDA needs PyTorch's FlashAttention varlen ops with windows "
                f"(torch >= 2.5); this torch is {torch.__version__}: use backend='triton'")
    if q.dtype not in (torch.float16, torch.bfloat16):
        return (f"backend='torch' on CUDA runs FlashAttention, which computes fp16 or bf16, got {q.dtype}; "
                f"use backend='triton' for fp32")
    if q.shape[2] % 8 or q.shape[2] > 256:
        return (f"backend='torch' on CUDA needs head_dim a multiple of 8 up to 256, got {q.shape[2]}; "
                f"use backend='triton'")
    return None


def _check(q: torch.Tensor) -> None:
    reason = _refusal(q)
    if reason is not None:
        raise ValueError(reason)


def eligible(q: torch.Tensor, v: torch.Tensor, seg: Varlen, softcap: float | None) -> bool:
    """Whether :func:`flash_fwd`/:func:`flash_bwd` run this call on FlashAttention itself: q ``[Tq, Hq, D]``
    fp16/bf16 with ``D`` a multiple of 8 up to 256, v ``[Tk, Hkv, D]`` (V's head dim is Q's: no MLA), no
    ``softcap``, every band of ``seg`` a window (:func:`expressible`), and a torch with the ops. Anything
    else either raises or runs the plain-ops path (:mod:`.torch_math`), which is far slower than triton."""
    return (softcap is None and v.shape[-1] == q.shape[-1] and _bwd_op is not None and _refusal(q) is None
            and expressible(seg))


def _rows(x: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    x = x if x.stride(-1) == 1 else x.contiguous()
    return x if index is None else x.index_select(0, index)


def flash_fwd(q, k, v, seg: Varlen, scale, softcap=None):
    if softcap is not None or v.shape[-1] != q.shape[-1]:
        return math_fwd(q, k, v, seg, scale, softcap)
    _check(q)
    out = torch.zeros_like(q)
    lse = torch.full(q.shape[:2], float("-inf"), dtype=acc_dtype(q.dtype), device=q.device)
    for g in groups(seg, q.device):
        o, l, *_ = _fwd_op(_rows(q, g.q_index), _rows(k, g.k_index), _rows(v, g.k_index), g.cu_q, g.cu_k,
                           g.max_q, g.max_k, 0.0, False, False, scale=scale, window_size_left=g.left,
                           window_size_right=g.right)
        l = l.t().masked_fill(torch.isposinf(l.t()), float("-inf"))  # [Hq, Tq] -> [Tq, Hq]; empty rows -inf
        if g.q_index is None:
            out.copy_(o)
            lse.copy_(l)
        else:
            out.index_copy_(0, g.q_index, o)
            lse.index_copy_(0, g.q_index, l)
    return out, lse


def _dummies(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The dropout RNG state and the unused tensor the backward op takes (dropout is 0)."""
    return torch.zeros(2, dtype=torch.int64, device=device).view(torch.uint64), torch.empty(0, device=device)


def flash_bwd(dout, q, k, v, out, lse, seg: Varlen, scale, softcap=None, delta=None):
    if softcap is not None or v.shape[-1] != q.shape[-1]:
        return math_bwd(dout, q, k, v, out, lse, seg, scale, softcap, delta)
    _check(q)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    calls = groups(seg, q.device)
    if not calls:
        return dq, dk, dv
    lse_ht = lse.t().masked_fill(torch.isneginf(lse.t()), float("inf"))  # FlashAttention's convention
    rng, unused = seg.cached(("flash-dummies", q.device), lambda: _dummies(q.device))
    for g in calls:
        lse_g = (lse_ht if g.q_index is None else lse_ht.index_select(1, g.q_index)).contiguous()
        grads = _bwd_op(_rows(dout, g.q_index), _rows(q, g.q_index), _rows(k, g.k_index), _rows(v, g.k_index),
                        _rows(out, g.q_index), lse_g, g.cu_q, g.cu_k, g.max_q, g.max_k, 0.0, False, rng, unused,
                        scale=scale, window_size_left=g.left, window_size_right=g.right)
        for acc, grad, index in zip((dq, dk, dv), grads, (g.q_index, g.k_index, g.k_index)):
            if index is None:
                acc.copy_(grad)
            else:
                acc.index_copy_(0, index, grad)
    return dq, dk, dv
