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

from ..comm import Comm
from ..merge import acc_dtype
from ..schedulers.ulysses import HeadLayout, HeadRanges, group_ranges, part_heads
from .base import DeviceIndex, ExecOptions, Executor, out_shape


def expand_heads(x: torch.Tensor, counts: tuple[int, ...]) -> torch.Tensor:
    """``[T, Hkv, D]`` -> ``[T, sum(counts), D]``, KV head ``i`` repeated ``counts[i]`` times."""
    return torch.cat([x[:, i:i + 1].expand(-1, c, -1) for i, c in enumerate(counts)], dim=1)


def sum_expanded(g: torch.Tensor, counts: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`expand_heads` for gradients: the copies of each KV head summed in fp32."""
    dtype = acc_dtype(g.dtype)
    return torch.stack([part.to(dtype).sum(1) for part in g.split(list(counts), dim=1)], dim=1).to(g.dtype)


@dataclass(frozen=True, eq=False)
class HeadAllToAll:
    """All-to-all between token shards and head shards inside one group.

    ``tokens[i]`` is member ``i``'s token count; gathering concatenates the
    members' tokens in member order.
    """

    comm: Comm
    member: int
    tokens: tuple[int, ...]

    def to_heads(self, xs: list[torch.Tensor], heads: list[HeadRanges], what: str) -> list[torch.Tensor]:
        """Token shards ``x [n_member, H, D]`` -> ``[sum(tokens), h, D]`` for this member's heads.

        One all-to-all per tensor, all in flight together; the result is the receive
        buffer itself (members' tokens arrive in order).
        """
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
        for p in pending:
            p.wait()
        return outs

    def to_tokens(self, xs: list[torch.Tensor], heads: list[HeadRanges], what: str,
                  into: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Inverse of :meth:`to_heads`: ``[sum(tokens), h, D]`` -> ``[n_member, H, D]``.
        Heads that several members computed (replicated KV heads) are summed in fp32. ``into``: the
        ``[n_member, H, D]`` tensors to write the received heads into (the others untouched)."""
        n, received, pending = self.tokens[self.member], [], []
        for x, rng in zip(xs, heads):
            x = x.contiguous()  # members' token ranges are contiguous rows: sent as they are
            sizes = [b - a for a, b in rng]
            flat = x.new_empty(n * sum(sizes) * x.shape[2])
            pending.append(self.comm.all_to_all(flat, x.view(-1), [n * h * x.shape[2] for h in sizes],
                                                [t * x.shape[1] * x.shape[2] for t in self.tokens], what))
            received.append(flat)
        for p in pending:
            p.wait()
        out = []
        for i, (x, rng, flat) in enumerate(zip(xs, heads, received)):
            parts, offset = [], 0
            for a, b in rng:
                parts.append(flat[offset:offset + n * (b - a) * x.shape[2]].view(n, b - a, x.shape[2]))
                offset += parts[-1].numel()
            if into is not None:   # disjoint ranges (query heads): placed
                for (a, b), part in zip(rng, parts):
                    into[i][:, a:b] = part
                out.append(into[i])
            elif all(b == a for (_, b), (a, _) in zip(rng, rng[1:])):  # heads tile [0, H): place them
                out.append(torch.cat(parts, dim=1))
            else:
                full = torch.zeros((n, rng[-1][1], x.shape[2]), dtype=acc_dtype(x.dtype), device=x.device)
                for (a, b), part in zip(rng, parts):
                    full[:, a:b] += part
                out.append(full.to(x.dtype))
        return out


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


class HeadExecutor(Executor):
    """``order``: for each row of the inner executor's token order, its row in the all-to-all's
    buffer (None: the two agree)."""

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

    def _to_heads(self, xs: list[torch.Tensor], heads: list[HeadRanges], what: str) -> list[torch.Tensor]:
        """:meth:`HeadAllToAll.to_heads` of ``xs`` as they travel (:mod:`distattn.wire`), decoded, in
        the inner executor's order."""
        wire = self.options.wire
        got = self.exchange.to_heads([wire.encode(x) for x in xs], heads, what)
        return self._reorder([wire.decode(g, (x.shape[-1],), x.dtype) for g, x in zip(got, xs)])

    def forward(self, q, k, v, scale, softcap=None, sinks=None):
        what, wire = f"{self.schedule.scheduler} forward", self.options.wire
        layout, parts = self._parts(q.shape[1], k.shape[1])
        kh, vh = self._to_heads([k, v], [layout.kv, layout.kv], what)
        # out comes back as it travels, every part into one buffer, decoded at the end
        out = torch.empty((*q.shape[:2], wire.width((v.shape[-1],))), dtype=wire.dtype(q.dtype),
                          device=q.device) if len(parts) > 1 else None
        saved = []
        for ranges, (a, b), kv, expand in parts:
            (qh,) = self._to_heads([q], [ranges], what)
            out_h, inner = self.inner.forward(qh, *_kv_part(kh, vh, kv, expand), scale, softcap,
                                              None if sinks is None else sinks[a:b])
            del qh
            (out,) = self.exchange.to_tokens(self._reorder([wire.encode(out_h)], back=True), [ranges], what,
                                             None if out is None else [out])
            saved.append(inner._replace(k=None, v=None))
        return wire.decode(out, (v.shape[-1],), q.dtype), HeadSaved(q.shape[1], k.shape[1], kh, vh, tuple(saved))

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

    def backward(self, dout, saved: HeadSaved, scale, softcap=None, sinks=None):
        what = f"{self.schedule.scheduler} backward"
        layout, parts = self._parts(saved.num_heads, saved.num_kv_heads)
        member = self.exchange.member
        dq = dout.new_empty((*dout.shape[:2], saved.kh.shape[2])) if len(parts) > 1 else None
        dk_h = dv_h = ds_h = None
        for (ranges, (a, b), kv, expand), inner in zip(parts, saved.parts):
            (dout_h,) = self._to_heads([dout], [ranges], what)
            kg, vg = _kv_part(saved.kh, saved.vh, kv, expand)
            dq_h, dk_g, dv_g, ds_g = self.inner.backward(dout_h, inner._replace(k=kg, v=vg), scale, softcap,
                                                         None if sinks is None else sinks[a:b])
            del kg, vg, dout_h
            if expand is not None:  # sum the expanded copies back onto the received KV heads
                dk_g, dv_g = sum_expanded(dk_g, expand), sum_expanded(dv_g, expand)
            (dq,) = self.exchange.to_tokens(self._reorder([dq_h], back=True), [ranges], what,
                                            None if dq is None else [dq])
            del dq_h
            if len(parts) == 1:
                dk_h, dv_h = dk_g, dv_g
            else:   # parts sharing a KV head add up in the accumulator's dtype
                if dk_h is None:
                    dk_h, dv_h = (torch.zeros((g.shape[0], layout.kv_share(member), g.shape[2]),
                                              dtype=acc_dtype(g.dtype), device=g.device) for g in (dk_g, dv_g))
                dk_h[:, kv] += dk_g
                dv_h[:, kv] += dv_g
            if ds_g is not None:   # this member's heads over the rows it computed; the other heads: 0
                ds_h = ds_g.new_zeros(saved.num_heads) if ds_h is None else ds_h
                ds_h[a:b] = ds_g
        # copies of a replicated KV head are summed after the all-to-all: they travel unrounded
        wide = acc_dtype(dout.dtype) if layout.kv_replicated else dout.dtype
        dk, dv = self.exchange.to_tokens(self._reorder([dk_h.to(wide), dv_h.to(wide)], back=True),
                                         [layout.kv, layout.kv], what)
        dsinks = None if sinks is None else self.sink_share(ds_h, sinks.dtype)
        return dq, dk.to(dout.dtype), dv.to(dout.dtype), dsinks
