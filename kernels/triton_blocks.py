"""Device-side building blocks of the Triton kernels (:mod:`.triton_attn`): where a program's
segment and tile are, which key blocks its rows see (masked runs at the edges, full blocks in
between) and how rows load with or without masks. ``@triton.jit`` functions, inlined into the
kernels that call them.
"""

import triton
import triton.language as tl


@triton.jit
def segment(CU_Q, CU_K, OFFSET, seg, HAS_OFFSET: tl.constexpr):
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
def visible(rows, cols, shift, m, n, window, CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
    pos = rows[:, None] + shift
    ok = (rows[:, None] < m) & (cols[None, :] < n) & (cols[None, :] >= 0)
    if CAUSAL:
        ok = ok & (cols[None, :] <= pos)
    if WINDOW:
        ok = ok & (pos - cols[None, :] < window)
        if not CAUSAL:
            ok = ok & (cols[None, :] - pos < window)
    return ok


@triton.jit
def key_runs(start_m, m, shift, n, window, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr):
    """Key blocks a query tile visits: ``(lo, a, b, end)``, masked ``[lo, a)``, full ``[a, b)``,
    masked ``[b, end)`` (see :func:`runs`)."""
    last = tl.minimum(start_m + BLOCK_M, m) - 1
    lo = 0
    hi = n
    full_lo = 0
    full_hi = n
    if CAUSAL:
        hi = tl.minimum(hi, last + shift + 1)
        full_hi = tl.minimum(full_hi, start_m + shift + 1)
    if WINDOW:
        lo = tl.maximum(lo, start_m + shift - window + 1)
        full_lo = last + shift - window + 1
        if not CAUSAL:
            hi = tl.minimum(hi, last + shift + window)
            full_hi = tl.minimum(full_hi, start_m + shift + window)
    lo = (lo // BLOCK_N) * BLOCK_N
    a, b, end = runs(lo, hi, full_lo, full_hi, BLOCK_N)
    return lo, a, b, end


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
def load_rows(ptrs, rows, dims, count, MASKED: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """A ``[rows, BLOCK_D]`` tile; masked blocks check ``rows < count``, full ones only a padded head dim."""
    if MASKED:
        return tl.load(ptrs, mask=(rows[:, None] < count) & (dims[None, :] < HEAD_DIM), other=0.0)
    elif HEAD_DIM == BLOCK_D:
        return tl.load(ptrs)
    else:
        return tl.load(ptrs, mask=dims[None, :] < HEAD_DIM, other=0.0)
