"""``ring``: contiguous shards, KV blocks passed around the ring (ring attention, Liu et al. 2023).

Rank ``r`` owns tokens ``[r*S/P, (r+1)*S/P)`` (sizes differ by at most one; no
padding). At step ``t`` it holds the KV block that started on rank
``src = r - t`` and computes its queries against it while the block moves on
to ``r + 1`` (double-buffered ``batch_isend_irecv``, overlapped with the local
kernel). Partial results merge by log-sum-exp into fp32 accumulators.

Document masks make many blocks empty. The plan knows, for every block, the
farthest rank along the ring that still needs it (``hops``); the block is not
forwarded past that rank, and ranks compute only blocks with visible pairs.

Backward runs the same KV ring again. Each rank's dK/dV for a foreign block
(fp32) goes straight back to the block's owner one step later, overlapped with
the next step's compute; the owner sums the contributions in fp32, so neither
dq nor dK/dV is rounded between steps and error does not grow with ring size.

:class:`RingPlan` executes any ownership by ranges; ``zigzag`` reuses it with
``2P`` chunks of the sequence or of every document. A rank's ranges fall in
*slots* (zigzag: its early and its late chunk): the ranges of one slot follow
each other in global and in local order, so each step runs one kernel call per
(query slot, key slot) whatever the number of documents.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..masks import MaskSlice
from ..merge import acc_dtype, row_delta
from ..plans import Plan
from .blocks import Block, block_bwd, block_fwd, even_bounds, pieces_block, range_pairs


@dataclass(frozen=True, eq=False, kw_only=True)
class RingPlan(Plan):
    """Ring execution over ranges ``bounds`` owned by ``range_owner`` (see module docstring)."""

    bounds: np.ndarray = field(repr=False)        # [C + 1] token boundaries of the ownership ranges
    range_owner: np.ndarray = field(repr=False)   # [C] rank owning each range
    range_slot: np.ndarray = field(repr=False)    # [C] slot of each range (see module docstring)
    pairs: tuple[np.ndarray, ...] = field(repr=False)  # (i, j, area): range pairs with visible pairs
    rank_area: np.ndarray = field(repr=False)     # [P, P] visible pairs, query rank x key rank
    hops: tuple[int, ...]                         # per source rank: how far along the ring its KV travels
    steps: tuple[tuple[Block, ...], ...] = field(repr=False)  # this rank's blocks at each step (live plans)

    # ---- planning facts ----------------------------------------------------------------------
    def _holds(self, rank: int, t: int) -> bool:
        """Rank holds a KV block at step t (the block of rank - t has not stopped travelling)."""
        return t <= self.hops[(rank - t) % self.world_size]

    def _sends(self, rank: int, t: int) -> bool:
        """Rank forwards its step-t block to rank + 1 for step t + 1."""
        return t + 1 <= self.hops[(rank - t) % self.world_size]

    def compute_slices(self, rank: int) -> list[MaskSlice]:
        out = []
        for src in range(self.world_size):  # blocks placed at global rows: their slices are global
            for block in _rank_blocks(rank, src, self.bounds, self.range_owner, self.range_slot, self.pairs,
                                      self.bounds[:-1], self.doc_lens, self.causal, self.window):
                out += block.slices(0, 0, self.causal, self.window)
        return out

    def visible_pairs(self, rank: int) -> int:
        return int(self.rank_area[rank].sum())

    def send_bytes(self, rank, num_heads, num_kv_heads, head_dim, dtype_bytes) -> int:
        per_token = 2 * num_kv_heads * head_dim * dtype_bytes
        return sum(self.num_tokens((rank - t) % self.world_size) * per_token
                   for t in range(self.world_size - 1) if self._sends(rank, t))

    def device_data(self):
        return [block.varlen for blocks in self.steps for block in blocks]

    def extra_stats(self) -> dict:
        p = self.world_size
        computed = [int((self.rank_area[r] > 0).sum()) for r in range(p)]
        return {"blocks_computed": computed, "blocks_skipped": [p - c for c in computed]}

    # ---- execution -----------------------------------------------------------------------------
    def _kv_ring_step(self, t: int, cur: torch.Tensor | None, like: torch.Tensor):
        """Sends/receives that move the KV ring from step t to t + 1."""
        r, p = self.rank, self.world_size
        sends, recvs, nxt = [], [], None
        if t + 1 < p and self._sends(r, t):
            sends.append((cur, (r + 1) % p))
        if t + 1 < p and self._holds(r, t + 1):
            src = (r - t - 1) % p
            nxt = like.new_empty((2, self.num_tokens(src), *like.shape[2:]))
            recvs.append((nxt, (r - 1) % p))
        return sends, recvs, nxt

    def forward(self, q, k, v, scale):
        r = self.rank
        kw = dict(causal=self.causal, window=self.window, scale=scale, backend=self.backend)
        dtype = acc_dtype(q.dtype)
        out = torch.zeros(q.shape, dtype=dtype, device=q.device)
        lse = torch.full(q.shape[:2], float("-inf"), dtype=dtype, device=q.device)
        kv = torch.stack([k, v])
        cur = kv
        for t in range(self.world_size):
            sends, recvs, nxt = self._kv_ring_step(t, cur, kv)
            pending = self.comm.exchange(sends, recvs, f"{self.scheduler} forward step {t} (rank {r})")
            for block in self.steps[t]:
                block_fwd(block, q, cur, out, lse, **kw)
            pending.wait()
            cur = nxt
        out = out.to(q.dtype)
        return out, (q, k, v, out, lse)

    def backward(self, dout, saved, scale):
        q, k, v, out, lse = saved
        r, p = self.rank, self.world_size
        kw = dict(causal=self.causal, window=self.window, scale=scale, backend=self.backend)
        dtype = acc_dtype(q.dtype)
        dq = torch.zeros(q.shape, dtype=dtype, device=q.device)
        delta = row_delta(dout, out)
        kv = torch.stack([k, v])
        dkv = torch.zeros(kv.shape, dtype=dtype, device=q.device)  # own block, summed in fp32
        cur, prev = kv, None  # prev: dK/dV computed at the previous step for a foreign block
        for t in range(p + 1):
            sends, recvs, nxt = self._kv_ring_step(t, cur, kv)
            incoming = None
            if t >= 2:  # dK/dV of step t - 1 go to their owner; ours arrive from rank r + t - 1
                owner, helper = (r - t + 1) % p, (r + t - 1) % p
                if prev is not None:
                    sends.append((prev, owner))
                if self.rank_area[helper, r] > 0:
                    incoming = torch.empty_like(dkv)
                    recvs.append((incoming, helper))
            pending = self.comm.exchange(sends, recvs, f"{self.scheduler} backward step {t} (rank {r})")
            prev = None
            if t < p and self.steps[t]:
                acc = dkv if t == 0 else torch.zeros((2, *cur.shape[1:]), dtype=dtype, device=q.device)
                for block in self.steps[t]:
                    block_bwd(block, dout, q, cur, out, lse, delta, dq, acc, **kw)
                prev = acc if t > 0 else None
            pending.wait()
            if incoming is not None:
                dkv += incoming
            cur = nxt
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype)


def build_ring_plan(scheduler: str, bounds: np.ndarray, range_owner: np.ndarray, doc_lens, mesh, *, causal,
                    window, backend, range_slot: np.ndarray | None = None) -> RingPlan:
    """Plan ring execution for any ownership by ranges (ring: one per rank; zigzag: two per rank,
    or two per rank and document), ``range_slot`` as in the module docstring (default: one slot)."""
    p = mesh.world_size
    range_slot = np.zeros(len(range_owner), dtype=np.int64) if range_slot is None else range_slot
    pairs = range_pairs(bounds, doc_lens, causal, window)
    i, j, area = pairs
    rank_area = np.zeros((p, p), dtype=np.int64)
    np.add.at(rank_area, (range_owner[i], range_owner[j]), area)
    # how far each source's KV must travel: the farthest rank (ring distance) that needs it
    dist = (np.arange(p)[:, None] - np.arange(p)[None, :]) % p  # [dst, src]
    hops = tuple(int(x) for x in np.where(rank_area > 0, dist, 0).max(axis=0))
    owned = owned_ranges(bounds, range_owner, p)
    steps: tuple = ()
    if not mesh.is_dry:
        local_start = local_rows(bounds, range_owner)
        steps = tuple(_rank_blocks(mesh.rank, (mesh.rank - t) % p, bounds, range_owner, range_slot, pairs,
                                   local_start, doc_lens, causal, window) for t in range(p))
    return RingPlan(scheduler=scheduler, doc_lens=doc_lens, causal=causal, window=window, backend=backend,
                    world_size=p, rank=mesh.rank, group=mesh.group, owned=owned, bounds=bounds,
                    range_owner=range_owner, range_slot=range_slot, pairs=pairs, rank_area=rank_area, hops=hops,
                    steps=steps)


def owned_ranges(bounds: np.ndarray, range_owner: np.ndarray, p: int) -> tuple:
    """Each rank's ranges ``(start, end)`` in local order (increasing global position)."""
    return tuple(tuple(zip(bounds[:-1][range_owner == r].tolist(), bounds[1:][range_owner == r].tolist()))
                 for r in range(p))


