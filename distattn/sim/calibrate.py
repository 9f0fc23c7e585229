"""``distattn simulate --calibrate RESULTS``: the simulator's prediction of ``distattn bench`` rows.

The machine is measured independently of the bench: the attention FLOP/s of one process using
every core (a causal fwd+bwd on this machine), and the collectives by ``cluster probe`` on gloo at
the bench's world sizes (or a given profile). Ranks share the cores, so each gets
``min(1, cores / world)`` of that rate. Every bench row is replayed with the same dry schedule and
communication model as :func:`distattn.sim.simulate.simulate` (attention only, no linear layers)
and the error ``predicted / measured - 1`` is reported per row and per scheduler.
"""

from __future__ import annotations

import os
import statistics

import numpy as np
import torch

from ..api import local_attention
from ..doclens import mask_case
from ..masks import document_flops
from ..schedule import AttnShape
from ..timing import time_calls
from .simulate import dry_schedule, layer_times


def attention_rate(seq_len: int = 2048, heads: int = 8, kv_heads: int = 4, head_dim: int = 64,
                   repeats: int = 3) -> float:
    """fwd+bwd attention FLOP/s of this process (fp32, one causal document)."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(seq_len, heads, head_dim, generator=g)
    k, v = (torch.randn(seq_len, kv_heads, head_dim, generator=g) for _ in "kv")
    # fresh leaves every call, copied outside the timed span; the first call warms up: not timed
    timing = time_calls(lambda x: local_attention(*x, [seq_len], causal=True).sum().backward(), repeats, warmup=1,
                        setup=lambda: [t.clone().requires_grad_() for t in (q, k, v)])
    return document_flops([seq_len], True, None, heads, head_dim) / timing.median


def predict_row(row: dict, rate: float, network, cores: int, pool=None, seed: int = 0) -> float:
    """Predicted fwd+bwd ms of one bench row."""
    p = row["world_size"]
    case = mask_case(row["mask"], row["seq_len"], pool, seed)
    name = {"deepspeed-ulysses": "ulysses", "local": "ring"}.get(row["scheduler"], row["scheduler"])
    schedule = dry_schedule(name, case.docs, p, row["kv_heads"], **case.plan_kwargs())
    shape = AttnShape(row["heads"], row["kv_heads"], row["head_dim"], 4 if row["dtype"] == "fp32" else 2)
    # every rank on its own node share of the machine's cores; the bench's world is one node
    t = layer_times(schedule.phases(shape), p, network, rate * min(1.0, cores / p), np.zeros(p))
    return float(np.max(t["attention"] + t["exposed"])) * 1e3


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
