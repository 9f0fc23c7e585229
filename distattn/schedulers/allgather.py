"""``allgather``: all-gather K/V, then one varlen call per local chunk (Llama 3's context parallelism).

Ownership is zigzag's (chunks ``r`` and ``2P-1-r`` of the sequence, or of every
document with ``layout="document"``) so causal work is balanced.
Every rank gathers the whole K/V (padded to the largest shard: gloo's
all-gather needs equal sizes), then runs each local chunk's queries against
the key prefix of their documents that the mask lets them see: exact
bottom-right alignment, so any mask -- document, causal, full, window -- is one
kernel call per chunk. Backward computes dK/dV for the whole sequence in fp32
and reduce-scatters them back to their owners.

``heads_per_step=h`` (plan option) gathers ``h`` KV heads at a time and
prefetches the next group while computing the current one; it bounds the
gathered KV to ``S * 2h * D`` elements instead of ``S * 2 * Hkv * D``.
Memory otherwise is O(S) K/V per rank; traffic per rank is ``(P-1)`` times its
padded shard of K and V.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..masks import MaskSlice
from ..merge import acc_dtype, row_delta
from ..plans import DeviceIndex, Plan, token_index
from .blocks import Block, block_bwd, block_fwd, pieces_block, range_pairs
from .ring import local_rows, owned_ranges
from .zigzag import zigzag_ranges


@dataclass(frozen=True, eq=False, kw_only=True)
class AllGatherPlan(Plan):
    rank_pairs: np.ndarray = field(repr=False)    # [P] visible pairs each rank computes
    range_owner: np.ndarray = field(repr=False)
    range_slot: np.ndarray = field(repr=False)
    bounds: np.ndarray = field(repr=False)
    heads_per_step: int | None = None
    blocks: tuple[Block, ...] = field(default=(), repr=False)       # this rank's chunks vs global K/V
    gather_index: DeviceIndex | None = field(default=None, repr=False)  # global token -> row of gathered buffer

    @property
    def width(self) -> int:
        """Rows each rank contributes to the all-gather (the largest shard)."""
        return max(self.num_tokens(r) for r in range(self.world_size))

    def compute_slices(self, rank: int) -> list[MaskSlice]:
        # blocks placed at global rows: their slices are global
        blocks = _blocks(rank, self.bounds, self.range_owner, self.range_slot, self.bounds[:-1], self.doc_lens,
                         self.causal, self.window)
        return [sl for block in blocks for sl in block.slices(0, 0, self.causal, self.window)]

    def visible_pairs(self, rank: int) -> int:
        return int(self.rank_pairs[rank])

    def send_bytes(self, rank, num_heads, num_kv_heads, head_dim, dtype_bytes) -> int:
        return (self.world_size - 1) * 2 * self.width * num_kv_heads * head_dim * dtype_bytes

    def _head_groups(self, num_kv_heads: int) -> list[tuple[int, int]]:
        step = self.heads_per_step or num_kv_heads
        return [(h, min(h + step, num_kv_heads)) for h in range(0, num_kv_heads, step)]

    def _start_gather(self, kv_local: torch.Tensor, heads: tuple[int, int], what: str):
        """Start gathering heads of ``kv_local [2, n, Hkv, D]``; returns (buffer, pending)."""
        part = kv_local[:, :, heads[0]:heads[1]]
        padded = part.new_zeros((2, self.width, *part.shape[2:]))
        padded[:, : part.shape[1]] = part
        gathered = padded.new_empty((self.world_size * 2, *padded.shape[1:]))
        return gathered, self.comm.all_gather(gathered, padded, what)

    def device_data(self):
        return [block.varlen for block in self.blocks] + [self.gather_index]

    def _index(self, device) -> torch.Tensor:
        return self.gather_index.on(device)

    def _gathered_kv(self, gathered: torch.Tensor) -> torch.Tensor:
        """``[P * 2, W, h, D]`` as gathered -> contiguous ``[2, S, h, D]`` in global token order."""
        p, w = self.world_size, self.width
        by_rank = gathered.view(p, 2, w, *gathered.shape[2:]).transpose(0, 1).reshape(2, p * w, *gathered.shape[2:])
        return by_rank[:, self._index(gathered.device)]

    def _start_scatter(self, dkv: torch.Tensor, what: str):
        """Start summing ``dkv [2, S, h, D]`` (global order) into each owner's ``[2, W, h, D]``."""
        p, w = self.world_size, self.width
        by_rank = dkv.new_zeros((2, p * w, *dkv.shape[2:]))
        by_rank[:, self._index(dkv.device)] = dkv
        padded = by_rank.view(2, p, w, *dkv.shape[2:]).transpose(0, 1).reshape(p * 2, w, *dkv.shape[2:])
        mine = padded.new_empty((2, w, *dkv.shape[2:]))
        return mine, self.comm.reduce_scatter(mine, padded, what)

    def forward(self, q, k, v, scale):
        kw = dict(causal=self.causal, window=self.window, scale=scale, backend=self.backend)
        dtype = acc_dtype(q.dtype)
        out = torch.zeros(q.shape, dtype=dtype, device=q.device)
        lse = torch.full(q.shape[:2], float("-inf"), dtype=dtype, device=q.device)
        kv_local = torch.stack([k, v])
        group = q.shape[1] // k.shape[1]
        heads = self._head_groups(k.shape[1])
        nxt = self._start_gather(kv_local, heads[0], "allgather forward")
        for n, (h0, h1) in enumerate(heads):
            gathered, pending = nxt
            pending.wait()
            if n + 1 < len(heads):  # prefetch the next head group while computing this one
                nxt = self._start_gather(kv_local, heads[n + 1], "allgather forward")
            kv = self._gathered_kv(gathered)
            qh = slice(h0 * group, h1 * group)
            for block in self.blocks:
                block_fwd(block, q[:, qh], kv, out[:, qh], lse[:, qh], **kw)
        out = out.to(q.dtype)
        return out, (q, k, v, out, lse)

    def backward(self, dout, saved, scale):
        q, k, v, out, lse = saved
        kw = dict(causal=self.causal, window=self.window, scale=scale, backend=self.backend)
        dtype = acc_dtype(q.dtype)
        dq = torch.zeros(q.shape, dtype=dtype, device=q.device)
        dkv = torch.zeros((2, *k.shape), dtype=dtype, device=q.device)
        delta = row_delta(dout, out)
        kv_local = torch.stack([k, v])
        group = q.shape[1] // k.shape[1]
        scatters = []
        for h0, h1 in self._head_groups(k.shape[1]):
            gathered, pending = self._start_gather(kv_local, (h0, h1), "allgather backward")
            pending.wait()
            kv = self._gathered_kv(gathered)
            qh = slice(h0 * group, h1 * group)
            dkv_full = torch.zeros(kv.shape, dtype=dtype, device=q.device)
            for block in self.blocks:
                block_bwd(block, dout[:, qh], q[:, qh], kv, out[:, qh], lse[:, qh], delta[:, qh], dq[:, qh], dkv_full,
                          **kw)
            # the reduce-scatter of this head group overlaps the next group's compute
            scatters.append(((h0, h1), *self._start_scatter(dkv_full, "allgather backward")))
        for (h0, h1), mine, pending in scatters:
            pending.wait()
            dkv[:, :, h0:h1] = mine[:, : k.shape[0]]
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype)


