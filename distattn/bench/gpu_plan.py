"""What the GPU report (:mod:`.bench_gpu_report`) trains, decided before any GPU is touched: the runs'
configs, the checkpointing setting and the lengths chosen by the memory estimate, which memory runs share
the GPU, and a rough time budget. ``python -m distattn.bench.gpu_report --plan`` prints it all.

It lives in the train layer (as the trainer benchmarks, ``bench_*.py``, do) because it plans with the
trainer's own code, not a copy of it: each run's estimate is :func:`.memory.estimate` of the config
:meth:`TrainRun.yaml` writes, read back by :func:`.config.load_config` -- the figure
``distattn train CONFIG --dry-run`` prints; the longest ``cpu_offload`` length is
:func:`.capacity.longest_seq_len`'s search (``--dry-run --max-seq-len``), and the tiled MLP's chunk is
:data:`.capacity.TILED_MLP_CHUNK`. The runs themselves still go through ``distattn.cli`` as programs
(:mod:`.bench_gpu_runner`).

A setting *fits* a GPU when its estimated total (the CUDA runtime's 4 GiB included) plus
:data:`FIT_MARGIN` (the memory goal's tolerance) is at most the GPU's memory, so an estimate 10% low
still runs: the estimate within :func:`budget` of the GPU's bytes (:func:`.memory.fits_in`).
"""

from __future__ import annotations

import functools
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..costmodel.cost import BWD_FLOPS_FACTOR
from ..sim.memory_model import GIB, Estimate
from ..costmodel.model_shape import ModelShape
from ..train.preflight import memory
from ..train.preflight.capacity import TILED_MLP_CHUNK, longest_seq_len
from ..train.config import RunConfig, load_config

FIT_MARGIN = 0.10
LENGTH_STEP = 16384         # the cpu_offload run's length is the longest multiple of this that fits
# the existing short-training model: 2048 dim, 4 layers, GQA 16/4, tied embedding (the config's default)
SMALL = ModelShape(2048, 4, 16, 4, 5632, 32000, tie_embeddings=True, name="2048-dim 4-layer")
# Llama-3-8B's layer, 4 of them, untied 128K vocabulary
LLAMA3_8B_4L = ModelShape(4096, 4, 32, 8, 14336, 128256, tie_embeddings=False, name="Llama-3-8B layers x4")
MEMORY_SEQ_LENS = (16384, 131072)
STACK_SEQ_LENS = (32768, 131072)
MEMORY_STEPS = 3            # the run's allocator peak comes in step 2 (AdamW's state exists from step 1's update)
OFFLOAD_STEPS = 2           # the long cpu_offload run: the peak's step, no more
STACK_STEPS = {32768: 6, 131072: 4}
STACK_WARMUP = 2            # steps left out of the stack's means (autotuning in step 1)
BACKEND_WARMUP = 3          # the per-backend runs' (as before: compilation and autotuning)


@dataclass(frozen=True)
class Setting:
    """How a run saves memory: ``train.activation_checkpointing``, ``train.mlp_chunk`` (0: the MLP whole)
    and ``parallel.cpu_offload`` (FSDP2's CPUOffloadPolicy on one rank)."""

    checkpointing: str = "full"
    mlp_chunk: int = 0
    cpu_offload: bool = False

    @property
    def label(self) -> str:
        return (self.checkpointing + (f" + tiled MLP ({self.mlp_chunk})" if self.mlp_chunk else "")
                + (" + cpu_offload" if self.cpu_offload else ""))


MEMORY_SETTINGS = (Setting("none"), Setting("full"), Setting("offload"), Setting("offload", TILED_MLP_CHUNK))
OFFLOAD_SETTING = Setting("full", 0, True)
# the stack's candidates, least recomputation and traffic first: the first that fits is chosen
BY_COST = (Setting("none"), Setting("selective"), Setting("full"), Setting("full", TILED_MLP_CHUNK),
           Setting("offload", TILED_MLP_CHUNK), Setting("full", 0, True), Setting("offload", TILED_MLP_CHUNK, True))


@functools.lru_cache(maxsize=None)
def _load(text: str) -> RunConfig:
    """A config's YAML read as ``distattn train`` reads its file (:func:`.config.load_config`)."""
    with tempfile.TemporaryDirectory(prefix="distattn-gpu-plan-") as tmp:
        path = Path(tmp) / "run.yaml"
        path.write_text(text)
        return load_config(path)


