"""Ping-pong: nano-batches through the layers, each one's attention transfers hidden behind the others' compute.

DistCA splits a rank's micro-batch into two nano-batches: while nano-batch A's Q/K/V are in flight
to the ranks that compute its attention, nano-batch B runs its context-independent layers (the
output projection and MLP of the layer before, its QKV projection), and so on (the paper measured
10-17% lost without it). Each nano-batch is its own packed sequence of whole documents with its
own plan::

    docs_a, docs_b, cut = split_nano_batches(doc_lens)        # x[:cut] and x[cut:]
    plans = [distattn.plan(docs_a, group, scheduler="cad"), distattn.plan(docs_b, group, scheduler="cad")]
    ys = ping_pong(pre, post, [plans[0].shard(x[:cut]), plans[1].shard(x[cut:])], plans)   # one layer
    ys = run_layers(layers, xs, plans)                        # a stack, interleaved across layers

:func:`run_layers` runs the *pieces* of every layer -- a nano-batch's ``pre`` (its QKV projection),
the attention stages ``dispatch``, ``compute``, ``finish``, its ``post`` (output projection and
MLP) -- in the order :func:`distattn.planning.program.layer_order` gives (its docstring draws it; the
simulator replays the same order, :mod:`distattn.sim.replay`). The stages are the executor's
(:class:`distattn.executors.base.Executor`): ``cad``'s dispatch starts Q and K/V on every hop to
the workers, compute waits for them, runs the tasks and starts out back, finish waits for out;
``ulysses``/``usp`` start K/V and the first head group's Q to heads at dispatch and wait for the
last out at finish; the ring family starts its first K/V step at dispatch (and waits for the last
dK/dV at the backward's finish); ``allgather`` starts its first gather at dispatch (and waits for
the reduce-scatters at the backward's finish). An executor without stages (``local``) runs its
whole attention at ``compute``. :func:`ping_pong` is one layer, its nano-batches interleaved inside it.

How the backward gets the mirrored order: each nano-batch's attention is three autograd nodes, one
per stage (:class:`_Dispatch`, :class:`_Compute`, :class:`_Finish`, chained by empty token
tensors), whose backwards are the backward stages (finish -> start dout, compute -> attention
backward, dispatch -> wait for the gradients); each keeps what its stage saves through
``save_for_backward`` (:func:`_stash`), so checkpointing's hooks see it. PyTorch's engine runs the
ready node created last first (it orders its ready queue by creation sequence number), so over a
graph built in the forward order it runs exactly the reverse order. ``pre`` and ``post`` stay
ordinary autograd graphs: their parameters get ``.grad`` (or ``torch.autograd.grad`` results)
exactly as without ping-pong, and hooks, DDP, FSDP2 and checkpointing see nothing special.
``tests/test_cad_overlap.py`` and ``tests/test_staged_overlap.py`` check the order.
"""

from __future__ import annotations

from typing import Callable, Protocol, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable
from torch.utils._pytree import tree_flatten, tree_unflatten

from .api import attention
from ..kernels.registry import check_scale, check_sinks, check_softcap
from ..planning.masks import as_doc_lens
from ..planning.program import layer_order


def _pairs(lens: np.ndarray, causal: bool) -> np.ndarray:
    """Visible query-key pairs of each document."""
    return lens * (lens + 1) // 2 if causal else lens * lens


