"""Stripe beside ring, side by side in one run on gloo:

    python -m distattn.bench.stripe [--world-sizes 2 4] [--seq-lens 4096 16384] [--repeats 3]

One causal row of ``--seq-lens`` tokens, 8 query and 2 key/value heads of 64, fp32, forward and
backward; each rank holds its split of the row (stripe: tokens ``r, r + P, ...``; ring: the ``r``-th
contiguous chunk). Three runs: ring-flash-attention's ``ring_flash_attn_func`` and
``stripe_flash_attn_func`` as ``distattn.compat`` runs them, and the core API's
``distattn.plan(..., scheduler="ring", layout=Layout.from_indices(stripe))``. Prints each one's median
fwd+bwd seconds (the slowest rank's) and each stripe / ring. Both stripes run one kernel call per
(query rank, key rank) block with a shifted causal band (:mod:`distattn.planning.strided`), not a segment per
token.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from ..distributed.spawn import run_distributed
from ..distributed.timing import slowest_rank, time_interleaved

HEADS, KV_HEADS, HEAD_DIM = 8, 2, 64


def _rank(seq_len: int, repeats: int) -> list[float]:
    import torch.distributed as dist

    import distattn
    from ..compat import ring_flash_attn as rfa
    from ..planning.layout import Layout

    r, p = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(0)
    full = [torch.randn(1, seq_len, h, HEAD_DIM, generator=g) for h in (HEADS, KV_HEADS, KV_HEADS, HEADS)]
    n = seq_len // p
    splits = {"ring": lambda t: t[:, r * n:(r + 1) * n], "stripe": lambda t: t[:, r::p]}

    def step(name):
        q, k, v, dout = (splits[name](t).contiguous() for t in full)
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        fn = rfa.stripe_flash_attn_func if name == "stripe" else rfa.ring_flash_attn_func
        return lambda: fn(q, k, v, causal=True).backward(dout)

    def core():   # the same stripe through distattn.plan's layout=, tensors [S_local, H, D]
        layout = Layout.from_indices([list(range(s, seq_len, p)) for s in range(p)])
        plan = distattn.plan([seq_len], dist.group.WORLD, scheduler="ring", layout=layout)
        q, k, v, dout = (splits["stripe"](t)[0].contiguous() for t in full)
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        return lambda: distattn.attention(q, k, v, plan).backward(dout)

    timings = time_interleaved([step("ring"), step("stripe"), core()], repeats, warmup=1, barrier=True)
    return slowest_rank([statistics.median(t.seconds) for t in timings])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m distattn.bench.stripe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    for p in args.world_sizes:
        for n in args.seq_lens:
            if p < 1 or n % p or args.repeats < 1:
                raise ValueError(f"--seq-lens {n} must be a multiple of each world size ({p}), --repeats >= 1")
    print(f"{'ranks':>5} {'tokens':>7} {'ring s':>8} {'stripe s':>9} {'stripe / ring':>14} {'core stripe s':>14} "
          f"{'core / ring':>12}", flush=True)
    for p in args.world_sizes:
        for n in args.seq_lens:
            ring, stripe, core = run_distributed(_rank, p, n, args.repeats, timeout=1800)[0]
            print(f"{p:>5} {n:>7} {ring:>8.3f} {stripe:>9.3f} {stripe / ring:>14.2f} {core:>14.3f} "
                  f"{core / ring:>12.2f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
