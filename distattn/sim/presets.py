"""The simulator's presets: schedulers, models and GPUs (no torch or numpy, so ``--help`` reads them)."""

from __future__ import annotations

from dataclasses import dataclass

from ..schedulers import NAMES

# bounds no schedule reaches: per-document CP with each replica's attention evened out over its ranks
# (WLB-LLM's ideal), and all attention of all replicas evened out over all GPUs (no placement beats it)
BOUNDS = ("wlb-ideal", "ideal")
# the schedulers the simulator models: distattn's plus the bounds
SCHEDULERS = (*NAMES, *BOUNDS)


@dataclass(frozen=True)
class ModelPreset:
    name: str
    n_layers: int
    dim: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    vocab: int

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def layer_params(self) -> int:
        kv = 2 * self.dim * self.n_kv_heads * self.head_dim
        return 2 * self.dim * self.dim + kv + 3 * self.dim * self.ffn_dim

    @property
    def params(self) -> int:
        return self.n_layers * self.layer_params + 2 * self.vocab * self.dim


MODELS = {m.name: m for m in (
    ModelPreset("llama3-8b", 32, 4096, 32, 8, 14336, 128256),
    ModelPreset("llama-34b", 48, 8192, 64, 8, 22016, 32000),
    ModelPreset("llama3-70b", 80, 8192, 64, 8, 28672, 128256),
)}


@dataclass(frozen=True)
class GPUPreset:
    name: str
    peak_tflops: float     # dense bf16
    memory_gb: float


GPUS = {g.name: g for g in (GPUPreset("h100", 989.0, 80.0), GPUPreset("h200", 989.0, 141.0))}
