"""Rows to the ranks that compute their attention tasks, results back: the executor of ``cad``
(the schedule, a task table: :class:`distattn.schedulers.cad.TaskSchedule`).

Forward: all-to-alls send each task's Q rows and, per destination, the union of the K/V rows its
tasks need to the slot computing them; the slot runs all its tasks in one varlen call; out comes
back by all-to-all. The computing slot keeps what it received and computed (its Q rows, its K/V
union, out and lse: :class:`WorkerSaved`), so lse never travels and the backward sends only dout
to it and returns dQ and dK/dV (accumulator dtype: fp32, fp64 for fp64), which their owner
sums. With a pool the all-to-alls run over the pool's group. Every query row is computed whole by
one slot, so attention sinks are counted there, and their gradient over the slot's rows is the
slot's share (see :func:`distattn.attention`).

Each all-to-all sends one buffer per tensor, gathered by one ``index_select`` whose index (the
rows for every destination, concatenated in pool-rank order, the all-to-all's order) is made
once per plan; results come back in the same order and are placed with the same index. The
computing slot's buffers stay in pool-rank order too (its K/V index points into them directly;
only Q rows are reordered for the kernel when the pool's rank order is not the slot order).

Stages, so that a caller can hide every transfer behind other work
(:func:`distattn.pingpong.ping_pong`; ``forward``/``backward`` run them back to back):

==========  ==============================  ==================================================
direction   call                            does
==========  ==============================  ==================================================
forward     :meth:`~TaskExecutor.prefetch`  start Q, K/V to the workers (:class:`Dispatch`)
forward     ``compute_forward``             wait for them, attention, start out back
forward     ``finish_forward``              wait for out: ``(out, saved)``
backward    ``start_backward``              start dout to the workers
backward    ``compute_backward``            wait for it, attention backward, start dQ, dK/dV back
backward    ``finish_backward``             wait for them: ``(dq, dk, dv)``
==========  ==============================  ==================================================

Every transfer is issued asynchronously (:meth:`distattn.comm.Comm.all_to_all` returns a pending
handle) and waited for only by the next stage.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.distributed as dist

from ..comm import Comm, Pending
from ..kernels import varlen_bwd, varlen_fwd
from ..merge import acc_dtype, merge, row_delta
from ..layout import Shards
from ..schedulers.cad import Pool, Route, TaskSchedule
from .base import DeviceIndex, Executor, finish_rows, rows_sink_grad

_EMPTY = np.zeros(0, dtype=np.int64)


@dataclass(frozen=True)
class DeviceRoute:
    """A :class:`~distattn.schedulers.cad.Route` in the all-to-all's (pool-rank) order, its index
    arrays for the device."""

    gather: DeviceIndex        # my local rows for every destination, concatenated in pool-rank order
    send: tuple[int, ...]      # rows to each pool rank
    recv: tuple[int, ...]      # rows from each pool rank
    place: DeviceIndex | None  # where each local row comes back in a returned buffer (None: rows not all sent once)

    @staticmethod
    def of(route: Route, by_rank, tokens: int) -> "DeviceRoute":
        gather = np.concatenate([np.asarray(route.send[c], dtype=np.int64) for c in by_rank] or [_EMPTY])
        place = None
        if len(gather) == tokens and np.array_equal(np.sort(gather), np.arange(tokens)):
            place = DeviceIndex(np.argsort(gather).astype(np.int64))
        return DeviceRoute(DeviceIndex(gather), tuple(len(route.send[c]) for c in by_rank),
                           tuple(int(route.recv[c]) for c in by_rank), place)

    def indices(self) -> list[DeviceIndex]:
        return [self.gather] + ([self.place] if self.place is not None else [])


def _buffer_rows(route: Route, by_rank) -> np.ndarray:
    """For each received token in global order (the kernel's order), its row in the all-to-all's
    buffer (senders in pool-rank order, each sender's tokens in the order it sends them)."""
    tokens = np.concatenate([route.recv_tokens[c] for c in by_rank] or [_EMPTY])
    return np.argsort(tokens, kind="stable").astype(np.int64)


class Transfer(NamedTuple):
    """One all-to-all in flight: its receive buffer (rows) and its pending handle."""

    buffer: torch.Tensor
    pending: Pending

    def wait(self) -> torch.Tensor:
        self.pending.wait()
        return self.buffer


class WorkerSaved(NamedTuple):
    """What the computing slot keeps from its forward for its backward (its tasks' rows)."""

    q: torch.Tensor      # [Rq, Hq, D] Q rows received, kernel (slot) order
    kv: torch.Tensor     # [Rkv, 2, Hkv, D] K/V union received, pool-rank order
    out: torch.Tensor    # [Rq, Hq, D] its attention output, kernel order
    lse: torch.Tensor    # [Rq, Hq] accumulator dtype


class TaskSaved(NamedTuple):
    """A forward's saved state: the worker's buffers and what the owner needs to place gradients."""

    worker: WorkerSaved
    tokens: int              # this slot's local tokens
    kv_dtype: torch.dtype    # dtype of dK/dV handed back


class Dispatch(NamedTuple):
    """Forward: Q and K/V on their way to the workers (:meth:`TaskExecutor.prefetch`)."""

    executor: Any
    ids: tuple[int, int, int]   # the q, k, v it was started for
    tokens: int
    kv_dtype: torch.dtype
    q: Transfer
    kv: Transfer


class Returning(NamedTuple):
    """Forward: out on its way back to its owners; the saved state (the worker keeps its lse)."""

    out: Transfer
    saved: TaskSaved


class DoutDispatch(NamedTuple):
    """Backward: dout on its way to the workers."""

    dout: Transfer


class GradsReturning(NamedTuple):
    """Backward: dQ and dK/dV (accumulator dtype) on their way back to their owners."""

    dq: Transfer
    dkv: Transfer
    tokens: int
    kv_dtype: torch.dtype
    dsinks: torch.Tensor | None = None   # over the rows this slot computed (not sent: see compute_backward)


class TaskExecutor(Executor):
    supports_prefetch = True

    def __init__(self, schedule: TaskSchedule, slot: int, comm: Comm, backend: str, pool_comm: Comm):
        super().__init__(schedule, slot, comm, backend)
        self.slot, self.pool_comm = slot, pool_comm
        routes = schedule.routes(slot)
        # the all-to-all orders peers by pool rank, the schedule by slot
        self.by_rank = sorted(range(schedule.pool_size), key=lambda c: schedule.slot_ranks[c])
        tokens = schedule.slots.num_tokens(slot)
        self.q_route = DeviceRoute.of(routes.q, self.by_rank, tokens)
        self.kv_route = DeviceRoute.of(routes.kv, self.by_rank, tokens)
        # K/V segments index the received buffer as it arrives (pool-rank order); Q segments index
        # the Q rows in global order (None: one call over all of them, in order)
        kv_rows = _buffer_rows(routes.kv, self.by_rank)
        self.calls = tuple((c.varlen, None if c.q_index is None else DeviceIndex(c.q_index),
                            DeviceIndex(kv_rows[c.kv_index])) for c in routes.calls)
        # Q rows: the kernel wants global order; the buffer arrives in pool-rank order
        q_rows = _buffer_rows(routes.q, self.by_rank)
        identity = np.array_equal(q_rows, np.arange(len(q_rows)))
        self.q_to_kernel = None if identity else DeviceIndex(q_rows)
        self.q_to_ranks = None if identity else DeviceIndex(np.argsort(q_rows).astype(np.int64))

    @property
    def comms(self) -> tuple[Comm, ...]:
        return (self.pool_comm,)

    @property
    def agreement_group(self):
        return self.pool_comm.group  # tasks cross the pool

    def device_data(self):
        extra = [self.q_to_kernel, self.q_to_ranks] if self.q_to_kernel is not None else []
        calls = [x for call in self.calls for x in call if x is not None]
        return [*calls, *self.q_route.indices(), *self.kv_route.indices(), *extra]

    # ---- moving rows -----------------------------------------------------------------------------
    def _all_to_all(self, send: torch.Tensor, send_rows, recv_rows, what: str) -> Transfer:
        """Start sending ``send`` (rows for each pool rank, in pool-rank order) to every rank."""
        width = math.prod(send.shape[1:])
        buffer = send.new_empty((sum(recv_rows), *send.shape[1:]))
        pending = self.pool_comm.all_to_all(buffer.view(-1), send.reshape(-1), [n * width for n in recv_rows],
                                            [n * width for n in send_rows], what)
        return Transfer(buffer, pending)

    def _to_workers(self, t: torch.Tensor, route: DeviceRoute, what: str) -> Transfer:
        """Start sending my rows of ``t`` to the slots computing them (one gather, one all-to-all)."""
        return self._all_to_all(t.index_select(0, route.gather.on(t.device)), route.send, route.recv, what)

    def _to_owners(self, t: torch.Tensor, route: DeviceRoute, what: str) -> Transfer:
        """Start returning computed rows ``t`` (pool-rank order, as received) to their owners."""
        return self._all_to_all(t, route.recv, route.send, what)

    @staticmethod
    def _placed(got: torch.Tensor, route: DeviceRoute, tokens: int) -> torch.Tensor:
        """Returned rows at their local positions (each local row comes back exactly once)."""
        if route.place is not None:
            return got.index_select(0, route.place.on(got.device))
        local = got.new_zeros((tokens, *got.shape[1:]))
        return local.index_copy_(0, route.gather.on(got.device), got)

    def _kernel_order(self, rows: torch.Tensor) -> torch.Tensor:
        return rows if self.q_to_kernel is None else rows.index_select(0, self.q_to_kernel.on(rows.device))

    def _rank_order(self, rows: torch.Tensor) -> torch.Tensor:
        return rows if self.q_to_ranks is None else rows.index_select(0, self.q_to_ranks.on(rows.device))

    # ---- forward stages --------------------------------------------------------------------------
    def prefetch(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Dispatch:
        """Start the forward all-to-alls of Q and K/V now (``Plan.prefetch``; forward stage 1)."""
        ids = (id(q), id(k), id(v))
        q, k, v = q.detach(), k.detach(), v.detach()
        qt = self._to_workers(q, self.q_route, "cad forward: Q to workers")
        kvt = self._to_workers(torch.stack([k, v], dim=1), self.kv_route, "cad forward: K/V to workers")
        return Dispatch(self, ids, q.shape[0], k.dtype, qt, kvt)

    def compute_forward(self, dispatch: Dispatch, scale: float, softcap: float | None = None,
                        sinks: torch.Tensor | None = None) -> Returning:
        """Forward stage 2: wait for Q and K/V, run the tasks, start out back to the owners. Each
        query row is computed whole by one slot, so the slot counts ``sinks`` in its rows here."""
        q_buf = self._kernel_order(dispatch.q.wait())
        kv_buf = dispatch.kv.wait()
        kw = self.kernel_args(scale, softcap)
        (varlen, q_index, kv_index), *more = self.calls
        if q_index is None:
            kv_seg = kv_buf.index_select(0, kv_index.on(kv_buf.device))
            out_buf, lse_buf = varlen_fwd(q_buf, kv_seg[:, 0], kv_seg[:, 1], varlen, **kw)
        else:  # slices sharing query rows: one call per layer, merged here (each row is computed on this slot)
            out_buf = torch.zeros(q_buf.shape, dtype=acc_dtype(q_buf.dtype), device=q_buf.device)
            lse_buf = torch.full(q_buf.shape[:2], float("-inf"), dtype=out_buf.dtype, device=q_buf.device)
            for varlen, q_index, kv_index in self.calls:
                rows = q_index.on(q_buf.device)
                kv_seg = kv_buf.index_select(0, kv_index.on(kv_buf.device))
                o, l = varlen_fwd(q_buf.index_select(0, rows), kv_seg[:, 0], kv_seg[:, 1], varlen, **kw)
                o, l = merge(out_buf.index_select(0, rows), lse_buf.index_select(0, rows), o, l)
                out_buf.index_copy_(0, rows, o)
                lse_buf.index_copy_(0, rows, l)
        out_buf, lse_buf = finish_rows(out_buf, lse_buf, sinks, q_buf.dtype)
        out_t = self._to_owners(self._rank_order(out_buf), self.q_route, "cad forward: out to owners")
        return Returning(out_t, TaskSaved(WorkerSaved(q_buf, kv_buf, out_buf, lse_buf), dispatch.tokens,
                                          dispatch.kv_dtype))

    def finish_forward(self, returning: Returning) -> tuple[torch.Tensor, TaskSaved]:
        """Forward stage 3: wait for out; ``(out, saved)``. (lse stays with the worker: only its
        backward needs it.)"""
        return self._placed(returning.out.wait(), self.q_route, returning.saved.tokens), returning.saved

    def forward(self, q, k, v, scale, softcap=None, sinks=None, prefetch: Dispatch | None = None):
        if prefetch is None:  # (distattn.attention checked a prefetch's plan and tensors)
            prefetch = self.prefetch(q, k, v)
        return self.finish_forward(self.compute_forward(prefetch, scale, softcap, sinks))

    # ---- backward stages -------------------------------------------------------------------------
    def start_backward(self, dout: torch.Tensor) -> DoutDispatch:
        """Backward stage 1: start dout to the workers (all they lack: they kept Q, K/V, out, lse)."""
        return DoutDispatch(self._to_workers(dout, self.q_route, "cad backward: dout to workers"))

    def compute_backward(self, dispatch: DoutDispatch, saved: TaskSaved, scale: float, softcap: float | None = None,
                         sinks: torch.Tensor | None = None) -> GradsReturning:
        """Backward stage 2: wait for dout, run the tasks' backward, start dQ and dK/dV back. With
        ``sinks``, their gradient over this slot's rows stays here (``GradsReturning.dsinks``): a
        replicated parameter's gradient is summed over the ranks by the data-parallel reduction."""
        w = saved.worker
        dout_buf = self._kernel_order(dispatch.dout.wait())
        kw = self.kernel_args(scale, softcap)
        whole = self.calls[0][1] is None
        delta = None if sinks is None and whole else row_delta(dout_buf, w.out)
        dkv_buf = torch.zeros(w.kv.shape, dtype=acc_dtype(w.kv.dtype), device=w.kv.device)
        dq_buf = None if whole else torch.zeros(w.q.shape, dtype=dkv_buf.dtype, device=w.q.device)
        for varlen, q_index, kv_index in self.calls:
            index = kv_index.on(w.kv.device)
            kv_seg = w.kv.index_select(0, index)
            if whole:
                dq_buf, dk_seg, dv_seg = varlen_bwd(dout_buf, w.q, kv_seg[:, 0], kv_seg[:, 1], w.out, w.lse, varlen,
                                                    delta=delta, **kw)
            else:
                rows = q_index.on(w.q.device)
                dq_l, dk_seg, dv_seg = varlen_bwd(*(t.index_select(0, rows) for t in (dout_buf, w.q)), kv_seg[:, 0],
                                                  kv_seg[:, 1], *(t.index_select(0, rows) for t in (w.out, w.lse)),
                                                  varlen, delta=delta.index_select(0, rows), **kw)
                dq_buf.index_add_(0, rows, dq_l.to(dq_buf.dtype))
            dkv_buf.index_add_(0, index, torch.stack([dk_seg, dv_seg], dim=1).to(dkv_buf.dtype))
        dq_buf = dq_buf.to(w.q.dtype)
        dq_t = self._to_owners(self._rank_order(dq_buf), self.q_route, "cad backward: dQ to owners")
        dkv_t = self._to_owners(dkv_buf, self.kv_route, "cad backward: dK/dV to owners")
        return GradsReturning(dq_t, dkv_t, saved.tokens, saved.kv_dtype, rows_sink_grad(delta, w.lse, sinks))

    def finish_backward(self, returning: GradsReturning) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Backward stage 3: wait for dQ and dK/dV; dK/dV of a key sent to several slots are summed.
        (``returning.dsinks`` is ready since stage 2.)"""
        dq = self._placed(returning.dq.wait(), self.q_route, returning.tokens)
        got = returning.dkv.wait()
        dkv = got.new_zeros((returning.tokens, *got.shape[1:]))
        dkv.index_add_(0, self.kv_route.gather.on(got.device), got)
        return dq, dkv[:, 0].to(returning.kv_dtype), dkv[:, 1].to(returning.kv_dtype)

    def backward(self, dout, saved: TaskSaved, scale, softcap=None, sinks=None):
        returning = self.compute_backward(self.start_backward(dout), saved, scale, softcap, sinks)
        return (*self.finish_backward(returning), returning.dsinks)


def gather_pool(doc_lens, shards: Shards, mesh, pool) -> Pool:
    """The pool's token space (see :mod:`distattn.schedulers.cad`): every rank of ``pool`` sends its
    CP group's documents and the runs of tokens it holds (``shards``: its group's layout) to all (a
    collective over the pool)."""
    if mesh.is_dry:
        raise ValueError("pool= needs a live plan (a ProcessGroup or DeviceMesh for mesh), not a dry world size")
    if not isinstance(pool, dist.ProcessGroup):
        raise ValueError(f"pool must be a ProcessGroup containing every rank of the CP groups, "
                         f"got {type(pool).__name__}")
    key = dist.get_global_rank(mesh.group, 0) if mesh.group is not dist.group.WORLD else 0
    runs = [(int(a), int(b)) for a, b in zip(*shards.rank_runs(mesh.rank))]
    mine = (key, mesh.rank, mesh.world_size, list(doc_lens), runs)
    entries: list[Any] = [None] * pool.size()
    try:
        dist.all_gather_object(entries, mine, group=pool)
    except RuntimeError as exc:
        others = [r for r in dist.get_process_group_ranks(pool) if r != dist.get_rank()]
        raise RuntimeError(f"distattn: cad's pool plan failed or timed out waiting for rank(s) {others} ({exc}); "
                           f"every rank of the pool must call distattn.plan with pool=") from exc
    order = sorted(range(pool.size()), key=lambda i: (entries[i][0], entries[i][1]))
    groups: dict = {}   # CP group -> (its size, doc_lens, the runs each of its ranks holds)
    for i in order:
        k, _, size, lens, held = entries[i]
        _, lens_k, owned = groups.setdefault(k, (size, lens, []))
        if lens_k != lens:
            raise ValueError("ranks of one CP group passed different doc_lens to distattn.plan")
        owned.append(held)
    sizes = [size for size, _, _ in groups.values()]
    if any(len(owned) != size for size, _, owned in groups.values()):
        raise ValueError(f"the pool's {pool.size()} ranks do not match its CP groups' sizes {sizes}: "
                         f"every pool rank must belong to exactly one CP group")
    return Pool.of([(lens, Shards.from_owned(owned, sum(lens))) for _, lens, owned in groups.values()], order)
