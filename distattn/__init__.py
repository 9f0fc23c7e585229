"""distattn: exact context-parallel attention for long-context LLM training.

Public contract (see DESIGN.md)::

    plan = distattn.plan(doc_lens, mesh, scheduler="zigzag", causal=True, window=None, backend="auto")
    q_local = plan.shard(q)                 # [S, H, D] -> [S_local, H, D]
    out = distattn.attention(q_local, k_local, v_local, plan)
    out_full = plan.unshard(out)
    ref = distattn.reference_attention(q, k, v, doc_lens, causal=True, window=None)
"""

from .api import attention, local_attention, plan
from .masks import MaskSlice, document_mask
from .oracle import reference_attention
from .plans import Plan

__version__ = "0.1.0"

__all__ = ["plan", "attention", "local_attention", "reference_attention", "Plan", "MaskSlice", "document_mask", "__version__"]
