"""One rank's peak memory in training, estimated from the config: ``estimate(cfg) -> MemoryEstimate``.

Components (bytes, per rank; ``N = dp * cp`` ranks, ``P`` parameters, ``T = ceil(seq_len / cp)``
tokens per rank, ``b`` the compute dtype's bytes -- 2 for bf16, 4 for fp32):

* ``weights``, ``grads``, ``optimizer``: fp32 master weights, fp32 gradients and AdamW's two fp32
  moments. ``parallel.dp_mode: fsdp`` shards all three over the N ranks (FSDP2 over the
  flattened dp x cp mesh, as the trainer wraps it) and adds the unsharded copies a rank
  computes with, in the compute dtype: the root module's parameters (embedding, final norm,
  head: FSDP2 keeps the root unsharded from forward to the end of backward) and two blocks
  (the one computing and the one prefetched); gradients add the root's unsharded gradients
  and one block's (bf16: also its fp32 copy for the reduce-scatter). ``parallel.cpu_offload``
  (FSDP2's ``CPUOffloadPolicy``, also on one rank) moves the shards, their gradients and the
  moments to host memory (``host_states``, 16 bytes a parameter): the device keeps the unsharded
  copies alone. ``ddp`` replicates
  everything and adds DDP's gradient buckets (a second fp32 copy of the gradients); bf16 under
  autocast adds the bf16 copies of the block weights autocast caches during the forward. One
  rank (no wrapper): as DDP without buckets.
* ``activations``: what autograd keeps, counted tensor by tensor from ``model.py`` per block and
  token -- RMSNorm's input and fp32 rsqrt, the norm outputs the projections read
  (one bf16 copy per projection under autocast), RoPE's cos/sin, the attention output (wo's
  input), the SwiGLU w1/w3 outputs, silu and the product,
  plus what attention keeps (below). Residuals are fp32 under DDP's autocast and fp32 runs,
  bf16 under FSDP's bf16 parameters. ``activation_checkpointing``: ``none`` keeps all of it per
  layer; ``full`` keeps each block's input per layer and one block's everything while it is
  recomputed; ``selective`` keeps per layer the block input and what attention saves, and one
  block's recomputation. ``offload`` (:mod:`distattn.train.offload`) is ``full`` with the
  per-layer block inputs in host memory (``host``): the device keeps two (the one recomputed,
  the one prefetched). A block's backward peaks at one of three moments, each adding the
  gradient arriving on the residual stream: the MLP's (the whole block's saved tensors and the
  SwiGLU gradients, net ``2 * T * ffn_dim``) -- the ``activations`` -- attention's (the MLP half
  freed; the schedule's ``grad_bytes``: accumulators and one kernel call's gradients; the output
  gradient, the schedule's buffers) and the first norm's (dQ/dK/dV in token layout, the norm
  output's gradient); the excess of the larger of the last two is ``attention_buffers``.
  ``train.mlp_chunk`` ``c`` (:mod:`distattn.train.tiled`): the MLP keeps only its input, and its
  working set is one chunk's, ``7 * c * ffn_dim`` (four recomputed intermediates, three
  gradients) -- attention's moment then is usually the larger.
* what attention keeps per layer, from a *dry plan* of the config (``distattn.plan(docs, N)``):
  ring, zigzag, allgather and one rank keep their local q, k, v, out and fp32 lse; ulysses and
  usp keep the head-sharded q, out and lse and their KV head shard (expanded again in backward
  where GQA grouping needs it) of their Ulysses group's tokens; cad keeps the worker's received task rows,
  ``Schedule.buffer_bytes`` (Q, out, lse, the K/V union, and the dout arriving in backward).
* ``attention_buffers``: what attention's backward moment adds over the MLP's (above; often 0
  without a tiled MLP), the schedule's own ``buffer_bytes`` of the busiest rank included
  (ring/zigzag: the K/V block computed on and the one arriving, and the fp32 dK/dV in flight;
  allgather: a head group's gathered K/V and its copy in global order; ulysses/usp: the
  head-sharded dout of one of ``parallel.head_groups`` (usp: plus its ring's K/V); cad: the
  received Q/K/V task rows, out, lse and dout).
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
whose busiest worker then holds several times a rank's share of K/V; pass ``doc_lens`` for a
real packing.

``host``: the offloaded block inputs, in pinned host memory -- not in a GPU's total (the
report prints it beside), in a CPU rank's (host and device are the same memory there).

The total is the sum, an upper bound: gradients fill in as activations are freed, and AdamW's
temporaries at the step (one state-sized copy with the foreach kernels) come when activations
are gone, so they are not counted.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

from .config import CHECKPOINTING, ModelConfig, ParallelConfig, RunConfig
from .model import NORM_CHUNK

GIB = 2**30
# CUDA context + NCCL communicators + caching-allocator fragmentation (see module docstring)
CUDA_RUNTIME_BYTES = 4 * GIB
# a CPU rank's Python, torch and gloo before any tensor
CPU_RUNTIME_BYTES = 300 * 2**20
DEVICES = ("cpu", "cuda")
# a CPU rank's resident peak over the tensors' bytes, per token (see module docstring: measured)
CPU_ALLOCATOR_OVERHEAD = 0.35
COMPONENTS = ("weights", "grads", "optimizer", "activations", "loss", "attention_buffers", "inputs", "allocator",
              "runtime")


@dataclass(frozen=True)
class MemoryEstimate:
    """One rank's estimated peak (see module docstring); every component in bytes."""

    device: str
    dtype: str
    checkpointing: str
    dp_mode: str                 # "fsdp", "ddp" or "single" (one rank: no wrapper)
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
    host_states: int = 0         # parallel.cpu_offload: parameter, gradient and AdamW shards in host memory

    @property
    def total(self) -> int:
        """Device bytes (CPU: the rank's bytes, what it offloads included)."""
        return sum(getattr(self, name) for name in COMPONENTS) + \
            (self.host + self.host_states if self.device == "cpu" else 0)

    def components(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in COMPONENTS}


