"""A small communicator over one process group: the only place schedulers touch torch.distributed.

:class:`Comm` wraps point-to-point batches and the few collectives the
schedulers use, counts the bytes this rank sends (``bytes_sent``, what
``plan.stats()["send_bytes"]`` predicts) and turns a timed-out wait into an
error that says which step of which scheduler was waiting and for which ranks.

Setup that must not hang either lives here too: :func:`meet` (a rendezvous over
the group's key-value store that waits at most the group's timeout and names
the ranks that never came), :func:`subgroups` (process groups made from a
parent group once, with the parent's timeout, found again by later plans) and
:func:`group_timeout`.

And what a phase of a run says when another rank died or went silent in it: :func:`peer_phase`
turns torch.distributed's and gloo's errors (a store wait that timed out, "Connection closed by
peer", "pair closure") into :class:`PeerFailed`, one line naming the phase, its path and the rank
when it can be known (a store key names it; with two ranks it is the other one; the launching process
of local ranks knows which one died or stayed silent, :class:`distattn.distributed.spawn.RankError`).

It also clocks how long this rank is held up by its transfers (``wait_seconds``):
host seconds inside waits when the host blocks (gloo), and on CUDA the stall of
the compute stream, timed by events recorded around each wait (nccl's wait
does not block the host; the stream's gap is the exposed communication).

Bytes are counted the way the algorithm moves them: a P2P send counts its
tensor; an all-gather counts ``(P - 1)`` times the input (each rank's shard
reaches every other rank); a reduce-scatter counts ``(P - 1) / P`` of the input;
an all-to-all counts what goes to other ranks.
"""

from __future__ import annotations

import re
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from functools import cached_property
from typing import Any, Sequence

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

from .phases import note_phase
from .trace import WAIT, span, transfer

# torch 2.13 renamed all_gather_into_tensor / reduce_scatter_tensor to *_single
# (the old names warn); we accept torch >= 2.5, so pick whichever exists.
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _failed(what: str, exc: Exception, peers: Sequence[int]) -> RuntimeError:
    waited = f" waiting for rank(s) {sorted(set(peers))}" if peers else ""
    return RuntimeError(f"distattn: {what} failed or timed out{waited} ({exc}). Every rank of the group must "
                        f"call attention with the same plan.")


