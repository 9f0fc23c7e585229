"""``allgather``: all-gather K/V, then one varlen call per local chunk (Llama 3's context parallelism).

Its own layout is zigzag's (chunks ``r`` and ``2P-1-r`` of the sequence) so causal work is
balanced; any other layout works the same way (:mod:`distattn.layout`). Every rank gathers the whole K/V (padded to the largest shard: gloo's
all-gather needs equal sizes), then runs each local chunk's queries against
the key prefix of their documents that the mask lets them see: exact
bottom-right alignment, so any mask -- document, causal, full, window -- is one
kernel call per chunk. Backward computes dK/dV for the whole sequence in fp32
and reduce-scatters them back to their owners.

``heads_per_step=h`` (plan option) gathers ``h`` KV heads at a time and
prefetches the next group while computing the current one; it bounds the
gathered KV to ``S * 2h * D`` elements instead of ``S * 2 * Hkv * D``.
Memory otherwise is O(S) K/V per rank; traffic per rank is ``(P-1)`` times its
padded shard of K and V. The executor is
:class:`distattn.executors.gather.GatherExecutor`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..layout import Shards
from ..masks import MaskSlice
from ..schedule import AttnShape, Phase, Schedule
from .blocks import KernelCall, kernel_calls, range_pairs


@dataclass(frozen=True, eq=False, kw_only=True)
class GatherSchedule(Schedule):
    rank_pairs: np.ndarray = field(repr=False)    # [P] visible pairs each rank computes
    heads_per_step: int | None = None

    @property
    def width(self) -> int:
        """Tokens of the largest shard: every rank's all-gather contribution is padded to it."""
        return max(self.num_tokens(r) for r in range(self.world_size))

    def head_groups(self, num_kv_heads: int) -> list[tuple[int, int]]:
        """The KV heads of each all-gather step."""
        step = self.heads_per_step or num_kv_heads
        return [(h, min(h + step, num_kv_heads)) for h in range(0, num_kv_heads, step)]

    def kernel_calls(self, rank: int, rows: np.ndarray) -> tuple[KernelCall, ...]:
        """One call per slot: rank's runs of that slot (at ``rows``; ``bounds[:-1]`` for global rows)
        against the gathered K/V in global order (each run sees its own documents' keys)."""
        bounds, owner, slot = self.shards.bounds, self.shards.owner, self.shards.slot
        calls = []
        for s in np.unique(slot):
            mine = np.nonzero((owner == rank) & (slot == s))[0]
            zeros = np.zeros(len(mine), dtype=np.int64)
            total = np.full(len(mine), bounds[-1], dtype=np.int64)
            calls += kernel_calls(bounds[mine], bounds[mine + 1], rows[mine], zeros, total, zeros, self.mask)
        return tuple(calls)

    def compute_slices(self, rank: int) -> list[MaskSlice]:
        return [sl for call in self.kernel_calls(rank, self.shards.bounds[:-1]) for sl in call.slices(0, 0)]

    def visible_pairs(self, rank: int) -> int:
        return int(self.rank_pairs[rank])

    def phases(self, shape: AttnShape) -> list[Phase]:
        """Per head group ``n``: forward, the gather of group ``n + 1`` runs under group ``n``'s
        attention (the first is exposed); backward, each gather is waited at once and the
        reduce-scatter of group ``n`` runs under group ``n + 1``'s attention (the last is exposed)."""
        p, group = self.world_size, shape.num_heads // shape.num_kv_heads
        fwd, bwd = [], []
        for n, (h0, h1) in enumerate(self.head_groups(shape.num_kv_heads)):
            gather = np.full(p, (p - 1) * self.width * 2 * shape.row_bytes(h1 - h0), dtype=np.int64)
            flops = shape.flops(self.rank_pairs, (h1 - h0) * group)
            fwd += [Phase.per_rank("forward", "all_gather", "K/V", p, gather, max(n - 1, 0),
                                   overlaps="attention" if n else None),
                    Phase.per_rank("forward", "attention", "attention", p, flops, n)]
            scatter = np.full(p, (p - 1) * self.width * 2 * shape.row_bytes(h1 - h0, acc=True), dtype=np.int64)
            bwd += [Phase.per_rank("backward", "all_gather", "K/V", p, gather, n),
                    Phase.per_rank("backward", "attention", "attention", p, flops * 2.5, n),
                    Phase.per_rank("backward", "reduce_scatter", "dK/dV", p, scatter, n + 1, overlaps="attention")]
        return fwd + bwd

    def buffer_bytes(self, shape: AttnShape) -> np.ndarray:
        """The gathered K/V of one head group and its copy in global order."""
        h0, h1 = self.head_groups(shape.num_kv_heads)[0]
        return np.full(self.world_size, 2 * self.world_size * self.width * 2 * shape.row_bytes(h1 - h0))


def build(doc_lens, mesh, *, causal, window, mask, shards: Shards, heads_per_step: int | None = None
          ) -> GatherSchedule:
    if heads_per_step is not None and (isinstance(heads_per_step, bool) or not isinstance(heads_per_step, int)
                                       or heads_per_step < 1):
        raise ValueError(f"heads_per_step must be a positive int (KV heads per all-gather) or None, "
                         f"got {heads_per_step!r}")
    p = mesh.world_size
    i, _, area = range_pairs(shards.bounds, mask)
    rank_pairs = np.zeros(p, dtype=np.int64)
    np.add.at(rank_pairs, shards.owner[i], area)
    return GatherSchedule(scheduler="allgather", doc_lens=doc_lens, causal=causal, window=window, world_size=p,
                          shards=shards, mask=mask, rank_pairs=rank_pairs, heads_per_step=heads_per_step)