def _states(cfg: RunConfig) -> tuple[int, int, int, int]:
    """(weights, grads, optimizer) bytes of one rank's device, and its host bytes of them
    (``parallel.cpu_offload``: the fp32 shards, their gradients and AdamW's two moments)."""
    m, mode, bf16 = cfg.model, cfg.wrapper, cfg.train.dtype == "bf16"
    shape = m.shape
    p = shape.params
    compute = 2 if bf16 else 4
    if mode == "fsdp":
        shard = math.ceil(p / cfg.world_size)
        working = (shape.root_params + 2 * shape.block_params) * compute
        grad_working = shape.root_params * compute + shape.block_params * (compute + (4 if bf16 else 0))
        if cfg.parallel.cpu_offload:
            return working, grad_working, 0, 16 * shard
        return 4 * shard + working, 4 * shard + grad_working, 8 * shard, 0
    # autocast caches a bf16 copy of every block weight it casts, until the forward leaves autocast
    autocast_cache = 2 * m.n_layers * shape.block_params if bf16 else 0
    buckets = 4 * p if mode == "ddp" else 0   # DDP's gradient buckets (gradient_as_bucket_view off)
    return 4 * p + autocast_cache, 4 * p + buckets, 8 * p, 0


def _dtypes(cfg: RunConfig) -> tuple[int, int, bool]:
    """(compute bytes, residual bytes, autocast): FSDP's bf16 parameters make a bf16 residual
    stream; DDP and one rank autocast, keeping the residual stream fp32."""
    if cfg.train.dtype == "fp32":
        return 4, 4, False
    fsdp = cfg.wrapper == "fsdp"
    return 2, 2 if fsdp else 4, not fsdp


def _norm_bytes(d: int, resid: int, autocast: bool, readers: int) -> int:
    """Per token, what an RMSNorm (``model._RMSNormFn``) keeps with the projections reading its
    output: its input (the residual stream), the output (one bf16 copy per reading projection
    under autocast) and the fp32 rsqrt."""
    return d * (resid + (2 * readers if autocast else resid)) + 4


def _attention_part(m: ModelConfig, compute: int, resid: int, autocast: bool) -> int:
    """Per token, what a block's attention half keeps apart from attention's own saved tensors:
    the first norm, RoPE's cos and sin (the rotations keep no input: cos needs no grad) and the
    attention output wo reads."""
    hd = m.dim // m.n_heads
    return _norm_bytes(m.dim, resid, autocast, 3) + 2 * compute * hd + compute * m.n_heads * hd


