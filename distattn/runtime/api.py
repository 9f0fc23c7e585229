"""The public entry points: :func:`plan` and :func:`attention`.

A token's way through them, one file a hop: :func:`plan` asks the scheduler's planner
(``schedulers/<name>.py``) for a :class:`~distattn.planning.schedule.Schedule` and
:func:`~distattn.executors.executor_for` for this rank's executor (``executors/<pattern>.py``);
:func:`attention` hands q, k, v to the executor, which moves them (``comm.py``), runs the local
kernels (``kernels/``) and merges partial results (``merge.py``); backward retraces the same way.
"""

from __future__ import annotations

import inspect
from typing import Sequence

import torch

from . import ops
from ..executors import ExecOptions, executor_for, resolve_options
from ..kernels import available_backends
from ..kernels.registry import check_scale, check_sinks, check_softcap
from ..planning.layout import Layout, Shards
from ..planning.masks import SliceMask, as_doc_lens, batch_rows, check_window
from ..distributed.mesh import MeshInfo, resolve_mesh
from .plans import Plan, flat_rows, plan_of
from ..planning.wire import check_comm_dtype
from ..schedulers import LOCAL, PlanContext, SchedulerSpec, spec
from ..planning.strided import reorder

CONTIGUOUS = Layout("contiguous")


