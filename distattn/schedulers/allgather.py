"""``allgather``: all-gather K/V, then one varlen call per local chunk (Llama 3's context parallelism).

Its own layout is zigzag's (chunks ``r`` and ``2P-1-r`` of the sequence) so causal work is
balanced; any other layout works the same way (:mod:`distattn.planning.layout`). Every rank gathers the whole K/V (padded to the largest shard: gloo's
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

from ..planning.layout import Shards
from ..planning.masks import MaskSlice
from ..planning.program import Builder, Program
from ..planning.schedule import AttnShape, Phase, Schedule
from .blocks import KernelCall, kernel_calls, range_pairs


@dataclass(frozen=True, eq=False, kw_only=True)
class GatherSchedule(Schedule):
    rank_pairs: np.ndarray = field(repr=False)    # [P] visible pairs each rank computes
    heads_per_step: int | None = None

    @property
    def width(self) -> int:
        """Tokens of the largest shard: every rank's all-gather contribution is padded to it."""
        return max(self.num_tokens(r) for r in range(self.world_size))

    def kernel_heads(self, shape: AttnShape) -> float:
        """With ``heads_per_step``: that many KV heads' query heads a call; else all."""
        if not self.heads_per_step:
            return float(shape.num_heads)
        return min(float(shape.num_heads), self.heads_per_step * shape.num_heads / shape.num_kv_heads)

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

    def program(self, shape: AttnShape) -> Program:
        """Step ``n`` is head group ``n``. Forward: the gather of group ``n + 1`` is started before
        group ``n``'s attention and waited for after it (the first is waited for at once);
        backward: each gather is waited for at once, and group ``n``'s reduce-scatter is started
        after its attention and waited for after the last group's."""
        p, group = self.world_size, shape.num_heads // shape.num_kv_heads
        heads = self.head_groups(shape.num_kv_heads)
        n_steps = len(heads)
        kv = [[(p - 1) * self.width * 2 * shape.wire_row(h1 - h0)] * p for h0, h1 in heads]
        dkv = [[(p - 1) * self.width * 2 * shape.row_bytes(h1 - h0, acc=True)] * p for h0, h1 in heads]
        flops = np.stack([shape.flops(self.rank_pairs, (h1 - h0) * group) for h0, h1 in heads])   # [steps, P]
        b = Builder()
        gather = b.phase(Phase.stepped("forward", "all_gather", "K/V", p, kv))
        attn = b.phase(Phase.stepped("forward", "attention", "attention", p, flops))
        b_gather = b.phase(Phase.stepped("backward", "all_gather", "K/V", p, kv))
        b_attn = b.phase(Phase.stepped("backward", "attention", "attention", p, flops * 2.5))
        scatter = b.phase(Phase.stepped("backward", "reduce_scatter", "dK/dV", p, dkv))
        b.start("dispatch", gather, 0)          # GatherExecutor's forward stages
        for n in range(n_steps):
            b.wait("compute", gather, n)
            if n + 1 < n_steps:
                b.start("compute", gather, n + 1)
            b.run("compute", attn, n)
        for n in range(n_steps):                # its backward stages
            b.start("compute_backward" if n else "start_backward", b_gather, n)
            b.wait("compute_backward", b_gather, n)
            b.run("compute_backward", b_attn, n)
            b.start("compute_backward", scatter, n)
        for n in range(n_steps):
            b.wait("finish_backward", scatter, n)
        return b.build()

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
