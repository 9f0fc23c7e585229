"""distattn: exact context-parallel attention for long-context LLM training.

Public contract (docs/guides/core-api.md shows it at length)::

    plan = distattn.plan(doc_lens, mesh, scheduler="zigzag", causal=True, window=None, backend="auto")
    q_local = plan.shard(q)                 # [S, H, D] -> [S_local, H, D]
    out = distattn.attention(q_local, k_local, v_local, plan)
    out_full = plan.unshard(out)
    mask = distattn.SliceMask([(q_start, q_end, k_start, k_end, kind), ...])   # or distattn.masks.prefix_lm(...)
    plan = distattn.plan(doc_lens, mesh, scheduler="zigzag", mask=mask)
    out = distattn.attention(q_local, k_local, v_local, plan, sinks=s, softcap=c)
    ref = distattn.reference_attention(q, k, v, doc_lens, causal=True, window=None)
    plan = distattn.plan(doc_lens, mesh, scheduler="cad", layout="zigzag")   # any scheduler on any layout
    plan = distattn.plan(doc_lens, mesh, scheduler="ring", layout=distattn.Layout.from_indices([[...], ...]))
    out = distattn.varlen_attention(q_local, k_local, v_local, cu_seqlens, max_seqlen, group=cp_group, causal=True)
    from distattn.compat.ring_flash_attn import zigzag_ring_flash_attn_varlen_func   # ring-flash-attention's API
    packing = distattn.pack_balanced(doc_lens, dp_size, micro_batches, token_cap)     # [dp][micro] -> documents
    choice = distattn.choose(doc_lens_per_micro_batch, world_size, "llama3-8b")       # [(scheduler, cp), ...]
"""

__version__ = "0.1.0"

# Resolved on first use (PEP 562), so `import distattn.cli` and `distattn --help` do not import torch.
_LAZY = {"plan": "api", "attention": "api", "local_attention": "api", "reference_attention": "oracle",
         "Plan": "plans", "MaskSlice": "masks", "SliceMask": "masks", "document_mask": "masks", "Layout": "layout",
         "varlen_attention": "varlen", "varlen_plan": "varlen", "configure_logging": "log",
         "PlanContext": "schedulers", "PlanCache": "plan_cache", "pack_balanced": "packing",
         "choose": "sim.choose"}


def __getattr__(name: str):
    if name in _LAZY:
        from importlib import import_module

        value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'distattn' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))

__all__ = ["plan", "attention", "local_attention", "reference_attention", "Plan", "MaskSlice", "SliceMask",
           "document_mask", "Layout", "varlen_attention", "varlen_plan", "configure_logging", "PlanContext",
           "PlanCache", "pack_balanced", "choose", "__version__"]
