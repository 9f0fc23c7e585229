"""``distattn simulate``: time the step the trainer runs, for every scheduler, on a model of a cluster.

The cluster: ``gpus`` GPUs, ``gpus_per_node`` per node, as ``tp`` tensor-parallel ranks x ``cp``
context-parallel ranks x ``dp`` replicas. One step trains a global batch of ``batch`` sequences of
``seq_len`` tokens (:mod:`.workload`: drawn from a document-length sample, packed over the replicas'
micro-batches by the row's packing); each micro-batch is cut into the scheduler's nano-batches as the
trainer cuts it (``cad``: two, ping-ponged; :mod:`distattn.pingpong`). For every row the planner code
that runs in training builds the dry schedules (``cad`` pools all replicas, as DistCA does), and the
simulator replays the step the trainer runs (:mod:`.step`, :mod:`.replay`): its layers' pieces in the
trainer's order, the recomputation its activation checkpointing runs (:mod:`.fit`: the cheapest
setting that fits the GPU), each attention stage as the executor's instructions
(:meth:`distattn.schedule.Schedule.program`, checked against what the executors do on gloo by
``tests/test_program.py``), FSDP's gathers and reduce-scatters, forward then backward, every rank at
once:

* compute: a layer's linear work ``6 * params_per_layer * tokens / tp`` at ``mfu`` of peak; each
  attention instruction's FLOPs at the kernel's measured speed for the rank's segments
  (:mod:`.kernel`); the output layer; all of it ``1 + comm_slowdown`` times slower while a transfer
  of the rank is in flight (:data:`~distattn.sim.replay.COMM_SLOWDOWN`);
* communication: each transfer's bytes timed on a :class:`~distattn.network.NetworkProfile` (the
  group's span decides intra- or inter-node; cad's all-to-alls wait for the slower of their intra-
  and inter-node bytes), started and waited for where the code starts and waits for it, queued on the
  rank's NVLink or network card: hidden only behind what the rank computes in between;
* planning: the seconds the step's plans take to make (measured here, on this machine's CPU): hidden
  behind the step before when the trainer plans ahead (``planning: hidden``; a plan slower than
  the step shows), else added (``exposed``);
* the bounds (``wlb-ideal``, ``ideal``, :mod:`.workload`) have no communication.

The step ends when the slowest rank does (``dp_idle`` is the mean fraction of the step replicas
spend waiting for the slowest). ``exposed_comm_s`` is what communication adds to the step (the step
replayed with transfers taking no time, subtracted); ``stalled_s`` the slowest rank's time at waits.
:func:`simulate_with_timelines` also gives every rank's timeline of the step: ``compute``,
``exposed_comm`` (its time at waits, for transfers or for the slower ranks they needed) and
``idle`` laid end to end (they sum to the step time; their order within the step is a
convention), and ``overlapped_comm``, its transfer time hidden behind compute. ``memory_gib`` is the
trainer's estimate of one GPU (:mod:`.fit`), ``fits`` whether the GPU holds it; ``mfu`` is the
trainer's: :meth:`ModelShape.model_flops <distattn.model_shape.ModelShape.model_flops>` over the step
time and every GPU's dense bf16 peak. One call simulates one draw of the global batch;
:mod:`.sweep` runs many and sweeps the CP size. Not modelled: pipeline parallelism, the optimizer
step, kernel launch overheads.
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..api import plan as make_plan
from ..model_shape import GPU, ModelShape
from ..packing import DEFAULT_CAP_FACTOR
from ..pingpong import nano_batches as nano_batches_of
from ..program import BACKWARD, FORWARD
from ..schedule import AttnShape, Phase, attention_program
from ..schedulers import REGISTRY, PlanContext, spec
from . import fit
from .kernel import AttentionKernel, planner_efficiency
from .presets import BOUNDS, GPUS, MODELS, SCHEDULERS
from .replay import COMM_SLOWDOWN, TimedProgram, call_ops, replay
from .step import Fsdp, MicroBatch, step_ops
from .workload import PACKINGS, Row, assign, draw_chunks, row_of

# a rank's step, laid end to end: compute, then communication not hidden, then waiting for the slowest
# rank of its replica and the slowest replica. overlapped_comm runs during compute, not after it.
PHASES = ("compute", "exposed_comm", "idle", "overlapped_comm")
TIMELINE_COLUMNS = ("scheduler", "rank", "node", "replica", "cp_rank", "phase", "start_s", "end_s", "seconds")
PLANNING = ("hidden", "exposed")


@dataclass(frozen=True)
class SimConfig:
    model: ModelShape
    gpus: int
    seq_len: int
    cp: int
    gpu: GPU = GPUS["h100"]
    gpus_per_node: int = 8
    mfu: float = 0.5               # linear layers
    attn_efficiency: float = 0.5   # attention, fraction of peak: CAD's planner's cost model, GPUs nobody measured
    ulysses_degree: int | None = None
    elem_bytes: int = 2            # bf16 activations
    seed: int = 0                  # the draw of the global batch
    nano_batches: int | None = None   # per micro-batch (distattn.pingpong); None: the scheduler's default
    comm_dtype: str | None = None     # "fp8": Q, K, V, out, dout travel as FP8 (distattn.plan's comm_dtype)
    activation_checkpointing: str | None = None   # None: the cheapest that fits (.fit)
    mlp_chunk: int | None = None      # train.mlp_chunk with a given checkpointing (None: 0)
    tp: int = 1                       # tensor-parallel ranks per CP rank, inside a node
    batch: int | None = None          # sequences of seq_len per global batch; None: dp (one micro-batch each)
    packing: str = "balanced"         # .workload
    token_cap_factor: float = DEFAULT_CAP_FACTOR
    kernel: AttentionKernel | None = None   # None: AttentionKernel.measured(gpu, head dim), flat in length
    comm_slowdown: float = COMM_SLOWDOWN
    fsdp: bool = True                 # FSDP2's gathers and reduce-scatters over the dp x cp ranks
    planning: str = "hidden"

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
        if not 0 <= self.comm_slowdown < 10:
            raise ValueError(f"--comm-slowdown must be in [0, 10), got {self.comm_slowdown}")


def default_cp(model: ModelShape, gpus: int, seq_len: int, tokens_per_rank: int = 16384) -> int:
    """The smallest power-of-two CP degree giving at most ``tokens_per_rank`` tokens per GPU."""
    cp = 1
    while cp < gpus and seq_len // cp > tokens_per_rank and gpus % (2 * cp) == 0:
        cp *= 2
    return cp


def nccl_size(op: str, n: int, sent):
    """nccl-tests' size of a collective (:mod:`distattn.network`) from the bytes a rank sends."""
    sent = np.asarray(sent, dtype=np.float64)
    if op == "send_recv":
        return sent
    return sent * n / max(1, n - 1) / (2 if op == "all_reduce" else 1)


