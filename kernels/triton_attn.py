"""The ``triton`` backend: FlashAttention-2 style varlen attention, forward and backward.

Programs are *tiles*: ``BLOCK_M`` query rows of one segment (forward, dQ) or
``BLOCK_N`` keys of one segment (dK/dV), times a head. A per-layout tile table,
built once on the host when a plan is made (:func:`prepare`), lists only the
tiles that see at least one key, heaviest first (the longest key range of a
causal segment starts first, so the last wave is short; FlashAttention-3's
varlen scheduler does the same), and a program reads its ``(segment, first
row)`` from it. There is one table per block size the autotuner may pick.

The mask is a per-segment *band* (``Varlen.lo``/``Varlen.hi``): in a segment
with ``m`` queries and ``n`` keys, local query ``i`` sees local key ``j`` iff
``lo <= j - i <= hi``; either bound may be absent for the whole call
(``HAS_LO``/``HAS_HI`` constexprs: its array is then never read). Causal is
``hi = n - m``, a sliding window adds ``lo``, full attention has neither.

Each program streams the other side in blocks. The blocks it visits are cut
into three runs: masked blocks at the band's left edge, *full* blocks that
every row of the tile sees whole, and masked blocks at the band's right edge
or the segment's end. A query tile ``[r0, r1)`` sees keys
``[max(0, r0 + lo), min(n - 1, r1 - 1 + hi)]``; a key tile, by symmetry, rows
``[max(0, c0 - hi), min(m - 1, c1 - 1 - lo)]``. Full blocks load without masks
and compute the online softmax with the scale folded into one FMA
(``exp2(qk * qk_mult - m)``); only the few boundary blocks pay for the mask.
Fully masked blocks are never visited.

Logit soft-capping (``softcap = c``): the score ``s = scale * q.k`` becomes
``c * tanh(s / c)`` before masking and softmax; the kernels compute
``tanh(q.k * scale / c)`` (``tanh.approx.f32`` in compiled fp16/bf16 kernels, see
:func:`.triton_blocks.logits`) and fold ``c * log2 e`` into the same FMA, and
the backward multiplies dS by ``1 - tanh^2`` (recomputed).

Q/K and V have head dims of their own (``HEAD_DIM`` and ``HEAD_DIM_V``: MLA's 192 and 128), each
padded to a power of two (``BLOCK_D``, ``BLOCK_DV``: ``tl.arange`` needs one) with masked loads and
stores. Every tensor is read through its token and head strides and needs a unit stride only in
the head dim: k and v may be views into one packed ``[T, H, Dqk + Dv]`` buffer, dout a view too.
A segment's first row is addressed in int64 (``T * H * D`` may pass 2^31); the blocks inside a
segment in int32, or in int64 where one segment's rows may pass 2^31 elements (``ROW64``, set by
the host: int64 offsets cost the loops instructions and registers).

Backward, given the final ``out``/``lse`` and ``Delta = rowsum(dO * O)``
(computed once per backward by the caller, or here): one kernel per key tile
accumulating dK and dV over every query block and every query head of its GQA
group (no atomics: deterministic), one kernel per query tile for dQ. KV heads
are shared by ``Hq / Hkv`` query heads without copying them. Rows that see no
key give ``out = 0`` and ``lse = -inf``. The dK/dV kernel computes transposed
(``S^T = K Q^T``, keys by rows: see :func:`_dkv_blocks`), so that no tile is
transposed in the loop; every config it keeps on sm_90a at head dims <= 128
compiles without a register spill (:mod:`.aot` reads ptxas's report).

Under ``TRITON_INTERPRET=1`` (Triton's CPU interpreter, used by the tests) the
kernels run on CPU tensors with one small block configuration, and bf16 is
computed through an fp32 upcast because the interpreter mishandles bf16.
``python -m distattn.kernels.aot`` compiles every kernel and configuration for
sm_80 and sm_90a without a GPU; the interpreter alone accepts code the
compiler rejects.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from distattn.kernels.merge import row_delta

from .registry import device_arch
from .triton_blocks import (block_count, block_start, key_runs, load_rows, logits, row_offset, row_runs, segment,
                            tile, tile_ptrs, visible)
from .triton_plan import TILE_BLOCKS, all_configs, block_dim, keep_config, prepare
from .varlen import Varlen

INTERPRET = bool(triton.knobs.runtime.interpret)
LOG2E = 1.4426950408889634
_LOG2E = tl.constexpr(LOG2E)
_LN2 = tl.constexpr(0.6931471805599453)


def _configs(kernel: str) -> list:
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
            for m, n, w, s in all_configs(kernel)]


def _pruner(kernel: str):
    def prune(configs, named_args, **kwargs):
        if INTERPRET:
            return configs
        # Triton 3.6 hands keyword arguments (our constexprs) to the pruner in kwargs, positional ones in named_args
        args = {**named_args, **kwargs}
        q = args["Q"]
        kept = [c for c in configs
                if keep_config(kernel, (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages),
                               args["HEAD_DIM"], q.element_size(), device_arch(q.device), args["HEAD_DIM_V"],
                               args["ROW64"])]
        assert kept, "keep_config keeps a config for every head dim and dtype"
        return kept
    return {"early_config_prune": prune}


_TUNE_KEY = ["HEAD_DIM", "HEAD_DIM_V", "HAS_LO", "HAS_HI", "SOFTCAP", "GROUP", "ROW64"]


# ---- device code (the building blocks: .triton_blocks) ------------------------------------------

@triton.jit
def _fwd_blocks(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kt, stride_vt, rows, dims, dims_v, first, a, b, end, m, n,
                lo, hi, qk_mult, cap_in, MASKED: tl.constexpr, HAS_LO: tl.constexpr, HAS_HI: tl.constexpr,
                SOFTCAP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM_V: tl.constexpr,
                BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, ROW64: tl.constexpr):
    """Online softmax over the key blocks of a run (see :func:`block_count`); ``k_ptrs``/``v_ptrs``
    point at key row 0. The log2-domain score is ``logits(qk) * qk_mult``."""
    for i in range(0, block_count(first, a, b, end, BLOCK_N, MASKED)):
        start_n = block_start(i, first, a, b, BLOCK_N, MASKED)
        cols = start_n + tl.arange(0, BLOCK_N)
        k = load_rows(k_ptrs + row_offset(start_n, stride_kt, ROW64), cols, dims, n, MASKED, HEAD_DIM, BLOCK_D)
        v = load_rows(v_ptrs + row_offset(start_n, stride_vt, ROW64), cols, dims_v, n, MASKED, HEAD_DIM_V, BLOCK_DV)
        x = logits(tl.dot(q, tl.trans(k), input_precision=PRECISION), cap_in, SOFTCAP, PRECISION)
        if MASKED:
            s = tl.where(visible(rows[:, None], cols[None, :], m, n, lo, hi, HAS_LO, HAS_HI), x * qk_mult,
                         float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet stay at 0
            p = tl.math.exp2(s - m_ref[:, None])
            alpha = tl.math.exp2(m_i - m_ref)
        else:
            # every score is finite: the running max is too, and the multiplier folds into one FMA
            m_new = tl.maximum(m_i, tl.max(x, 1) * qk_mult)
            p = tl.math.exp2(tl.fma(x, qk_mult, -m_new[:, None]))
            alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _query_tile(TILES, CU_Q, CU_K, LO, HI, GROUP: tl.constexpr, HAS_LO: tl.constexpr, HAS_HI: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """This program's query tile in the kernels launched over the query-tile table (forward and dQ), which
    must read it alike: ``(first row, head, KV head, q0, k0, m, n, lo, hi)`` (:func:`segment`), then the
    tile's rows and head dims (Triton inlines the call: no cost in the kernels)."""
    seg, start_m = tile(TILES, BLOCK_M)
    head = tl.program_id(1)
    q0, k0, m, n, lo, hi = segment(CU_Q, CU_K, LO, HI, seg, HAS_LO, HAS_HI)
    return (start_m, head, head // GROUP, q0, k0, m, n, lo, hi, start_m + tl.arange(0, BLOCK_M),
            tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV))


