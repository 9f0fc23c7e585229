"""``distattn demo``: every scheduler on N local gloo processes vs single-device fp64.

Each rank builds the same seeded packed batch, runs ``distattn.attention``
forward and backward on its shard, and compares the gathered result with
attention of the whole sequence computed on one device in fp64. Rank 0
reports the max errors and the fwd+bwd time (slowest rank, median of repeats).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..runtime.api import attention, dry_plan, plan
from ..planning.doclens import pack
from ..kernels import attn_bwd, attn_fwd, available_backends
from ..planning.masks import as_doc_lens, cu_seqlens
from ..schedulers import LOCAL, NAMES, PlanContext
from ..distributed.spawn import run_distributed
from ..distributed.timing import slowest_median, time_calls

DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.bfloat16, "fp16": torch.float16}


def _inputs(seq_len, heads, kv_heads, head_dim, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(seq_len, heads, head_dim, generator=g, dtype=torch.float64)
    k = torch.randn(seq_len, kv_heads, head_dim, generator=g, dtype=torch.float64)
    v = torch.randn(seq_len, kv_heads, head_dim, generator=g, dtype=torch.float64)
    dout = torch.randn(seq_len, heads, head_dim, generator=g, dtype=torch.float64)
    return q, k, v, dout


def _rank_main(schedulers, doc_lens, heads, kv_heads, head_dim, dtype_name, causal, window, backend, repeats,
               seed, ulysses_degree):
    group = dist.group.WORLD
    dtype = DTYPES[dtype_name]
    # the reference sees the same (rounded) inputs: errors measure the computation alone
    q64, k64, v64, dout64 = (t.to(dtype).double() for t in _inputs(sum(doc_lens), heads, kv_heads, head_dim, seed))
    cu = cu_seqlens(doc_lens)
    ref_out, ref_lse = attn_fwd(q64, k64, v64, cu, cu, causal=causal, window=window, backend="torch")
    ref = (ref_out, *attn_bwd(dout64, q64, k64, v64, ref_out, ref_lse, cu, cu, causal=causal, window=window,
                              backend="torch"))
    rows = []
    for name in schedulers:
        context = PlanContext(heads, kv_heads, head_dim=head_dim, dtype_bytes=dtype.itemsize,
                              ulysses_degree=ulysses_degree)
        p = plan(doc_lens, group, scheduler=name, causal=causal, window=window, backend=backend, context=context)
        q, k, v, dout = (p.shard(t).to(dtype) for t in (q64, k64, v64, dout64))

        def step(x):
            out = attention(*x, p)
            out.backward(dout)
            return out, x

        # fresh leaves every call, made outside the timed span; the first call sets up connections: not timed
        timing = time_calls(step, repeats, warmup=1, barrier=True, group=group,
                            setup=lambda: tuple(t.detach().requires_grad_() for t in (q, k, v)))
        out, (q_, k_, v_) = timing.result
        got = [p.unshard(t.detach()) for t in (out, q_.grad, k_.grad, v_.grad)]
        row = {"scheduler": name, "world_size": dist.get_world_size(group), "dtype": dtype_name,
               "ms": 1e3 * slowest_median(timing.seconds, group)}
        for key, g, r in zip(("out", "dq", "dk", "dv"), got, ref):
            diff = g.double() - r
            row[f"err_{key}"] = diff.abs().max().item()                        # max |error|
            row[f"rms_{key}"] = (diff.norm() / r.norm().clamp_min(1e-300)).item()  # relative RMS error
        rows.append(row)
    return rows


def _check(world_size, schedulers, doc_lens, heads, kv_heads, causal, window, backend, ulysses_degree) -> None:
    """Refuse here, before any rank starts, what the ranks would refuse: dry plans of every scheduler."""
    if heads < 1 or kv_heads < 1 or heads % kv_heads:
        raise ValueError(f"--kv-heads {kv_heads} must divide --heads {heads} (grouped-query attention)")
    if backend != "auto" and backend not in available_backends():
        raise ValueError(f"--backend {backend!r} is unknown; choose auto or one of {available_backends()}")
    for name in schedulers:
        dry_plan(doc_lens, world_size, scheduler=name, causal=causal, window=window,
             context=PlanContext(heads, kv_heads, ulysses_degree=ulysses_degree))


def run_demo(world_size: int = 4, schedulers: list[str] | None = None, seq_len: int = 4096,
             doc_lens: list[int] | None = None, heads: int = 8, kv_heads: int = 2, head_dim: int = 64,
             dtype: str = "fp32", causal: bool = True, window: int | None = None, backend: str = "auto",
             repeats: int = 3, seed: int = 0, ulysses_degree: int | None = None, timeout: float = 600.0
             ) -> list[dict]:
    """Run the demo and return one row per scheduler (see module docstring)."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    # on one rank every scheduler is the local one
    available = [*NAMES, LOCAL.name] if world_size == 1 else list(NAMES)
    schedulers = schedulers or (["local"] if world_size == 1 else available)
    unknown = [s for s in schedulers if s not in available]
    if unknown:
        raise ValueError(f"schedulers {unknown} cannot run at world size {world_size}; available: {available}")
    if doc_lens is not None:
        doc_lens = list(as_doc_lens(doc_lens))
    else:
        doc_lens = pack(seq_len, median=max(1, seq_len // 8), seed=seed)
    _check(world_size, schedulers, doc_lens, heads, kv_heads, causal, window, backend, ulysses_degree)
    return run_distributed(_rank_main, world_size, schedulers, doc_lens, heads, kv_heads, head_dim, dtype, causal,
                           window, backend, repeats, seed, ulysses_degree, timeout=timeout,
                           threads_per_rank=max(1, torch.get_num_threads() // world_size))[0]
