"""The trainer's side of the memory estimate: :func:`job` makes the shared estimator's
:class:`~distattn.sim.memory_model.Job` from a run config, through the translation the simulator's goes
through too (``RunConfig.job_facts``, then :meth:`~distattn.sim.memory_model.JobFacts.job`);
:mod:`distattn.sim.memory_model` is the one memory model, which ``distattn simulate``'s memory column calls
too, with its components and what they count. :func:`report` is what ``distattn train CONFIG --dry-run``
prints of it.
"""

from __future__ import annotations

import os
from dataclasses import replace

from ...sim import memory_model
from ...sim.memory_model import CPU_ALLOCATOR_OVERHEAD, CPU_RUNTIME_BYTES, GIB, AttentionMemory, Estimate, Job
from ..config import CHECKPOINTING, RunConfig

__all__ = ["job", "cad_backward", "estimate", "attention_bytes", "alternatives", "report", "format_table", "fits_in",
           "local_device", "physical_memory_bytes", "GIB", "CPU_RUNTIME_BYTES", "LABELS", "cheaper_fit",
           "describe_mode"]


def job(cfg: RunConfig, device: str = "cuda", doc_lens=None, cad_backward: str | None = None) -> Job:
    """The job ``cfg`` trains on ``device`` (``"cuda"`` or ``"cpu"``), one sequence packed as ``doc_lens``
    (of ``data.seq_len`` tokens; default: one document of the longest sequence a rank may get,
    :attr:`~.sections.RunConfig.rank_tokens`: ``data.token_cap``'s under balanced packing);
    ``cad_backward``: ``parallel.cad_backward`` resolved (None: :meth:`RunConfig.job_facts`' rule)."""
    return cfg.job_facts(cad_backward=cad_backward).job(cfg.rank_tokens if doc_lens is None else cfg.data.seq_len,
                                                        doc_lens, device)


def cad_backward(cfg: RunConfig, device: str, limit_bytes: int | None) -> str | None:
    """``parallel.cad_backward`` as a run of ``cfg`` on ``device`` uses it: as set, or ``auto``:
    ``keep`` where its estimate fits ``limit_bytes`` per rank at ``train.activation_checkpointing``, else
    ``resend`` (:func:`distattn.sim.memory_model.cad_backward_for`; ``limit_bytes`` None: not known, resend).
    None where the scheduler has no such choice (not cad, or one rank: local attention)."""
    from ...schedulers import spec

    p = cfg.parallel
    if cfg.world_size == 1 or "backward" not in spec(p.fixed_scheduler).option_names():
        return None
    if p.cad_backward != "auto":
        return p.cad_backward
    if limit_bytes is None:
        return "resend"
    return memory_model.cad_backward_for(job(cfg, device, cad_backward="resend"), limit_bytes)


def estimate(cfg: RunConfig, device: str = "cuda", doc_lens=None, cad_backward: str | None = None) -> Estimate:
    """One rank's peak memory training ``cfg`` on ``device`` (``"cuda"`` or ``"cpu"``: only the runtime
    and the allocator differ), the sequence packed as ``doc_lens`` (default: one document);
    ``cad_backward`` as :func:`job`'s."""
    return memory_model.estimate(job(cfg, device, doc_lens, cad_backward))


def attention_bytes(cfg: RunConfig, doc_lens=None) -> AttentionMemory:
    """What attention keeps per layer and its transient buffers on the busiest rank, from a dry
    plan of ``doc_lens`` (default: one document of ``data.seq_len``)."""
    return memory_model.attention_bytes(job(cfg, doc_lens=doc_lens))


def _states(cfg: RunConfig) -> tuple[int, int, int, int]:
    """(weights, grads, optimizer) device bytes of one rank, and its host bytes of them: what the
    preflight checks before any dry plan."""
    return memory_model.model_states(job(cfg))


