"""Device-side building blocks of the Triton kernels (:mod:`.triton_attn`): where a program's
segment and tile are, which blocks of the other side its rows see under the segment's *band*
(masked runs at the edges, full blocks in between), the mask, the logit soft-cap and how rows load
with or without masks. ``@triton.jit`` functions, inlined into the kernels that call them.

The band of a segment with ``m`` queries and ``n`` keys: local query row ``i`` sees local key ``j``
iff ``lo <= j - i <= hi``. :func:`segment` clamps both bounds into ``[-m, n]`` (every ``j - i`` lies
in ``[1 - m, n - 1]``), so a missing bound (``HAS_LO``/``HAS_HI`` False, or
``distattn.planning.masks.UNBOUNDED`` in the array) is just ``-m`` / ``n`` and the arithmetic below stays far
inside int32.
"""

import triton
import triton.language as tl

_LOG2E = tl.constexpr(1.4426950408889634)
_COMPILED = tl.constexpr(not triton.knobs.runtime.interpret)  # False under TRITON_INTERPRET=1


@triton.jit
def segment(CU_Q, CU_K, LO, HI, seg, HAS_LO: tl.constexpr, HAS_HI: tl.constexpr):
    """Start rows, lengths and the clamped band ``(lo, hi)`` of a segment."""
    q0 = tl.load(CU_Q + seg)
    k0 = tl.load(CU_K + seg)
    m = tl.load(CU_Q + seg + 1) - q0
    n = tl.load(CU_K + seg + 1) - k0
    lo = -m
    hi = n
    if HAS_LO:
        lo = tl.minimum(tl.maximum(tl.load(LO + seg), -m), n)
    if HAS_HI:
        hi = tl.maximum(tl.minimum(tl.load(HI + seg), n), -m)
    return q0, k0, m, n, lo, hi


