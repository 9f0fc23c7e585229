"""Attention cost: the FLOPs of a mask's visible pairs, and how long a task of ``q_len`` queries
over ``kv_len`` keys takes, forward plus backward.

FLOPs follow the FlashAttention convention: forward = 4 * area * Hq * D, backward = 2.5 * forward,
where area counts the unmasked (query, key) pairs (:func:`distattn.planning.masks.mask_area` counts them).

Both models answer ``task_time(q_lens, kv_lens, areas) -> seconds`` of forward plus backward,
vectorised over tasks (``areas``: the visible pairs, ``kv_lens``: the span of keys a task sees); CAD's
planner balances with it:

* :class:`TileCost` (what ``distattn.plan(..., scheduler="cad", gpu=...)`` plans with): the tile
  model of the kernel on the GPU (:mod:`distattn.costmodel.tiles`) -- a task of few query rows against a long
  key prefix costs more per pair in its backward, whose CTAs run over the keys;
* :class:`Roofline`: the larger of compute time (the FLOPs at an achieved fraction of peak) and memory
  time (reading Q, K, V and writing O), every pair alike.

Kernel launches are per call, not per task, so they are not part of a task's time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .model_shape import BWD_FLOPS_FACTOR, GPUS, MODELS
from .tiles import TileModel

_H100, _LLAMA3_8B = GPUS["h100"], MODELS["llama3-8b"]


def attention_flops(area: int | np.ndarray, num_heads: int, head_dim: int, backward: bool = False):
    """Forward (or backward, 2.5x) FLOPs of attention over ``area`` visible pairs."""
    fwd = 4 * area * num_heads * head_dim
    return fwd * BWD_FLOPS_FACTOR if backward else fwd


def causal_area(n) -> np.ndarray:
    n = np.asarray(n, dtype=np.float64)
    return n * (n + 1) / 2


@dataclass(frozen=True)
class Roofline:
    """H100 SXM bf16 defaults with a Llama-3-8B attention shape (32 query, 8 KV heads of 128), as
    :mod:`distattn.costmodel.model_shape` has them."""

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
        return (1 + BWD_FLOPS_FACTOR) * np.maximum(compute, memory)


@dataclass(frozen=True)
class TileCost:
    """The tile model ``tiles`` of the kernel on a GPU (:func:`distattn.kernels.speed.kernel_model`)
    on an attention of ``num_heads`` query heads (one call's), as a task's forward plus backward share
    of the GPU (:meth:`distattn.costmodel.tiles.TileModel.task_seconds`)."""

    tiles: TileModel
    num_heads: int = _LLAMA3_8B.n_heads
    num_kv_heads: int = _LLAMA3_8B.n_kv_heads
    head_dim: int = _LLAMA3_8B.head_dim
    dtype_bytes: int = 2

    def task_time(self, q_lens, kv_lens, areas) -> np.ndarray:
        return self.tiles.task_seconds(q_lens, kv_lens, areas, self.num_heads)

    @property
    def min_task_rows(self) -> int:
        """The fewest query rows whose backward loop is not mostly fixed cost: as many loop iterations
        as a CTA's fixed cost (CAD's planner cuts no task shorter where balance does not need it)."""
        g = self.tiles.backward
        return int(np.ceil(g.fixed)) * g.loop_rows
