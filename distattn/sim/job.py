"""The simulated job: a cluster, a model and a global batch as :mod:`distattn.sim` describes them
(:class:`SimConfig`), and what follows from it alone -- the facts the trainer's config states too
(:func:`job_facts`), the planners' view of it (:func:`plan_context`), a row's dry schedule
(:func:`dry_schedule`), the attention kernel's speed (:func:`attention_kernel`), and the network as a
CP rank sees it (:class:`Links`, :func:`comm_time`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from ..runtime.api import dry_plan
from .memory_model import CAD_BACKWARDS, DP_MODES, JobFacts
from ..costmodel.model_shape import GPU, ModelShape
from ..planning.packing import DEFAULT_CAP_FACTOR
from ..runtime.pingpong import nano_batches as nano_batches_of
from ..planning.schedule import AttnShape, Phase
from ..schedulers import PlanContext, spec
from .dp import shard_of
from .kernel import AttentionKernel
from .presets import GPUS, PACKINGS
from .replay import COMM_SLOWDOWN
from .workload import row_of

PLANNING = ("hidden", "exposed", "ignored")


@dataclass(frozen=True)
class SimConfig:
    model: ModelShape
    gpus: int
    seq_len: int
    cp: int
    gpu: GPU = GPUS["h100"]
    gpus_per_node: int = 8
    mfu: float = 0.5               # linear layers
    attn_efficiency: float = 0.5   # attention, fraction of peak on a GPU the GPU report has no row for
    ulysses_degree: int | None = None
    elem_bytes: int = 2            # bf16 activations
    seed: int = 0                  # the draw of the global batch
    nano_batches: int | None = None   # per micro-batch (distattn.runtime.pingpong); None: the scheduler's default
    comm_dtype: str | None = None     # "fp8": Q, K, V, out, dout travel as FP8 (distattn.plan's comm_dtype)
    activation_checkpointing: str | None = None   # None: the cheapest that fits (.fit)
    mlp_chunk: int | None = None      # train.mlp_chunk with a given checkpointing (None: 0)
    tp: int = 1                       # tensor-parallel ranks per CP rank, inside a node
    batch: int | None = None          # sequences of seq_len per global batch; None: dp (one micro-batch each)
    packing: str = "balanced"         # .workload
    token_cap_factor: float = DEFAULT_CAP_FACTOR
    kernel: AttentionKernel | None = None   # None: AttentionKernel.measured(gpu, head dim): the shipped tile fit
    comm_slowdown: float = COMM_SLOWDOWN
    # parallel.dp_mode: how the dp x cp ranks share the model, its transfers timed as it issues them (.dp)
    dp_mode: str = "fsdp"
    dp_shard: int | None = None       # hsdp: ranks sharding each block (None: a node's; parallel.dp_shard)
    dp_transfers: bool = True         # False: dp_mode's transfers not timed (a step of attention's alone)
    planning: str = "hidden"
    # cad's attention servers: resend (keep nothing received), keep, or auto -- keep where it fits
    # at the checkpointing resend needs, else resend (.fit; parallel.cad_backward)
    cad_backward: str = "auto"

    @property
    def dp(self) -> int:
        return self.gpus // (self.cp * self.tp)

    @property
    def ranks(self) -> int:
        """The ranks of one tensor-parallel index (each a CP rank of a replica): ``dp * cp``."""
        return self.dp * self.cp

    @property
    def micro_batches(self) -> int:
        return (self.batch or self.dp) // self.dp

    def check(self) -> None:
        if self.tp < 1 or self.gpus_per_node % self.tp:
            raise ValueError(f"--tp {self.tp} must divide --gpus-per-node {self.gpus_per_node} (TP stays in a node)")
        if self.gpus < 1 or self.cp < 1 or self.gpus % (self.cp * self.tp):
            both = f"--cp {self.cp}" + (f" x --tp {self.tp}" if self.tp > 1 else "")
            raise ValueError(f"{both} must divide --gpus {self.gpus}")
        if self.seq_len < self.cp:
            raise ValueError(f"--seq-len {self.seq_len} is shorter than cp={self.cp} ranks")
        if self.batch is not None and (self.batch < 1 or self.batch % self.dp):
            raise ValueError(f"--batch {self.batch} sequences must be a multiple of dp={self.dp} replicas")
        if self.elem_bytes not in (2, 4):
            raise ValueError(f"elem_bytes must be 2 (bf16) or 4 (fp32), got {self.elem_bytes}")
        if self.packing not in PACKINGS:
            raise ValueError(f"--packing {self.packing!r}: choose one of {', '.join(PACKINGS)}")
        if not self.token_cap_factor >= 1:
            raise ValueError(f"--token-cap-factor must be >= 1 (a sequence must fit), got {self.token_cap_factor}")
        if self.planning not in PLANNING:
            raise ValueError(f"--planning {self.planning!r}: choose one of {', '.join(PLANNING)}")
        if self.cad_backward not in (*CAD_BACKWARDS, "auto"):
            raise ValueError(f"--cad-backward {self.cad_backward!r}: choose one of {', '.join(CAD_BACKWARDS)}, auto")
        if self.dp_mode not in DP_MODES:
            raise ValueError(f"--dp-mode {self.dp_mode!r}: choose one of {', '.join(DP_MODES)}")
        if self.dp_shard is not None and self.dp_mode != "hsdp":
            raise ValueError(f"--dp-shard is the ranks sharding each block under --dp-mode hsdp: drop it for "
                             f"--dp-mode {self.dp_mode}")
        if self.dp_shard is not None and (self.dp_shard < 1 or self.ranks % self.dp_shard):
            raise ValueError(f"--dp-shard {self.dp_shard} must divide the dp x cp = {self.ranks} ranks")
        if not 0 <= self.comm_slowdown < 10:
            raise ValueError(f"--comm-slowdown must be in [0, 10), got {self.comm_slowdown}")


def with_planning(cfg: SimConfig, step: float, planning: float) -> float:
    """The step with its planning: hidden behind the step before (``planning: hidden``; it shows only
    where it takes longer than the step), added (``exposed``), or left out (``ignored``: the planner's
    time is this machine's clock, which a choice every rank must make alike cannot depend on)."""
    if cfg.planning == "ignored":
        return step
    return max(step, planning) if cfg.planning == "hidden" else step + planning


def default_cp(model: ModelShape, gpus: int, seq_len: int, tokens_per_rank: int = 16384) -> int:
    """The smallest power-of-two CP degree giving at most ``tokens_per_rank`` tokens per GPU."""
    cp = 1
    while cp < gpus and seq_len // cp > tokens_per_rank and gpus % (2 * cp) == 0:
        cp *= 2
    return cp


def nccl_size(op: str, n: int, sent):
    """nccl-tests' size of a collective (:mod:`distattn.costmodel.network`) from the bytes a rank sends."""
    sent = np.asarray(sent, dtype=np.float64)
    if op == "send_recv":
        return sent
    return sent * n / max(1, n - 1) / (2 if op == "all_reduce" else 1)


def comm_time(net, ph: Phase) -> np.ndarray:
    """Seconds of each entry of a transfer phase; one with ``intra``/``inter`` bytes waits for the
    slower of its two kinds of link (both move at once), one with ``peers`` pays the latency of those
    (:meth:`~distattn.costmodel.network.NetworkProfile.sparse_time`). An entry moving nothing takes none."""
    def time(n, sent):
        size = nccl_size(ph.op, n, sent)
        return net.time(ph.op, n, size) if ph.peers is None else net.sparse_time(ph.op, n, size, ph.peers)
    if ph.inter is None:
        t = time(ph.span, ph.amount)
    else:
        t = np.maximum(time(min(ph.span, net.gpus_per_node), ph.intra), time(ph.span, ph.inter))
    return np.where(np.asarray(ph.amount) > 0, t, 0.0)


def dry_schedule(name: str, docs, world: int, context: PlanContext | None = None, causal: bool = True,
                 window: int | None = None, mask=None, comm_dtype: str | None = None, **options):
    """Row ``name``'s dry schedule (:mod:`.workload`'s rows: ``wlb``'s is the all-gather on the
    per-document layout, each document padded to a multiple of ``2 * world`` as the THD split needs)
    for the job ``context`` describes, from which its planner derives its options (usp: its
    Ulysses degree; cad: its cost model and network); ``options`` go to the planner as
    ``distattn.plan`` takes them (one it does not take is a ``ValueError``); ``mask``: a SliceMask."""
    row = row_of(name)
    docs = laid_out(name, docs, world)
    if row.layout is not None and world > 1:
        options["layout"] = row.layout
    return dry_plan(docs, world, scheduler=spec(row.entry).name, causal=causal, window=window, mask=mask,
                    comm_dtype=comm_dtype, context=context, **options).schedule


def laid_out(name: str, docs, world: int) -> list[int]:
    """The document lengths row ``name`` plans on ``world`` ranks: on the per-document layout each padded
    to a multiple of ``2 * world`` (TransformerEngine's THD split), else as they are."""
    if row_of(name).layout == "document":
        return [-(-int(n) // (2 * world)) * 2 * world for n in docs]
    return list(docs)


def backward_option(cfg: SimConfig, name: str) -> dict:
    """Row ``name``'s planner option ``backward`` (cad's: ``cfg.cad_backward``, which :mod:`.fit`
    resolves; ``auto`` unresolved plans as ``resend``), or none where its scheduler has no such choice."""
    return spec(row_of(name).entry).taken({"backward": _planned_backward(cfg)})


def _planned_backward(cfg: SimConfig) -> str:
    """``cfg.cad_backward`` as a plan takes it: ``auto`` (unresolved: :mod:`.fit` resolves it) as ``resend``."""
    return "resend" if cfg.cad_backward == "auto" else cfg.cad_backward


def job_facts(cfg: SimConfig, scheduler: str | None = None) -> JobFacts:
    """The simulated job in the facts the trainer's config states too (``RunConfig.job_facts``), with
    ``scheduler``'s plans (None: not chosen): ``dp_mode`` over the ``dp x cp`` ranks of each TP rank (one
    rank: no wrapper; hsdp's shard resolved, :func:`.dp.shard_of`), a scheduler that pools pooling every
    replica, bf16 (fp32 for ``elem_bytes`` 4), the GPU's peak; no head groups."""
    pools = scheduler is not None and spec(scheduler).pools
    return JobFacts(cfg.model, cfg.dp, cfg.cp, scheduler, dtype="bf16" if cfg.elem_bytes == 2 else "fp32",
                    ulysses_degree=cfg.ulysses_degree, gpus_per_node=cfg.gpus_per_node, tp=cfg.tp,
                    peak_tflops=cfg.gpu.peak_tflops, gpu=cfg.gpu.name,
                    wrapper=cfg.dp_mode if cfg.ranks > 1 else "single", dp_shard=_shard(cfg),
                    pooled=pools and cfg.dp > 1, cad_backward=_planned_backward(cfg))


def _shard(cfg: SimConfig) -> int | None:
    """hsdp's shard group on ``cfg``'s ranks (None: not hsdp, or one rank); a share of a job's ranks
    (:func:`.per_batch.class_time`'s groups) shards within it."""
    shard = shard_of(cfg)
    return None if shard is None or cfg.ranks == 1 else math.gcd(shard, cfg.ranks)


def plan_context(cfg: SimConfig, network=None) -> PlanContext:
    """The simulated job as the planners see it (:meth:`JobFacts.plan_context
    <distattn.sim.memory_model.JobFacts.plan_context>`, the trainer's translation too): a CP rank is a TP group,
    holding ``1/tp`` of the heads, ``gpus_per_node / tp`` of them to a node; CAD balances the simulated
    kernel's seconds (:func:`attention_kernel`)."""
    return job_facts(cfg).plan_context(network, attention_kernel(cfg).tiles)


def nano_docs(docs, nano_batches: int, model: ModelShape) -> list[list[int]]:
    """A replica's documents as the trainer cuts them into nano-batches
    (:func:`distattn.runtime.pingpong.nano_batches`)."""
    return [part for part, _, _ in nano_batches_of(docs, nano_batches, model.pair_weight())]


def attention_kernel(cfg: SimConfig) -> AttentionKernel:
    """``cfg.kernel``, or our kernels' measured speed on the GPU (:meth:`AttentionKernel.measured`)."""
    if cfg.kernel is not None:
        return cfg.kernel
    return AttentionKernel.measured(cfg.gpu, cfg.model.head_dim, efficiency=cfg.attn_efficiency)


def attn_shape(cfg: SimConfig) -> AttnShape:
    """The attention shape one TP rank computes: ``1/tp`` of the heads."""
    m = cfg.model
    return AttnShape(m.n_heads // cfg.tp, max(1, m.n_kv_heads // cfg.tp), m.head_dim, cfg.elem_bytes,
                     cfg.comm_dtype == "fp8")


@dataclass(frozen=True, eq=False)
class Links:
    """A network as the simulation asks it: as a node's GPUs see it (``node``: TP's collectives) and as
    a CP rank does (``cp``: ``gpus_per_node / tp`` CP ranks to a node). Made once and passed down
    (:func:`links_of`), so each view's record of the fits it answered
    (:meth:`~distattn.costmodel.network.NetworkProfile.asked`) covers every step simulated with it."""

    node: object
    cp: object
    gpus_per_node: int
    tp: int

    @staticmethod
    def of(network, gpus_per_node: int, tp: int) -> "Links":
        def view(per_node):
            return network if network.gpus_per_node == per_node else replace(network, gpus_per_node=per_node)
        return Links(view(gpus_per_node), view(gpus_per_node // tp), gpus_per_node, tp)


def links_of(network, cfg: SimConfig) -> Links:
    """``network`` (a :class:`~distattn.costmodel.network.NetworkProfile`, or :class:`Links` made for ``cfg``'s
    node size and TP already) as ``cfg`` asks it."""
    if isinstance(network, Links):
        if (network.gpus_per_node, network.tp) == (cfg.gpus_per_node, cfg.tp):
            return network
        network = network.node
    return Links.of(network, cfg.gpus_per_node, cfg.tp)


__all__ = ["SimConfig", "PLANNING", "with_planning", "backward_option", "default_cp", "nccl_size", "comm_time", "dry_schedule",
           "laid_out", "job_facts", "plan_context", "nano_docs", "attention_kernel", "attn_shape", "Links", "links_of"]