def split_nano_batches(doc_lens, pair_weight: float = 0.0, causal: bool = True) -> tuple[list[int], list[int], int]:
    """Cut a packed sequence into two nano-batches of whole documents (a cut inside a document would
    change its attention), at the document boundary that balances the two halves' work: tokens
    (the linear layers) plus ``pair_weight`` per visible query-key pair (attention;
    :meth:`distattn.costmodel.model_shape.ModelShape.pair_weight` gives a model's). Returns both halves' document lengths and the cut (the
    first half is ``x[:cut]``). ``ValueError`` for a single document."""
    lens = np.asarray(as_doc_lens(doc_lens), dtype=np.int64)
    if len(lens) < 2:
        raise ValueError(f"split_nano_batches needs at least 2 documents (a cut inside one would change its "
                         f"attention), got {len(lens)}; run a single document as one nano-batch")
    work = lens + pair_weight * _pairs(lens, causal)
    before = np.cumsum(work)[:-1]
    i = int(np.argmin(np.maximum(before, work.sum() - before)))   # the first i + 1 documents go first
    return lens[:i + 1].tolist(), lens[i + 1:].tolist(), int(lens[:i + 1].sum())


def nano_batches(doc_lens, count: int, pair_weight: float = 0.0,
                 causal: bool = True) -> list[tuple[list[int], int, int]]:
    """A packed sequence as ``count`` (1 or 2) nano-batches, ``(doc_lens, start, end)`` each: one if
    it has one document, else :func:`split_nano_batches`' halves, the one with more attention first
    -- :func:`run_layers` hides the first one's Q/K/V and dQ/dK/dV behind the other's linear layers
    and the second one's only behind the first one's attention (:func:`distattn.planning.program.layer_order`),
    and the more attention a nano-batch has, the more K/V ``cad`` moves for it."""
    lens = [int(n) for n in as_doc_lens(doc_lens)]
    if count == 1 or len(lens) < 2:
        return [(lens, 0, sum(lens))]
    head, tail, cut = split_nano_batches(lens, pair_weight, causal)
    parts = [(head, 0, cut), (tail, cut, sum(lens))]
    return sorted(parts, key=lambda part: -int(_pairs(np.asarray(part[0], dtype=np.int64), causal).sum()))