@triton.jit
def tile(TILES, BLOCK: tl.constexpr):
    """(segment, first row) of this program's tile; the table's header gives where the table of
    ``BLOCK``-sized tiles starts."""
    entry = tl.load(TILES + BLOCK // 16) + 2 * tl.program_id(0)
    return tl.load(TILES + entry), tl.load(TILES + entry + 1)


@triton.jit
def runs(lo, hi, full_lo, full_hi, BLOCK: tl.constexpr):
    """Cut the blocks covering ``[lo, hi)`` (aligned at ``lo``, which is a multiple of BLOCK) into
    masked ``[lo, a)``, full ``[a, b)`` and masked ``[b, end)``: full blocks lie inside
    ``[full_lo, full_hi)``."""
    end = lo + tl.cdiv(tl.maximum(hi - lo, 0), BLOCK) * BLOCK
    a = lo + tl.cdiv(tl.maximum(full_lo - lo, 0), BLOCK) * BLOCK
    a = tl.minimum(a, end)
    b = lo + (tl.maximum(full_hi - lo, 0) // BLOCK) * BLOCK
    b = tl.minimum(tl.maximum(b, a), end)
    return a, b, end


@triton.jit
def visible(r, c, m, n, lo, hi, HAS_LO: tl.constexpr, HAS_HI: tl.constexpr):
    """Mask of real rows and keys inside the band; ``r``/``c`` are row and key indices shaped to
    broadcast into the tile: ``rows[:, None], cols[None, :]`` for a ``[rows, keys]`` tile,
    ``rows[None, :], cols[:, None]`` for the transposed ``[keys, rows]`` one (dK/dV)."""
    ok = (r < m) & (c < n)
    if HAS_LO:
        ok = ok & (c - r >= lo)
    if HAS_HI:
        ok = ok & (c - r <= hi)
    return ok


@triton.jit
def key_runs(start_m, m, n, lo, hi, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key blocks a query tile ``[start_m, start_m + BLOCK_M)`` visits: ``(first, a, b, end)``,
    masked ``[first, a)``, full ``[a, b)``, masked ``[b, end)`` (see :func:`runs`). Its rows see
    keys ``[start_m + lo, last + hi]``; a block is full when the last row's first key and the first
    row's last key enclose it (and it lies before ``n``)."""
    last = tl.minimum(start_m + BLOCK_M, m) - 1
    first = tl.maximum(start_m + lo, 0)
    first = (first // BLOCK_N) * BLOCK_N
    a, b, end = runs(first, tl.minimum(last + hi + 1, n), last + lo, tl.minimum(start_m + hi + 1, n), BLOCK_N)
    return first, a, b, end


@triton.jit
def row_runs(start_n, m, n, lo, hi, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Query blocks a key tile ``[start_n, start_n + BLOCK_N)`` visits (dK/dV), as
    :func:`key_runs`: rows ``[start_n - hi, last - lo]`` see one of its keys; a block is full when
    every row of it sees the whole tile and is a real row (keys past the segment's end only feed
    outputs that are never stored)."""
    last = tl.minimum(start_n + BLOCK_N, n) - 1
    first = tl.maximum(start_n - hi, 0)
    first = (first // BLOCK_M) * BLOCK_M
    a, b, end = runs(first, tl.minimum(last - lo + 1, m), last - hi, tl.minimum(start_n - lo + 1, m), BLOCK_M)
    return first, a, b, end


@triton.jit
def logits(qk, cap_in, SOFTCAP: tl.constexpr, PRECISION: tl.constexpr):
    """What the log2-domain score is a multiple of: ``qk``, or with the soft-cap
    ``tanh(qk * scale / cap)`` (the caller multiplies by ``scale * log2 e`` or ``cap * log2 e``).

    Compiled fp16/bf16 kernels take ``tanh.approx.f32`` (one MUFU op, relative error 2^-11, as
    FlashAttention's soft-cap does: below the inputs' own rounding); fp32 kernels and the
    interpreter (which has neither inline asm nor libdevice) use ``1 - 2 / (2^(2x log2 e) + 1)``,
    exact at both ends (the exponent is clamped: 2^126 is finite, and its reciprocal rounds to 0)."""
    if SOFTCAP:
        x = qk * cap_in
        if PRECISION != "ieee":
            if _COMPILED:
                return tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                                 is_pure=True, pack=1)
        return 1.0 - 2.0 / (tl.math.exp2(tl.minimum(x * (2.0 * _LOG2E), 126.0)) + 1.0)
    else:
        return qk


@triton.jit
def block_count(lo, a, b, end, BLOCK: tl.constexpr, MASKED: tl.constexpr):
    """Blocks of a run: masked ``[lo, a)`` then ``[b, end)`` (one loop: one copy of the code), or
    the full ``[a, b)``."""
    if MASKED:
        return (a - lo) // BLOCK + (end - b) // BLOCK
    else:
        return (b - a) // BLOCK


@triton.jit
def block_start(i, lo, a, b, BLOCK: tl.constexpr, MASKED: tl.constexpr):
    if MASKED:
        return tl.where(i < (a - lo) // BLOCK, lo + i * BLOCK, b + (i - (a - lo) // BLOCK) * BLOCK)
    else:
        return a + i * BLOCK


@triton.jit
def tile_ptrs(BASE, row0, stride_t, head, stride_h, dims, ROWS: tl.constexpr):
    """``[ROWS, len(dims)]`` pointers to rows ``row0 + i`` of one head of a ``[T, H, D]`` tensor whose
    last stride is 1 (any token and head strides: a view into a packed K|V buffer works). The row
    offset is int64: ``T * H * D`` passes 2^31 at long context (MLA's K|V rows hold 128 heads x 320);
    computed once per program, it costs nothing in the loops."""
    base = BASE + row0.to(tl.int64) * stride_t + head * stride_h
    return base + tl.arange(0, ROWS)[:, None] * stride_t + dims[None, :]


@triton.jit
def row_offset(row, stride, ROW64: tl.constexpr):
    """``row * stride`` for a block's first row inside a segment: int64 only where the host saw that a
    segment's rows may pass 2^31 elements (``ROW64``); int32 elsewhere, as int64 there costs the
    steady-state loops ~6% more instructions and ~30 registers (SASS, sm_90a)."""
    if ROW64:
        return row.to(tl.int64) * stride
    else:
        return row * stride


@triton.jit
def load_rows(ptrs, rows, dims, count, MASKED: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """A ``[rows, BLOCK_D]`` tile (``dims = arange(BLOCK_D)``, the head dim ``HEAD_DIM`` padded to a power
    of two: Q/K's or V's); masked blocks check ``rows < count``, full ones only a padded head dim."""
    if MASKED:
        return tl.load(ptrs, mask=(rows[:, None] < count) & (dims[None, :] < HEAD_DIM), other=0.0)
    elif HEAD_DIM == BLOCK_D:
        return tl.load(ptrs)
    else:
        return tl.load(ptrs, mask=dims[None, :] < HEAD_DIM, other=0.0)
