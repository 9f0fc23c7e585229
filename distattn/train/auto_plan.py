"""``parallel.cp: auto`` and ``parallel.scheduler: auto``: each step's CP groups, documents and schedulers.

A step takes the stream's next ``dp`` sequences of ``data.seq_len`` tokens (as stream packing does:
a document cut where a sequence ends is two pieces), and lays the ``world_size`` ranks out for them
with :func:`distattn.sim.per_batch.choose_step` -- CP groups of power-of-two sizes, aligned blocks of
the meshes made at start-up (:func:`auto_meshes`), each with its documents and its scheduler, priced
on the simulator's model of the job (``parallel.network``'s links, an H100's kernel and memory).
The choice is a pure function of the documents: rank 0 makes it, in a process of its own
(:class:`~.chooser.ChooserProcess`, so the search never holds the GIL its rank's step needs), the
others read it from a store rank 0 serves (:class:`SharedChoice`; no collective), and every rank
reads its own group's pieces and plans them on its group's mesh. Two tasks a step, both on the
plan-ahead thread (:class:`~.plan_ahead.PlanAhead`), in order:

1. :meth:`AutoPlanner.fixed`: the batch, and this rank's micro-batch of the *fixed choice* --
   ``dp`` groups of ``world_size / dp`` ranks running ``parallel.scheduler`` (``zigzag`` under
   ``scheduler: auto``), group ``r`` on sequence ``r`` -- without plans;
2. :meth:`AutoPlanner.choose`: the step's choice and its plans. A step whose chooser gives no answer
   (it died or stopped answering: :mod:`.chooser` bounds the wait and says so once) gets the fixed
   choice as its choice, made on rank 0 and shared as any choice is, so no rank waits for one.

The trainer runs the choice when every rank has it when the step starts (one flag, all-reduced),
else plans the fixed choice then (:meth:`AutoPlanner.fallback`, a plan cache of its own: the thread
may still be planning) and logs that the step's choice was late. So a step makes one set of plans.
Either way the step trains the same tokens with the same loss normalisation: only which ranks
compute which documents changes, so losses and gradients are those of any fixed configuration on
the same batch.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections import Counter
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any

import numpy as np

from ..planning.packing import imbalance, workload
from ..runtime.plan_cache import PlanCache
from ..schedulers import spec
from .chooser import ChooserProcess
from .config import RunConfig
from .config.sections import AUTO
from .data.global_batch import GlobalBatches, MicroBatch
from .plan_ahead import StepPlans, replica_nano_batches

_log = logging.getLogger(__name__)


def candidates(cfg: RunConfig) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """The schedulers and CP sizes a step may choose: ``parallel.scheduler`` or every one that can
    share a step (:data:`~distattn.sim.per_batch.MIXED`), ``parallel.cp`` or every power of two
    dividing the world."""
    from ..sim.per_batch import MIXED, pow2_divisors

    p = cfg.parallel
    names = MIXED if p.scheduler == AUTO else (p.scheduler,)
    return names, (tuple(pow2_divisors(cfg.world_size)) if p.cp == AUTO else (p.cp,))


def _axis(cfg: RunConfig, name: str, cp: int) -> int | None:
    """The Ulysses axis ``name`` plans on at ``cp`` ranks (1: a 1-D mesh), None: too few heads."""
    context = cfg.plan_context()
    try:
        axis = spec(name).ulysses_axis(cp, context)
    except ValueError:
        return None
    return axis if cfg.model.n_heads >= spec(name).head_split(cp, context) else None


def auto_meshes(cfg: RunConfig, device_type: str) -> dict[tuple[str, int], Any]:
    """This rank's CP group's mesh for every ``(scheduler, cp)`` a step may choose: each CP size's
    groups are aligned blocks of ranks (``[k * cp, (k + 1) * cp)``, inside a node first), made here
    once (a collective over every rank) and found again by every plan."""
    from ..distributed.mesh import ParallelDims

    names, sizes = candidates(cfg)
    p = cfg.parallel
    built, out = {}, {}
    for name, cp in [(n, c) for c in sizes for n in names] + [(p.fixed_scheduler, p.fixed_cp)]:
        axis = _axis(cfg, name, cp)
        if axis is None:
            continue
        if (cp, axis) not in built:
            dims = ParallelDims(cfg.world_size // cp, cp, axis)
            built[cp, axis] = dims.cp_mesh(dims.build(device_type))
        out[name, cp] = built[cp, axis]
    return out


def job_of(cfg: RunConfig):
    """The job as the chooser prices it (:class:`~distattn.sim.job.SimConfig`): the run's model on
    ``world_size`` H100s, eight to a node, its ``parallel.dp_mode``; ``cad``'s servers keep nothing (its
    planner's default)."""
    from ..costmodel.model_shape import GPUS
    from ..sim.job import SimConfig
    from ..sim.kernel import AttentionKernel

    gpu, shape = GPUS["h100"], cfg.model.shape
    return SimConfig(shape, cfg.world_size, cfg.data.seq_len, 1, gpu=gpu, gpus_per_node=min(8, cfg.world_size),
                     kernel=AttentionKernel.measured(gpu, shape.head_dim),
                     token_cap_factor=cfg.data.cap / cfg.data.seq_len, cad_backward="resend",
                     dp_mode=cfg.parallel.dp_mode, dp_shard=cfg.parallel.dp_shard)