class WaitClock:
    """Seconds a rank spent held up by communication waits (see the module docstring)."""

    def __init__(self, cuda: bool):
        self.cuda, self.seconds, self._events = cuda, 0.0, []

    def start(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def stop(self, started) -> None:
        if not self.cuda:
            self.seconds += time.perf_counter() - started
            return
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        self._events.append((started, event))

    def total(self) -> float:
        """Seconds so far (on CUDA this waits for the recorded events)."""
        for begin, end in self._events:
            end.synchronize()
            self.seconds += begin.elapsed_time(end) / 1e3
        self._events = []
        return self.seconds


class Pending:
    """Outstanding requests of one batch; :meth:`wait` raises a clear error on timeout."""

    def __init__(self, start, what: str, peers: Sequence[int] = (), clock: WaitClock | None = None,
                 op: str = "send_recv"):
        """``start()`` issues the requests and returns their works (a peer that is gone can make
        issuing fail already, so it is wrapped like the wait). ``peers``: the (global) ranks the
        requests wait for, named in the error; ``clock`` times the wait; ``op``: the collective, as
        a profile names its issue (:func:`distattn.distributed.trace.transfer`)."""
        self.what, self.peers, self.clock = what, tuple(peers), clock
        try:
            with span(transfer(op)):
                self.works = start()
        except RuntimeError as exc:
            raise _failed(what, exc, self.peers) from exc

    def wait(self, timed: bool = True) -> None:
        """Wait for the requests; ``timed=False``: not on the clock (a wait on a side stream, which
        holds up no computation)."""
        started = self.clock.start() if timed and self.clock is not None and self.works else None
        with span(WAIT):
            for w in self.works:
                try:
                    w.wait()
                except RuntimeError as exc:
                    raise _failed(self.what, exc, self.peers) from exc
        self.works = []
        if started is not None:
            self.clock.stop(started)


@dataclass(eq=False)
class Comm:
    """Communication over ``group`` for one plan (mutable: it counts ``bytes_sent``)."""

    group: Any
    bytes_sent: int = field(default=0)

    @cached_property
    def clock(self) -> WaitClock:
        return WaitClock(cuda=dist.get_backend(self.group) == "nccl")

    def wait_seconds(self) -> float:
        """Seconds this rank has been held up waiting for this communicator's transfers."""
        return self.clock.total()

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)

    @property
    def size(self) -> int:
        return dist.get_world_size(self.group)

    def global_rank(self, rank: int) -> int:
        return dist.get_global_rank(self.group, rank) if self.group is not dist.group.WORLD else rank

    @cached_property
    def others(self) -> tuple[int, ...]:
        """Global ranks of the rest of the group: whom a collective waits for."""
        return tuple(self.global_rank(r) for r in range(self.size) if r != self.rank)

    def exchange(self, sends: list[tuple[torch.Tensor, int]], recvs: list[tuple[torch.Tensor, int]],
                 what: str) -> Pending:
        """Start sends ``(tensor, peer)`` and receives ``(buffer, peer)`` (group ranks) as one batch.

        Both sides must list the operations between the same two ranks in the same order.
        """
        ops = [dist.P2POp(dist.isend, t.contiguous(), self.global_rank(p), self.group) for t, p in sends]
        ops += [dist.P2POp(dist.irecv, t, self.global_rank(p), self.group) for t, p in recvs]
        self.bytes_sent += sum(nbytes(t) for t, _ in sends)
        peers = [self.global_rank(p) for _, p in [*sends, *recvs]]
        return Pending(lambda: dist.batch_isend_irecv(ops) if ops else [], what, peers, self.clock)

    def all_gather(self, output: torch.Tensor, input: torch.Tensor, what: str) -> Pending:
        """Start gathering equal-sized ``input`` from every rank into ``output`` (concatenated on dim 0)."""
        self.bytes_sent += (self.size - 1) * nbytes(input)
        return Pending(lambda: [all_gather_single(output, input.contiguous(), group=self.group, async_op=True)],
                       what, self.others, self.clock, "all_gather")

    def reduce_scatter(self, output: torch.Tensor, input: torch.Tensor, what: str) -> Pending:
        """Start summing ``input`` over ranks; this rank gets its equal dim-0 chunk in ``output``."""
        self.bytes_sent += nbytes(input) * (self.size - 1) // self.size
        return Pending(lambda: [reduce_scatter_single(output, input.contiguous(), group=self.group,
                                                       async_op=True)], what, self.others, self.clock,
                       "reduce_scatter")

    def all_reduce(self, tensor: torch.Tensor, what: str) -> Pending:
        """Start summing ``tensor`` (contiguous) over ranks, in place; a ring sends ``2 (n-1) / n`` of it."""
        self.bytes_sent += 2 * (self.size - 1) * nbytes(tensor) // self.size
        return Pending(lambda: [dist.all_reduce(tensor, group=self.group, async_op=True)], what, self.others,
                       self.clock, "all_reduce")

    def all_to_all(self, output: torch.Tensor, input: torch.Tensor, output_splits: list[int],
                   input_splits: list[int], what: str) -> Pending:
        """Start an all-to-all of 1-D buffers: ``input_splits[j]`` elements go to rank ``j``,
        ``output_splits[i]`` arrive from rank ``i``."""
        self.bytes_sent += (sum(input_splits) - input_splits[self.rank]) * input.element_size()
        return Pending(lambda: [dist.all_to_all_single(output, input.contiguous(), output_splits, input_splits,
                                                       group=self.group, async_op=True)], what,
                       self.others, self.clock, "all_to_all")


# ---- setup that waits at most the group's timeout ----------------------------------------------

def group_timeout(group) -> timedelta:
    """How long collectives on ``group`` wait: what ``init_process_group(timeout=)`` (or
    ``new_group(timeout=)``) set, which ``run_distributed(collective_timeout=)`` passes on."""
    for device in ("cpu", "cuda"):
        try:
            return group._get_backend(torch.device(device)).options._timeout
        except (RuntimeError, AttributeError, ValueError):
            continue
    return c10d.default_pg_timeout


def _store(group):
    try:
        return c10d._get_process_group_store(group)
    except (KeyError, AttributeError):  # a group torch's registry does not know: namespace the default store
        return dist.PrefixStore(f"distattn/{group.group_name}/", c10d._get_default_store())


def _wait(store, keys: list[str], timeout: timedelta) -> list[int]:
    """Wait until every key exists or ``timeout`` passed; the indices of the keys still missing.

    The store waits server-side for most of the time; the last second is polled, because
    ``FileStore`` counts its timeout in whole seconds and would overshoot by up to one."""
    deadline = time.monotonic() + timeout.total_seconds()
    if timeout > timedelta(seconds=2):
        try:
            store.wait(keys, timeout - timedelta(seconds=1))
            return []
        except RuntimeError:
            pass
    while True:
        missing = [i for i, key in enumerate(keys) if not store.check([key])]
        left = deadline - time.monotonic()
        if not missing or left <= 0:
            return missing
        time.sleep(min(0.02, left))