def _mlp_part(m: ModelConfig, compute: int, resid: int, autocast: bool, tiled_mlp: bool) -> int:
    """Per token, what a block's MLP half keeps: the second norm, and the w1 and w3 outputs, silu
    and their product (``tiled_mlp``: none of them; the tiled MLP keeps the norm output once, fp32
    where autocast kept two bf16 copies: the same bytes)."""
    return _norm_bytes(m.dim, resid, autocast, 2) + (0 if tiled_mlp else 4 * compute * m.ffn_dim)


@lru_cache(maxsize=64)
def _dry_schedule(m: ModelConfig, p: ParallelConfig, doc_lens: tuple[int, ...]):
    """The dry schedule of one step, planned like the trainer plans it (cad: over the pool of every
    replica when ``parallel.cad_pool`` and dp > 1)."""
    from ..api import plan

    from ..schedulers import spec

    pooled = p.pools_replicas
    docs = doc_lens * p.dp if pooled else doc_lens
    world = p.dp * p.cp if pooled else p.cp
    options = spec(p.scheduler).plan_options(world, m.n_kv_heads, p.ulysses_degree, head_groups=p.head_groups)
    return plan(list(docs), world, scheduler=p.scheduler, **options).schedule


class AttentionMemory(NamedTuple):
    """The busiest rank's attention memory of one layer, from a dry plan."""

    saved: int            # kept from forward to backward (``Schedule.saved_bytes``: q, k, v, out, lse as it keeps them)
    buffers: int          # the schedule's transient buffers (``Schedule.buffer_bytes``)
    grads: int            # its backward's accumulators and kernel gradients (``Schedule.grad_bytes``)
    token_layout: bool    # saved holds the rank's own out, the tensor wo reads (counted once)


def attention_bytes(cfg: RunConfig, doc_lens=None) -> AttentionMemory:
    """What attention keeps per layer and its transient buffers on the busiest rank, from a dry
    plan of ``doc_lens`` (default: one document of ``data.seq_len``)."""
    from ..schedule import AttnShape

    m, p = cfg.model, cfg.parallel
    compute = _dtypes(cfg)[0]
    docs = tuple(int(n) for n in (doc_lens if doc_lens is not None else [cfg.data.seq_len]))
    if sum(docs) != cfg.data.seq_len:
        raise ValueError(f"doc_lens must sum to data.seq_len ({cfg.data.seq_len}), got {sum(docs)}")
    hd = m.dim // m.n_heads
    shape = AttnShape(m.n_heads, m.n_kv_heads, hd, compute)
    schedule = _dry_schedule(m, p, docs)   # one rank (cp 1, no pool): the local schedule
    return AttentionMemory(int(max(schedule.saved_bytes(shape))), int(max(schedule.buffer_bytes(shape))),
                           int(max(schedule.grad_bytes(shape))), schedule.keeps_local_out)


def _activations(cfg: RunConfig, tokens: int, attn: AttentionMemory) -> tuple[int, int, int]:
    """(what the blocks keep while the loss runs at the end of the forward, the blocks' peak in
    backward, what the attention half adds over that peak).

    A block's backward peaks at one of three moments: the MLP's backward (the whole block's saved
    tensors and the SwiGLU gradients); attention's (the MLP half freed; the schedule's
    accumulators, kernel gradients and buffers, the output gradient); the first norm's (attention's
    saved tensors still held -- measured: torch.utils.checkpoint still holds them as recomputed --
    dQ/dK/dV in token layout, the norm output's gradient and the norm's two fp32
    temporaries of ``model.NORM_CHUNK`` rows). Each adds what the other blocks keep and the
    gradient on the residual stream."""
    m = cfg.model
    compute, resid, autocast = _dtypes(cfg)
    chunk = cfg.train.mlp_chunk
    tiled = 0 < chunk < tokens
    hd, kv = m.dim // m.n_heads, m.n_kv_heads * m.dim // m.n_heads
    # token-layout attention's out is the tensor wo reads: counted once
    attn_half = tokens * _attention_part(m, compute, resid, autocast) + attn.saved - (
        tokens * compute * m.n_heads * hd if attn.token_layout else 0)
    layer = attn_half + tokens * _mlp_part(m, compute, resid, autocast, tiled)
    # the SwiGLU's gradients (three [T, ffn] alive where the product it kept is freed: net two), or
    # (tiled) one chunk's recomputed intermediates and their gradients
    mlp_moment = layer + (chunk * 7 * compute * m.ffn_dim if tiled else tokens * 2 * compute * m.ffn_dim)
    # the schedule's backward working set (accumulators, kernel gradients, buffers), the output gradient
    attn_moment = attn_half + attn.grads + tokens * compute * m.dim + attn.buffers
    norm_moment = attn_half + tokens * compute * (2 * m.dim + 2 * kv) + min(tokens, NORM_CHUNK) * 2 * 4 * m.dim
    block_input = tokens * resid * m.dim      # also the residual stream's gradient
    mode = cfg.train.activation_checkpointing
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


