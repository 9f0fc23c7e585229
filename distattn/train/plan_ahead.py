"""Each step's batch and attention plans, made while the step before runs (``parallel.plan_ahead``).

Making a step's plans costs host time -- ``cad``'s placement is milliseconds to seconds at scale --
and inline it sits inside the step. :class:`PlanAhead` moves it off the step: when step ``N`` starts
it hands step ``N+1``'s preparation (:class:`StepPlanner`: take the global batch, cut the
nano-batches, make their plans) to one background thread, so step ``N+1`` finds its plans ready.

Why that is safe and exact:

* No collective runs on the thread. The global batch is a pure function of the packer's state and
  every rank sees every replica's document lengths (:attr:`.global_batch.MicroBatch.replicas`), so
  the nano-batch cut every replica must agree on is computed here (:func:`replica_nano_batches`,
  what :func:`agreed_nano_batches`' MIN all-reduce agrees on), and a pooled ``cad`` plan is
  given every CP group's documents (``distattn.plan(..., pool=group, pool_doc_lens=...)``) instead
  of exchanging them. Plans are then the same as inline ones, made in the same order.
* The data cursor: :class:`StepPlans` carries the packer's state right after its batch was taken
  (on the thread, before anything else moves it); the trainer checkpoints the state of the last
  step it *ran*, so a checkpoint after step ``N`` resumes at step ``N+1``'s batch (held pieces of
  balanced packing included), whatever the thread has taken since, and a stop discards it.
* Errors: the thread's exception is raised on the main thread by the step that needs its plans
  (:meth:`PlanAhead.take`), the same exception; :meth:`PlanAhead.close` drops a preparation not yet
  used and joins the thread. A step is never prepared past ``train.steps``.

Metrics: ``planning_s`` (the seconds a step waited for its batch and plans: 0 when they were
ready; all of their making when inline) and ``plan_made_s`` (the seconds making them took, wherever
it ran), each the maximum over the ranks.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist

from ..kernels.speed import device_gpu
from ..runtime.pingpong import all_ranks, nano_batches
from ..runtime.plan_cache import PlanCache
from ..runtime.plans import Plan
from ..costmodel.tiles import PAIRS
from .config import RunConfig
from .data.global_batch import GlobalBatches, MicroBatch

Parts = list[tuple[list[int], int, int]]   # nano-batches: (doc_lens, start, end) each


def plan_options(cfg: RunConfig, peak_flops: float | None, cad_backward: str | None = None,
                 device: torch.device | None = None) -> dict:
    """The options of every step's plans beyond the scheduler and backend (``peak_flops``: the
    device's, MFU's denominator, None on CPU; ``cad_backward``: ``parallel.cad_backward`` resolved,
    :func:`distattn.train.preflight.memory.cad_backward`; ``device``: where the run computes -- cad
    balances its kernel's seconds there: a GPU's by name (:func:`distattn.kernels.speed.device_gpu`),
    a CPU's pairs (:data:`distattn.costmodel.tiles.PAIRS`); None: an H100's)."""
    p, t = cfg.parallel, cfg.train
    # the job as `distattn simulate` describes it: each scheduler derives its options from it (usp
    # its degree, the mesh's "ulysses" axis; cad the kernel's seconds on the device)
    options: dict[str, Any] = {}
    if cfg.world_size > 1:   # (one rank plans nothing: local attention)
        cpu = device is not None and device.type == "cpu"
        options["context"] = cfg.plan_context(None if peak_flops is None else peak_flops / 1e12,
                                              None if device is None else device_gpu(device), PAIRS if cpu else None)
    if t.deterministic:
        options["deterministic"] = True
    if p.comm_dtype is not None:
        options["comm_dtype"] = p.comm_dtype
    if cad_backward is not None:
        options["backward"] = cad_backward
    if p.pools_replicas:
        # the pool is every dp x cp rank: the world group, which exists already (the job has exactly
        # dp * cp ranks), so steps make no group; CAD's all-to-alls cross replicas
        options["pool"] = dist.group.WORLD
    return options


def agreed_cad_backward(cfg: RunConfig, device: torch.device) -> str | None:
    """``parallel.cad_backward`` as every rank runs it (:func:`distattn.train.preflight.memory.cad_backward`
    against this rank's share of its device's memory: a GPU's, or this machine's over its local
    ranks); under ``auto`` one MIN all-reduce makes it ``keep`` only where every rank's estimate fits
    (the ranks must move the same rows). None where the scheduler has no such choice."""
    from .preflight.memory import cad_backward, physical_memory_bytes

    if device.type == "cuda":
        limit = torch.cuda.get_device_properties(device).total_memory
    else:
        physical = physical_memory_bytes()
        limit = None if physical is None else physical // int(os.environ.get("LOCAL_WORLD_SIZE", cfg.world_size))
    mode = cad_backward(cfg, device.type, limit)
    if mode is None or cfg.parallel.cad_backward != "auto":
        return mode
    mode = "keep" if all_ranks(mode == "keep", dist.group.WORLD, device) else "resend"
    if dist.get_rank() == 0:
        why = "its memory estimate fits" if mode == "keep" else "keeping what the workers receive would not fit"
        logging.getLogger(__name__).info("parallel.cad_backward auto: %s (%s)", mode, why)
    return mode


def replica_nano_batches(replicas, count: int, weight: float) -> list[Parts]:
    """Every replica's nano-batches (:func:`distattn.runtime.pingpong.nano_batches`), by DP rank: ``count`` each
    if every replica's micro-batch has two documents or more, else one each -- the replicas must
    cut alike (a pooled plan spans them), which
    :func:`agreed_nano_batches` agrees on with an all-reduce and this knows locally."""
    can = count > 1 and all(len(lens) > 1 for lens in replicas)
    return [nano_batches(list(lens), count if can else 1, weight) for lens in replicas]


def agreed_nano_batches(doc_lens, count: int, weight: float, agree: bool, device) -> list[tuple[list[int], int, int]]:
    """The micro-batch's nano-batches, ``(doc_lens, start, end)`` each (:func:`distattn.runtime.pingpong.nano_batches`,
    balancing tokens and ``weight`` per attention pair). A micro-batch of one document is one
    nano-batch; with ``agree`` (several replicas, whose documents differ) every rank takes one
    unless all can be cut (:func:`distattn.runtime.pingpong.all_ranks`). The trainer itself cuts with
    :func:`replica_nano_batches`, which knows every replica's documents: the same cut, no
    collective."""
    lens = list(doc_lens)
    can = count > 1 and len(lens) > 1
    if count > 1 and agree:
        can = all_ranks(can, None, device)
    return nano_batches(lens, count if can else 1, weight)


@dataclass(frozen=True)
class StepPlans:
    """One step's batch ready to run: this rank's micro-batch, its nano-batches and one plan each,
    the data state right after the batch was taken (what a checkpoint after this step stores) and
    the seconds making all of it took; under ``auto`` (:mod:`.auto_plan`) also the step's ``choice``
    (``[scheduler, cp]`` per group), its ``predicted_step_s`` and every sequence's ``pieces``."""
    batch: MicroBatch
    parts: Parts
    plans: list[Plan]
    data_state: list[int]
    made_s: float
    choice: list | None = None
    predicted_step_s: float | None = None
    pieces: tuple = ()


