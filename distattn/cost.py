"""Attention cost: the FLOPs of a mask's visible pairs, and how long a task of ``q_len`` queries
over ``kv_len`` keys takes.

FLOPs follow the FlashAttention convention: forward = 4 * area * Hq * D, backward = 2.5 * forward,
where area counts the unmasked (query, key) pairs (:mod:`distattn.masks` counts them).

Both models answer ``task_time(q_lens, kv_lens, areas) -> seconds`` vectorised
over tasks, where ``areas`` are the visible (query, key) pairs; the CAD planner
balances with it and the simulator replays plans on it.

* :class:`Roofline` (default): the larger of compute time (``4 * area * Hq * D``
  FLOPs at an achieved fraction of peak) and memory time (reading Q, K, V and
  writing O). Short shards are memory-bound, long ones compute-bound. Kernel
  launches are per call, not per task, so they are not part of a task's time.
* :class:`ProfileCost`: measured latency of causal documents of length ``L``
  (a table like ``attn_latency_h100.csv``: ``L, cp, tp, duration_per_doc`` in
  ms) turned into achieved pairs/second as a function of the query length,
  interpolated in log space; a task costs ``area / throughput(q_len)``.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .masks import mask_area
from .model_shape import BWD_FLOPS_FACTOR, GPUS, MODELS

_H100, _LLAMA3_8B = GPUS["h100"], MODELS["llama3-8b"]


def attention_flops(area: int | np.ndarray, num_heads: int, head_dim: int, backward: bool = False):
    """Forward (or backward, 2.5x) FLOPs of attention over ``area`` visible pairs."""
    fwd = 4 * area * num_heads * head_dim
    return fwd * BWD_FLOPS_FACTOR if backward else fwd


def document_flops(doc_lens, causal: bool, window: int | None, num_heads: int, head_dim: int) -> float:
    """Forward plus backward attention FLOPs of a packed sequence (backward = 2.5x forward)."""
    lens = np.asarray(doc_lens, dtype=np.int64)
    area = int(mask_area(lens, lens, causal, window).sum())
    return (1 + BWD_FLOPS_FACTOR) * float(attention_flops(area, num_heads, head_dim))


def causal_area(n) -> np.ndarray:
    n = np.asarray(n, dtype=np.float64)
    return n * (n + 1) / 2


@dataclass(frozen=True)
class Roofline:
    """H100 SXM bf16 defaults with a Llama-3-8B attention shape (32 query, 8 KV heads of 128), as
    :mod:`distattn.model_shape` has them."""

    peak_tflops: float = _H100.peak_tflops
    efficiency: float = 0.5          # achieved fraction of peak in the attention kernel
    bandwidth_gbs: float = 3350.0
    num_heads: int = _LLAMA3_8B.n_heads
    num_kv_heads: int = _LLAMA3_8B.n_kv_heads
    head_dim: int = _LLAMA3_8B.head_dim
    dtype_bytes: int = 2

    def task_time(self, q_lens, kv_lens, areas) -> np.ndarray:
        q, kv, area = (np.asarray(x, dtype=np.float64) for x in (q_lens, kv_lens, areas))
        compute = attention_flops(area, self.num_heads, self.head_dim) / (self.peak_tflops * 1e12 * self.efficiency)
        io = (2 * q * self.num_heads + 2 * kv * self.num_kv_heads) * self.head_dim * self.dtype_bytes
        memory = io / (self.bandwidth_gbs * 1e9)
        return np.maximum(compute, memory)


@dataclass(frozen=True)
class ProfileCost:
    """Achieved throughput by query length, from measured causal-document latencies."""

    lengths: tuple[float, ...]
    pairs_per_s: tuple[float, ...]

    @staticmethod
    def from_latencies(lengths, seconds) -> "ProfileCost":
        lengths = np.asarray(lengths, dtype=np.float64)
        seconds = np.asarray(seconds, dtype=np.float64)
        if lengths.ndim != 1 or lengths.shape != seconds.shape or len(lengths) < 2 or (seconds <= 0).any():
            raise ValueError("a latency profile needs >= 2 (length, positive seconds) points")
        order = np.argsort(lengths)
        return ProfileCost(tuple(lengths[order]), tuple(causal_area(lengths[order]) / seconds[order]))

    @staticmethod
    def from_csv(path: str | Path, cp: int = 1, tp: int = 1) -> "ProfileCost":
        """Rows ``L, cp, tp, duration_per_doc`` (ms per causal document of length L)."""
        with open(path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if int(r["cp"]) == cp and int(r["tp"]) == tp]
        if not rows:
            raise ValueError(f"{path}: no rows with cp={cp}, tp={tp}")
        return ProfileCost.from_latencies([float(r["L"]) for r in rows],
                                          [float(r["duration_per_doc"]) * 1e-3 for r in rows])

    def throughput(self, q_lens) -> np.ndarray:
        x = np.log(np.clip(np.asarray(q_lens, dtype=np.float64), 1.0, None))
        return np.exp(np.interp(x, np.log(self.lengths), np.log(self.pairs_per_s)))

    def task_time(self, q_lens, kv_lens, areas) -> np.ndarray:
        return np.asarray(areas, dtype=np.float64) / self.throughput(q_lens)