def offloaded_bytes(cfg: RunConfig) -> int:
    """Host memory of one rank's offloaded block inputs (``activation_checkpointing: offload``)."""
    if cfg.train.activation_checkpointing != "offload":
        return 0
    tokens = math.ceil(cfg.data.seq_len / cfg.parallel.cp)
    return cfg.model.n_layers * tokens * _dtypes(cfg)[1] * cfg.model.dim


def _loss(cfg: RunConfig, tokens: int) -> int:
    """The final norm and ``loss.chunked_cross_entropy``: its saved log-sum-exps, and the larger of
    its forward (one chunk's logits in the compute dtype and fp32) and its backward (the hidden
    state's gradient, the fp32 ``[V, D]`` weight-gradient accumulator, the weight's compute-dtype
    copy when the parameter is fp32 and the compute bf16, and one chunk's logit gradient)."""
    m = cfg.model
    compute, resid, _ = _dtypes(cfg)
    chunk = min(cfg.train.loss_chunk, tokens)
    weight = m.vocab_size * m.dim
    cast = 2 * weight if cfg.train.dtype == "bf16" and cfg.wrapper != "fsdp" else 0
    logits = chunk * m.vocab_size * (4 + (compute if compute != 4 else 0))
    backward = tokens * m.dim * resid + 4 * weight + cast + logits
    return _norm_bytes(m.dim, resid, False, 1) * tokens + 4 * tokens + max(cast + logits, backward)


def estimate(cfg: RunConfig, device: str = "cuda", doc_lens=None) -> MemoryEstimate:
    """One rank's peak memory training ``cfg`` on ``device`` (``"cuda"`` or ``"cpu"``: only the runtime
    and the allocator differ), the sequence packed as ``doc_lens`` (default: one document; see module docstring)."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    if cfg.train.activation_checkpointing not in CHECKPOINTING:
        raise ValueError(f"train.activation_checkpointing must be one of {', '.join(CHECKPOINTING)}, "
                         f"got {cfg.train.activation_checkpointing!r}")
    tokens = math.ceil(cfg.data.seq_len / cfg.parallel.cp)
    weights, grads, optimizer, host_states = _states(cfg)
    attn = attention_bytes(cfg, doc_lens)
    # the loss runs (forward and backward) before any block's backward: the peak is the larger of
    # the two moments, and "loss" is what its moment adds over the blocks' backward
    kept, blocks_peak, buffers = _activations(cfg, tokens, attn)
    per_token = {"activations": blocks_peak, "loss": max(0, kept + _loss(cfg, tokens) - blocks_peak - buffers),
                 "attention_buffers": buffers, "inputs": 32 * cfg.data.seq_len + 16 * tokens}
    allocator = int(CPU_ALLOCATOR_OVERHEAD * sum(per_token.values())) if device == "cpu" else 0
    return MemoryEstimate(
        device=device, dtype=cfg.train.dtype, checkpointing=cfg.train.activation_checkpointing, dp_mode=cfg.wrapper,
        params=cfg.model.shape.params, tokens_per_rank=tokens, weights=weights, grads=grads, optimizer=optimizer,
        **per_token, allocator=allocator, runtime=CUDA_RUNTIME_BYTES if device == "cuda" else CPU_RUNTIME_BYTES,
        host=offloaded_bytes(cfg), host_states=host_states)


def alternatives(cfg: RunConfig, device: str = "cuda", doc_lens=None) -> dict[str, MemoryEstimate]:
    """The estimate under every ``activation_checkpointing`` setting (same dtype and parallelism)."""
    return {mode: estimate(cfg.replace(train={"activation_checkpointing": mode}), device, doc_lens)
            for mode in CHECKPOINTING}


LABELS = {"weights": "weights", "grads": "gradients", "optimizer": "optimizer (AdamW)",
          "activations": "activations", "loss": "loss (chunked CE)", "attention_buffers": "attention buffers",
          "inputs": "inputs", "allocator": "allocator", "runtime": "runtime"}


def physical_memory_bytes() -> int | None:
    """This machine's memory (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def local_device(cfg: RunConfig, physical: int | None) -> str:
    """``"cpu"`` when the config's ranks fit this machine as local processes (what ``distattn train``
    does without a launcher), else ``"cuda"`` (a config for GPUs, under a launcher)."""
    need = cfg.world_size * estimate(cfg, "cpu").total
    return "cpu" if physical is None or need <= physical else "cuda"


