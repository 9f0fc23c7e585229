"""Run a function on N *virtual* ranks: threads of this process sharing one in-memory process group.

    from distattn.distributed.virtual import run_virtual
    results = run_virtual(my_fn, 64, arg1, timeout=120)   # [rank 0's return, rank 1's, ...]

The in-process twin of :func:`distattn.distributed.spawn.run_distributed`, for worlds too big for processes (64
gloo ranks do not fit a small machine; 128 threads do). ``my_fn(*args, **kwargs)`` runs once per
rank, each in its own thread with ``torch.distributed`` initialised for it: ``dist.group.WORLD``,
``get_rank``/``get_world_size``, sub-groups, DeviceMesh, the group's store, ``isend``/``irecv``
and ``batch_isend_irecv``, ``all_to_all_single`` (uneven splits), ``all_gather_single``/``all_gather``,
``reduce_scatter_single``, ``all_reduce``, ``broadcast``, ``barrier`` and the object collectives,
async or not. ``my_fn`` need not be picklable: it may close over tensors the caller computed once
(an oracle), which the ranks must not modify. Tensors move by in-memory copies: this tests the
algorithms, not gloo or nccl.

A rank that raises makes ``run_virtual`` raise :class:`~distattn.distributed.spawn.RankError` with its traceback
(the first to fail: the others' waits are woken and fail at once). A wait for a rank that already
returned fails at once, one for a rank that never comes after ``collective_timeout`` seconds; a run
longer than ``timeout`` raises ``TimeoutError`` (a thread stuck outside a wait cannot be stopped and
is left running as a daemon). One run at a time per process; afterwards torch.distributed is as it
was (a group of the caller's is back), so runs repeat and ``run_distributed`` works between them.

How: during a run c10d's registry of groups (``distributed_c10d._world``) and its C++ registry of
group names are per thread, so each rank's thread calls ``init_process_group`` for itself, with our
backend (:class:`_VirtualGroup`) over a shared ``HashStore``. A send is buffered (it completes at
once; the receive waits for it); a collective is posted when issued and completes in ``wait()``.
Autograd's device threads are off during the run: a backward runs on the calling (the rank's) thread.
"""

from __future__ import annotations

import sys
import threading
import time
import traceback
from collections import Counter
from contextlib import contextmanager
from datetime import timedelta
from types import SimpleNamespace
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

from .spawn import RankError

_BACKEND = "distattn_virtual"
_POLL = 0.05   # seconds between a waiting rank's looks at whether the run failed
_WORLD_MAPS = ("pg_map", "pg_names", "pg_group_ranks", "pg_backend_config", "tags_to_pg", "pg_to_tag",
               "pg_coalesce_state")
_one_run = threading.Lock()
_local = threading.local()   # .hub: the run a rank's thread belongs to (our backend's constructor reads it)
_REDUCE = {dist.ReduceOp.SUM: lambda x: x.sum(0), dist.ReduceOp.AVG: lambda x: x.mean(0),
           dist.ReduceOp.PRODUCT: lambda x: x.prod(0), dist.ReduceOp.MIN: lambda x: x.amin(0),
           dist.ReduceOp.MAX: lambda x: x.amax(0)}


class _Slot:
    """One message (``need = 1``) or one collective (``need`` = the group's size): what the ranks
    posted, and how many of its ``readers`` took their results."""

    def __init__(self, need: int, readers: int, op: str):
        self.need, self.readers, self.op, self.items, self.reads = need, readers, op, {}, 0
        self.ready = threading.Event()


