"""A training step as the trainer runs it, as :mod:`.replay` operations: micro-batches, the layers'
pieces in the trainer's order, the recomputation its activation checkpointing runs, FSDP's
all-gathers and reduce-scatters, and tensor parallelism's collectives.

Per micro-batch (one after another, gradients accumulated):

* **forward**: :func:`distattn.program.layer_order` -- nano-batches ping-ponged across layers, or,
  under ``full``/``offload`` checkpointing (which rerun a block whole), inside each layer; then the
  output layer and loss (``head``);
* **backward**: the pieces in reverse, each as its backward (a linear piece: twice its forward).
  ``selective`` first reruns each linear piece's forward (three times its forward); ``full`` and
  ``offload`` rerun each block's whole forward -- attention's transfers included, ping-pong inside
  the block -- right before its backward;
* **FSDP** (``fsdp``): what FSDP2 issues, counted on gloo (``fully_shard`` per block, as the trainer
  wraps it): each block's parameters are gathered once per pass (forward; backward, its rerun
  included) before its first piece -- nano-batches' pieces called apart too: the trainer keeps the
  block unsharded from its first piece to its last (:mod:`distattn.train.model.transformer`) -- and its
  gradients reduce-scattered once, after its last piece's backward. Each gather is prefetched while
  the piece before computes (FSDP2 issues it from the CPU, which runs ahead of the GPU);
  reduce-scatters are issued after their backward in the last micro-batch and waited for at the
  step's end; the root's parameters (embedding, output layer) are gathered at the start and reduced
  at the end. These transfers span every node, so they queue on the network card with the
  scheduler's inter-node transfers;
* **tensor parallelism** (``tp``): Megatron's sequence-parallel all-gather before each linear piece
  and reduce-scatter after it (two per piece, forward and backward), on NVLink, waited for at once.

Offload's copies to host memory run on a side stream and are not timed (they move 2 bytes per
hidden unit per token per layer over PCIe: a fraction of the block's compute).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..program import BACKWARD_OF, RUN, START, WAIT, layer_order
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


@dataclass(frozen=True, eq=False)
class Fsdp:
    """Per rank, the seconds of one block's all-gather and reduce-scatter, and of the root's."""

    gather: np.ndarray
    reduce: np.ndarray
    root_gather: np.ndarray
    root_reduce: np.ndarray


class _Gathers:
    """FSDP's all-gathers of one pass: each waited for before its piece, the next one started then."""

    def __init__(self, fsdp: Fsdp | None, tag: tuple, points: list[int]):
        self.fsdp, self.tag, self.points = fsdp, tag, points
        self.next = {a: b for a, b in zip(points, points[1:])}
        self.at = set(points)

    def before(self, index: int) -> list[Op]:
        """The operations before item ``index`` of the pass."""
        if self.fsdp is None or index not in self.at:
            return []
        ranks = len(self.fsdp.gather)
        ops = [self._start(index)] if index == self.points[0] else []
        ops.append(Op(WAIT, np.zeros(ranks), (*self.tag, index)))
        if index in self.next:
            ops.append(self._start(self.next[index]))
        return ops

    def _start(self, index: int) -> Op:
        return Op(START, self.fsdp.gather, (*self.tag, index), span=len(self.fsdp.gather), link="nic")


def step_ops(micro: list[MicroBatch], n_layers: int, checkpointing: str, ranks: int,
             fsdp: Fsdp | None = None) -> list[Op]:
    """The step's operations (module docstring)."""
    whole_block = checkpointing in ("full", "offload")
    ops: list[Op] = []
    if fsdp is not None:
        ops += _exposed(("root", "gather"), fsdp.root_gather, "nic")
    reduces = []
    for j, mb in enumerate(micro):
        order = layer_order(n_layers, len(mb.programs), across_layers=not whole_block)
        ops += _forward(j, mb, order, ranks, _Gathers(fsdp, (j, "agf"), _points(order)))
        ops.append(Op(RUN, mb.head))
        reduce = fsdp if j == len(micro) - 1 else None
        if whole_block:
            ops += _backward_blocks(j, mb, order, n_layers, ranks, fsdp, reduce, reduces)
        else:
            ops += _backward(j, mb, order, ranks, checkpointing, fsdp, reduce, reduces)
    if fsdp is not None:
        ops += [Op(START, fsdp.root_reduce, ("root", "reduce"), span=ranks, link="nic")]
        ops += [Op(WAIT, np.zeros(ranks), key) for key in reduces + [("root", "reduce")]]
    return ops


