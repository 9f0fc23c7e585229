"""Ping-pong overlap on CPU: a toy layer (QKV and output projections around ``cad`` attention) run on
two nano-batches one after the other, and with :func:`distattn.pingpong.ping_pong`, in one run.

    python -m distattn.bench.cad_pingpong [--world-size 4] [--seq-len 16384] [--repeats 5]

Prints forward ms (slowest rank, median) of both and the share saved. Only the
forward overlaps; gloo runs the all-to-all on its own thread beside the compute.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist

from ..api import attention, plan
from ..doclens import pack
from ..pingpong import ping_pong, split_nano_batches
from ..spawn import run_distributed
from ..timing import slowest_rank, time_interleaved


def _layer(hidden: int, heads: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    w_qkv = torch.randn(hidden, 3 * hidden, generator=g) / hidden ** 0.5
    w_out = torch.randn(hidden, hidden, generator=g) / hidden ** 0.5

    def pre(x):
        q, k, v = (x @ w_qkv).chunk(3, dim=-1)
        return tuple(t.reshape(t.shape[0], heads, -1).contiguous() for t in (q, k, v))

    def post(o, x):
        return x + o.reshape(o.shape[0], -1) @ w_out

    return pre, post


def _rank_main(doc_lens, hidden, heads, repeats):
    group = dist.group.WORLD
    docs_a, docs_b, cut = split_nano_batches(doc_lens)
    plans = [plan(docs_a, group, scheduler="cad"), plan(docs_b, group, scheduler="cad")]
    x = torch.randn(sum(doc_lens), hidden, generator=torch.Generator().manual_seed(0))
    xs = [plans[0].shard(x[:cut]), plans[1].shard(x[cut:])]
    pre, post = _layer(hidden, heads, 1)

    def sequential():
        return [post(attention(*pre(xi), p), xi) for xi, p in zip(xs, plans)]

    def overlapped():
        return ping_pong(pre, post, xs, plans)

    with torch.no_grad():
        # alternating the two so drift hits both alike; the first round warms up connections and caches
        seq, pp = time_interleaved([sequential, overlapped], repeats, warmup=1, barrier=True, group=group)
    diff = max((a - b).abs().max().item() for a, b in zip(pp.result, seq.result))
    seq_ms, pp_ms = (1e3 * s for s in slowest_rank([seq.median, pp.median], group))
    return {"sequential_ms": seq_ms, "ping_pong_ms": pp_ms, "max_diff": diff}


def run(world_size=4, seq_len=16384, hidden=512, heads=8, repeats=5) -> dict:
    docs = pack(seq_len, median=max(1, seq_len // 4), seed=0)
    return run_distributed(_rank_main, world_size, docs, hidden, heads, repeats, timeout=900,
                           threads_per_rank=max(1, torch.get_num_threads() // world_size))[0]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=16384)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    r = run(args.world_size, args.seq_len, repeats=args.repeats)
    saved = 1 - r["ping_pong_ms"] / r["sequential_ms"]
    print(f"{'sequential ms':>14} {'ping-pong ms':>13} {'saved':>6} {'max diff':>9}")
    print(f"{r['sequential_ms']:>14.1f} {r['ping_pong_ms']:>13.1f} {saved:>6.1%} {r['max_diff']:>9.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