@triton.autotune(configs=_configs("fwd"), key=_TUNE_KEY, prune_configs_by=_pruner("fwd"))
@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, CU_Q, CU_K, LO, HI, TILES,
                stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
                stride_lt, stride_lh, qk_mult, cap_in,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr,
                GROUP: tl.constexpr, HAS_LO: tl.constexpr, HAS_HI: tl.constexpr, SOFTCAP: tl.constexpr,
                PRECISION: tl.constexpr, ROW64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_m, head, kv_head, q0, k0, m, n, lo, hi, rows, dims, dims_v = _query_tile(
        TILES, CU_Q, CU_K, LO, HI, GROUP, HAS_LO, HAS_HI, BLOCK_M, BLOCK_D, BLOCK_DV)
    q = tl.load(tile_ptrs(Q, q0 + start_m, stride_qt, head, stride_qh, dims, BLOCK_M),
                mask=(rows[:, None] < m) & (dims[None, :] < HEAD_DIM), other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    first, a, b, end = key_runs(start_m, m, n, lo, hi, BLOCK_M, BLOCK_N)
    if PRECISION == "ieee":  # fp32, a correctness path: every block masked keeps the code small
        a = end
        b = end
    k_ptrs = tile_ptrs(K, k0, stride_kt, kv_head, stride_kh, dims, BLOCK_N)
    v_ptrs = tile_ptrs(V, k0, stride_vt, kv_head, stride_vh, dims_v, BLOCK_N)
    acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kt, stride_vt, rows, dims, dims_v, first, a,
                                b, end, m, n, lo, hi, qk_mult, cap_in, True, HAS_LO, HAS_HI, SOFTCAP, HEAD_DIM,
                                BLOCK_D, HEAD_DIM_V, BLOCK_DV, BLOCK_N, PRECISION, ROW64)
    if PRECISION != "ieee":
        acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kt, stride_vt, rows, dims, dims_v,
                                    first, a, b, end, m, n, lo, hi, qk_mult, cap_in, False, HAS_LO, HAS_HI, SOFTCAP,
                                    HEAD_DIM, BLOCK_D, HEAD_DIM_V, BLOCK_DV, BLOCK_N, PRECISION, ROW64)
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * _LN2)
    tl.store(tile_ptrs(O, q0 + start_m, stride_ot, head, stride_oh, dims_v, BLOCK_M), out.to(O.dtype.element_ty),
             mask=(rows[:, None] < m) & (dims_v[None, :] < HEAD_DIM_V))
    tl.store(LSE + (q0 + rows) * stride_lt + head * stride_lh, lse, mask=rows < m)


