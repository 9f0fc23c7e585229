"""The attention kernel's speed in the simulator: measured TFLOP/s by query-segment length, forward and
backward -- not a fixed efficiency.

A varlen kernel runs each segment (a document's rows on a rank, a CAD task, a whole document after
Ulysses' head exchange) as its own tiles: short segments leave tiles part-empty and pay a fixed cost
per row of tiles, so 2K-token documents run at a fraction of a 32K one's speed. :class:`AttentionKernel`
answers ``tflops(direction, length)`` for a causal document of ``length`` tokens;
:meth:`AttentionKernel.rank_rates` turns a schedule's segments
(:meth:`distattn.schedule.Schedule.kernel_segments`) into each rank's FLOP/s: its attention FLOPs
over the seconds its segments take, each at the speed of the causal document whose rows see as many
keys on average (:func:`equivalent_length`: ``2 * pairs / query rows``). What a row of tiles costs
beyond its work is spread over the keys it runs through, so a segment of few query rows against a
long key prefix -- the last chunk of a long document on a ring rank, or a CAD task -- runs at the
long document's speed, not at a short one's (until issue 65 the speed was read at the segment's
query rows alone, which priced such segments as short documents: ``cad``'s step at 256 GPUs / 512K
on ProLong came out ~30% slower than with a flat kernel, Ulysses' unchanged).

Where the numbers come from (:meth:`AttentionKernel.measured`):

* **the level**: our own kernels on an H100 at 32K tokens, causal, bf16 -- the GPU report's table
  (``distattn.kernels.auto``: ``scripts/gpu_report.sh``), the faster backend per direction, as
  ``backend="auto"`` runs them (head dim 128: forward 435 TFLOP/s, backward 298). sm_90 parts (H100,
  H200, H800, GH200) share it; other GPUs scale it by their dense peak.
* **the shape over length**: a measured latency table of causal documents per length
  (``attn_latency_h100.csv``: ``L, cp, tp, duration_per_doc`` in ms; its ``cp = tp = 1`` rows),
  each length's pairs per second relative to 32K's. That table times one kernel call per document:
  its shortest documents (64 tokens, 28 us; 128 tokens, 30 us) are a call's fixed cost, which a varlen
  call over many segments pays once, not per segment. So the fixed cost (the shortest row's time) is
  taken off every row before its speed is read, and the shortest row itself is left out; shorter
  segments run at the next row's speed. Without a table the speed is flat in length (the row's
  ``kernel`` source says so).

CAD's planner balances with a roofline at the kernel's 32K forward speed (``attn_efficiency`` of
the peak, :func:`planner_efficiency`): it prices every pair alike. (Its placement does not balance
under a cost that varies with the segment length -- :class:`distattn.cost.ProfileCost` leaves the
FLOPs 5x imbalanced at 64 ranks -- so it is not given one.)
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..model_shape import GPU, GPUS

REFERENCE_LEN = 32768           # the length the GPU report measures its TFLOP/s at
SM90 = ("h100", "h100-pcie", "h200", "h800", "gh200")


@dataclass(frozen=True)
class AttentionKernel:
    """TFLOP/s per direction at query-segment lengths ``lengths`` (log-interpolated, flat outside)."""

    lengths: tuple[float, ...]
    fwd_tflops: tuple[float, ...]
    bwd_tflops: tuple[float, ...]
    source: str

    def __post_init__(self):
        n = len(self.lengths)
        if n < 1 or len(self.fwd_tflops) != n or len(self.bwd_tflops) != n:
            raise ValueError("a kernel table needs one forward and one backward TFLOP/s per length")
        if min(self.fwd_tflops) <= 0 or min(self.bwd_tflops) <= 0 or list(self.lengths) != sorted(self.lengths):
            raise ValueError(f"kernel table {self.source}: speeds must be > 0 and lengths increasing")

    @staticmethod
    def flat(fwd_tflops: float, bwd_tflops: float, source: str) -> "AttentionKernel":
        return AttentionKernel((float(REFERENCE_LEN),), (float(fwd_tflops),), (float(bwd_tflops),), source)

    def tflops(self, direction: str, length) -> np.ndarray:
        """TFLOP/s on a causal document of ``length`` tokens (vectorised; a segment's:
        :func:`equivalent_length`); ``direction``: forward|backward."""
        table = self.fwd_tflops if direction == "forward" else self.bwd_tflops
        x = np.log(np.clip(np.asarray(length, dtype=np.float64), 1.0, None))
        return np.exp(np.interp(x, np.log(self.lengths), np.log(table)))

    def rank_rates(self, segments, ranks: int, direction: str, flops_per_pair: float) -> np.ndarray:
        """``[ranks]`` FLOP/s: each rank's attention FLOPs over the seconds its segments take, each at
        the speed of a causal document whose rows see as many keys on average (``segments``:
        ``(rank, q_len, area)``; module docstring); a rank with none gets the best."""
        rank, q_len, area = (np.asarray(x) for x in segments)
        flops = area.astype(np.float64) * flops_per_pair
        seconds = np.bincount(rank, flops / (self.tflops(direction, equivalent_length(q_len, area)) * 1e12),
                              minlength=ranks)
        total = np.bincount(rank, flops, minlength=ranks)
        best = max(self.fwd_tflops if direction == "forward" else self.bwd_tflops) * 1e12
        return np.where(seconds > 0, total / np.where(seconds > 0, seconds, 1.0), best)

    @staticmethod
    def measured(gpu: GPU, head_dim: int, latency_csv: str | Path | None = None,
                 efficiency: float = 0.5) -> "AttentionKernel":
        """The level of our kernels at 32K (module docstring) on ``gpu`` at ``head_dim``, shaped over
        length by ``latency_csv`` when given: the sm_90 report's speed, scaled by the dense peak on
        another GPU; ``efficiency`` of the GPU's peak where the report has no row at all."""
        from ..kernels.auto import rows_at

        levels, where = [], []
        for direction in ("fwd", "bwd"):
            rows = rows_at(90, direction)
            below = [r for r in rows if r.head_dim <= head_dim] or rows[:1]
            if not rows:
                levels.append(efficiency * gpu.peak_tflops)
                continue
            row = below[-1]
            speed = max(s for _, s in row.tflops)
            levels.append(speed if gpu.name in SM90 else speed * gpu.peak_tflops / GPUS["h100"].peak_tflops)
            where.append(f"{direction} {speed:.0f} TFLOP/s at hd {row.head_dim}")
        source = f"GPU report ({', '.join(where)}; 32K causal){'' if gpu.name in SM90 else f', scaled to {gpu.name}'}"
        if latency_csv is None:
            return AttentionKernel.flat(*levels, source=source + ", flat in length")
        lengths, shape = latency_shape(latency_csv)
        return AttentionKernel(tuple(lengths), tuple(levels[0] * shape), tuple(levels[1] * shape),
                               f"{source}, shaped by {Path(latency_csv).name}")


