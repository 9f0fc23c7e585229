"""The four sections of a run config (:mod:`.config` reads them from YAML, :mod:`.validation`
checks them) as frozen dataclasses: every key, its default and what it means, and the choices of
the keys that take one of a few words."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ...sim.memory_model import CAD_BACKWARDS, CHECKPOINTING, DP_MODES, JobFacts
from ...costmodel.model_shape import ModelShape
from ...schedulers import LOCAL, NAMES, PlanContext

if TYPE_CHECKING:   # (tiles imports numpy, which `distattn --help` must not)
    from ...costmodel.tiles import TileModel

DTYPES = ("fp32", "bf16")
ON_NONFINITE = ("stop", "skip_step")
SOURCES = ("stdlib", "tokens", "megatron", "hf", "blend")
PACKINGS = ("stream", "balanced")
ON_BAD_DOCUMENT = ("fail", "skip")
AUTO = "auto"          # parallel.cp / parallel.scheduler chosen per step (distattn/train/auto_plan.py)
FALLBACK = "zigzag"    # what scheduler: auto runs when a step's choice is late (the fixed choice)
# parallel.scheduler's values: a CP scheduler, "local" (one rank, one kernel call: cp 1) or auto
SCHEDULERS = (*NAMES, LOCAL.name, AUTO)


@dataclass(frozen=True)
class ModelConfig:
    dim: int = 256                 # model width (hidden size)
    n_layers: int = 4              # transformer blocks
    n_heads: int = 8               # query heads; dim / n_heads is the head dim (even)
    n_kv_heads: int = 4            # key/value heads (grouped-query attention): divides n_heads
    ffn_dim: int = 688             # the SwiGLU MLP's hidden size
    vocab_size: int = 256          # byte-level by default
    tie_embeddings: bool = True    # the output layer shares the token embedding's weights
    rope_theta: float = 10000.0    # RoPE's base; positions restart at 0 in every document
    # a learnable attention-sink logit per head and layer (gpt-oss; initialised to 0): every
    # softmax row gets an extra key of value 0 (distattn.attention's sinks=)
    attention_sinks: bool = False
    # attention logit soft-capping c: scores become c * tanh(score / c) (Gemma 2); unset: none
    softcap: float | None = None

    @property
    def shape(self) -> ModelShape:
        """The shape and its counts (parameters, MFU's FLOPs): what the simulator reads too."""
        return ModelShape(self.dim, self.n_layers, self.n_heads, self.n_kv_heads, self.ffn_dim, self.vocab_size,
                          self.tie_embeddings, self.attention_sinks)


@dataclass(frozen=True)
class BlendSource:
    """One source of ``data.blend``: documents of ``source`` at ``path`` (``tokenizer``: for ``hf``)
    drawn for a ``weight`` share of the tokens (weights are normalised: Megatron's ``--data-path
    0.3 A 0.7 B`` is ``[{path: A, weight: 0.3, source: megatron}, {path: B, weight: 0.7, ...}]``)."""
    path: str | None = None
    weight: float = 1.0
    source: str = "tokens"
    tokenizer: str | None = None


@dataclass(frozen=True)
class DataConfig:
    # where the documents come from (the next lines: each one's path); "stdlib": Python's standard library
    # sources, one document per file, byte-level, nothing to download
    source: str = "stdlib"
    # "tokens": a directory written by `distattn data prepare` (shards + index.json), or the prefix
    # of PATH.bin (flat tokens) + PATH.idx.npy (document offsets) of one token file;
    # "megatron": the prefix of a Megatron indexed dataset, PREFIX.bin + PREFIX.idx;
    # "hf": a Dataset.save_to_disk folder, a .parquet file or a folder of them
    path: str | None = None
    # hf: tokenize the 'text' column with this (bytes, a tokenizer.json or a folder holding one, a
    # Hugging Face tokenizer on disk); unset: the 'input_ids' column if there is one, else bytes
    tokenizer: str | None = None
    # source "blend": a list of {path, weight, source, tokenizer} (BlendSource), each document drawn
    # from the source whose token share lags its weight most (distattn/train/data/packer.py)
    blend: tuple[BlendSource, ...] | None = None
    seq_len: int = 8192            # tokens per packed sequence (one per data-parallel rank and step)
    seed: int = 0                  # the stream's shuffle and packing seed
    # how a step's global batch of dp * seq_len tokens reaches the data-parallel ranks (one
    # micro-batch each): stream (rank r takes the r-th seq_len tokens) or balanced (its pieces dealt
    # out by workload, distattn.pack_balanced: distattn/train/data/global_batch.py); unset: balanced
    # where parallel.dp > 1, else stream
    packing: str | None = None
    # balanced: most tokens one rank's sequence may hold (the memory estimate checks this length);
    # at least seq_len; unset: ceil(1.25 * seq_len) (distattn.planning.packing.DEFAULT_CAP_FACTOR)
    token_cap: int | None = None
    # preflight reads the data through once (distattn data verify: shard hashes, offsets, every token
    # id) instead of trusting index.json's counts; off by default: it costs a full read of the corpus
    verify: bool = False
    # a document that cannot be read (a null or undecodable row of an hf source, a Parquet page that
    # does not decode): fail (preflight refuses it, naming the file and row) or skip (passed over,
    # counted in one log line); distattn/train/data/bad_rows.py
    on_bad_document: str = "fail"

    @property
    def cap(self) -> int:
        """``token_cap``, or the default for ``seq_len``."""
        from ...planning.packing import default_token_cap

        return self.token_cap if self.token_cap is not None else default_token_cap(self.seq_len)


@dataclass(frozen=True)
class ParallelConfig:
    dp: int = 1                    # data-parallel replicas: each trains its own sequence of data.seq_len tokens a step
    # context-parallel ranks per replica, which share each sequence; auto: each step lays the ranks out
    # as CP groups of mixed power-of-two sizes chosen from its documents (needs world_size;
    # distattn/train/auto_plan.py)
    cp: int | str = 4
    # auto: each group's scheduler chosen per step, cad over its group's own ranks (distattn.sim.per_batch.MIXED)
    scheduler: str = "zigzag"
    # with cp: auto, the job's ranks; dp is then the sequences of data.seq_len a step trains, and the
    # fixed choice a late step falls back to is dp groups of world_size / dp ranks
    world_size: int | None = None
    # with auto: the links its choices are priced on, a `distattn cluster probe` profile (file or
    # folder); unset: an H100 cluster's typical links (distattn.costmodel.network.default_profile)
    network: str | None = None
    ulysses_degree: int | None = None   # for scheduler: usp
    # For scheduler: ulysses, usp: move and compute each rank's query heads head_groups parts at a
    # time, so the buffers spanning the whole sequence hold 1/head_groups of them (ignored otherwise)
    head_groups: int = 1
    # For scheduler: cad with dp > 1: balance attention over all dp x cp ranks (one plan over the
    # pool of every replica's CP group, DistCA's "no DP stragglers") instead of inside each CP
    # group. Ignored otherwise -- like ulysses_degree for schedulers other than usp -- because it
    # defaults to on: refusing it elsewhere would make every non-cad config say false, and
    # `--scheduler zigzag` on a cad config would stop working. With dp == 1 the pool is the CP
    # group itself, so the plan would be the same but cost an extra exchange of document lengths.
    cad_pool: bool = True
    # 1 | 2: each micro-batch cut into this many nano-batches of whole documents, interleaved through
    # the blocks so that one's attention transfers hide behind the other's compute (DistCA's
    # ping-pong: distattn/runtime/pingpong.py); unset: whichever the simulator prices faster for this run at start-up
    # (distattn/train/nano_default.py; the scheduler's default, 2 for cad and 1 otherwise, where it cannot price)
    nano_batches: int | None = None
    # For scheduler: cad, what its attention servers keep for the backward: resend (DistCA's: nothing
    # they received; the backward sends them Q, K/V, out, lse and dout again -- a rank keeps what a
    # ring scheduler keeps), keep (what they received: the backward sends only dout, the busiest
    # worker holds several ranks' rows), or auto: keep where its memory estimate fits the device at
    # train.activation_checkpointing, else resend (distattn/executors/task_a2a.py)
    cad_backward: str = "auto"
    # make each step's batch, nano-batches and attention plans on a background thread while the step
    # before runs (cad's placement: up to seconds a step at scale), so the step finds them ready; the
    # same plans and losses as false, which makes them inside the step (distattn/train/plan_ahead.py)
    plan_ahead: bool = True
    # how the dp x cp ranks share the model: ddp (whole parameters, gradients all-reduced), fsdp (FSDP2
    # fully_shard over all of them), hsdp (fully_shard on a 2-D mesh: dp_shard ranks shard each block,
    # the groups of them replicate and all-reduce gradients) or zero1 (whole parameters in the training
    # dtype; one bucketed gradient reduce-scatter and one parameter all-gather a step, AdamW on each
    # rank's 1/N of fp32 master weights: distattn/train/zero1.py). Checkpoints resume across modes
    dp_mode: str = "ddp"
    # hsdp: the ranks that shard each parameter (consecutive ranks: keep them inside a node, where the
    # gathers use NVLink); unset: the launcher's ranks per node (LOCAL_WORLD_SIZE; local processes: all)
    dp_shard: int | None = None
    # FSDP2's CPUOffloadPolicy: the fp32 parameter shards, their gradients and AdamW's state live in
    # (pinned) host memory; each block's parameters come to the GPU for its forward and backward,
    # and the optimizer steps on the CPU. Needs dp_mode: fsdp; shards even on one rank
    cpu_offload: bool = False
    backend: str = "auto"               # attention kernel backend
    # fp8: attention's Q, K, V, out and dout cross ranks as float8_e4m3 with a scale per token and
    # head (~0.52x bf16's bytes; gradients keep their dtype: distattn/planning/wire.py); unset: as they are
    comm_dtype: str | None = None
    timeout_s: float = 120.0            # collectives fail after this instead of hanging

    @property
    def pools_replicas(self) -> bool:
        """Whether the trainer plans CAD over the pool of all dp x cp ranks (see ``cad_pool``)."""
        from ...schedulers import spec

        return self.cad_pool and spec(self.fixed_scheduler).pools and self.dp > 1

    @property
    def auto(self) -> bool:
        """Whether each step chooses its CP groups or schedulers (``cp`` or ``scheduler`` is ``auto``)."""
        return AUTO in (self.cp, self.scheduler)

    @property
    def fixed_cp(self) -> int:
        """``cp``, or with ``cp: auto`` the fixed choice's: ``world_size / dp``."""
        return (self.world_size or self.dp) // self.dp if self.cp == AUTO else self.cp

    @property
    def fixed_scheduler(self) -> str:
        """``scheduler``, or with ``scheduler: auto`` the fixed choice's (:data:`FALLBACK`)."""
        return FALLBACK if self.scheduler == AUTO else self.scheduler


@dataclass(frozen=True)
class TrainSection:
    steps: int = 50                # optimizer updates the run takes (a resume counts those already taken)
    lr: float = 3e-3               # peak learning rate (AdamW), after warmup_steps of linear warmup
    min_lr: float = 3e-4           # where the cosine decay ends, at lr_decay_steps
    warmup_steps: int = 5          # steps of linear warmup from 0 to lr
    weight_decay: float = 0.1      # AdamW's decoupled weight decay
    grad_clip: float = 1.0         # the global gradient norm is clipped to this
    log_every: int = 1             # a metrics row (metrics.jsonl, TensorBoard, the console) every this many steps
    ckpt_every: int = 25           # a checkpoint every this many steps (and at the last step)
    seed: int = 0                  # the model's initial weights' seed
    out: str = "runs/tiny"         # the run's folder: metrics.jsonl, tb/, ckpt/step_N
    # bf16: parameters are cast to bf16 for compute (FSDP2 MixedPrecisionPolicy; the DDP path
    # autocasts); master weights, gradient reduction and AdamW state stay fp32
    dtype: str = "fp32"
    # none | full (recompute each block in backward, attention included) | selective (recompute
    # the projections and MLP, keep what the distributed attention saved: no second attention) |
    # offload (full, the kept block inputs in pinned host memory, prefetched one block ahead in
    # backward: train/offload.py)
    activation_checkpointing: str = "none"
    # tokens per chunk of the fused output projection + cross-entropy (full logits never exist)
    loss_chunk: int = 2048
    # tokens per chunk of each block's MLP, forward and backward (its [tokens, ffn_dim]
    # intermediates never exist whole; train/tiled.py); 0: the whole shard at once
    mlp_chunk: int = 0
    # torch.compile each block, whole (attention is a custom op: distattn/runtime/ops.py; a graph break is
    # an error); checkpointing and offload stay eager around the compiled block
    compile: bool = False
    # the device's dense bf16 peak for MFU; unset: looked up from the GPU's name (CPU: n/a)
    peak_tflops: float | None = None
    # a step whose loss or gradient norm is not finite: stop (no update, exit non-zero; the newest
    # checkpoint is the last good state) or skip_step (no update, logged with "skipped": true)
    on_nonfinite: str = "stop"
    # the cosine schedule's length in steps; unset: train.steps of the run that started the folder
    # (its checkpoints keep it), so --steps on a resume moves where the run stops, not the schedule
    lr_decay_steps: int | None = None
    # bitwise-equal reruns of one config on one machine: attention plans deterministic=True (fixed
    # reduction orders, no atomics) and torch's deterministic algorithms for the rest of the model
    deterministic: bool = False
    # keep only the newest N checkpoints that verify: once a save has verified, older complete
    # step_N folders beyond N are deleted (one that fails verification is not counted and stays,
    # as does anything else in OUT/ckpt); unset: keep every checkpoint
    keep_last: int | None = None
    # [start, end]: write a torch.profiler Chrome trace per rank of these steps under OUT/profile/
    profile_steps: tuple[int, int] | None = None


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainSection = field(default_factory=TrainSection)

    @property
    def world_size(self) -> int:
        p = self.parallel
        return (p.world_size or p.dp) if p.cp == AUTO else p.dp * p.cp

    @property
    def packing(self) -> str:
        """``data.packing``, or its default: ``balanced`` where ``parallel.dp > 1``, else ``stream`` (and
        under ``auto``, which deals the stream's pieces to its groups itself)."""
        return self.data.packing or ("balanced" if self.parallel.dp > 1 and not self.parallel.auto else "stream")

    @property
    def rank_tokens(self) -> int:
        """The most tokens one rank's sequence holds: ``data.token_cap``'s under balanced packing."""
        return self.data.cap if self.packing == "balanced" else self.data.seq_len

    @property
    def wrapper(self) -> str:
        """How the trainer wraps the model: ``"fsdp"`` (FSDP2; with ``cpu_offload`` even on one
        rank), ``"ddp"``, or ``"single"`` (one rank, no wrapper)."""
        if self.parallel.cpu_offload:
            return "fsdp"
        return "single" if self.world_size == 1 else self.parallel.dp_mode

    def job_facts(self, peak_tflops: float | None = None, cad_backward: str | None = None,
                  gpu: str | None = None) -> JobFacts:
        """The job in the facts the simulator states too (:class:`~distattn.sim.memory_model.JobFacts`), from
        which its plan context and its memory estimate's job follow; ``peak_tflops``: the GPU's (None: an
        H100's); ``cad_backward``: ``parallel.cad_backward`` resolved (None: as set, ``auto`` counted as
        ``resend``, the smaller). No ``gpus_per_node``: the config does not say, and usp's default degree
        stays uncapped by a node, as the trainer has always planned it. ``dp_shard`` (hsdp) resolved: unset
        is every rank, what local processes get (under torchrun the trainer takes LOCAL_WORLD_SIZE, which
        the config does not know)."""
        m, p, t = self.model, self.parallel, self.train
        backward = cad_backward or (p.cad_backward if p.cad_backward != AUTO else "resend")
        shard = (p.dp_shard or self.world_size) if self.wrapper == "hsdp" else None
        return JobFacts(m.shape, p.dp, p.fixed_cp, p.fixed_scheduler, dtype=t.dtype, ulysses_degree=p.ulysses_degree,
                        head_groups=p.head_groups, peak_tflops=peak_tflops, gpu=gpu, wrapper=self.wrapper,
                        cpu_offload=p.cpu_offload, pooled=p.pools_replicas,
                        activation_checkpointing=t.activation_checkpointing, loss_chunk=t.loss_chunk,
                        mlp_chunk=t.mlp_chunk, cad_backward=backward, dp_shard=shard)

    def plan_context(self, peak_tflops: float | None = None, gpu: str | None = None,
                     kernel: TileModel | None = None) -> PlanContext:
        """The job as the planners see it: each scheduler derives its options from it
        (:class:`~distattn.schedulers.PlanContext`); ``peak_tflops`` and ``gpu``: the GPU's peak and
        name (None: an H100's; cad balances the kernel's seconds on it), or ``kernel``: the kernel
        itself (a :class:`~distattn.costmodel.tiles.TileModel`)."""
        return self.job_facts(peak_tflops, gpu=gpu).plan_context(kernel=kernel)

    def replace(self, **sections) -> "RunConfig":
        """Copy with fields of sections changed: ``cfg.replace(train={"steps": 5})``."""
        return dataclasses.replace(self, **{name: dataclasses.replace(getattr(self, name), **values)
                                            for name, values in sections.items()})
