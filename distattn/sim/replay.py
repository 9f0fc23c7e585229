"""Time the very program the executors run (:mod:`distattn.program`) on a cost model, every rank at once.

A step is a sequence of operations, the same on every rank (the trainer's layer order,
:func:`distattn.program.layer_order`, with each attention stage's instructions in it); each has
per-rank seconds. Each rank has a compute clock and one communication queue:

* ``run``: the compute clock advances by the rank's seconds -- ``slowdown`` more slowly while any
  transfer the rank issued is still in flight (NCCL's kernels take SMs and memory bandwidth from the
  compute they overlap: :data:`COMM_SLOWDOWN`);
* ``start``: the transfer is issued at the compute clock; it begins once every rank it needs has
  issued it and each one's queue on the transfer's link is free (``link``: ``"nvlink"`` inside a
  node, ``"nic"`` across nodes; transfers on one link take turns, so FSDP's all-gathers and a
  scheduler's transfers share a rank's network card) and
  takes the rank's seconds: a collective needs all its group; a point-to-point step (the ring) or a
  sparse all-to-all (``cad``'s) only the ranks the rank exchanges data with (``Phase.links``), and
  a receiver of a point-to-point step also waits for the send it receives;
* ``wait``: the compute clock moves on to the transfer's end if it is not there yet;
* ``chain``: a ``start`` that also waits for an earlier transfer to end (a later hop) -- without
  holding the compute clock where the executor waits on a side stream (GPUs, ``streams=True``), or
  as a ``wait`` then a ``start`` where the process itself waits (CPU, ``streams=False``).

So a transfer hides exactly behind the computation the rank runs between its start and its wait --
no overlap is assumed that the code does not make. ``exposed`` is what communication adds to the
step: the step replayed with every transfer taking no time, subtracted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..program import BACKWARD_OF, CHAIN, RUN, STAGES, START, WAIT

# How much slower a GPU computes while its own NCCL transfers are in flight: the concurrent NCCL
# kernels hold SMs and HBM bandwidth. Lee et al., "Characterizing Compute-Communication Overlap in
# GPU-Accelerated Distributed Deep Learning: Performance and Power Implications" (arXiv 2507.03114,
# 2025) measured GPT and Llama training on 4 A100s, H100s, MI250s and MI210s: overlapped compute ran
# 18.9% slower on average (40% at worst) than the same compute alone. Their average is the default.
COMM_SLOWDOWN = 0.19


@dataclass(frozen=True, eq=False)
class Op:
    """One operation of the step on every rank: ``seconds [ranks]``; a transfer's ``key`` pairs its
    start and its wait; its group is consecutive blocks of ``span`` ranks, or ``links``, the
    ``(src, dst)`` pairs that move data (``p2p``: point-to-point, a receiver waits for its sender's
    seconds); a chain's ``after``: the key of the transfer it follows."""

    op: str
    seconds: np.ndarray
    key: tuple | None = None
    span: int = 1
    p2p: bool = False
    after: tuple | None = None
    links: tuple[np.ndarray, np.ndarray] | None = None
    link: str = "net"          # the queue a transfer takes its turn in (module docstring)


@dataclass(frozen=True, eq=False)
class Replay:
    """Per rank: when its step ends, its compute seconds, the seconds it stood at waits, and the
    seconds its transfers took."""

    end: np.ndarray
    compute: np.ndarray
    stalled: np.ndarray
    comm: np.ndarray


def _coupled(x: np.ndarray, op: Op) -> np.ndarray:
    """Per rank, the latest of ``x`` over the ranks its transfer waits for: the ranks it exchanges
    data with (``links``), else its group."""
    if op.links is not None:
        src, dst = op.links
        out = x.copy()
        np.maximum.at(out, src, x[dst])
        np.maximum.at(out, dst, x[src])
        return out
    return np.repeat(x.reshape(-1, op.span).max(1), op.span) if op.span > 1 else x


def _seconds(op: Op) -> np.ndarray:
    """A transfer's seconds per rank: a point-to-point receiver also waits for the send it receives."""
    if not op.p2p or op.links is None:
        return op.seconds
    src, dst = op.links
    out = op.seconds.copy()
    np.maximum.at(out, dst, op.seconds[src])
    return out


def replay(ops, ranks: int, comm: bool = True, streams: bool = True, slowdown: float = 0.0) -> Replay:
    """Run ``ops`` (module docstring); ``comm=False``: every transfer takes no time; ``streams``:
    chained hops wait off the compute clock (GPUs); ``slowdown``: compute runs ``1 + slowdown`` times
    slower while a transfer of the rank is in flight."""
    clock, queues, inflight = np.zeros(ranks), {}, np.zeros(ranks)
    compute, stalled, moving = np.zeros(ranks), np.zeros(ranks), np.zeros(ranks)
    ends: dict = {}

    def hold(end):   # the compute clock waits for ``end``
        nonlocal clock
        stalled[:] += np.maximum(end - clock, 0)
        clock = np.maximum(clock, end)
    for op in ops:
        if op.op == RUN:
            took = _slowed(op.seconds, np.maximum(inflight - clock, 0), slowdown) if slowdown else op.seconds
            clock = clock + took
            compute += took
        elif op.op in (START, CHAIN):
            queue = queues.get(op.link, 0.0)
            ready = np.maximum(clock, queue)
            if op.op == CHAIN:
                before = ends.pop(op.after)
                if not streams:
                    hold(before)
                ready = np.maximum(ready, before)
            seconds = _seconds(op) if comm else 0.0
            queues[op.link] = _coupled(ready, op) + seconds
            moving += seconds
            ends[op.key] = queues[op.link]
            if comm:
                inflight = np.maximum(inflight, queues[op.link])
        else:
            assert op.op == WAIT, op.op
            hold(ends.pop(op.key))
    assert not ends, f"transfers never waited for: {list(ends)[:3]}"
    return Replay(clock, compute, stalled, moving)


