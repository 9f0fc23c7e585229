"""What the host decides for the Triton kernels: autotune configurations, their pruning by shared
memory, and the per-layout tile tables that say which programs to launch.

Tile tables: for each block size the autotuner may pick, the ``(segment, first row)`` of every
``block``-row query tile (forward, dQ) or key tile (dK/dV) that sees at least one key, heaviest
first. One flat int32 array per side; its header (index ``block // 16``) says where that block
size's pairs start. The spans computed here mirror the kernels' own key and row ranges
(``key_runs`` and ``row_runs`` in :mod:`.triton_blocks`) under each segment's band.
"""

from __future__ import annotations

import numpy as np
import torch
import triton

from .varlen import Varlen

# Block sizes a tile table is built for (the autotuner picks among configs using them).
TILE_BLOCKS = (16, 32, 64, 128)

# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel, for Hopper and Ampere. The forward and dQ
# tile queries (BLOCK_M) and stream keys (BLOCK_N); dK/dV tiles keys and streams queries. Configs
# over the device's shared memory are pruned (`keep_config`); the small FALLBACK config runs only
# where no regular one fits (head_dim 256). fp32 inputs (exact "ieee" dots without tensor cores:
# a correctness path, not a fast one) get small tiles of their own.
# Every config kept on sm_90a at head dims <= 128 compiles without a register spill, its loop doing
# exactly its tile's wgmma work (tests/test_aot.py reads ptxas's report and the SASS). dK/dV holds two
# fp32 [BLOCK_N, D] accumulators plus S^T and dP^T [BLOCK_N, BLOCK_M]: at head dim 128 that leaves
# 8 warps room for 16-32 query rows per step (64 spilled 0.5 KB per thread, 4 warps 1-5 KB); dQ's
# 128 x 32 on 4 warps spilled too.
CONFIGS = {
    "fwd": [(128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3)],
    "bwd_dkv": [(32, 128, 8, 2), (16, 128, 8, 3), (16, 128, 8, 2)],
    "bwd_dq": [(128, 64, 8, 2), (64, 64, 4, 3), (64, 64, 4, 2)],
}
# Configs that spill with int64 block offsets (ROW64) at head dim 128 on sm_90a (16 and 76 B): never
# tried there.
NOT_ROW64 = {"fwd": {(128, 128, 8, 2)}, "bwd_dkv": {(32, 128, 8, 2)}}
# Configs ptxas spills registers for on an arch, by the padded head dims (`block_dim`) where it does:
# never tried there. Measured with Triton 3.9 (`python -m distattn.kernels.aot --all --arch 80
# --head-dims 64,128 --json`: spill_bytes); with these out, every kept config at head dims <= 128
# compiles without a spill on sm_80 and sm_90a (tests/test_aot.py).
SPILLS = {
    ("fwd", (128, 128, 8, 2)): {80: {64}},          # 8 B with GQA
    ("fwd", (128, 64, 8, 3)): {80: {128}},          # 100-124 B
    ("bwd_dkv", (32, 128, 8, 2)): {80: {128}},      # 228 B, 19 KB with GQA
    ("bwd_dq", (128, 64, 8, 2)): {80: {128}},       # 128-280 B
    ("bwd_dq", (64, 64, 4, 3)): {80: {64}},         # 96-168 B with soft-capping
    ("bwd_dq", (64, 64, 4, 2)): {80: {64}},
}
FALLBACK = {"fwd": (64, 32, 4, 2), "bwd_dkv": (32, 64, 4, 2), "bwd_dq": (64, 32, 4, 2)}
FP32_CONFIGS = {"fwd": (32, 32, 4, 2), "bwd_dkv": (32, 32, 4, 2), "bwd_dq": (32, 32, 4, 2)}
# Shared memory per block the target allows (bytes): sm_80 (A100) and sm_90 (H100/H200).
SHARED_LIMIT = {80: 166912, 90: 232448}


def all_configs(kernel: str) -> list[tuple[int, int, int, int]]:
    return [*CONFIGS[kernel], FALLBACK[kernel], FP32_CONFIGS[kernel]]


def block_dim(head_dim: int) -> int:
    """The kernels' tile width for a head dim: a power of two (``tl.arange`` needs one), >= 16 (``tl.dot``)."""
    return max(16, triton.next_power_of_2(head_dim))


def shared_estimate(kernel: str, config: tuple, head_dim: int, elem: int, head_dim_v: int | None = None) -> int:
    """Upper estimate of a config's shared memory (bytes): the streamed tiles (K and V, or Q, dO,
    lse and Delta) times the pipeline depth, the resident tiles and a staged P/dS tile. Q/K tiles
    are ``head_dim`` wide, V/dO tiles ``head_dim_v`` (default: the same). The compiler's real figure
    is checked by `python -m distattn.kernels.aot` (tests/test_aot.py): no config kept by this
    estimate may exceed the target's limit."""
    block_m, block_n, _, stages = config
    width = block_dim(head_dim) + block_dim(head_dim if head_dim_v is None else head_dim_v)  # a Q/K plus a V/dO row
    if kernel == "bwd_dkv":
        streamed, resident = block_m * (width * elem + 8), block_n * width * elem
    else:
        streamed = block_n * width * elem
        resident = block_m * (width if kernel == "bwd_dq" else block_dim(head_dim)) * elem
    return stages * streamed + resident + block_m * block_n * elem