@dataclass(frozen=True)
class StepPlanner:
    """Prepares the next step (a call: :class:`StepPlans`): host work only, no collective (module
    docstring); the only user of ``batches`` and ``cache`` while the run steps."""
    batches: GlobalBatches
    dp_rank: int
    cache: PlanCache
    mesh: Any                    # this rank's CP group (DeviceMesh)
    scheduler: str
    backend: str
    count: int                   # nano-batches per micro-batch
    weight: float                # the model's attention pair weight (the nano-batch cut balances it)
    options: dict                # plan_options'

    def __call__(self) -> StepPlans:
        t0 = time.perf_counter()
        batch = self.batches.next(self.dp_rank)
        state = list(self.batches.state())   # before anything else moves the cursor
        everyone = replica_nano_batches(batch.replicas, self.count, self.weight)
        parts = everyone[self.dp_rank]
        plans = []
        for i, (docs, _, _) in enumerate(parts):
            # a pooled plan gets every replica's documents of this nano-batch, in DP order: the pool is
            # the world, whose CP groups are the ("dp", "cp") mesh's rows, replica after replica
            pooled = {"pool_doc_lens": [mine[i][0] for mine in everyone]} if "pool" in self.options else {}
            plans.append(self.cache.plan(docs, self.mesh, scheduler=self.scheduler, backend=self.backend,
                                         **self.options, **pooled))
        return StepPlans(batch, parts, plans, state, time.perf_counter() - t0)


