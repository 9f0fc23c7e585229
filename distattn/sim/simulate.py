"""``distattn simulate``: replay the real schedules of every scheduler on a cost model of a cluster.

The cluster: ``gpus`` GPUs, ``gpus_per_node`` per node, split into ``dp`` data-parallel replicas of
``cp`` context-parallel ranks; each replica trains one packed sequence of ``seq_len`` tokens drawn
from a document-length distribution. For every scheduler the same planner code that runs in
training builds dry schedules (``cad`` pools all replicas, as DistCA does), and the simulator
replays their phases (:meth:`distattn.schedule.Schedule.phases`). Per layer and rank:

* compute: linear layers ``6 * params_per_layer * tokens`` at ``mfu`` of peak (a third forward,
  two thirds backward), each attention phase's FLOPs at ``attn_efficiency`` of peak;
* communication: each transfer's bytes timed on a :class:`~distattn.network.NetworkProfile`
  (the group's span of ranks decides intra- or inter-node) and hidden exactly as the phase says
  it runs: behind the same step's attention (``overlaps="attention"``: ring steps, the next head
  group's all-gather), behind the layer's other computation (``"layers"``: ``cad``'s ping-pong of
  nano-batches, :mod:`distattn.pingpong`), or not at all;
* ``wlb-ideal``: per-document CP with every replica's attention perfectly balanced over its ranks
  and no exposed communication -- the upper bound of WLB-LLM-style per-document sharding;
* ``ideal``: the attention of all replicas spread evenly over all GPUs, no exposed communication --
  the limit no placement (CAD's included) can beat.

A replica's time is its slowest rank's; the step waits for the slowest replica (``dp_idle`` is
the mean fraction of the step replicas spend waiting). :func:`simulate_with_timelines` also gives
every rank's timeline of the step: ``compute``, ``exposed_comm`` and ``idle`` laid end to end
(they sum to the step time; their order within the step is a convention, the per-layer interleaving
is not modelled), and ``overlapped_comm``, the communication hidden behind compute. ``--auto``
(:func:`recommend`) ranks candidates by tokens/s per GPU, not step time: a larger CP degree has
fewer replicas, so a shorter step can still train fewer tokens per GPU. Memory per GPU: bf16 weights with fp32
master weights, gradients and Adam sharded over all GPUs (FSDP), checkpointed layer inputs, one
layer's working set, bf16 logits, and the schedule's receive buffers
(:meth:`~distattn.schedule.Schedule.buffer_bytes`). Not modelled: tensor parallelism, the
data-parallel gradient traffic (assumed hidden behind backward), kernel launch overheads.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..api import plan as make_plan
from ..cost import Roofline
from ..doclens import pack
from ..schedule import AttnShape, Phase
from ..schedulers import REGISTRY, spec
from .presets import BOUNDS, GPUS, MODELS, SCHEDULERS, GPUPreset, ModelPreset

# a rank's step, laid end to end: compute, then communication not hidden, then waiting for the slowest
# rank of its replica and the slowest replica. overlapped_comm runs during compute, not after it.
PHASES = ("compute", "exposed_comm", "idle", "overlapped_comm")
TIMELINE_COLUMNS = ("scheduler", "rank", "node", "replica", "cp_rank", "phase", "start_s", "end_s", "seconds")


@dataclass(frozen=True)
class SimConfig:
    model: ModelPreset
    gpus: int
    seq_len: int
    cp: int
    gpu: GPUPreset = GPUS["h100"]
    gpus_per_node: int = 8
    mfu: float = 0.5               # linear layers
    attn_efficiency: float = 0.5   # attention kernel, fraction of peak
    ulysses_degree: int | None = None
    elem_bytes: int = 2            # bf16 activations
    seed: int = 0

    @property
    def dp(self) -> int:
        return self.gpus // self.cp

    def check(self) -> None:
        if self.gpus < 1 or self.cp < 1 or self.gpus % self.cp:
            raise ValueError(f"--cp {self.cp} must divide --gpus {self.gpus}")
        if self.seq_len < self.cp:
            raise ValueError(f"--seq-len {self.seq_len} is shorter than cp={self.cp} ranks")


def default_cp(model: ModelPreset, gpus: int, seq_len: int, tokens_per_rank: int = 16384) -> int:
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
    return sent if op == "send_recv" else sent * n / max(1, n - 1)


def comm_time(net, ph: Phase) -> np.ndarray:
    """Seconds of each entry of a transfer phase; one with ``intra``/``inter`` bytes waits for the
    slower of its two kinds of link (both move at once)."""
    if ph.inter is None:
        return net.time(ph.op, ph.span, nccl_size(ph.op, ph.span, ph.amount))
    node = min(ph.span, net.gpus_per_node)
    return np.maximum(net.time(ph.op, node, nccl_size(ph.op, node, ph.intra)),
                      net.time(ph.op, ph.span, nccl_size(ph.op, ph.span, ph.inter)))


def _by_key(keys: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unique ``keys`` and the sum of ``values`` of each."""
    uniq, inverse = np.unique(keys, return_inverse=True)
    return uniq, np.bincount(inverse, values, minlength=len(uniq))