def alternatives(cfg: RunConfig, device: str = "cuda", doc_lens=None,
                 cad_backward: str | None = None) -> dict[str, Estimate]:
    """The estimate under every ``activation_checkpointing`` setting (same dtype and parallelism)."""
    return {mode: estimate(cfg.replace(train={"activation_checkpointing": mode}), device, doc_lens, cad_backward)
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


def describe_mode(est: Estimate) -> str:
    """The data-parallel mode as the report names it: ``hsdp (dp_shard 8)``, ``zero1``, ..."""
    return est.dp_mode + (f" (dp_shard {est.dp_shard})" if est.dp_shard is not None else "")


def _notes(cfg: RunConfig, est: Estimate) -> dict[str, str]:
    n, bf16 = cfg.world_size, est.dtype == "bf16"
    low = "bf16" if bf16 else "fp32"
    if est.dp_mode == "fsdp" and cfg.parallel.cpu_offload:
        states = {"weights": f"{low} unsharded root and 2 blocks (fp32 shard 1/{n} in host memory)",
                  "grads": f"{low} unsharded root and 1 block (fp32 shard in host memory)",
                  "optimizer": "in host memory (cpu_offload): steps on the CPU"}
    elif est.dp_mode in ("fsdp", "hsdp"):
        s = n if est.dp_shard is None else est.dp_shard
        over = f"1/{s}" + (f", replicated x {n // s}" if s != n else "")
        states = {"weights": f"fp32 shard ({over}) + {low} unsharded root and 2 blocks",
                  "grads": f"fp32 shard + {low} unsharded root and 1 block", "optimizer": f"2 fp32 moments, 1/{s}"}
    elif est.dp_mode == "zero1":
        bucket = memory_model.zero1_bucket(job(cfg)) / 1e6
        states = {"weights": f"{low} whole + fp32 master shard (1/{n})",
                  "grads": f"fp32 shard (1/{n}) + buckets of {bucket:,.1f} M in flight, or the step's {low} "
                           f"all-gathers",
                  "optimizer": f"2 fp32 moments, 1/{n}"}
    else:
        replica = "DDP replica" if est.dp_mode == "ddp" else "one rank"
        states = {"weights": f"fp32, {replica}" + (" + autocast's bf16 copies" if bf16 else ""),
                  "grads": "fp32" + (" + DDP buckets" if est.dp_mode == "ddp" else ""), "optimizer": "2 fp32 moments"}
    kept = {"none": "every block's tensors", "full": "each block's input + one block recomputed",
            "selective": "block inputs + attention's saved tensors + one block recomputed",
            "offload": "2 block inputs (the rest in host memory) + one block recomputed"}[est.checkpointing]
    scheduler = "local" if cfg.parallel.fixed_cp == 1 and not cfg.parallel.pools_replicas \
        else cfg.parallel.fixed_scheduler
    return {**states, "activations": f"{est.tokens_per_rank:,} tokens, {est.checkpointing}: {kept}",
            "loss": f"chunks of {min(cfg.train.loss_chunk, est.tokens_per_rank):,} tokens x {cfg.model.vocab_size:,} "
                    f"vocab", "attention_buffers": f"{scheduler}: the schedule's buffer_bytes, busiest rank",
            "inputs": "packed sequence + labels",
            "allocator": f"glibc: {CPU_ALLOCATOR_OVERHEAD:.0%} of the token-proportional parts" if est.device == "cpu"
            else "in runtime", "runtime": "CUDA context, NCCL, allocator" if est.device == "cuda"
            else "Python, torch, gloo"}


def fits_in(cfg: RunConfig, est: Estimate, limit: int) -> bool:
    """``est`` fits ``limit`` bytes: one GPU's, or (CPU) this machine's for every rank together."""
    return est.total * (cfg.world_size if est.device == "cpu" else 1) <= limit


def cheaper_fit(cfg: RunConfig, est: Estimate, rank_limit: int | None,
                cad_backward: str | None = None) -> Estimate | None:
    """When ``est`` (of ``cfg``) does not fit ``rank_limit`` bytes per rank: the data-parallel mode that
    would, cheapest on the network first (:func:`distattn.sim.memory_model.cheapest_mode`): its estimate
    (:attr:`~distattn.sim.memory_model.Estimate.dp_mode`, ``dp_shard``); None where it fits, nothing would or
    the limit is not known."""
    if rank_limit is None or est.total <= rank_limit:
        return None
    the_job = job(cfg, est.device, cad_backward=cad_backward)
    found = memory_model.cheapest_mode(the_job, rank_limit)
    if found is None or found == (the_job.wrapper, the_job.dp_shard if the_job.wrapper == "hsdp" else None):
        return None
    mode, shard = found
    return memory_model.estimate(replace(the_job, wrapper=mode, dp_shard=shard, cpu_offload=False))


def report(cfg: RunConfig, device: str, gpu_memory_bytes: int, physical: int | None = None) -> tuple[list[str], bool]:
    """What ``distattn train CONFIG --dry-run`` prints for ``device``, and whether the run fits: one
    rank in ``gpu_memory_bytes`` on a GPU; every rank together in this machine's memory on CPU."""
    if gpu_memory_bytes <= 0:
        raise ValueError(f"gpu_memory_bytes must be > 0, got {gpu_memory_bytes}")
    m, p, t = cfg.model, cfg.parallel, cfg.train
    rank_limit = gpu_memory_bytes if device == "cuda" else None if physical is None else physical // cfg.world_size
    backward = cad_backward(cfg, device, rank_limit)
    est = estimate(cfg, device, cad_backward=backward)
    hd = m.dim // m.n_heads
    embed = m.vocab_size * m.dim
    ties = "tied embedding" if m.tie_embeddings else f"untied embeddings: 2 x {embed / 1e6:,.1f} M"
    pooled = f" (pooled over {cfg.world_size} ranks)" if p.pools_replicas else ""
    if backward is not None:
        pooled += f", backward {backward}" + (" (cad_backward: auto)" if p.cad_backward == "auto" else "")
    count = f"{est.params / 1e9:,.2f} B" if est.params >= 1e9 else f"{est.params / 1e6:,.2f} M"
    lines = [f"model: {count} parameters ({ties}), {m.n_layers} layers, dim {m.dim}, "
             f"heads {m.n_heads}/{m.n_kv_heads} x {hd}, ffn {m.ffn_dim}, vocab {m.vocab_size:,}",
             f"parallel: {cfg.world_size} ranks (dp {p.dp} x cp {p.fixed_cp}), scheduler {p.fixed_scheduler}{pooled}, "
             # (unset, the trainer under torchrun takes LOCAL_WORLD_SIZE, which the config does not say)
             + (f"hsdp (dp_shard unset: all {est.dp_shard} ranks here; under torchrun a node's)"
                if est.dp_shard and p.dp_shard is None else describe_mode(est))
             + (" with cpu_offload" if p.cpu_offload else ""),
             *_packing_line(cfg),
             f"tokens per rank: {est.tokens_per_rank:,} ({_sequence(cfg)} / cp {p.fixed_cp})",
             f"train: {t.dtype}, activation checkpointing {t.activation_checkpointing}, loss chunk {t.loss_chunk:,}"
             + (f", MLP chunk {t.mlp_chunk:,}" if t.mlp_chunk else "")
             + (", compiled blocks (counted as eager)" if t.compile else "")]
    if device == "cuda":
        limit, where = gpu_memory_bytes, f"{gpu_memory_bytes / GIB:g} GiB (--gpu-memory-gib)"
        lines.append(f"per-GPU memory estimate (documents: one of {_longest(cfg)} tokens per sequence, the worst "
                     f"case of the attention buffers):")
    else:
        limit = physical if physical is not None else 2**62
        where = f"this machine's {limit / GIB:,.1f} GiB" if physical is not None else "this machine (size unknown)"
        lines.append(f"per-rank memory estimate, CPU ranks ({cfg.world_size} local processes; documents: one "
                     f"of {_longest(cfg)} tokens per sequence):")
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
    other = None if fits else cheaper_fit(cfg, est, rank_limit, backward)
    if other is not None:
        lines.append(f"  dp_mode: {describe_mode(other)} would fit: {other.total / GIB:,.2f} GiB per "
                     f"{'GPU' if device == 'cuda' else 'rank'}")
    lines.append(f"activation checkpointing settings (total per {'GPU' if device == 'cuda' else 'rank'}):")
    for mode, alt in alternatives(cfg, device, cad_backward=backward).items():
        mark = "  <- this config" if mode == t.activation_checkpointing else ""
        host = f" (+ {alt.host / GIB:,.2f} GiB host)" if alt.host and device == "cuda" else ""
        fit = "fits" if fits_in(cfg, alt, limit) else "does not fit"
        lines.append(f"  {mode:<10} {alt.total / GIB:>9.2f} GiB  {fit}{host}{mark}")
    return lines, fits


def _sequence(cfg: RunConfig) -> str:
    """The longest sequence a rank may get: balanced packing's token cap, or ``data.seq_len``."""
    if cfg.packing == "balanced":
        return f"data.token_cap {cfg.data.cap:,}"
    return f"seq_len {cfg.data.seq_len:,}"


def _longest(cfg: RunConfig) -> str:
    return "token_cap" if cfg.packing == "balanced" else "seq_len"


def _packing_line(cfg: RunConfig) -> list[str]:
    if cfg.packing != "balanced":
        return []
    return [f"data: balanced packing, a rank's sequence holds up to data.token_cap {cfg.data.cap:,} tokens "
            f"(seq_len {cfg.data.seq_len:,}); the estimate is at the cap, so every step the packing deals fits"]


def format_table(est: Estimate, notes: dict[str, str] | None = None) -> list[str]:
    """The estimate as lines of a table: component, GiB, and a note per component."""
    notes = notes or {}
    lines = [f"  {'component':<20} {'GiB':>9}"]
    for name, val in est.components().items():
        note = notes.get(name, "")
        lines.append(f"  {LABELS[name]:<20} {val / GIB:>9.2f}" + (f"  {note}" if note else ""))
    lines.append(f"  {'total':<20} {est.total / GIB:>9.2f}")
    return lines