def network_of(cfg: RunConfig):
    """The links choices are priced on: ``parallel.network``, or an H100 cluster's typical ones."""
    from ..costmodel.network import profile_of

    return profile_of(cfg.parallel.network)


@dataclass(frozen=True)
class AutoPlanner:
    """The two planning tasks of a step (module docstring) for the rank ``rank``. With ``shared``,
    rank 0 alone chooses and the others read its choice (:class:`SharedChoice`)."""
    batches: GlobalBatches
    rank: int
    cache: PlanCache
    meshes: dict                  # auto_meshes'
    fixed_choice: tuple[str, int]
    names: tuple[str, ...]
    sizes: tuple[int, ...]
    backend: str
    weight: float                 # the model's attention pair weight
    options: dict                 # plan_options'
    job: Any                      # job_of's
    network: Any
    shared: "SharedChoice | None" = None
    chooser: ChooserProcess | None = None   # rank 0's (the others read its choice: shared)
    fallback_cache: PlanCache | None = None  # the fixed choice's plans, made off the thread (fallback)

    def fixed(self) -> StepPlans:
        """The step's batch, this rank's micro-batch of the fixed choice, no plans (:meth:`fallback`
        makes them); ``pieces``: every sequence of the step."""
        t0 = time.perf_counter()
        sequences = self.batches.sequences()
        state = list(self.batches.state())
        name, cp = self.fixed_choice
        groups = [(name, cp, seq, spec(name).nano_batches_for(None)) for seq in sequences]
        return self._plans(groups, self.rank // cp, sequences, state, None, time.perf_counter() - t0, planned=False)

    def fallback(self, fixed: StepPlans) -> StepPlans:
        """``fixed`` with its plans: the step whose choice came late runs the fixed choice. Called by
        the step while the thread may still be choosing, so on a plan cache of its own."""
        t0 = time.perf_counter()
        name, cp = self.fixed_choice
        lens = fixed.batch.doc_lens
        plan = self.fallback_cache.plan(lens, self.meshes[name, cp], scheduler=name, backend=self.backend,
                                        **self.options)
        return replace(fixed, parts=[(lens, 0, sum(lens))], plans=[plan],
                       made_s=fixed.made_s + time.perf_counter() - t0)

    def choose(self, fixed: StepPlans) -> StepPlans:
        """The step's choice (:func:`~distattn.sim.per_batch.choose_step`, in rank 0's chooser process) and
        its plans, for ``fixed``'s batch."""
        t0 = time.perf_counter()
        pieces = [piece for seq in fixed.pieces for piece in seq]
        lens = [end - start for _, _, start, end in pieces]
        name, cp = self.fixed_choice

        def decide() -> tuple[list, float]:   # (rank 0: the others read its choice)
            # the fixed choice, and each pooling scheduler pooled over every group as it runs fixed: a step
            # is never predicted slower than either
            pooling = [n for n in self.names if spec(n).pools]
            fixed_args = [(n, cp, 1) for n in dict.fromkeys((name, *pooling)) if n in self.names and cp in self.sizes]
            got = self.chooser.choose(lens, fixed_args)
            # no answer (the chooser died or hung; it said so): the fixed choice, shared like any choice
            # so that no rank waits for one
            return (self._fixed_layout(fixed.pieces), None) if got is None else got[:2]
        layout, predicted = decide() if self.shared is None else self.shared.next(self.rank, decide)
        groups = [(n, c, [pieces[i] for i in which], nano) for n, c, which, _, nano in layout]
        first = np.cumsum([0] + [group[1] for group in layout])
        mine = int(np.searchsorted(first, self.rank, side="right")) - 1
        return self._plans(groups, mine, fixed.pieces, fixed.data_state, predicted,
                           fixed.made_s + time.perf_counter() - t0, pooled=bool(layout[0][3]))

    def _fixed_layout(self, sequences) -> list:
        """The fixed choice as :meth:`~distattn.sim.per_batch.StepChoice.layout` gives a choice: group ``r``
        on sequence ``r``'s pieces, unpooled, the scheduler's default nano-batches (as :meth:`fixed`)."""
        name, cp = self.fixed_choice
        first = np.cumsum([0] + [len(seq) for seq in sequences])
        return [[name, cp, list(range(first[r], first[r + 1])), False, spec(name).nano_batches_for(None)]
                for r in range(len(sequences))]

    def close(self) -> None:
        if self.chooser is not None:
            self.chooser.close()

    def _plans(self, groups, mine: int, sequences, state, predicted, made: float, planned: bool = True,
               pooled: bool = False) -> StepPlans:
        """This rank's micro-batch of ``groups`` (``(scheduler, cp, pieces, nano-batches)``, group
        ``mine``'s) and, ``planned``, its nano-batches and a plan each: the choice's count, cut alike over
        its class -- every group of its size and scheduler, one nano-batch where any holds a single
        document -- as the simulator prices it (:func:`~distattn.sim.micro.micro_batch`). ``pooled``:
        every group runs one ``cad`` plan over the world (as a fixed ``cad`` with ``parallel.cad_pool``
        does), given every group's documents of each nano-batch."""
        import torch.distributed as dist

        name, cp, own, count = groups[mine]
        lens = [end - start for _, _, start, end in own]
        per_rank = [float(workload([b - a for _, _, a, b in g], self.weight).sum()) / c if g else 0.0
                    for _, c, g, _ in groups for _ in range(c)]
        trained = sum(end - start for seq in sequences for _, _, start, end in seq)
        batch = MicroBatch(self.batches.packer.read(own), lens, imbalance(np.asarray(per_rank)), trained, None)
        parts, plans = [], []
        if planned:
            members = [i for i, (n, c, _, _) in enumerate(groups) if pooled or (n, c) == (name, cp)]
            everyone = replica_nano_batches([[b - a for _, _, a, b in groups[i][2]] for i in members], count,
                                            self.weight)
            parts = everyone[members.index(mine)]
            for i, (docs, _, _) in enumerate(parts):
                pool = {"pool": dist.group.WORLD, "pool_doc_lens": [e[i][0] for e in everyone]} if pooled else {}
                plans.append(self.cache.plan(docs, self.meshes[name, cp], scheduler=name, backend=self.backend,
                                             **self.options, **pool))
        return StepPlans(batch, parts, plans, state, made,
                         choice=[[n, c] for n, c, _, _ in groups], predicted_step_s=predicted, pieces=tuple(sequences))


class SharedChoice:
    """One choice a step for every rank: rank 0 makes it, publishes it in a key-value store it hosts
    (:func:`shared_choice`: torch's public ``TCPStore``; a key per step, JSON) and every other rank
    reads it there -- the choice is the same pure function of the documents on every rank, so this
    only spares the other ranks the work (on a host whose cores its ranks share, making it on every
    rank costs more than the layouts save). Store reads are not collectives: they wait for rank 0's
    key up to the store's timeout. Keys of steps every rank has passed are deleted (the plan-ahead
    thread runs a step's tasks in order, so when rank 0 makes step ``n``'s choice every rank has read
    step ``n - 2``'s). When the run ends, rank 0 marks the steps it will not choose (:meth:`abandon`),
    so a rank whose thread already waits for one stops waiting."""

    def __init__(self, store, first_step: int):
        self.store, self.step, self.first = store, first_step, first_step

    def next(self, rank: int, decide) -> tuple[list, float]:
        step, self.step = self.step, self.step + 1
        if rank == 0:
            try:
                layout, predicted = decide()
            except Exception as exc:
                # the others raise it too (no rank waits for a choice that will not come): every rank's step
                # then finds its choice ready, and raises
                self.store.set(self._key(step), json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
                raise
            self.store.set(self._key(step), json.dumps([layout, predicted]))
            if step - KEPT_STEPS >= self.first:
                self.store.delete_key(self._key(step - KEPT_STEPS))
            return layout, predicted
        got = json.loads(self.store.get(self._key(step)))
        if got is None:
            raise RuntimeError(f"step {step + 1}'s choice was abandoned: the run ended before rank 0 made it")
        if isinstance(got, dict):
            raise RuntimeError(f"step {step + 1}'s choice failed on rank 0: {got['error']}")
        layout, predicted = got
        return layout, predicted

    def abandon(self, rank: int) -> None:
        """Rank 0, as the run ends: the next steps (at most two are ever queued) will have no choice."""
        if rank == 0:
            for step in (self.step, self.step + 1):
                self.store.set(self._key(step), "null")

    def _key(self, step: int) -> str:
        return f"distattn/auto/{step}"


KEPT_STEPS = 4   # steps of choices kept in the store (SharedChoice)


def shared_choice(first_step: int, timeout_s: float) -> SharedChoice:
    """Rank 0's choice for every rank through a ``TCPStore`` rank 0 serves on a free port; collective
    (rank 0 tells the others where). A read waits ``timeout_s`` at most for rank 0's key."""
    import torch.distributed as dist

    timeout = timedelta(seconds=timeout_s)
    if dist.get_rank() == 0:
        store = dist.TCPStore(_own_address(), 0, None, True, timeout, wait_for_workers=False)
        where = [(_own_address(), store.port)]
    else:
        where = [None]
    dist.broadcast_object_list(where, src=0)
    if dist.get_rank() != 0:
        store = dist.TCPStore(*where[0], None, False, timeout)
    return SharedChoice(store, first_step)


def _own_address() -> str:
    """Where the other ranks reach this one: the address of the interface that routes to
    ``MASTER_ADDR`` (a launcher's), or the loopback for local processes (no ``MASTER_ADDR``)."""
    master = os.environ.get("MASTER_ADDR")
    if not master:
        return "127.0.0.1"
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:   # (UDP: connecting sends nothing)
            probe.connect((master, 9))
            return probe.getsockname()[0]
    except OSError:
        return socket.gethostname()


def make_planner(cfg: RunConfig, rank: int, batches: GlobalBatches, cache: PlanCache, meshes: dict,
                 options: dict, first_step: int) -> AutoPlanner:
    p = cfg.parallel
    names, sizes = candidates(cfg)
    job, network = job_of(cfg), network_of(cfg)
    return AutoPlanner(batches, rank, cache, meshes, (p.fixed_scheduler, p.fixed_cp), names, sizes, p.backend,
                       cfg.model.shape.pair_weight(), options, job, network,
                       shared_choice(first_step, p.timeout_s) if cfg.world_size > 1 else None,
                       # the chooser gives up well before the other ranks' reads of its choice time out
                       ChooserProcess(job, network, names, sizes, limit_s=0.75 * p.timeout_s) if rank == 0 else None,
                       PlanCache())


def describe_choice(choice: list) -> str:
    """A step's ``choice`` metric (``[scheduler, cp]`` per group) in words, alike groups counted:
    ``[["ulysses", 4], ["ring", 1], ["ring", 1]]`` -> ``"1 x ulysses cp 4, 2 x ring cp 1"``."""
    counts = Counter((name, cp) for name, cp in choice)   # (first-seen order)
    return ", ".join(f"{k} x {name} cp {cp}" for (name, cp), k in counts.items())


def late_choice(step: int, fixed: StepPlans) -> None:
    name, cp = fixed.choice[0]
    _log.warning("step %d: its choice of CP groups was not ready on every rank when the step started; it runs the "
                 "fixed choice (%s, cp %d)", step, name, cp)


__all__ = ["candidates", "auto_meshes", "job_of", "network_of", "AutoPlanner", "SharedChoice", "shared_choice",
           "make_planner", "late_choice", "describe_choice"]
