"""The simulator's presets: schedulers, and the models and GPUs of :mod:`distattn.model_shape` (no torch
or numpy, so ``--help`` reads them)."""

from __future__ import annotations

from ..model_shape import GPUS, MODELS
from ..schedulers import NAMES

# bounds no schedule reaches: per-document CP with each replica's attention evened out over its ranks
# (WLB-LLM's ideal), and all attention of all replicas evened out over all GPUs (no placement beats it)
BOUNDS = ("wlb-ideal", "ideal")
# the schedulers the simulator models: distattn's plus the bounds
SCHEDULERS = (*NAMES, *BOUNDS)

__all__ = ["BOUNDS", "SCHEDULERS", "MODELS", "GPUS"]