def keep_config(kernel: str, config: tuple, head_dim: int, elem: int, arch: int, head_dim_v: int | None = None,
                row64: bool = False) -> bool:
    """Whether the autotuner tries ``config`` on ``arch`` (80, 90, ...) for these head dims (Q/K's,
    V's: default the same) and element size (see CONFIGS); ``row64``: the kernel's block offsets are
    int64 (a segment past 2^31 elements), which costs registers some configs do not have."""
    limit = SHARED_LIMIT.get(arch, SHARED_LIMIT[80] if arch >= 80 else 101376)
    fits = lambda c: shared_estimate(kernel, c, head_dim, elem, head_dim_v) <= limit  # noqa: E731
    if elem == 4:
        return config == FP32_CONFIGS[kernel]
    if config == FALLBACK[kernel]:
        return not any(fits(c) for c in CONFIGS[kernel])
    spills = block_dim(head_dim) in SPILLS.get((kernel, config), {}).get(arch, ())
    return (config in CONFIGS[kernel] and fits(config) and not spills
            and not (row64 and config in NOT_ROW64.get(kernel, ())))


def _tile_table(lengths: np.ndarray, block: int, span) -> np.ndarray:
    """``[(segment, first row), ...]`` of the ``block``-row tiles of every segment that ``span``
    (``(segment, first row, rows) -> work``) gives work, heaviest first."""
    count = -(-lengths // block)
    seg = np.repeat(np.arange(lengths.size), count)
    first = (np.arange(seg.size) - np.repeat(np.cumsum(count) - count, count)) * block
    work = span(seg, first, np.minimum(first + block, lengths[seg]) - first) if seg.size else np.zeros(0)
    keep = np.nonzero(work > 0)[0]
    order = keep[np.argsort(-work[keep], kind="stable")]
    return np.stack([seg[order], first[order]], axis=1).astype(np.int32)


def _band(seg: Varlen):
    """Per-segment ``(m, n, lo, hi)`` as int64 with the bounds clamped into ``[-m, n]``, as
    :func:`.triton_blocks.segment` does (a missing bound is ``-m`` / ``n``)."""
    m, n = np.diff(seg.cu_q).astype(np.int64), np.diff(seg.cu_k).astype(np.int64)
    lo = -m if seg.lo is None else np.clip(np.asarray(seg.lo, dtype=np.int64), -m, n)
    hi = n.copy() if seg.hi is None else np.clip(np.asarray(seg.hi, dtype=np.int64), -m, n)
    return m, n, lo, hi


def _spans(seg: Varlen):
    """Work of a query tile (keys it sees) and of a key tile (rows that see it), as in the kernels
    (:func:`.triton_blocks.key_runs` / :func:`.triton_blocks.row_runs`). Segments whose band is
    empty (``lo > hi``) have no work."""
    m, n, lo, hi = _band(seg)
    some = lo <= hi

    def keys(s, first, rows):
        last = first + rows - 1
        span = np.minimum(n[s], last + hi[s] + 1) - np.maximum(0, first + lo[s])
        return np.where(some[s], np.maximum(span, 0), 0)

    def rows_seeing(s, first, cols):
        last = first + cols - 1
        span = np.minimum(m[s], last - lo[s] + 1) - np.maximum(0, first - hi[s])
        return np.where(some[s], np.maximum(span, 0), 0)

    return m, n, keys, rows_seeing


def _tables(seg: Varlen) -> tuple[np.ndarray, dict, np.ndarray, dict]:
    """Query-tile and key-tile tables for every block size: each a flat int32 array whose header
    (index ``block // 16``) gives where that block size's pairs start; plus tile counts."""
    m, n, keys, rows_seeing = _spans(seg)
    out = []
    for lengths, span in ((m, keys), (n, rows_seeing)):
        header = np.zeros(TILE_BLOCKS[-1] // 16 + 1, dtype=np.int32)
        parts, counts, offset = [], {}, header.size
        for block in TILE_BLOCKS:
            table = _tile_table(lengths, block, span)
            header[block // 16] = offset
            parts.append(table.ravel())
            counts[block] = len(table)
            offset += table.size
        out += [np.concatenate([header, *parts]), counts]
    return tuple(out)


def prepare(seg: Varlen, device: torch.device):
    """Tile tables of ``seg`` (its band included) on ``device``, built and copied once per layout."""
    def build():
        q_table, q_counts, k_table, k_counts = _tables(seg)
        return torch.from_numpy(q_table).to(device), q_counts, torch.from_numpy(k_table).to(device), k_counts
    return seg.cached(("triton", torch.device(device)), build)