@triton.jit
def _scale(qk_mult, cap_in, SOFTCAP: tl.constexpr):
    """The softmax scale, from the multipliers the kernels already take (see :func:`_multipliers`): one
    argument fewer, and a few fp32 ulps from the scale itself (far below the outputs' rounding)."""
    if SOFTCAP:
        return cap_in * qk_mult / _LOG2E
    else:
        return qk_mult / _LOG2E


@triton.jit
def _dkv_blocks(dk, dv, k, v, q_ptrs, do_ptrs, lse_ptrs, delta_ptrs, stride_qt, stride_qh, stride_dot, stride_doh,
                stride_lt, stride_lh, stride_dt, stride_dh, rows0, cols, dims, dims_v, first, a, b, end, m, n, lo, hi,
                qk_mult, cap_in, MASKED: tl.constexpr, HAS_LO: tl.constexpr, HAS_HI: tl.constexpr,
                SOFTCAP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM_V: tl.constexpr,
                BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, GROUP: tl.constexpr, PRECISION: tl.constexpr,
                ROW64: tl.constexpr):
    """dK/dV of one key tile over the query blocks of a run, for each of the ``GROUP`` query heads that
    share its KV head; pointers point at query row 0 of the group's first head.

    One flat loop over (head, block) pairs rather than a loop over heads around a loop over blocks:
    the nested form kept the heads' pointers alive across the inner loop and spilled at GQA (56 B
    per thread at head dim 128, sm_90a).

    Computed transposed, keys by rows (``S^T = K Q^T``, as FlashAttention-2's and Triton's own
    backward): P^T and dS^T come out of their dots with the key tile's rows, which is the row
    dimension of the dK/dV accumulators, so they feed ``dV += P^T dO`` and ``dK += dS^T Q`` as
    register operands directly. The untransposed form (``S = Q K^T``, then ``trans(P)``) moves both
    tiles through shared memory every block and left ptxas no registers: 0.5-1.5 KB of spills per
    thread at head dim 128 on sm_90a."""
    count = block_count(first, a, b, end, BLOCK_M, MASKED)
    i = 0  # this step's block and head: counters, not j // count (an integer division costs ~20 instructions)
    g = 0
    for _ in range(0, count * GROUP):
        start_m = block_start(i, first, a, b, BLOCK_M, MASKED)
        rows = start_m + rows0
        q = load_rows(q_ptrs + (row_offset(start_m, stride_qt, ROW64) + g * stride_qh), rows, dims, m, MASKED,
                      HEAD_DIM, BLOCK_D)
        do = load_rows(do_ptrs + (row_offset(start_m, stride_dot, ROW64) + g * stride_doh), rows, dims_v, m, MASKED,
                       HEAD_DIM_V, BLOCK_DV)
        if MASKED:
            lse = tl.load(lse_ptrs + (start_m * stride_lt + g * stride_lh), mask=rows < m, other=0.0)
            delta = tl.load(delta_ptrs + (start_m * stride_dt + g * stride_dh), mask=rows < m, other=0.0)
        else:
            lse = tl.load(lse_ptrs + (start_m * stride_lt + g * stride_lh))
            delta = tl.load(delta_ptrs + (start_m * stride_dt + g * stride_dh))
        if SOFTCAP:  # dP^T first: the tanh tile then lives beside P^T, not across a dot
            dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        x_t = logits(tl.dot(k, tl.trans(q), input_precision=PRECISION), cap_in, SOFTCAP, PRECISION)
        p_t = tl.math.exp2(tl.fma(x_t, qk_mult, -(lse * _LOG2E)[None, :]))
        if MASKED:
            p_t = tl.where(visible(rows[None, :], cols[:, None], m, n, lo, hi, HAS_LO, HAS_HI), p_t, 0.0)
        if SOFTCAP:  # d(cap * tanh(s / cap)) / ds
            ds_t = p_t * (dp_t - delta[None, :]) * (1.0 - x_t * x_t)
        else:
            dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
            ds_t = p_t * (dp_t - delta[None, :])
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)
        i += 1
        if GROUP > 1:  # the next head of the group once this one has seen every block
            g = tl.where(i == count, g + 1, g)
            i = tl.where(i == count, 0, i)
    return dk, dv


