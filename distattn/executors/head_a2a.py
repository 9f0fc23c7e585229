"""Heads all-to-all around an inner executor: ``ulysses`` (inner: one local kernel call over all
documents) and ``usp`` (inner: the zigzag ring of its ring group).

Forward: one all-to-all per tensor turns this member's token shard of every head into every
member's tokens of this member's heads (:class:`HeadAllToAll`), the inner executor attends on that
head shard, the inverse all-to-all returns ``[S_local, Hq, D]``. The all-to-all concatenates the
members' tokens member after member; where the inner executor wants another token order (global
order, or the ring rank's: any layout but the scheduler's own), one gather per tensor reorders the
head shard after the all-to-all and one more reorders it back before the return. Backward repeats the pattern on
the gradients; KV heads that several members computed (GQA with fewer KV heads than members) are
summed in fp32 on the way back. Which heads each member computes: :class:`HeadLayout`.

``head_groups = G`` (the schedule's): K and V go to heads once, then each member's query heads are
taken ``G`` parts at a time (part ``g`` of every member's share: :func:`group_ranges`) -- Q, out,
dout and dQ move and the inner executor runs on one part at a time, so the buffers that span the
whole sequence (the head-sharded Q, out, dout and dQ, the inner executor's accumulators) hold a
``1/G`` share of the heads. The saved tensors and the KV head shard are the same either way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from ..distributed.comm import Comm
from ..kernels.merge import acc_dtype
from ..schedulers.ulysses import HeadLayout, HeadRanges, group_ranges, part_heads
from .base import DeviceIndex, ExecOptions, Executor, out_shape


def expand_heads(x: torch.Tensor, counts: tuple[int, ...]) -> torch.Tensor:
    """``[T, Hkv, D]`` -> ``[T, sum(counts), D]``, KV head ``i`` repeated ``counts[i]`` times."""
    return torch.cat([x[:, i:i + 1].expand(-1, c, -1) for i, c in enumerate(counts)], dim=1)


def sum_expanded(g: torch.Tensor, counts: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`expand_heads` for gradients: the copies of each KV head summed in fp32."""
    dtype = acc_dtype(g.dtype)
    return torch.stack([part.to(dtype).sum(1) for part in g.split(list(counts), dim=1)], dim=1).to(g.dtype)


class InFlight(NamedTuple):
    """All-to-alls in flight: their receive buffers, the transfers, the head ranges they move."""

    buffers: tuple
    pending: tuple
    heads: tuple


