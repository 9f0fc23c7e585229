"""``distattn simulate --calibrate RESULTS``: the simulator's prediction of ``distattn bench`` rows.

The machine is measured independently of the bench: the attention FLOP/s of one process using
every core (a causal fwd+bwd on this machine), and the collectives by ``cluster probe`` on gloo at
the bench's world sizes (or a given profile). Ranks share the cores, so each gets
``min(1, cores / world)`` of that rate. Every bench row is replayed with the same dry plan and
communication model as :func:`distattn.sim.simulate.simulate` (attention only, no linear layers)
and the error ``predicted / measured - 1`` is reported per row and per scheduler.
"""

from __future__ import annotations

import os
import statistics
import time

import numpy as np
import torch

from ..api import local_attention
from ..bench.suite import case_flops, mask_case
from ..schedulers.usp import default_ulysses_degree
from .simulate import ModelPreset, SimConfig, comm_time, dry_stats


def attention_rate(seq_len: int = 2048, heads: int = 8, kv_heads: int = 4, head_dim: int = 64,
                   repeats: int = 3) -> float:
    """fwd+bwd attention FLOP/s of this process (fp32, one causal document)."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(seq_len, heads, head_dim, generator=g)
    k, v = (torch.randn(seq_len, kv_heads, head_dim, generator=g) for _ in "kv")
    times = []
    for _ in range(repeats + 1):
        x = [t.clone().requires_grad_() for t in (q, k, v)]
        t0 = time.perf_counter()
        local_attention(*x, [seq_len], causal=True).sum().backward()
        times.append(time.perf_counter() - t0)
    return case_flops([seq_len], True, None, heads, head_dim) / statistics.median(times[1:])


def predict_row(row: dict, rate: float, network, cores: int, pool=None, seed: int = 0) -> float:
    """Predicted fwd+bwd ms of one bench row."""
    p = row["world_size"]
    docs, causal, window = mask_case(row["mask"], row["seq_len"], pool, seed)
    model = ModelPreset("bench", 1, row["heads"] * row["head_dim"], row["heads"], row["kv_heads"], 0, 0)
    name = {"deepspeed-ulysses": "ulysses", "local": "ring"}.get(row["scheduler"], row["scheduler"])
    u = default_ulysses_degree(p, row["kv_heads"])
    elem = 4 if row["dtype"] == "fp32" else 2
    st = dry_stats(name, docs, p, model, u, elem, causal, window)
    attn_fwd = np.asarray(st["flops"], dtype=np.float64) / (rate * min(1.0, cores / p))
    tokens = np.asarray(st["tokens"], dtype=np.float64)
    cfg = SimConfig(model, p, row["seq_len"], p, gpus_per_node=p, elem_bytes=elem, ulysses_degree=u)
    _, exposed = comm_time(name, cfg, network, st, attn_fwd, np.zeros_like(tokens), tokens, u) if p > 1 \
        else (None, np.zeros_like(tokens))
    return float(np.max(3.5 * attn_fwd + exposed)) * 1e3


def calibrate(rows: list[dict], network, rate: float | None = None, cores: int | None = None, pool=None,
              seed: int = 0) -> tuple[list[dict], dict[str, float], float]:
    """(rows with ``predicted_ms`` and ``error``, median |error| per scheduler, the FLOP/s used)."""
    rate = rate or attention_rate()
    cores = cores or os.cpu_count() or 1
    out = []
    for r in rows:
        pred = predict_row(r, rate, network, cores, pool, seed)
        out.append(dict(r, predicted_ms=pred, error=pred / r["fwd_bwd_ms"] - 1))
    per = {}
    for name in sorted({r["scheduler"] for r in out}):
        per[name] = statistics.median(abs(r["error"]) for r in out if r["scheduler"] == name)
    return out, per, rate
