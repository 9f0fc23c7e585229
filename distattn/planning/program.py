"""Programs: what every rank runs, in order, as data -- the one timeline the code and the simulator share.

An attention call is a :class:`Program`: the executor's instructions, each naming its work -- the
entries of one step of one :class:`~distattn.planning.schedule.Phase` (attention FLOPs, or the bytes of a
transfer):

* ``run``: compute (the rank's kernel calls of that step);
* ``start``: issue a transfer; the executor goes on while it moves;
* ``wait``: block until that transfer is done;
* ``chain``: issue a transfer that may begin only once an earlier one (step ``after`` of the same
  phase) is done -- the next hop of a multi-hop transfer, whose rows the earlier hop brought. On a
  GPU the executor waits for the earlier hop on a side stream, so computation goes on; on a CPU the
  wait blocks the process (it is a ``wait`` then a ``start`` there).

A transfer hides behind exactly the ``run`` instructions (and, in a layer, the other computation)
between its ``start`` and its ``wait``: nothing else. Every scheduler's program is written next to
its executor's loop (``Schedule.program``), and ``tests/test_program.py`` records what each executor
really issues, waits for and computes on gloo and checks it is its program, instruction by
instruction -- so the simulator (:mod:`distattn.sim.replay`), which times these instructions, times
what the code runs.

Instructions come in the executors' *stages* (:data:`FORWARD`, :data:`BACKWARD`), the points at
which a caller may run other work in between (:class:`distattn.executors.base.Executor`): ``dispatch``
starts what the computation needs on its way (``cad``: Q, K/V to the workers; ``ulysses``/``usp``:
K/V and the first head group's Q to heads; the ring family: its first K/V step; ``allgather``: its
first gather), ``compute`` waits for it, computes and starts the way back, ``finish`` waits for
that (and the backward's mirror). An executor without stages (``local``) does all its work in
``compute`` (``compute_backward``). A plain ``distattn.attention`` call runs a direction's stages
back to back.

A training step is a sequence of *pieces* over the layers (:func:`layer_order`): a nano-batch's
``pre`` (norm, QKV projection, RoPE), the three attention stages, its ``post`` (output projection,
MLP). With two nano-batches the pieces interleave across layers (:mod:`distattn.runtime.pingpong`), and the
backward runs the pieces in exactly the reverse order (the autograd engine runs the ready node
created last first), each attention stage as its backward counterpart (:data:`BACKWARD_OF`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

RUN, START, WAIT, CHAIN = "run", "start", "wait", "chain"
FORWARD = ("dispatch", "compute", "finish")
BACKWARD = ("start_backward", "compute_backward", "finish_backward")
STAGES = FORWARD + BACKWARD
PIECES = ("pre", *FORWARD, "post")
# a forward piece's backward: the autograd node of each stage runs its counterpart (distattn.runtime.pingpong)
BACKWARD_OF = {"pre": "pre", "post": "post", **dict(zip(FORWARD, BACKWARD[::-1]))}


@dataclass(frozen=True)
class Instr:
    """One instruction: ``op`` (``run``, ``start``, ``wait``, ``chain``) on the entries of step ``step``
    of phase ``phase`` (an index into the program's phases); a ``chain`` begins once step ``after``
    of the same phase is done."""

    op: str
    phase: int
    step: int = 0
    after: int | None = None

    def __post_init__(self):
        assert self.op in (RUN, START, WAIT, CHAIN) and (self.after is not None) == (self.op == CHAIN), self


@dataclass(frozen=True, eq=False)
class Program:
    """One attention call on every rank: the phases (its work) and, per stage, the instructions."""

    phases: tuple = ()
    stages: dict = field(default_factory=dict)   # stage name -> tuple[Instr, ...]

    def stage(self, name: str) -> tuple[Instr, ...]:
        return self.stages.get(name, ())

    def direction(self, direction: str) -> tuple[Instr, ...]:
        """A plain call's instructions of ``"forward"`` or ``"backward"``: its stages back to back."""
        return tuple(i for name in (FORWARD if direction == "forward" else BACKWARD) for i in self.stage(name))


class Builder:
    """Builds a :class:`Program`: add phases, then instructions to stages (or whole programs)."""

    def __init__(self):
        self.phases: list = []
        self.stages: dict[str, list[Instr]] = {name: [] for name in STAGES}
        self._included: dict[int, tuple[Program, int]] = {}   # id -> (program, where its phases begin)

    def phase(self, phase) -> int:
        self.phases.append(phase)
        return len(self.phases) - 1

    def run(self, stage: str, phase: int, step: int = 0) -> None:
        self.stages[stage].append(Instr(RUN, phase, step))

    def start(self, stage: str, phase: int, step: int = 0) -> None:
        self.stages[stage].append(Instr(START, phase, step))

    def wait(self, stage: str, phase: int, step: int = 0) -> None:
        self.stages[stage].append(Instr(WAIT, phase, step))

    def chain(self, stage: str, phase: int, step: int, after: int) -> None:
        self.stages[stage].append(Instr(CHAIN, phase, step, after))

    def include(self, stage: str, program: Program, direction: str) -> None:
        """Append ``program``'s ``direction`` (its stages back to back) to ``stage``; its phases are
        added the first time it is included."""
        if id(program) not in self._included:
            self._included[id(program)] = (program, len(self.phases))   # (kept alive: its id stays its own)
            self.phases += list(program.phases)
        base = self._included[id(program)][1]
        self.stages[stage] += [Instr(i.op, i.phase + base, i.step, i.after) for i in program.direction(direction)]

    def build(self) -> Program:
        return Program(tuple(self.phases), {name: tuple(ins) for name, ins in self.stages.items() if ins})


def layer_order(n_layers: int, nano_batches: int = 1, across_layers: bool = True) -> tuple[tuple[str, int, int], ...]:
    """``(piece, nano-batch, layer)`` in the order a forward runs them (module docstring; the backward
    runs them in reverse). One nano-batch: each layer's pieces in order, every transfer waited for
    at once. Two, ``across_layers`` (DistCA's ping-pong, nano-batches ``A = 0`` and ``B = 1``)::

        pre A(L), dispatch A(L)        Q/K/V of A(L) in flight ...
        finish B(L-1), post B(L-1)     ... behind B's output projection and MLP of the layer before
        pre B(L), dispatch B(L)        ... and B's QKV projection; Q/K/V of B(L) in flight ...
        compute A(L)                   ... behind A's attention; out of A(L) in flight ...
        compute B(L)                   ... behind B's attention; out of B(L) in flight ...
        finish A(L), post A(L)         ... behind A's MLP and A's next QKV projection

    Backward, in reverse: dout of A(L) behind B's attention backward, dQ/dK/dV of B behind A's,
    dQ/dK/dV of A behind B's QKV projection and the layer below's MLP backward, dout of B(L-1) behind
    A's. Not ``across_layers`` (full checkpointing reruns a layer at a time:
    :mod:`distattn.train.model.transformer`): inside each layer, ``pre A, dispatch A, pre B, dispatch B, compute
    A, compute B, finish A, post A, finish B, post B``. More nano-batches follow the inside-a-layer
    pattern."""
    if nano_batches == 1:
        return tuple((piece, 0, layer) for layer in range(n_layers) for piece in PIECES)
    nanos = range(nano_batches)
    if nano_batches > 2 or not across_layers:
        return tuple(item for layer in range(n_layers) for item in (
            *[(piece, n, layer) for n in nanos for piece in ("pre", "dispatch")],
            *[("compute", n, layer) for n in nanos],
            *[(piece, n, layer) for n in nanos for piece in ("finish", "post")]))
    order: list[tuple[str, int, int]] = []
    for layer in range(n_layers):
        order += [("pre", 0, layer), ("dispatch", 0, layer)]
        if layer:
            order += [("finish", 1, layer - 1), ("post", 1, layer - 1)]
        order += [("pre", 1, layer), ("dispatch", 1, layer), ("compute", 0, layer), ("compute", 1, layer),
                  ("finish", 0, layer), ("post", 0, layer)]
    return tuple(order + [("finish", 1, n_layers - 1), ("post", 1, n_layers - 1)])


def layer_share(n_layers: int, layer: int, nano_batches: int = 2) -> tuple[tuple[str, int, int], ...]:
    """The part of :func:`layer_order` that layer ``layer``'s forward runs where a framework calls its
    layers one at a time (Megatron's ``TransformerBlock``): from the layer's first ``pre`` to the next
    layer's, the last layer's to the end -- with two nano-batches across layers it includes the
    layer before's ``finish`` and ``post`` of nano-batch 1."""
    order = layer_order(n_layers, nano_batches)
    starts = [order.index(("pre", 0, i)) for i in range(n_layers)] + [len(order)]
    return order[starts[layer]:starts[layer + 1]]


__all__ = ["RUN", "START", "WAIT", "CHAIN", "FORWARD", "BACKWARD", "STAGES", "PIECES", "BACKWARD_OF", "Instr",
           "Program", "Builder", "layer_order", "layer_share"]
