"""One rank's peak memory in training a job: ``estimate(job) -> Estimate``. The one memory model of
distattn: ``distattn train CONFIG --dry-run`` and ``--max-seq-len`` and ``distattn simulate``'s memory
column both call it, with the :class:`Job` made by one translation, :meth:`JobFacts.job`, of the facts
each side states once (``RunConfig.job_facts``, :func:`distattn.sim.job.job_facts`); the planners'
view of the job, :meth:`JobFacts.plan_context`, follows from the same facts.

Components (bytes, per rank; ``N = dp * cp`` ranks, ``P`` parameters, ``T = ceil(seq_len / cp)``
tokens per rank, ``b`` the compute dtype's bytes -- 2 for bf16, 4 for fp32). The job's fields are
named as the trainer's config keys they come from (``parallel.dp_mode`` is ``wrapper``, which is
``"single"`` on one rank):

* ``weights``, ``grads``, ``optimizer``: the parameters, their gradients and AdamW's two fp32
  moments as ``parallel.dp_mode`` keeps them (:mod:`distattn.sim.dp_memory`, which has the formulas):
  ``ddp`` replicates all of them in fp32 and adds DDP's gradient buckets (bf16: the block weights'
  bf16 copies autocast caches during the forward); ``fsdp`` shards them over the N ranks (FSDP2
  over the flattened dp x cp mesh, as the trainer wraps it) and ``hsdp`` over each group of
  ``dp_shard``, adding the unsharded copies a rank computes with in the compute dtype (the root
  module's and two blocks'; ``cpu_offload`` moves the shards, their gradients and the moments to
  host memory, ``host_states``); ``zero1`` keeps whole parameters in the compute dtype and shards
  the fp32 master weights, the reduced gradients and the moments over the N ranks, adding backward's
  gradient buckets (or, where larger, its step's parameter all-gathers). One rank (no wrapper): as
  DDP without buckets.
  :func:`cheapest_mode` picks the mode of fewest network bytes whose estimate fits.
* ``activations``: what autograd keeps, counted tensor by tensor from :mod:`distattn.train.model.transformer`
  per block and token -- RMSNorm's input and fp32 rsqrt, the norm outputs the projections read
  (one bf16 copy per projection under autocast), RoPE's cos/sin, the attention output (wo's
  input), the SwiGLU w1/w3 outputs, silu and the product,
  plus what attention keeps (below). Residuals are fp32 under DDP's autocast and fp32 runs,
  bf16 under bf16 parameters (fsdp's and hsdp's, zero1's). ``activation_checkpointing``: ``none``
  keeps all of it per layer; ``full`` keeps each block's input per layer and one block's everything while it is
  recomputed; ``selective`` keeps per layer the block input and what attention saves, and one
  block's recomputation. ``offload`` (:mod:`distattn.train.model.offload`) is ``full`` with the
  per-layer block inputs in host memory (``host``): the device keeps two (the one recomputed,
  the one prefetched). A block's backward peaks at one of three moments, each adding the
  gradient arriving on the residual stream: the MLP's (the whole block's saved tensors and the
  SwiGLU gradients, net ``2 * T * ffn_dim``) -- the ``activations`` -- attention's (the MLP half
  freed; the schedule's ``grad_bytes``: accumulators and one kernel call's gradients; the output
  gradient, the schedule's buffers) and the first norm's (dQ/dK/dV in token layout, the norm
  output's gradient); the excess of the larger of the last two is ``attention_buffers``.
  ``mlp_chunk`` ``c`` (:mod:`distattn.train.model.tiled`): the MLP keeps only its input, and its
  working set is one chunk's, ``7 * c * ffn_dim`` (four recomputed intermediates, three
  gradients) -- attention's moment then is usually the larger.
* what attention keeps per layer, from a *dry plan* of the job (``distattn.plan(docs, N)``):
  ring, zigzag, allgather and one rank keep their local q, k, v, out and fp32 lse; ulysses and
  usp keep the head-sharded q, out and lse and their KV head shard (expanded again in backward
  where GQA grouping needs it) of their Ulysses group's tokens; cad (``cad_backward``) keeps the rank's own
  q, k, v, out and lse (``resend``: its workers keep nothing received) or the worker's received task rows
  (``keep``: Q, out, lse and the K/V union). What a backward receives (dout; resend: Q, out, lse and
  K/V again) counts once, in its buffers at the backward's moment, not in what is kept.
* ``attention_buffers``: what attention's backward moment adds over the MLP's (above; often 0
  without a tiled MLP), the schedule's own ``buffer_bytes`` of the busiest rank included
  (ring/zigzag: the K/V block computed on and the one arriving, and the fp32 dK/dV in flight;
  allgather: a head group's gathered K/V and its copy in global order; ulysses/usp: the
  head-sharded dout of one of ``head_groups`` (usp: plus its ring's K/V); cad: what the worker
  receives for its backward and the dQ, dK/dV it sends back).
* ``loss``: the final norm (its input and the hidden state the loss reads), the
  log-sum-exps ``loss.chunked_cross_entropy`` saves, and the larger of its forward (one chunk's
  logits in the compute dtype and in fp32) and its backward (the hidden state's gradient, the fp32
  ``[vocab, dim]`` weight-gradient accumulator, the weight's bf16 copy when the parameter is fp32,
  one chunk's logit gradient). The loss runs before any block's backward, when the blocks hold
  only what they keep: the component is what that moment adds over the blocks' backward peak
  (often 0). ``python -m distattn.bench.activation_memory`` compares the per-token slope of the
  whole with live tensor bytes measured in training steps.
* ``inputs``: the packed sequence every rank reads (tokens, labels: int64 of the whole sequence,
  plus the numpy copy) and the local positions.
* ``runtime``: what the framework takes before any tensor. CUDA: :data:`CUDA_RUNTIME_BYTES`, 4 GiB
  (CUDA context and kernels ~0.5-1 GiB, NCCL communicators of the dp, cp and dp x cp groups
  ~1 GiB, caching-allocator fragmentation at these tensor sizes ~2 GiB). CPU:
  :data:`CPU_RUNTIME_BYTES`, a rank's Python, torch and gloo (~300 MiB resident).
  A GPU's ``torch.cuda.max_memory_allocated`` does not see the
  CUDA runtime: compare it with ``total - runtime``.
* ``allocator`` (CPU; a GPU's is in ``runtime``): :data:`CPU_ALLOCATOR_OVERHEAD` of the
  token-proportional parts. glibc keeps much of what a step frees, so from step 2 on a CPU rank's
  resident peak exceeds its live tensors: ``python -m distattn.bench.memory`` measured +20-45% per
  token for the tiny model (step 1's peak is within ~7% of the tensors counted here).

Documents: by default each sequence is one document of ``seq_len`` tokens -- the worst case of
the ring schedulers' buffers (every K/V block is needed by some rank) and a hard one for CAD,
whose busiest worker then holds several times a rank's share of K/V; give ``doc_lens`` for a
real packing.

``host``: the offloaded block inputs, in pinned host memory -- not in a GPU's total (the
report prints it beside), in a CPU rank's (host and device are the same memory there).

The total is the sum, an upper bound: gradients fill in as activations are freed, and AdamW's
temporaries at the step (one state-sized copy with the foreach kernels) come when activations
are gone, so they are not counted (zero1's all-gather buffers at the step are, where they make it
the peak: :func:`distattn.sim.dp_memory.step_excess`).

Standard library at import (the trainer's config reads :data:`CHECKPOINTING`); the dry plan imports
the planners when an estimate needs one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import NamedTuple

from .dp_memory import BUCKET_ELEMENTS, CHEAPEST_FIRST, candidates, model_states, step_excess, zero1_bucket
from ..costmodel.model_shape import ModelShape
from ..schedulers import PlanContext

GIB = 2**30
# CUDA context + NCCL communicators + caching-allocator fragmentation (see module docstring)
CUDA_RUNTIME_BYTES = 4 * GIB
# a CPU rank's Python, torch and gloo before any tensor
CPU_RUNTIME_BYTES = 300 * 2**20
DEVICES = ("cpu", "cuda")
# a CPU rank's resident peak over the tensors' bytes, per token (see module docstring: measured)
CPU_ALLOCATOR_OVERHEAD = 0.35
# the trainer's activation checkpointing settings (train.activation_checkpointing), as counted here
CHECKPOINTING = ("none", "full", "selective", "offload")
# what cad's attention servers keep for the backward (parallel.cad_backward, resolved: distattn.schedulers.cad)
CAD_BACKWARDS = ("resend", "keep")
# how the ranks share the model (parallel.dp_mode): whole parameters all-reduced, FSDP2 over every rank,
# FSDP2 sharding inside groups of dp_shard ranks (HSDP), whole parameters with a sharded optimizer (ZeRO-1)
DP_MODES = ("ddp", "fsdp", "hsdp", "zero1")
# Job.wrapper: a dp mode, or one rank without a wrapper
WRAPPERS = (*DP_MODES, "single")
# train.mlp_chunk the capacity table and the simulator try when a config has none: 4096 tokens keep one
# chunk's intermediates (7 x ffn x chunk) under 1 GiB at Llama-3 8B in bf16
TILED_MLP_CHUNK = 4096
# rows per step of the trainer's RMSNorm backward (distattn.train.model.transformer reads it from here): its fp32
# temporaries stay [NORM_CHUNK, dim], which the estimate counts
NORM_CHUNK = 4096
COMPONENTS = ("weights", "grads", "optimizer", "activations", "loss", "attention_buffers", "inputs", "allocator",
              "runtime")
# bytes of q, k, v and of the compute, per train.dtype (the simulator's elem_bytes is one of them)
DTYPE_BYTES = {"bf16": 2, "fp32": 4}


@dataclass(frozen=True)
class Job:
    """One training job as the estimate sees it; the fields are the trainer's config keys (``wrapper``:
    how the model is wrapped -- one of :data:`DP_MODES` or ``"single"``, one rank without a wrapper;
    ``dp_shard``: under ``hsdp`` the ranks sharding each parameter (None: a node's, ``gpus_per_node``,
    else every rank); other wrappers ignore it; ``pooled``: cad plans over the pool of every replica;
    ``gpus_per_node``: usp's default Ulysses degree stays inside a node; ``doc_lens``: one sequence's
    documents, default one of ``seq_len``; ``device``: ``"cuda"`` or ``"cpu"``, only the runtime and the
    allocator differ)."""

    model: ModelShape
    seq_len: int
    dp: int
    cp: int
    scheduler: str
    dtype: str = "bf16"
    wrapper: str = "fsdp"
    cpu_offload: bool = False
    activation_checkpointing: str = "full"
    loss_chunk: int = 2048
    mlp_chunk: int = 0
    ulysses_degree: int | None = None
    head_groups: int = 1
    pooled: bool = False
    gpus_per_node: int | None = None
    doc_lens: tuple[int, ...] | None = None
    device: str = "cuda"
    cad_backward: str = "resend"   # parallel.cad_backward, resolved (CAD_BACKWARDS)
    dp_shard: int | None = None

    def __post_init__(self):
        _check_wrapper(self.wrapper, self.dp_shard, self.dp * self.cp)
        if self.cad_backward not in CAD_BACKWARDS:
            raise ValueError(f"cad_backward must be one of {', '.join(CAD_BACKWARDS)}, got {self.cad_backward!r}")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.activation_checkpointing not in CHECKPOINTING:
            raise ValueError(f"train.activation_checkpointing must be one of {', '.join(CHECKPOINTING)}, "
                             f"got {self.activation_checkpointing!r}")
        if self.doc_lens is not None and sum(self.doc_lens) != self.seq_len:
            raise ValueError(f"doc_lens must sum to data.seq_len ({self.seq_len}), got {sum(self.doc_lens)}")

    @property
    def world_size(self) -> int:
        return self.dp * self.cp

    @property
    def tokens_per_rank(self) -> int:
        return math.ceil(self.seq_len / self.cp)

    @property
    def shard_ranks(self) -> int:
        """The ranks one parameter's sharded states (fp32 master, gradient, moments) are split over: every
        rank under fsdp and zero1, ``dp_shard`` under hsdp (unset: a node's ranks, at most all), 1 (whole
        on each rank) under ddp and on one rank."""
        if self.wrapper in ("fsdp", "zero1"):
            return self.world_size
        if self.wrapper == "hsdp":
            # a node's ranks where they divide the world (else the most that do)
            return self.dp_shard or math.gcd(self.world_size, self.gpus_per_node or self.world_size)
        return 1

    def plan_context(self) -> PlanContext:
        """The job as its dry plan's planner sees it: :meth:`JobFacts.plan_context` of its facts (one TP
        rank: ``gpus_per_node`` here is CP ranks to a node already). At an H100's peak whatever the GPU:
        ``--dry-run`` knows none, and the simulator's memory column has always been planned so (cad's
        buffers move by up to ~0.2% with the peak)."""
        return JobFacts(self.model, self.dp, self.cp, self.scheduler, self.dtype, self.ulysses_degree, self.head_groups,
                        self.gpus_per_node).plan_context()


@dataclass(frozen=True)
class JobFacts:
    """A training job as both the trainer's run config and the simulator's config state it, each mapped
    to these once (``RunConfig.job_facts``, :func:`distattn.sim.job.job_facts`): the planners' view
    (:meth:`plan_context`) and the memory estimate's (:meth:`job`) follow from them alone, so the two
    sides describe one job alike. ``scheduler`` None: not chosen yet (a plan context needs none);
    ``gpus_per_node``: GPUs to a node, TP ranks included (None: not known, as to the trainer);
    ``tp``: tensor-parallel ranks per CP rank, each computing ``1/tp`` of the heads; ``peak_tflops``:
    the GPU's dense bf16 peak (None: an H100's). The rest are the trainer's config keys (:class:`Job`)."""

    model: ModelShape
    dp: int
    cp: int
    scheduler: str | None = None
    dtype: str = "bf16"
    ulysses_degree: int | None = None
    head_groups: int = 1
    gpus_per_node: int | None = None
    tp: int = 1
    peak_tflops: float | None = None
    gpu: str | None = None             # the GPU's name (costmodel.model_shape.GPUS; None: not known, an H100's kernel)
    wrapper: str = "fsdp"
    cpu_offload: bool = False
    pooled: bool = False
    activation_checkpointing: str = "full"
    loss_chunk: int = 2048
    mlp_chunk: int = 0
    cad_backward: str = "resend"
    dp_shard: int | None = None        # parallel.dp_shard, resolved (hsdp; :class:`Job`)

    def __post_init__(self):
        _check_wrapper(self.wrapper, self.dp_shard, self.dp * self.cp)
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPE_BYTES)}, got {self.dtype!r}")
        if isinstance(self.tp, bool) or not isinstance(self.tp, int) or self.tp < 1:
            raise ValueError(f"tp must be a positive int, got {self.tp!r}")

    @property
    def node_ranks(self) -> int | None:
        """CP ranks to a node (each a TP group of ``tp`` GPUs), None where the node size is not known."""
        return None if self.gpus_per_node is None else max(1, self.gpus_per_node // self.tp)

    def plan_context(self, network=None, kernel=None) -> PlanContext:
        """The job as one TP rank's planner sees it (:class:`~distattn.schedulers.PlanContext`): ``1/tp``
        of the heads (at least one KV head), :attr:`node_ranks` to a node, the GPU; ``network`` and
        ``kernel`` (a :class:`~distattn.costmodel.tiles.TileModel`): what cad prices transfers and attention with
        (the simulator's own; the trainer's: the defaults, the kernel on its GPU)."""
        m, tp = self.model, self.tp
        return PlanContext(m.n_heads // tp, max(1, m.n_kv_heads // tp), head_groups=self.head_groups,
                           head_dim=m.head_dim, dtype_bytes=DTYPE_BYTES[self.dtype], gpus_per_node=self.node_ranks,
                           ulysses_degree=self.ulysses_degree, peak_tflops=self.peak_tflops, network=network,
                           gpu=self.gpu, kernel=kernel)

    def job(self, seq_len: int, doc_lens=None, device: str = "cuda") -> Job:
        """The estimate's :class:`Job` of a sequence of ``seq_len`` tokens packed as ``doc_lens`` (default:
        one document) on ``device``; the whole model, whatever ``tp`` (the estimate knows no TP: its
        callers divide by it), and no peak (:meth:`Job.plan_context`)."""
        if self.scheduler is None:
            raise ValueError("scheduler must name the job's scheduler for its memory estimate, got None")
        return Job(self.model, seq_len, self.dp, self.cp, self.scheduler, dtype=self.dtype, wrapper=self.wrapper,
                   cpu_offload=self.cpu_offload, activation_checkpointing=self.activation_checkpointing,
                   loss_chunk=self.loss_chunk, mlp_chunk=self.mlp_chunk, ulysses_degree=self.ulysses_degree,
                   head_groups=self.head_groups, pooled=self.pooled, gpus_per_node=self.node_ranks,
                   doc_lens=None if doc_lens is None else tuple(int(n) for n in doc_lens), device=device,
                   cad_backward=self.cad_backward, dp_shard=self.dp_shard)


def _check_wrapper(wrapper: str, dp_shard: int | None, world: int) -> None:
    if wrapper not in WRAPPERS:
        raise ValueError(f"wrapper must be one of {', '.join(WRAPPERS)} (parallel.dp_mode, or single: one rank), "
                         f"got {wrapper!r}")
    if dp_shard is not None and (isinstance(dp_shard, bool) or not isinstance(dp_shard, int) or dp_shard < 1
                                 or world % dp_shard):
        raise ValueError(f"dp_shard must be a positive int dividing the dp x cp = {world} ranks, got {dp_shard!r}")


@dataclass(frozen=True)
class Estimate:
    """One rank's estimated peak (see module docstring); every component in bytes."""

    device: str
    dtype: str
    checkpointing: str
    dp_mode: str                 # one of DP_MODES, or "single" (one rank: no wrapper)
    params: int
    tokens_per_rank: int
    weights: int
    grads: int
    optimizer: int
    activations: int
    loss: int
    attention_buffers: int
    inputs: int
    allocator: int
    runtime: int
    host: int = 0                # offloaded activations in host memory (module docstring)
    host_states: int = 0         # cpu_offload: parameter, gradient and AdamW shards in host memory
    dp_shard: int | None = None  # hsdp: the ranks sharding each parameter

    @property
    def total(self) -> int:
        """Device bytes (CPU: the rank's bytes, what it offloads included)."""
        return sum(getattr(self, name) for name in COMPONENTS) + \
            (self.host + self.host_states if self.device == "cpu" else 0)

    def components(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in COMPONENTS}


def _dtypes(job: Job) -> tuple[int, int, bool]:
    """(compute bytes, residual bytes, autocast): bf16 parameters (FSDP's and HSDP's compute copies,
    zero1's own) make a bf16 residual stream; DDP and one rank autocast, keeping it fp32."""
    if job.dtype == "fp32":
        return 4, 4, False
    low = _bf16_parameters(job)
    return 2, 2 if low else 4, not low


def _bf16_parameters(job: Job) -> bool:
    """Whether the forward computes on parameters in the compute dtype rather than autocasting them."""
    return job.wrapper in ("fsdp", "hsdp", "zero1")


def _norm_bytes(d: int, resid: int, autocast: bool, readers: int) -> int:
    """Per token, what an RMSNorm (``model._RMSNormFn``) keeps with the projections reading its
    output: its input (the residual stream), the output (one bf16 copy per reading projection
    under autocast) and the fp32 rsqrt."""
    return d * (resid + (2 * readers if autocast else resid)) + 4


def _attention_part(m: ModelShape, compute: int, resid: int, autocast: bool) -> int:
    """Per token, what a block's attention half keeps apart from attention's own saved tensors:
    the first norm, RoPE's cos and sin (the rotations keep no input: cos needs no grad) and the
    attention output wo reads."""
    return _norm_bytes(m.dim, resid, autocast, 3) + 2 * compute * m.head_dim + compute * m.n_heads * m.head_dim


def _mlp_part(m: ModelShape, compute: int, resid: int, autocast: bool, tiled_mlp: bool) -> int:
    """Per token, what a block's MLP half keeps: the second norm, and the w1 and w3 outputs, silu
    and their product (``tiled_mlp``: none of them; the tiled MLP keeps the norm output once, fp32
    where autocast kept two bf16 copies: the same bytes)."""
    return _norm_bytes(m.dim, resid, autocast, 2) + (0 if tiled_mlp else 4 * compute * m.ffn_dim)


@lru_cache(maxsize=64)
def _dry_schedule(scheduler: str, docs: tuple[int, ...], world: int, context, cad_backward: str):
    """The dry schedule of one step's ``docs`` on ``world`` ranks for the job ``context`` describes
    (cached: the checkpointing settings of one job share it); ``cad_backward`` where the scheduler
    takes it (cad's ``backward``)."""
    from ..runtime.api import dry_plan
    from ..schedulers import spec

    return dry_plan(list(docs), world, scheduler=scheduler, context=context,
                    **spec(scheduler).taken({"backward": cad_backward})).schedule


class AttentionMemory(NamedTuple):
    """The busiest rank's attention memory of one layer, from a dry plan."""

    saved: int            # kept from forward to backward (``Schedule.saved_bytes``: q, k, v, out, lse as it keeps them)
    buffers: int          # the schedule's transient buffers (``Schedule.buffer_bytes``)
    grads: int            # its backward's accumulators and kernel gradients (``Schedule.grad_bytes``)
    token_layout: bool    # saved holds the rank's own out, the tensor wo reads (counted once)


def attention_bytes(job: Job) -> AttentionMemory:
    """What attention keeps per layer and its transient buffers on the busiest rank, from a dry plan
    planned like the trainer plans it: cad over the pool of every replica (``pooled``), one rank
    (cp 1, no pool) the local schedule."""
    from ..planning.schedule import AttnShape

    m = job.model
    docs = job.doc_lens if job.doc_lens is not None else (job.seq_len,)
    shape = AttnShape(m.n_heads, m.n_kv_heads, m.head_dim, _dtypes(job)[0])
    schedule = _dry_schedule(job.scheduler, docs * job.dp if job.pooled else docs,
                             job.world_size if job.pooled else job.cp, job.plan_context(), job.cad_backward)
    return AttentionMemory(int(max(schedule.saved_bytes(shape))), int(max(schedule.buffer_bytes(shape))),
                           int(max(schedule.grad_bytes(shape))), schedule.keeps_local_out)


def _activations(job: Job, attn: AttentionMemory) -> tuple[int, int, int]:
    """(what the blocks keep while the loss runs at the end of the forward, the blocks' peak in
    backward, what the attention half adds over that peak).

    A block's backward peaks at one of three moments: the MLP's backward (the whole block's saved
    tensors and the SwiGLU gradients); attention's (the MLP half freed; the schedule's
    accumulators, kernel gradients and buffers, the output gradient); the first norm's (attention's
    saved tensors still held -- measured: torch.utils.checkpoint still holds them as recomputed --
    dQ/dK/dV in token layout, the norm output's gradient and the norm's two fp32
    temporaries of :data:`NORM_CHUNK` rows). Each adds what the other blocks keep and the
    gradient on the residual stream."""
    m, tokens = job.model, job.tokens_per_rank
    compute, resid, autocast = _dtypes(job)
    chunk = job.mlp_chunk
    tiled = 0 < chunk < tokens
    kv = m.n_kv_heads * m.head_dim
    # token-layout attention's out is the tensor wo reads: counted once
    attn_half = tokens * _attention_part(m, compute, resid, autocast) + attn.saved - (
        tokens * compute * m.n_heads * m.head_dim if attn.token_layout else 0)
    layer = attn_half + tokens * _mlp_part(m, compute, resid, autocast, tiled)
    # the SwiGLU's gradients (three [T, ffn] alive where the product it kept is freed: net two), or
    # (tiled) one chunk's recomputed intermediates and their gradients
    mlp_moment = layer + (chunk * 7 * compute * m.ffn_dim if tiled else tokens * 2 * compute * m.ffn_dim)
    # the schedule's backward working set (accumulators, kernel gradients, buffers), the output gradient
    attn_moment = attn_half + attn.grads + tokens * compute * m.dim + attn.buffers
    norm_moment = attn_half + tokens * compute * (2 * m.dim + 2 * kv) + min(tokens, NORM_CHUNK) * 2 * 4 * m.dim
    block_input = tokens * resid * m.dim      # also the residual stream's gradient
    mode = job.activation_checkpointing
    # what the other blocks keep (a block's input is its first norm's input: counted in its half)
    if mode == "none":
        kept, others = m.n_layers * layer, (m.n_layers - 1) * layer
    elif mode == "full":
        kept, others = m.n_layers * block_input, (m.n_layers - 1) * block_input
    elif mode == "offload":   # the rest in host memory (offloaded_bytes): the prefetched input stays
        kept, others = block_input, block_input
    else:   # selective
        kept = m.n_layers * (block_input + attn.saved)
        others = kept - block_input - attn.saved
    peak = others + mlp_moment + block_input   # + the residual stream's gradient
    return kept, peak, max(0, attn_moment - mlp_moment, norm_moment - mlp_moment)


def offloaded_bytes(job: Job) -> int:
    """Host memory of one rank's offloaded block inputs (``activation_checkpointing: offload``)."""
    if job.activation_checkpointing != "offload":
        return 0
    return job.model.n_layers * job.tokens_per_rank * _dtypes(job)[1] * job.model.dim


def _loss(job: Job) -> int:
    """The final norm and ``loss.chunked_cross_entropy``: its saved log-sum-exps, and the larger of
    its forward (one chunk's logits in the compute dtype and fp32) and its backward (the hidden
    state's gradient, the fp32 ``[V, D]`` weight-gradient accumulator, the weight's compute-dtype
    copy when the parameter is fp32 and the compute bf16, and one chunk's logit gradient)."""
    m, tokens = job.model, job.tokens_per_rank
    compute, resid, _ = _dtypes(job)
    chunk = min(job.loss_chunk, tokens)
    weight = m.vocab_size * m.dim
    cast = 2 * weight if job.dtype == "bf16" and not _bf16_parameters(job) else 0
    logits = chunk * m.vocab_size * (4 + (compute if compute != 4 else 0))
    backward = tokens * m.dim * resid + 4 * weight + cast + logits
    return _norm_bytes(m.dim, resid, False, 1) * tokens + 4 * tokens + max(cast + logits, backward)


def cad_backward_for(job: Job, limit_bytes: float) -> str:
    """``parallel.cad_backward: auto``: ``keep`` (the backward sends only dout) where its estimate fits
    ``limit_bytes`` at the job's checkpointing, else ``resend`` (the workers keep nothing received:
    a rank keeps what a ring scheduler keeps). ``limit_bytes``: what one rank's
    :attr:`Estimate.total` may reach."""
    return "keep" if estimate(replace(job, cad_backward="keep")).total <= limit_bytes else "resend"


def estimate(job: Job) -> Estimate:
    """One rank's peak memory training ``job`` (module docstring)."""
    tokens = job.tokens_per_rank
    weights, grads, optimizer, host_states = model_states(job)
    # the loss runs (forward and backward) before any block's backward: the peak is the larger of
    # the two moments, and "loss" is what its moment adds over the blocks' backward
    kept, blocks_peak, buffers = _activations(job, attention_bytes(job))
    per_token = {"activations": blocks_peak, "loss": max(0, kept + _loss(job) - blocks_peak - buffers),
                 "attention_buffers": buffers, "inputs": 32 * job.seq_len + 16 * tokens}
    allocator = int(CPU_ALLOCATOR_OVERHEAD * sum(per_token.values())) if job.device == "cpu" else 0
    grads += step_excess(job, sum(per_token.values()))   # zero1: where its step's moment is the peak
    return Estimate(
        device=job.device, dtype=job.dtype, checkpointing=job.activation_checkpointing, dp_mode=job.wrapper,
        params=job.model.params, tokens_per_rank=tokens, weights=weights, grads=grads, optimizer=optimizer,
        **per_token, allocator=allocator, runtime=CUDA_RUNTIME_BYTES if job.device == "cuda" else CPU_RUNTIME_BYTES,
        host=offloaded_bytes(job), host_states=host_states,
        dp_shard=job.shard_ranks if job.wrapper == "hsdp" else None)


def cheapest_mode(job: Job, device_bytes: float) -> tuple[str, int | None] | None:
    """The data-parallel mode with the fewest bytes on the network whose estimate of ``job`` fits
    ``device_bytes`` per rank (:attr:`~distattn.sim.memory_model.Estimate.total`), as ``(mode, dp_shard)``:
    ``dp_shard`` the shard group's ranks for hsdp, else None; ``("single", None)`` for one rank. None
    where no mode fits (:func:`candidates`: the modes tried)."""
    if device_bytes <= 0:
        raise ValueError(f"device_bytes must be > 0 (one rank's memory), got {device_bytes}")
    for cand in candidates(job):
        if estimate(cand).total <= device_bytes:
            return cand.wrapper, cand.dp_shard
    return None


__all__ = ["Job", "JobFacts", "DTYPE_BYTES", "Estimate", "AttentionMemory", "estimate", "attention_bytes",
           "cad_backward_for", "CAD_BACKWARDS",
           "model_states", "offloaded_bytes", "cheapest_mode", "zero1_bucket", "BUCKET_ELEMENTS", "CHEAPEST_FIRST",
           "DP_MODES", "WRAPPERS",
           "GIB", "CUDA_RUNTIME_BYTES", "CPU_RUNTIME_BYTES", "CPU_ALLOCATOR_OVERHEAD", "CHECKPOINTING", "NORM_CHUNK",
           "TILED_MLP_CHUNK",
           "DEVICES", "COMPONENTS"]
