"""Ping-pong: nano-batches through one layer, each one's attention transfers hidden behind the others' compute.

DistCA splits a rank's micro-batch into two nano-batches: while nano-batch 0's
Q/K/V are in flight to the ranks that compute its attention, nano-batch 1 runs
its pre-attention layers, and so on (the paper measured 10-17% lost without
it). Each nano-batch is its own packed sequence with its own ``cad`` plan::

    docs_a, docs_b, cut = split_nano_batches(doc_lens)        # x[:cut] and x[cut:]
    plans = [distattn.plan(docs_a, group, scheduler="cad"), distattn.plan(docs_b, group, scheduler="cad")]
    ys = ping_pong(pre, post, [plans[0].shard(x[:cut]), plans[1].shard(x[cut:])], plans)

``pre(x) -> (q, k, v)`` and ``post(attn_out, x) -> y`` are the layer's parts
before and after core attention. Every transfer of ``cad``'s executor
(:mod:`distattn.executors.task_a2a`) is issued asynchronously before the other
nano-batch's computation and waited for after it. With two nano-batches::

    forward:  pre0; start Q,K/V 0; pre1; start Q,K/V 1; relay K/V 0; relay K/V 1;
              wait Q,K/V 0, attention 0, start out 0; wait Q,K/V 1, attention 1, start out 1;
              wait out 0, post0; wait out 1, post1
    backward: post1'; start dout 1; post0'; start dout 0;
              wait dout 1, attention 1', start dQ,dK/dV 1; wait dout 0, attention 0', start dQ,dK/dV 0;
              reduce dK/dV 1; reduce dK/dV 0; wait dQ,dK/dV 1, pre1'; wait dQ,dK/dV 0, pre0'

(``'``: backward; "relay" and "reduce" are group-cast's second hop inside a
node and group-reduce's sums at the relays, :mod:`distattn.schedulers.cad_cast`,
no-ops when no key goes through a relay). So each transfer hides behind the
other nano-batch's pre/post layers or attention; more nano-batches follow the
same pattern (all ``pre``, all relays, all attention, all ``post``).

How the backward gets that order: each nano-batch's attention is four autograd
nodes, one per stage (:class:`_Dispatch`, :class:`_Relay`, :class:`_Compute`, :class:`_Finish`,
chained by empty token tensors), whose backwards are the backward stages in
reverse (finish -> start dout, compute -> attention backward, relay -> reduce, dispatch -> wait
for the gradients). PyTorch's engine runs the ready node created last first
(it orders its ready queue by creation sequence number), so over a graph built
in the forward order above it runs exactly the reverse order: the backward
order above. ``pre`` and ``post`` stay ordinary autograd graphs: their parameters
get ``.grad`` (or ``torch.autograd.grad`` results) exactly as without
ping-pong, and hooks, DDP and checkpointing see nothing special.
``tests/test_cad_overlap.py`` checks the order.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch.autograd.function import once_differentiable

from .executors.task_a2a import WorkerSaved
from .kernels.registry import check_sinks, check_softcap
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


class _Flight:
    """One nano-batch's attention between its stages: the executor, its kernel options and the
    transfer in flight."""

    __slots__ = ("executor", "scale", "softcap", "pending")

    def __init__(self, executor, scale: float, softcap: float | None = None):
        self.executor, self.scale, self.softcap, self.pending = executor, scale, softcap, None

    def take(self):
        pending, self.pending = self.pending, None
        return pending


class _Dispatch(torch.autograd.Function):
    """Forward: start Q, K/V to the workers. Backward: wait for dQ, dK/dV."""

    @staticmethod
    def forward(ctx, flight: _Flight, q, k, v):
        flight.pending = flight.executor.prefetch(q, k, v)
        ctx.flight = flight
        return q.new_empty(0)

    @staticmethod
    @once_differentiable
    def backward(ctx, _token):
        dq, dk, dv = ctx.flight.executor.finish_backward(ctx.flight.take())
        return None, dq, dk, dv


class _Relay(torch.autograd.Function):
    """Forward: wait for K/V's first hop, start the relays' second (group-cast inside nodes).
    Backward: wait for the dK/dV partials at the relays, start their sums back (group-reduce)."""

    @staticmethod
    def forward(ctx, flight: _Flight, token):
        flight.pending = flight.executor.relay(flight.take())
        ctx.flight = flight
        return token.new_empty(0)

    @staticmethod
    @once_differentiable
    def backward(ctx, token):
        ctx.flight.pending = ctx.flight.executor.reduce(ctx.flight.take())
        return None, token


class _Compute(torch.autograd.Function):
    """Forward: wait for Q, K/V, attention (the sinks counted in the rows this slot computes), start
    out back. Backward: wait for dout, attention backward, start dQ, dK/dV back; the sinks' gradient
    over this slot's rows (see :func:`distattn.attention`)."""

    @staticmethod
    def forward(ctx, flight: _Flight, token, sinks):
        sinks = None if sinks is None else sinks.detach()
        returning = flight.executor.compute_forward(flight.take(), flight.scale, flight.softcap, sinks)
        flight.pending = returning
        saved = returning.saved
        ctx.flight, ctx.meta, ctx.has_sinks = flight, saved._replace(worker=None), sinks is not None
        ctx.save_for_backward(*saved.worker, *([sinks] if sinks is not None else []))
        return token.new_empty(0)

    @staticmethod
    @once_differentiable
    def backward(ctx, token):
        flight, n = ctx.flight, len(WorkerSaved._fields)
        worker, rest = WorkerSaved(*ctx.saved_tensors[:n]), ctx.saved_tensors[n:]
        sinks = rest[0] if ctx.has_sinks else None
        returning = flight.executor.compute_backward(flight.take(), ctx.meta._replace(worker=worker),
                                                     flight.scale, flight.softcap, sinks)
        flight.pending = returning
        dsinks = None if returning.dsinks is None else returning.dsinks.to(sinks.dtype)
        return None, token, dsinks