def plan(doc_lens, mesh, scheduler: str = "zigzag", causal: bool = True, window: int | None = None,
         backend: str = "auto", *, mask: SliceMask | None = None, layout: str | Layout | None = None,
         device: torch.device | str | None = None, deterministic: bool = False, comm_dtype: str | None = None,
         context: PlanContext | None = None, pool_doc_lens: Sequence[Sequence[int]] | None = None,
         **options) -> Plan:
    """Plan context-parallel attention for one packed sequence (or a batch of rows).

    Args:
        doc_lens: document lengths summing to the sequence length ``S`` (list or 1-D int tensor), or one
            list per row of a ``[B, S]`` batch (2-D): the rows run as one schedule, each cut by the layout
            alone; ``shard`` then maps ``[B, S, ...]`` to ``[B, S_local, ...]`` and ``attention`` takes
            ``[B, S_local, H, D]``.
        mesh: a ``DeviceMesh`` (2-D with axes ``("ulysses", "ring")`` for ``usp``), a ``ProcessGroup``,
            ``1`` for one device and no process group (the plan runs: ``shard``, ``attention``,
            ``unshard``), or an int world size above 1 for a *dry* plan (``stats`` only).
        scheduler: ``"ring" | "zigzag" | "allgather" | "ulysses" | "usp" | "cad"``; on one rank every
            scheduler runs as ``"local"`` attention.
        causal: causal within each document, bottom-right aligned.
        window: a query at ``i`` sees keys ``j`` of its document with ``|i - j| < window``; None: all.
        backend: the local kernel, ``"auto" | "triton" | "torch" | "reference"``.
        mask: a :class:`~distattn.planning.masks.SliceMask` over the packed sequence replacing the document mask
            of ``causal``/``window`` (one sequence; ``doc_lens`` still give the RoPE positions).
        layout: which tokens each rank holds (:mod:`distattn.planning.layout`; every scheduler is exact on every
            layout): None (the scheduler's own), ``"contiguous"``, ``"zigzag"`` (rank ``r`` holds chunks
            ``r`` and ``2P-1-r`` of ``2P``), ``"document"`` (each document so, TransformerEngine's THD
            split: lengths multiples of ``2P``) or ``distattn.Layout.from_indices([[...], ...])``. A strided
            layout (a stripe: rank ``r`` holds positions ``r, r + P, ...``) is planned in its ranks' order,
            a band per rank pair and document (:mod:`distattn.planning.strided`); ``plan.layout`` stays the one given.
        device: where q/k/v will live (default: the mesh's): indices go there once, no host syncs after.
        deterministic: bitwise-equal results run to run: fixed summation orders, no atomics
            (``backend="torch"`` on CUDA, whose backward adds dQ with atomics, is refused).
        comm_dtype: how Q, K, V, out and dout travel: None (their dtype) or ``"fp8"`` (e4m3, one fp32
            scale per token and head: :mod:`distattn.planning.wire`); gradients travel in their own dtype.
        context: a :class:`~distattn.schedulers.PlanContext` describing the job (heads, head groups,
            head dim, dtype, GPUs per node, GPU peak, network): each scheduler derives its options
            from it (``usp`` its Ulysses degree, ``cad`` its cost model). None: the planners' defaults.
        pool_doc_lens: with ``scheduler="cad"`` and ``pool=group``: every CP group's document lengths, one
            list per group in pool order -- group ``g`` is the pool's ranks ``g*P .. g*P+P-1`` (``P``: this
            CP group's size; its rank ``i`` is pool rank ``g*P+i``), as a ``("dp", "cp")`` mesh's replicas
            are with ``pool`` the world -- each laid out by ``layout``, the same lists on every rank
            (``pool_doc_lens[g]`` is this rank's ``doc_lens``). The pool's token space is then made here
            instead of exchanged: no collective, the same schedule, so a caller that knows every
            replica's batch (a trainer) can plan off its main thread. None: exchanged over ``pool``.
        options: the scheduler's own (its module's ``build``); they win over derived ones, and one the
            scheduler does not take is a ``ValueError``.

    Returns:
        A frozen :class:`~distattn.runtime.plans.Plan` (``shard``, ``position_ids``, ``unshard``, ``stats``).
    """
    rows = batch_rows(doc_lens)
    lens = as_doc_lens(doc_lens) if rows is None else tuple(n for row in rows for n in row)
    window = check_window(window)
    common = dict(causal=bool(causal), window=window, mask=_mask_of(lens, rows, causal, window, mask, options))
    entry, info = spec(scheduler), resolve_mesh(mesh)
    run = _run_options(backend, deterministic, comm_dtype, device or info.device)
    entry.check_options(options)
    if pool_doc_lens is not None and (options.get("pool") is None or rows is not None):
        raise ValueError("pool_doc_lens lists the documents of a pool's CP groups: pass it with scheduler='cad', "
                         "pool=group and one packed sequence per rank, or drop it")
    batch = None if rows is None else len(rows)
    options = entry.derive(info.world_size, context, options, _two_d(info))
    # one rank with nothing to plan, or with no process group (mesh=1) for its options' groups: local attention
    if info.world_size == 1 and (not options or (info.group is None and options.get("pool") is None)):
        shards = _shards_of(lens, rows, layout, LOCAL, info, {}) or CONTIGUOUS.shards(lens, 1)
        return _made(LOCAL, LOCAL.planner()(lens, info, scheduler=scheduler, shards=shards, **common), info,
                     backend, device, {}, batch, run)
    shards = _shards_of(lens, rows, layout, entry, info, options)
    params = inspect.signature(entry.planner()).parameters
    if "scheduler" in params:  # a planner serving several names (ring: ring and zigzag)
        common["scheduler"] = scheduler
    if "comm_dtype" in params:  # a planner pricing the bytes it moves (cad)
        common["comm_dtype"] = comm_dtype
    options, live = resolve_options(lens, shards, info, options, pool_doc_lens,
                                    lambda group_lens: _shards_of(group_lens, None, layout, entry, info, options))
    given = None
    if shards is not None and entry.follows_runs and options.get("pool") is None:
        # a strided layout: its ranks' order, bands (distattn.planning.strided)
        moved = reorder(lens, shards, common["mask"])
        if moved is not None:
            shards, common["mask"], given = moved.shards, moved.mask, moved.given
    return _made(entry, entry.planner()(lens, info, shards=shards, **common, **options), info, backend, device, live,
                 batch, run, given)


def dry_plan(doc_lens, world_size: int, scheduler: str = "zigzag", **kwargs) -> Plan:
    """:func:`plan` for ``world_size`` ranks that are not there: the schedule and ``stats`` only, for
    analysis (the simulator, the memory model). ``plan(doc_lens, N)`` is the same for ``N > 1``; at one
    rank ``plan(doc_lens, 1)`` is a plan that runs, so callers that only want the schedule use this."""
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    return plan(doc_lens, MeshInfo(world_size=world_size, rank=None), scheduler, **kwargs)