class PlanAhead:
    """Steps' :class:`StepPlans` from ``prepare``: with ``ahead``, each made on a background thread
    while the step before runs, else inline when the step asks (module docstring). ``device``: where
    the plans live (CUDA: the thread makes them on a side stream the step then waits for).
    ``refine``: a second task after each ``prepare``, on the same thread (so the two never run at
    once), given its :class:`StepPlans` (``auto``'s choice, :mod:`.auto_plan`)."""

    def __init__(self, prepare: Callable[[], StepPlans], ahead: bool, device: torch.device,
                 refine: Callable[[StepPlans], StepPlans] | None = None):
        self._prepare, self._refine = prepare, refine
        self._cuda = device.type == "cuda"
        self._stream = torch.cuda.Stream(device) if ahead and self._cuda else None
        self._thread = ThreadPoolExecutor(1, "distattn-plan-ahead", initializer=self._start, initargs=(device,)) \
            if ahead else None
        self._pending: tuple[Future, Future | None] | None = None   # (prepare, refine) of the next step

    def _start(self, device: torch.device) -> None:
        if self._cuda:
            torch.cuda.set_device(device)   # (the current device is per thread)

    def _made_on_thread(self, task: Callable, *args) -> StepPlans:
        if self._stream is None:
            return task(*args)
        with torch.cuda.stream(self._stream):
            return task(*args)

    def take(self, more: bool) -> tuple[StepPlans, float, Future | None]:
        """This step's batch and plans -- made ahead (an error making them is raised here) or now --,
        the seconds this waited for them, and the ``refine`` task's future (None: no ``refine``;
        inline: done); with ``more`` (a next step will run), starts making the next step's on the
        thread."""
        t0 = time.perf_counter()
        pending, self._pending = self._pending, None
        if pending is None:
            ready = self._prepare()
            refined = None
            if self._refine is not None:
                refined = Future()
                try:
                    refined.set_result(self._refine(ready))
                except Exception as error:   # (raised where the step takes the result)
                    refined.set_exception(error)
        else:
            first, refined = pending
            ready = first.result()
        if pending is not None and self._stream is not None:
            torch.cuda.current_stream().wait_stream(self._stream)
        waited = time.perf_counter() - t0
        if more and self._thread is not None:
            first = self._thread.submit(self._made_on_thread, self._prepare)
            second = None if self._refine is None else \
                self._thread.submit(lambda: self._made_on_thread(self._refine, first.result()))
            self._pending = (first, second)
        return ready, waited, refined

    def settled(self) -> None:
        """The step takes ``refine``'s :class:`StepPlans`: wait for the side stream it made them on."""
        if self._stream is not None:
            torch.cuda.current_stream().wait_stream(self._stream)

    def wait(self) -> float:
        """Block until the next step's plans in the making are done (an error stays for :meth:`take`
        to raise) and return the seconds waited: what a benchmark stepping two trainers in turn
        charges to the next step, so the thread never runs behind other work."""
        t0 = time.perf_counter()
        if self._pending is not None:
            futures.wait([f for f in self._pending if f is not None])
        return time.perf_counter() - t0

    def close(self) -> None:
        """Drop a preparation no step took (a stop, an error, the end) and end the thread: waits for a
        plan being made, then returns; an error it raised is dropped with it. Idempotent."""
        pending, self._pending = self._pending, None
        for future in pending or ():
            if future is not None:
                future.cancel()
        if self._thread is not None:
            self._thread.shutdown(wait=True, cancel_futures=True)
            self._thread = None
