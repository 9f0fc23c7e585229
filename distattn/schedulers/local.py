"""``local``: world size 1 -- one varlen kernel call over the whole packed sequence.

Every scheduler degenerates to this on a single rank, so :func:`distattn.plan`
uses it whenever the group has one rank, whatever scheduler was asked for.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..kernels import Varlen, varlen_bwd, varlen_fwd
from ..masks import MaskSlice, document_mask
from ..plans import Plan
from .ulysses import document_varlen


@dataclass(frozen=True, eq=False, kw_only=True)
class LocalPlan(Plan):
    varlen: Varlen = field(repr=False)

    def device_data(self):
        return [self.varlen]

    def compute_slices(self, rank: int) -> list[MaskSlice]:
        return document_mask(self.doc_lens, self.causal, self.window)

    def send_bytes(self, rank, num_heads, num_kv_heads, head_dim, dtype_bytes) -> int:
        return 0

    def forward(self, q, k, v, scale):
        out, lse = varlen_fwd(q, k, v, self.varlen, causal=self.causal, window=self.window, scale=scale,
                              backend=self.backend)
        return out, (q, k, v, out, lse)

    def backward(self, dout, saved, scale):
        q, k, v, out, lse = saved
        return varlen_bwd(dout, q, k, v, out, lse, self.varlen, causal=self.causal, window=self.window,
                          scale=scale, backend=self.backend)


def build(doc_lens, mesh, *, causal, window, backend, scheduler="local") -> LocalPlan:
    if mesh.world_size != 1:
        raise ValueError(f"scheduler='local' needs world size 1, got {mesh.world_size}")
    return LocalPlan(scheduler=scheduler, doc_lens=doc_lens, causal=causal, window=window, backend=backend,
                     world_size=1, rank=mesh.rank, group=mesh.group, owned=(((0, sum(doc_lens)),),),
                     varlen=document_varlen(doc_lens))
