"""Ping-pong overlap on CPU: a toy layer (QKV and output projections around ``cad`` attention) run on
two nano-batches one after the other, and with :func:`distattn.runtime.pingpong.ping_pong`, in one run.

    python -m distattn.bench.cad_pingpong [--world-size 4] [--seq-len 16384] [--repeats 5]

Prints, for the forward alone and for forward + backward, ms (slowest rank, median) of both, the
share saved and the largest difference (outputs; and input and weight gradients). ``ping_pong``
hides every all-to-all of ``cad`` (forward: Q/K/V out, out back; backward: dout out, dQ/dK/dV
back) behind the other nano-batch's compute; gloo runs the all-to-all on its own thread beside it.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist

from ..runtime.api import attention, plan
from ..planning.doclens import pack
from ..runtime.pingpong import ping_pong, split_nano_batches
from ..distributed.spawn import run_distributed
from ..distributed.timing import slowest_rank, time_interleaved


def _layer(hidden: int, heads: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    w_qkv = (torch.randn(hidden, 3 * hidden, generator=g) / hidden ** 0.5).requires_grad_()
    w_out = (torch.randn(hidden, hidden, generator=g) / hidden ** 0.5).requires_grad_()

    def pre(x):
        q, k, v = (x @ w_qkv).chunk(3, dim=-1)
        return tuple(t.reshape(t.shape[0], heads, -1).contiguous() for t in (q, k, v))

    def post(o, x):
        return x + o.reshape(o.shape[0], -1) @ w_out

    return pre, post, [w_qkv, w_out]


def _rank_main(doc_lens, hidden, heads, repeats):
    group = dist.group.WORLD
    docs_a, docs_b, cut = split_nano_batches(doc_lens)
    plans = [plan(docs_a, group, scheduler="cad"), plan(docs_b, group, scheduler="cad")]
    x = torch.randn(sum(doc_lens), hidden, generator=torch.Generator().manual_seed(0))
    xs = [plans[0].shard(x[:cut]), plans[1].shard(x[cut:])]
    pre, post, params = _layer(hidden, heads, 1)

    def sequential(inputs):
        return [post(attention(*pre(xi), p), xi) for xi, p in zip(inputs, plans)]

    def overlapped(inputs):
        return ping_pong(pre, post, inputs, plans)

    def with_backward(layer):
        def run():
            for p in params:
                p.grad = None
            inputs = [xi.detach().requires_grad_() for xi in xs]
            ys = layer(inputs)
            sum(y.sum() for y in ys).backward()
            return [y.detach() for y in ys] + [xi.grad for xi in inputs] + [p.grad for p in params]
        return run

    out = {}
    with torch.no_grad():
        # alternating the two so drift hits both alike; the first round warms up connections and caches
        fwd = time_interleaved([lambda: sequential(xs), lambda: overlapped(xs)], repeats, warmup=1, barrier=True,
                               group=group)
    both = time_interleaved([with_backward(sequential), with_backward(overlapped)], repeats, warmup=1, barrier=True,
                            group=group)
    for name, (seq, pp) in (("forward", fwd), ("forward+backward", both)):
        diff = max((a - b).abs().max().item() for a, b in zip(pp.result, seq.result))
        seq_ms, pp_ms = (1e3 * s for s in slowest_rank([seq.median, pp.median], group))
        out[name] = {"sequential_ms": seq_ms, "ping_pong_ms": pp_ms, "max_diff": diff}
    return out


def run(world_size=4, seq_len=16384, hidden=512, heads=8, repeats=5) -> dict:
    """``{"forward": {...}, "forward+backward": {...}}``, each with ``sequential_ms``,
    ``ping_pong_ms`` and ``max_diff``."""
    docs = pack(seq_len, median=max(1, seq_len // 4), seed=0)
    return run_distributed(_rank_main, world_size, docs, hidden, heads, repeats, timeout=900,
                           threads_per_rank=max(1, torch.get_num_threads() // world_size))[0]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=16384)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    results = run(args.world_size, args.seq_len, repeats=args.repeats)
    for name, r in results.items():
        saved = 1 - r["ping_pong_ms"] / r["sequential_ms"]
        print(f"{name}:")
        print(f"{'sequential ms':>14} {'ping-pong ms':>13} {'saved':>6} {'max diff':>9}")
        print(f"{r['sequential_ms']:>14.1f} {r['ping_pong_ms']:>13.1f} {saved:>6.1%} {r['max_diff']:>9.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