class _Hub:
    """What the ranks of one run share."""

    def __init__(self):
        self.lock = threading.Lock()
        self.slots: dict = {}
        self.store = dist.HashStore()
        self.failed: str | None = None   # set: every wait stops, saying why
        self.first_error: tuple[int, str, str] | None = None   # (rank, message, traceback): the root cause
        self.returned: set[int] = set()

    def post(self, key, need: int, readers: int, op: str, who: int, item, what: str = "") -> _Slot:
        with self.lock:
            slot = self.slots.setdefault(key, _Slot(need, readers, op))   # the first to come makes it
            if slot.op != op:
                raise RuntimeError(f"{what}: mismatched collectives: group rank(s) {sorted(slot.items)} called "
                                   f"{slot.op} there")
            slot.items[who] = item
            if len(slot.items) == slot.need:
                slot.ready.set()
            return slot

    def taken(self, key, slot: _Slot) -> None:
        with self.lock:
            slot.reads += 1
            if slot.reads == slot.readers:
                del self.slots[key]

    def fail(self, why: str, error: tuple[int, str, str] | None = None) -> None:
        with self.lock:
            if self.failed is None:
                self.failed, self.first_error = why, error


class _Work(dist.Work):
    """Done once ``complete()`` (run by the first ``wait``) returned."""

    def __init__(self, complete: Callable[[], None] | None = None):
        super().__init__()
        self._complete = complete

    def wait(self, timeout=None) -> bool:
        if self._complete is not None:
            self._complete()
            self._complete = None
        return True

    def is_completed(self) -> bool:
        return self._complete is None


