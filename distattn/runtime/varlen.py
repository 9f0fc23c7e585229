"""``distattn.varlen_attention``: FlashAttention's varlen call, context-parallel.

    import distattn
    from distattn.runtime.varlen import varlen_plan

    # cu_seqlens: the GLOBAL packed sequence's offsets [0, l0, l0+l1, ..., S] (int32/int64, any device)
    plan = varlen_plan(cu_seqlens, group=cp_group, causal=True)   # the cached plan varlen_attention uses
    q_local, k_local, v_local = (plan.shard(x) for x in (q, k, v))  # [S, H, D] -> this rank's [S_local, H, D]
    pos = plan.position_ids()                                       # RoPE positions of the local tokens
    out = distattn.varlen_attention(q_local, k_local, v_local, cu_seqlens, max_seqlen, group=cp_group,
                                    causal=True)                    # [S_local, Hq, D]
    out, lse = distattn.varlen_attention(..., return_lse=True)      # lse [Hq, S_local]

**Sharding convention.** ``cu_seqlens``/``max_seqlen`` describe the whole packed sequence (what
``flash_attn_varlen_func`` takes on one GPU); q, k, v are this rank's tokens under the plan's
layout: ``layout=None`` is the scheduler's own (``zigzag``: the sequence cut into ``2P`` chunks,
rank ``r`` holding chunks ``r`` and ``2P-1-r``; ``ring``/``allgather``/``ulysses``/``cad``:
contiguous ``S/P`` slices), or any ``distattn.plan`` layout (``"contiguous"``, ``"zigzag"``,
``"document"``, ``distattn.Layout.from_indices``). :func:`varlen_plan` with the same arguments
returns the plan itself (cached), whose ``shard``/``unshard``/``position_ids`` split and join the
tensors that way. :mod:`distattn.compat.ring_flash_attn` takes ring-flash-attention's conventions
(local ``cu_seqlens``) instead.

Plans are cached per (documents, group, scheduler, layout, mask, backend) in ``PLANS`` (a
:class:`~distattn.runtime.plan_cache.PlanCache`, shared with :mod:`distattn.compat`): the layers of one
step share one plan, and passing the same ``cu_seqlens`` tensor object again costs no host
synchronisation.
"""

from __future__ import annotations

from typing import Callable, Hashable

import numpy as np
import torch
import torch.distributed as dist

from . import ops
from .api import attention, plan as make_plan
from ..executors.base import Saved
from ..planning.layout import Layout
from ..planning.masks import UNBOUNDED, SliceMask
from .plan_cache import PlanCache
from .plans import Plan


# --- flash_attn's arguments -> distattn's ---------------------------------------------------------

_last_cu: list = [None, -1, ()]   # (tensor, its version, its document lengths): the per-layer repeat


def doc_lens_of(cu_seqlens, name: str = "cu_seqlens", scale: int = 1) -> tuple[int, ...]:
    """Document lengths (times ``scale``) of FlashAttention offsets ``[0, l0, l0+l1, ...]``;
    zero-length documents (repeated offsets) are dropped, as they hold no token. The same tensor
    object passed again, unmodified, is not read back from its device."""
    if isinstance(cu_seqlens, torch.Tensor):
        if cu_seqlens is _last_cu[0] and cu_seqlens._version == _last_cu[1]:
            lens = _last_cu[2]
            return lens if scale == 1 else tuple(n * scale for n in lens)
        if cu_seqlens.dim() != 1 or cu_seqlens.dtype.is_floating_point or cu_seqlens.dtype == torch.bool:
            raise ValueError(f"{name} must be a 1-D integer tensor of offsets [0, l0, l0+l1, ...], got shape "
                             f"{tuple(cu_seqlens.shape)} dtype {cu_seqlens.dtype}")
        values = cu_seqlens.tolist()
    else:
        values = list(cu_seqlens)
    if len(values) < 2 or values[0] != 0 or any(b < a for a, b in zip(values, values[1:])):
        raise ValueError(f"{name} must be non-decreasing offsets starting at 0 with at least one document "
                         f"([0, l0, l0+l1, ..., total]), got {values[:8]}{' ...' if len(values) > 8 else ''}")
    lens = tuple(int(b - a) for a, b in zip(values, values[1:]) if b > a)
    if not lens:
        raise ValueError(f"{name} = {values} holds no token")
    if isinstance(cu_seqlens, torch.Tensor):
        _last_cu[:] = [cu_seqlens, cu_seqlens._version, lens]
    return lens if scale == 1 else tuple(n * scale for n in lens)


def window_bounds(window_size) -> tuple[int | None, int | None]:
    """``(left, right)`` of flash_attn's ``window_size`` with -1 as None (unbounded)."""
    if (not isinstance(window_size, (tuple, list)) or len(window_size) != 2
            or any(isinstance(x, bool) or not isinstance(x, (int, np.integer)) or x < -1 for x in window_size)):
        raise ValueError(f"window_size must be (left, right), two ints >= -1 (-1: unbounded on that side), as "
                         f"flash_attn takes it, got {window_size!r}")
    return tuple(None if x == -1 else int(x) for x in window_size)


