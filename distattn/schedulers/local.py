"""``local``: world size 1 -- one varlen kernel call over the whole packed sequence.

Every scheduler degenerates to this on a single rank, so :func:`distattn.plan`
uses it whenever the group has one rank, whatever scheduler was asked for
(the schedule keeps the name that was asked for). The executor is
:class:`distattn.executors.local.LocalExecutor`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from ..planning.layout import Shards
from ..planning.masks import MaskSlice
from ..planning.program import Program
from ..planning.schedule import AttnShape, Schedule, attention_program
from .blocks import KernelCall, sequence_calls


@dataclass(frozen=True, eq=False, kw_only=True)
class LocalSchedule(Schedule):
    def compute_slices(self, rank: int) -> list[MaskSlice]:
        return self.mask.slices()

    @cached_property
    def local_calls(self) -> tuple[KernelCall, ...]:
        """The kernel calls of the whole sequence (one, unless slices share query rows or keys)."""
        return sequence_calls(self.mask, self.total_tokens)

    def visible_pairs(self, rank: int) -> int:
        return self.mask.area()

    def program(self, shape: AttnShape) -> Program:
        return attention_program(shape.flops([self.visible_pairs(0)]), 1)


def build(doc_lens, mesh, *, causal, window, mask, shards: Shards, scheduler: str = "local") -> LocalSchedule:
    """``shards``: the one rank's tokens (in any local order: the plan permutes them, see
    :mod:`distattn.planning.layout`)."""
    if mesh.world_size != 1:
        raise ValueError(f"scheduler='local' needs world size 1, got {mesh.world_size}")
    return LocalSchedule(scheduler=scheduler, doc_lens=doc_lens, causal=causal, window=window, world_size=1, mask=mask,
                         shards=shards)