def _lookup(keys: np.ndarray, values: np.ndarray, want: np.ndarray) -> np.ndarray:
    """``values`` of sorted ``keys`` at ``want`` (0 where absent)."""
    pos = np.minimum(np.searchsorted(keys, want), max(len(keys) - 1, 0))
    return np.where((len(keys) > 0) & (keys[pos] == want), values[pos], 0.0) if len(keys) else np.zeros(len(want))


def layer_times(phases, ranks: int, net, flop_rate: float, lin_s: np.ndarray) -> dict[str, np.ndarray]:
    """Seconds per rank of one layer's forward and backward attention: ``attention`` (its phases'
    FLOPs at ``flop_rate``), ``comm`` (every transfer) and ``exposed`` (what no computation hides,
    see module docstring); ``lin_s`` is the layer's linear time per rank."""
    out = {k: np.zeros(ranks) for k in ("attention", "comm", "exposed")}
    for direction, lin in (("forward", lin_s / 3), ("backward", 2 * lin_s / 3)):
        mine = [ph for ph in phases if ph.direction == direction]
        # (step, rank) -> seconds of attention, and of transfers issued ahead of it
        slots = {"attention": ([], []), "under attention": ([], [])}
        under_layers = np.zeros(ranks)
        for ph in mine:
            t = np.asarray(ph.amount, np.float64) / flop_rate if not ph.is_comm else comm_time(net, ph)
            per_rank = np.bincount(ph.rank, t, minlength=ranks)
            if not ph.is_comm or ph.overlaps == "attention":
                keys, times = slots["attention" if not ph.is_comm else "under attention"]
                keys.append(ph.steps * ranks + ph.rank)
                times.append(t)
            if not ph.is_comm:
                out["attention"] += per_rank
                continue
            out["comm"] += per_rank
            if ph.overlaps is None:
                out["exposed"] += per_rank
            elif ph.overlaps == "layers":
                under_layers += per_rank
        a_keys, a_time = _by_key(*(np.concatenate(x or [np.zeros(0)]) for x in slots["attention"]))
        c_keys, c_time = _by_key(*(np.concatenate(x or [np.zeros(0)]) for x in slots["under attention"]))
        hidden_by = _lookup(a_keys, a_time, c_keys)
        out["exposed"] += np.bincount(c_keys.astype(np.int64) % ranks, np.maximum(c_time - hidden_by, 0),
                                      minlength=ranks)
        attention = np.bincount(a_keys.astype(np.int64) % ranks, a_time, minlength=ranks)
        out["exposed"] += np.maximum(under_layers - lin - attention, 0)  # the other nano-batch's layer
    return out


def _entry(name: str):
    """The registry entry a simulated row plans with (the bounds: zigzag's schedule, evened out)."""
    return spec("zigzag" if name in BOUNDS else name)


