"""``distattn simulate``: time the program the code runs, for every scheduler, on a cost model of a cluster.

The cluster: ``gpus`` GPUs, ``gpus_per_node`` per node, split into ``dp`` data-parallel replicas of
``cp`` context-parallel ranks; each replica trains one packed sequence of ``seq_len`` tokens drawn
from a document-length distribution, cut into the scheduler's default nano-batches as the trainer
cuts it (``cad``: two, ping-ponged; :mod:`distattn.pingpong`). For every scheduler the same planner
code, with the same options, that runs in training builds dry schedules (``cad`` pools all
replicas, as DistCA does), and the simulator replays the step the trainer runs
(:mod:`distattn.sim.replay`): the layers' pieces in the trainer's order
(:func:`distattn.program.layer_order`), each attention stage as the executor's instructions
(:meth:`distattn.schedule.Schedule.program`, checked against what the executors do on gloo by
``tests/test_program.py``), forward then the mirrored backward, every rank at once:

* compute: a layer's linear work ``6 * params_per_layer * tokens`` at ``mfu`` of peak (a third
  forward, two thirds backward; ``pre`` the QKV projection, ``post`` the output projection and
  MLP), each attention instruction's FLOPs at ``attn_efficiency`` of peak, the output layer;
* communication: each transfer's bytes timed on a :class:`~distattn.network.NetworkProfile`
  (the group's span of ranks decides intra- or inter-node; cad's all-to-alls wait for the slower
  of their intra- and inter-node bytes), started and waited for where the executor starts and
  waits for it: hidden only behind what the rank computes in between, never by assumption;
* ``wlb-ideal``: per-document CP with every replica's attention perfectly balanced over its ranks
  and no communication -- the upper bound of WLB-LLM-style per-document sharding;
* ``ideal``: the attention of all replicas spread evenly over all GPUs, no communication -- the
  limit no placement (CAD's included) can beat.

The step ends when the slowest rank does (``dp_idle`` is the mean fraction of the step replicas
spend waiting for the slowest). ``exposed_comm_s`` is what communication adds to the step (the step
replayed with transfers taking no time, subtracted); ``stalled_s`` the slowest rank's time at waits.
:func:`simulate_with_timelines` also gives every rank's timeline of the step: ``compute``,
``exposed_comm`` (its time at waits, for transfers or for the slower ranks they needed) and
``idle`` laid end to end (they sum to the step time; their order within the step is a
convention), and ``overlapped_comm``, its transfer time hidden behind compute. ``--auto``
(:func:`recommend`) ranks candidates by tokens/s per GPU, not step time: a larger CP degree has
fewer replicas, so a shorter step can still train fewer tokens per GPU. ``memory_gb`` is the trainer's
estimate (:func:`distattn.memory_model.estimate`) of the simulated job (:func:`memory_job`: FSDP over all
GPUs, ``activation_checkpointing`` and ``mlp_chunk`` as set, one document per sequence, the estimate's
worst case), in GiB despite its name: what ``distattn train CONFIG --dry-run`` prints per GPU for the
same job; ``fits_memory``: within the GPU's memory. Not modelled: activation recomputation (the step
of ``activation_checkpointing: none``), tensor parallelism, the data-parallel gradient traffic
(assumed hidden behind backward), kernel launch overheads. ``mfu`` in the results is the trainer's:
:meth:`ModelShape.model_flops <distattn.model_shape.ModelShape.model_flops>` (6 N per token, N without
the embedding lookup, plus 3x the forward attention over the documents' mask area) over the step
time and every GPU's dense bf16 peak; the models and GPUs are :mod:`distattn.model_shape`'s.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..api import plan as make_plan
from ..doclens import pack
from ..memory_model import GIB, Job, estimate
from ..model_shape import GPU, ModelShape
from ..pingpong import nano_batches as nano_batches_of
from ..program import BACKWARD, FORWARD, layer_order
from ..schedule import AttnShape, Phase, attention_program
from ..schedulers import REGISTRY, PlanContext, spec
from .presets import BOUNDS, GPUS, MODELS, SCHEDULERS
from .replay import TimedProgram, call_ops, replay, step_ops

# a rank's step, laid end to end: compute, then communication not hidden, then waiting for the slowest
# rank of its replica and the slowest replica. overlapped_comm runs during compute, not after it.
PHASES = ("compute", "exposed_comm", "idle", "overlapped_comm")
TIMELINE_COLUMNS = ("scheduler", "rank", "node", "replica", "cp_rank", "phase", "start_s", "end_s", "seconds")


@dataclass(frozen=True)
class SimConfig:
    model: ModelShape
    gpus: int
    seq_len: int
    cp: int
    gpu: GPU = GPUS["h100"]
    gpus_per_node: int = 8
    mfu: float = 0.5               # linear layers
    attn_efficiency: float = 0.5   # attention kernel, fraction of peak
    ulysses_degree: int | None = None
    elem_bytes: int = 2            # bf16 activations
    seed: int = 0
    nano_batches: int | None = None   # per micro-batch (distattn.pingpong); None: the scheduler's default
    comm_dtype: str | None = None     # "fp8": Q, K, V, out, dout travel as FP8 (distattn.plan's comm_dtype)
    activation_checkpointing: str = "full"   # the memory estimate's (the step is timed without recomputation)
    mlp_chunk: int = 0                # the memory estimate's train.mlp_chunk

    @property
    def dp(self) -> int:
        return self.gpus // self.cp

    def check(self) -> None:
        if self.gpus < 1 or self.cp < 1 or self.gpus % self.cp:
            raise ValueError(f"--cp {self.cp} must divide --gpus {self.gpus}")
        if self.seq_len < self.cp:
            raise ValueError(f"--seq-len {self.seq_len} is shorter than cp={self.cp} ranks")
        if self.elem_bytes not in (2, 4):
            raise ValueError(f"elem_bytes must be 2 (bf16) or 4 (fp32), got {self.elem_bytes}")


def default_cp(model: ModelShape, gpus: int, seq_len: int, tokens_per_rank: int = 16384) -> int:
    """The smallest power-of-two CP degree giving at most ``tokens_per_rank`` tokens per GPU."""
    cp = 1
    while cp < gpus and seq_len // cp > tokens_per_rank and gpus % (2 * cp) == 0:
        cp *= 2
    return cp


def _replica_docs(cfg: SimConfig, pool) -> list[list[int]]:
    return [pack(cfg.seq_len, pool, seed=cfg.seed + i) for i in range(cfg.dp)]


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


def _entry(name: str):
    """The registry entry a simulated row plans with (the bounds: zigzag's schedule, evened out)."""
    return spec("zigzag" if name in BOUNDS else name)


def dry_schedule(name: str, docs, world: int, context: PlanContext | None = None, causal: bool = True,
                 window: int | None = None, mask=None, comm_dtype: str | None = None, **options):
    """The scheduler's dry schedule (``wlb-ideal``/``ideal``: zigzag's) for the job ``context``
    describes, from which its planner derives its options (usp: its Ulysses degree; cad: its cost
    model and network); ``options`` go to the planner as ``distattn.plan`` takes them (one it does
    not take is a ``ValueError``); ``mask``: a SliceMask."""
    return make_plan(docs, world, scheduler=_entry(name).name, causal=causal, window=window, mask=mask,
                     comm_dtype=comm_dtype, context=context, **options).schedule


def plan_context(cfg: SimConfig, network=None) -> PlanContext:
    """The simulated job as the planners see it (the trainer describes its job alike)."""
    m = cfg.model
    return PlanContext(m.n_heads, m.n_kv_heads, head_dim=m.head_dim, dtype_bytes=cfg.elem_bytes,
                       gpus_per_node=cfg.gpus_per_node, ulysses_degree=cfg.ulysses_degree,
                       peak_tflops=cfg.gpu.peak_tflops, attn_efficiency=cfg.attn_efficiency, network=network)


def memory_job(cfg: SimConfig, scheduler: str) -> Job:
    """The simulated job as the memory estimate sees it (``distattn train --dry-run``'s job of a config
    with this model, sequence length, mesh and scheduler): bf16 (``elem_bytes`` 4: fp32) with FSDP
    over all GPUs, ``activation_checkpointing`` and ``mlp_chunk`` as set, the trainer's default loss
    chunk; cad pools the replicas, as simulated. Documents: one per sequence, whatever the simulated
    packing -- the estimate's worst case, so ``fits_memory`` holds for every step."""
    entry = _entry(scheduler)
    return Job(cfg.model, cfg.seq_len, cfg.dp, cfg.cp, entry.name, dtype="bf16" if cfg.elem_bytes == 2 else "fp32",
               wrapper="fsdp" if cfg.gpus > 1 else "single", activation_checkpointing=cfg.activation_checkpointing,
               mlp_chunk=cfg.mlp_chunk, ulysses_degree=cfg.ulysses_degree, pooled=entry.pools and cfg.dp > 1,
               gpus_per_node=cfg.gpus_per_node)


def nano_docs(docs, nano_batches: int, model: ModelShape) -> list[list[int]]:
    """A replica's documents as the trainer cuts them into nano-batches (:func:`distattn.pingpong.nano_batches`)."""
    return [part for part, _, _ in nano_batches_of(docs, nano_batches, model.pair_weight())]


def _merged(programs, ranks_each: int, network, flop_rate: float) -> TimedProgram:
    """One timed program over the replicas' ranks side by side (every replica's program has the same
    instructions: they follow from the mesh and options, not the documents)."""
    timed = [TimedProgram.of(p, ranks_each, lambda ph: np.asarray(ph.amount, np.float64) / flop_rate,
                             lambda ph: comm_time(network, ph)) for p in programs]
    first = timed[0]
    assert all(t.program.stages == first.program.stages for t in timed), "replicas' programs differ"
    keys = set().union(*(t.seconds for t in timed))
    zero, none = np.zeros(ranks_each), np.zeros(0, dtype=np.int64)
    links = {k: tuple(np.concatenate([t.links.get(k, (none, none))[j] + i * ranks_each for i, t in enumerate(timed)])
                      for j in (0, 1))
             for k in set().union(*(t.links for t in timed))}   # each replica's pairs on its own ranks
    return TimedProgram(first.program, {k: np.concatenate([t.seconds.get(k, zero) for t in timed]) for k in keys},
                        links)


def time_call(schedule, shape: AttnShape, network, flop_rate: float, streams: bool = True) -> dict[str, float]:
    """Seconds of one plain attention call of ``schedule`` -- its ``forward``, its ``backward`` and
    ``both`` back to back -- replayed (:mod:`.replay`) with attention at ``flop_rate``: the step's
    slowest rank."""
    ranks = schedule.stat_ranks
    timed = TimedProgram.of(schedule.call_program(shape), ranks,
                            lambda ph: np.asarray(ph.amount, np.float64) / flop_rate, lambda ph: comm_time(network, ph))
    return {name: float(replay(call_ops(timed, ranks, stages), ranks, streams=streams).end.max())
            for name, stages in (("forward", FORWARD), ("backward", BACKWARD), ("both", FORWARD + BACKWARD))}


def simulate(cfg: SimConfig, network, schedulers=SCHEDULERS, pool=None, replica_docs=None) -> list[dict]:
    """One result dict per scheduler (see module docstring); sorted as ``schedulers``."""
    return simulate_with_timelines(cfg, network, schedulers, pool, replica_docs)[0]


def _layer_seconds(cfg: SimConfig, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per rank, forward seconds of a layer's ``pre`` (QKV projection) and ``post`` (output
    projection and MLP) on ``tokens``."""
    m, rate = cfg.model, cfg.gpu.peak_tflops * 1e12 * cfg.mfu
    return 2 * m.qkv_params * tokens / rate, 2 * (m.layer_matmul_params - m.qkv_params) * tokens / rate


def _planned(cfg: SimConfig, name: str, entry, docs, shape: AttnShape, network, rate: float):
    """Scheduler ``name``'s attention in the step (planned by registry ``entry``): per nano-batch the
    timed program of every rank and every rank's tokens, the forward attention FLOPs of all replicas
    (MFU's) and the schedules' Ulysses degree. Replicas are cut into nano-batches alike (the trainer's
    rule)."""
    m = cfg.model
    job = dict(context=plan_context(cfg, network), comm_dtype=cfg.comm_dtype)
    nano = 1 if name in BOUNDS else (cfg.nano_batches or entry.nano_batches)
    cut = [nano_docs(rep, nano, m) for rep in docs]
    nano = min(len(c) for c in cut)
    cut = [c if len(c) == nano else [rep] for c, rep in zip(cut, docs)]
    programs, tokens, flops_attn = [], [], 0.0
    for n in range(nano):
        if entry.pools:  # one schedule over the pool: every replica's sequence, balanced over all GPUs
            groups = [dry_schedule(name, [d for rep in cut for d in rep[n]], cfg.gpus, **job)]
        else:
            groups = [dry_schedule(name, rep[n], cfg.cp, **job) for rep in cut]
        group_ranks = cfg.gpus // len(groups)
        progs = [g.call_program(shape) for g in groups]
        if name in BOUNDS:
            progs = _bound_programs(name, progs, group_ranks, cfg.gpus)
        for prog in progs:   # MFU counts the forward's attention (the trainer's model_flops)
            flops_attn += sum(float(ph.total(group_ranks).sum()) for ph in prog.phases
                              if not ph.is_comm and ph.direction == "forward")
        programs.append(_merged(progs, group_ranks, network, rate))
        tokens.append(np.concatenate([np.asarray(g.rank_tokens(), dtype=np.float64) for g in groups]))
    return programs, tokens, flops_attn, groups[0].ulysses_degree


def simulate_with_timelines(cfg: SimConfig, network, schedulers=SCHEDULERS, pool=None,
                            replica_docs=None) -> tuple[list[dict], list[dict]]:
    """(:func:`simulate`'s results, the per-rank timeline): one timeline row per scheduler, rank and
    phase (``TIMELINE_COLUMNS``, phases as ``PHASES``); ranks are numbered replica-major
    (``rank = replica * cp + cp_rank``), as the DP x CP mesh lays them out."""
    cfg.check()
    if network.gpus_per_node != cfg.gpus_per_node:
        network = replace(network, gpus_per_node=cfg.gpus_per_node)
    m = cfg.model
    docs = replica_docs or _replica_docs(cfg, pool)
    peak = cfg.gpu.peak_tflops * 1e12
    shape = AttnShape(m.n_heads, m.n_kv_heads, m.head_dim, cfg.elem_bytes, cfg.comm_dtype == "fp8")
    results, timeline = [], []
    for name in schedulers:
        if name not in SCHEDULERS:
            raise ValueError(f"scheduler {name!r} is unknown; choose from {', '.join(SCHEDULERS)}")
        entry = _entry(name)
        if m.n_heads < entry.head_split(cfg.cp, plan_context(cfg)):
            continue  # heads split over more ranks than there are heads
        programs, tokens, flops_attn, ulysses = _planned(cfg, name, entry, docs, shape, network,
                                                         peak * cfg.attn_efficiency)
        pre, post = zip(*(_layer_seconds(cfg, t) for t in tokens))
        head = 6 * m.vocab_size * m.dim * sum(tokens) / (peak * cfg.mfu)
        ops = step_ops(layer_order(m.n_layers, len(programs)), programs, pre, post, head, cfg.gpus)
        run, still = replay(ops, cfg.gpus), replay(ops, cfg.gpus, comm=False)
        busy = run.compute + run.stalled   # each rank's end (the clock only moves by compute and waits)
        step = float(busy.max())
        rep_times = [float(busy[i * cfg.cp:(i + 1) * cfg.cp].max()) for i in range(cfg.dp)]
        slowest = int(np.argmax(busy))
        memory = estimate(memory_job(cfg, name)).total / GIB
        results.append({
            "scheduler": name, "gpus": cfg.gpus, "cp": cfg.cp, "dp": cfg.dp, "seq_len": cfg.seq_len,
            "model": m.name, "params": m.params, "ulysses_degree": ulysses, "nano_batches": len(programs),
            "step_time_s": step, "tokens_per_s_per_gpu": float(cfg.seq_len * cfg.dp / step / cfg.gpus),
            "mfu": float(m.model_flops(cfg.seq_len * cfg.dp, flops_attn) / step / (peak * cfg.gpus)),
            "compute_s": float(run.compute.max()), "exposed_comm_s": max(step - float(still.end.max()), 0.0),
            "comm_s": float(run.comm[slowest]), "stalled_s": float(run.stalled[slowest]),
            "compute_imbalance": max(1.0, float(run.compute.max() / run.compute.mean())),  # 1 - ulp happens
            "dp_idle": float(np.mean([(step - t) / step for t in rep_times])),
            "memory_gb": memory, "fits_memory": bool(memory <= cfg.gpu.memory_gib),
        })
        timeline += _timeline(name, cfg, step, run)
    return results, timeline


def _bound_programs(name: str, programs, group_ranks: int, gpus: int) -> list:
    """The bounds' programs: attention alone, evened out over each replica's ranks (``wlb-ideal``) or
    over all GPUs (``ideal``)."""
    def attention(prog, direction):
        return sum(ph.total(group_ranks) for ph in prog.phases if not ph.is_comm and ph.direction == direction)
    if name == "ideal":
        mean = sum(attention(p, "forward").sum() for p in programs) / gpus
        return [attention_program(np.full(group_ranks, mean), group_ranks) for _ in programs]
    return [attention_program(np.full(group_ranks, attention(p, "forward").mean()), group_ranks) for p in programs]


def _timeline(name: str, cfg: SimConfig, step: float, run) -> list[dict]:
    """Per rank: its compute, the time it stood at waits (for transfers, or for the slower ranks a
    transfer needed) and its idle end of the step, laid end to end; and its transfers' time hidden
    while it computed."""
    rows = []
    for rank in range(cfg.gpus):
        c, e, comm = float(run.compute[rank]), float(run.stalled[rank]), float(run.comm[rank])
        spans = (("compute", 0.0, c), ("exposed_comm", c, c + e), ("idle", c + e, max(step, c + e)),
                 ("overlapped_comm", 0.0, max(comm - e, 0.0)))
        for phase, start, end in spans:
            rows.append({"scheduler": name, "rank": rank, "node": rank // cfg.gpus_per_node,
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


def recommend(model: ModelShape, gpus: int, seq_len: int, network, pool=None, gpu: GPU = GPUS["h100"],
              gpus_per_node: int = 8, schedulers=SCHEDULERS[:-len(BOUNDS)], progress=None) -> tuple[dict, list[dict]]:
    """Try every power-of-two CP degree that fits memory with every real scheduler; return the
    result with the most tokens/s per GPU and all of them (the bounds are not choices).
    Candidates differ in DP size, so step time alone would favour the largest CP degree."""
    rows, cp = [], 1
    while cp <= gpus:
        if gpus % cp == 0 and seq_len // cp >= 256:
            cfg = SimConfig(model, gpus, seq_len, cp, gpu=gpu, gpus_per_node=gpus_per_node)
            got = simulate(cfg, network, schedulers, pool)
            rows += got
            if progress is not None:
                progress(cp, got)
        cp *= 2
    feasible = [r for r in rows if r["fits_memory"]]
    if not feasible:
        raise ValueError(f"nothing fits {gpu.memory_gib:.0f} GiB per GPU for {model.name} at {seq_len} tokens on "
                         f"{gpus} GPUs; add GPUs or shorten --seq-len")
    return max(feasible, key=lambda r: (r["tokens_per_s_per_gpu"], -r["step_time_s"])), rows


def mesh_description(r: dict, gpus_per_node: int) -> str:
    cp, dp = r["cp"], r["dp"]
    where = "within a node" if cp <= gpus_per_node else f"across {cp // gpus_per_node} nodes"
    if r["ulysses_degree"]:
        u = r["ulysses_degree"]
        return f"dp {dp} x cp {cp} = ulysses {u} (within a node) x ring {cp // u} (across nodes)"
    if r["scheduler"] in REGISTRY and REGISTRY[r["scheduler"]].pools:
        return f"dp {dp} x cp {cp} ({where}), attention balanced over the pool of all {r['gpus']} GPUs"
    return f"dp {dp} x cp {cp} ({where})"


__all__ = ["MODELS", "GPUS", "SCHEDULERS", "PHASES", "TIMELINE_COLUMNS", "ModelShape", "GPU", "SimConfig",
           "default_cp", "simulate", "simulate_with_timelines", "write_timeline", "recommend", "mesh_description",
           "memory_job"]
