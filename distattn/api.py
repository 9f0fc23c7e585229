"""The public entry points: :func:`plan` and :func:`attention`."""

from __future__ import annotations

import inspect

import torch

from .kernels import available_backends
from .masks import as_doc_lens, check_window
from .parallel.mesh import resolve_mesh
from .plans import Plan
from .schedulers import KNOWN, PLANNERS, implemented
from .schedulers.zigzag import LAYOUTS

DOCUMENT_LAYOUT = ("zigzag", "allgather")  # the schedulers with a per-document layout


def plan(doc_lens, mesh, scheduler: str = "zigzag", causal: bool = True, window: int | None = None,
         backend: str = "auto", *, layout: str = "sequence", device: torch.device | str | None = None,
         **options) -> Plan:
    """Plan context-parallel attention for one packed sequence.

    Args:
        doc_lens: document lengths of the packed sequence (list of ints or 1-D int
            tensor), summing to the full sequence length ``S``.
        mesh: a ``DeviceMesh`` (1-D; 2-D with axes ``("ulysses", "ring")`` for ``usp``),
            a ``ProcessGroup``, or an int world size for a *dry* plan (stats only).
        scheduler: ``"ring" | "zigzag" | "allgather" | "ulysses" | "usp" | "cad"``
            (``"local"``: world size 1). On a single rank every scheduler is plain
            local attention and the plan runs as ``local``.
        causal: causal within each document, bottom-right aligned.
        window: sliding window in tokens (query at ``i`` sees keys ``j`` with
            ``|i - j| < window`` of its own document), or None.
        backend: local kernel: ``"auto" | "triton" | "torch" | "reference"``.
        layout: which tokens each rank holds (``plan.shard``). ``"sequence"``: the
            scheduler's split of the packed sequence. ``"document"`` (``zigzag`` and
            ``allgather``): every document cut into ``2P`` equal chunks, rank ``r``
            holding chunks ``r`` and ``2P-1-r`` of each -- TransformerEngine's and
            Megatron's THD split under context parallelism; every document length
            must be a multiple of ``2P``.
        device: where this rank's q/k/v will live; default: the mesh's (the current CUDA
            device under NCCL or a CUDA ``DeviceMesh``, else CPU). The plan copies its kernel
            layouts and indices there once, so attention makes no host synchronisation.
        options: scheduler-specific options (see each scheduler's module).

    Returns:
        A frozen :class:`~distattn.plans.Plan`; use ``plan.shard``, ``plan.position_ids``,
        :func:`attention`, ``plan.unshard`` and ``plan.stats``.
    """
    lens = as_doc_lens(doc_lens)
    window = check_window(window)
    if scheduler not in KNOWN:
        raise ValueError(f"scheduler={scheduler!r} is unknown; choose one of {list(KNOWN)}")
    if backend != "auto" and backend not in available_backends():
        raise ValueError(f"backend={backend!r} is unknown; choose 'auto' or one of {available_backends()}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is unknown; choose one of {list(LAYOUTS)}")
    if layout == "document" and scheduler not in DOCUMENT_LAYOUT:
        raise ValueError(f"layout='document' (each document split zigzag over the ranks) works with scheduler "
                         f"{' or '.join(map(repr, DOCUMENT_LAYOUT))}, not {scheduler!r}; use layout='sequence'")
    info = resolve_mesh(mesh)
    common = dict(causal=bool(causal), window=window, backend=backend)
    if layout == "document" and info.world_size > 1:  # on one rank both layouts are the sequence itself
        options["layout"] = layout
    if info.world_size == 1 and not options:
        return _prepared(PLANNERS["local"](lens, info, scheduler=scheduler, **common), info, device)
    if scheduler not in PLANNERS:
        raise ValueError(f"scheduler={scheduler!r} is not implemented for world size > 1 yet; "
                         f"available: {implemented()}")
    planner = PLANNERS[scheduler]
    accepted = sorted(set(inspect.signature(planner).parameters) - {"doc_lens", "mesh", *common})
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"unexpected option(s) {unknown} for scheduler={scheduler!r}; it accepts {accepted}")
    return _prepared(planner(lens, info, **common, **options), info, device)


def _prepared(plan_: Plan, info, device) -> Plan:
    if not plan_.is_dry:
        plan_.prepare(device if device is not None else info.device)
    return plan_


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan: Plan, scale: float, prefetch):
        out, saved = plan.forward(q, k, v, scale) if prefetch is None else plan.forward(q, k, v, scale, prefetch)
        ctx.plan, ctx.scale = plan, scale
        # tensors go through save_for_backward (no reference cycle through `out`); the
        # few plain values a plan saves (e.g. head counts) ride on ctx
        is_tensor = [isinstance(x, torch.Tensor) for x in saved]
        ctx.is_tensor = is_tensor
        ctx.values = [None if t else x for x, t in zip(saved, is_tensor)]
        ctx.save_for_backward(*(x for x, t in zip(saved, is_tensor) if t))
        return out

    @staticmethod
    def backward(ctx, dout):
        tensors = iter(ctx.saved_tensors)
        saved = tuple(next(tensors) if t else x for x, t in zip(ctx.values, ctx.is_tensor))
        dq, dk, dv = ctx.plan.backward(dout.contiguous(), saved, ctx.scale)
        return dq, dk, dv, None, None, None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: Plan, *, scale: float | None = None,
              prefetch=None) -> torch.Tensor:
    """Exact attention of this rank's tokens under ``plan``; differentiable.

    Args:
        q: ``[S_local, Hq, D]``; k, v: ``[S_local, Hkv, D]``, this rank's shards
            (``plan.shard(x)``), ``Hq`` a multiple of ``Hkv``.
        plan: from :func:`plan`; every rank of its group must call with the same plan.
        scale: softmax scale, default ``1/sqrt(D)``.
        prefetch: ``plan.prefetch(q, k, v)``, transfers started earlier (``cad`` only; see
            :func:`distattn.pingpong.ping_pong`).

    Returns:
        ``[S_local, Hq, D]`` in q's dtype, in the same local token order as q.
    """
    if not isinstance(plan, Plan):
        raise ValueError(f"plan must come from distattn.plan(...), got {type(plan).__name__}")
    plan.check_inputs(q, k, v)
    if prefetch is not None and not hasattr(plan, "prefetch"):
        raise ValueError(f"prefetch= works with scheduler='cad', not {plan.scheduler!r}")
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return _Attention.apply(q, k, v, plan, float(scale), prefetch)


def local_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_lens, *, causal: bool = True,
                    window: int | None = None, scale: float | None = None, backend: str = "auto") -> torch.Tensor:
    """Attention of a whole packed sequence on this device alone, through the local kernels;
    differentiable. Shapes as :func:`distattn.reference_attention` (``[S, H, D]``).

    The building block for plugging our kernels under another system's sequence
    parallelism (e.g. DeepSpeed's ``DistributedAttention``).
    """
    from .parallel.mesh import MeshInfo
    from .schedulers import local

    lens = as_doc_lens(doc_lens)
    plan_ = local.build(lens, MeshInfo(world_size=1, rank=0), causal=bool(causal), window=check_window(window),
                        backend=backend)
    return attention(q, k, v, plan_, scale=scale)
