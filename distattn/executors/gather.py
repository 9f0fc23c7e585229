"""K/V all-gathered, dK/dV reduce-scattered: the executor of ``allgather`` (the schedule:
:class:`distattn.schedulers.allgather.GatherSchedule`).

Per group of KV heads: gather every rank's K/V (padded to the largest shard), reorder it to global
token order, run this rank's kernel calls against it. Forward prefetches the next head group
while computing the current one; backward reduce-scatters a head group's fp32 dK/dV while
computing the next. Staged (:class:`~distattn.executors.base.Executor`): the first gather starts at
``dispatch`` (``start_backward``) and the reduce-scatters are waited for at ``finish_backward``, so
under nano-batches they hide behind the other nano-batch's layers.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from ..kernels.merge import LSE_ACC, acc_dtype, row_delta
from ..schedulers.allgather import GatherSchedule
from .base import (Computed, DeviceIndex, ExecOptions, OwnRows, Saved, call_bwd, call_fwd, finish_rows, out_shape,
                   pack_kv, unpack_kv)


class _Flight(NamedTuple):
    """Forward, dispatch -> compute: the inputs, the local K/V as it travels, the first gather."""

    inputs: tuple
    kv_local: torch.Tensor
    gather: tuple


class _BackFlight(NamedTuple):
    dout: torch.Tensor
    saved: Saved
    kv_local: torch.Tensor
    gather: tuple


class _Grads(NamedTuple):
    """Backward, compute -> finish: dQ and every head group's reduce-scatter in flight."""

    dq: torch.Tensor
    scatters: tuple
    kv_shape: torch.Size
    cols: tuple[int, int]
    kv_dtype: torch.dtype
    dsinks: torch.Tensor | None