class _VirtualGroup(dist.ProcessGroup):
    """One rank's view of one process group of a run. The n-th collective a rank issues on a group
    meets the n-th of the other members; the n-th send between two ranks (with a tag) the n-th receive."""

    def __init__(self, hub: _Hub, opts):
        super().__init__(opts.group_rank, opts.group_size)
        self.hub, self.timeout = hub, opts.timeout
        self.ranks = list(opts.global_ranks_in_group) or list(range(opts.group_size))
        self.key = (opts.group_id, tuple(self.ranks))
        self._calls, self._sent, self._received = 0, Counter(), Counter()

    def getBackendName(self) -> str:
        return _BACKEND

    @property
    def group_name(self) -> str:   # torch's reads its backend's, which a Python group lacks
        return self.key[0]

    def _get_backend(self, device):
        # distattn.distributed.comm.group_timeout reads a group's timeout the way gloo and nccl expose it
        return SimpleNamespace(options=SimpleNamespace(_timeout=self.timeout))

    def _await(self, slot: _Slot, what: str, peers: dict[int, int]) -> None:
        """Wait for ``slot``; ``peers``: its item keys -> the global ranks that post them."""
        deadline = time.monotonic() + self.timeout.total_seconds()
        while not slot.ready.wait(_POLL):
            missing = sorted(g for who, g in peers.items() if who not in slot.items)
            gone = sorted(set(missing) & self.hub.returned)
            why = self.hub.failed or (f"rank(s) {gone} already returned" if gone else None)
            if why is None and time.monotonic() > deadline:
                why = f"timed out after {self.timeout.total_seconds():g} s"
            if why is not None:
                raise RuntimeError(f"{what}, waiting for rank(s) {missing}: {why}")

    def _collective(self, op: str, payload, finish: Callable[[list], None]) -> _Work:
        """Post this rank's ``payload``; ``wait()`` runs ``finish(every member's payload)`` once all came."""
        key, n = (self.key, self._calls), self._calls
        self._calls += 1
        what = f"virtual rank {self.ranks[self.rank()]}: {op} (collective #{n}) on group {self.key[0]}"
        slot = self.hub.post(key, self.size(), self.size(), op, self.rank(), payload, what)

        def complete():
            self._await(slot, what, dict(enumerate(self.ranks)))
            with torch.no_grad():
                finish([slot.items[r] for r in range(self.size())])
            self.hub.taken(key, slot)
        return _Work(complete)

    def send(self, tensors, dst: int, tag: int = 0) -> _Work:
        channel = (self.rank(), dst, tag)
        self.hub.post((self.key, channel, self._sent[channel]), 1, 1, "p2p", 0, tensors[0].detach().clone())
        self._sent[channel] += 1
        return _Work()

    def recv(self, tensors, src: int, tag: int = 0) -> _Work:
        channel = (src, self.rank(), tag)
        key = (self.key, channel, self._received[channel])
        self._received[channel] += 1
        with self.hub.lock:
            slot = self.hub.slots.setdefault(key, _Slot(1, 1, "p2p"))

        def complete():
            self._await(slot, f"virtual rank {self.ranks[self.rank()]}: recv from rank {self.ranks[src]} on group "
                              f"{self.key[0]}", {0: self.ranks[src]})
            got, into = slot.items[0], tensors[0]
            if got.numel() != into.numel():
                raise RuntimeError(f"virtual rank {self.ranks[self.rank()]}: recv of {into.numel()} elements got "
                                   f"{got.numel()} from rank {self.ranks[src]}")
            into.detach().copy_(got.view(into.shape))
            self.hub.taken(key, slot)
        return _Work(complete)

    def all_to_all_single(self, output, input, output_split_sizes, input_split_sizes, opts=None) -> _Work:
        p, me = self.size(), self.rank()
        ins = list(input_split_sizes) or [input.shape[0] // p] * p
        outs = list(output_split_sizes) or [output.shape[0] // p] * p

        def finish(pieces):
            for src, (part, at) in enumerate(zip(pieces, [sum(outs[:i]) for i in range(p)])):
                if part[me].shape[0] != outs[src]:
                    raise RuntimeError(f"all_to_all_single: rank {self.ranks[me]} expects {outs[src]} rows from "
                                       f"rank {self.ranks[src]}, which sends {part[me].shape[0]}")
                output.detach().narrow(0, at, outs[src]).copy_(part[me])
        return self._collective("all_to_all_single", input.detach().clone().split(ins), finish)

    def all_gather_single(self, output, input, opts=None) -> _Work:
        return self._collective("all_gather_single", input.detach().clone(),
                                lambda xs: output.detach().copy_(torch.cat([x.reshape(-1) for x in xs])
                                                                 .view(output.shape)))

    def allgather(self, output_tensors, input_tensors, opts=None) -> _Work:
        return self._collective("allgather", input_tensors[0].detach().clone(),
                                lambda xs: [o.detach().copy_(x) for o, x in zip(output_tensors[0], xs)])

    def reduce_scatter_single(self, output, input, opts) -> _Work:
        reduce, me = _REDUCE[opts.reduceOp.op], self.rank()
        return self._collective("reduce_scatter_single", input.detach().clone(), lambda xs: output.detach().copy_(
            reduce(torch.stack([x.reshape(self.size(), -1)[me] for x in xs])).view(output.shape)))

    def allreduce(self, tensors, opts) -> _Work:
        reduce = _REDUCE[opts.reduceOp.op]
        return self._collective("allreduce", [t.detach().clone() for t in tensors], lambda xs: [
            t.detach().copy_(reduce(torch.stack([x[i] for x in xs]))) for i, t in enumerate(tensors)])

    def broadcast(self, tensors, opts) -> _Work:
        root = opts.rootRank
        return self._collective(f"broadcast from {root}", [t.detach().clone() for t in tensors] if root == self.rank()
                                else None, lambda xs: [t.detach().copy_(x) for t, x in zip(tensors, xs[root])])

    def barrier(self, opts=None) -> _Work:
        return self._collective("barrier", None, lambda xs: None)

    # the names torch < 2.13 calls
    _allgather_base, _reduce_scatter_base, alltoall_base = all_gather_single, reduce_scatter_single, all_to_all_single


class _ThreadWorlds:
    """c10d's ``_world`` during a run: a fresh registry for every thread that looks."""

    def __init__(self):
        object.__setattr__(self, "_local", threading.local())

    def _mine(self) -> SimpleNamespace:
        local = object.__getattribute__(self, "_local")
        if not hasattr(local, "world"):
            local.world = SimpleNamespace(default_pg=None, group_count=0, comms=[], **{m: {} for m in _WORLD_MAPS})
        return local.world

    def __getattr__(self, name: str):
        return getattr(self._mine(), name)

    def __setattr__(self, name: str, value) -> None:
        setattr(self._mine(), name, value)


@contextmanager
def _per_thread_c10d():
    """c10d's process-wide state swapped for one registry per thread, and all of it restored on exit
    (``init_process_group`` also sets two module globals, wraps ``sys.excepthook`` -- once per call,
    so a run would nest it ``world_size`` deep -- and sets the C++ global rank of log lines)."""
    saved = c10d._world, c10d._backend, c10d._default_pg_init_method, sys.excepthook
    # registered for the run only: any plugin changes how torch reads "cpu:gloo"-style backend strings
    dist.Backend.register_backend(_BACKEND, lambda opts, _=None: _VirtualGroup(_local.hub, opts), extended_api=True,
                                  devices=["cpu", "cuda"])
    c10d._world = _ThreadWorlds()
    torch._C._distributed_c10d._set_thread_isolation_mode(True)
    try:
        with torch.autograd.set_multithreading_enabled(False):
            yield
    finally:
        torch._C._distributed_c10d._set_thread_isolation_mode(False)
        dist.Backend._plugins.pop(_BACKEND.upper(), None)
        c10d._world, c10d._backend, c10d._default_pg_init_method, sys.excepthook = saved
        pg = c10d._world.default_pg
        torch._C._distributed_c10d._set_global_rank(pg.rank() if pg is not None else -1)


def _rank_main(hub: _Hub, rank: int, world_size: int, collective_timeout: float, fn, args, kwargs, results) -> None:
    _local.hub, world = hub, c10d._world
    try:
        dist.init_process_group(_BACKEND, store=hub.store, rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=collective_timeout))
        results[rank] = fn(*args, **kwargs)
    except BaseException as exc:  # report everything, as run_distributed does
        hub.fail(f"rank {rank} failed ({type(exc).__name__})", (rank, f"{type(exc).__name__}: {exc}",
                                                                traceback.format_exc()))
    finally:
        with hub.lock:
            hub.returned.add(rank)
        if c10d._world is world and dist.is_initialized():   # not after the run ended: the caller's again
            dist.destroy_process_group()


def run_virtual(fn: Callable[..., Any], world_size: int, *args, timeout: float = 300.0,
                collective_timeout: float = 60.0, **kwargs) -> list[Any]:
    """Run ``fn(*args, **kwargs)`` on ``world_size`` virtual ranks (threads); return each rank's result.

    Raises :class:`~distattn.distributed.spawn.RankError` if a rank raises, ``TimeoutError`` if not all ranks
    finish within ``timeout`` seconds; a wait inside a rank fails after ``collective_timeout``.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if not timeout > 0 or not collective_timeout > 0:
        raise ValueError(f"timeout and collective_timeout must be positive seconds, got {timeout!r} and "
                         f"{collective_timeout!r}")
    if not _one_run.acquire(blocking=False):
        raise RuntimeError("run_virtual: another run is in progress in this process (runs do not nest)")
    try:
        hub, results = _Hub(), [None] * world_size
        threads = [threading.Thread(target=_rank_main, name=f"distattn-virtual-rank-{rank}", daemon=True,
                                    args=(hub, rank, world_size, collective_timeout, fn, args, kwargs, results))
                   for rank in range(world_size)]
        with _per_thread_c10d():
            try:
                for t in threads:
                    t.start()
                deadline = time.monotonic() + timeout
                for t in threads:
                    t.join(max(0.0, deadline - time.monotonic()))
            finally:   # late, or Ctrl-C here: wake every wait, give the ranks a moment to end
                late = [r for r, t in enumerate(threads) if t.is_alive()]
                if late:
                    hub.fail(f"the run took longer than {timeout:g} s or was interrupted")
                    grace = time.monotonic() + 1.0
                    for t in threads:
                        t.join(max(0.0, grace - time.monotonic()))
        if hub.first_error is not None:
            raise RankError(*hub.first_error)
        if late:
            raise TimeoutError(f"virtual ranks {late} did not finish within {timeout:g} s")
        return results
    finally:
        _one_run.release()