def equivalent_length(q_len, area) -> np.ndarray:
    """The causal document length whose rows see, on average, as many keys as a segment's of ``q_len``
    query rows and ``area`` visible pairs: ``2 * area / q_len`` (a causal document of ``L`` tokens has
    ``L (L + 1) / 2`` pairs). A whole causal document is its own length; a few query rows against a
    long key prefix (a ring's, or a CAD task at a long document's end) run as that prefix's document."""
    q_len = np.asarray(q_len, dtype=np.float64)
    return np.where(q_len > 0, 2.0 * np.asarray(area, dtype=np.float64) / np.maximum(q_len, 1.0), 1.0)


def planner_efficiency(kernel: AttentionKernel, gpu: GPU) -> float:
    """The fraction of ``gpu``'s peak the kernel's forward reaches on long segments (CAD's roofline)."""
    return float(kernel.tflops("forward", REFERENCE_LEN)) / gpu.peak_tflops


def latency_shape(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """``(lengths, relative speed)`` from a latency table's ``cp = tp = 1`` rows: each length's causal
    pairs per second over the speed at :data:`REFERENCE_LEN` (interpolated)."""
    try:
        with open(path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if r.get("cp") == "1" and r.get("tp") == "1"]
        lengths = np.asarray([float(r["L"]) for r in rows])
        seconds = np.asarray([float(r["duration_per_doc"]) for r in rows]) * 1e-3
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise ValueError(f"--kernel-table {path}: expected a CSV with columns L, cp, tp, duration_per_doc (ms) "
                         f"({type(exc).__name__}: {exc})") from None
    if (seconds <= 0).any() or (lengths <= 0).any():
        raise ValueError(f"--kernel-table {path}: L and the durations must be positive")
    order = np.argsort(lengths)
    lengths, seconds = lengths[order], seconds[order]
    if len(lengths) < 3:
        raise ValueError(f"--kernel-table {path}: needs >= 3 rows with cp=1, tp=1 (the shortest is the fixed cost)")
    # the shortest document's time is a call's fixed cost (module docstring)
    lengths, seconds = lengths[1:], seconds[1:] - seconds[0]
    if (seconds <= 0).any():
        raise ValueError(f"--kernel-table {path}: a longer document takes no longer than the shortest one")
    speed = lengths * (lengths + 1) / 2 / seconds
    ref = np.exp(np.interp(np.log(REFERENCE_LEN), np.log(lengths), np.log(speed)))
    return lengths, speed / ref


__all__ = ["AttentionKernel", "latency_shape", "planner_efficiency", "REFERENCE_LEN"]