class GatherExecutor(OwnRows):
    def __init__(self, schedule: GatherSchedule, rank: int, comm, backend: str, options: ExecOptions = ExecOptions()):
        super().__init__(schedule, rank, comm, backend, options)
        self.calls = schedule.kernel_calls(rank, schedule.shards.rows)
        self.width = schedule.width
        # where each global token sits in the gathered buffer (rank-major, padded to width; each
        # rank's tokens in its compute order)
        index = np.empty(schedule.total_tokens, dtype=np.int64)
        for r in range(schedule.world_size):
            tokens = schedule.shards.compute_tokens(r)
            index[tokens] = r * self.width + np.arange(len(tokens))
        self.gather_index = DeviceIndex(index)

    def device_data(self):
        return [call.varlen for call in self.calls] + [self.gather_index]

    def _start_gather(self, kv_local: torch.Tensor, heads: tuple[int, int], what: str):
        """Start gathering heads of ``kv_local [n, Hkv, width]`` (as it travels); returns (buffer, pending)."""
        part = kv_local[:, heads[0]:heads[1]]
        padded = part.new_zeros((self.width, *part.shape[1:]))
        padded[: part.shape[0]] = part
        gathered = padded.new_empty((self.schedule.world_size * self.width, *padded.shape[1:]))
        return gathered, self.comm.all_gather(gathered, padded, what)

    def _gathered_kv(self, gathered: torch.Tensor) -> torch.Tensor:
        """``[P * W, h, width]`` as gathered (rank-major) -> ``[S, h, width]`` in global token order."""
        return gathered[self.gather_index.on(gathered.device)]

    def _start_scatter(self, dkv: torch.Tensor, what: str):
        """Start summing ``dkv [S, h, Dk + Dv]`` (global order) into each owner's ``[W, h, Dk + Dv]``."""
        padded = dkv.new_zeros((self.schedule.world_size * self.width, *dkv.shape[1:]))
        padded[self.gather_index.on(dkv.device)] = dkv
        mine = padded.new_empty((self.width, *dkv.shape[1:]))
        return mine, self.comm.reduce_scatter(mine, padded, what)

    # ---- forward stages: the first head group's gather starts at dispatch ---------------------
    def prefetch(self, q, k, v) -> _Flight:
        """Forward stage 1: start gathering the first head group's K/V."""
        kv_local = self.options.wire.encode(pack_kv(k, v), (k.shape[-1], v.shape[-1]))   # as it travels
        heads = self.schedule.head_groups(k.shape[1])
        return _Flight((q, k, v), kv_local, self._start_gather(kv_local, heads[0], "allgather forward"))

    def compute_forward(self, flight: _Flight, scale, softcap=None, sinks=None) -> Computed:
        """Forward stage 2: per head group, wait for its K/V, start the next group's, attention."""
        (q, k, v), kv_local, nxt = flight
        kw = self.kernel_args(scale, softcap)
        out = torch.zeros(out_shape(q, v), dtype=acc_dtype(q.dtype), device=q.device)
        lse = torch.full(q.shape[:2], float("-inf"), dtype=LSE_ACC, device=q.device)
        cols, group = (k.shape[-1], v.shape[-1]), q.shape[1] // k.shape[1]
        heads = self.schedule.head_groups(k.shape[1])
        for n, (h0, h1) in enumerate(heads):
            gathered, pending = nxt
            pending.wait()
            if n + 1 < len(heads):  # prefetch the next head group while computing this one
                nxt = self._start_gather(kv_local, heads[n + 1], "allgather forward")
            kv = self.options.wire.decode(self._gathered_kv(gathered), cols, k.dtype)
            qh = slice(h0 * group, h1 * group)
            for call in self.calls:
                call_fwd(call, q[:, qh], kv, out[:, qh], lse[:, qh], **kw)
        return Computed(*finish_rows(out, lse, sinks, q.dtype))  # every key merged: count the sinks once

    # ---- backward stages: the first gather starts at start_backward, the reduce-scatters end at finish
    def start_backward(self, dout: torch.Tensor, saved: Saved) -> _BackFlight:
        """Backward stage 1: start gathering the first head group's K/V again."""
        k, v = saved.k, saved.v
        kv_local = self.options.wire.encode(pack_kv(k, v), (k.shape[-1], v.shape[-1]))
        heads = self.schedule.head_groups(k.shape[1])
        return _BackFlight(dout, saved, kv_local, self._start_gather(kv_local, heads[0], "allgather backward"))

    def compute_backward(self, flight: _BackFlight, _kept, scale, softcap=None, sinks=None) -> _Grads:
        """Backward stage 2: per head group, its K/V gathered, attention backward, its fp32 dK/dV's
        reduce-scatter started (the next group's compute hides it)."""
        dout, (q, k, v, out, lse), kv_local, gather = flight
        kw = self.kernel_args(scale, softcap)
        dtype = acc_dtype(q.dtype)
        dq = torch.zeros(q.shape, dtype=dtype, device=q.device)
        cols, group = (k.shape[-1], v.shape[-1]), q.shape[1] // k.shape[1]
        delta = row_delta(dout, out)
        scatters = []
        for n, (h0, h1) in enumerate(self.schedule.head_groups(k.shape[1])):
            gathered, pending = gather if n == 0 else self._start_gather(kv_local, (h0, h1), "allgather backward")
            pending.wait()
            kv = self.options.wire.decode(self._gathered_kv(gathered), cols, k.dtype)
            qh = slice(h0 * group, h1 * group)
            dkv_full = torch.zeros(kv.shape, dtype=dtype, device=q.device)
            for call in self.calls:
                call_bwd(call, dout[:, qh], q[:, qh], kv, out[:, qh], lse[:, qh], delta[:, qh], dq[:, qh], dkv_full,
                         **kw)
            scatters.append(((h0, h1), *self._start_scatter(dkv_full, "allgather backward")))
        return _Grads(dq.to(q.dtype), tuple(scatters), k.shape, cols, k.dtype, self.sink_grad(delta, lse, sinks))

    def finish_backward(self, grads: _Grads) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Backward stage 3: wait for every head group's dK/dV."""
        dkv = torch.zeros((*grads.kv_shape[:2], sum(grads.cols)), dtype=acc_dtype(grads.dq.dtype),
                          device=grads.dq.device)
        for (h0, h1), mine, pending in grads.scatters:
            pending.wait()
            dkv[:, h0:h1] = mine[: grads.kv_shape[0]]
        dk, dv = unpack_kv(dkv.to(grads.kv_dtype), grads.cols[0])
        return grads.dq, dk, dv