def _shards_of(lens: tuple[int, ...], rows, layout, entry, info: MeshInfo, options: dict) -> Shards | None:
    """The tokens each rank holds: ``layout``, else the scheduler's default layout, else (None) the
    planner's own -- made here for each row of a batch, side by side ([B, S_local] on each rank)."""
    chosen = Layout.of(layout)
    if chosen is None and entry.layout is not None:
        chosen = Layout(entry.layout)
    if rows is None:
        return None if chosen is None else chosen.shards(lens, info.world_size)
    by = chosen or (CONTIGUOUS if info.world_size == 1 else None)
    return Shards.stack([by.shards(row, info.world_size) if by is not None else entry.own_shards(row, info, **options)
                         for row in rows])


def _mask_of(lens: tuple[int, ...], rows, causal: bool, window: int | None, mask: SliceMask | None,
             options: dict) -> SliceMask:
    """The plan's mask: ``mask``, checked, or the document mask of ``causal`` and ``window``."""
    if rows is not None and mask is not None:
        raise ValueError("mask= takes one packed sequence: with batched doc_lens (one list per row) describe each "
                         "row's documents and use causal=/window=, or plan the rows separately")
    if mask is None:
        return SliceMask.documents(lens, bool(causal), window)
    if not isinstance(mask, SliceMask):
        raise ValueError(f"mask must be a distattn.SliceMask, got {type(mask).__name__}")
    if window is not None:
        raise ValueError("pass window= or mask=, not both: a SliceMask carries its own geometry")
    if options.get("pool") is not None:
        raise ValueError("cad's pool= balances document masks; plan a slice mask without pool=")
    mask.check_length(sum(lens))
    return mask


def _run_options(backend: str, deterministic: bool, comm_dtype: str | None, device) -> ExecOptions:
    """The executor's run options, ``backend``, ``deterministic`` and ``comm_dtype`` checked."""
    if backend != "auto" and backend not in available_backends():
        raise ValueError(f"backend={backend!r} is unknown; choose 'auto' or one of {available_backends()}")
    if not isinstance(deterministic, bool):
        raise ValueError(f"deterministic must be True or False, got {deterministic!r}")
    if deterministic and backend == "torch" and device is not None and torch.device(device).type == "cuda":
        raise ValueError("deterministic=True with backend='torch' on CUDA: FlashAttention's backward adds dQ with "
                         "atomics; use backend='auto' or 'triton' (no atomics)")
    return ExecOptions(deterministic=deterministic, comm_dtype=check_comm_dtype(comm_dtype))


def _two_d(info: MeshInfo) -> bool:
    return info.device_mesh is not None and info.device_mesh.ndim == 2