def local_rows(bounds: np.ndarray, range_owner: np.ndarray) -> np.ndarray:
    """Row of each range's first token in its owner's local buffer."""
    sizes = np.diff(bounds)
    out = np.zeros(len(sizes), dtype=np.int64)
    for r in np.unique(range_owner):
        mine = np.nonzero(range_owner == r)[0]
        out[mine] = np.cumsum(sizes[mine]) - sizes[mine]
    return out


def _rank_blocks(rank, src, bounds, range_owner, range_slot, pairs, rows, doc_lens, causal, window
                 ) -> tuple[Block, ...]:
    """Blocks of rank's queries against src's KV buffer, ``rows[i]`` placing range ``i`` (local
    rows; ``bounds[:-1]`` gives global ones): one per (query slot, key slot)."""
    i, j, _ = pairs
    mine = (range_owner[i] == rank) & (range_owner[j] == src)
    i, j = i[mine], j[mine]
    blocks = []
    for a in np.unique(range_slot[i]):
        for b in np.unique(range_slot[j]):
            sel = (range_slot[i] == a) & (range_slot[j] == b)
            qi, kj = i[sel], j[sel]
            block = pieces_block(bounds[qi], bounds[qi + 1], rows[qi], bounds[kj], bounds[kj + 1], rows[kj],
                                 doc_lens, causal, window)
            if block is not None:
                blocks.append(block)
    return tuple(blocks)


def build(doc_lens, mesh, *, causal, window, backend) -> RingPlan:
    p = mesh.world_size
    return build_ring_plan("ring", even_bounds(sum(doc_lens), p), np.arange(p), doc_lens, mesh, causal=causal,
                           window=window, backend=backend)