def _points(items) -> list[int]:
    """Where a pass gathers a block: before its first piece."""
    first = {}
    for i, item in enumerate(items):
        first.setdefault(item[2], i)
    return sorted(first.values())


def _exposed(key: tuple, seconds: np.ndarray, link: str) -> list[Op]:
    return [Op(START, seconds, key, span=len(seconds), link=link), Op(WAIT, np.zeros(len(seconds)), key)]


def _linear(mb: MicroBatch, piece: str, n: int, times: float, tag: tuple) -> list[Op]:
    """A linear piece's compute (``times`` its forward seconds) after its TP collectives."""
    seconds = (mb.pre if piece == "pre" else mb.post)[n]
    # a pass's own two collectives, and a selective rerun's forward ones again
    collectives = 2.0 if times > 2 else 1.0
    out = [] if mb.tp is None else _exposed((*tag, "tp", piece, n), mb.tp[n] * collectives, "nvlink")
    return out + [Op(RUN, times * seconds)]


def _piece(mb: MicroBatch, item, ranks: int, tag: str, direction: str, times: float, j: int) -> list[Op]:
    """One piece (``(piece, n, layer)``) as operations: a linear piece at ``times`` its forward, an
    attention stage (its backward counterpart when ``direction`` is backward)."""
    piece, n, layer = item
    if piece in LINEAR:
        return _linear(mb, piece, n, times, (j, layer, tag))
    stage = BACKWARD_OF[piece] if direction == "backward" else piece
    return mb.programs[n].ops(stage, (j, n, layer, tag), ranks)


def _forward(j: int, mb: MicroBatch, order, ranks: int, gathers: _Gathers, tag: str = "f") -> list[Op]:
    ops = []
    for i, item in enumerate(order):
        ops += gathers.before(i) + _piece(mb, item, ranks, tag, "forward", 1.0, j)
    return ops


def _reduce(key: tuple, fsdp: Fsdp, reduces: list) -> Op:
    reduces.append(key)
    return Op(START, fsdp.reduce, key, span=len(fsdp.reduce), link="nic")


def _backward(j: int, mb: MicroBatch, order, ranks: int, checkpointing: str, fsdp: Fsdp | None,
              reduce: Fsdp | None, reduces: list) -> list[Op]:
    """Each piece's backward in reverse order (``selective``: each linear piece rerun first); a
    block's gradients reduced after its last piece."""
    times = 2.0 + RECOMPUTE[checkpointing]
    items = list(reversed(order))
    gathers = _Gathers(fsdp, (j, "agb"), _points(items))
    last = {item[2]: i for i, item in enumerate(items)}
    ops = []
    for i, (piece, n, layer) in enumerate(items):
        ops += gathers.before(i) + _piece(mb, (piece, n, layer), ranks, "b", "backward", times, j)
        if reduce is not None and last[layer] == i:
            ops.append(_reduce((j, "rs", layer, n), reduce, reduces))
    return ops


def _backward_blocks(j: int, mb: MicroBatch, order, n_layers: int, ranks: int, fsdp: Fsdp | None,
                     reduce: Fsdp | None, reduces: list) -> list[Op]:
    """``full``/``offload``: block by block from the top, its forward rerun (ping-pong inside it),
    then its pieces' backward in reverse; one gather per block (prefetched), one reduce-scatter."""
    blocks = [[item for item in order if item[2] == layer] for layer in reversed(range(n_layers))]
    gathers = _Gathers(fsdp, (j, "agb"), list(range(n_layers)))
    ops = []
    for i, block in enumerate(blocks):
        ops += gathers.before(i)
        ops += [op for item in block for op in _piece(mb, item, ranks, "r", "forward", 1.0, j)]
        ops += [op for item in block[::-1] for op in _piece(mb, item, ranks, "b", "backward", 2.0, j)]
        if reduce is not None:
            ops.append(_reduce((j, "rs", block[0][2]), reduce, reduces))
    return ops


__all__ = ["MicroBatch", "Fsdp", "step_ops", "RECOMPUTE"]
