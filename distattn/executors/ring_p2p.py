"""K/V passed around a ring of point-to-point transfers: the executor of ``ring``, ``zigzag`` and
of ``usp``'s rings (the schedule: :class:`distattn.schedulers.ring.RingSchedule`).

Forward, step ``t``: start sending the held K/V block on to ``rank + 1`` (if someone further
needs it) and receiving the next one, compute this step's kernel calls against the held block,
wait. Backward, step ``t``: the same K/V ring, plus the fp32 dK/dV of the previous step's
foreign block straight back to its owner; one extra step returns the last of them.
"""

from __future__ import annotations

import torch

from ..merge import LSE_ACC, acc_dtype, row_delta
from ..schedulers.ring import RingSchedule
from .base import ExecOptions, Executor, Saved, call_bwd, call_fwd, finish_rows, out_shape, pack_kv, unpack_kv


class RingExecutor(Executor):
    def __init__(self, schedule: RingSchedule, rank: int, comm, backend: str, options: ExecOptions = ExecOptions()):
        super().__init__(schedule, rank, comm, backend, options)
        p, rows = schedule.world_size, schedule.shards.rows
        sources = schedule.sources(rank)
        self.calls = tuple(schedule.kernel_calls(rank, sources[t], rows) if t in sources else () for t in range(p))
        qr, kr, _ = schedule.rank_pairs
        self.dkv_from = frozenset(qr[kr == rank].tolist())  # ranks that compute on this rank's K/V

    def device_data(self):
        return [call.varlen for calls in self.calls for call in calls]

    def _kv_ring_step(self, t: int, cur: torch.Tensor | None, like: torch.Tensor):
        """Sends/receives that move the K/V ring (blocks as they travel: :mod:`distattn.wire`) from
        step t to t + 1."""
        s, r, p = self.schedule, self.rank, self.schedule.world_size
        sends, recvs, nxt = [], [], None
        if t + 1 < p and s.sends(r, t):
            sends.append((cur, (r + 1) % p))
        if t + 1 < p and s.holds(r, t + 1):
            src = (r - t - 1) % p
            nxt = like.new_empty((s.num_tokens(src), *like.shape[1:]))
            recvs.append((nxt, (r - 1) % p))
        return sends, recvs, nxt

    def forward(self, q, k, v, scale, softcap=None, sinks=None):
        r, name = self.rank, self.schedule.scheduler
        kw = self.kernel_args(scale, softcap)
        dtype = acc_dtype(q.dtype)
        out = torch.zeros(out_shape(q, v), dtype=dtype, device=q.device)
        lse = torch.full(q.shape[:2], float("-inf"), dtype=LSE_ACC, device=q.device)
        kv, cols, wire = pack_kv(k, v), (k.shape[-1], v.shape[-1]), self.options.wire
        held = wire.encode(kv, cols)   # as it travels; no other reference kept: two blocks live at a time
        like = held[:0]   # the blocks' dtype and head shape
        for t in range(self.schedule.world_size):
            sends, recvs, nxt = self._kv_ring_step(t, held, like)
            pending = self.comm.exchange(sends, recvs, f"{name} forward step {t} (rank {r})")
            for call in self.calls[t]:
                call_fwd(call, q, kv, out, lse, **kw)
            pending.wait()
            held, kv = nxt, None if nxt is None else wire.decode(nxt, cols, k.dtype)
        out, lse = finish_rows(out, lse, sinks, q.dtype)  # every block merged: count the sinks once
        return out, Saved(q, k, v, out, lse)

    def backward(self, dout, saved: Saved, scale, softcap=None, sinks=None):
        q, k, v, out, lse = saved
        r, p, name = self.rank, self.schedule.world_size, self.schedule.scheduler
        kw = self.kernel_args(scale, softcap)
        dtype = acc_dtype(q.dtype)
        dq = torch.zeros(q.shape, dtype=dtype, device=q.device)
        delta = row_delta(dout, out)
        kv, cols, wire = pack_kv(k, v), (k.shape[-1], v.shape[-1]), self.options.wire
        held = wire.encode(kv, cols)
        like = held[:0]
        dkv = torch.zeros(kv.shape, dtype=dtype, device=q.device)  # own block, summed in fp32
        prev = None  # dK/dV computed at the previous step for a foreign block
        for t in range(p + 1):
            sends, recvs, nxt = self._kv_ring_step(t, held, like)
            incoming = None
            if t >= 2:  # dK/dV of step t - 1 go to their owner; ours arrive from rank r + t - 1
                owner, helper = (r - t + 1) % p, (r + t - 1) % p
                if prev is not None:
                    sends.append((prev, owner))
                if helper in self.dkv_from:
                    incoming = torch.empty_like(dkv)
                    recvs.append((incoming, helper))
            pending = self.comm.exchange(sends, recvs, f"{name} backward step {t} (rank {r})")
            prev = None
            if t < p and self.calls[t]:
                acc = dkv if t == 0 else torch.zeros(kv.shape, dtype=dtype, device=q.device)
                for call in self.calls[t]:
                    call_bwd(call, dout, q, kv, out, lse, delta, dq, acc, **kw)
                prev = acc if t > 0 else None
            pending.wait()
            if incoming is not None:
                dkv += incoming
            held, kv = nxt, None if nxt is None else wire.decode(nxt, cols, k.dtype)
        dk, dv = unpack_kv(dkv.to(self.options.kv_grad_dtype(k.dtype)), k.shape[-1])
        return dq.to(q.dtype), dk, dv, self.sink_grad(delta, lse, sinks)