def meet(group, topic: str, payload: str, what: str) -> list[str]:
    """Every rank of ``group`` posts ``payload`` under ``topic``; returns all payloads in group-rank order.

    It talks to the group's key-value store only: no device synchronisation, no connection
    between the ranks needed (so it works before a group exists). The n-th call of a rank for a
    topic meets the n-th call of the others; a rank that has not come within the group's
    timeout is named in the ``RuntimeError``.
    """
    store, size, me = _store(group), dist.get_world_size(group), dist.get_rank(group)
    seq = store.add(f"distattn/{topic}/calls/{me}", 1)
    keys = [f"distattn/{topic}/{seq}/{r}" for r in range(size)]
    store.set(keys[me], payload)
    timeout, start = group_timeout(group), time.monotonic()
    missing = _wait(store, keys, timeout)
    if missing:
        names = [dist.get_global_rank(group, r) if group is not dist.group.WORLD else r for r in missing]
        raise RuntimeError(f"distattn: {what} failed or timed out: rank {dist.get_rank()} waited "
                           f"{time.monotonic() - start:.1f} s (the process group's timeout, "
                           f"{timeout.total_seconds():g} s) for rank(s) {names}, which never got there. Every rank "
                           f"of the group must make the same meshes and plans and call attention with them in the "
                           f"same order.")
    values = [v.decode() for v in store.multi_get(keys)]
    if seq > 1:  # everyone posted call seq, so everyone has read call seq - 1: drop ours
        store.delete_key(f"distattn/{topic}/{seq - 1}/{me}")
    return values


def meet_once(group, topic: str, payload: str, what: str) -> list[str] | None:
    """:func:`meet`, unless this rank already met the whole group on this very ``payload`` under
    ``topic`` (then None, for the price of one store read). The memo lives in the group's store,
    so it outlives plans: a plan per training step meets once, on the first step."""
    store, me = _store(group), dist.get_rank(group)
    memo = f"distattn/{topic}/agreed/{me}"
    seen = store.get(memo).decode().split("\n") if store.check([memo]) else []
    if payload in seen:
        return None
    values = meet(group, topic, payload, what)
    if all(v == payload for v in values):
        store.set(memo, "\n".join([*seen[-7:], payload]))  # a few shapes (e.g. layers that differ)
    return values


def subgroups(parent, rank_sets: Sequence[Sequence[int]], agree_on: str, what: str) -> list:
    """Process groups over ``rank_sets`` (lists of ``parent`` group ranks), each holding this rank.

    Made once per parent: torch's registry keeps them under a tag naming the parent, and later
    calls find them there (a plan per training step creates nothing). When one must be made, the
    parent's ranks first :func:`meet` (so a rank that never comes is named within the parent's
    timeout instead of stalling group creation, whose own default is 30 minutes) and compare
    ``agree_on`` (e.g. the layout): a ``ValueError`` names both sides when they differ. The
    groups get the parent's timeout and backend.
    """
    to_global = (lambda r: r) if parent is dist.group.WORLD else (lambda r: dist.get_global_rank(parent, r))
    tag = f"distattn:{parent.group_name}"
    members = [sorted(to_global(r) for r in ranks) for ranks in rank_sets]
    found = [c10d._find_pg_by_ranks_and_tag(tag, m) for m in members]
    if all(g is not None for g in found):
        return found
    layouts = meet(parent, "subgroups", agree_on, what)
    me = dist.get_rank(parent)
    for r, theirs in enumerate(layouts):
        if theirs != agree_on:
            raise ValueError(f"{what}: rank {to_global(me)} asked for {agree_on} but rank {to_global(r)} for "
                             f"{theirs}: every rank must pass the same options to distattn.plan")
    timeout, out = group_timeout(parent), []
    for m in members:
        try:
            out.append(c10d._new_group_with_tag(m, timeout=timeout, backend=dist.get_backend(parent), pg_tag=tag,
                                                use_local_synchronization=True))
        except RuntimeError as exc:
            raise RuntimeError(f"distattn: {what}: creating the process group of ranks {m} failed or timed out "
                               f"after {timeout.total_seconds():g} s ({exc})") from exc
    return out


# ---- a peer that failed, in one line ------------------------------------------------------------

# what gloo and the store say when the other end is gone or silent (gloo raises plain RuntimeErrors)
_GONE = ("connection closed by peer", "connection reset by peer", "broken pipe", "connection refused")
_SILENT = ("timeout", "timed out", "pair closure")
_STORE_KEY_RANK = re.compile(r"keys: \S*?/(\d+)\s*$")   # gloo's connect waits for the missing rank's key
_NAMED = re.compile(r"for rank\(s\) \[([\d, ]+)\]")