@dataclass(frozen=True, eq=False)
class HeadAllToAll:
    """All-to-all between token shards and head shards inside one group.

    ``tokens[i]`` is member ``i``'s token count; gathering concatenates the
    members' tokens in member order.
    """

    comm: Comm
    member: int
    tokens: tuple[int, ...]

    def start_heads(self, xs: list[torch.Tensor], heads: list[HeadRanges], what: str) -> InFlight:
        """Start token shards ``x [n_member, H, D]`` -> ``[sum(tokens), h, D]`` for this member's heads:
        one all-to-all per tensor, all in flight together; :meth:`wait` gives the receive buffers
        themselves (members' tokens arrive in order)."""
        outs, pending = [], []
        for x, rng in zip(xs, heads):
            pieces = [x[:, a:b] for a, b in rng]
            flat = x.new_empty(sum(p.numel() for p in pieces))
            offset = 0
            for piece in pieces:  # pack each member's heads contiguously: the only copy
                flat[offset:offset + piece.numel()].view(piece.shape).copy_(piece)
                offset += piece.numel()
            h = rng[self.member][1] - rng[self.member][0]
            out = x.new_empty((sum(self.tokens), h, x.shape[2]))
            pending.append(self.comm.all_to_all(out.view(-1), flat, [n * h * x.shape[2] for n in self.tokens],
                                                [p.numel() for p in pieces], what))
            outs.append(out)
        return InFlight(tuple(outs), tuple(pending), tuple(heads))

    @staticmethod
    def wait(flight: InFlight) -> list[torch.Tensor]:
        """The buffers of :meth:`start_heads`, received."""
        for p in flight.pending:
            p.wait()
        return list(flight.buffers)

    def to_heads(self, xs: list[torch.Tensor], heads: list[HeadRanges], what: str) -> list[torch.Tensor]:
        """:meth:`start_heads`, waited for."""
        return self.wait(self.start_heads(xs, heads, what))

    def start_tokens(self, xs: list[torch.Tensor], heads: list[HeadRanges], what: str) -> InFlight:
        """Start the inverse of :meth:`to_heads`: ``[sum(tokens), h, D]`` -> ``[n_member, H, D]``
        (:meth:`finish_tokens` places what arrives)."""
        n, received, pending = self.tokens[self.member], [], []
        for x, rng in zip(xs, heads):
            x = x.contiguous()  # members' token ranges are contiguous rows: sent as they are
            sizes = [b - a for a, b in rng]
            flat = x.new_empty(n * sum(sizes) * x.shape[2])
            pending.append(self.comm.all_to_all(flat, x.view(-1), [n * h * x.shape[2] for h in sizes],
                                                [t * x.shape[1] * x.shape[2] for t in self.tokens], what))
            received.append(flat.view(n, sum(sizes), x.shape[2]))
        return InFlight(tuple(received), tuple(pending), tuple(heads))

    def finish_tokens(self, flight: InFlight, into: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Wait for :meth:`start_tokens`; ``[n_member, H, D]`` per tensor. Heads that several members
        computed (replicated KV heads) are summed in fp32. ``into``: the ``[n_member, H, D]`` tensors
        to write the received heads into (the others untouched)."""
        out = []
        for i, (received, rng) in enumerate(zip(self.wait(flight), flight.heads)):
            n, d = received.shape[0], received.shape[2]
            flat, parts, offset = received.view(-1), [], 0
            for a, b in rng:
                parts.append(flat[offset:offset + n * (b - a) * d].view(n, b - a, d))
                offset += parts[-1].numel()
            if into is not None:   # disjoint ranges (query heads): placed
                for (a, b), part in zip(rng, parts):
                    into[i][:, a:b] = part
                out.append(into[i])
            elif all(b == a for (_, b), (a, _) in zip(rng, rng[1:])):  # heads tile [0, H): place them
                out.append(torch.cat(parts, dim=1))
            else:
                full = torch.zeros((n, rng[-1][1], d), dtype=acc_dtype(received.dtype), device=received.device)
                for (a, b), part in zip(rng, parts):
                    full[:, a:b] += part
                out.append(full.to(received.dtype))
        return out

    def to_tokens(self, xs: list[torch.Tensor], heads: list[HeadRanges], what: str,
                  into: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """:meth:`start_tokens`, then :meth:`finish_tokens`."""
        return self.finish_tokens(self.start_tokens(xs, heads, what), into)


def _kv_part(kh: torch.Tensor, vh: torch.Tensor, kv: slice, expand) -> tuple[torch.Tensor, torch.Tensor]:
    """One head group's K/V: a slice of the member's KV head shard (views: the kernels copy what
    they need contiguous), expanded to the group's query heads where the kernel's grouping needs it."""
    kg, vg = kh[:, kv], vh[:, kv]
    return (kg, vg) if expand is None else (expand_heads(kg, expand), expand_heads(vg, expand))


class HeadSaved(NamedTuple):
    num_heads: int
    num_kv_heads: int
    kh: torch.Tensor   # [T, kv heads of this member, D]: the KV head shard every part slices
    vh: torch.Tensor
    parts: tuple       # per head group: what its inner attention saved, its k and v None (sliced from kh, vh)


class _Encoded(NamedTuple):
    """An all-to-all of tensors as they travel, and each one's (last dim, dtype) to decode."""

    flight: InFlight
    like: tuple


class _Dispatch(NamedTuple):
    """Forward, dispatch -> compute."""

    q: torch.Tensor          # token shard: the later head groups' Q start from it
    num_kv_heads: int
    parts: list              # HeadExecutor._parts'
    dv: int                  # V's head dim
    kv: _Encoded             # K and V to heads
    q0: _Encoded             # the first head group's Q to heads


class _Returning(NamedTuple):
    """Forward, compute -> finish: the last head group's out on its way back."""

    back: InFlight
    out: torch.Tensor | None   # every group's out, as it travels (several head groups)
    dv: int
    dtype: torch.dtype
    saved: HeadSaved


class _BackDispatch(NamedTuple):
    dout: torch.Tensor
    layout: HeadLayout
    parts: list                # HeadExecutor._parts'
    dout0: _Encoded            # the first head group's dout to heads


class _Grads(NamedTuple):
    """Backward, compute -> finish: the last head group's dQ and dK/dV on their way back."""

    dq_back: InFlight
    dq: torch.Tensor | None    # every group's dQ (several head groups)
    dkv_back: InFlight
    dtype: torch.dtype
    dsinks: torch.Tensor | None


class HeadExecutor(Executor):
    """``order``: for each row of the inner executor's token order, its row in the all-to-all's
    buffer (None: the two agree). Staged (:class:`~distattn.executors.base.Executor`)."""

    staged = True

    def __init__(self, schedule, rank: int, comm: Comm, backend: str, exchange: HeadAllToAll, inner: Executor,
                 order: np.ndarray | None = None, options: ExecOptions = ExecOptions()):
        super().__init__(schedule, rank, comm, backend, options)
        self.exchange, self.inner = exchange, inner
        self.order = None if order is None else (DeviceIndex(order), DeviceIndex(np.argsort(order).astype(np.int64)))

    @property
    def comms(self) -> tuple[Comm, ...]:
        return tuple({id(c): c for c in (self.exchange.comm, *self.inner.comms)}.values())

    def device_data(self):
        return [*self.inner.device_data(), *(self.order or ())]

    def _reorder(self, xs: list[torch.Tensor], back: bool = False) -> list[torch.Tensor]:
        """All-to-all buffer order -> the inner executor's order (``back``: the reverse)."""
        if self.order is None:
            return xs
        index = self.order[1 if back else 0]
        return [x.index_select(0, index.on(x.device)) for x in xs]

    def _parts(self, num_heads: int, num_kv_heads: int):
        """(layout, per head group: every member's query heads, this member's, its KV heads as a
        slice of the member's KV head shard, and their expansion for the kernel's GQA grouping)."""
        layout = HeadLayout.build(num_heads, num_kv_heads, len(self.exchange.tokens))
        group, member = num_heads // num_kv_heads, self.exchange.member
        lo = layout.kv[member][0]
        parts = []
        for ranges in group_ranges(layout.q, self.schedule.head_groups):
            a, b = ranges[member]
            (kv_lo, kv_hi), expand = part_heads(a, b, group)
            parts.append((ranges, (a, b), slice(kv_lo - lo, kv_hi - lo), expand))
        return layout, parts

    def _start_heads(self, xs: list[torch.Tensor], heads: list[HeadRanges], what: str) -> _Encoded:
        """Start :meth:`HeadAllToAll.start_heads` of ``xs`` as they travel (:mod:`distattn.planning.wire`)."""
        wire = self.options.wire
        return _Encoded(self.exchange.start_heads([wire.encode(x) for x in xs], heads, what),
                        tuple((x.shape[-1], x.dtype) for x in xs))

    def _heads(self, flight: _Encoded) -> list[torch.Tensor]:
        """What :meth:`_start_heads` started, received, decoded, in the inner executor's order."""
        got = self.exchange.wait(flight.flight)
        return self._reorder([self.options.wire.decode(g, (d,), dtype) for g, (d, dtype) in zip(got, flight.like)])

    # ---- forward stages: K/V and the first head group's Q start at dispatch, its out ends at finish
    def prefetch(self, q, k, v) -> _Dispatch:
        """Forward stage 1: start K, V and the first head group's Q to heads."""
        what = f"{self.schedule.scheduler} forward"
        layout, parts = self._parts(q.shape[1], k.shape[1])
        kv = self._start_heads([k, v], [layout.kv, layout.kv], what)
        return _Dispatch(q, k.shape[1], parts, v.shape[-1], kv, self._start_heads([q], [parts[0][0]], what))

    def compute_forward(self, flight: _Dispatch, scale, softcap=None, sinks=None) -> _Returning:
        """Forward stage 2: per head group, its Q to heads (the first one's already on its way), the
        inner executor on the head shard, its out started back -- waited for here but the last
        group's, which :meth:`finish_forward` waits for."""
        what, wire = f"{self.schedule.scheduler} forward", self.options.wire
        q, num_kv_heads, parts, dv = flight.q, flight.num_kv_heads, flight.parts, flight.dv
        kh, vh = self._heads(flight.kv)
        q_in = flight.q0
        del flight
        # out comes back as it travels, every part into one buffer, decoded at finish
        out = torch.empty((*q.shape[:2], wire.width((dv,))), dtype=wire.dtype(q.dtype),
                          device=q.device) if len(parts) > 1 else None
        saved, back = [], None
        for g, (ranges, (a, b), kv, expand) in enumerate(parts):
            if g:
                q_in = self._start_heads([q], [ranges], what)
            (qh,) = self._heads(q_in)
            out_h, inner = self.inner.forward(qh, *_kv_part(kh, vh, kv, expand), scale, softcap,
                                              None if sinks is None else sinks[a:b])
            del qh, q_in
            back = self.exchange.start_tokens(self._reorder([wire.encode(out_h)], back=True), [ranges], what)
            if g + 1 < len(parts):
                self.exchange.finish_tokens(back, [out])
            saved.append(inner._replace(k=None, v=None))
        return _Returning(back, out, dv, q.dtype, HeadSaved(q.shape[1], num_kv_heads, kh, vh, tuple(saved)))

    def finish_forward(self, returning: _Returning, q, k, v) -> tuple[torch.Tensor, tuple[int, int]]:
        """Forward stage 3: wait for the last head group's out; ``owned``: the head counts (the
        saved tensors are the compute stage's)."""
        (out,) = self.exchange.finish_tokens(returning.back, None if returning.out is None else [returning.out])
        saved = returning.saved
        return (self.options.wire.decode(out, (returning.dv,), returning.dtype),
                (saved.num_heads, saved.num_kv_heads))

    def forward(self, q, k, v, scale, softcap=None, sinks=None):
        returning = self.compute_forward(self.prefetch(q, k, v), scale, softcap, sinks)
        return self.finish_forward(returning, q, k, v)[0], returning.saved

    @property
    def structure(self) -> tuple:
        return (*super().structure, self.schedule.head_groups, self.exchange.tokens, self.exchange.member,
                self.inner.structure)

    def saved_like(self, q, k, v, out, sinks, size):
        layout, parts = self._parts(q.shape[1], k.shape[1])
        t = sum(self.exchange.tokens)   # fixed by the sequence length: part of ``structure``
        kh, vh = (x.new_empty((t, layout.kv_share(self.exchange.member), x.shape[2])) for x in (k, v))
        saved = []
        for _, (a, b), kv, expand in parts:
            qh = q.new_empty((t, b - a, q.shape[2]))
            inner = self.inner.saved_like(qh, *_kv_part(kh, vh, kv, expand), qh.new_empty(out_shape(qh, v)),
                                          None if sinks is None else sinks[a:b], size)
            saved.append(inner._replace(k=None, v=None))
        return HeadSaved(q.shape[1], k.shape[1], kh, vh, tuple(saved))

    # ---- backward stages: the first group's dout starts at start_backward, dQ's last group and
    # dK/dV end at finish_backward
    def start_backward(self, dout: torch.Tensor, owned: tuple[int, int]) -> _BackDispatch:
        """Backward stage 1: start the first head group's dout to heads."""
        layout, parts = self._parts(*owned)
        return _BackDispatch(dout, layout, parts,
                             self._start_heads([dout], [parts[0][0]], f"{self.schedule.scheduler} backward"))

    def compute_backward(self, flight: _BackDispatch, saved: HeadSaved, scale, softcap=None,
                         sinks=None) -> _Grads:
        """Backward stage 2: per head group, its dout to heads, the inner backward, its dQ started back
        (waited for here but the last group's); then dK and dV started back together."""
        what = f"{self.schedule.scheduler} backward"
        layout, parts = flight.layout, flight.parts
        member, dout, dout_in = self.exchange.member, flight.dout, flight.dout0
        del flight
        dq = dout.new_empty((*dout.shape[:2], saved.kh.shape[2])) if len(parts) > 1 else None
        dk_h = dv_h = ds_h = dq_back = None
        for g, ((ranges, (a, b), kv, expand), inner) in enumerate(zip(parts, saved.parts)):
            if g:
                dout_in = self._start_heads([dout], [ranges], what)
            (dout_h,) = self._heads(dout_in)
            kg, vg = _kv_part(saved.kh, saved.vh, kv, expand)
            dq_h, dk_g, dv_g, ds_g = self.inner.backward(dout_h, inner._replace(k=kg, v=vg), scale, softcap,
                                                         None if sinks is None else sinks[a:b])
            del kg, vg, dout_h, dout_in
            if expand is not None:  # sum the expanded copies back onto the received KV heads
                dk_g, dv_g = sum_expanded(dk_g, expand), sum_expanded(dv_g, expand)
            dq_back = self.exchange.start_tokens(self._reorder([dq_h], back=True), [ranges], what)
            if g + 1 < len(parts):
                self.exchange.finish_tokens(dq_back, [dq])
            del dq_h
            if len(parts) == 1:
                dk_h, dv_h = dk_g, dv_g
            else:   # parts sharing a KV head add up in the accumulator's dtype
                if dk_h is None:
                    dk_h, dv_h = (torch.zeros((g_.shape[0], layout.kv_share(member), g_.shape[2]),
                                              dtype=acc_dtype(g_.dtype), device=g_.device) for g_ in (dk_g, dv_g))
                dk_h[:, kv] += dk_g
                dv_h[:, kv] += dv_g
            if ds_g is not None:   # this member's heads over the rows it computed; the other heads: 0
                ds_h = ds_g.new_zeros(saved.num_heads) if ds_h is None else ds_h
                ds_h[a:b] = ds_g
        # copies of a replicated KV head are summed after the all-to-all: they travel unrounded
        wide = acc_dtype(dout.dtype) if layout.kv_replicated else dout.dtype
        dkv_back = self.exchange.start_tokens(self._reorder([dk_h.to(wide), dv_h.to(wide)], back=True),
                                              [layout.kv, layout.kv], what)
        dsinks = None if sinks is None else self.sink_share(ds_h, sinks.dtype)
        return _Grads(dq_back, dq, dkv_back, dout.dtype, dsinks)

    def finish_backward(self, grads: _Grads) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Backward stage 3: wait for the last head group's dQ and for dK, dV."""
        (dq,) = self.exchange.finish_tokens(grads.dq_back, None if grads.dq is None else [grads.dq])
        dk, dv = self.exchange.finish_tokens(grads.dkv_back)
        return dq, dk.to(grads.dtype), dv.to(grads.dtype)

    def backward(self, dout, saved: HeadSaved, scale, softcap=None, sinks=None):
        owned = (saved.num_heads, saved.num_kv_heads)
        grads = self.compute_backward(self.start_backward(dout, owned), saved, scale, softcap, sinks)
        return (*self.finish_backward(grads), grads.dsinks)