def mask_options(doc_lens, causal: bool, window_size) -> dict:
    """``distattn.plan``'s ``causal``/``window``/``mask`` for flash_attn's ``causal`` and
    ``window_size=(left, right)``: query ``i`` of a document sees its keys ``j`` with
    ``i - left <= j <= i + right`` (``right = 0`` under ``causal``). A symmetric window or a
    causal one is a document mask (``window = left + 1``); an asymmetric one a band
    :class:`~distattn.planning.masks.SliceMask`, one slice per document."""
    left, right = window_bounds(window_size)
    if causal:
        right = 0
    if right == 0:
        return dict(causal=True, window=None if left is None else left + 1)
    if left == right:
        return dict(causal=False, window=None if left is None else left + 1)
    lens = np.asarray(doc_lens, dtype=np.int64)
    starts = np.cumsum(lens) - lens
    lo = np.full(len(lens), -UNBOUNDED if left is None else -left, dtype=np.int64)
    hi = np.full(len(lens), UNBOUNDED if right is None else right, dtype=np.int64)
    return dict(causal=False, mask=SliceMask.from_bands(starts, starts + lens, starts, starts + lens, lo, hi,
                                                        check=False))


def flash_softcap(softcap) -> float | None:
    """flash_attn's ``softcap`` (0.0: off) as distattn's (None: off)."""
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or softcap < 0:
        raise ValueError(f"softcap must be a float >= 0 (0.0: off, as in flash_attn), got {softcap!r}")
    return float(softcap) or None


def resolve_group(group):
    """ring-flash-attention's ``group=None``: the default process group."""
    if group is not None:
        return group
    if not dist.is_initialized():
        raise ValueError("group=None means the default process group, but torch.distributed is not initialized: "
                         "call torch.distributed.init_process_group first or pass group=")
    return dist.group.WORLD


# --- plans, cached -------------------------------------------------------------------------------

# flash_attn's functional API keeps no object between calls: the plans live here, one cache for the
# process (a step's distinct batches -- micro-batches, nano-batches -- times a few)
PLANS = PlanCache(size=16)


def plan_for(doc_lens: tuple[int, ...], group, *, scheduler: str, layout_key: Hashable,
             layout: Callable[[], str | Layout | None], causal: bool, window_size, backend: str,
             options: dict | None = None) -> Plan:
    """The cached plan of documents ``doc_lens`` on ``group`` under flash_attn's mask arguments;
    ``layout()`` makes the layout on a miss, ``layout_key`` names it in the cache; ``options``: the
    scheduler's. The plan is prepared on the group's device (attention on another device prepares it
    there once)."""
    group, options = resolve_group(group), options or {}
    key = (doc_lens, scheduler, layout_key, bool(causal), window_bounds(window_size), backend,
           tuple(sorted(options.items())))

    def make() -> Plan:
        return make_plan(doc_lens, group, scheduler=scheduler, backend=backend, layout=layout(),
                         **mask_options(doc_lens, causal, window_size), **options)
    # keyed by flash_attn's arguments, cheap to hash (layout recipes, not token lists; the window, not
    # the band mask it makes), and the group by id, kept alive beside its plan
    return PLANS.get((key, id(group)), make, keep=group)


def varlen_plan(cu_seqlens, *, group, scheduler: str = "zigzag", causal: bool = False, window_size=(-1, -1),
                layout: str | Layout | None = None, backend: str = "auto") -> Plan:
    """The plan :func:`varlen_attention` uses for these arguments (cached): its ``shard(x)`` gives
    this rank's ``[S_local, ...]`` of a full ``[S, ...]`` tensor, ``position_ids()`` their positions
    in their documents, ``unshard(x_local)`` the full tensor back (a collective). Which tokens a
    rank holds depends on ``scheduler`` and ``layout`` only: any ``causal``/``window_size`` shards
    alike (the same ones as :func:`varlen_attention`'s reuse its plan)."""
    return plan_for(doc_lens_of(cu_seqlens), group, scheduler=scheduler, layout_key=layout, layout=lambda: layout,
                    causal=causal, window_size=window_size, backend=backend)


# --- attention, with flash_attn's lse ------------------------------------------------------------

