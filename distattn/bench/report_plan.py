"""What the GPU report (:mod:`.gpu_report`) trains, decided before any GPU is touched: the runs' configs,
the checkpointing setting and the lengths chosen by the memory estimate, which memory runs share the
GPU, and a rough time budget. ``python -m distattn.bench.gpu_report --plan`` prints it all.

The estimate is :func:`distattn.memory_model.estimate` of the :class:`~distattn.memory_model.Job` each
run's config trains -- the figure ``distattn train CONFIG --dry-run`` prints (:func:`TrainRun.job`
builds the Job the way :func:`distattn.train.memory.job` does; ``tests/test_gpu_report.py`` checks the
two agree for every run). The bench layer does not import the trainer: the runs go through
``distattn.cli`` as programs.

A setting *fits* a GPU when its estimated total (the CUDA runtime's 4 GiB included) plus
:data:`FIT_MARGIN` (the memory goal's tolerance) is at most the GPU's memory, so an estimate 10% low
still runs.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

from ..cost import BWD_FLOPS_FACTOR
from ..memory_model import GIB, Estimate, Job, estimate
from ..model_shape import ModelShape

FIT_MARGIN = 0.10
TILED_MLP_CHUNK = 4096      # train.mlp_chunk of the tiled-MLP settings (capacity.TILED_MLP_CHUNK's value)
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

    def job(self) -> Job:
        """The estimate's job for this config, as :func:`distattn.train.memory.job` makes it."""
        s = self.setting
        return Job(replace(self.model, name=""), self.seq_len, 1, 1, "zigzag", dtype="bf16",
                   wrapper="fsdp" if s.cpu_offload else "single", cpu_offload=s.cpu_offload,
                   activation_checkpointing=s.checkpointing, loss_chunk=2048, mlp_chunk=s.mlp_chunk, device="cuda")

    def estimate(self) -> Estimate:
        return estimate(self.job())


def fits(total_bytes: int, gpu_bytes: int) -> bool:
    """An estimated total fits a GPU of ``gpu_bytes`` with :data:`FIT_MARGIN` to spare."""
    return round(total_bytes * (1 + FIT_MARGIN)) <= gpu_bytes


def _total(model: ModelShape, seq_len: int, setting: Setting) -> int:
    return TrainRun("", model, seq_len, setting, 1).estimate().total


def choose_setting(model: ModelShape, seq_len: int, gpu_bytes: int,
                   total: Callable[[ModelShape, int, Setting], int] = _total) -> Setting | None:
    """The first of :data:`BY_COST` whose estimate fits (None: none does)."""
    return next((s for s in BY_COST if fits(total(model, seq_len, s), gpu_bytes)), None)


def longest_fitting(total_at: Callable[[int], int], gpu_bytes: int, step: int = LENGTH_STEP,
                    most: int = 1 << 24) -> int:
    """The longest multiple of ``step`` (at most ``most``) whose estimated total ``total_at(seq_len)``
    fits, doubling then bisecting (the estimate grows with the length); 0 when ``step`` does not fit."""
    if not fits(total_at(step), gpu_bytes):
        return 0
    lo, hi = 1, 2
    while hi * step <= most and fits(total_at(hi * step), gpu_bytes):
        lo, hi = hi, hi * 2
    hi = min(hi, most // step + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(total_at(mid * step), gpu_bytes) else (lo, mid)
    return lo * step


def memory_runs(gpu_bytes: int) -> list[TrainRun]:
    """The memory comparison: :data:`MEMORY_SETTINGS` at :data:`MEMORY_SEQ_LENS` on :data:`SMALL`, then
    ``full + cpu_offload`` at the longest multiple of :data:`LENGTH_STEP` that fits."""
    runs = [TrainRun(f"{s.label} @ {n // 1024}K", SMALL, n, s, MEMORY_STEPS) for s in MEMORY_SETTINGS
            for n in MEMORY_SEQ_LENS]
    longest = longest_fitting(lambda n: _total(SMALL, n, OFFLOAD_SETTING), gpu_bytes)
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
    from ..kernels.bench import MAX_REPS, MIN_REPS

    total = KERNEL_START_S
    for flops, backends in cases:
        for t in (flops / (KERNEL_TFLOPS * 1e12), BWD_FLOPS_FACTOR * flops / (KERNEL_TFLOPS * 1e12)):
            reps = min(MAX_REPS, max(MIN_REPS, int(rep_budget_s / t) + 1))
            total += backends * (1 + reps) * t
    return total


__all__ = ["FIT_MARGIN", "TILED_MLP_CHUNK", "SMALL", "LLAMA3_8B_4L", "Setting", "TrainRun", "fits", "choose_setting",
           "longest_fitting", "memory_runs", "stack_runs", "backend_runs", "waves", "run_seconds", "kernel_seconds",
           "GIB"]
