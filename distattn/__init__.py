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

import importlib as _importlib
import importlib.abc as _abc
import importlib.util as _util
import sys as _sys
import warnings as _warnings

# Resolved on first use (PEP 562), so `import distattn.cli` and `distattn --help` do not import torch.
_LAZY = {"plan": "runtime.api", "attention": "runtime.api", "local_attention": "runtime.api",
         "reference_attention": "runtime.oracle", "Plan": "runtime.plans", "MaskSlice": "planning.masks",
         "SliceMask": "planning.masks", "document_mask": "planning.masks", "Layout": "planning.layout",
         "varlen_attention": "runtime.varlen", "varlen_plan": "runtime.varlen",
         "configure_logging": "distributed.log", "PlanContext": "schedulers", "PlanCache": "runtime.plan_cache",
         "pack_balanced": "planning.packing", "choose": "sim.choose"}
_FOLDERS = ("planning", "costmodel", "distributed", "runtime", "schedulers", "executors", "kernels", "sim",
            "train", "bench", "compat", "parallel", "launch", "cluster")

# ---- the flat modules this release moved into folders: their old paths work for one more release ----
# `import distattn.spawn`, `from distattn.spawn import ...` and the attribute give the very module at its
# new path (patching one patches the other), with one DeprecationWarning per old path naming the new one.
# distattn.masks is named in the public contract (`distattn.masks.prefix_lm(...)`): it stays, silently.
_MOVED = {
    **{m: f"planning.{m}" for m in ("masks", "layout", "strided", "doclens", "packing", "labels", "schedule",
                                     "program", "wire")},
    **{m: f"costmodel.{m}" for m in ("model_shape", "tiles", "cost", "network", "network_csv", "jsonfile")},
    **{m: f"distributed.{m}" for m in ("comm", "mesh", "spawn", "virtual", "_forkserver", "phases", "log",
                                        "trace", "timing")},
    **{m: f"runtime.{m}" for m in ("api", "plans", "ops", "pingpong", "plan_cache", "varlen", "oracle")},
    "merge": "kernels.merge", "kernel_speed": "kernels.speed", "memory_model": "sim.memory_model",
    "dp_memory": "sim.dp_memory", "demo": "bench.demo",
}
_KEPT = frozenset({"masks"})
_warned: set[str] = set()


def _moved(old: str):
    """The module that ``old`` (``distattn.<flat name>[.<sub>]``) now is, warning once per old path."""
    head, _, rest = old.split(".", 1)[1].partition(".")
    new = f"{__name__}.{_MOVED[head]}" + (f".{rest}" if rest else "")
    if head not in _KEPT and old not in _warned:
        _warned.add(old)
        _warnings.warn(f"{old} moved to {new}; import it from there (the old path goes in the next release)",
                       DeprecationWarning, stacklevel=3)
    return _importlib.import_module(new)


class _OldPaths(_abc.MetaPathFinder, _abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        parts = fullname.split(".")
        if parts[0] == __name__ and len(parts) > 1 and parts[1] in _MOVED:
            return _util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        return _moved(spec.name)

    def exec_module(self, module):
        pass   # it ran at its new path


if not any(type(f).__name__ == "_OldPaths" for f in _sys.meta_path):
    _sys.meta_path.append(_OldPaths())


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(_importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    if name in _FOLDERS:
        return _importlib.import_module(f".{name}", __name__)
    if name in _MOVED:
        return _moved(f"{__name__}.{name}")
    raise AttributeError(f"module 'distattn' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))

__all__ = ["plan", "attention", "local_attention", "reference_attention", "Plan", "MaskSlice", "SliceMask",
           "document_mask", "Layout", "varlen_attention", "varlen_plan", "configure_logging", "PlanContext",
           "PlanCache", "pack_balanced", "choose", "__version__"]