def _notes(cfg: RunConfig, est: MemoryEstimate) -> dict[str, str]:
    n, bf16 = cfg.world_size, est.dtype == "bf16"
    low = "bf16" if bf16 else "fp32"
    if est.dp_mode == "fsdp" and cfg.parallel.cpu_offload:
        states = {"weights": f"{low} unsharded root and 2 blocks (fp32 shard 1/{n} in host memory)",
                  "grads": f"{low} unsharded root and 1 block (fp32 shard in host memory)",
                  "optimizer": "in host memory (cpu_offload): steps on the CPU"}
    elif est.dp_mode == "fsdp":
        states = {"weights": f"fp32 shard (1/{n}) + {low} unsharded root and 2 blocks",
                  "grads": f"fp32 shard + {low} unsharded root and 1 block", "optimizer": f"2 fp32 moments, 1/{n}"}
    else:
        replica = "DDP replica" if est.dp_mode == "ddp" else "one rank"
        states = {"weights": f"fp32, {replica}" + (" + autocast's bf16 copies" if bf16 else ""),
                  "grads": "fp32" + (" + DDP buckets" if est.dp_mode == "ddp" else ""), "optimizer": "2 fp32 moments"}
    kept = {"none": "every block's tensors", "full": "each block's input + one block recomputed",
            "selective": "block inputs + attention's saved tensors + one block recomputed",
            "offload": "2 block inputs (the rest in host memory) + one block recomputed"}[est.checkpointing]
    scheduler = "local" if cfg.parallel.cp == 1 and not cfg.parallel.pools_replicas else cfg.parallel.scheduler
    return {**states, "activations": f"{est.tokens_per_rank:,} tokens, {est.checkpointing}: {kept}",
            "loss": f"chunks of {min(cfg.train.loss_chunk, est.tokens_per_rank):,} tokens x {cfg.model.vocab_size:,} "
                    f"vocab", "attention_buffers": f"{scheduler}: the schedule's buffer_bytes, busiest rank",
            "inputs": "packed sequence + labels",
            "allocator": f"glibc: {CPU_ALLOCATOR_OVERHEAD:.0%} of the token-proportional parts" if est.device == "cpu"
            else "in runtime", "runtime": "CUDA context, NCCL, allocator" if est.device == "cuda"
            else "Python, torch, gloo"}


def fits_in(cfg: RunConfig, est: MemoryEstimate, limit: int) -> bool:
    """``est`` fits ``limit`` bytes: one GPU's, or (CPU) this machine's for every rank together."""
    return est.total * (cfg.world_size if est.device == "cpu" else 1) <= limit