def dry_schedule(name: str, docs, world: int, num_kv_heads: int | None = None, causal: bool = True,
                 window: int | None = None, mask=None, ulysses_degree: int | None = None,
                 gpus_per_node: int | None = None, **cluster):
    """The scheduler's dry schedule (``wlb-ideal``: zigzag's; see :func:`ideal_phases`) with the options
    the registry gives it for a model of ``num_kv_heads`` KV heads (usp: its Ulysses degree, inside a
    node of ``gpus_per_node``), and those of ``cluster`` its planner takes (cad: the cost model,
    network and ``overlap_s`` of :func:`_cluster_options`); ``mask``: a SliceMask."""
    entry = _entry(name)
    opts = entry.plan_options(world, num_kv_heads, ulysses_degree, gpus_per_node)
    opts.update({key: value for key, value in cluster.items() if entry.accepts(key)})
    return make_plan(docs, world, scheduler=entry.name, causal=causal, window=window, mask=mask, **opts).schedule


def _cluster_options(cfg: SimConfig, network) -> dict:
    """What a planner may plan with in the simulated cluster (cad does): the attention cost and network,
    and the linear layers' time per layer of a rank's share of tokens (ping-pong hides transfers behind it)."""
    m = cfg.model
    peak = cfg.gpu.peak_tflops * 1e12
    cost = Roofline(cfg.gpu.peak_tflops, cfg.attn_efficiency, num_heads=m.n_heads, num_kv_heads=m.n_kv_heads,
                    head_dim=m.head_dim, dtype_bytes=cfg.elem_bytes)
    tokens = cfg.seq_len / cfg.cp
    return {"cost": cost, "network": network, "overlap_s": 6 * m.layer_params * tokens / (peak * cfg.mfu)}


def ideal_phases(phases, ranks: int, mean=None) -> list[Phase]:
    """The bounds: the attention of ``phases`` evened out over the ranks (``wlb-ideal``), or set to
    ``mean[i]`` per rank for the ``i``-th attention phase (``ideal``: the mean over all replicas); no
    communication."""
    attention = [ph for ph in phases if not ph.is_comm]
    means = mean if mean is not None else [ph.total(ranks).mean() for ph in attention]
    return [Phase.per_rank(ph.direction, "attention", ph.what, ranks, np.full(ranks, m))
            for ph, m in zip(attention, means)]


def _memory_gb(cfg: SimConfig, tokens: float, buffers: float) -> float:
    m = cfg.model
    states = 16.0 * m.params / cfg.gpus
    acts = tokens * m.dim * 2 * m.n_layers + tokens * (16 * m.dim + 3 * m.ffn_dim) * 2 + tokens * m.vocab * 2
    return (states + acts + buffers) / 1e9