class _WithLse(torch.autograd.Function):
    """``distattn.attention`` that also returns the merged lse the executor kept for its backward
    (not differentiable, as flash_attn's); same forward and backward as ``ops.Attention``."""

    @staticmethod
    def forward(ctx, q, k, v, plan: Plan, scale: float, softcap):
        out, *new = ops.forward(q, k, v, None, plan, scale, softcap)
        known = (q, k, v, None, out)
        ops._saved_for_backward(ctx, known, new, plan, scale, softcap)
        saved = ops.unflatten(ops._skeleton(plan, known), [*known, *new])
        (lse,) = plan._live("attention").to_compute_order(saved.lse, back=True)
        lse = lse.t().clone(memory_format=torch.contiguous_format)   # flash_attn's [H, T]; not the saved one
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        dq, dk, dv, *_ = ops.Attention.backward(ctx, dout)
        return dq, dk, dv, None, None, None


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: Plan, softmax_scale: float | None,
           softcap: float | None, return_lse: bool):
    """``out``, or ``(out, lse [Hq, T_local])`` (fp32; fp64 for fp64 inputs), of this rank's tokens."""
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    if not return_lse:
        return attention(q, k, v, plan, scale=scale, softcap=softcap)
    plan._live("attention").check_local_qkv(q, k, v)
    if not isinstance(ops._skeleton(plan, (q, k, v, None, q)), Saved):
        # ulysses/usp keep the lse of their head shards over all tokens, cad that of its tasks' rows
        # wherever they ran: bringing it to the query's rank would be one more all-to-all per call
        raise NotImplementedError(f"return_lse=True needs a scheduler that keeps each query's merged lse on its "
                                  f"own rank: 'ring', 'zigzag' or 'allgather', not {plan.scheduler!r}")
    return _WithLse.apply(q, k, v, plan, scale, softcap)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens, max_seqlen, *, group,
                     scheduler: str = "zigzag", causal: bool = False, window_size=(-1, -1), softcap: float = 0.0,
                     softmax_scale: float | None = None, return_lse: bool = False,
                     layout: str | Layout | None = None, backend: str = "auto"):
    """``flash_attn_varlen_func`` over a packed sequence split across ``group``; differentiable.

    Arguments:
        q: ``[S_local, Hq, D]``, k, v: ``[S_local, Hkv, D]``: this rank's tokens under the layout
            (module docstring; ``varlen_plan(...).shard(x)``). ``Hq`` a multiple of ``Hkv`` (GQA/MQA).
        cu_seqlens: ``[B + 1]`` int offsets of the WHOLE packed sequence (the same on every rank):
            document ``b`` is tokens ``[cu_seqlens[b], cu_seqlens[b+1])`` of ``S = cu_seqlens[-1]``.
        max_seqlen: int, the longest document (flash_attn sizes its grid by it; checked here).
        group: the context-parallel ``ProcessGroup`` (or DeviceMesh); every rank calls with the
            same ``cu_seqlens`` and options.
        scheduler: ``"zigzag" | "ring" | "allgather" | "ulysses" | "usp" | "cad"``.
        causal: causal inside each document, as flash_attn (default False, bidirectional).
        window_size: ``(left, right)``; query ``i`` sees keys ``j`` of its document with
            ``i - left <= j <= i + right``, -1 unbounded; ``causal`` forces ``right = 0``. Any
            pair works, asymmetric included.
        softcap: 0.0 off; ``c > 0``: scores (after ``softmax_scale``) become ``c * tanh(s / c)``.
        softmax_scale: default ``1 / sqrt(D)``.
        return_lse: also return the log-sum-exp of each row's scaled (and capped) scores,
            ``[Hq, S_local]``, natural log, fp32 (fp64 for fp64 inputs), not differentiable --
            what flash_attn returns as ``softmax_lse`` with ``return_attn_probs=True``. Needs a
            scheduler keeping it on the query's rank (``ring``, ``zigzag``, ``allgather``; the
            others raise ``NotImplementedError``). It is the merged lse the executor keeps for
            its backward, so it costs nothing; this path runs as a ``torch.autograd.Function``,
            not distattn's ``torch.library`` op (a graph break under ``torch.compile``).
        layout, backend: as :func:`distattn.plan` (default: the scheduler's own layout).

    Returns:
        ``out [S_local, Hq, D]`` in q's dtype and local token order, or ``(out, lse)``.

    Differences from :func:`distattn.attention`: the documents come as ``cu_seqlens`` (no plan
    to build: plans are cached per arguments), ``causal`` defaults to False, windows are flash's
    ``(left, right)`` (distattn's ``window=W`` is ``(W-1, W-1)``, or ``(W-1, 0)`` causal),
    ``softcap=0.0`` is off (distattn: None), and the lse can come back; no ``sinks``.
    """
    lens = doc_lens_of(cu_seqlens)
    if isinstance(max_seqlen, torch.Tensor):
        max_seqlen = int(max_seqlen.item())
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, (int, np.integer)) or max_seqlen < max(lens):
        raise ValueError(f"max_seqlen must be an int >= the longest document ({max(lens)} tokens in cu_seqlens), "
                         f"got {max_seqlen!r}")
    softcap = flash_softcap(softcap)
    window_bounds(window_size)   # every argument checked before any rank waits for another
    plan = plan_for(lens, group, scheduler=scheduler, layout_key=layout, layout=lambda: layout, causal=causal,
                    window_size=window_size, backend=backend)
    return attend(q, k, v, plan, softmax_scale, softcap, return_lse)
