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
* **FSDP** (``fsdp``): a block's parameters are all-gathered before its forward and again before its
  backward, each prefetched while the block before computes (FSDP2 issues the next block's gather
  from the CPU, which runs ahead of the GPU); its gradients are reduce-scattered after its backward
  in the last micro-batch; the step ends when every reduce-scatter has. The root's parameters
  (embedding, output layer) are gathered at the start and reduced at the end. These transfers span
  every node, so they queue on the network card with the scheduler's inter-node transfers;
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


def step_ops(micro: list[MicroBatch], n_layers: int, checkpointing: str, ranks: int,
             fsdp: Fsdp | None = None) -> list[Op]:
    """The step's operations (module docstring)."""
    whole_block = checkpointing in ("full", "offload")
    ops: list[Op] = []
    if fsdp is not None:
        ops += _exposed(("root", "gather"), fsdp.root_gather, "nic")
    for j, mb in enumerate(micro):
        order = layer_order(n_layers, len(mb.programs), across_layers=not whole_block)
        ops += _forward(j, mb, order, n_layers, ranks, fsdp)
        ops.append(Op(RUN, mb.head))
        last = j == len(micro) - 1
        ops += (_backward_blocks if whole_block else _backward)(j, mb, order, n_layers, ranks, checkpointing,
                                                               fsdp, last)
    if fsdp is not None:
        ops += [Op(START, fsdp.root_reduce, ("root", "reduce"), span=ranks, link="nic")]
        ops += [Op(WAIT, np.zeros(ranks), key) for key in
                [(len(micro) - 1, "rs", layer) for layer in range(n_layers)] + [("root", "reduce")]]
    return ops


def _exposed(key: tuple, seconds: np.ndarray, link: str) -> list[Op]:
    return [Op(START, seconds, key, span=len(seconds), link=link), Op(WAIT, np.zeros(len(seconds)), key)]


def _gather(key: tuple, fsdp: Fsdp, ranks: int) -> Op:
    return Op(START, fsdp.gather, key, span=ranks, link="nic")


def _linear(mb: MicroBatch, piece: str, n: int, times: float, tag: tuple) -> list[Op]:
    """A linear piece's compute (``times`` its forward seconds) after its TP collectives."""
    seconds = (mb.pre if piece == "pre" else mb.post)[n]
    # a pass's own two collectives, and a selective rerun's forward ones again
    collectives = 2.0 if times > 2 else 1.0
    out = [] if mb.tp is None else _exposed((*tag, "tp", piece, n), mb.tp[n] * collectives, "nvlink")
    return out + [Op(RUN, times * seconds)]


def _pieces(mb: MicroBatch, items, ranks: int, tag: str, direction: str, times: float, j: int) -> list[Op]:
    """``items`` (``(piece, n, layer)``) as operations: linear pieces at ``times`` their forward,
    attention stages (their backward counterparts when ``direction`` is backward)."""
    ops = []
    for piece, n, layer in items:
        if piece in ("pre", "post"):
            ops += _linear(mb, piece, n, times, (j, layer, tag))
        else:
            stage = BACKWARD_OF[piece] if direction == "backward" else piece
            ops += mb.programs[n].ops(stage, (j, n, layer, tag), ranks)
    return ops


def _forward(j: int, mb: MicroBatch, order, n_layers: int, ranks: int, fsdp: Fsdp | None) -> list[Op]:
    """The forward pieces; each block's gather waited for before its first piece, the next block's
    started then."""
    ops, seen = [], set()
    for item in order:
        layer = item[2]
        if fsdp is not None and layer not in seen:
            if not seen:
                ops.append(_gather((j, "agf", layer), fsdp, ranks))
            ops.append(Op(WAIT, np.zeros(ranks), (j, "agf", layer)))
            if layer + 1 < n_layers:
                ops.append(_gather((j, "agf", layer + 1), fsdp, ranks))
            seen.add(layer)
        ops += _pieces(mb, [item], ranks, "f", "forward", 1.0, j)
    return ops


def _backward(j: int, mb: MicroBatch, order, n_layers: int, ranks: int, checkpointing: str,
              fsdp: Fsdp | None, last: bool) -> list[Op]:
    """Each piece's backward in reverse order (``selective``: each linear piece rerun first)."""
    times = 2.0 + RECOMPUTE[checkpointing]
    items = list(reversed(order))
    final = {item[2]: i for i, item in enumerate(items)}   # where each block's backward ends
    ops, seen = [], set()
    for i, item in enumerate(items):
        layer = item[2]
        if fsdp is not None and layer not in seen:
            ops += _next_gather(j, layer, seen, fsdp, ranks)
        ops += _pieces(mb, [item], ranks, "b", "backward", times, j)
        if fsdp is not None and last and final[layer] == i:
            ops.append(Op(START, fsdp.reduce, (j, "rs", layer), span=ranks, link="nic"))
    return ops


def _next_gather(j: int, layer: int, seen: set, fsdp: Fsdp, ranks: int) -> list[Op]:
    """Backward: wait for block ``layer``'s gather (started when the block above began), start the next."""
    ops = [] if seen else [_gather((j, "agb", layer), fsdp, ranks)]
    ops.append(Op(WAIT, np.zeros(ranks), (j, "agb", layer)))
    if layer > 0:
        ops.append(_gather((j, "agb", layer - 1), fsdp, ranks))
    seen.add(layer)
    return ops


def _backward_blocks(j: int, mb: MicroBatch, order, n_layers: int, ranks: int, checkpointing: str,
                     fsdp: Fsdp | None, last: bool) -> list[Op]:
    """``full``/``offload``: block by block from the top, its forward rerun (ping-pong inside it),
    then its pieces' backward in reverse."""
    ops, seen = [], set()
    for layer in reversed(range(n_layers)):
        block = [item for item in order if item[2] == layer]
        if fsdp is not None:
            ops += _next_gather(j, layer, seen, fsdp, ranks)
        ops += _pieces(mb, block, ranks, "r", "forward", 1.0, j)
        ops += _pieces(mb, block[::-1], ranks, "b", "backward", 2.0, j)
        if fsdp is not None and last:
            ops.append(Op(START, fsdp.reduce, (j, "rs", layer), span=ranks, link="nic"))
    return ops


__all__ = ["MicroBatch", "Fsdp", "step_ops", "RECOMPUTE"]
