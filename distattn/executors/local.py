"""One kernel call over every document of the sequence, no communication: the executor of
``local`` (world size 1) and the inner attention of ``ulysses`` (on its head shard)."""

from __future__ import annotations

from ..kernels import Varlen, varlen_bwd, varlen_fwd
from .base import Executor, Saved


class LocalExecutor(Executor):
    def __init__(self, schedule, rank: int, comm, backend: str):
        super().__init__(schedule, rank, comm, backend)
        self.varlen = Varlen.from_lengths(schedule.doc_lens, schedule.doc_lens)

    def device_data(self):
        return [self.varlen]

    def forward(self, q, k, v, scale):
        out, lse = varlen_fwd(q, k, v, self.varlen, **self.kernel_args(scale))
        return out, Saved(q, k, v, out, lse)

    def backward(self, dout, saved: Saved, scale):
        return varlen_bwd(dout, *saved, self.varlen, **self.kernel_args(scale))
