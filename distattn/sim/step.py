"""A training step as the trainer runs it, as :mod:`.replay` operations: micro-batches, the layers'
pieces in the trainer's order, the recomputation its activation checkpointing runs, FSDP's
all-gathers and reduce-scatters, and tensor parallelism's collectives.

Per micro-batch (one after another, gradients accumulated):

* **forward**: :func:`distattn.planning.program.layer_order` -- nano-batches ping-ponged across layers, or,
  under ``full``/``offload`` checkpointing (which rerun a block whole), inside each layer; then the
  output layer and loss (``head``);
* **backward**: the pieces in reverse, each as its backward (a linear piece: twice its forward).
  ``selective`` first reruns each linear piece's forward (three times its forward); ``full`` and
  ``offload`` rerun each block's whole forward -- attention's transfers included, ping-pong inside
  the block -- right before its backward;
* **data parallelism** (``dp``, :mod:`.dp`): what ``parallel.dp_mode`` issues. ``fsdp`` and ``hsdp``
  as FSDP2 does, counted on gloo (``fully_shard`` per block, as the trainer wraps it): each block's
  parameters are gathered once per pass (forward; backward, its rerun included) before its first
  piece -- nano-batches' pieces called apart too: the trainer keeps the block unsharded from its first
  piece to its last (:mod:`distattn.train.model.transformer`) -- and its gradients reduce-scattered
  once, after its last piece's backward (``hsdp``: then all-reduced across the replicas, chained after
  it). Each gather is prefetched while the piece before computes (FSDP2 issues it from the CPU, which
  runs ahead of the GPU); the root's parameters (embedding, output layer) are gathered at the start and
  reduced at the end. ``ddp`` and ``zero1`` reduce their gradient buckets as they fill (after the
  output layer, after a block's last backward piece, the embedding's at the end); ``zero1``'s
  parameter all-gathers go in forward order, two at the step's start (the step before's optimizer
  step), each block of the first micro-batch's forward waiting for its buckets before it first runs
  and each wait sending the next, two in flight; the backward waits for ``zero1``'s oldest
  reduce-scatter before it sends a third. Reductions
  are issued in the last micro-batch (the ones before accumulate) and waited for at the step's end.
  A transfer over the dp x cp ranks spans every node and queues on the network card with the
  scheduler's inter-node transfers; ``hsdp``'s inside a node, on NVLink;
* **tensor parallelism** (``tp``): Megatron's sequence-parallel all-gather before each linear piece
  and reduce-scatter after it (two per piece, forward and backward), on NVLink, waited for at once.

Offload's copies to host memory run on a side stream and are not timed (they move 2 bytes per
hidden unit per token per layer over PCIe: a fraction of the block's compute).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..planning.program import BACKWARD_OF, CHAIN, RUN, START, WAIT, layer_order
from .dp import ZERO1_IN_FLIGHT, Collective, DataParallel
from ..distributed.trace import BACKWARD, FORWARD, TP, dp as dp_name
from .replay import Op

RECOMPUTE = {"none": 0, "selective": 1, "full": 1, "offload": 1}   # extra forwards of a linear piece
LINEAR = ("pre", "post")


@dataclass(frozen=True, eq=False)
class MicroBatch:
    """One micro-batch's timed pieces: per nano-batch ``n``, its attention ``programs[n]``
    (:class:`~.replay.TimedProgram`) and the per-rank forward seconds of its ``pre[n]`` and
    ``post[n]``; ``head``: the output layer and loss, forward and backward; ``tp[n]``: per rank, the
    seconds of one linear piece's tensor-parallel collectives (None: no TP)."""

    programs: list
    pre: list
    post: list
    head: np.ndarray
    tp: list | None = None


class _Gathers:
    """A sharded mode's all-gathers of one pass: each waited for before its piece, the next one started then."""

    def __init__(self, dp: DataParallel | None, tag: tuple, points: list[int]):
        self.dp, self.tag, self.points = dp, tag, points
        self.next = {a: b for a, b in zip(points, points[1:])}
        self.at = set(points)

    def before(self, index: int) -> list[Op]:
        """The operations before item ``index`` of the pass."""
        if self.dp is None or index not in self.at:
            return []
        ranks = len(self.dp.gather.seconds)
        ops = [self._start(index)] if index == self.points[0] else []
        ops.append(Op(WAIT, np.zeros(ranks), (*self.tag, index)))
        if index in self.next:
            ops.append(self._start(self.next[index]))
        return ops

    def _start(self, index: int) -> Op:
        return _op(START, self.dp.gather, (*self.tag, index), op="all_gather")


