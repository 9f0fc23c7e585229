"""The attention kernel a job runs, as a :class:`~distattn.costmodel.tiles.TileModel` on its GPU: one place, so
that CAD's planner (``distattn.plan(..., scheduler="cad", gpu=...)``) and the simulator price a task
alike.

* **the shape** -- a CTA's fixed cost, the critical path -- from the tile fit: the shipped H100 fit
  (:data:`distattn.costmodel.tiles.H100`), or a fit to ``table`` (``--kernel-table``);
* **the level**: our own kernels at 32K tokens, causal, bf16 -- the GPU report's table
  (``distattn.kernels.auto``: ``scripts/gpu_report.sh``), the faster backend per direction as
  ``backend="auto"`` runs them (head dim 128: forward 435 TFLOP/s, backward 298). sm_90 parts (H100,
  H200, H800, GH200) share it; another GPU scales it by its dense peak; where the report has no row,
  ``efficiency`` of the peak.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from .auto import rows_at
from ..costmodel.model_shape import GPU, GPUS, gpu_named
from ..costmodel.tiles import H100, TileModel, fit, read_table

SM90 = ("h100", "h100-pcie", "h200", "h800", "gh200")
REFERENCE_LEN = 32768           # the length the GPU report measures its TFLOP/s at


def gpu_of(gpu: str | GPU) -> GPU:
    """``gpu`` by name (``distattn.costmodel.model_shape.GPUS``), or as given."""
    if isinstance(gpu, GPU):
        return gpu
    if not isinstance(gpu, str) or gpu.lower() not in GPUS:
        raise ValueError(f"gpu={gpu!r} is not a GPU distattn knows; choose one of {', '.join(sorted(GPUS))}")
    return GPUS[gpu.lower()]


def device_gpu(device) -> str | None:
    """The name of a torch ``device``'s GPU in :data:`distattn.costmodel.model_shape.GPU_TABLE` (what cad
    balances its kernel's seconds on); None on CPU or for a GPU the table does not know."""
    import torch

    if torch.device(device).type != "cuda":
        return None
    gpu = gpu_named(torch.cuda.get_device_name(device))
    return None if gpu is None else gpu.name


def kernel_model(gpu: str | GPU = "h100", head_dim: int = 128, table: str | Path | None = None,
                 efficiency: float = 0.5) -> TileModel:
    """The tile model of our kernels on ``gpu`` at ``head_dim`` (module docstring); ``table``: a latency
    table to fit the shape to instead of the shipped fit."""
    return _kernel_model(gpu_of(gpu), int(head_dim), None if table is None else str(table), float(efficiency))


@lru_cache(maxsize=32)
def _kernel_model(gpu: GPU, head_dim: int, table: str | None, efficiency: float) -> TileModel:
    shape = H100 if table is None else fit(read_table(table), source=f"tiles fitted to {Path(table).name}")
    levels, where = [], []
    for direction in ("fwd", "bwd"):
        rows = rows_at(90, direction)
        if not rows:
            levels.append(efficiency * gpu.peak_tflops)
            continue
        row = ([r for r in rows if r.head_dim <= head_dim] or rows[:1])[-1]
        speed = max(s for _, s in row.tflops)
        levels.append(speed if gpu.name in SM90 else speed * gpu.peak_tflops / GPUS["h100"].peak_tflops)
        where.append(f"{direction} {speed:.0f} TFLOP/s at hd {row.head_dim}")
    level = (f"at the GPU report's level ({', '.join(where)}; {REFERENCE_LEN // 1024}K causal)"
             + ("" if gpu.name in SM90 else f", scaled to {gpu.name}") if where
             else f"at {efficiency:.0%} of {gpu.name}'s peak")
    return shape.at_level(levels[0], levels[1], head_dim, f"{shape.source}, {level}", length=REFERENCE_LEN)


__all__ = ["REFERENCE_LEN", "SM90", "device_gpu", "gpu_of", "kernel_model"]