def all_ranks(can: bool, group, device) -> bool:
    """Whether ``can`` holds on every rank of ``group`` (one MIN all-reduce): ranks whose documents
    differ (replicas) must cut alike -- a pooled plan is a collective over them -- so a micro-batch
    of one document anywhere runs as one nano-batch everywhere."""
    flag = torch.tensor([int(can)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    return bool(flag.item())


class _Flight:
    """One nano-batch's attention between its stages: the executor, its kernel options and the
    transfer in flight."""

    __slots__ = ("executor", "scale", "softcap", "pending")

    def __init__(self, executor, scale: float, softcap: float | None = None):
        self.executor, self.scale, self.softcap, self.pending = executor, scale, softcap, None

    def take(self):
        pending, self.pending = self.pending, None
        return pending


def _stash(ctx, state, *extra: torch.Tensor) -> None:
    """Keep ``state`` (a stage's pytree) and ``extra`` tensors for the backward: the tensors through
    ``save_for_backward`` (so checkpointing and saved-tensor hooks see them), the rest in ``ctx``."""
    leaves, ctx.spec = tree_flatten(state)
    ctx.tensor_at = [isinstance(x, torch.Tensor) for x in leaves]
    ctx.plain = [None if t else x for x, t in zip(leaves, ctx.tensor_at)]
    ctx.save_for_backward(*(x for x, t in zip(leaves, ctx.tensor_at) if t), *extra)


def _unstash(ctx) -> tuple:
    """``(state, extra tensors)`` as :func:`_stash` kept them (the saved tensors unpacked once:
    checkpointing recomputes on every unpack)."""
    tensors = iter(ctx.saved_tensors)
    leaves = [next(tensors) if t else x for x, t in zip(ctx.plain, ctx.tensor_at)]
    return tree_unflatten(leaves, ctx.spec), tuple(tensors)


class _Dispatch(torch.autograd.Function):
    """Forward: start what the computation needs. Backward: wait for dQ, dK/dV."""

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


class _Compute(torch.autograd.Function):
    """Forward: wait for the inputs, attention (the sinks counted in the rows this rank computes),
    start the way back; keeps what the compute stage saves. Backward: wait for what the backward
    needs, attention backward, start the gradients back; the sinks' gradient over this rank's rows
    (see :func:`distattn.attention`)."""

    @staticmethod
    def forward(ctx, flight: _Flight, token, sinks):
        sinks = None if sinks is None else sinks.detach()
        returning = flight.executor.compute_forward(flight.take(), flight.scale, flight.softcap, sinks)
        flight.pending = returning
        ctx.flight, ctx.has_sinks = flight, sinks is not None
        _stash(ctx, returning.saved, *([sinks] if sinks is not None else []))
        return token.new_empty(0)

    @staticmethod
    @once_differentiable
    def backward(ctx, token):
        flight = ctx.flight
        saved, extra = _unstash(ctx)
        sinks = extra[0] if ctx.has_sinks else None
        returning = flight.executor.compute_backward(flight.take(), saved, flight.scale, flight.softcap, sinks)
        flight.pending = returning
        dsinks = None if returning.dsinks is None else returning.dsinks.to(sinks.dtype)
        return None, token, dsinks


class _Finish(torch.autograd.Function):
    """Forward: wait for out; keeps what the finish stage saves (``cad resend``, ring, allgather: the
    rank's own q, k, v, out and lse). Backward: start what the backward needs on its way."""

    @staticmethod
    def forward(ctx, flight: _Flight, token, q, k, v):
        out, owned = flight.executor.finish_forward(flight.take(), q.detach(), k.detach(), v.detach())
        ctx.flight = flight
        _stash(ctx, owned)
        ctx.token = (token.shape, token.dtype, token.device)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        owned, _ = _unstash(ctx)
        ctx.flight.pending = ctx.flight.executor.start_backward(dout.contiguous(), owned)
        shape, dtype, device = ctx.token
        return None, torch.empty(shape, dtype=dtype, device=device), None, None, None


class Layer(Protocol):
    """What :func:`run_layers` needs of a layer: its pieces around attention, for nano-batch ``n``."""

    def pre(self, x: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
        """``x`` -> ``q [S_local, Hq, D]``, ``k``/``v`` ``[S_local, Hkv, D]`` and the keyword arguments of
        the layer's :func:`distattn.attention` (``scale``, ``sinks``, ``softcap``): made here, where a
        sharded layer (FSDP2) has its parameters -- the sinks are one."""

    def post(self, x: torch.Tensor, attn_out: torch.Tensor, n: int) -> torch.Tensor:
        """The residual stream after the layer, given its input and the attention output ``[S_local, Hq, D]``."""


class NanoBatch:
    """One nano-batch's state between pieces (:func:`run_piece`): its residual stream ``x``, its
    q/k/v and attention arguments after ``pre``, its attention in flight, its attention output
    before ``post``."""

    __slots__ = ("x", "qkv", "args", "flight", "token", "out")

    def __init__(self, x):
        self.x, self.qkv, self.args, self.flight, self.token, self.out = x, None, None, None, None, None


def run_piece(piece: str, layer: Layer, plan, nano: NanoBatch, n: int) -> None:
    """Run one piece (:data:`distattn.planning.program.PIECES`) of ``layer`` for nano-batch ``n``, whose state
    is ``nano`` and whose plan is ``plan`` (module docstring). :func:`run_layers` calls it in
    :func:`distattn.planning.program.layer_order`; a framework whose layers run one at a time (Megatron's
    ``TransformerBlock``) calls it for each layer's share of that order."""
    if piece == "pre":
        *nano.qkv, nano.args = layer.pre(nano.x, n)
        return
    if piece == "post":
        nano.x, nano.out = layer.post(nano.x, nano.out, n), None
        return
    # attention runs as written (its kernels accumulate in fp32): autocast would push them to bf16
    with torch.autocast(nano.x.device.type, enabled=False):
        runtime = plan._live("attention")
        if not runtime.executor.staged:   # no stages: the whole attention at ``compute``
            if piece == "compute":
                nano.out, nano.qkv = attention(*nano.qkv, plan, **nano.args), None
            return
        sinks = nano.args.get("sinks")
        if piece == "dispatch":
            q, k, v = nano.qkv
            softcap = check_softcap(nano.args.get("softcap"))
            runtime.check_inputs(q, k, v, sinks=check_sinks(sinks, q), softcap=softcap)
            scale = nano.args.get("scale")
            nano.flight = _Flight(runtime.executor, check_scale(scale, q.shape[-1]), softcap)
            nano.qkv = runtime.to_compute_order(q, k, v)
            nano.token = _Dispatch.apply(nano.flight, *nano.qkv)
        elif piece == "compute":
            nano.token = _Compute.apply(nano.flight, nano.token, sinks)
        else:
            assert piece == "finish", piece
            nano.out = runtime.to_compute_order(_Finish.apply(nano.flight, nano.token, *nano.qkv), back=True)[0]
            nano.flight = nano.token = nano.args = nano.qkv = None


def run_layers(layers: Sequence[Layer], xs: Sequence[torch.Tensor], plans: Sequence, order=None) -> list:
    """Run nano-batches ``xs`` (this rank's shards, ``plans[i].shard(...)``) through ``layers``,
    differentiably, in ``order`` (default :func:`distattn.planning.program.layer_order` of the layers and
    nano-batches: interleaved across layers), each nano-batch's attention transfers hidden behind
    the other nano-batches' compute in forward and backward (module docstring). Returns each
    nano-batch's output: the same values and gradients as running them one after the other."""
    if len(xs) != len(plans) or not xs:
        raise ValueError(f"run_layers needs one plan per nano-batch, got {len(xs)} inputs and {len(plans)} plans")
    nanos = [NanoBatch(x) for x in xs]
    for piece, n, index in order if order is not None else layer_order(len(layers), len(xs)):
        run_piece(piece, layers[index], plans[n], nanos[n], n)
    return [nano.x for nano in nanos]


class _Functions:
    """:class:`Layer` from ``pre(x)``/``post(attn_out, x)`` functions (:func:`ping_pong`)."""

    def __init__(self, pre: Callable, post: Callable, args: dict):
        self._pre, self._post, self._args = pre, post, args

    def pre(self, x, n):
        return (*self._pre(x), self._args)

    def post(self, x, attn_out, n):
        return self._post(attn_out, x)


def ping_pong(pre: Callable, post: Callable, xs: Sequence, plans: Sequence, scale: float | None = None, *,
              sinks: torch.Tensor | None = None, softcap: float | None = None) -> list:
    """One layer: nano-batches ``xs`` (this rank's shards, ``plans[i].shard(...)``) through ``pre`` ->
    attention -> ``post``, differentiably, interleaved inside the layer (``pre0; start 0; pre1; start
    1; compute 0; compute 1; finish 0, post0; finish 1, post1`` and its mirror in backward:
    :func:`distattn.planning.program.layer_order` with ``across_layers=False``).

    Args:
        pre: ``pre(x) -> (q, k, v)``, ``q`` ``[S_local, Hq, D]``, ``k``/``v`` ``[S_local, Hkv, D]``.
        post: ``post(attn_out, x) -> y``, ``attn_out`` ``[S_local, Hq, D]`` in q's dtype.
        xs: one input per nano-batch.
        plans: one plan per nano-batch (its own packed sequence), made on every rank alike.
        scale: softmax scale, default ``1/sqrt(D)``.
        sinks, softcap: as in :func:`distattn.attention` (the layer's, the same for every
            nano-batch); the sinks' gradient on a rank is its share, as there.

    Returns:
        ``[post(attention(*pre(x), plan, sinks=sinks, softcap=softcap), x) for x, plan in zip(xs, plans)]``,
        the same values and gradients as that sequential loop.
    """
    layer = _Functions(pre, post, {"scale": scale, "sinks": sinks, "softcap": softcap})
    return run_layers([layer], xs, plans, layer_order(1, len(xs), across_layers=False))