@triton.autotune(configs=_configs("bwd_dkv"), key=_TUNE_KEY, prune_configs_by=_pruner("bwd_dkv"))
@triton.jit
def _bwd_dkv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, CU_Q, CU_K, LO, HI, TILES,
                    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
                    stride_lt, stride_lh, stride_dt, stride_dh, stride_dkt, stride_dkh, stride_dvt, stride_dvh,
                    qk_mult, cap_in,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM_V: tl.constexpr,
                    BLOCK_DV: tl.constexpr, GROUP: tl.constexpr, HAS_LO: tl.constexpr, HAS_HI: tl.constexpr,
                    SOFTCAP: tl.constexpr, PRECISION: tl.constexpr, ROW64: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr):
    seg, start_n = tile(TILES, BLOCK_N)
    kv_head = tl.program_id(1)
    q0, k0, m, n, lo, hi = segment(CU_Q, CU_K, LO, HI, seg, HAS_LO, HAS_HI)
    cols = start_n + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    dims_v = tl.arange(0, BLOCK_DV)
    k = tl.load(tile_ptrs(K, k0 + start_n, stride_kt, kv_head, stride_kh, dims, BLOCK_N),
                mask=(cols[:, None] < n) & (dims[None, :] < HEAD_DIM), other=0.0)
    v = tl.load(tile_ptrs(V, k0 + start_n, stride_vt, kv_head, stride_vh, dims_v, BLOCK_N),
                mask=(cols[:, None] < n) & (dims_v[None, :] < HEAD_DIM_V), other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    first, a, b, end = row_runs(start_n, m, n, lo, hi, BLOCK_M, BLOCK_N)
    if PRECISION == "ieee":  # fp32: every block masked (see the forward)
        a = end
        b = end
    rows0 = tl.arange(0, BLOCK_M)
    head = kv_head * GROUP  # the group's first query head; _dkv_blocks steps through the others
    q_ptrs = tile_ptrs(Q, q0, stride_qt, head, stride_qh, dims, BLOCK_M)
    do_ptrs = tile_ptrs(DO, q0, stride_dot, head, stride_doh, dims_v, BLOCK_M)
    lse_ptrs = LSE + (q0 + rows0) * stride_lt + head * stride_lh
    delta_ptrs = DELTA + (q0 + rows0) * stride_dt + head * stride_dh
    dk, dv = _dkv_blocks(dk, dv, k, v, q_ptrs, do_ptrs, lse_ptrs, delta_ptrs, stride_qt, stride_qh, stride_dot,
                         stride_doh, stride_lt, stride_lh, stride_dt, stride_dh, rows0, cols, dims, dims_v, first, a, b,
                         end, m, n, lo, hi, qk_mult, cap_in, True, HAS_LO, HAS_HI, SOFTCAP, HEAD_DIM, BLOCK_D,
                         HEAD_DIM_V, BLOCK_DV, BLOCK_M, GROUP, PRECISION, ROW64)
    if PRECISION != "ieee":
        dk, dv = _dkv_blocks(dk, dv, k, v, q_ptrs, do_ptrs, lse_ptrs, delta_ptrs, stride_qt, stride_qh, stride_dot,
                             stride_doh, stride_lt, stride_lh, stride_dt, stride_dh, rows0, cols, dims, dims_v, first,
                             a, b, end, m, n, lo, hi, qk_mult, cap_in, False, HAS_LO, HAS_HI, SOFTCAP, HEAD_DIM,
                             BLOCK_D, HEAD_DIM_V, BLOCK_DV, BLOCK_M, GROUP, PRECISION, ROW64)
    # the masks again, not kept alive through the loops: the accumulators need every register
    tl.store(tile_ptrs(DK, k0 + start_n, stride_dkt, kv_head, stride_dkh, dims, BLOCK_N),
             (dk * _scale(qk_mult, cap_in, SOFTCAP)).to(DK.dtype.element_ty),
             mask=(cols[:, None] < n) & (dims[None, :] < HEAD_DIM))
    tl.store(tile_ptrs(DV, k0 + start_n, stride_dvt, kv_head, stride_dvh, dims_v, BLOCK_N),
             dv.to(DV.dtype.element_ty), mask=(cols[:, None] < n) & (dims_v[None, :] < HEAD_DIM_V))


@triton.jit
def _dq_blocks(dq, q, do, lse_log2, delta, k_ptrs, v_ptrs, stride_kt, stride_vt, rows, dims, dims_v, first, a, b, end,
               m, n, lo, hi, qk_mult, cap_in, MASKED: tl.constexpr, HAS_LO: tl.constexpr, HAS_HI: tl.constexpr,
               SOFTCAP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM_V: tl.constexpr,
               BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, ROW64: tl.constexpr):
    """dQ of one query tile over the key blocks of a run; pointers point at key row 0."""
    for i in range(0, block_count(first, a, b, end, BLOCK_N, MASKED)):
        start_n = block_start(i, first, a, b, BLOCK_N, MASKED)
        cols = start_n + tl.arange(0, BLOCK_N)
        k = load_rows(k_ptrs + row_offset(start_n, stride_kt, ROW64), cols, dims, n, MASKED, HEAD_DIM, BLOCK_D)
        v = load_rows(v_ptrs + row_offset(start_n, stride_vt, ROW64), cols, dims_v, n, MASKED, HEAD_DIM_V, BLOCK_DV)
        if SOFTCAP:  # as in _dkv_blocks
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        x = logits(tl.dot(q, tl.trans(k), input_precision=PRECISION), cap_in, SOFTCAP, PRECISION)
        p = tl.math.exp2(tl.fma(x, qk_mult, -lse_log2[:, None]))
        if MASKED:
            p = tl.where(visible(rows[:, None], cols[None, :], m, n, lo, hi, HAS_LO, HAS_HI), p, 0.0)
        if SOFTCAP:
            ds = p * (dp - delta[:, None]) * (1.0 - x * x)
        else:
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    return dq


@triton.autotune(configs=_configs("bwd_dq"), key=_TUNE_KEY, prune_configs_by=_pruner("bwd_dq"))
@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, CU_Q, CU_K, LO, HI, TILES,
                   stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
                   stride_lt, stride_lh, stride_dt, stride_dh, stride_dqt, stride_dqh, qk_mult, cap_in,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr,
                   GROUP: tl.constexpr, HAS_LO: tl.constexpr, HAS_HI: tl.constexpr, SOFTCAP: tl.constexpr,
                   PRECISION: tl.constexpr, ROW64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_m, head, kv_head, q0, k0, m, n, lo, hi, rows, dims, dims_v = _query_tile(
        TILES, CU_Q, CU_K, LO, HI, GROUP, HAS_LO, HAS_HI, BLOCK_M, BLOCK_D, BLOCK_DV)
    row_mask = rows < m
    q_mask = row_mask[:, None] & (dims[None, :] < HEAD_DIM)
    q = tl.load(tile_ptrs(Q, q0 + start_m, stride_qt, head, stride_qh, dims, BLOCK_M), mask=q_mask, other=0.0)
    do = tl.load(tile_ptrs(DO, q0 + start_m, stride_dot, head, stride_doh, dims_v, BLOCK_M),
                 mask=row_mask[:, None] & (dims_v[None, :] < HEAD_DIM_V), other=0.0)
    lse_log2 = tl.load(LSE + (q0 + rows) * stride_lt + head * stride_lh, mask=row_mask, other=0.0) * _LOG2E
    delta = tl.load(DELTA + (q0 + rows) * stride_dt + head * stride_dh, mask=row_mask, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    first, a, b, end = key_runs(start_m, m, n, lo, hi, BLOCK_M, BLOCK_N)
    if PRECISION == "ieee":  # fp32: every block masked (see the forward)
        a = end
        b = end
    k_ptrs = tile_ptrs(K, k0, stride_kt, kv_head, stride_kh, dims, BLOCK_N)
    v_ptrs = tile_ptrs(V, k0, stride_vt, kv_head, stride_vh, dims_v, BLOCK_N)
    dq = _dq_blocks(dq, q, do, lse_log2, delta, k_ptrs, v_ptrs, stride_kt, stride_vt, rows, dims, dims_v, first, a, b,
                    end, m, n, lo, hi, qk_mult, cap_in, True, HAS_LO, HAS_HI, SOFTCAP, HEAD_DIM, BLOCK_D, HEAD_DIM_V,
                    BLOCK_DV, BLOCK_N, PRECISION, ROW64)
    if PRECISION != "ieee":
        dq = _dq_blocks(dq, q, do, lse_log2, delta, k_ptrs, v_ptrs, stride_kt, stride_vt, rows, dims, dims_v, first,
                        a, b, end, m, n, lo, hi, qk_mult, cap_in, False, HAS_LO, HAS_HI, SOFTCAP, HEAD_DIM, BLOCK_D,
                        HEAD_DIM_V, BLOCK_DV, BLOCK_N, PRECISION, ROW64)
    tl.store(tile_ptrs(DQ, q0 + start_m, stride_dqt, head, stride_dqh, dims, BLOCK_M),
             (dq * _scale(qk_mult, cap_in, SOFTCAP)).to(DQ.dtype.element_ty), mask=q_mask)


# ---- host side ---------------------------------------------------------------------------------

def _check_dtype(q, v):
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"backend='triton' computes fp16, bf16 or fp32, got {q.dtype}; use backend='reference' "
                         f"for fp64")
    if max(q.shape[2], v.shape[2]) > 256:
        raise ValueError(f"backend='triton' supports head dims up to 256, got {q.shape[2]} (q/k) and "
                         f"{v.shape[2]} (v)")


def _meta(q, k, v, seg, softcap, *more):
    """The kernels' constexprs. ``more``: other ``[Tq, Hq, *]`` tensors read block by block (dout)."""
    # A block's first row inside a segment times the token stride: int64 once it may pass int32.
    span = max(seg.max_q * max(t.stride(0) for t in (q, *more)), seg.max_k * max(k.stride(0), v.stride(0)))
    return dict(HEAD_DIM=q.shape[2], BLOCK_D=block_dim(q.shape[2]), HEAD_DIM_V=v.shape[2],
                BLOCK_DV=block_dim(v.shape[2]), GROUP=q.shape[1] // k.shape[1], HAS_LO=seg.lo is not None,
                HAS_HI=seg.hi is not None, SOFTCAP=softcap is not None,
                PRECISION="ieee" if q.dtype == torch.float32 else "tf32", ROW64=span >= 2**31)


def _multipliers(scale, softcap):
    """``(qk_mult, cap_in)``: the log2-domain score is ``qk * qk_mult``, or with the soft-cap
    ``tanh(qk * cap_in) * qk_mult`` (``cap * tanh(scale * qk / cap)`` in natural units)."""
    if softcap is None:
        return scale * LOG2E, 0.0
    return float(softcap) * LOG2E, scale / float(softcap)


def _work(*tensors):
    """The inputs as the kernels read them: any token and head strides (k and v may be views into one
    packed ``[T, H, Dqk + Dv]`` buffer, dout a view too: no copy), a unit stride in the head dim."""
    if INTERPRET and tensors[0].dtype == torch.bfloat16:  # the interpreter mishandles bf16: compute in fp32
        tensors = [t.float() for t in tensors]
    return [t if t.stride(-1) == 1 else t.contiguous() for t in tensors]


def triton_fwd(q, k, v, seg: Varlen, scale, softcap=None, partial=False):
    """q ``[Tq, Hq, Dqk]``, k ``[Tk, Hkv, Dqk]``, v ``[Tk, Hkv, Dv]`` -> out ``[Tq, Hq, Dv]`` (q's dtype;
    fp32 with ``partial``: the kernel stores its fp32 accumulator unrounded), lse ``[Tq, Hq]`` fp32."""
    _check_dtype(q, v)
    dtype = torch.float32 if partial else q.dtype
    q, k, v = _work(q, k, v)
    cu_q, cu_k, lo, hi = seg.tensors(q.device)
    q_tiles, q_counts, _, _ = prepare(seg, q.device)
    # the working q's dtype (fp32 under the interpreter, which mishandles bf16); returned as ``dtype``
    out = q.new_zeros(*q.shape[:2], v.shape[2], dtype=torch.float32 if partial else q.dtype)
    lse = torch.full(q.shape[:2], float("-inf"), dtype=torch.float32, device=q.device)
    if q_counts[TILE_BLOCKS[0]]:
        grid = lambda meta: (q_counts[meta["BLOCK_M"]], q.shape[1])  # noqa: E731
        _fwd_kernel[grid](q, k, v, out, lse, cu_q, cu_k, cu_q if lo is None else lo, cu_q if hi is None else hi,
                          q_tiles, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                          out.stride(0), out.stride(1), lse.stride(0), lse.stride(1), *_multipliers(scale, softcap),
                          **_meta(q, k, v, seg, softcap))
    return out.to(dtype), lse


def triton_bwd(dout, q, k, v, out, lse, seg: Varlen, scale, softcap=None, delta=None, partial=False):
    """dout, out ``[Tq, Hq, Dv]``, q/k/v as :func:`triton_fwd`, lse and delta ``[Tq, Hq]`` -> dq
    ``[Tq, Hq, Dqk]``, dk ``[Tk, Hkv, Dqk]``, dv ``[Tk, Hkv, Dv]`` (contiguous, the inputs' dtype; fp32
    with ``partial``)."""
    _check_dtype(q, v)
    dtype = torch.float32 if partial else q.dtype
    if delta is None:
        delta = row_delta(dout, out)
    q, k, v, dout = _work(q, k, v, dout)
    lse, delta = lse.float().contiguous(), delta.float().contiguous()
    cu_q, cu_k, lo, hi = seg.tensors(q.device)
    q_tiles, q_counts, k_tiles, k_counts = prepare(seg, q.device)
    # Fresh contiguous outputs (k and v may be strided views; rows no tile covers stay 0), in the working
    # q's dtype unless partial, as in triton_fwd.
    dq, dk, dv = (t.new_zeros(t.shape, dtype=torch.float32 if partial else q.dtype) for t in (q, k, v))
    if q_counts[TILE_BLOCKS[0]]:
        common = (cu_q, cu_k, cu_q if lo is None else lo, cu_q if hi is None else hi)
        strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), dout.stride(0),
                   dout.stride(1), lse.stride(0), lse.stride(1), delta.stride(0), delta.stride(1))
        floats = _multipliers(scale, softcap)
        meta = _meta(q, k, v, seg, softcap, dout)
        grid = lambda meta: (k_counts[meta["BLOCK_N"]], k.shape[1])  # noqa: E731
        _bwd_dkv_kernel[grid](q, k, v, dout, lse, delta, dk, dv, *common, k_tiles, *strides, dk.stride(0),
                              dk.stride(1), dv.stride(0), dv.stride(1), *floats, **meta)
        grid = lambda meta: (q_counts[meta["BLOCK_M"]], q.shape[1])  # noqa: E731
        _bwd_dq_kernel[grid](q, k, v, dout, lse, delta, dq, *common, q_tiles, *strides, dq.stride(0), dq.stride(1),
                             *floats, **meta)
    return dq.to(dtype), dk.to(dtype), dv.to(dtype)


# the kernels by name, for ahead-of-time compilation (:mod:`.aot`, which holds each variant's constexprs)
KERNELS = {"fwd": _fwd_kernel, "bwd_dkv": _bwd_dkv_kernel, "bwd_dq": _bwd_dq_kernel}
