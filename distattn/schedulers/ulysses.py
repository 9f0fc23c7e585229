"""``ulysses``: all-to-all from sequence shards to head shards (DeepSpeed-Ulysses, Jacobs et al. 2023).

Rank ``r`` owns a contiguous shard of ``S/P`` tokens (sizes differ by at most
one). Forward, with ``P`` ranks::

    q [S/P, Hq, D] --all-to-all--> [S, Hq_r, D] --varlen attention over all documents-->
    out [S, Hq_r, D] --all-to-all--> [S/P, Hq, D]

K and V travel with Q in the same all-to-all. Backward repeats the pattern on
the gradients. Attention is exact and any mask works, since each rank sees
whole documents for its heads.

Heads do not have to divide ``P``: rank ``r`` gets ``ceil(Hq/P)`` or
``floor(Hq/P)`` query heads. Each rank receives exactly the KV heads its query
heads use; with ``Hkv < P`` (GQA/MQA) a KV head therefore goes to several
ranks, and its dK/dV are summed over those replicas (in fp32) on the way back.
Only ``Hq < P`` is refused: some ranks would have no head at all.

:class:`HeadExchange` and :func:`head_attention_fwd`/``_bwd`` are the
all-to-all machinery; ``usp`` reuses them inside its Ulysses groups.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..comm import Comm
from ..kernels import Varlen, varlen_bwd, varlen_fwd
from ..masks import MaskSlice, attention_flops, document_mask
from ..merge import acc_dtype
from ..plans import Plan
from .blocks import even_bounds

HeadRanges = tuple[tuple[int, int], ...]


def split_heads(num_heads: int, parts: int) -> HeadRanges:
    """Contiguous head ranges, the first ``num_heads % parts`` one head larger."""
    small, extra = divmod(num_heads, parts)
    sizes = [small + 1] * extra + [small] * (parts - extra)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    return tuple((int(a), int(a + n)) for a, n in zip(starts, sizes))


@dataclass(frozen=True)
class HeadLayout:
    """Which query heads, and so which KV heads, each rank of a Ulysses group computes."""

    q: HeadRanges
    kv: HeadRanges

    @staticmethod
    def build(num_heads: int, num_kv_heads: int, parts: int) -> "HeadLayout":
        if num_heads < parts:
            raise ValueError(f"ulysses splits query heads over ranks: {num_heads} heads cannot cover {parts} "
                             f"ranks; use a Ulysses degree <= {num_heads} (scheduler='usp' with a "
                             f"ulysses_degree <= {num_heads} dividing the world size) or a ring scheduler")
        group = num_heads // num_kv_heads
        q = split_heads(num_heads, parts)
        kv = tuple((a // group, (b - 1) // group + 1) for a, b in q)
        return HeadLayout(q, kv)

    def share(self, rank: int) -> int:
        return self.q[rank][1] - self.q[rank][0]

    def expansion(self, rank: int, group: int) -> tuple[int, ...] | None:
        """How many local query heads use each local KV head, in order, when the kernel's native
        GQA grouping (``i // (hq / hkv)``) does not already pair them; None when it does."""
        (a, b), (lo, hi) = self.q[rank], self.kv[rank]
        want = np.arange(a, b) // group - lo
        hq, hkv = b - a, hi - lo
        if hq % hkv == 0 and (want == np.arange(hq) // (hq // hkv)).all():
            return None
        return tuple(int(c) for c in np.bincount(want, minlength=hkv))


def expand_heads(x: torch.Tensor, counts: tuple[int, ...]) -> torch.Tensor:
    """``[T, Hkv, D]`` -> ``[T, sum(counts), D]``, KV head ``i`` repeated ``counts[i]`` times."""
    return torch.cat([x[:, i:i + 1].expand(-1, c, -1) for i, c in enumerate(counts)], dim=1)


def sum_expanded(g: torch.Tensor, counts: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`expand_heads` for gradients: the copies of each KV head summed in fp32."""
    dtype = acc_dtype(g.dtype)
    return torch.stack([part.to(dtype).sum(1) for part in g.split(list(counts), dim=1)], dim=1).to(g.dtype)


@dataclass(frozen=True, eq=False)
class HeadExchange:
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


def head_attention_fwd(exchange: HeadExchange, q, k, v, attend, what: str):
    """Scatter heads, run ``attend(qh, kh, vh) -> (out_h, inner)``, gather tokens back.

    Returns ``out`` and ``meta`` for :func:`head_attention_bwd` (``inner`` is what
    ``attend`` saved for its backward).
    """
    layout = HeadLayout.build(q.shape[1], k.shape[1], len(exchange.tokens))
    qh, kh, vh = exchange.to_heads([q, k, v], [layout.q, layout.kv, layout.kv], what)
    expand = layout.expansion(exchange.member, q.shape[1] // k.shape[1])
    if expand is not None:
        kh, vh = expand_heads(kh, expand), expand_heads(vh, expand)
    out_h, inner = attend(qh, kh, vh)
    (out,) = exchange.to_tokens([out_h], [layout.q], what)
    return out, (q.shape[1], k.shape[1], expand, inner)


def head_attention_bwd(exchange: HeadExchange, dout, meta, attend_bwd, what: str):
    """Backward of :func:`head_attention_fwd`; ``attend_bwd(dout_h, inner) -> (dq_h, dk_h, dv_h)``."""
    num_heads, num_kv_heads, expand, inner = meta
    layout = HeadLayout.build(num_heads, num_kv_heads, len(exchange.tokens))
    (dout_h,) = exchange.to_heads([dout], [layout.q], what)
    dq_h, dk_h, dv_h = attend_bwd(dout_h, inner)
    if expand is not None:  # sum the expanded copies back onto the received KV heads
        dk_h, dv_h = sum_expanded(dk_h, expand), sum_expanded(dv_h, expand)
    dq, dk, dv = exchange.to_tokens([dq_h, dk_h, dv_h], [layout.q, layout.kv, layout.kv], what)
    return dq, dk, dv


def head_a2a_bytes(tokens: tuple[int, ...], member: int, num_heads: int, num_kv_heads: int, head_dim: int,
                   dtype_bytes: int) -> int:
    """Forward bytes ``member`` sends: its tokens of the others' Q/K/V heads, then the others'
    tokens of its output heads."""
    layout = HeadLayout.build(num_heads, num_kv_heads, len(tokens))
    n, total = tokens[member], sum(tokens)
    per_head = head_dim * dtype_bytes
    qkv = sum(n * ((b - a) + 2 * (hi - lo)) * per_head
              for j, ((a, b), (lo, hi)) in enumerate(zip(layout.q, layout.kv)) if j != member)
    return qkv + (total - n) * layout.share(member) * per_head


def document_varlen(doc_lens) -> Varlen:
    """The layout of one kernel call over whole documents."""
    return Varlen.from_lengths(doc_lens, doc_lens)


@dataclass(frozen=True, eq=False, kw_only=True)
class UlyssesPlan(Plan):
    varlen: Varlen = field(repr=False)  # every document, for the local kernel on this rank's heads

    def device_data(self):
        return [self.varlen]

    @property
    def exchange(self) -> HeadExchange:
        return HeadExchange(self.comm, self.rank, tuple(self.num_tokens(r) for r in range(self.world_size)))

    def compute_slices(self, rank: int) -> list[MaskSlice]:
        return document_mask(self.doc_lens, self.causal, self.window)  # every document, a share of the heads

    def rank_flops(self, rank, num_heads, num_kv_heads, head_dim) -> int:
        share = HeadLayout.build(num_heads, num_kv_heads, self.world_size).share(rank)
        return int(attention_flops(self.visible_pairs(rank), share, head_dim))

    def send_bytes(self, rank, num_heads, num_kv_heads, head_dim, dtype_bytes) -> int:
        tokens = tuple(self.num_tokens(r) for r in range(self.world_size))
        return head_a2a_bytes(tokens, rank, num_heads, num_kv_heads, head_dim, dtype_bytes)

    def forward(self, q, k, v, scale):
        def attend(qh, kh, vh):
            out_h, lse = varlen_fwd(qh, kh, vh, self.varlen, causal=self.causal, window=self.window, scale=scale,
                                    backend=self.backend)
            return out_h, (qh, kh, vh, out_h, lse)

        out, (num_heads, num_kv_heads, expand, inner) = head_attention_fwd(self.exchange, q, k, v, attend,
                                                                          "ulysses forward")
        return out, (num_heads, num_kv_heads, expand, *inner)

    def backward(self, dout, saved, scale):
        num_heads, num_kv_heads, expand, qh, kh, vh, out_h, lse = saved

        def attend_bwd(dout_h, _):
            return varlen_bwd(dout_h, qh, kh, vh, out_h, lse, self.varlen, causal=self.causal, window=self.window,
                              scale=scale, backend=self.backend)

        return head_attention_bwd(self.exchange, dout, (num_heads, num_kv_heads, expand, None), attend_bwd,
                                  "ulysses backward")


def build(doc_lens, mesh, *, causal, window, backend) -> UlyssesPlan:
    p = mesh.world_size
    bounds = even_bounds(sum(doc_lens), p)
    owned = tuple(((int(bounds[r]), int(bounds[r + 1])),) for r in range(p))
    return UlyssesPlan(scheduler="ulysses", doc_lens=doc_lens, causal=causal, window=window, backend=backend,
                       world_size=p, rank=mesh.rank, group=mesh.group, owned=owned, varlen=document_varlen(doc_lens))
