"""Ping-pong: two nano-batches through one layer, one's attention transfers hidden behind the other's compute.

DistCA splits a rank's micro-batch into two nano-batches: while nano-batch 0's
Q/K/V are in flight to the ranks that compute its attention, nano-batch 1 runs
its pre-attention layers, and so on (the paper measured 10-17% lost without
it). Each nano-batch is its own packed sequence with its own ``cad`` plan::

    docs_a, docs_b, cut = split_nano_batches(doc_lens)        # x[:cut] and x[cut:]
    plans = [distattn.plan(docs_a, group, scheduler="cad"), distattn.plan(docs_b, group, scheduler="cad")]
    ys = ping_pong(pre, post, [plans[0].shard(x[:cut]), plans[1].shard(x[cut:])], plans)

``pre(x) -> (q, k, v)`` and ``post(attn_out, x) -> y`` are the layer's parts
before and after core attention; everything stays differentiable (the
backward runs as usual, without overlap).
"""

from __future__ import annotations

from typing import Callable, Sequence

from .api import attention
from .masks import as_doc_lens


def split_nano_batches(doc_lens) -> tuple[list[int], list[int], int]:
    """Cut a packed sequence at the document boundary closest to half its tokens (a single
    document is cut in the middle). Returns both halves' document lengths and the cut."""
    lens = list(as_doc_lens(doc_lens))
    total = sum(lens)
    if total < 2:
        raise ValueError("split_nano_batches needs at least 2 tokens")
    ends = [sum(lens[: i + 1]) for i in range(len(lens) - 1)]
    cut = min(ends, key=lambda e: abs(e - total / 2)) if ends else total // 2
    if not ends or abs(cut - total / 2) > total / 4:  # no boundary near the middle: cut a document
        cut = total // 2
    head, tail, acc = [], [], 0
    for n in lens:
        if acc + n <= cut:
            head.append(n)
        elif acc >= cut:
            tail.append(n)
        else:
            head.append(cut - acc)
            tail.append(acc + n - cut)
        acc += n
    return head, tail, cut


def ping_pong(pre: Callable, post: Callable, xs: Sequence, plans: Sequence, scale: float | None = None) -> list:
    """Run nano-batches ``xs`` (this rank's shards) through ``pre`` -> attention -> ``post`` so that
    nano-batch ``i+1``'s ``pre`` overlaps nano-batch ``i``'s attention all-to-all."""
    if len(xs) != len(plans) or not xs:
        raise ValueError(f"ping_pong needs one plan per nano-batch, got {len(xs)} inputs and {len(plans)} plans")
    qkv = [pre(xs[0])]
    started = [plans[0].prefetch(*qkv[0])]
    outs = []
    for i in range(len(xs)):
        if i + 1 < len(xs):
            qkv.append(pre(xs[i + 1]))
            started.append(plans[i + 1].prefetch(*qkv[i + 1]))
        outs.append(post(attention(*qkv[i], plans[i], scale=scale, prefetch=started[i]), xs[i]))
    return outs
