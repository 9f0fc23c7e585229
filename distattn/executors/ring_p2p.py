"""K/V passed around a ring of point-to-point transfers: the executor of ``ring``, ``zigzag`` and
of ``usp``'s rings (the schedule: :class:`distattn.schedulers.ring.RingSchedule`).

Forward, step ``t``: start sending the held K/V block on to ``rank + 1`` (if someone further
needs it) and receiving the next one, compute this step's kernel calls against the held block,
wait. Backward, step ``t``: the same K/V ring, plus the fp32 dK/dV of the previous step's
foreign block straight back to its owner; one extra step returns the last of them. Staged
(:class:`~distattn.executors.base.Executor`): step 0's exchange starts at ``dispatch``
(``start_backward``), and the extra step's is waited for at ``finish_backward``, so under
nano-batches both hide behind the other nano-batch's layers.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from ..kernels.merge import LSE_ACC, acc_dtype, row_delta
from ..schedulers.ring import RingSchedule
from .base import (Computed, ExecOptions, OwnRows, Saved, call_bwd, call_fwd, finish_rows, out_shape, pack_kv,
                   unpack_kv)


class _Flight(NamedTuple):
    """Forward, dispatch -> compute: the inputs, the block held and step 0's exchange."""

    inputs: tuple
    kv: torch.Tensor      # the own block, packed (pack_kv)
    held: torch.Tensor    # the same as it travels
    nxt: torch.Tensor | None
    pending: Any


class _BackFlight(NamedTuple):
    """Backward, start -> compute: dout, the saved state, the block held and step 0's exchange."""

    dout: torch.Tensor
    saved: Saved
    kv: torch.Tensor
    held: torch.Tensor
    nxt: torch.Tensor | None
    pending: Any


class _Grads(NamedTuple):
    """Backward, compute -> finish: dQ, the own block's fp32 dK/dV and the last step in flight."""

    dq: torch.Tensor
    dkv: torch.Tensor
    incoming: torch.Tensor | None
    pending: Any
    kv_dtype: torch.dtype
    dsinks: torch.Tensor | None


class RingExecutor(OwnRows):
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
        """Sends/receives that move the K/V ring (blocks as they travel: :mod:`distattn.planning.wire`) from
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

    def _step(self, t: int, held: torch.Tensor | None, like: torch.Tensor, direction: str, sends=(), recvs=()):
        """Start step ``t``'s exchange (the K/V ring, and ``sends``/``recvs`` besides); ``(nxt, pending)``."""
        ring_sends, ring_recvs, nxt = self._kv_ring_step(t, held, like)
        what = f"{self.schedule.scheduler} {direction} step {t} (rank {self.rank})"
        return nxt, self.comm.exchange([*ring_sends, *sends], [*ring_recvs, *recvs], what)

    # ---- forward stages: step 0's exchange starts at dispatch, the last one ends in compute -------
    def prefetch(self, q, k, v) -> _Flight:
        """Forward stage 1: start step 0's exchange (the held block on to ``rank + 1``)."""
        kv = pack_kv(k, v)
        held = self.options.wire.encode(kv, (k.shape[-1], v.shape[-1]))   # as it travels
        return _Flight((q, k, v), kv, held, *self._step(0, held, held[:0], "forward"))

    def compute_forward(self, flight: _Flight, scale, softcap=None, sinks=None) -> Computed:
        """Forward stage 2: every step's kernel calls against the held block while the next one
        arrives; the sinks counted once every block is merged."""
        (q, k, v), kv, held, nxt, pending = flight
        kw = self.kernel_args(scale, softcap)
        out = torch.zeros(out_shape(q, v), dtype=acc_dtype(q.dtype), device=q.device)
        lse = torch.full(q.shape[:2], float("-inf"), dtype=LSE_ACC, device=q.device)
        cols, like = (k.shape[-1], v.shape[-1]), held[:0]
        del flight, held   # no other reference kept: two blocks live at a time
        for t in range(self.schedule.world_size):
            if t > 0:
                nxt, pending = self._step(t, held, like, "forward")
            for call in self.calls[t]:
                call_fwd(call, q, kv, out, lse, **kw)
            pending.wait()
            held, kv = nxt, None if nxt is None else self.options.wire.decode(nxt, cols, k.dtype)
        return Computed(*finish_rows(out, lse, sinks, q.dtype))

    # ---- backward stages: step 0 starts at start_backward, the last (dK/dV home) ends at finish --
    def start_backward(self, dout: torch.Tensor, saved: Saved) -> _BackFlight:
        """Backward stage 1: start step 0's exchange of the K/V ring."""
        kv = pack_kv(saved.k, saved.v)
        held = self.options.wire.encode(kv, (saved.k.shape[-1], saved.v.shape[-1]))
        return _BackFlight(dout, saved, kv, held, *self._step(0, held, held[:0], "backward"))

    def compute_backward(self, flight: _BackFlight, _kept, scale, softcap=None, sinks=None) -> _Grads:
        """Backward stage 2: steps ``0..P-1`` (the K/V ring, the foreign blocks' fp32 dK/dV back to
        their owners one step later); starts step ``P``, which returns the last of them."""
        dout, (q, k, v, out, lse), kv, held, nxt, pending = flight
        r, p = self.rank, self.schedule.world_size
        kw = self.kernel_args(scale, softcap)
        dtype = acc_dtype(q.dtype)
        dq = torch.zeros(q.shape, dtype=dtype, device=q.device)
        delta = row_delta(dout, out)
        cols, like = (k.shape[-1], v.shape[-1]), held[:0]
        del flight, held
        dkv = torch.zeros(kv.shape, dtype=dtype, device=q.device)  # own block, summed in fp32
        prev = incoming = None  # dK/dV computed at the previous step for a foreign block; ours arriving
        for t in range(p + 1):
            if t > 0:
                sends, recvs, incoming = [], [], None
                if t >= 2:  # dK/dV of step t - 1 go to their owner; ours arrive from rank r + t - 1
                    owner, helper = (r - t + 1) % p, (r + t - 1) % p
                    if prev is not None:
                        sends.append((prev, owner))
                    if helper in self.dkv_from:
                        incoming = torch.empty_like(dkv)
                        recvs.append((incoming, helper))
                nxt, pending = self._step(t, held, like, "backward", sends, recvs)
            if t == p:   # dK/dV home: waited for at finish
                break
            prev = None
            if self.calls[t]:
                acc = dkv if t == 0 else torch.zeros(kv.shape, dtype=dtype, device=q.device)
                for call in self.calls[t]:
                    call_bwd(call, dout, q, kv, out, lse, delta, dq, acc, **kw)
                prev = acc if t > 0 else None
            pending.wait()
            if incoming is not None:
                dkv += incoming
            held, kv = nxt, None if nxt is None else self.options.wire.decode(nxt, cols, k.dtype)
        return _Grads(dq.to(q.dtype), dkv, incoming, pending, k.dtype, self.sink_grad(delta, lse, sinks))

    def finish_backward(self, grads: _Grads) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Backward stage 3: wait for the last dK/dV of this rank's block."""
        grads.pending.wait()
        dkv = grads.dkv if grads.incoming is None else grads.dkv.add_(grads.incoming)
        dk, dv = unpack_kv(dkv.to(self.options.kv_grad_dtype(grads.kv_dtype)), grads.dq.shape[-1])
        return grads.dq, dk, dv