def _blocks(rank, bounds, range_owner, range_slot, rows, doc_lens, causal, window) -> tuple[Block, ...]:
    """One block per slot: rank's ranges of that slot (at ``rows``) against the gathered K/V in
    global order (each range sees its own documents' keys)."""
    blocks = []
    for slot in np.unique(range_slot):
        mine = np.nonzero((range_owner == rank) & (range_slot == slot))[0]
        zeros, total = np.zeros(len(mine), dtype=np.int64), np.full(len(mine), bounds[-1], dtype=np.int64)
        block = pieces_block(bounds[mine], bounds[mine + 1], rows[mine], zeros, total, zeros, doc_lens, causal,
                             window)
        if block is not None:
            blocks.append(block)
    return tuple(blocks)


def build(doc_lens, mesh, *, causal, window, backend, heads_per_step: int | None = None,
          layout: str = "sequence") -> AllGatherPlan:
    if heads_per_step is not None and (isinstance(heads_per_step, bool) or not isinstance(heads_per_step, int)
                                       or heads_per_step < 1):
        raise ValueError(f"heads_per_step must be a positive int (KV heads per all-gather) or None, "
                         f"got {heads_per_step!r}")
    p = mesh.world_size
    total = sum(doc_lens)
    bounds, owner, slot = zigzag_ranges(doc_lens, p, layout)
    owned = owned_ranges(bounds, owner, p)
    i, _, area = range_pairs(bounds, doc_lens, causal, window)
    rank_pairs = np.zeros(p, dtype=np.int64)
    np.add.at(rank_pairs, owner[i], area)
    blocks, gather_index = (), None
    if not mesh.is_dry:
        blocks = _blocks(mesh.rank, bounds, owner, slot, local_rows(bounds, owner), doc_lens, causal, window)
        width = max(sum(e - s for s, e in ranges) for ranges in owned)
        gather_index = np.empty(total, dtype=np.int64)
        for r, ranges in enumerate(owned):
            tokens = token_index(ranges)
            gather_index[tokens] = r * width + np.arange(len(tokens))
        gather_index = DeviceIndex(gather_index)
    return AllGatherPlan(scheduler="allgather", doc_lens=doc_lens, causal=causal, window=window, backend=backend,
                         world_size=p, rank=mesh.rank, group=mesh.group, owned=owned, rank_pairs=rank_pairs,
                         range_owner=owner, range_slot=slot, bounds=bounds, heads_per_step=heads_per_step,
                         blocks=blocks, gather_index=gather_index)