@dataclass(frozen=True)
class TrainRun:
    """One short one-GPU training: the model, tokens per step, memory setting, steps, attention backend,
    and how many first steps the means leave out."""

    name: str
    model: ModelShape
    seq_len: int
    setting: Setting
    steps: int
    warmup: int = 0
    backend: str = "triton"
    compile: bool = False
    deterministic: bool = False

    def yaml(self, out: str) -> str:
        """The run config ``distattn train`` reads (bf16, one rank, ``out`` its folder; no checkpoint
        before the last step)."""
        m, s = self.model, self.setting
        return (f"model: {{dim: {m.dim}, n_layers: {m.n_layers}, n_heads: {m.n_heads}, n_kv_heads: {m.n_kv_heads}, "
                f"ffn_dim: {m.ffn_dim}, vocab_size: {m.vocab_size}, tie_embeddings: {str(m.tie_embeddings).lower()}}}\n"
                f"data: {{source: stdlib, seq_len: {self.seq_len}, seed: 0}}\n"
                f"parallel: {{dp: 1, cp: 1, backend: {self.backend}, dp_mode: {'fsdp' if s.cpu_offload else 'ddp'}, "
                f"cpu_offload: {str(s.cpu_offload).lower()}}}\n"
                f"train: {{steps: {self.steps}, dtype: bf16, activation_checkpointing: {s.checkpointing}, "
                f"mlp_chunk: {s.mlp_chunk}, warmup_steps: 2, log_every: 1, ckpt_every: 1000, out: '{out}', "
                f"compile: {str(self.compile).lower()}, deterministic: {str(self.deterministic).lower()}}}\n")

    def config(self, out: str = "gpu-report-run") -> RunConfig:
        """:meth:`yaml` as the trainer loads it (the folder ``out`` does not change the estimate)."""
        return _load(self.yaml(out))

    def estimate(self) -> Estimate:
        """One GPU's peak training this config: what ``distattn train CONFIG --dry-run`` prints."""
        return memory.estimate(self.config())


def budget(gpu_bytes: int) -> int:
    """What an estimate may total on a GPU of ``gpu_bytes`` with :data:`FIT_MARGIN` to spare:
    ``estimate * (1 + FIT_MARGIN) <= gpu_bytes``."""
    return round(gpu_bytes / (1 + FIT_MARGIN))


def fits(run: TrainRun, gpu_bytes: int) -> bool:
    """``run``'s estimate fits a GPU of ``gpu_bytes`` with :data:`FIT_MARGIN` to spare."""
    cfg = run.config()
    return memory.fits_in(cfg, memory.estimate(cfg), budget(gpu_bytes))


def choose_setting(model: ModelShape, seq_len: int, gpu_bytes: int,
                   fit: Callable[[TrainRun, int], bool] = fits) -> Setting | None:
    """The first of :data:`BY_COST` whose estimate fits (None: none does)."""
    return next((s for s in BY_COST if fit(TrainRun("", model, seq_len, s, 1), gpu_bytes)), None)


def longest_fitting(model: ModelShape, setting: Setting, gpu_bytes: int, step: int = LENGTH_STEP) -> int:
    """The longest multiple of ``step`` tokens whose estimate fits (0: not even ``step``):
    :func:`.capacity.longest_seq_len` in :func:`budget`, rounded down to ``step`` (the estimate grows
    with the length, so no longer multiple of ``step`` fits)."""
    return longest_seq_len(TrainRun("", model, step, setting, 1).config(), budget(gpu_bytes)) // step * step


def memory_runs(gpu_bytes: int) -> list[TrainRun]:
    """The memory comparison: :data:`MEMORY_SETTINGS` at :data:`MEMORY_SEQ_LENS` on :data:`SMALL`, then
    ``full + cpu_offload`` at the longest multiple of :data:`LENGTH_STEP` that fits."""
    runs = [TrainRun(f"{s.label} @ {n // 1024}K", SMALL, n, s, MEMORY_STEPS) for s in MEMORY_SETTINGS
            for n in MEMORY_SEQ_LENS]
    longest = longest_fitting(SMALL, OFFLOAD_SETTING, gpu_bytes)
    if longest:
        runs.append(TrainRun(f"{OFFLOAD_SETTING.label} @ {longest // 1024}K (longest that fits)", SMALL, longest,
                             OFFLOAD_SETTING, OFFLOAD_STEPS))
    return runs


def stack_runs(gpu_bytes: int) -> list[TrainRun]:
    """The 8B-shaped stack at :data:`STACK_SEQ_LENS`, each with the cheapest setting that fits (none
    fitting: the run is left out and the report says so), attention ``backend: auto`` (the trainer's
    default: per call the faster of triton and torch, ``kernels/auto.py``)."""
    runs = []
    for n in STACK_SEQ_LENS:
        setting = choose_setting(LLAMA3_8B_4L, n, gpu_bytes)
        if setting is not None:
            runs.append(TrainRun(f"{n // 1024}K, {setting.label}", LLAMA3_8B_4L, n, setting, STACK_STEPS[n],
                                 STACK_WARMUP, backend="auto"))
    return runs


