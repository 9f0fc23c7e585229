"""``distattn simulate``: replay the real plans of every scheduler on a cost model of a cluster.

The cluster: ``gpus`` GPUs, ``gpus_per_node`` per node, split into ``dp`` data-parallel replicas of
``cp`` context-parallel ranks; each replica trains one packed sequence of ``seq_len`` tokens drawn
from a document-length distribution. For every scheduler the same planner code that runs in
training builds dry plans (``cad`` pools all replicas, as DistCA does); their ``stats()`` give each
rank's attention FLOPs, tokens and bytes sent. Per layer and rank:

* compute: linear layers ``6 * params_per_layer * tokens`` at ``mfu`` of peak, attention
  forward FLOPs x 3.5 (backward 2.5x) at ``attn_efficiency`` of peak;
* communication, timed on a :class:`~distattn.cluster.profile.NetworkProfile` and overlapped as the
  scheduler overlaps it: ``ring``/``zigzag`` one send/recv per step hidden behind that step's
  attention (backward moves KV and fp32 dK/dV); ``allgather`` and ``ulysses`` collectives exposed;
  ``usp`` Ulysses all-to-all inside groups of ``U`` exposed, its ring over ``R`` overlapped;
  ``cad`` all-to-alls over the pool hidden behind the other nano-batch's compute (ping-pong,
  :mod:`distattn.pingpong`), the rest exposed;
* ``wlb-ideal``: per-document CP with every replica's attention perfectly balanced over its ranks
  and no exposed communication -- the upper bound of WLB-LLM-style per-document sharding.

A replica's time is its slowest rank's; the step waits for the slowest replica (``dp_idle`` is
the mean fraction of the step replicas spend waiting). :func:`simulate_with_timelines` also gives
every rank's timeline of the step: ``compute``, ``exposed_comm`` and ``idle`` laid end to end
(they sum to the step time; their order within the step is a convention, the per-layer interleaving
is not modelled), and ``overlapped_comm``, the communication hidden behind compute. ``--auto``
(:func:`recommend`) ranks candidates by tokens/s per GPU, not step time: a larger CP degree has
fewer replicas, so a shorter step can still train fewer tokens per GPU. Memory per GPU: bf16 weights with fp32
master weights, gradients and Adam sharded over all GPUs (FSDP), checkpointed layer inputs, one
layer's working set, bf16 logits, and the scheduler's buffers. Not modelled: tensor parallelism,
the data-parallel gradient traffic (assumed hidden behind backward), kernel launch overheads.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..api import plan as make_plan
from ..doclens import pack
from ..schedulers.usp import default_ulysses_degree
from .presets import GPUS, MODELS, SCHEDULERS, GPUPreset, ModelPreset

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


def _usp_degree(cfg: SimConfig) -> int:
    if cfg.ulysses_degree is not None:
        return cfg.ulysses_degree
    # Ulysses inside a node, as many ranks as heads and the node allow
    for u in (cfg.gpus_per_node, 4, 2):
        if u <= cfg.cp and cfg.cp % u == 0 and cfg.model.n_kv_heads % u == 0:
            return u
    return default_ulysses_degree(cfg.cp, cfg.model.n_kv_heads)


def comm_time(name: str, cfg: SimConfig, net, st: dict, attn_fwd_s: np.ndarray, lin_s: np.ndarray,
                  tokens: np.ndarray, u: int) -> tuple[np.ndarray, np.ndarray]:
    """(total communication seconds, exposed seconds) per rank and layer."""
    m, p = cfg.model, cfg.cp
    b = np.asarray(st["send_bytes"], dtype=np.float64)
    if name in ("ring", "zigzag"):
        step_b = b / max(1, p - 1)
        fwd = net.time("send_recv", p, step_b)
        bwd = net.time("send_recv", p, 3 * step_b)  # KV forward again plus fp32 dK/dV
        comm = (p - 1) * (fwd + bwd)
        exposed = (p - 1) * (np.maximum(0, fwd - attn_fwd_s / p) + np.maximum(0, bwd - 2.5 * attn_fwd_s / p))
        return comm, exposed
    if name == "allgather":
        size = b * p / max(1, p - 1)
        comm = 2 * net.time("all_gather", p, size) + net.time("reduce_scatter", p, 2 * size)
        return comm, comm
    if name == "ulysses":
        comm = 2 * net.time("all_to_all", p, b * p / max(1, p - 1))
        return comm, comm
    if name == "usp":
        r = p // u
        a2a_b = (u - 1) / u * tokens * (2 * m.n_heads + 2 * m.n_kv_heads) * m.head_dim * cfg.elem_bytes
        ring_b = np.maximum(b - a2a_b, 0) / max(1, r - 1)
        a2a = 2 * net.time("all_to_all", u, a2a_b * u / max(1, u - 1))
        fwd, bwd = net.time("send_recv", p, ring_b), net.time("send_recv", p, 3 * ring_b)
        ring = (r - 1) * (fwd + bwd)
        hidden = (r - 1) * (np.maximum(0, fwd - attn_fwd_s / r) + np.maximum(0, bwd - 2.5 * attn_fwd_s / r))
        return a2a + ring, a2a + hidden
    if name == "cad":
        n = cfg.gpus
        comm = 3.5 * net.time("all_to_all", n, b * n / max(1, n - 1))  # forward, backward 2.5x
        # ping-pong: one nano-batch's all-to-alls run under the other's compute, attention included
        return comm, np.maximum(0, comm - lin_s - 3.5 * attn_fwd_s)
    assert name == "wlb-ideal"
    zero = np.zeros_like(b)
    return zero, zero


def _memory_gb(name: str, cfg: SimConfig, tokens: float, send_b: float, u: int) -> float:
    m = cfg.model
    states = 16.0 * m.params / cfg.gpus
    acts = tokens * m.dim * 2 * m.n_layers + tokens * (16 * m.dim + 3 * m.ffn_dim) * 2 + tokens * m.vocab * 2
    kv_tok = 2 * m.n_kv_heads * m.head_dim * 2
    buffers = {"ring": 2 * tokens * kv_tok, "zigzag": 2 * tokens * kv_tok, "allgather": 3 * cfg.seq_len * kv_tok,
               "ulysses": tokens * (2 * m.n_heads * m.head_dim * 2 + kv_tok), "cad": 2 * send_b,
               "usp": 2 * tokens * kv_tok * u + tokens * 2 * m.n_heads * m.head_dim * 2, "wlb-ideal": cfg.seq_len * kv_tok}
    return (states + acts + buffers[name]) / 1e9


def dry_stats(name: str, docs, world: int, model: ModelPreset, ulysses_degree: int, elem_bytes: int = 2,
              causal: bool = True, window: int | None = None) -> dict:
    """``stats()`` of the scheduler's dry plan (``wlb-ideal``: zigzag's, attention evened out)."""
    if world == 1:
        name = "ring"
    sched = "zigzag" if name == "wlb-ideal" else name
    opts = {"ulysses_degree": ulysses_degree} if name == "usp" else {}
    st = make_plan(docs, world, scheduler=sched, causal=causal, window=window, **opts).stats(
        model.n_heads, model.n_kv_heads, model.head_dim, elem_bytes)
    if name == "wlb-ideal":
        st = dict(st, flops=[float(np.mean(st["flops"]))] * world)
    return st


def simulate(cfg: SimConfig, network, schedulers=SCHEDULERS, pool=None, replica_docs=None) -> list[dict]:
    """One result dict per scheduler (see module docstring); sorted as ``schedulers``."""
    return simulate_with_timelines(cfg, network, schedulers, pool, replica_docs)[0]


def simulate_with_timelines(cfg: SimConfig, network, schedulers=SCHEDULERS, pool=None,
                            replica_docs=None) -> tuple[list[dict], list[dict]]:
    """(:func:`simulate`'s results, the per-rank timeline): one timeline row per scheduler, rank and
    phase (``TIMELINE_COLUMNS``, phases as ``PHASES``); ranks are numbered replica-major
    (``rank = replica * cp + cp_rank``), as the DP x CP mesh lays them out."""
    cfg.check()
    m = cfg.model
    docs = replica_docs or _replica_docs(cfg, pool)
    peak = cfg.gpu.peak_tflops * 1e12
    u = _usp_degree(cfg)
    results, timeline = [], []
    for name in schedulers:
        if name not in SCHEDULERS:
            raise ValueError(f"scheduler {name!r} is unknown; choose from {', '.join(SCHEDULERS)}")
        if name == "ulysses" and m.n_heads < cfg.cp:
            continue
        if name == "cad":  # one plan over the pool: every replica's sequence, balanced over all GPUs
            st = dry_stats("cad", [d for rep in docs for d in rep], cfg.gpus, m, u, cfg.elem_bytes)
            per = [{k: st[k][i * cfg.cp:(i + 1) * cfg.cp] for k in ("flops", "tokens", "send_bytes")}
                   for i in range(cfg.dp)]
        else:
            per = [dry_stats(name, rep, cfg.cp, m, u, cfg.elem_bytes) for rep in docs]
        rep_times, ranks_compute, rank_exposed, rank_comm, mem = [], [], [], [], 0.0
        for st in per:
            tokens = np.asarray(st["tokens"], dtype=np.float64)
            attn_fwd = np.asarray(st["flops"], dtype=np.float64) / (peak * cfg.attn_efficiency)
            lin = 6 * m.layer_params * tokens / (peak * cfg.mfu)
            comm, exposed = comm_time(name, cfg, network, st, attn_fwd, lin, tokens, u) if cfg.cp > 1 or \
                name == "cad" else (np.zeros_like(tokens), np.zeros_like(tokens))
            head = 6 * m.vocab * m.dim * tokens / (peak * cfg.mfu)
            compute = m.n_layers * (lin + 3.5 * attn_fwd) + head
            total = compute + m.n_layers * exposed
            rep_times.append(float(total.max()))
            ranks_compute += list(compute)
            rank_exposed += list(m.n_layers * exposed)
            rank_comm += list(m.n_layers * comm)
            mem = max(mem, max(_memory_gb(name, cfg, t, b, u) for t, b in zip(tokens, st["send_bytes"])))
        step = max(rep_times)
        slowest = int(np.argmax([c + e for c, e in zip(ranks_compute, rank_exposed)]))
        flops_model = 6 * m.params * cfg.seq_len * cfg.dp + 3.5 * sum(float(np.sum(s["flops"])) for s in per) \
            * m.n_layers
        results.append({
            "scheduler": name, "gpus": cfg.gpus, "cp": cfg.cp, "dp": cfg.dp, "seq_len": cfg.seq_len,
            "model": m.name, "ulysses_degree": u if name == "usp" else None,
            "step_time_s": float(step), "tokens_per_s_per_gpu": float(cfg.seq_len * cfg.dp / step / cfg.gpus),
            "mfu": float(flops_model / step / (peak * cfg.gpus)),
            "compute_s": float(np.max(ranks_compute)), "exposed_comm_s": float(rank_exposed[slowest]),
            "comm_s": float(rank_comm[slowest]),
            "compute_imbalance": float(np.max(ranks_compute) / np.mean(ranks_compute)),
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
              gpus_per_node: int = 8, schedulers=SCHEDULERS[:-1], progress=None) -> tuple[dict, list[dict]]:
    """Try every power-of-two CP degree that fits memory with every real scheduler; return the
    result with the most tokens/s per GPU and all of them (``wlb-ideal`` is a bound, not a choice).
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
    if r["scheduler"] == "usp":
        u = r["ulysses_degree"]
        return f"dp {dp} x cp {cp} = ulysses {u} (within a node) x ring {cp // u} (across nodes)"
    if r["scheduler"] == "cad":
        return f"dp {dp} x cp {cp} ({where}), attention balanced over the pool of all {r['gpus']} GPUs"
    return f"dp {dp} x cp {cp} ({where})"


__all__ = ["MODELS", "GPUS", "SCHEDULERS", "PHASES", "TIMELINE_COLUMNS", "ModelPreset", "GPUPreset", "SimConfig",
           "default_cp", "simulate", "simulate_with_timelines", "write_timeline", "recommend", "mesh_description"]
