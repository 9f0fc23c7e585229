"""The simulator's presets: schedulers, and the models and GPUs of :mod:`distattn.costmodel.model_shape` (no torch
or numpy, so ``--help`` reads them)."""

from __future__ import annotations

from ..costmodel.model_shape import GPUS, MODELS
from ..schedulers import NAMES

# bounds no schedule reaches: per-document CP with each replica's attention evened out over its ranks
# (WLB-LLM's ideal), and all attention of all replicas evened out over all GPUs (no placement beats it)
BOUNDS = ("wlb-ideal", "ideal")
# the rows the simulator models: distattn's schedulers, WLB-LLM as its paper runs it (per-document CP
# with K/V all-gathered, its outlier-queue packing: distattn.sim.workload), and the bounds
SCHEDULERS = (*NAMES, "wlb", *BOUNDS)
# how a global batch is dealt to the replicas' micro-batches (distattn.sim.workload)
PACKINGS = ("stream", "balanced")

__all__ = ["BOUNDS", "SCHEDULERS", "PACKINGS", "MODELS", "GPUS"]
