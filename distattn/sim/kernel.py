"""The attention kernel's speed in the simulator: one tile model (:mod:`distattn.costmodel.tiles`) prices every
scheduler's calls, forward and backward apart.

A rank's kernel calls run its segments (:meth:`distattn.planning.schedule.Schedule.kernel_segments`: a
document's rows on a ring rank, a CAD task, a whole document after Ulysses' head exchange), each
``q_len`` query rows against ``k_len`` keys with ``area`` visible pairs, on the query heads one call
runs (:meth:`~distattn.planning.schedule.Schedule.kernel_heads`: all of a TP rank's for the ring family, the
all-gather and CAD; ``1 / degree`` of them for Ulysses and USP). The forward's CTAs run over query
blocks and loop over keys, the backward's run over key blocks and loop over query rows, each paying a
fixed cost; a call's CTAs run in waves over the SMs. So a segment of few query rows against a long
key prefix -- a CAD task, the last chunk of a long document on a ring rank -- runs its forward at
the long document's speed and its backward slower: its key blocks' loops are short. Fewer heads per
call leave fewer CTAs to fill the SMs, which shows only where a call's longest CTA outlasts the rest.

:meth:`AttentionKernel.measured` is :func:`distattn.kernels.speed.kernel_model` on the job's GPU: the
shipped H100 fit's shape (or a fit to ``--kernel-table``'s rows) at the level of our kernels in the
GPU report. CAD's planner balances the same model's seconds (``distattn.plan(..., gpu=...)``): the
simulator hands it this kernel through the plan context.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..kernels.speed import REFERENCE_LEN, kernel_model
from ..costmodel.model_shape import BWD_FLOPS_FACTOR, GPU
from ..costmodel.tiles import TileModel


@dataclass(frozen=True)
class AttentionKernel:
    """The tile model of the kernel a job runs (``tiles``) at ``head_dim``; ``source`` names it."""

    tiles: TileModel
    head_dim: int
    source: str

    def tflops(self, direction: str, length, heads: float) -> np.ndarray:
        """TFLOP/s of causal documents of ``length`` tokens (vectorised), each a call on ``heads`` heads."""
        return self.tiles.document_tflops(direction, length, heads, self.head_dim)

    def document_seconds(self, direction: str, length, heads: float) -> np.ndarray:
        """Seconds of causal documents of ``length`` tokens (vectorised), each a call on ``heads`` heads."""
        length = np.asarray(length, dtype=np.float64)
        return self.tiles.segment_seconds(direction, length, length, length * (length + 1) / 2, heads)

    def rank_seconds(self, segments, ranks: int, direction: str, heads: float) -> np.ndarray:
        """``[ranks]`` seconds each rank's call of its ``segments`` (``(rank, q_len, area, k_len)``)
        takes on ``heads`` query heads."""
        rank, q_len, area, k_len = segments
        return self.tiles.rank_seconds(direction, rank, q_len, k_len, area, ranks, heads)

    def rank_rates(self, segments, ranks: int, direction: str, heads: float) -> np.ndarray:
        """``[ranks]`` FLOP/s: each rank's attention FLOPs in ``direction`` (the backward's: 2.5x the
        forward's) over the seconds its call takes (:meth:`rank_seconds`); a rank with none gets the
        fastest rank's rate, or a 32K document's."""
        rank, _, area, _ = segments
        seconds = self.rank_seconds(segments, ranks, direction, heads)
        per_pair = 4.0 * heads * self.head_dim * (BWD_FLOPS_FACTOR if direction == "backward" else 1.0)
        flops = np.bincount(np.asarray(rank, dtype=np.int64), np.asarray(area, np.float64) * per_pair,
                            minlength=ranks)[:ranks]
        busy = seconds > 0
        rates = np.where(busy, flops / np.where(busy, seconds, 1.0), 0.0)
        idle = rates.max() if busy.any() else float(self.tflops(direction, REFERENCE_LEN, heads)) * 1e12
        return np.where(busy, rates, idle)

    @staticmethod
    def measured(gpu: GPU, head_dim: int, latency_csv: str | Path | None = None,
                 efficiency: float = 0.5) -> "AttentionKernel":
        """Our kernels on ``gpu`` at ``head_dim`` (:func:`~distattn.kernels.speed.kernel_model`): the
        shipped tile fit, or one to ``latency_csv``, at the GPU report's level; ``efficiency`` of the
        GPU's peak where the report has no row."""
        tiles = kernel_model(gpu, head_dim, latency_csv, efficiency)
        return AttentionKernel(tiles, head_dim, tiles.source)


__all__ = ["AttentionKernel", "REFERENCE_LEN"]