class _Finish(torch.autograd.Function):
    """Forward: wait for out. Backward: start dout to the workers."""

    @staticmethod
    def forward(ctx, flight: _Flight, token):
        out, _ = flight.executor.finish_forward(flight.take())
        ctx.flight = flight
        ctx.token = (token.shape, token.dtype, token.device)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        ctx.flight.pending = ctx.flight.executor.start_backward(dout.contiguous())
        shape, dtype, device = ctx.token
        return None, torch.empty(shape, dtype=dtype, device=device)


def ping_pong(pre: Callable, post: Callable, xs: Sequence, plans: Sequence, scale: float | None = None, *,
              sinks: torch.Tensor | None = None, softcap: float | None = None) -> list:
    """Run nano-batches ``xs`` (this rank's shards, ``plans[i].shard(...)``) through ``pre`` ->
    attention -> ``post``, differentiably, each nano-batch's attention transfers hidden behind the
    other nano-batches' compute in forward and backward (module docstring).

    Args:
        pre: ``pre(x) -> (q, k, v)``, ``q`` ``[S_local, Hq, D]``, ``k``/``v`` ``[S_local, Hkv, D]``.
        post: ``post(attn_out, x) -> y``, ``attn_out`` ``[S_local, Hq, D]`` in q's dtype.
        xs: one input per nano-batch.
        plans: one ``cad`` plan per nano-batch (its own packed sequence), made on every rank alike.
        scale: softmax scale, default ``1/sqrt(D)``.
        sinks, softcap: as in :func:`distattn.attention` (the layer's, the same for every
            nano-batch); the sinks' gradient on a rank is its share, as there.

    Returns:
        ``[post(attention(*pre(x), plan, sinks=sinks, softcap=softcap), x) for x, plan in zip(xs, plans)]``,
        the same values and gradients as that sequential loop.
    """
    if len(xs) != len(plans) or not xs:
        raise ValueError(f"ping_pong needs one plan per nano-batch, got {len(xs)} inputs and {len(plans)} plans")
    softcap = check_softcap(softcap)
    flights, tokens = [], []
    for x, plan in zip(xs, plans):
        q, k, v = pre(x)
        check_sinks(sinks, q)
        plan.check_inputs(q, k, v, sinks=sinks, softcap=softcap)
        flight = _Flight(plan.executor, float(q.shape[-1] ** -0.5 if scale is None else scale), softcap)
        flights.append(flight)
        # hidden behind the next pre / attention (in the executors' token order: see distattn.layout)
        tokens.append(_Dispatch.apply(flight, *plan.to_compute_order(q, k, v)))
    # K/V's hop inside the nodes hidden behind the other nano-batches' relays and attention
    tokens = [_Relay.apply(f, t) for f, t in zip(flights, tokens)]
    # out hidden behind the next attention / post
    tokens = [_Compute.apply(f, t, sinks) for f, t in zip(flights, tokens)]
    return [post(plan.to_compute_order(_Finish.apply(f, t), back=True)[0], x)
            for f, t, x, plan in zip(flights, tokens, xs, plans)]