def _made(entry: SchedulerSpec, schedule, info: MeshInfo, backend: str, device, live: dict, batch: int | None,
          run: ExecOptions, given: Shards | None = None) -> Plan:
    """The plan of ``schedule`` (``entry``'s planner made it): with this rank's executor, prepared on its
    device, unless dry. ``given``: the caller's layout, where the schedule runs the tokens in another order."""
    if info.is_dry:
        return plan_of(schedule, batch_size=batch, options=run, given=given)
    plan_ = plan_of(schedule, info.rank, executor_for(entry, schedule, info, backend, **live, options=run),
                    batch_size=batch, options=run, given=given)
    plan_._runtime.prepare(device if device is not None else info.device)
    return plan_


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: Plan, *, scale: float | None = None,
              sinks: torch.Tensor | None = None, softcap: float | None = None, prefetch=None) -> torch.Tensor:
    """Exact attention of this rank's tokens under ``plan``; differentiable.

    Args:
        q: ``[S_local, Hq, D]``; k: ``[S_local, Hkv, D]``; v: ``[S_local, Hkv, Dv]``, this rank's
            shards (``plan.shard(x)``), ``Hq`` a multiple of ``Hkv``. v may have a head dim of its
            own (MLA, DeepSeek-V2/V3: ``D = 192``, ``Dv = 128``); ``Dv = D`` otherwise.
            Under a batched plan (``doc_lens`` one list per row): ``[B, S_local, H, D]``, any strides
            (e.g. HF's ``[B, H, S, D]`` transposed; a non-contiguous input is copied once).
        plan: from :func:`plan`; every rank of its group must call with the same plan.
        scale: softmax scale, a positive finite float; default ``1/sqrt(D)``.
        sinks: None, or learnable attention-sink logits ``[Hq]`` (gpt-oss), floating, on q's
            device, the same values on every rank: every softmax row of head ``h`` gets one extra
            column of logit ``sinks[h]`` whose value is 0 (it takes probability mass and adds
            nothing to the output). Counted exactly once per row under every scheduler, after the
            partial results are merged. Differentiable. **Its gradient on a rank is that rank's
            share**: the sum over the rows this rank computed (under ``ulysses``/``usp``, for the
            heads it computed; under ``cad``, for the rows its tasks computed, which may be other
            ranks' -- or, with ``pool=``, other replicas' -- tokens). Summed over the ranks of the
            attention group (the pool for ``cad`` with ``pool=``) it is the full gradient: what the
            gradient reduction of DDP/FSDP over the dp x cp mesh does for a replicated parameter
            (as for any other parameter, a loss scaled for averaging over the world gives the exact
            gradient). Do not reduce it separately over the CP group as well.
        softcap: None, or a positive float ``c``: scores (after ``scale``) become
            ``c * tanh(score / c)`` (Gemma 2); applied in every local kernel call.
        prefetch: ``plan.prefetch(q, k, v)``, transfers started earlier (``cad`` only; see
            :func:`distattn.runtime.pingpong.ping_pong`).

    Returns:
        ``[S_local, Hq, Dv]`` (batched: ``[B, S_local, Hq, Dv]``) in q's dtype, in the same local
        token order as q.
    """
    if not isinstance(plan, Plan):
        raise ValueError(f"plan must come from distattn.plan(...), got {type(plan).__name__}")
    if prefetch is not None:
        executor = plan._live("attention").executor
        if not executor.supports_prefetch:
            raise ValueError(f"prefetch= works with scheduler='cad', not {plan.scheduler!r}")
        if prefetch.executor is not executor or prefetch.ids != (id(q), id(k), id(v)):
            raise ValueError("prefetch was started by another plan or for other q, k, v tensors")
    rows = q.shape[:2]
    q, k, v = flat_rows(q, k, v, plan.batch_size)
    sinks, softcap, scale = check_sinks(sinks, q), check_softcap(softcap), check_scale(scale, q.shape[-1])
    out = ops.apply(q, k, v, sinks, plan, scale, softcap, prefetch)
    return out if plan.batch_size is None else out.unflatten(0, rows)


def local_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_lens, *, causal: bool = True,
                    window: int | None = None, scale: float | None = None, backend: str = "auto",
                    sinks: torch.Tensor | None = None, softcap: float | None = None) -> torch.Tensor:
    """Attention of a whole packed sequence on this device alone, through the local kernels;
    differentiable. Shapes as :func:`distattn.reference_attention` (``[S, H, D]``); ``sinks`` and
    ``softcap`` as in :func:`attention` (the sinks' gradient is then the whole gradient).

    The building block for plugging our kernels under another system's sequence
    parallelism (e.g. DeepSpeed's ``DistributedAttention``).
    """
    info = MeshInfo(world_size=1, rank=0)
    lens, window = as_doc_lens(doc_lens), check_window(window)
    schedule = LOCAL.planner()(lens, info, causal=bool(causal), window=window, shards=CONTIGUOUS.shards(lens, 1),
                               mask=SliceMask.documents(lens, bool(causal), window))
    return attention(q, k, v, plan_of(schedule, 0, executor_for(LOCAL, schedule, info, backend)), scale=scale,
                     sinks=sinks, softcap=softcap)