class _Needs:
    """zero1's parameter all-gathers (``gathers``, in forward order), as the trainer sends them: the
    first :data:`~.dp.ZERO1_IN_FLIGHT` after the step before's optimizer step (:meth:`start`); before a
    block first runs, a wait for each bucket of its parameters not waited for yet (sent first if still
    queued), each followed by the queued ones sent until that many are in flight again."""

    def __init__(self, gathers: tuple, needs: tuple, points: list[int]):
        self.gathers, self.needs = gathers, needs
        self.first = {index: k for k, index in enumerate(points)}   # item -> the block it starts
        self.sent, self.waited = 0, 0

    def _send(self, upto: int | None = None) -> list[Op]:
        ops = []
        while self.sent < len(self.gathers) and (
                (upto is not None and self.sent <= upto) or self.sent - self.waited < ZERO1_IN_FLIGHT):
            ops.append(_op(START, self.gathers[self.sent], ("ag-bucket", self.sent), op="all_gather"))
            self.sent += 1
        return ops

    def start(self) -> list[Op]:
        return self._send() if self.gathers else []

    def _wait(self, segment: int) -> list[Op]:
        ranks, ops = len(self.gathers[0].seconds), []
        for k in self.needs[segment]:   # (in forward order: the gathers are waited for in the order sent)
            ops += self._send(upto=k) + [Op(WAIT, np.zeros(ranks), ("ag-bucket", k))]
            self.waited += 1
            ops += self._send()
        return ops

    def before(self, index: int) -> list[Op]:
        if not self.gathers or index not in self.first:
            return []
        return (self._wait(0) if index == 0 else []) + self._wait(1 + self.first[index])

    def head(self) -> list[Op]:
        return self._wait(len(self.needs) - 1) if self.gathers else []


class _Reduces:
    """The gradient reductions, issued in the last micro-batch's backward (the ones before accumulate):
    a sharded mode's per block (hsdp's all-reduce across replicas chained after it), a bucketed mode's
    buckets (``fills``) after the segment they fill in; all waited for at the step's end."""

    def __init__(self, dp: DataParallel | None, fills: tuple, n_layers: int):
        self.dp, self.fills, self.n_layers, self.keys, self.waited = dp, fills, n_layers, [], []

    def _bucket(self, segment: int) -> list[Op]:
        ops = []
        for c in self.fills[segment]:
            key = ("ar-bucket" if self.dp.mode == "ddp" else "rs-bucket", len(self.keys) + len(self.waited))
            if self.dp.mode == "zero1" and len(self.keys) >= ZERO1_IN_FLIGHT:   # the oldest waited for first
                self.waited.append(self.keys.pop(0))
                ops.append(Op(WAIT, np.zeros(len(c.seconds)), self.waited[-1]))
            self.keys.append(key)
            ops.append(_op(START, c, key, op="all_reduce" if self.dp.mode == "ddp" else "reduce_scatter"))
        return ops

    def _sharded(self, key: tuple, reduce, replicate) -> list[Op]:
        ops = [_op(START, reduce, key, op="reduce_scatter")]
        if replicate is not None:
            ops.append(_op(CHAIN, replicate, (*key, "ar"), after=key, op="all_reduce"))
            key = (*key, "ar")
        self.keys.append(key)
        return ops

    def head(self) -> list[Op]:
        """After the output layer's backward: the head's buckets."""
        return [] if self.dp is None or self.dp.sharded else self._bucket(0)

    def block(self, key: tuple, layer: int) -> list[Op]:
        """After block ``layer``'s last backward piece."""
        if self.dp is None:
            return []
        if self.dp.sharded:
            return self._sharded(key, self.dp.reduce, self.dp.replicate)
        return self._bucket(self.n_layers - layer)

    def end(self, ranks: int) -> list[Op]:
        """The step's end: the root's (embedding's) reductions, then every reduction waited for."""
        if self.dp is None:
            return []
        if self.dp.sharded:
            ops = self._sharded(("root", "reduce"), self.dp.root_reduce, self.dp.root_replicate)
        else:
            ops = self._bucket(len(self.fills) - 1)
        return ops + [Op(WAIT, np.zeros(ranks), key) for key in self.keys]


def _op(kind: str, c: Collective, key: tuple, after: tuple | None = None, *, op: str) -> Op:
    return Op(kind, c.seconds, key, span=c.group(), after=after, link=c.link, dp=True, name=dp_name(op))