def simulate(cfg: SimConfig, network, schedulers=SCHEDULERS, pool=None, replica_docs=None) -> list[dict]:
    """One result dict per scheduler (see module docstring); sorted as ``schedulers``."""
    return simulate_with_timelines(cfg, network, schedulers, pool, replica_docs)[0]


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
    shape = AttnShape(m.n_heads, m.n_kv_heads, m.head_dim, cfg.elem_bytes)
    rate = peak * cfg.attn_efficiency
    results, timeline = [], []
    for name in schedulers:
        if name not in SCHEDULERS:
            raise ValueError(f"scheduler {name!r} is unknown; choose from {', '.join(SCHEDULERS)}")
        entry = _entry(name)
        heads = dict(num_kv_heads=m.n_kv_heads, ulysses_degree=cfg.ulysses_degree, gpus_per_node=cfg.gpus_per_node)
        if m.n_heads < entry.ulysses_degree(cfg.cp, m.n_kv_heads, cfg.ulysses_degree, cfg.gpus_per_node):
            continue  # heads split over more ranks than there are heads
        if entry.pools:  # one schedule over the pool: every replica's sequence, balanced over all GPUs
            groups = [(dry_schedule(name, [d for rep in docs for d in rep], cfg.gpus, **heads,
                                    **_cluster_options(cfg, network)), cfg.gpus)]
        else:
            groups = [(dry_schedule(name, rep, cfg.cp, **heads, **_cluster_options(cfg, network)), cfg.cp)
                      for rep in docs]
        ranks_compute, rank_exposed, rank_comm, flops_attn, mem = [], [], [], 0.0, 0.0
        every = [schedule.phases(shape) for schedule, _ in groups]
        mean = None
        if name == "ideal":   # each attention phase's FLOPs over all GPUs of all replicas
            attention = [[ph for ph in phases if not ph.is_comm] for phases in every]
            mean = [sum(float(group[i].total(n).sum()) for group, (_, n) in zip(attention, groups)) / cfg.gpus
                    for i in range(len(attention[0]))]
        for (schedule, n), phases in zip(groups, every):
            tokens = np.asarray(schedule.rank_tokens(), dtype=np.float64)
            if name in BOUNDS:
                phases = ideal_phases(phases, n, mean)
            lin = 6 * m.layer_params * tokens / (peak * cfg.mfu)
            t = layer_times(phases, n, network, rate, lin)
            head = 6 * m.vocab * m.dim * tokens / (peak * cfg.mfu)
            ranks_compute += list(m.n_layers * (lin + t["attention"]) + head)
            rank_exposed += list(m.n_layers * t["exposed"])
            rank_comm += list(m.n_layers * t["comm"])
            flops_attn += sum(float(ph.total(n).sum()) for ph in phases if not ph.is_comm)
            buffers = schedule.buffer_bytes(shape)
            mem = max(mem, max(_memory_gb(cfg, tok, b) for tok, b in zip(tokens, buffers)))
        busy = np.asarray(ranks_compute) + np.asarray(rank_exposed)
        rep_times = [float(busy[i * cfg.cp:(i + 1) * cfg.cp].max()) for i in range(cfg.dp)]
        step = max(rep_times)
        slowest = int(np.argmax(busy))
        flops_model = 6 * m.params * cfg.seq_len * cfg.dp + flops_attn * m.n_layers
        results.append({
            "scheduler": name, "gpus": cfg.gpus, "cp": cfg.cp, "dp": cfg.dp, "seq_len": cfg.seq_len,
            "model": m.name, "ulysses_degree": groups[0][0].ulysses_degree,
            "step_time_s": float(step), "tokens_per_s_per_gpu": float(cfg.seq_len * cfg.dp / step / cfg.gpus),
            "mfu": float(flops_model / step / (peak * cfg.gpus)),
            "compute_s": float(np.max(ranks_compute)), "exposed_comm_s": float(rank_exposed[slowest]),
            "comm_s": float(rank_comm[slowest]),
            "compute_imbalance": max(1.0, float(np.max(ranks_compute) / np.mean(ranks_compute))),  # 1 - ulp happens
            "dp_idle": float(np.mean([(step - t) / step for t in rep_times])),
            "memory_gb": float(mem), "fits_memory": bool(mem <= cfg.gpu.memory_gb),
        })
        timeline += _timeline(name, cfg, step, ranks_compute, rank_exposed, rank_comm)
    return results, timeline


def _timeline(name: str, cfg: SimConfig, step: float, compute, exposed, comm) -> list[dict]:
    rows = []
    for rank, (c, e, total) in enumerate(zip(compute, exposed, comm)):
        c, e, hidden = float(c), float(e), float(total - e)
        # overlap is bounded by the compute it hides behind (comm_time's min/max guarantee it)
        assert -1e-9 * step <= hidden <= c * (1 + 1e-9) and c + e <= step * (1 + 1e-12), (name, rank)
        spans = (("compute", 0.0, c), ("exposed_comm", c, c + e), ("idle", c + e, max(step, c + e)),
                 ("overlapped_comm", 0.0, max(hidden, 0.0)))
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


def recommend(model: ModelPreset, gpus: int, seq_len: int, network, pool=None, gpu: GPUPreset = GPUS["h100"],
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
        raise ValueError(f"nothing fits {gpu.memory_gb:.0f} GB per GPU for {model.name} at {seq_len} tokens on {gpus} "
                         f"GPUs; add GPUs or shorten --seq-len")
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


__all__ = ["MODELS", "GPUS", "SCHEDULERS", "PHASES", "TIMELINE_COLUMNS", "ModelPreset", "GPUPreset", "SimConfig",
           "default_cp", "simulate", "simulate_with_timelines", "write_timeline", "recommend", "mesh_description"]
