"""Rows to the ranks that compute their attention tasks, results back: the executor of ``cad``
(the schedule, a task table: :class:`distattn.schedulers.cad.TaskSchedule`).

Forward: all-to-alls send each task's Q rows and, per destination, the union of the K/V rows its
tasks need to the slot computing them (one gather per tensor, then one all-to-all); the slot runs
all its tasks in one varlen call; out and lse come back by all-to-all. Backward sends Q, out,
dout, lse and K/V again and returns dQ and fp32 dK/dV, summed by their owner. With a pool the
all-to-alls run over the pool's group. :meth:`TaskExecutor.prefetch` starts the forward
all-to-alls early (:func:`distattn.pingpong.ping_pong`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ..comm import Comm
from ..kernels import varlen_bwd, varlen_fwd
from ..merge import acc_dtype
from ..schedulers.blocks import even_bounds
from ..schedulers.cad import Pool, Route, TaskSchedule
from .base import DeviceIndex, Executor, Saved


@dataclass(frozen=True)
class DeviceRoute:
    """A :class:`~distattn.schedulers.cad.Route` with its index arrays for the device."""

    send: tuple[DeviceIndex, ...]
    recv: tuple[int, ...]
    back: DeviceIndex
    sent: tuple[int, ...]

    @staticmethod
    def of(route: Route) -> "DeviceRoute":
        return DeviceRoute(tuple(DeviceIndex(r) for r in route.send), route.recv, DeviceIndex(route.back),
                           route.sent())

    def indices(self) -> list[DeviceIndex]:
        return [*self.send, self.back]


@dataclass(eq=False)
class Prefetch:
    """Forward transfers :meth:`TaskExecutor.prefetch` started (consumed by ``attention``)."""

    executor: "TaskExecutor"
    ids: tuple[int, int, int]
    jobs: list
    started: list


class TaskExecutor(Executor):
    supports_prefetch = True

    def __init__(self, schedule: TaskSchedule, slot: int, comm: Comm, backend: str, pool_comm: Comm):
        super().__init__(schedule, slot, comm, backend)
        self.slot, self.pool_comm = slot, pool_comm
        routes = schedule.routes(slot)
        self.q_route, self.kv_route = DeviceRoute.of(routes.q), DeviceRoute.of(routes.kv)
        self.varlen, self.kv_index = routes.varlen, DeviceIndex(routes.kv_index)
        # the all-to-all orders peers by pool rank, the schedule by slot
        self.by_rank = sorted(range(schedule.pool_size), key=lambda c: schedule.slot_ranks[c])

    @property
    def comms(self) -> tuple[Comm, ...]:
        return (self.pool_comm,)

    @property
    def agreement_group(self):
        return self.pool_comm.group  # tasks cross the pool

    def device_data(self):
        return [self.varlen, self.kv_index, *self.q_route.indices(), *self.kv_route.indices()]

    def _start(self, parts: list[torch.Tensor], recv_rows, like: torch.Tensor, what: str):
        """Start sending ``parts[slot]`` to each slot (rows of ``like``'s shape)."""
        width = int(np.prod(like.shape[1:]))
        flat_in = torch.cat([parts[c].reshape(-1) for c in self.by_rank])
        flat_out = like.new_empty(sum(recv_rows) * width)
        pending = self.pool_comm.all_to_all(flat_out, flat_in, [recv_rows[c] * width for c in self.by_rank],
                                            [parts[c].numel() for c in self.by_rank], what)
        return flat_out, pending

    def _finish(self, started, recv_rows, like):
        flat, pending = started
        pending.wait()
        chunks, offset = {}, 0
        for c in self.by_rank:
            n = recv_rows[c] * int(np.prod(like.shape[1:]))
            chunks[c] = flat[offset:offset + n].view(recv_rows[c], *like.shape[1:])
            offset += n
        return torch.cat([chunks[c] for c in range(len(self.by_rank))])

    def _send(self, t: torch.Tensor, route: DeviceRoute, what: str):
        return self._start([t.index_select(0, rows.on(t.device)) for rows in route.send], route.recv, t, what)

    def _to_workers(self, jobs, what, started=None):
        """``jobs``: (tensor, route). Rows of each tensor go to the slots computing them; returns
        what this rank receives, in slot order. ``started``: the transfers :meth:`prefetch` already
        began for these jobs."""
        if started is None:
            started = [self._send(t, route, what) for t, route in jobs]
        return [self._finish(s, route.recv, t) for s, (t, route) in zip(started, jobs)]

    def _to_owners(self, jobs, what):
        """``jobs``: (computed rows in slot order, route, local rows, sum?). Inverse of
        :meth:`_to_workers`; summed jobs add up rows that come from several slots (in fp32), the
        others place them."""
        started = []
        for t, route, _, _ in jobs:
            starts = np.concatenate([[0], np.cumsum(route.recv)])
            started.append(self._start([t[starts[c]:starts[c + 1]] for c in range(len(self.by_rank))], route.sent, t,
                                       what))
        out = []
        for s, (t, route, n_local, add) in zip(started, jobs):
            got = self._finish(s, route.sent, t)
            index = route.back.on(t.device)
            local = torch.zeros((n_local, *t.shape[1:]), dtype=acc_dtype(t.dtype) if add else t.dtype,
                                device=t.device)
            out.append(local.index_add_(0, index, got.to(local.dtype)) if add else local.index_copy_(0, index, got))
        return out

    def _forward_jobs(self, q, k, v):
        return [(q, self.q_route), (torch.stack([k, v], dim=1), self.kv_route)]

    def prefetch(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Prefetch:
        """Start the forward all-to-all of Q, K, V now (see ``Plan.prefetch``)."""
        jobs = self._forward_jobs(q.detach(), k.detach(), v.detach())
        return Prefetch(self, (id(q), id(k), id(v)), jobs, [self._send(t, route, "cad forward") for t, route in jobs])

    def forward(self, q, k, v, scale, prefetch: Prefetch | None = None):
        kw = self.kernel_args(scale)
        if prefetch is not None:
            if prefetch.executor is not self or prefetch.ids != (id(q), id(k), id(v)):
                raise ValueError("prefetch was started by another plan or for other q, k, v tensors")
            q_buf, kv_buf = self._to_workers(prefetch.jobs, "cad forward", prefetch.started)
        else:
            q_buf, kv_buf = self._to_workers(self._forward_jobs(q, k, v), "cad forward")
        kv_seg = kv_buf.index_select(0, self.kv_index.on(q.device))
        out_buf, lse_buf = varlen_fwd(q_buf, kv_seg[:, 0], kv_seg[:, 1], self.varlen, **kw)
        out, lse = self._to_owners([(out_buf, self.q_route, q.shape[0], False),
                                    (lse_buf, self.q_route, q.shape[0], False)], "cad forward")
        return out, Saved(q, k, v, out, lse)

    def backward(self, dout, saved: Saved, scale):
        q, k, v, out, lse = saved
        q_buf, out_buf, dout_buf, lse_buf, kv_buf = self._to_workers(
            [(t, self.q_route) for t in (q, out, dout, lse)] + [(torch.stack([k, v], dim=1), self.kv_route)],
            "cad backward")
        index = self.kv_index.on(q.device)
        kv_seg = kv_buf.index_select(0, index)
        dq_buf, dk_seg, dv_seg = varlen_bwd(dout_buf, q_buf, kv_seg[:, 0], kv_seg[:, 1], out_buf, lse_buf,
                                            self.varlen, **self.kernel_args(scale))
        dkv_buf = torch.zeros(kv_buf.shape, dtype=acc_dtype(q.dtype), device=q.device)
        dkv_buf.index_add_(0, index, torch.stack([dk_seg, dv_seg], dim=1).to(dkv_buf.dtype))
        dq, dkv = self._to_owners([(dq_buf, self.q_route, q.shape[0], False),
                                   (dkv_buf, self.kv_route, k.shape[0], True)], "cad backward")
        return dq, dkv[:, 0].to(k.dtype), dkv[:, 1].to(v.dtype)


def gather_pool(doc_lens, mesh, pool) -> Pool:
    """The pool's layout (see :mod:`distattn.schedulers.cad`): every rank of ``pool`` sends its CP
    group's documents to all (a collective over the pool)."""
    if mesh.is_dry:
        raise ValueError("pool= needs a live plan (a ProcessGroup or DeviceMesh for mesh), not a dry world size")
    if not isinstance(pool, dist.ProcessGroup):
        raise ValueError(f"pool must be a ProcessGroup containing every rank of the CP groups, "
                         f"got {type(pool).__name__}")
    key = dist.get_global_rank(mesh.group, 0) if mesh.group is not dist.group.WORLD else 0
    mine = (key, mesh.rank, mesh.world_size, list(doc_lens))
    entries: list[Any] = [None] * pool.size()
    try:
        dist.all_gather_object(entries, mine, group=pool)
    except RuntimeError as exc:
        others = [r for r in dist.get_process_group_ranks(pool) if r != dist.get_rank()]
        raise RuntimeError(f"distattn: cad's pool plan failed or timed out waiting for rank(s) {others} ({exc}); "
                           f"every rank of the pool must call distattn.plan with pool=") from exc
    order = sorted(range(pool.size()), key=lambda i: (entries[i][0], entries[i][1]))
    docs, sizes, seen = [], [], {}
    for i in order:
        k, _, size, lens = entries[i]
        if k in seen:
            if seen[k] != lens:
                raise ValueError("ranks of one CP group passed different doc_lens to distattn.plan")
            continue
        seen[k] = lens
        docs += lens
        sizes.append((sum(lens), size))
    bounds = np.concatenate([[0]] + [offset + even_bounds(total, size)[1:] for offset, (total, size)
                                     in zip(np.cumsum([0] + [t for t, _ in sizes[:-1]]), sizes)]).astype(np.int64)
    if len(bounds) - 1 != pool.size():
        raise ValueError(f"the pool's {pool.size()} ranks do not match its CP groups' sizes {[s for _, s in sizes]}: "
                         f"every pool rank must belong to exactly one CP group")
    return Pool(tuple(docs), bounds, tuple(order))
