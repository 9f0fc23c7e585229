"""The ``triton`` backend: FlashAttention-2 style varlen attention, forward and backward.

One program per (query block, segment, head). The forward streams key blocks
through an online softmax in fp32 (base-2 exponentials, the scale folded into
``log2 e``) and writes ``out`` and the natural-log ``lse``. Only key blocks that
the mask can reach are visited: the segment's bounds, the causal diagonal and
the sliding window give each query block a ``[lo, hi)`` key range, so fully
masked tiles are never loaded (FlashAttention-2, Dao 2023; Triton's
fused-attention tutorial).

Backward, given the final ``out``/``lse``: ``Delta = rowsum(dO * O)``, then one
kernel per key block accumulating dK and dV over every query block and every
query head of its GQA group (no atomics: deterministic), and one kernel per
query block for dQ. KV heads are shared by ``Hq / Hkv`` query heads without
copying them.

Positions follow the pinned semantics: query ``i`` of a segment with ``m``
queries and ``n`` keys sits at key position ``i + n - m + q_offset``.

Under ``TRITON_INTERPRET=1`` (Triton's CPU interpreter, used by the tests) the
kernels run on CPU tensors with one small block configuration, and bf16 is
computed through an fp32 upcast because the interpreter mishandles bf16.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from distattn.merge import acc_dtype

INTERPRET = bool(triton.knobs.runtime.interpret)
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


def _configs():
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1)]
    # Hopper and Ampere: large query blocks for the forward, smaller ones for the backward's
    # register-heavy tiles; the autotuner picks per head dim and mask.
    shapes = [(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 32, 4, 3), (64, 32, 4, 2), (64, 128, 8, 2)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]


@triton.jit
def _segment(CU_Q, CU_K, OFFSET, seg, HAS_OFFSET: tl.constexpr):
    """Start rows, lengths and the position shift (``row + shift`` = key position) of a segment."""
    q0 = tl.load(CU_Q + seg)
    k0 = tl.load(CU_K + seg)
    m = tl.load(CU_Q + seg + 1) - q0
    n = tl.load(CU_K + seg + 1) - k0
    shift = n - m
    if HAS_OFFSET:
        shift += tl.load(OFFSET + seg)
    return q0, k0, m, n, shift


@triton.jit
def _key_range(start_m, end_m, shift, n, window, CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
    """Keys ``[lo, hi)`` that query rows ``[start_m, end_m)`` can see (positions ``row + shift``)."""
    lo = 0
    hi = n
    if CAUSAL:
        hi = tl.minimum(hi, end_m - 1 + shift + 1)
    if WINDOW:
        lo = tl.maximum(lo, start_m + shift - window + 1)
        if not CAUSAL:
            hi = tl.minimum(hi, end_m - 1 + shift + window)
    return lo, hi


@triton.jit
def _visible(rows, cols, shift, m, n, window, CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
    pos = rows[:, None] + shift
    ok = (rows[:, None] < m) & (cols[None, :] < n) & (cols[None, :] >= 0)
    if CAUSAL:
        ok = ok & (cols[None, :] <= pos)
    if WINDOW:
        ok = ok & (pos - cols[None, :] < window)
        if not CAUSAL:
            ok = ok & (cols[None, :] - pos < window)
    return ok


@triton.autotune(configs=_configs(), key=["HEAD_DIM", "CAUSAL", "WINDOW", "GROUP"])
@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, CU_Q, CU_K, OFFSET,
                stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
                stride_lt, stride_lh, scale_log2, window,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, GROUP: tl.constexpr, CAUSAL: tl.constexpr,
                WINDOW: tl.constexpr, HAS_OFFSET: tl.constexpr, IEEE: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    head = tl.program_id(2)
    q0, k0, m, n, shift = _segment(CU_Q, CU_K, OFFSET, tl.program_id(1), HAS_OFFSET)
    start_m = tl.program_id(0) * BLOCK_M
    if start_m >= m:
        return
    kv_head = head // GROUP
    rows = start_m + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    q = tl.load(Q + (q0 + rows)[:, None] * stride_qt + head * stride_qh + dims[None, :],
                mask=(rows[:, None] < m) & (dims[None, :] < HEAD_DIM), other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lo, hi = _key_range(start_m, tl.minimum(start_m + BLOCK_M, m), shift, n, window, CAUSAL, WINDOW)
    for start_n in range((lo // BLOCK_N) * BLOCK_N, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        kv_mask = (cols[:, None] < n) & (dims[None, :] < HEAD_DIM)
        k = tl.load(K + (k0 + cols)[:, None] * stride_kt + kv_head * stride_kh + dims[None, :], mask=kv_mask,
                    other=0.0)
        v = tl.load(V + (k0 + cols)[:, None] * stride_vt + kv_head * stride_vh + dims[None, :], mask=kv_mask,
                    other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale_log2
        else:
            s = tl.dot(q, tl.trans(k)) * scale_log2
        s = tl.where(_visible(rows, cols, shift, m, n, window, CAUSAL, WINDOW), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet stay at 0
        p = tl.math.exp2(s - m_ref[:, None])
        alpha = tl.math.exp2(m_i - m_ref)
        l_i = l_i * alpha + tl.sum(p, 1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * LN2)
    tl.store(O + (q0 + rows)[:, None] * stride_ot + head * stride_oh + dims[None, :], out.to(O.dtype.element_ty),
             mask=(rows[:, None] < m) & (dims[None, :] < HEAD_DIM))
    tl.store(LSE + (q0 + rows) * stride_lt + head * stride_lh, lse, mask=rows < m)


@triton.jit
def _block_grads(q, k, v, do, lse_log2, delta, rows, cols, shift, m, n, window, scale_log2,
                 CAUSAL: tl.constexpr, WINDOW: tl.constexpr, IEEE: tl.constexpr):
    """P and dS of one (query block, key block) tile, given the final lse."""
    if IEEE:
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale_log2
        dp = tl.dot(do, tl.trans(v), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k)) * scale_log2
        dp = tl.dot(do, tl.trans(v))
    ok = _visible(rows, cols, shift, m, n, window, CAUSAL, WINDOW)
    p = tl.where(ok, tl.math.exp2(tl.where(ok, s - lse_log2[:, None], 0.0)), 0.0)
    ds = p * (dp - delta[:, None])
    return p, ds


@triton.autotune(configs=_configs(), key=["HEAD_DIM", "CAUSAL", "WINDOW", "GROUP"])
@triton.jit
def _bwd_dkv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, CU_Q, CU_K, OFFSET,
                    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
                    stride_lt, stride_lh, stride_dkt, stride_dkh, stride_dvt, stride_dvh, scale, scale_log2, window,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, GROUP: tl.constexpr, CAUSAL: tl.constexpr,
                    WINDOW: tl.constexpr, HAS_OFFSET: tl.constexpr, IEEE: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    kv_head = tl.program_id(2)
    q0, k0, m, n, shift = _segment(CU_Q, CU_K, OFFSET, tl.program_id(1), HAS_OFFSET)
    start_n = tl.program_id(0) * BLOCK_N
    if start_n >= n:
        return
    cols = start_n + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    kv_mask = (cols[:, None] < n) & (dims[None, :] < HEAD_DIM)
    k = tl.load(K + (k0 + cols)[:, None] * stride_kt + kv_head * stride_kh + dims[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + (k0 + cols)[:, None] * stride_vt + kv_head * stride_vh + dims[None, :], mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    # query rows that can see a key of this block (positions row + shift)
    end_n = tl.minimum(start_n + BLOCK_N, n)
    row_lo = 0
    row_hi = m
    if CAUSAL:
        row_lo = tl.maximum(row_lo, start_n - shift)
    if WINDOW:
        row_hi = tl.minimum(row_hi, end_n - 1 + window - 1 - shift + 1)
        if not CAUSAL:
            row_lo = tl.maximum(row_lo, start_n - window + 1 - shift)
    for g in range(GROUP):
        head = kv_head * GROUP + g
        for start_m in range((row_lo // BLOCK_M) * BLOCK_M, row_hi, BLOCK_M):
            rows = start_m + tl.arange(0, BLOCK_M)
            row_mask = rows < m
            q_mask = row_mask[:, None] & (dims[None, :] < HEAD_DIM)
            q = tl.load(Q + (q0 + rows)[:, None] * stride_qt + head * stride_qh + dims[None, :], mask=q_mask,
                        other=0.0)
            do = tl.load(DO + (q0 + rows)[:, None] * stride_dot + head * stride_doh + dims[None, :], mask=q_mask,
                         other=0.0)
            lse = tl.load(LSE + (q0 + rows) * stride_lt + head * stride_lh, mask=row_mask, other=0.0)
            delta = tl.load(DELTA + (q0 + rows) * stride_lt + head * stride_lh, mask=row_mask, other=0.0)
            p, ds = _block_grads(q, k, v, do, lse * 1.4426950408889634, delta, rows, cols, shift, m, n, window,
                                 scale_log2, CAUSAL, WINDOW, IEEE)
            if IEEE:
                dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision="ieee")
                dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision="ieee")
            else:
                dv += tl.dot(tl.trans(p.to(do.dtype)), do)
                dk += tl.dot(tl.trans(ds.to(q.dtype)), q)
    tl.store(DK + (k0 + cols)[:, None] * stride_dkt + kv_head * stride_dkh + dims[None, :],
             (dk * scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + (k0 + cols)[:, None] * stride_dvt + kv_head * stride_dvh + dims[None, :],
             dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.autotune(configs=_configs(), key=["HEAD_DIM", "CAUSAL", "WINDOW", "GROUP"])
@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, CU_Q, CU_K, OFFSET,
                   stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
                   stride_lt, stride_lh, stride_dqt, stride_dqh, scale, scale_log2, window,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, GROUP: tl.constexpr, CAUSAL: tl.constexpr,
                   WINDOW: tl.constexpr, HAS_OFFSET: tl.constexpr, IEEE: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    head = tl.program_id(2)
    q0, k0, m, n, shift = _segment(CU_Q, CU_K, OFFSET, tl.program_id(1), HAS_OFFSET)
    start_m = tl.program_id(0) * BLOCK_M
    if start_m >= m:
        return
    kv_head = head // GROUP
    rows = start_m + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_mask = rows < m
    q_mask = row_mask[:, None] & (dims[None, :] < HEAD_DIM)
    q = tl.load(Q + (q0 + rows)[:, None] * stride_qt + head * stride_qh + dims[None, :], mask=q_mask, other=0.0)
    do = tl.load(DO + (q0 + rows)[:, None] * stride_dot + head * stride_doh + dims[None, :], mask=q_mask, other=0.0)
    lse_log2 = tl.load(LSE + (q0 + rows) * stride_lt + head * stride_lh, mask=row_mask, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + (q0 + rows) * stride_lt + head * stride_lh, mask=row_mask, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lo, hi = _key_range(start_m, tl.minimum(start_m + BLOCK_M, m), shift, n, window, CAUSAL, WINDOW)
    for start_n in range((lo // BLOCK_N) * BLOCK_N, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        kv_mask = (cols[:, None] < n) & (dims[None, :] < HEAD_DIM)
        k = tl.load(K + (k0 + cols)[:, None] * stride_kt + kv_head * stride_kh + dims[None, :], mask=kv_mask,
                    other=0.0)
        v = tl.load(V + (k0 + cols)[:, None] * stride_vt + kv_head * stride_vh + dims[None, :], mask=kv_mask,
                    other=0.0)
        p, ds = _block_grads(q, k, v, do, lse_log2, delta, rows, cols, shift, m, n, window, scale_log2,
                             CAUSAL, WINDOW, IEEE)
        if IEEE:
            dq += tl.dot(ds.to(k.dtype), k, input_precision="ieee")
        else:
            dq += tl.dot(ds.to(k.dtype), k)
    tl.store(DQ + (q0 + rows)[:, None] * stride_dqt + head * stride_dqh + dims[None, :],
             (dq * scale).to(DQ.dtype.element_ty), mask=q_mask)


# ---- host side ---------------------------------------------------------------------------------

def _prepare(q, k, v, cu_q, cu_k, q_offset):
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"backend='triton' computes fp16, bf16 or fp32, got {q.dtype}; use backend='reference' "
                         f"for fp64")
    if q.shape[2] > 256:
        raise ValueError(f"backend='triton' supports head_dim up to 256, got {q.shape[2]}")
    # The interpreter mishandles bf16: compute through fp32 there.
    work = torch.float32 if INTERPRET and q.dtype == torch.bfloat16 else q.dtype
    q, k, v = (t.to(work).contiguous() for t in (q, k, v))
    cu_q, cu_k = cu_q.to(q.device, torch.int32), cu_k.to(q.device, torch.int32)
    offset = q_offset.to(q.device, torch.int32) if q_offset is not None else cu_q  # dummy pointer when absent
    max_m = int((cu_q[1:] - cu_q[:-1]).max()) if cu_q.numel() > 1 else 0
    max_n = int((cu_k[1:] - cu_k[:-1]).max()) if cu_k.numel() > 1 else 0
    meta = dict(HEAD_DIM=q.shape[2], BLOCK_D=max(16, triton.next_power_of_2(q.shape[2])),
                GROUP=q.shape[1] // k.shape[1], HAS_OFFSET=q_offset is not None, IEEE=q.dtype == torch.float32)
    return q, k, v, cu_q, cu_k, offset, max_m, max_n, meta


def triton_fwd(q, k, v, cu_q, cu_k, q_offset, causal, window, scale):
    dtype = q.dtype
    q, k, v, cu_q, cu_k, offset, max_m, _, meta = _prepare(q, k, v, cu_q, cu_k, q_offset)
    out = torch.zeros_like(q)
    lse = torch.full(q.shape[:2], float("-inf"), dtype=torch.float32, device=q.device)
    n_seg = cu_q.numel() - 1
    if max_m > 0 and n_seg > 0:
        grid = lambda cfg: (triton.cdiv(max_m, cfg["BLOCK_M"]), n_seg, q.shape[1])  # noqa: E731
        _fwd_kernel[grid](q, k, v, out, lse, cu_q, cu_k, offset, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                          v.stride(0), v.stride(1), out.stride(0), out.stride(1), lse.stride(0), lse.stride(1),
                          scale * LOG2E, window or 0, CAUSAL=causal, WINDOW=window is not None, **meta)
    return out.to(dtype), lse


def triton_bwd(dout, q, k, v, out, lse, cu_q, cu_k, q_offset, causal, window, scale):
    dtype = q.dtype
    delta = (dout.to(acc_dtype(dtype)) * out.to(acc_dtype(dtype))).sum(-1).float().contiguous()
    q, k, v, cu_q, cu_k, offset, max_m, max_n, meta = _prepare(q, k, v, cu_q, cu_k, q_offset)
    dout = dout.to(q.dtype).contiguous()
    lse = lse.float().contiguous()
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    n_seg = cu_q.numel() - 1
    common = (cu_q, cu_k, offset, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
              dout.stride(0), dout.stride(1), lse.stride(0), lse.stride(1))
    if max_n > 0 and max_m > 0 and n_seg > 0:
        grid = lambda cfg: (triton.cdiv(max_n, cfg["BLOCK_N"]), n_seg, k.shape[1])  # noqa: E731
        _bwd_dkv_kernel[grid](q, k, v, dout, lse, delta, dk, dv, *common, dk.stride(0), dk.stride(1), dv.stride(0),
                              dv.stride(1), scale, scale * LOG2E, window or 0, CAUSAL=causal,
                              WINDOW=window is not None, **meta)
        grid = lambda cfg: (triton.cdiv(max_m, cfg["BLOCK_M"]), n_seg, q.shape[1])  # noqa: E731
        _bwd_dq_kernel[grid](q, k, v, dout, lse, delta, dq, *common, dq.stride(0), dq.stride(1), scale,
                             scale * LOG2E, window or 0, CAUSAL=causal, WINDOW=window is not None, **meta)
    return dq.to(dtype), dk.to(dtype), dv.to(dtype)
