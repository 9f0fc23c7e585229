"""``ring``: contiguous shards, KV blocks passed around the ring (ring attention, Liu et al. 2023).

The ring runs on any token layout (:mod:`distattn.planning.layout`): a rank's K/V block is the tokens it
holds. ``ring``'s own layout is contiguous (rank ``r`` owns tokens ``[r*S/P, (r+1)*S/P)``, sizes
differing by at most one; no padding); ``zigzag`` is this schedule on the zigzag layout. At step
``t`` rank ``r`` holds the KV block that started on rank ``src = r - t`` and computes its queries
against it while the block moves on to ``r + 1`` (double-buffered ``batch_isend_irecv``,
overlapped with the local kernel). Partial results merge by log-sum-exp into fp32 accumulators.
What a query block sees of a key block follows from the tokens' global positions: each
(query run, key run) pair is cut into the mask's slices, trimmed to their bands.

Document masks make many blocks empty. The schedule knows, for every block, the
farthest rank along the ring that still needs it (``hops``); the block is not
forwarded past that rank, and ranks compute only blocks with visible pairs.

Backward runs the same KV ring again. Each rank's dK/dV for a foreign block
(fp32) goes straight back to the block's owner one step later, overlapped with
the next step's compute; the owner sums the contributions in fp32, so neither
dq nor dK/dV is rounded between steps and error does not grow with ring size.

:class:`RingSchedule` describes any ownership by runs of tokens (``usp`` runs it inside its
ring groups). A rank's runs fall in *slots* (:attr:`distattn.planning.layout.Shards.slot`; zigzag: its
early and its late chunks): each step is one kernel call per (query slot, key slot) whatever the
number of documents, more only where pieces overlap in rows. The executor is
:class:`distattn.executors.ring_p2p.RingExecutor`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..planning.layout import Shards
from ..planning.masks import MaskSlice
from ..planning.program import Builder, Program
from ..planning.schedule import AttnShape, Phase, Schedule
from .blocks import KernelCall, kernel_calls, range_pairs


@dataclass(frozen=True, eq=False, kw_only=True)
class RingSchedule(Schedule):
    """Ring execution over the runs of ``shards`` (see module docstring)."""

    pairs: tuple[np.ndarray, ...] = field(repr=False)       # (i, j, area): range pairs with visible pairs
    rank_pairs: tuple[np.ndarray, ...] = field(repr=False)  # (query rank, key rank, area), area > 0
    hops: np.ndarray = field(repr=False)          # [P] per source rank: how far along the ring its KV travels
    span: int | None = None                       # consecutive ranks the ring covers (usp: strided rings)

    # ---- facts of the ring ---------------------------------------------------------------------
    @property
    def bounds(self) -> np.ndarray:
        return self.shards.bounds

    @property
    def range_owner(self) -> np.ndarray:
        return self.shards.owner

    def sources(self, rank: int) -> dict[int, int]:
        """``{step: source rank}`` of the KV blocks ``rank`` computes against (at step ``t`` it holds
        the block of ``rank - t``); steps without visible pairs are absent."""
        qr, kr, _ = self.rank_pairs
        return {(rank - src) % self.world_size: src for src in kr[qr == rank].tolist()}

    def holds(self, rank: int, t: int) -> bool:
        """Rank holds a KV block at step t (the block of rank - t has not stopped travelling)."""
        return t <= self.hops[(rank - t) % self.world_size]

    def sends(self, rank: int, t: int) -> bool:
        """Rank forwards its step-t block to rank + 1 for step t + 1."""
        return t + 1 <= self.hops[(rank - t) % self.world_size]

    def pairs_with(self, q_rank: int, k_rank: int) -> bool:
        qr, kr, _ = self.rank_pairs
        return bool(((qr == q_rank) & (kr == k_rank)).any())

    def kernel_calls(self, rank: int, src: int, rows: np.ndarray) -> tuple[KernelCall, ...]:
        """Rank's queries against src's KV buffer, ``rows[i]`` placing run ``i`` (compute-order
        rows: :attr:`~distattn.planning.layout.Shards.rows`; global: ``bounds[:-1]``): one call per (query
        slot, key slot), more where pieces overlap in rows."""
        i, j, _ = self.pairs
        mine = (self.range_owner[i] == rank) & (self.range_owner[j] == src)
        i, j = i[mine], j[mine]
        slot = self.shards.slot
        calls = []
        for a in np.unique(slot[i]):
            for b in np.unique(slot[j]):
                sel = (slot[i] == a) & (slot[j] == b)
                qi, kj = i[sel], j[sel]
                calls += kernel_calls(self.bounds[qi], self.bounds[qi + 1], rows[qi], self.bounds[kj],
                                      self.bounds[kj + 1], rows[kj], self.mask)
        return tuple(calls)

    # ---- the schedule --------------------------------------------------------------------------
    def compute_slices(self, rank: int) -> list[MaskSlice]:
        qr, kr, _ = self.rank_pairs
        out = []
        for src in kr[qr == rank].tolist():  # calls placed at global rows: their slices are global
            for call in self.kernel_calls(rank, src, self.bounds[:-1]):
                out += call.slices(0, 0)
        return out

    def visible_pairs(self, rank: int) -> int:
        qr, _, area = self.rank_pairs
        return int(area[qr == rank].sum())

    def _kv_moves(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(rank, step, source) of every KV forward: source ``s``'s block leaves rank ``s + t`` at step
        ``t`` for ``t < hops[s]``."""
        p = self.world_size
        src = np.repeat(np.arange(p), self.hops)
        t = np.arange(len(src)) - np.repeat(np.cumsum(self.hops) - self.hops, self.hops)
        return (src + t) % p, t, src

    def program(self, shape: AttnShape, heads: int | None = None, kv_heads: int | None = None) -> Program:
        """Forward, step ``t``: start the K/V ring (sends to ``rank + 1``, receives from ``rank - 1``),
        attention against the held block, wait. Backward, steps ``0..P``: the same, the foreign
        blocks' fp32 dK/dV going back to their owners one step later. Step 0 starts at ``dispatch``
        (``start_backward``) and the backward's last step ends at ``finish_backward``: under
        nano-batches they hide behind the other nano-batch's layers. ``heads``/``kv_heads``: the
        heads this ring carries (usp: a Ulysses share), default all."""
        p, span = self.world_size, self.span or self.world_size
        kv_heads = shape.num_kv_heads if kv_heads is None else kv_heads
        qr, kr, area = self.rank_pairs
        step = (qr - kr) % p
        tokens = np.asarray([self.num_tokens(r) for r in range(p)], dtype=np.int64)
        mover, t, src = self._kv_moves()
        kv = tokens[src] * 2 * shape.wire_row(kv_heads)
        # backward: rank q returns the fp32 dK/dV of a foreign block to its owner one step later
        foreign = step > 0
        dkv = tokens[kr[foreign]] * 2 * shape.row_bytes(kv_heads, acc=True)
        ret_rank, ret_step = np.concatenate([mover, qr[foreign]]), np.concatenate([t, step[foreign] + 1])
        # who sends to whom in each step (a rank with nothing to send or receive in a step waits for no one)
        ring_links = (t, mover, (mover + 1) % p)
        back_links = tuple(np.concatenate(x) for x in zip(ring_links, (step[foreign] + 1, qr[foreign], kr[foreign])))
        b = Builder()
        ring = b.phase(Phase("forward", "send_recv", "K/V ring", span, mover, kv, t, links=ring_links))
        attn = b.phase(Phase("forward", "attention", "attention", span, qr, shape.flops(area, heads), step))
        back = b.phase(Phase("backward", "send_recv", "K/V ring, dK/dV to owners", span, ret_rank,
                             np.concatenate([kv, dkv]), ret_step, links=back_links))
        battn = b.phase(Phase("backward", "attention", "attention", span, qr, shape.flops(area, heads, backward=True),
                              step))
        for s in range(p):     # RingExecutor's forward stages: step 0 starts at dispatch
            b.start("compute" if s else "dispatch", ring, s)
            b.run("compute", attn, s)
            b.wait("compute", ring, s)
        for s in range(p + 1):  # its backward stages: the last step (dK/dV home) ends at finish
            b.start("compute_backward" if s else "start_backward", back, s)
            if s < p:
                b.run("compute_backward", battn, s)
            b.wait("compute_backward" if s < p else "finish_backward", back, s)
        return b.build()

    def buffer_bytes(self, shape: AttnShape) -> np.ndarray:
        """The largest step of backward (forward holds less): the K/V block computed on and the one
        arriving, plus the fp32 dK/dV in flight -- a foreign block's being summed, the previous
        step's on its way back to its owner, and the rank's own arriving from a helper (the
        executor's ``cur``, ``nxt``, ``acc``, ``prev`` and ``incoming``)."""
        p = self.world_size
        tokens = np.asarray([self.num_tokens(r) for r in range(p)], dtype=np.int64)
        mover, t, src = self._kv_moves()
        # (rank, step, block rows) of every block held: its own at step 0, each received one step after it moves
        held_rank = np.concatenate([np.arange(p), (mover + 1) % p])
        held_step = np.concatenate([np.zeros(p, dtype=np.int64), t + 1])
        held_rows = np.concatenate([tokens, tokens[src]])
        arriving = held_step > 0   # allocated a step earlier, as that step's nxt
        qr, kr, _ = self.rank_pairs
        step = (qr - kr) % p
        qr, kr, step = qr[step > 0], kr[step > 0], step[step > 0]
        dkv = np.tile(tokens[kr], 3) * 2 * shape.row_bytes(shape.num_kv_heads, acc=True)
        ranks = np.concatenate([held_rank, held_rank[arriving], qr, qr, kr])
        steps = np.concatenate([held_step, held_step[arriving] - 1, step, step + 1, step + 1])
        amount = np.concatenate([held_rows * shape.kv_row, held_rows[arriving] * shape.kv_row, dkv])
        key, inverse = np.unique(ranks * (p + 2) + steps, return_inverse=True)
        at_step = np.zeros(len(key), dtype=np.int64)
        np.add.at(at_step, inverse, amount)
        out = np.zeros(p, dtype=np.int64)
        np.maximum.at(out, key // (p + 2), at_step)
        return out

    def extra_stats(self) -> dict:
        p = self.world_size
        computed = np.bincount(self.rank_pairs[0], minlength=p)
        return {"blocks_computed": computed.tolist(), "blocks_skipped": (p - computed).tolist()}


def ring_schedule(scheduler: str, shards: Shards, doc_lens, *, causal: bool, window: int | None, mask,
                  span: int | None = None) -> RingSchedule:
    """The ring schedule of any ownership by runs (ring: one per rank; zigzag: two per rank, or
    two per rank and document; an explicit layout: any)."""
    p, range_owner = shards.world_size, shards.owner
    pairs = range_pairs(shards.bounds, mask)
    i, j, area = pairs
    # rank pairs, sparse: a document mask leaves most of them empty at thousands of ranks
    key, inverse = np.unique(range_owner[i] * p + range_owner[j], return_inverse=True)
    rank_area = np.zeros(len(key), dtype=np.int64)
    np.add.at(rank_area, inverse, area)
    qr, kr = key // p, key % p
    # how far each source's KV must travel: the farthest rank (ring distance) that needs it
    hops = np.zeros(p, dtype=np.int64)
    np.maximum.at(hops, kr, (qr - kr) % p)
    return RingSchedule(scheduler=scheduler, doc_lens=doc_lens, causal=causal, window=window, world_size=p,
                        shards=shards, mask=mask, pairs=pairs, rank_pairs=(qr, kr, rank_area), hops=hops, span=span)


def build(doc_lens, mesh, *, causal, window, mask, shards: Shards, scheduler: str = "ring") -> RingSchedule:
    """``ring`` on its contiguous layout, ``zigzag`` on the zigzag one, either on any layout."""
    return ring_schedule(scheduler, shards, doc_lens, causal=causal, window=window, mask=mask)