def comm_time(net, ph: Phase) -> np.ndarray:
    """Seconds of each entry of a transfer phase; one with ``intra``/``inter`` bytes waits for the
    slower of its two kinds of link (both move at once), one with ``peers`` pays the latency of those
    (:meth:`~distattn.network.NetworkProfile.sparse_time`). An entry moving nothing takes none."""
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
    """Row ``name``'s dry schedule (:mod:`.workload`'s rows: ``wlb``'s is zigzag on the per-document
    layout, each document padded to a multiple of ``2 * world`` as TransformerEngine's THD split
    needs) for the job ``context`` describes, from which its planner derives its options (usp: its
    Ulysses degree; cad: its cost model and network); ``options`` go to the planner as
    ``distattn.plan`` takes them (one it does not take is a ``ValueError``); ``mask``: a SliceMask."""
    row = row_of(name)
    if row.layout == "document":
        docs = [-(-int(n) // (2 * world)) * 2 * world for n in docs]
    if row.layout is not None and world > 1:
        options["layout"] = row.layout
    return make_plan(docs, world, scheduler=spec(row.entry).name, causal=causal, window=window, mask=mask,
                     comm_dtype=comm_dtype, context=context, **options).schedule


def plan_context(cfg: SimConfig, network=None) -> PlanContext:
    """The simulated job as the planners see it (the trainer describes its job alike): a CP rank is a
    TP group, holding ``1/tp`` of the heads, ``gpus_per_node / tp`` of them to a node; CAD prices
    attention at the simulated kernel's speed on long segments (:func:`~.kernel.planner_efficiency`)."""
    shape = _shape(cfg)
    return PlanContext(shape.num_heads, shape.num_kv_heads, head_dim=shape.head_dim, dtype_bytes=cfg.elem_bytes,
                       gpus_per_node=cfg.gpus_per_node // cfg.tp, ulysses_degree=cfg.ulysses_degree,
                       peak_tflops=cfg.gpu.peak_tflops,
                       attn_efficiency=planner_efficiency(attention_kernel(cfg), cfg.gpu), network=network)


def nano_docs(docs, nano_batches: int, model: ModelShape) -> list[list[int]]:
    """A replica's documents as the trainer cuts them into nano-batches (:func:`distattn.pingpong.nano_batches`)."""
    return [part for part, _, _ in nano_batches_of(docs, nano_batches, model.pair_weight())]


def attention_kernel(cfg: SimConfig) -> AttentionKernel:
    """``cfg.kernel``, or our kernels' measured speed on the GPU (:meth:`AttentionKernel.measured`)."""
    if cfg.kernel is not None:
        return cfg.kernel
    return AttentionKernel.measured(cfg.gpu, cfg.model.head_dim, efficiency=cfg.attn_efficiency)


def time_call(schedule, shape: AttnShape, network, flop_rate: float, streams: bool = True) -> dict[str, float]:
    """Seconds of one plain attention call of ``schedule`` -- its ``forward``, its ``backward`` and
    ``both`` back to back -- replayed (:mod:`.replay`) with attention at ``flop_rate``: the step's
    slowest rank."""
    ranks = schedule.stat_ranks
    timed = TimedProgram.of(schedule.call_program(shape), ranks,
                            lambda ph: np.asarray(ph.amount, np.float64) / flop_rate, lambda ph: comm_time(network, ph))
    return {name: float(replay(call_ops(timed, ranks, stages), ranks, streams=streams).end.max())
            for name, stages in (("forward", FORWARD), ("backward", BACKWARD), ("both", FORWARD + BACKWARD))}


@dataclass(frozen=True, eq=False)
class _Group:
    """One schedule's program, its ranks' attention rates (FLOP/s) per direction, and its tokens."""

    program: object
    rates: dict
    tokens: np.ndarray
    ulysses: int | None


def _groups(cfg: SimConfig, name: str, docs_per_group: list, world: int, kernel: AttentionKernel,
            network) -> tuple[list[_Group], float]:
    """Row ``name``'s schedules, one per group of ``world`` ranks, and the seconds the slowest took to plan."""
    shape = _shape(cfg)
    context = plan_context(cfg, network)
    groups, slowest = [], 0.0
    for docs in docs_per_group:
        start = time.perf_counter()
        schedule = dry_schedule(name, docs, world, context, comm_dtype=cfg.comm_dtype)
        slowest = max(slowest, time.perf_counter() - start)
        segments = _segments(row_of(name), schedule, docs)
        pair = 4.0 * shape.num_heads * shape.head_dim
        rates = {d: kernel.rank_rates(segments, world, d, pair) for d in ("forward", "backward")}
        groups.append(_Group(schedule.call_program(shape), rates, np.asarray(schedule.rank_tokens(), np.float64),
                             schedule.ulysses_degree))
    return groups, slowest


def _shape(cfg: SimConfig) -> AttnShape:
    m = cfg.model
    return AttnShape(m.n_heads // cfg.tp, max(1, m.n_kv_heads // cfg.tp), m.head_dim, cfg.elem_bytes,
                     cfg.comm_dtype == "fp8")


def _segments(row: Row, schedule, docs):
    """The kernel segments the row's ranks run: the schedule's, or -- ``ideal``, whose attention no
    placement cuts -- every document whole."""
    if row.bound != "all":
        return schedule.kernel_segments()
    lens = np.asarray(docs, dtype=np.int64)
    return np.zeros(len(lens), dtype=np.int64), lens, lens * (lens + 1) // 2


def _bound(row: Row, groups: list[_Group], world: int, ranks: int) -> list[_Group]:
    """The bounds' groups: attention alone, evened out over each replica's ranks (``replica``) or over
    every rank (``all``), at the group's overall rate."""
    def forward(g):
        return sum(ph.total(world) for ph in g.program.phases if not ph.is_comm and ph.direction == "forward")
    overall = sum(forward(g).sum() for g in groups) / ranks
    out = []
    for g in groups:
        flops = np.full(world, overall if row.bound == "all" else forward(g).mean())
        rates = {d: np.full(world, _overall(g, forward(g), d)) for d in ("forward", "backward")}
        out.append(_Group(attention_program(flops, world), rates, g.tokens, None))
    return out


def _overall(g: _Group, flops: np.ndarray, direction: str) -> float:
    """A group's FLOP/s over all its ranks together (its work at each rank's rate)."""
    total = float(flops.sum())
    return total / float((flops / g.rates[direction]).sum()) if total > 0 else float(g.rates[direction].max())


def _merged(groups: list[_Group], world: int, network, cfg: SimConfig) -> TimedProgram:
    """One timed program over the groups' ranks side by side (every group's program has the same
    instructions: they follow from the mesh and options, not the documents)."""
    per_node = cfg.gpus_per_node // cfg.tp

    def timed(g):
        attention = (lambda ph: np.asarray(ph.amount, np.float64) / g.rates[ph.direction][ph.rank])
        return TimedProgram.of(g.program, world, attention, lambda ph: comm_time(network, ph),
                               lambda ph: "nic" if ph.span > per_node else "nvlink")
    programs = [timed(g) for g in groups]
    first = programs[0]
    assert all(t.program.stages == first.program.stages for t in programs), "replicas' programs differ"
    keys = set().union(*(t.seconds for t in programs))
    zero, none = np.zeros(world), np.zeros(0, dtype=np.int64)
    links = {k: tuple(np.concatenate([t.links.get(k, (none, none))[j] + i * world for i, t in enumerate(programs)])
                      for j in (0, 1))
             for k in set().union(*(t.links for t in programs))}   # each group's pairs on its own ranks
    return TimedProgram(first.program, {k: np.concatenate([t.seconds.get(k, zero) for t in programs]) for k in keys},
                        links, first.link_of)


def _micro_batch(cfg: SimConfig, name: str, replicas: list, kernel: AttentionKernel, nets: dict) -> dict:
    """One micro-batch of every replica (``replicas[r]``: its documents): its :class:`~.step.MicroBatch`,
    the forward attention FLOPs of all replicas (MFU's), its Ulysses degree and its planning seconds."""
    row, m = row_of(name), cfg.model
    entry = spec(row.entry)
    nano = 1 if row.bound else (cfg.nano_batches or entry.nano_batches)
    # a replica without documents this micro-batch still runs the collectives: one token stands in
    replicas = [docs or [1] for docs in replicas]
    cut = [nano_docs(rep, nano, m) for rep in replicas]
    nano = min(len(c) for c in cut)
    cut = [c if len(c) == nano else [rep] for c, rep in zip(cut, replicas)]   # replicas cut alike
    programs, pre, post, tp, tokens_all, flops_attn, planning, ulysses = [], [], [], [], [], 0.0, 0.0, None
    for n in range(nano):
        if entry.pools:   # one schedule over the pool: every replica's sequence, balanced over all ranks
            docs, world = [[d for rep in cut for d in rep[n]]], cfg.ranks
        else:
            docs, world = [rep[n] for rep in cut], cfg.cp
        groups, seconds = _groups(cfg, name, docs, world, kernel, nets["cp"])
        if row.bound:
            groups = _bound(row, groups, world, cfg.ranks)
        else:
            planning += seconds
        for g in groups:   # MFU counts the forward's attention (the trainer's model_flops), all TP ranks
            flops_attn += cfg.tp * sum(float(ph.total(world).sum()) for ph in g.program.phases
                                       if not ph.is_comm and ph.direction == "forward")
        programs.append(_merged(groups, world, nets["cp"], cfg))
        tokens = np.concatenate([g.tokens for g in groups])
        tokens_all.append(tokens)
        a, b = _layer_seconds(cfg, tokens)
        pre.append(a)
        post.append(b)
        tp.append(_tp_seconds(cfg, nets, tokens))
        ulysses = groups[0].ulysses
    head = 6 * m.vocab_size * m.dim * sum(tokens_all) / (cfg.gpu.peak_tflops * 1e12 * cfg.mfu * cfg.tp)
    mb = MicroBatch(programs, pre, post, head, tp if cfg.tp > 1 else None)
    return {"micro": mb, "flops_attn": flops_attn, "ulysses": ulysses, "planning_s": planning,
            "tokens": sum(tokens_all)}


def _layer_seconds(cfg: SimConfig, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per rank, forward seconds of a layer's ``pre`` (QKV projection) and ``post`` (output
    projection and MLP) on ``tokens``, a TP rank's share."""
    m, rate = cfg.model, cfg.gpu.peak_tflops * 1e12 * cfg.mfu * cfg.tp
    return 2 * m.qkv_params * tokens / rate, 2 * (m.layer_matmul_params - m.qkv_params) * tokens / rate


def _tp_seconds(cfg: SimConfig, nets, tokens: np.ndarray) -> np.ndarray:
    """Per rank, one linear piece's sequence-parallel all-gather and reduce-scatter over its TP group."""
    if cfg.tp == 1:
        return np.zeros_like(tokens)
    size = tokens * cfg.model.dim * cfg.elem_bytes
    node = nets["node"]
    return node.time("all_gather", cfg.tp, size) + node.time("reduce_scatter", cfg.tp, size)


def _fsdp(cfg: SimConfig, net) -> Fsdp | None:
    """FSDP2's per-block and root transfers over the ``dp x cp`` ranks of a TP index: bf16 gathers
    (the compute dtype), fp32 reduce-scatters (``reduce_dtype``), each rank's ``1/tp`` of the weights."""
    n, m = cfg.ranks, cfg.model
    if not cfg.fsdp or n == 1:
        return None
    gathered, reduced = cfg.elem_bytes / cfg.tp, 4 / cfg.tp

    def each(op, params, nbytes):
        return np.full(n, float(net.time(op, n, params * nbytes)))
    return Fsdp(each("all_gather", m.block_params, gathered), each("reduce_scatter", m.block_params, reduced),
                each("all_gather", m.root_params, gathered), each("reduce_scatter", m.root_params, reduced))


def network_views(network, gpus_per_node: int, tp: int) -> dict:
    """The network as a CP rank sees it (``"cp"``: ``gpus_per_node / tp`` CP ranks to a node) and as a
    node's GPUs do (``"node"``); made once per network and shape (kept, so each view's record of the
    fits it answered, :meth:`~distattn.network.NetworkProfile.asked`, covers every step simulated)."""
    views = _VIEWS.setdefault(id(network), (network, {}))[1]
    key = (gpus_per_node, tp)
    if key not in views:
        def view(per_node):
            return network if network.gpus_per_node == per_node else replace(network, gpus_per_node=per_node)
        views[key] = {"node": view(gpus_per_node), "cp": view(gpus_per_node // tp)}
    return views[key]


_VIEWS: dict = {}   # id(network) -> (network, {(gpus_per_node, tp): views}): the network kept, so its id stays its


def _networks(cfg: SimConfig, network) -> dict:
    return network_views(network, cfg.gpus_per_node, cfg.tp)


def simulate(cfg: SimConfig, network, schedulers=SCHEDULERS, pool=None, replica_docs=None) -> list[dict]:
    """One result dict per scheduler (see module docstring); sorted as ``schedulers``."""
    return simulate_with_timelines(cfg, network, schedulers, pool, replica_docs)[0]


def simulate_with_timelines(cfg: SimConfig, network, schedulers=SCHEDULERS, pool=None,
                            replica_docs=None) -> tuple[list[dict], list[dict]]:
    """(:func:`simulate`'s results, the per-rank timeline): one timeline row per scheduler, rank and
    phase (``TIMELINE_COLUMNS``, phases as ``PHASES``); ranks are numbered replica-major
    (``rank = replica * cp + cp_rank``), as the DP x CP mesh lays them out. ``replica_docs``: the
    global batch's sequences (default: :func:`~.workload.draw_chunks` of ``cfg.seed``)."""
    cfg.check()
    chunks = replica_docs or draw_chunks(cfg.batch or cfg.dp, cfg.seq_len, pool, cfg.seed)
    results, timeline = [], []
    for name in schedulers:
        if name not in SCHEDULERS:
            raise ValueError(f"scheduler {name!r} is unknown; choose from {', '.join(SCHEDULERS)}")
        if cfg.model.n_heads // cfg.tp < spec(row_of(name).entry).head_split(cfg.cp, plan_context(cfg)):
            continue  # heads split over more ranks than there are heads
        result, run = simulate_row(cfg, network, name, chunks)
        results.append(result)
        if run is not None:
            timeline += _timeline(name, cfg, result["step_time_s"], run)
    return results, timeline


def simulate_row(cfg: SimConfig, network, name: str, chunks) -> tuple[dict, object]:
    """Row ``name`` on the global batch ``chunks``: its result and its replay (None: it fits no GPU)."""
    row, m = row_of(name), cfg.model
    entry = spec(row.entry)
    cap = cfg.seq_len if cfg.packing == "stream" else int(np.ceil(cfg.token_cap_factor * cfg.seq_len))
    setting = fit.choose(cfg, entry.name, cap)
    result = {"scheduler": name, "gpus": cfg.gpus, "tp": cfg.tp, "cp": cfg.cp, "dp": cfg.dp, "seq_len": cfg.seq_len,
              "batch": len(chunks), "micro_batches": len(chunks) // cfg.dp, "model": m.name, "params": m.params,
              "packing": cfg.packing, "checkpointing": setting.checkpointing, "mlp_chunk": setting.mlp_chunk,
              "memory_gib": setting.memory_gib, "fits": setting.fits,
              "memory_gb": setting.memory_gib, "fits_memory": setting.fits}   # (the names before issue 54)
    if not setting.fits and cfg.activation_checkpointing is None:   # (a setting asked for is timed regardless)
        return dict(result, step_time_s=None), None
    cfg = fit.with_setting(cfg, setting)
    balance = 0.0 if entry.pools or row.bound == "all" else m.pair_weight()
    packed = assign(chunks, cfg.dp, len(chunks) // cfg.dp, cfg.packing, m.pair_weight(), balance,
                    cfg.token_cap_factor, cfg.seed)
    nets, kernel = _networks(cfg, network), attention_kernel(cfg)
    micro = [_micro_batch(cfg, name, replicas, kernel, nets) for replicas in packed.micro]
    ops = step_ops([mb["micro"] for mb in micro], m.n_layers, cfg.activation_checkpointing, cfg.ranks,
                   _fsdp(cfg, nets["cp"]))
    run = replay(ops, cfg.ranks, slowdown=cfg.comm_slowdown)
    still = replay(ops, cfg.ranks, comm=False)
    busy = run.compute + run.stalled   # each rank's end (the clock only moves by compute and waits)
    planning = sum(mb["planning_s"] for mb in micro)
    step = float(busy.max())
    step = max(step, planning) if cfg.planning == "hidden" else step + planning
    # what each replica computed: the rest of its step it waited in collectives with the slowest one
    rep_times = [float(run.compute[i * cfg.cp:(i + 1) * cfg.cp].max()) for i in range(cfg.dp)]
    slowest = int(np.argmax(busy))
    tokens = float(sum(mb["tokens"].sum() for mb in micro))
    peak = cfg.gpu.peak_tflops * 1e12
    return dict(result, **{
        "ulysses_degree": micro[0]["ulysses"], "nano_batches": len(micro[0]["micro"].programs),
        "step_time_s": step, "tokens_per_s_per_gpu": tokens / step / cfg.gpus,
        "mfu": float(m.model_flops(tokens, sum(mb["flops_attn"] for mb in micro)) / step / (peak * cfg.gpus)),
        "compute_s": float(run.compute.max()), "exposed_comm_s": max(float(busy.max() - still.end.max()), 0.0),
        "comm_s": float(run.comm[slowest]), "stalled_s": float(run.stalled[slowest]),
        "compute_imbalance": max(1.0, float(run.compute.max() / run.compute.mean())),  # 1 - ulp happens
        "dp_idle": float(np.mean([(step - t) / step for t in rep_times])), "dp_imbalance": packed.imbalance,
        "held_share": packed.held_tokens / max(1, sum(map(sum, chunks))), "planning_s": planning,
        "kernel": kernel.source}), run


def _timeline(name: str, cfg: SimConfig, step: float, run) -> list[dict]:
    """Per rank: its compute, the time it stood at waits (for transfers, or for the slower ranks a
    transfer needed) and its idle end of the step, laid end to end; and its transfers' time hidden
    while it computed."""
    rows = []
    for rank in range(cfg.ranks):
        c, e, comm = float(run.compute[rank]), float(run.stalled[rank]), float(run.comm[rank])
        spans = (("compute", 0.0, c), ("exposed_comm", c, c + e), ("idle", c + e, max(step, c + e)),
                 ("overlapped_comm", 0.0, max(comm - e, 0.0)))
        for phase, start, end in spans:
            rows.append({"scheduler": name, "rank": rank, "node": rank * cfg.tp // cfg.gpus_per_node,
                         "replica": rank // cfg.cp, "cp_rank": rank % cfg.cp, "phase": phase,
                         "start_s": start, "end_s": end, "seconds": end - start})
    return rows


def write_timeline(rows: list[dict], path: str | Path) -> None:
    """Write :func:`simulate_with_timelines`' timeline to ``path``: CSV (``.csv``) or JSON (``.json``)."""
    path = Path(path)
    if path.suffix not in (".csv", ".json"):
        raise ValueError(f"--timeline {path}: name a .csv or .json file")
    if path.suffix == ".json":
        path.write_text(json.dumps({"phases": list(PHASES), "rows": rows}, allow_nan=False))
        return
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=TIMELINE_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def mesh_description(r: dict, gpus_per_node: int) -> str:
    cp, dp, tp = r["cp"], r["dp"], r.get("tp", 1)
    where = "within a node" if cp * tp <= gpus_per_node else f"across {cp * tp // gpus_per_node} nodes"
    lead = f"tp {tp} x " if tp > 1 else ""
    if r.get("ulysses_degree"):
        u = r["ulysses_degree"]
        return f"{lead}dp {dp} x cp {cp} = ulysses {u} (within a node) x ring {cp // u} (across nodes)"
    if r["scheduler"] in REGISTRY and REGISTRY[r["scheduler"]].pools:
        return f"{lead}dp {dp} x cp {cp} ({where}), attention balanced over the pool of all {r['gpus']} GPUs"
    return f"{lead}dp {dp} x cp {cp} ({where})"


__all__ = ["MODELS", "GPUS", "SCHEDULERS", "BOUNDS", "PHASES", "TIMELINE_COLUMNS", "ModelShape", "GPU", "SimConfig",
           "default_cp", "simulate", "simulate_with_timelines", "simulate_row", "write_timeline", "mesh_description",
           "plan_context", "dry_schedule", "time_call", "nccl_size", "comm_time", "network_views"]