def report(cfg: RunConfig, device: str, gpu_memory_bytes: int, physical: int | None = None) -> tuple[list[str], bool]:
    """What ``distattn train CONFIG --dry-run`` prints for ``device``, and whether the run fits: one
    rank in ``gpu_memory_bytes`` on a GPU; every rank together in this machine's memory on CPU."""
    if gpu_memory_bytes <= 0:
        raise ValueError(f"gpu_memory_bytes must be > 0, got {gpu_memory_bytes}")
    m, p, t = cfg.model, cfg.parallel, cfg.train
    est = estimate(cfg, device)
    hd = m.dim // m.n_heads
    embed = m.vocab_size * m.dim
    ties = "tied embedding" if m.tie_embeddings else f"untied embeddings: 2 x {embed / 1e6:,.1f} M"
    pooled = f" (pooled over {p.dp * p.cp} ranks)" if p.pools_replicas else ""
    count = f"{est.params / 1e9:,.2f} B" if est.params >= 1e9 else f"{est.params / 1e6:,.2f} M"
    lines = [f"model: {count} parameters ({ties}), {m.n_layers} layers, dim {m.dim}, "
             f"heads {m.n_heads}/{m.n_kv_heads} x {hd}, ffn {m.ffn_dim}, vocab {m.vocab_size:,}",
             f"parallel: {cfg.world_size} ranks (dp {p.dp} x cp {p.cp}), scheduler {p.scheduler}{pooled}, "
             f"{est.dp_mode}" + (" with cpu_offload" if p.cpu_offload else ""),
             f"tokens per rank: {est.tokens_per_rank:,} (seq_len {cfg.data.seq_len:,} / cp {p.cp})",
             f"train: {t.dtype}, activation checkpointing {t.activation_checkpointing}, loss chunk {t.loss_chunk:,}"
             + (f", MLP chunk {t.mlp_chunk:,}" if t.mlp_chunk else "")
             + (", compiled blocks (counted as eager)" if t.compile else "")]
    if device == "cuda":
        limit, where = gpu_memory_bytes, f"{gpu_memory_bytes / GIB:g} GiB (--gpu-memory-gib)"
        lines.append("per-GPU memory estimate (documents: one of seq_len tokens per sequence, the worst case "
                     "of the attention buffers):")
    else:
        limit = physical if physical is not None else 2**62
        where = f"this machine's {limit / GIB:,.1f} GiB" if physical is not None else "this machine (size unknown)"
        lines.append(f"per-rank memory estimate, CPU ranks ({cfg.world_size} local processes; documents: one "
                     f"of seq_len tokens per sequence):")
    lines += format_table(est, _notes(cfg, est))
    per = 'GPU (not in the total)' if device == 'cuda' else 'rank (in the total)'
    if est.host:
        lines.append(f"  offloaded block inputs: {est.host / GIB:,.2f} GiB of pinned host memory per {per}")
    if est.host_states:
        lines.append(f"  parameters, gradients and AdamW state (cpu_offload): {est.host_states / GIB:,.2f} GiB of "
                     f"host memory per {per}")
    fits = fits_in(cfg, est, limit)
    need = est.total if device == "cuda" else est.total * cfg.world_size
    lines.append(f"{'fits' if fits else 'does NOT fit'}: {need / GIB:,.2f} GiB "
                 f"{'per GPU' if device == 'cuda' else f'for {cfg.world_size} ranks'} of {where}")
    lines.append(f"activation checkpointing settings (total per {'GPU' if device == 'cuda' else 'rank'}):")
    for mode, alt in alternatives(cfg, device).items():
        mark = "  <- this config" if mode == t.activation_checkpointing else ""
        host = f" (+ {alt.host / GIB:,.2f} GiB host)" if alt.host and device == "cuda" else ""
        lines.append(f"  {mode:<10} {alt.total / GIB:>9.2f} GiB  {'fits' if fits_in(cfg, alt, limit) else 'does not fit'}"
                     f"{host}{mark}")
    return lines, fits


def format_table(est: MemoryEstimate, notes: dict[str, str] | None = None) -> list[str]:
    """The estimate as lines of a table: component, GiB, and a note per component."""
    notes = notes or {}
    lines = [f"  {'component':<20} {'GiB':>9}"]
    for name, val in est.components().items():
        note = notes.get(name, "")
        lines.append(f"  {LABELS[name]:<20} {val / GIB:>9.2f}" + (f"  {note}" if note else ""))
    lines.append(f"  {'total':<20} {est.total / GIB:>9.2f}")
    return lines
