"""K/V all-gathered, dK/dV reduce-scattered: the executor of ``allgather`` (the schedule:
:class:`distattn.schedulers.allgather.GatherSchedule`).

Per group of KV heads: gather every rank's K/V (padded to the largest shard), reorder it to global
token order, run this rank's kernel calls against it. Forward prefetches the next head group
while computing the current one; backward reduce-scatters a head group's fp32 dK/dV while
computing the next.
"""

from __future__ import annotations

import numpy as np
import torch

from ..merge import LSE_ACC, acc_dtype, row_delta
from ..schedulers.allgather import GatherSchedule
from .base import (DeviceIndex, ExecOptions, Executor, Saved, call_bwd, call_fwd, finish_rows, out_shape, pack_kv,
                   unpack_kv)


class GatherExecutor(Executor):
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

    def forward(self, q, k, v, scale, softcap=None, sinks=None):
        kw = self.kernel_args(scale, softcap)
        dtype = acc_dtype(q.dtype)
        out = torch.zeros(out_shape(q, v), dtype=dtype, device=q.device)
        lse = torch.full(q.shape[:2], float("-inf"), dtype=LSE_ACC, device=q.device)
        cols = (k.shape[-1], v.shape[-1])
        kv_local = self.options.wire.encode(pack_kv(k, v), cols)   # as it travels
        group = q.shape[1] // k.shape[1]
        heads = self.schedule.head_groups(k.shape[1])
        nxt = self._start_gather(kv_local, heads[0], "allgather forward")
        for n, (h0, h1) in enumerate(heads):
            gathered, pending = nxt
            pending.wait()
            if n + 1 < len(heads):  # prefetch the next head group while computing this one
                nxt = self._start_gather(kv_local, heads[n + 1], "allgather forward")
            kv = self.options.wire.decode(self._gathered_kv(gathered), cols, k.dtype)
            qh = slice(h0 * group, h1 * group)
            for call in self.calls:
                call_fwd(call, q[:, qh], kv, out[:, qh], lse[:, qh], **kw)
        out, lse = finish_rows(out, lse, sinks, q.dtype)  # every key merged: count the sinks once
        return out, Saved(q, k, v, out, lse)

    def backward(self, dout, saved: Saved, scale, softcap=None, sinks=None):
        q, k, v, out, lse = saved
        kw = self.kernel_args(scale, softcap)
        dtype = acc_dtype(q.dtype)
        dq = torch.zeros(q.shape, dtype=dtype, device=q.device)
        cols = (k.shape[-1], v.shape[-1])
        dkv = torch.zeros((*k.shape[:2], sum(cols)), dtype=dtype, device=q.device)
        kv_local = self.options.wire.encode(pack_kv(k, v), cols)
        delta = row_delta(dout, out)
        group = q.shape[1] // k.shape[1]
        scatters = []
        for h0, h1 in self.schedule.head_groups(k.shape[1]):
            gathered, pending = self._start_gather(kv_local, (h0, h1), "allgather backward")
            pending.wait()
            kv = self.options.wire.decode(self._gathered_kv(gathered), cols, k.dtype)
            qh = slice(h0 * group, h1 * group)
            dkv_full = torch.zeros(kv.shape, dtype=dtype, device=q.device)
            for call in self.calls:
                call_bwd(call, dout[:, qh], q[:, qh], kv, out[:, qh], lse[:, qh], delta[:, qh], dq[:, qh], dkv_full,
                         **kw)
            # the reduce-scatter of this head group overlaps the next group's compute
            scatters.append(((h0, h1), *self._start_scatter(dkv_full, "allgather backward")))
        for (h0, h1), mine, pending in scatters:
            pending.wait()
            dkv[:, h0:h1] = mine[: k.shape[0]]
        dk, dv = unpack_kv(dkv, k.shape[-1])
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), self.sink_grad(delta, lse, sinks)
