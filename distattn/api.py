"""The public entry points: :func:`plan` and :func:`attention`.

A token's way through them, one file a hop: :func:`plan` asks the scheduler's planner
(``schedulers/<name>.py``) for a :class:`~distattn.schedule.Schedule` and
:func:`~distattn.executors.executor_for` for this rank's executor (``executors/<pattern>.py``);
:func:`attention` hands q, k, v to the executor, which moves them (``comm.py``), runs the local
kernels (``kernels/``) and merges partial results (``merge.py``); backward retraces the same way.
"""

from __future__ import annotations

import inspect
from typing import NamedTuple

import torch

from .executors import executor_for, resolve_options
from .kernels import available_backends
from .masks import as_doc_lens, check_window
from .mesh import MeshInfo, resolve_mesh
from .plans import Plan
from .schedulers import LAYOUTS, LOCAL, spec, supporting


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
    entry = spec(scheduler)
    if backend != "auto" and backend not in available_backends():
        raise ValueError(f"backend={backend!r} is unknown; choose 'auto' or one of {available_backends()}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is unknown; choose one of {list(LAYOUTS)}")
    if layout not in entry.layouts:
        raise ValueError(f"layout={layout!r} (each document split zigzag over the ranks) works with scheduler "
                         f"{' or '.join(map(repr, supporting(layout)))}, not {scheduler!r}; use layout='sequence'")
    info = resolve_mesh(mesh)
    common = dict(causal=bool(causal), window=window)
    if layout == "document" and info.world_size > 1:  # on one rank both layouts are the sequence itself
        options["layout"] = layout
    if info.world_size == 1 and not options:
        return _made(LOCAL.planner()(lens, info, scheduler=scheduler, **common), info, backend, device, {})
    planner = entry.planner()
    accepted = sorted(set(inspect.signature(planner).parameters) - {"doc_lens", "mesh", *common})
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"unexpected option(s) {unknown} for scheduler={scheduler!r}; it accepts {accepted}")
    options, live = resolve_options(scheduler, lens, info, options)
    return _made(planner(lens, info, **common, **options), info, backend, device, live)


def _made(schedule, info: MeshInfo, backend: str, device, live: dict) -> Plan:
    """The plan of ``schedule``: with this rank's executor, prepared on its device, unless dry."""
    if info.is_dry:
        return Plan(schedule, backend)
    plan_ = Plan(schedule, backend, info.rank, executor_for(schedule, info, backend, **live))
    plan_.prepare(device if device is not None else info.device)
    return plan_


def _split(saved, tensors: list) -> object:
    """``saved`` (nested named tuples) with its tensors moved to ``tensors`` and replaced by their index."""
    if isinstance(saved, torch.Tensor):
        tensors.append(saved)
        return _Slot(len(tensors) - 1)
    if isinstance(saved, tuple) and hasattr(saved, "_fields"):
        return type(saved)(*(_split(x, tensors) for x in saved))
    return saved


def _join(skeleton, tensors) -> object:
    if isinstance(skeleton, _Slot):
        return tensors[skeleton.index]
    if isinstance(skeleton, tuple) and hasattr(skeleton, "_fields"):
        return type(skeleton)(*(_join(x, tensors) for x in skeleton))
    return skeleton


class _Slot(NamedTuple):
    index: int


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan: Plan, scale: float, prefetch):
        ex = plan.executor
        out, saved = ex.forward(q, k, v, scale) if prefetch is None else ex.forward(q, k, v, scale, prefetch)
        ctx.plan, ctx.scale = plan, scale
        # tensors go through save_for_backward (no reference cycle through `out`); the
        # few plain values an executor saves (e.g. head counts) ride on ctx
        tensors: list = []
        ctx.skeleton = _split(saved, tensors)
        ctx.save_for_backward(*tensors)
        return out

    @staticmethod
    def backward(ctx, dout):
        saved = _join(ctx.skeleton, ctx.saved_tensors)
        dq, dk, dv = ctx.plan.executor.backward(dout.contiguous(), saved, ctx.scale)
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
    if prefetch is not None and not plan.executor.supports_prefetch:
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
    info = MeshInfo(world_size=1, rank=0)
    schedule = LOCAL.planner()(as_doc_lens(doc_lens), info, causal=bool(causal), window=check_window(window))
    return attention(q, k, v, Plan(schedule, backend, 0, executor_for(schedule, info, backend)), scale=scale)