def _slowed(seconds: np.ndarray, overlap: np.ndarray, slowdown: float) -> np.ndarray:
    """Wall seconds of ``seconds`` of compute whose first ``overlap`` wall seconds share the GPU with a
    transfer (running ``1 + slowdown`` times slower then)."""
    slow = np.minimum(seconds * (1 + slowdown), overlap)
    return slow + seconds - slow / (1 + slowdown)


def _by_step(steps: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """``(step, its entries' indices)`` for every step present (one sort, not a pass per step)."""
    order = np.argsort(steps, kind="stable")
    values, starts = np.unique(steps[order], return_index=True)
    return list(zip(values.tolist(), np.split(order, starts[1:])))


@dataclass(frozen=True, eq=False)
class TimedProgram:
    """An attention program (:class:`distattn.program.Program`) with each instruction's per-rank
    seconds: ``seconds[(phase, step)] [ranks]``."""

    program: object
    seconds: dict

    links: dict = field(default_factory=dict)   # (phase, step) -> a sparse all-to-all's (src, dst)
    link_of: dict = field(default_factory=dict)  # phase -> the link its transfers queue on (default "net")

    @staticmethod
    def of(program, ranks: int, attention_s, transfer_s, link=None) -> "TimedProgram":
        """``attention_s(phase) -> seconds per entry`` and ``transfer_s(phase) -> seconds per entry``
        (the phases' ranks index ``0..ranks-1``); ``link(phase)``: the link a transfer phase queues on."""
        seconds, links = {}, {}
        link_of = {} if link is None else {i: link(ph) for i, ph in enumerate(program.phases) if ph.is_comm}
        for index, ph in enumerate(program.phases):
            per_entry = transfer_s(ph) if ph.is_comm else attention_s(ph)
            for s, at in _by_step(ph.steps):
                seconds[(index, s)] = np.bincount(ph.rank[at], per_entry[at], minlength=ranks)
            if ph.links is not None:
                step, src, dst = ph.links
                links.update({(index, s): (src[at], dst[at]) for s, at in _by_step(step)})
        return TimedProgram(program, seconds, links, link_of)

    def ops(self, stage: str, tag: tuple, ranks: int) -> list[Op]:
        """The operations of one stage; ``tag`` (nano-batch, layer) keeps transfers of different calls apart."""
        out = []
        for ins in self.program.stage(stage):
            ph = self.program.phases[ins.phase]
            seconds = self.seconds.get((ins.phase, ins.step))
            if seconds is None:
                seconds = np.zeros(ranks)
            key = None if ins.op == RUN else (*tag, ins.phase, ins.step)
            after = None if ins.after is None else (*tag, ins.phase, ins.after)
            out.append(Op(ins.op, seconds, key, ph.span if ph.is_comm else 1, ph.op == "send_recv", after,
                          self.links.get((ins.phase, ins.step)), self.link_of.get(ins.phase, "net")))
        return out


def call_ops(program: TimedProgram, ranks: int, stages=STAGES) -> list[Op]:
    """One plain attention call's ``stages`` (default: forward then backward), nothing else computed
    (``distattn bench``)."""
    return [op for stage in stages for op in program.ops(stage, (0, 0), ranks)]


def step_ops(order, programs, pre_s, post_s, head_s, ranks: int) -> list[Op]:
    """The operations of a training step: ``order`` (:func:`distattn.program.layer_order`) forward,
    ``head_s`` (the output layer and loss, forward and backward), then ``order`` reversed with each
    piece's backward (linear pieces: twice their forward seconds). Per nano-batch ``n``:
    ``programs[n]`` (:class:`TimedProgram`), ``pre_s[n]`` and ``post_s[n]`` (seconds per rank of its
    ``pre``/``post`` forward)."""
    ops = []
    linear = {"pre": pre_s, "post": post_s}
    for piece, n, layer in order:
        if piece in linear:
            ops.append(Op(RUN, linear[piece][n]))
        else:
            ops += programs[n].ops(piece, (n, layer), ranks)
    ops.append(Op(RUN, head_s))
    for piece, n, layer in reversed(order):
        if piece in linear:
            ops.append(Op(RUN, 2 * linear[piece][n]))
        else:
            ops += programs[n].ops(BACKWARD_OF[piece], (n, layer), ranks)
    return ops


__all__ = ["Op", "Replay", "TimedProgram", "replay", "call_ops", "step_ops"]
