"""``parallel.nano_batches`` unset: one or two nano-batches, whichever the simulator prices faster for
this job, not a number fixed by the scheduler's name.

Two nano-batches pay where one nano-batch's attention transfers hide behind the other's linear layers
(every executor has the stages, :mod:`distattn.runtime.pingpong`), and cost where the job is too small for
that to outweigh twice the kernel calls and collectives, or where a micro-batch holds one document
(nothing to cut). Which one wins depends on the model, the CP size, the links and the documents, so
the trainer asks the simulator, and takes two where they save more than :data:`MARGIN` of the
priced time: the first :data:`STEPS` steps of the run's own stream, each priced at
one and at two nano-batches on the model ``parallel.scheduler: auto`` prices with
(:func:`.auto_plan.job_of`: the run's model on H100s, ``parallel.network``'s links), with the run's
checkpointing, data-parallel mode (``parallel.dp_mode``), ``comm_dtype`` and ``cad_backward``. Planning
time is left out (the simulator's ``planning: ignored``), so the choice is a pure function of the config
and the data: every rank would make the same one, and a resumed run makes the one its first start made. Rank 0 makes it and
broadcasts it (:func:`chosen_nano_batches`), and logs it: at INFO where it is two, at DEBUG where
it is the plain one.

Nothing to price, and the scheduler's registry default stands, where the run has one CP rank (no
attention transfers to hide) or the simulator does not model the run (fewer tokens than ranks):
the reason is logged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

import torch.distributed as dist

from .config import RunConfig

STEPS = 4   # steps of the run's stream the choice is priced on
COUNTS = (1, 2)
# two nano-batches are chosen only where they save more than this share of the step: below it the
# difference is inside the simulator's error, and one nano-batch holds fewer buffers
MARGIN = 0.02


@dataclass(frozen=True)
class NanoChoice:
    """Nano-batches per micro-batch and why: ``step_s`` the simulated time of the priced steps per
    count (empty where nothing was priced), ``reason`` one line."""
    count: int
    reason: str
    step_s: dict[int, float] = field(default_factory=dict)

    def line(self) -> str:
        return f"parallel.nano_batches: {self.count} ({self.reason})"


def choose_nano_batches(cfg: RunConfig, sequences: list[list[list[int]]],
                        cad_backward: str | None = None) -> NanoChoice:
    """The nano-batch count for ``cfg`` (module docstring). ``sequences``: the run's first steps, each
    ``parallel.dp`` sequences of document lengths (:meth:`GlobalBatches.peek_lengths`);
    ``cad_backward``: the trainer's agreed mode (``cad``'s servers), None elsewhere."""
    from ..schedulers import spec
    from ..sim.simulate import simulate
    from .auto_plan import job_of, network_of

    p, t = cfg.parallel, cfg.train
    if p.nano_batches is not None:
        return NanoChoice(p.nano_batches, "set in the config")
    default = spec(p.fixed_scheduler).nano_batches_for(None)
    if p.fixed_cp == 1:
        return NanoChoice(default, f"{p.fixed_scheduler}'s default: one CP rank has no attention transfers to hide")
    # (the run's data-parallel mode and its shard group: hsdp's default, a node's ranks, is the simulator's too)
    job = replace(job_of(cfg), cp=p.fixed_cp, packing=cfg.packing, dp_mode=p.dp_mode, dp_shard=p.dp_shard,
                  ulysses_degree=p.ulysses_degree, comm_dtype=p.comm_dtype, planning="ignored",
                  activation_checkpointing=t.activation_checkpointing, mlp_chunk=t.mlp_chunk,
                  **({} if cad_backward is None else {"cad_backward": cad_backward}))
    network = network_of(cfg)
    priced: dict[int, float] = {}
    for count in COUNTS:   # (timed at the run's checkpointing whatever an H100's memory would hold)
        try:
            priced[count] = sum(simulate(replace(job, nano_batches=count), network, [p.fixed_scheduler],
                                         replica_docs=step)[0]["step_time_s"] for step in sequences)
        except ValueError as exc:   # a run the simulator does not model (fewer tokens than ranks, ...)
            return NanoChoice(default, f"{p.fixed_scheduler}'s default: the simulator cannot time this run: {exc}")
    best = 2 if priced[2] < (1 - MARGIN) * priced[1] else 1
    one, two = (f"{priced[n] * 1e3:,.1f} ms with {n}" for n in COUNTS)
    return NanoChoice(best, f"unset: the simulator prices the first {len(sequences)} steps at {one}, {two} on "
                            f"{p.fixed_scheduler} x {p.fixed_cp} ranks (H100s, parallel.network's links)", priced)


def chosen_nano_batches(cfg: RunConfig, first_steps: list | None, cad_backward: str | None) -> int:
    """Every rank's nano-batch count: rank 0 chooses (:func:`choose_nano_batches` on ``first_steps``,
    the stream's first :data:`STEPS` steps whatever step the run resumes at) and logs why; the others
    receive it."""
    if cfg.parallel.nano_batches is not None:
        return cfg.parallel.nano_batches
    got = [None]
    if dist.get_rank() == 0:
        choice = choose_nano_batches(cfg, first_steps, cad_backward)
        # a line where the choice changes how the run steps; one nano-batch is the plain run
        logging.getLogger(__name__).log(logging.INFO if choice.count > 1 else logging.DEBUG, choice.line())
        got = [choice.count]
    dist.broadcast_object_list(got, src=0)
    return int(got[0])
