"""A batch of rows: one batched plan and one call against a plan per row and a call per row.

    python -m distattn.bench.batched                       # B=2, S=4096 per row, CP=2, gloo
    python -m distattn.bench.batched --batch 4 --seq-len 8192 --world-size 4

What the adapters did before batched plans (a loop over the rows of a micro-batch, each row its own
attention call and transfers) against what they do now (``distattn.plan([[...], [...]], group)``:
one call for every row). Per scheduler: fwd+bwd ms of the slowest rank (median of ``--repeats``,
both ways timed alternately in one run, so the machine's load falls on both), and their ratio.
Each row is one causal document; fp32, 8 query and 4 KV heads of 64.
"""

from __future__ import annotations

import argparse

from ..schedulers import NAMES


def _worker(schedulers, batch: int, seq_len: int, repeats: int) -> dict:
    import torch
    import torch.distributed as dist

    import distattn
    from distattn.schedulers import PlanContext
    from distattn.distributed.timing import slowest_rank, time_interleaved

    group, world = dist.group.WORLD, dist.get_world_size()
    g = torch.Generator().manual_seed(0)
    q = torch.randn(batch, seq_len, 8, 64, generator=g)
    k, v = (torch.randn(batch, seq_len, 4, 64, generator=g) for _ in range(2))
    result = {}
    for name in schedulers:
        context = PlanContext(8, 4, head_dim=64)
        batched = distattn.plan([[seq_len]] * batch, group, scheduler=name, context=context)
        single = distattn.plan([seq_len], group, scheduler=name, context=context)
        local = [batched.shard(t).requires_grad_() for t in (q, k, v)]
        rows = [[t[b].detach().clone().requires_grad_() for t in local] for b in range(batch)]

        def one_call():
            distattn.attention(*local, batched).sum().backward()

        def per_row():
            for qkv in rows:
                distattn.attention(*qkv, single).sum().backward()

        # alternating the two, so both see the same load; the first round warms up
        times = time_interleaved([per_row, one_call], repeats, warmup=1, barrier=True, group=group)
        per_row_s, batched_s = slowest_rank([t.median for t in times], group)
        result[name] = {"per_row": per_row_s, "batched": batched_s}
    return result


def main(argv=None) -> None:
    from ..distributed.spawn import run_distributed

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=4096, help="tokens per row")
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--schedulers", default=",".join(NAMES))
    args = parser.parse_args(argv)
    names = [s for s in args.schedulers.split(",") if s]
    unknown = sorted(set(names) - set(NAMES))
    if unknown:
        raise SystemExit(f"--schedulers: unknown {unknown}; choose from {list(NAMES)}")
    print(f"B={args.batch} rows of S={args.seq_len}, CP={args.world_size} (gloo), fwd+bwd, slowest rank, "
          f"median of {args.repeats}", flush=True)
    ranks = run_distributed(_worker, args.world_size, names, args.batch, args.seq_len, args.repeats, timeout=3600)
    print(f"{'scheduler':<10} {'per-row ms':>11} {'batched ms':>11} {'speedup':>8}")
    for name in names:
        per_row, batched = (ranks[0][name][way] * 1e3 for way in ("per_row", "batched"))
        print(f"{name:<10} {per_row:>11.1f} {batched:>11.1f} {per_row / batched:>7.2f}x")


if __name__ == "__main__":
    main()
