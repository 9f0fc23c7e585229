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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from ..comm import Comm
from ..merge import acc_dtype
from ..schedulers.ulysses import HeadLayout, HeadRanges
from .base import DeviceIndex, Executor


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

    def to_tokens(self, xs: list[torch.Tensor], heads: list[HeadRanges], what: str) -> list[torch.Tensor]:
        """Inverse of :meth:`to_heads`: ``[sum(tokens), h, D]`` -> ``[n_member, H, D]``.
        Heads that several members computed (replicated KV heads) are summed in fp32."""
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
        for x, rng, flat in zip(xs, heads, received):
            parts, offset = [], 0
            for a, b in rng:
                parts.append(flat[offset:offset + n * (b - a) * x.shape[2]].view(n, b - a, x.shape[2]))
                offset += parts[-1].numel()
            if all(b == a for (_, b), (a, _) in zip(rng, rng[1:])):  # heads tile [0, H): place them
                out.append(torch.cat(parts, dim=1))
                continue
            full = torch.zeros((n, rng[-1][1], x.shape[2]), dtype=acc_dtype(x.dtype), device=x.device)
            for (a, b), part in zip(rng, parts):
                full[:, a:b] += part
            out.append(full.to(x.dtype))
        return out


class HeadSaved(NamedTuple):
    num_heads: int
    num_kv_heads: int
    expand: tuple[int, ...] | None   # the KV head expansion the inner attention ran with
    inner: tuple                     # what the inner executor saved


class HeadExecutor(Executor):
    """``order``: for each row of the inner executor's token order, its row in the all-to-all's
    buffer (None: the two agree)."""

    def __init__(self, schedule, rank: int, comm: Comm, backend: str, exchange: HeadAllToAll, inner: Executor,
                 order: np.ndarray | None = None):
        super().__init__(schedule, rank, comm, backend)
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

    def _layout(self, num_heads: int, num_kv_heads: int) -> HeadLayout:
        return HeadLayout.build(num_heads, num_kv_heads, len(self.exchange.tokens))

    def _my_heads(self, layout: HeadLayout) -> slice:
        """This member's query heads (its share of ``sinks``; KV heads may be replicated, Q never)."""
        return slice(*layout.q[self.exchange.member])

    def forward(self, q, k, v, scale, softcap=None, sinks=None):
        what = f"{self.schedule.scheduler} forward"
        layout = self._layout(q.shape[1], k.shape[1])
        qh, kh, vh = self._reorder(self.exchange.to_heads([q, k, v], [layout.q, layout.kv, layout.kv], what))
        expand = layout.expansion(self.exchange.member, q.shape[1] // k.shape[1])
        if expand is not None:
            kh, vh = expand_heads(kh, expand), expand_heads(vh, expand)
        mine = None if sinks is None else sinks[self._my_heads(layout)]
        out_h, inner = self.inner.forward(qh, kh, vh, scale, softcap, mine)
        (out,) = self.exchange.to_tokens(self._reorder([out_h], back=True), [layout.q], what)
        return out, HeadSaved(q.shape[1], k.shape[1], expand, inner)

    def backward(self, dout, saved: HeadSaved, scale, softcap=None, sinks=None):
        what = f"{self.schedule.scheduler} backward"
        layout = self._layout(saved.num_heads, saved.num_kv_heads)
        heads = self._my_heads(layout)
        (dout_h,) = self._reorder(self.exchange.to_heads([dout], [layout.q], what))
        dq_h, dk_h, dv_h, ds_h = self.inner.backward(dout_h, saved.inner, scale, softcap,
                                                     None if sinks is None else sinks[heads])
        if saved.expand is not None:  # sum the expanded copies back onto the received KV heads
            dk_h, dv_h = sum_expanded(dk_h, saved.expand), sum_expanded(dv_h, saved.expand)
        dq, dk, dv = self.exchange.to_tokens(self._reorder([dq_h, dk_h, dv_h], back=True),
                                             [layout.q, layout.kv, layout.kv], what)
        dsinks = None
        if ds_h is not None:  # this member's heads over the rows it computed; the other heads: 0
            dsinks = ds_h.new_zeros(saved.num_heads)
            dsinks[heads] = ds_h
        return dq, dk, dv, dsinks