@dataclass(frozen=True)
class PeerFailure:
    """What a rank knows when a collective or the store failed because of another rank: ``phase``
    (``"start-up"``, ``"saving checkpoint step_6"``, ``"checkpoint agreement"``), ``path`` (what the
    phase works on), ``ranks`` (whom to blame; empty: unknown), ``what`` happened to them and the
    underlying ``cause`` in one line."""

    phase: str
    path: str
    ranks: tuple[int, ...] = ()
    what: str = "failed"
    cause: str = ""

    def line(self) -> str:
        who = (f"rank {self.ranks[0]}" if len(self.ranks) == 1 else f"ranks {list(self.ranks)}") if self.ranks \
            else "a peer rank"
        return f"{self.phase} ({self.path}): {who} {self.what}"

    def blame(self, ranks, what: str | None = None) -> "PeerFailure":
        """The same failure pinned on ``ranks`` (who the launcher saw die or stay silent)."""
        return PeerFailure(self.phase, self.path, tuple(sorted(ranks)), what or self.what, self.cause)


class PeerFailed(RuntimeError):
    """A peer rank died or stopped answering during a phase of the run; ``str`` is one line naming the
    rank (when known), the phase and the path. ``failure`` holds the parts (:class:`PeerFailure`)."""

    def __init__(self, failure: PeerFailure):
        super().__init__(failure.line())
        self.failure = failure

    def __reduce__(self):   # pickles to the launching process (distattn.distributed.spawn) with its parts
        return PeerFailed, (self.failure,)


def peer_failure(exc: BaseException, phase: str, path, seconds: float | None = None) -> PeerFailure | None:
    """``exc`` as a :class:`PeerFailure` when it is torch.distributed's or gloo's way of saying another
    rank is gone or silent, else None. ``seconds``: the timeout the phase ran under."""
    if isinstance(exc, PeerFailed):
        return exc.failure
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    low = str(exc).lower()
    if not isinstance(exc, dist.DistError) and not (isinstance(exc, RuntimeError)
                                                    and any(w in low for w in _GONE + _SILENT)):
        return None
    if seconds is None and dist.is_initialized():
        seconds = group_timeout(dist.group.WORLD).total_seconds()
    within = f" within {seconds:g} s" if seconds else ""
    ranks: tuple[int, ...] = ()
    if any(w in low for w in _GONE):
        what = "closed its connection (it died or was killed)"
    elif any(w in low for w in _SILENT):
        joining = phase == "start-up" and (isinstance(exc, dist.DistStoreError) or not dist.is_initialized())
        what = f"did not join the process group{within}" if joining else f"did not answer{within}"
        found = _STORE_KEY_RANK.search(str(exc).strip())
        ranks = (int(found.group(1)),) if found and isinstance(exc, dist.DistStoreError) else ()
    else:
        what = f"failed ({text})"
    named = _NAMED.search(str(exc))   # this module's own store waits name who never came
    if not ranks and named:
        ranks = tuple(int(r) for r in named.group(1).split(","))
    if not ranks and dist.is_initialized() and dist.get_world_size() == 2:
        ranks = (1 - dist.get_rank(),)   # two ranks: the peer is the other one
    return PeerFailure(phase, str(path), ranks, what, text)


@contextmanager
def peer_phase(phase: str, path, seconds: float | None = None):
    """Run a phase of the run in which another rank's death or silence surfaces as an error of
    torch.distributed or gloo: it leaves as :class:`PeerFailed`, one line naming the rank (when known),
    ``phase`` and ``path``. Other errors pass unchanged. In a rank of :func:`distattn.distributed.spawn.run_distributed`
    the launching process is told the phase, so that a rank that dies without a word is reported with it."""
    note_phase(phase, str(path))
    try:
        yield
    except PeerFailed:
        raise
    except RuntimeError as exc:
        failure = peer_failure(exc, phase, path, seconds) if _distributed(exc) else None
        if failure is None:
            raise
        raise PeerFailed(failure) from exc
    finally:
        note_phase(None)


def _distributed(exc: BaseException | None) -> bool:
    """Whether ``exc`` (or the error it was raised from) came out of torch.distributed or this module's
    waits: a RuntimeError that merely says "timed out" elsewhere (a data source, the user's code) is
    not a peer's failure."""
    while exc is not None:
        if isinstance(exc, dist.DistError) or str(exc).startswith("distattn: ") and "failed or timed out" in str(exc):
            return True
        tb = exc.__traceback__
        while tb is not None:
            if tb.tb_frame.f_globals.get("__name__", "").startswith("torch.distributed"):
                return True
            tb = tb.tb_next
        exc = exc.__cause__ or exc.__context__
    return False