def step_ops(micro: list[MicroBatch], n_layers: int, checkpointing: str, ranks: int,
             dp: DataParallel | None = None) -> list[Op]:
    """The step's operations (module docstring); ``dp``: the data-parallel transfers (:mod:`.dp`)."""
    whole_block = checkpointing in ("full", "offload")
    sharded = dp if dp is not None and dp.sharded else None
    fills, gathers, needs = ((), (), ()) if dp is None or dp.buckets is None else dp.buckets.layout(n_layers)
    ops: list[Op] = []
    if sharded is not None:
        ops += [_op(START, sharded.root_gather, ("root", "gather"), op="all_gather"),
                Op(WAIT, np.zeros(ranks), ("root", "gather"))]
    for j, mb in enumerate(micro):
        order = layer_order(n_layers, len(mb.programs), across_layers=not whole_block)
        waits = _Needs(gathers if j == 0 else (), needs, _points(order))
        ops += waits.start()
        ops += _forward(j, mb, order, ranks, _Gathers(sharded, (j, "agf"), _points(order)), waits)
        ops += waits.head()
        ops.append(Op(RUN, mb.head, name=FORWARD))
        reduces = _Reduces(dp if j == len(micro) - 1 else None, fills, n_layers)
        ops += reduces.head()
        if whole_block:
            ops += _backward_blocks(j, mb, order, n_layers, ranks, sharded, reduces)
        else:
            ops += _backward(j, mb, order, ranks, checkpointing, sharded, reduces)
    return ops + reduces.end(ranks)


def _points(items) -> list[int]:
    """Where a pass gathers a block: before its first piece."""
    first = {}
    for i, item in enumerate(items):
        first.setdefault(item[2], i)
    return sorted(first.values())


def _exposed(key: tuple, seconds: np.ndarray, link: str) -> list[Op]:
    return [Op(START, seconds, key, span=len(seconds), link=link, name=TP), Op(WAIT, np.zeros(len(seconds)), key)]


def _linear(mb: MicroBatch, piece: str, n: int, times: float, tag: tuple) -> list[Op]:
    """A linear piece's compute (``times`` its forward seconds) after its TP collectives."""
    seconds = (mb.pre if piece == "pre" else mb.post)[n]
    # a pass's own two collectives, and a selective rerun's forward ones again
    collectives = 2.0 if times > 2 else 1.0
    out = [] if mb.tp is None else _exposed((*tag, "tp", piece, n), mb.tp[n] * collectives, "nvlink")
    return out + [Op(RUN, times * seconds, name=FORWARD if times == 1 else BACKWARD)]


def _piece(mb: MicroBatch, item, ranks: int, tag: str, direction: str, times: float, j: int) -> list[Op]:
    """One piece (``(piece, n, layer)``) as operations: a linear piece at ``times`` its forward, an
    attention stage (its backward counterpart when ``direction`` is backward)."""
    piece, n, layer = item
    if piece in LINEAR:
        return _linear(mb, piece, n, times, (j, layer, tag))
    stage = BACKWARD_OF[piece] if direction == "backward" else piece
    return mb.programs[n].ops(stage, (j, n, layer, tag), ranks)


def _forward(j: int, mb: MicroBatch, order, ranks: int, gathers: _Gathers, needs: _Needs) -> list[Op]:
    ops = []
    for i, item in enumerate(order):
        ops += gathers.before(i) + needs.before(i) + _piece(mb, item, ranks, "f", "forward", 1.0, j)
    return ops


def _backward(j: int, mb: MicroBatch, order, ranks: int, checkpointing: str, sharded: DataParallel | None,
              reduces: _Reduces) -> list[Op]:
    """Each piece's backward in reverse order (``selective``: each linear piece rerun first); a
    block's gradients reduced after its last piece."""
    times = 2.0 + RECOMPUTE[checkpointing]
    items = list(reversed(order))
    gathers = _Gathers(sharded, (j, "agb"), _points(items))
    last = {item[2]: i for i, item in enumerate(items)}
    ops = []
    for i, (piece, n, layer) in enumerate(items):
        ops += gathers.before(i) + _piece(mb, (piece, n, layer), ranks, "b", "backward", times, j)
        if last[layer] == i:
            ops += reduces.block((j, "rs", layer, n), layer)
    return ops


def _backward_blocks(j: int, mb: MicroBatch, order, n_layers: int, ranks: int, sharded: DataParallel | None,
                     reduces: _Reduces) -> list[Op]:
    """``full``/``offload``: block by block from the top, its forward rerun (ping-pong inside it),
    then its pieces' backward in reverse; one gather per block (prefetched), one reduction."""
    blocks = [[item for item in order if item[2] == layer] for layer in reversed(range(n_layers))]
    gathers = _Gathers(sharded, (j, "agb"), list(range(n_layers)))
    ops = []
    for i, block in enumerate(blocks):
        ops += gathers.before(i)
        ops += [op for item in block for op in _piece(mb, item, ranks, "r", "forward", 1.0, j)]
        ops += [op for item in block[::-1] for op in _piece(mb, item, ranks, "b", "backward", 2.0, j)]
        ops += reduces.block((j, "rs", block[0][2]), block[0][2])
    return ops


__all__ = ["MicroBatch", "step_ops", "RECOMPUTE"]
