"""Rows to the ranks that compute their attention tasks, results back: the executor of ``cad``
(the schedule, a task table: :class:`distattn.schedulers.cad.TaskSchedule`).

Forward: all-to-alls send each task's Q rows and, per destination, the union of the K/V rows its
tasks need to the slot computing them, hop by hop along the schedule's routes (K/V down a tree of
nodes, Q through the owner's node peers: :mod:`distattn.schedulers.cad.cast`); the slot runs all
its tasks in one varlen call; out comes back up the same hops. The backward returns dQ and dK/dV
(accumulator dtype: fp32, fp64 for fp64) up the hops: every slot a row passed through sums the
partials it gets back for it with its own (group-reduce), and the owner sums the rest. With a pool
the all-to-alls run over the pool's group. Every query row is computed whole by one slot, so
attention sinks are counted there, and their gradient over the slot's rows is the slot's share
(see :func:`distattn.attention`).

What the backward needs on the worker -- its Q rows, the K/V union, out and lse -- comes one of two
ways, the schedule's ``backward`` (``distattn.plan(..., backward=...)``):

* ``"resend"`` (DistCA's attention servers): the worker keeps nothing it received. lse comes back
  to the owner with out, and the owner, which keeps its own q, k, v, out and lse
  (:class:`OwnerSaved`: what every ring scheduler keeps), sends Q, out, dout and lse (one buffer) and
  K/V again in the backward, over the same hops. Memory of the owner's own rows; twice the forward's
  traffic in the backward.
* ``"keep"``: the worker keeps what it computed on (:class:`WorkerSaved`), so lse never travels and
  the backward sends only dout. The busiest worker's received rows can be several times a rank's
  own.

Each all-to-all sends one buffer per tensor, gathered by one ``index_select`` whose index (the
rows for every destination, concatenated in pool-rank order, the all-to-all's order) is made
once per plan; results come back in the same order and are summed in with the same index.

Stages, so that a caller can hide every transfer behind other work
(:func:`distattn.runtime.pingpong.run_layers`; ``forward``/``backward`` run them back to back; the same
stages, as instructions, are :meth:`TaskSchedule.program <distattn.schedulers.cad.TaskSchedule.program>`):

==========  ==============================  ==================================================
direction   call                            does
==========  ==============================  ==================================================
forward     :meth:`~TaskExecutor.prefetch`  start Q, K/V to the workers, every hop (:class:`Dispatch`)
forward     ``compute_forward``             wait for them, attention, start out (resend: and lse) back
forward     ``finish_forward``              wait for them: ``(out, saved)``
backward    ``start_backward``              start dout (resend: Q, out, dout, lse and K/V) to the workers
backward    ``compute_backward``            wait for them, attention backward, start dQ, dK/dV back
backward    ``finish_backward``             wait for them: ``(dq, dk, dv)``
==========  ==============================  ==================================================

Every transfer is issued asynchronously (:meth:`distattn.distributed.comm.Comm.all_to_all` returns a pending
handle) and waited for only by the next stage; the hops after the first are chained to the one
before (:mod:`.hops`, :meth:`TaskExecutor.chained`).
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Any, Callable, NamedTuple

import numpy as np
import torch
import torch.distributed as dist

from ..distributed.comm import Comm
from ..kernels import varlen_bwd, varlen_fwd
from ..kernels.merge import LSE_ACC, acc_dtype, merge, row_delta
from ..planning.layout import Shards
from ..planning.masks import as_doc_lens
from ..schedulers.cad import Pool, TaskSchedule
from ..distributed.trace import ATTENTION, MERGE, span
from ..planning.wire import Wire
from .base import DeviceIndex, ExecOptions, Executor, finish_rows, out_shape, pack_kv, unpack_kv
from .hops import Cast, Return, Transfer, rows_of


class WorkerSaved(NamedTuple):
    """The rows a worker computes on (its tasks' rows): kept from its forward (``keep``), or received
    again in the backward (``resend``)."""

    q: torch.Tensor      # [Rq, Hq, Dk] its queries, kernel (global) order
    kv: torch.Tensor     # [Rkv, Hkv, Dk + Dv] its K/V union (executors.base.pack_kv), global order
    out: torch.Tensor    # [Rq, Hq, Dv] its attention output, kernel order
    lse: torch.Tensor    # [Rq, Hq] accumulator dtype


class OwnerSaved(NamedTuple):
    """``resend``: what the owner keeps of its own rows (compute order) to send again in the backward."""

    q: torch.Tensor      # [S_local, Hq, Dk]
    k: torch.Tensor      # [S_local, Hkv, Dk]
    v: torch.Tensor      # [S_local, Hkv, Dv]
    out: torch.Tensor    # [S_local, Hq, Dv]
    lse: torch.Tensor    # [S_local, Hq] accumulator dtype


class TaskSaved(NamedTuple):
    """A forward's saved state: the worker's rows (``keep``) or the owner's (``resend``), and the
    dtype dK/dV are handed back in."""

    worker: WorkerSaved | None
    owner: OwnerSaved | None
    kv_dtype: torch.dtype


class Dispatch(NamedTuple):
    """Forward: Q and K/V on their way to the workers (:meth:`TaskExecutor.prefetch`), hop by hop."""

    executor: Any
    ids: tuple[int, int, int]   # the q, k, v it was started for
    kv_dtype: torch.dtype
    q: list[Transfer]
    kv: list[Transfer]
    cols: tuple[int, int]       # (K's head dim, V's): how the rows travelling as wire.encode decode


class Returning(NamedTuple):
    """Forward: out (``resend``: and lse) on its way back to its owners; the saved state (``keep``:
    the worker's rows)."""

    out: Return
    lse: Return | None
    saved: TaskSaved


class BackDispatch(NamedTuple):
    """Backward: what the workers lack on its way to them -- dout (``keep``), or Q, out, dout and lse
    in one buffer (:func:`bundle`) and K/V (``resend``)."""

    rows: list[Transfer]
    kv: list[Transfer] | None
    cols: tuple[int, int] | None   # resend: (K's head dim, V's)


class GradsReturning(NamedTuple):
    """Backward: dQ and dK/dV (accumulator dtype) on their way back to their owners."""

    dq: Return
    dkv: Return
    kv_dtype: torch.dtype
    dsinks: torch.Tensor | None = None   # over the rows this slot computed (not sent: see compute_backward)


def bundle(wire: Wire, q: torch.Tensor, out: torch.Tensor, dout: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """Q, out and dout ``[R, Hq, D]`` (as ``wire`` encodes them) and lse ``[R, Hq]`` (its bits, exact) as
    one ``[R, Hq, W]`` buffer: the rows ``resend``'s backward sends a worker, in one all-to-all a hop.
    Nothing sums these rows on the way (they travel toward the workers), so lse may ride as raw bits."""
    rows = wire.encode(torch.cat([q, out, dout], dim=-1), (q.shape[-1], out.shape[-1], dout.shape[-1]))
    return torch.cat([rows, lse.unsqueeze(-1).contiguous().view(rows.dtype)], dim=-1)


def unbundle(wire: Wire, rows: torch.Tensor, cols: tuple[int, int],
             dtype: torch.dtype) -> tuple[WorkerSaved, torch.Tensor]:
    """Inverse of :func:`bundle` for inputs of ``dtype``, ``cols`` (K's head dim, V's): ``(the worker's
    rows with no K/V -- they travel apart --, dout)``."""
    acc = acc_dtype(dtype)
    lse_cols = acc.itemsize // rows.element_size()
    dk, dv = cols
    q, out, dout = wire.decode(rows[..., :-lse_cols], (dk, dv, dv), dtype).split([dk, dv, dv], dim=-1)
    lse = rows[..., -lse_cols:].contiguous().view(acc).squeeze(-1)
    return WorkerSaved(q.contiguous(), None, out.contiguous(), lse), dout.contiguous()


class TaskExecutor(Executor):
    supports_prefetch = True
    staged = True

    def __init__(self, schedule: TaskSchedule, slot: int, comm: Comm, backend: str, pool_comm: Comm,
                 options: ExecOptions = ExecOptions()):
        super().__init__(schedule, slot, comm, backend, options)
        self.slot, self.pool_comm = slot, pool_comm
        routes = schedule.routes(slot)
        # the all-to-all orders peers by pool rank, the schedule by slot
        self.by_rank = sorted(range(schedule.pool_size), key=lambda c: schedule.slot_ranks[c])
        own = schedule.slots.compute_tokens(slot)
        self.q_cast, self.kv_cast = Cast(routes.q, self.by_rank, own), Cast(routes.kv, self.by_rank, own)
        # the kernel's rows in the buffers (Q: my tasks' queries; K/V: their union), global order
        self.q_rows = DeviceIndex(rows_of(self.q_cast.tokens, routes.q_tokens))
        self.kv_rows = DeviceIndex(rows_of(self.kv_cast.tokens, routes.kv_tokens))
        self.calls = tuple((c.varlen, None if c.q_index is None else DeviceIndex(c.q_index), DeviceIndex(c.kv_index))
                           for c in routes.calls)
        nodes = schedule.nodes.dense
        self._peer_local = np.asarray([nodes[c] == nodes[slot] for c in self.by_rank])   # pool-rank order
        self.link_bytes = {"intra": 0, "inter": 0}   # bytes sent to other ranks of my node / of other nodes
        self._side: dict = {}   # device -> the CUDA stream hop chains run on

    @property
    def comms(self) -> tuple[Comm, ...]:
        return (self.pool_comm,)

    @property
    def agreement_group(self):
        return self.pool_comm.group  # tasks cross the pool

    @property
    def sink_comm(self) -> Comm:
        return self.pool_comm

    def device_data(self):
        calls = [x for call in self.calls for x in call if x is not None]
        return [*calls, self.q_rows, self.kv_rows, *self.q_cast.indices(), *self.kv_cast.indices()]

    def all_to_all(self, send: torch.Tensor, send_rows, recv_rows, what: str) -> Transfer:
        """Start sending ``send`` (rows for each pool rank, in pool-rank order) to every rank."""
        width = math.prod(send.shape[1:])
        buffer = send.new_empty((sum(recv_rows), *send.shape[1:]))
        pending = self.pool_comm.all_to_all(buffer.view(-1), send.reshape(-1), [n * width for n in recv_rows],
                                            [n * width for n in send_rows], what)
        sent = np.asarray(send_rows, dtype=np.int64) * width * send.element_size()
        sent[self.pool_comm.rank] = 0
        self.link_bytes["intra"] += int(sent[self._peer_local].sum())
        self.link_bytes["inter"] += int(sent[~self._peer_local].sum())
        return Transfer(buffer, pending)

    def chained(self, device: torch.device):
        """The context a hop chain runs in (:mod:`.hops`): on CUDA a side stream that first waits
        for the work queued so far (the rows it sends); on CPU none."""
        if device.type != "cuda":
            return nullcontext()
        stream = self._side.get(device)
        if stream is None:
            stream = self._side[device] = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        return torch.cuda.stream(stream)

    def _scatter(self, rows: torch.Tensor, index: DeviceIndex, size: int) -> torch.Tensor:
        """``rows`` at ``index`` of a zero buffer of ``size`` rows (results for the rows I was sent)."""
        return rows.new_zeros((size, *rows.shape[1:])).index_copy_(0, index.on(rows.device), rows)

    @property
    def resends(self) -> bool:
        """Whether the backward sends the workers their rows again (module docstring)."""
        return self.schedule.backward == "resend"

    @property
    def structure(self) -> tuple:
        return (type(self).__name__, self.schedule.backward)

    # ---- forward stages --------------------------------------------------------------------------
    def prefetch(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Dispatch:
        """Start the forward all-to-alls of Q and K/V now, every hop (``Plan.prefetch``; forward stage 1)."""
        ids = (id(q), id(k), id(v))
        q, k, v = q.detach(), k.detach(), v.detach()
        rows = self.options.wire.encode(q)
        return Dispatch(self, ids, k.dtype, *self._to_workers(rows, k, v, "Q", "cad forward"),
                        (k.shape[-1], v.shape[-1]))

    def _to_workers(self, rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor, name: str,
                    direction: str) -> tuple[list[Transfer], list[Transfer]]:
        """Start ``rows`` (Q-routed, as they travel) and K/V to the workers, every hop: both first hops,
        then the chained ones."""
        rows_what, kv_what = f"{direction}: {name} to workers", f"{direction}: K/V to workers"
        kv = self.options.wire.encode(pack_kv(k, v), (k.shape[-1], v.shape[-1]))
        flights = self.q_cast.start(self, rows, rows_what), self.kv_cast.start(self, kv, kv_what)
        return self.q_cast.advance(self, flights[0], rows_what), self.kv_cast.advance(self, flights[1], kv_what)

    def _kv_buffer(self, flights: list[Transfer], cols: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
        """My K/V union, received (kernel order, decoded)."""
        buf = self.kv_cast.buffer(flights)
        return self.options.wire.decode(buf.index_select(0, self.kv_rows.on(buf.device)), cols, dtype)

    def compute_forward(self, dispatch: Dispatch, scale: float, softcap: float | None = None,
                        sinks: torch.Tensor | None = None) -> Returning:
        """Forward stage 2: wait for Q and K/V, run the tasks, start out (``resend``: and lse) back to
        the owners, every hop. Each query row is computed whole by one slot, so the slot counts
        ``sinks`` in its rows here."""
        wire, (dk, dv), dtype = self.options.wire, dispatch.cols, dispatch.kv_dtype
        q_buf = self.q_cast.buffer(dispatch.q)
        q_buf = wire.decode(q_buf.index_select(0, self.q_rows.on(q_buf.device)), (dk,), dtype)
        kv_buf = self._kv_buffer(dispatch.kv, dispatch.cols, dtype)
        kw = self.kernel_args(scale, softcap)
        (varlen, q_index, kv_index), *more = self.calls
        if q_index is None:
            kv_seg = kv_buf.index_select(0, kv_index.on(kv_buf.device))
            with span(ATTENTION):
                out_buf, lse_buf = varlen_fwd(q_buf, *unpack_kv(kv_seg, q_buf.shape[-1]), varlen,
                                              partial=sinks is not None, **kw)   # fp32 until the sinks rescale it
        else:  # slices sharing query rows: one call per layer, merged here (each row is computed on this slot)
            out_buf = torch.zeros((*q_buf.shape[:2], dv), dtype=acc_dtype(q_buf.dtype), device=q_buf.device)
            lse_buf = torch.full(q_buf.shape[:2], float("-inf"), dtype=LSE_ACC, device=q_buf.device)
            for varlen, q_index, kv_index in self.calls:
                rows = q_index.on(q_buf.device)
                kv_seg = kv_buf.index_select(0, kv_index.on(kv_buf.device))
                with span(ATTENTION):
                    o, l = varlen_fwd(q_buf.index_select(0, rows), *unpack_kv(kv_seg, q_buf.shape[-1]), varlen,
                                      partial=True, **kw)
                with span(MERGE):
                    o, l = merge(out_buf.index_select(0, rows), lse_buf.index_select(0, rows), o, l)
                out_buf.index_copy_(0, rows, o)
                lse_buf.index_copy_(0, rows, l)
        out_buf, lse_buf = finish_rows(out_buf, lse_buf, sinks, q_buf.dtype)
        out = (self.q_cast, self.q_rows, out_buf, "cad forward: out to owners", wire)
        if self.resends:   # the owner sends lse again in the backward (a relay sums it with zeros: exact)
            out_ret, lse_ret = self._send_back(out, (self.q_cast, self.q_rows, lse_buf, "cad forward: lse to owners",
                                                     Wire()))
            return Returning(out_ret, lse_ret, TaskSaved(None, None, dtype))
        (out_ret,) = self._send_back(out)
        # (contiguous: the rows resend would hand the worker, so both backwards run on one memory layout)
        kept = WorkerSaved(q_buf, kv_buf, out_buf.contiguous(), lse_buf.contiguous())
        return Returning(out_ret, None, TaskSaved(kept, None, dtype))

    def _send_back(self, *results: tuple[Cast, DeviceIndex, torch.Tensor, str, Wire]) -> list[Return]:
        """Start ``(cast, index, rows, what, wire)`` results -- for the rows I computed on, at ``index`` of
        ``cast``'s buffer -- back to their owners: each one's last hop, then every earlier hop, chained."""
        started = [cast.back_start(self, self._scatter(rows, index, len(cast.tokens)), what, wire)
                   for cast, index, rows, what, wire in results]
        return [cast.back_advance(self, ret, what) for ret, (cast, _, _, what, _) in zip(started, results)]

    def finish_forward(self, returning: Returning, q: torch.Tensor | None = None, k: torch.Tensor | None = None,
                       v: torch.Tensor | None = None) -> tuple[torch.Tensor, OwnerSaved | None]:
        """Forward stage 3: wait for out; ``(out, owned)``. ``resend``: also for lse, and ``owned`` holds
        ``q``, ``k``, ``v`` (the inputs, compute order), out and lse (``keep``: None)."""
        out = self.q_cast.back_finish(self, returning.out, "cad forward: out to owners")
        if returning.lse is None:
            return out, None
        lse = self.q_cast.back_finish(self, returning.lse, "cad forward: lse to owners")
        return out, OwnerSaved(q, k, v, out, lse)

    def forward(self, q, k, v, scale, softcap=None, sinks=None, prefetch: Dispatch | None = None):
        if prefetch is None:  # (distattn.attention checked a prefetch's plan and tensors)
            prefetch = self.prefetch(q, k, v)
        returning = self.compute_forward(prefetch, scale, softcap, sinks)
        out, owner = self.finish_forward(returning, q, k, v)
        return out, returning.saved._replace(owner=owner)

    def saved_like(self, q, k, v, out, sinks, size):
        if self.resends:
            return TaskSaved(None, OwnerSaved(q, k, v, out, q.new_empty(q.shape[:2], dtype=acc_dtype(q.dtype))),
                             k.dtype)
        rq, rkv = size(len(self.q_rows.array)), size(len(self.kv_rows.array))
        q_buf = q.new_empty((rq, *q.shape[1:]))
        lse = q.new_empty((rq, q.shape[1]), dtype=acc_dtype(q.dtype))
        kv = k.new_empty((rkv, k.shape[1], k.shape[2] + v.shape[2]))
        return TaskSaved(WorkerSaved(q_buf, kv, q_buf.new_empty(out_shape(q_buf, v)), lse), None, k.dtype)

    # ---- backward stages -------------------------------------------------------------------------
    def start_backward(self, dout: torch.Tensor, own: OwnerSaved | None) -> BackDispatch:
        """Backward stage 1: start what the workers lack to them, every hop: dout (``keep``), or Q, out,
        dout and lse (one buffer) and K/V (``resend``: ``own``, what the finish stage kept)."""
        if own is None:
            what = "cad backward: dout to workers"
            dout_t = self.q_cast.start(self, self.options.wire.encode(dout), what)
            return BackDispatch(self.q_cast.advance(self, dout_t, what), None, None)
        rows = bundle(self.options.wire, own.q, own.out, dout, own.lse)
        return BackDispatch(*self._to_workers(rows, own.k, own.v, "Q, out, dout, lse", "cad backward"),
                            (own.k.shape[-1], own.v.shape[-1]))

    def _received(self, dispatch: BackDispatch, saved: TaskSaved) -> tuple[WorkerSaved, torch.Tensor]:
        """(my tasks' rows, their dout): kept (``keep``) or just received (``resend``)."""
        buf = self.q_cast.buffer(dispatch.rows)
        buf = buf.index_select(0, self.q_rows.on(buf.device))
        if dispatch.kv is None:
            w = saved.worker
            return w, self.options.wire.decode(buf, (w.out.shape[-1],), w.out.dtype)
        w, dout = unbundle(self.options.wire, buf, dispatch.cols, saved.kv_dtype)
        return w._replace(kv=self._kv_buffer(dispatch.kv, dispatch.cols, saved.kv_dtype)), dout

    def compute_backward(self, dispatch: BackDispatch, saved: TaskSaved, scale: float, softcap: float | None = None,
                         sinks: torch.Tensor | None = None) -> GradsReturning:
        """Backward stage 2: wait for what stage 1 sent, run the tasks' backward, start dQ and dK/dV
        back, every hop (each relay sums the partials it gets back with its own: group-reduce). With
        ``sinks``, their gradient over this slot's rows stays here (``GradsReturning.dsinks``): a
        replicated parameter's gradient is summed over the ranks by the data-parallel reduction."""
        w, dout_buf = self._received(dispatch, saved)
        kw = dict(self.kernel_args(scale, softcap), partial=True)   # fp32 gradients: this slot sums them
        whole = self.calls[0][1] is None
        delta = None if sinks is None and whole else row_delta(dout_buf, w.out)
        dkv_buf = torch.zeros(w.kv.shape, dtype=acc_dtype(w.kv.dtype), device=w.kv.device)
        dq_buf = None if whole else torch.zeros(w.q.shape, dtype=dkv_buf.dtype, device=w.q.device)
        for varlen, q_index, kv_index in self.calls:
            index = kv_index.on(w.kv.device)
            k_seg, v_seg = unpack_kv(w.kv.index_select(0, index), w.q.shape[-1])
            if whole:
                with span(ATTENTION):
                    dq_buf, dk_seg, dv_seg = varlen_bwd(dout_buf, w.q, k_seg, v_seg, w.out, w.lse, varlen,
                                                        delta=delta, **kw)
            else:
                rows = q_index.on(w.q.device)
                with span(ATTENTION):
                    dq_l, dk_seg, dv_seg = varlen_bwd(*(t.index_select(0, rows) for t in (dout_buf, w.q)), k_seg,
                                                      v_seg, *(t.index_select(0, rows) for t in (w.out, w.lse)),
                                                      varlen, delta=delta.index_select(0, rows), **kw)
                q_index.add_into(dq_buf, dq_l.to(dq_buf.dtype), self.options.deterministic)
            kv_index.add_into(dkv_buf, pack_kv(dk_seg, dv_seg).to(dkv_buf.dtype), self.options.deterministic)
        dq_ret, dkv_ret = self._send_back(
            (self.q_cast, self.q_rows, dq_buf.to(w.q.dtype), "cad backward: dQ to owners", Wire()),
            (self.kv_cast, self.kv_rows, dkv_buf, "cad backward: dK/dV to owners", Wire()))
        return GradsReturning(dq_ret, dkv_ret, saved.kv_dtype, self.sink_grad(delta, w.lse, sinks))

    def finish_backward(self, returning: GradsReturning) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Backward stage 3: wait for dQ and dK/dV; dK/dV of a key sent to several slots are summed.
        (``returning.dsinks`` is ready since stage 2.)"""
        dq = self.q_cast.back_finish(self, returning.dq, "cad backward: dQ to owners")
        dkv = self.kv_cast.back_finish(self, returning.dkv, "cad backward: dK/dV to owners")
        dk, dv = unpack_kv(dkv, dq.shape[-1])
        return dq, dk.to(returning.kv_dtype), dv.to(returning.kv_dtype)

    def backward(self, dout, saved: TaskSaved, scale, softcap=None, sinks=None):
        returning = self.compute_backward(self.start_backward(dout, saved.owner), saved, scale, softcap, sinks)
        return (*self.finish_backward(returning), returning.dsinks)


def _check_pool(mesh, pool) -> None:
    if mesh.is_dry:
        raise ValueError("pool= needs a live plan (a ProcessGroup or DeviceMesh for mesh), not a dry world size")
    if not isinstance(pool, dist.ProcessGroup):
        raise ValueError(f"pool must be a ProcessGroup containing every rank of the CP groups, "
                         f"got {type(pool).__name__}")


def gather_pool(doc_lens, shards: Shards, mesh, pool) -> Pool:
    """The pool's token space (see :mod:`distattn.schedulers.cad`): every rank of ``pool`` sends its
    CP group's documents and the runs of tokens it holds (``shards``: its group's layout) to all (a
    collective over the pool)."""
    _check_pool(mesh, pool)
    key = dist.get_global_rank(mesh.group, 0) if mesh.group is not dist.group.WORLD else 0
    runs = [(int(a), int(b)) for a, b in zip(*shards.rank_runs(mesh.rank))]
    mine = (key, mesh.rank, mesh.world_size, list(doc_lens), runs, dist.get_rank())
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
        k, _, size, lens, held, _ = entries[i]
        _, lens_k, owned = groups.setdefault(k, (size, lens, []))
        if lens_k != lens:
            raise ValueError("ranks of one CP group passed different doc_lens to distattn.plan")
        owned.append(held)
    sizes = [size for size, _, _ in groups.values()]
    if any(len(owned) != size for size, _, owned in groups.values()):
        raise ValueError(f"the pool's {pool.size()} ranks do not match its CP groups' sizes {sizes}: "
                         f"every pool rank must belong to exactly one CP group")
    return Pool.of([(lens, Shards.from_owned(owned, sum(lens))) for _, lens, owned in groups.values()], order,
                   [entries[i][5] for i in order])


def local_pool(doc_lens, shards: Shards, pool_doc_lens, shards_of: Callable[[tuple[int, ...]], Shards], mesh,
               pool) -> Pool:
    """:func:`gather_pool`'s token space with no collective, from ``pool_doc_lens``: every CP group's
    documents, group ``g`` being the pool ranks ``g*P .. g*P+P-1`` (``P``: ``mesh``'s size; see
    :func:`distattn.plan`), each laid out by ``shards_of`` (this group: ``shards``). Each rank checks
    that its own group is its run of pool ranks and that its entry is its ``doc_lens``; so every
    rank's check passing means every group is as assumed (the lists must be the same everywhere)."""
    _check_pool(mesh, pool)
    p, size = mesh.world_size, pool.size()
    alone = "or pass pool= alone (the groups' documents are then exchanged)"
    if size % p:
        raise ValueError(f"pool_doc_lens needs the pool's {size} ranks in CP groups of this group's {p} ranks; {alone}")
    groups = size // p
    if not isinstance(pool_doc_lens, (list, tuple)) or len(pool_doc_lens) != groups:
        got = f"{len(pool_doc_lens)} entries" if isinstance(pool_doc_lens, (list, tuple)) else \
            type(pool_doc_lens).__name__
        raise ValueError(f"pool_doc_lens must hold one list of document lengths per CP group of the pool ({groups} "
                         f"groups of {p} ranks), got {got}")
    lens = [as_doc_lens(group, name=f"pool_doc_lens[{g}]") for g, group in enumerate(pool_doc_lens)]
    to_global = (lambda r: r) if pool is dist.group.WORLD else (lambda r: dist.get_global_rank(pool, r))
    me = dist.get_rank(pool) // p
    run = [to_global(me * p + i) for i in range(p)]
    if list(mesh.global_ranks()) != run:
        raise ValueError(f"pool_doc_lens: this rank's CP group (global ranks {list(mesh.global_ranks())}) is not pool "
                         f"ranks {me * p}..{me * p + p - 1} (global {run}) in order: the pool's CP groups must be its "
                         f"ranks in runs of {p}; {alone}")
    if lens[me] != tuple(doc_lens):
        raise ValueError(f"pool_doc_lens[{me}] must be this rank's doc_lens (its CP group's documents), got "
                         f"{list(lens[me])[:8]} for {list(doc_lens)[:8]}: pass every rank the same lists, in pool "
                         f"order")
    # gather_pool's order: the groups by their first rank's global rank, each group's ranks in order
    order = sorted(range(groups), key=lambda g: to_global(g * p))
    slots = [g * p + i for g in order for i in range(p)]
    return Pool.of([(lens[g], shards if g == me else shards_of(lens[g])) for g in order], slots,
                   [to_global(s) for s in slots])
