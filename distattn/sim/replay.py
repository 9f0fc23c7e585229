"""Time the very program the executors run (:mod:`distattn.planning.program`) on a cost model, every rank at once.

A step is a sequence of operations, the same on every rank (the trainer's layer order,
:func:`distattn.planning.program.layer_order`, with each attention stage's instructions in it); each has
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

from ..planning.program import BACKWARD_OF, CHAIN, RUN, STAGES, START, WAIT
from ..distributed.trace import ATTENTION, BACKWARD, FORWARD, transfer

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
    dp: bool = False           # a data-parallel transfer (gradients, parameters: :mod:`.dp`)
    name: str = ""             # its phase in a trace (:mod:`distattn.distributed.trace`'s names; a wait's is implied)


@dataclass(frozen=True, eq=False)
class Replay:
    """Per rank: when its step ends, its compute seconds, the seconds it stood at waits, and the
    seconds its transfers took."""

    end: np.ndarray
    compute: np.ndarray
    stalled: np.ndarray
    comm: np.ndarray


def _coupled(x: np.ndarray, op: Op, plans: dict | None = None) -> np.ndarray:
    """Per rank (the last axis), the latest of ``x`` over the ranks its transfer waits for: the ranks it
    exchanges data with (``links``), else its group. ``plans``: :func:`_flat_links` kept per ``links``."""
    if op.links is not None:
        src, dst = _flat_links(op.links, x.shape, plans)
        out = x.copy()
        flat, before = out.reshape(-1), x.reshape(-1)
        np.maximum.at(flat, src, before[dst])
        np.maximum.at(flat, dst, before[src])
        return out
    if op.span > 1:
        return np.repeat(x.reshape(*x.shape[:-1], -1, op.span).max(-1), op.span, axis=-1)
    return x


def _flat_links(links: tuple[np.ndarray, np.ndarray], shape: tuple[int, ...],
                plans: dict | None) -> tuple[np.ndarray, np.ndarray]:
    """``links``' ``(src, dst)`` pairs on every row of an array of ``shape`` (rows of ranks), as indices
    of it flattened: one scattered maximum for all rows. Made once per ``links`` a replay meets (kept
    in ``plans`` with the arrays, whose identity keys it)."""
    if len(shape) == 1:
        return links
    hit = None if plans is None else plans.get(id(links))
    if hit is not None:
        return hit[1]
    rows, ranks = shape
    got = tuple(np.concatenate([x + i * ranks for i in range(rows)]) for x in links)
    if plans is not None:
        plans[id(links)] = (links, got)
    return got


def _seconds(op: Op, kept: dict | None = None) -> np.ndarray:
    """A transfer's seconds per rank: a point-to-point receiver also waits for the send it receives
    (``kept``: made once per seconds and links a replay meets)."""
    if not op.p2p or op.links is None:
        return op.seconds
    key = (id(op.seconds), id(op.links))
    hit = None if kept is None else kept.get(key)
    if hit is not None:
        return hit[2]
    src, dst = op.links
    out = op.seconds.copy()
    np.maximum.at(out, dst, op.seconds[src])
    if kept is not None:
        kept[key] = (op.seconds, op.links, out)   # (the arrays kept alive: their identities are the key)
    return out


def replay(ops, ranks: int, comm: bool = True, streams: bool = True, slowdown: float = 0.0,
           events: list | None = None, traced: int = 0) -> Replay:
    """Run ``ops`` (module docstring); ``comm=False``: every transfer takes no time; ``streams``:
    chained hops wait off the compute clock (GPUs); ``slowdown``: compute runs ``1 + slowdown`` times
    slower while a transfer of the rank is in flight. ``events``: appended ``(op, start, end)`` per
    operation, the first ``traced`` ranks' seconds (a compute's run, a wait's hold, a transfer's time
    on its link: :mod:`.trace`)."""
    return _replay(ops, ranks, (comm,), streams, slowdown, events, traced)[0]


def replay_both(ops, ranks: int, streams: bool = True, slowdown: float = 0.0) -> tuple[Replay, Replay]:
    """``(replay(ops, ranks, streams=streams, slowdown=slowdown), replay(ops, ranks, comm=False,
    streams=streams))`` -- the step and the step without transfers, whose difference is the exposed
    communication -- in one pass over ``ops``, each operation's arithmetic done on both at once (a
    step is thousands of operations on a few hundred ranks: the pass, not the arithmetic, is the
    cost). The same numbers: with no transfer in flight ``slowdown`` slows nothing."""
    both = _replay(ops, ranks, (True, False), streams, slowdown)
    return both[0], both[1]


def replay_three(ops, ranks: int, streams: bool = True, slowdown: float = 0.0) -> tuple[Replay, Replay, Replay]:
    """:func:`replay_both`'s two replays and a third with the data-parallel transfers alone taking no time
    (``Op.dp``): the step less that one is what data-parallel communication adds to it."""
    rows = _replay(ops, ranks, (True, False, "no dp"), streams, slowdown)
    return rows[0], rows[1], rows[2]


def _replay(ops, ranks: int, comms: tuple, streams: bool, slowdown: float, events: list | None = None,
            traced: int = 0) -> list[Replay]:
    """:func:`replay` of ``ops`` once per entry of ``comms`` (True: with transfers; False: without; ``"no
    dp"``: without the data-parallel ones), as rows of one array per clock."""
    shape = (len(comms), ranks)
    # per row, whether a transfer takes time: the others, and the data-parallel ones
    on_rest = np.asarray([c is not False for c in comms], dtype=np.float64)[:, None]
    on_dp = np.asarray([c is True for c in comms], dtype=np.float64)[:, None]
    all_on = all(c is True for c in comms)
    clock, queues, inflight = np.zeros(shape), {}, np.zeros(shape)
    compute, stalled, moving = np.zeros(shape), np.zeros(shape), np.zeros(shape)
    ends: dict = {}
    plans: dict = {}
    kept: dict = {}
    for op in ops:
        kind = op.op
        if kind == RUN:
            took = _slowed(op.seconds, np.maximum(inflight - clock, 0), slowdown) if slowdown else op.seconds
            if events is not None:
                events.append((op, clock[0, :traced], (clock + took)[0, :traced]))
            clock = clock + took
            compute += took
        elif kind == WAIT:   # the compute clock waits for the transfer's end
            end = ends.pop(op.key)
            stalled += np.maximum(end - clock, 0)
            if events is not None:
                events.append((op, clock[0, :traced], np.maximum(clock, end)[0, :traced]))
            clock = np.maximum(clock, end)
        else:
            assert kind in (START, CHAIN), kind
            ready = np.maximum(clock, queues.get(op.link, 0.0))
            if kind == CHAIN:
                before = ends.pop(op.after)
                if not streams:
                    stalled += np.maximum(before - clock, 0)
                    clock = np.maximum(clock, before)
                ready = np.maximum(ready, before)
            seconds = _seconds(op, kept)
            on = None if all_on else on_dp if op.dp else on_rest
            if on is not None:
                seconds = seconds * on
            queue = _coupled(ready, op, plans) + seconds
            if events is not None:
                events.append((op, (queue - seconds)[0, :traced], queue[0, :traced]))
            queues[op.link] = queue
            moving += seconds
            ends[op.key] = queue
            inflight = np.maximum(inflight, queue if on is None else queue * on)
    assert not ends, f"transfers never waited for: {list(ends)[:3]}"
    return [Replay(clock[i], compute[i], stalled[i], moving[i]) for i in range(len(comms))]


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
    """An attention program (:class:`distattn.planning.program.Program`) with each instruction's per-rank
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
                          self.links.get((ins.phase, ins.step)), self.link_of.get(ins.phase, "net"),
                          name=transfer(ph.op) if ph.is_comm else ATTENTION))
        return out


def call_ops(program: TimedProgram, ranks: int, stages=STAGES) -> list[Op]:
    """One plain attention call's ``stages`` (default: forward then backward), nothing else computed
    (``distattn bench``)."""
    return [op for stage in stages for op in program.ops(stage, (0, 0), ranks)]


def step_ops(order, programs, pre_s, post_s, head_s, ranks: int) -> list[Op]:
    """The operations of a training step: ``order`` (:func:`distattn.planning.program.layer_order`) forward,
    ``head_s`` (the output layer and loss, forward and backward), then ``order`` reversed with each
    piece's backward (linear pieces: twice their forward seconds). Per nano-batch ``n``:
    ``programs[n]`` (:class:`TimedProgram`), ``pre_s[n]`` and ``post_s[n]`` (seconds per rank of its
    ``pre``/``post`` forward)."""
    ops = []
    linear = {"pre": pre_s, "post": post_s}
    for piece, n, layer in order:
        if piece in linear:
            ops.append(Op(RUN, linear[piece][n], name=FORWARD))
        else:
            ops += programs[n].ops(piece, (n, layer), ranks)
    ops.append(Op(RUN, head_s, name=FORWARD))
    for piece, n, layer in reversed(order):
        if piece in linear:
            ops.append(Op(RUN, 2 * linear[piece][n], name=BACKWARD))
        else:
            ops += programs[n].ops(BACKWARD_OF[piece], (n, layer), ranks)
    return ops


__all__ = ["Op", "Replay", "TimedProgram", "replay", "replay_both", "replay_three", "call_ops", "step_ops"]