def backend_runs(steps: int, seq_len: int) -> list[TrainRun]:
    """The per-backend short training (full checkpointing): ``triton``, ``torch`` and ``triton`` with
    ``train.deterministic`` (the ``train.compile`` variant was cut for time: ~50 s of compiling)."""
    full = Setting("full")
    return [TrainRun("triton", SMALL, seq_len, full, steps, BACKEND_WARMUP),
            TrainRun("torch", SMALL, seq_len, full, steps, BACKEND_WARMUP, backend="torch"),
            TrainRun("triton + deterministic", SMALL, seq_len, full, steps, BACKEND_WARMUP, deterministic=True)]


def waves(sizes: list[tuple[str, int]], capacity: int, most: int = 4) -> list[list[str]]:
    """First-fit decreasing: names grouped into waves whose ``sizes`` (bytes, with :data:`FIT_MARGIN`
    added) sum to at most ``capacity``, at most ``most`` per wave; one too large runs alone."""
    bins: list[tuple[int, list[str]]] = []
    for name, size in sorted(sizes, key=lambda item: -item[1]):
        need = size * (1 + FIT_MARGIN)
        for i, (used, names) in enumerate(bins):
            if used + need <= capacity and len(names) < most:
                bins[i] = (used + need, names + [name])
                break
        else:
            bins.append((need, [name]))
    return [names for _, names in bins]


# ---- a rough time budget (what --plan prints; the report's parts are timed for real) ----
SUITE_S = 166               # tests/test_gpu.py with 4 xdist workers, measured on an H100 (140-166 s)
PROCESS_S = 15              # one training process: imports, CUDA and NCCL, data, Triton autotuning in step 1
ASSUMED_MFU = 0.35          # of the GPU's dense bf16 peak, for the FLOPs the step executes
KERNEL_START_S = 40         # the kernel benchmark's start, compiling and autotuning
KERNEL_TFLOPS = 400.0       # an attention kernel's rate, for the kernel cases' time
CPU_ADAM_S = 3.0            # seconds per billion parameters of a CPU AdamW step (cpu_offload)
RECOMPUTE = {"none": 1.0, "selective": 1.25, "full": 4 / 3, "offload": 4 / 3}


def attention_pairs(seq_len: int) -> float:
    """Visible pairs of a stdlib-packed sequence, roughly: half the causal area up to 128K tokens, then
    growing linearly (documents are at most a few hundred K bytes; measured on the packer's batches)."""
    return seq_len * min(seq_len, 131072) / 4


def step_seconds(run: TrainRun, peak_tflops: float) -> float:
    """A rough step time: the model's FLOPs (PaLM's count, :meth:`ModelShape.model_flops`) times the
    recomputation, at :data:`ASSUMED_MFU`, plus a CPU AdamW step under cpu_offload."""
    m, s = run.model, run.setting
    attention = 4 * attention_pairs(run.seq_len) * m.n_heads * m.head_dim
    flops = m.model_flops(run.seq_len, attention) * (RECOMPUTE[s.checkpointing] + (0.1 if s.mlp_chunk else 0))
    return flops / (peak_tflops * 1e12 * ASSUMED_MFU) + (CPU_ADAM_S * m.params / 1e9 if s.cpu_offload else 0.0)


def run_seconds(run: TrainRun, peak_tflops: float) -> float:
    return PROCESS_S + run.steps * step_seconds(run, peak_tflops)


def kernel_seconds(cases: list[tuple[float, int]], rep_budget_s: float) -> float:
    """The kernel benchmark: its start plus, per ``(forward FLOPs, backends that run)`` case, a warm-up
    call and the timed calls of the forward and of the backward (2.5x) at :data:`KERNEL_TFLOPS`."""
    from ..kernels.tools.bench import MAX_REPS, MIN_REPS

    total = KERNEL_START_S
    for flops, backends in cases:
        for t in (flops / (KERNEL_TFLOPS * 1e12), BWD_FLOPS_FACTOR * flops / (KERNEL_TFLOPS * 1e12)):
            reps = min(MAX_REPS, max(MIN_REPS, int(rep_budget_s / t) + 1))
            total += backends * (1 + reps) * t
    return total


__all__ = ["FIT_MARGIN", "TILED_MLP_CHUNK", "SMALL", "LLAMA3_8B_4L", "Setting", "TrainRun", "budget", "fits",
           "choose_setting", "longest_fitting", "memory_runs", "stack_runs", "backend_runs", "waves", "run_seconds",
           "kernel_seconds", "GIB"]
