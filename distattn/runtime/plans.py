"""The ``Plan``: a schedule (what every rank does, as data) and, on a live plan, this rank's runtime.

``distattn.plan`` builds one per packed batch: the scheduler's planner makes the
:class:`~distattn.planning.schedule.Schedule` (frozen, no process group), and for a live plan
:func:`~distattn.executors.executor_for` makes the executor that runs this rank's part on the
mesh's groups, with its kernel layouts and indices copied to the device once. A *dry* plan
(``mesh`` an int world size above 1) has a schedule and no runtime: ``stats()`` works,
``shard``/``unshard``/``attention`` raise ``ValueError``.

A :class:`Plan` is what users hold: the pinned ``shard``, ``unshard``, ``position_ids``, ``stats``,
``scheduler``, ``layout``, ``world_size`` and ``schedule`` (every other fact a scheduler decided,
e.g. ``plan.schedule.ulysses_degree`` or ``plan.schedule.phases(AttnShape(...))``), and a few facts
of this rank and of the run. What runs attention -- the executor, the local token order, input
checks, device preparation -- is a :class:`PlanRuntime` that users don't see (``plan._runtime``,
reached through ``plan._live(what)`` by :mod:`distattn.runtime.ops`, :mod:`distattn.runtime.pingpong`,
:mod:`distattn.runtime.api` and :mod:`distattn.runtime.varlen`).

Token ownership is the schedule's layout (:class:`~distattn.planning.layout.Shards`, ``plan.layout``):
``owned[r]`` lists global ``(start, end)`` token ranges whose concatenation, in that order, is rank
``r``'s local tensor. Ranks may own different numbers of tokens (any total length works;
collectives pad internally), or none (fewer tokens than ranks: their shards are ``[0, ...]``
tensors and they still take part in every collective). Executors compute on a rank's tokens in
increasing global order; when the local order differs (``distattn.Layout.from_indices`` in another
order), :func:`distattn.attention` gathers q, k, v into that order and out back
(:meth:`PlanRuntime.to_compute_order`).

Before attention on inputs of a shape new to this rank, the ranks of the plan's group compare
heads, head_dim and dtype, and whether they pass attention sinks and which softcap
(:meth:`distattn.executors.base.Executor.check_agreement`): a mismatch
is a ``ValueError`` on every rank naming both sides, not a gloo abort, a hang or a silently
wrong result.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..executors.base import DeviceIndex, ExecOptions, Executor
from ..kernels import check_qkv
from ..planning.layout import Shards, token_index
from ..planning.schedule import Schedule
from ..planning.wire import check_comm_dtype

# An opaque object (a "custom class" since torch 2.14) can be a custom op's argument (distattn.runtime.ops).
# Private API (pytorch/pytorch#165004; none public as of 2.14.1). torch 2.14 renamed the base, and its old
# module logs a deprecation warning on import, so the old name is only tried where the new one is missing.
try:
    from torch._custom_class_base import CustomClassBase as PlanBase
except ImportError:
    try:
        from torch._opaque_base import OpaqueBase as PlanBase
    except ImportError:
        PlanBase = object

__all__ = ["Plan", "PlanRuntime", "plan_of", "token_index"]


class PlanRuntime:
    """This rank's running half of a live plan: its executor (communicators, device data, the
    shapes its group agreed on) and the permutation between the rank's local token order and the
    executors' compute order. Built by :class:`Plan`; used by the attention paths, not by users."""

    __slots__ = ("schedule", "rank", "executor", "batch_size", "local_order")

    def __init__(self, schedule: Schedule, rank: int, executor: Executor, batch_size: int | None, layout: Shards):
        self.schedule, self.rank, self.executor, self.batch_size = schedule, rank, executor, batch_size
        order = layout.order[rank]
        # (to compute order, back); None: the local order is the compute order
        self.local_order = None if order is None else (DeviceIndex(order),
                                                       DeviceIndex(np.argsort(order).astype(np.int64)))

    @property
    def trace_key(self) -> tuple:
        """What a compiled graph through :mod:`distattn.runtime.ops` specializes on: the structure of the
        executor's saved state (not its sizes, which are symbolic there), whether tokens are
        reordered and the batch size. Plans with equal keys share a graph."""
        return self.executor.structure, self.local_order is None, self.batch_size

    def prepare(self, device: torch.device | str) -> None:
        """Copy this rank's kernel layouts and indices to ``device``, once (``distattn.plan`` does it
        for the mesh's device; attention on tensors of another device prepares them there)."""
        self.executor.prepare(device)
        for index in self.local_order or ():
            index.on(device)

    def check_local_qkv(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """``ValueError`` unless q/k/v are this rank's ``[S_local, H, D]`` shards (a batched plan's rows
        flattened: ``[B * S_local, H, D]``). Checked before any communication, so a bad input fails
        on its rank instead of stalling the others."""
        check_qkv(q, k, v)
        check_comm_dtype(self.executor.options.comm_dtype, q.dtype)
        n = self.schedule.num_tokens(self.rank)
        for name, t in (("q", q), ("k", k), ("v", v)):
            if t.shape[0] != n:
                rows = "" if self.batch_size is None else f" ({self.batch_size} rows of {n // self.batch_size})"
                raise ValueError(f"{name} has {t.shape[0]} tokens but rank {self.rank} owns {n}{rows} under this "
                                 f"plan: pass plan.shard(x) of the full sequence")
        self.schedule.check_heads(q.shape[1], k.shape[1])

    def check_inputs(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, sinks: torch.Tensor | None = None,
                     softcap: float | None = None) -> None:
        """:meth:`check_local_qkv`, then a ``ValueError`` on every rank unless all ranks of the group
        pass the same heads, head_dim and dtype, and all or none pass ``sinks``, with one ``softcap``
        (see module docstring)."""
        self.check_local_qkv(q, k, v)
        self.executor.check_agreement(q, k, v, sinks=sinks is not None, softcap=softcap)

    def to_compute_order(self, *xs: torch.Tensor, back: bool = False) -> list[torch.Tensor]:
        """This rank's tensors (token dim 0) from their local order to the executors' compute order
        (increasing global position), or ``back``; the identity unless the layout lists the rank's
        tokens in another order. Differentiable."""
        if self.local_order is None:
            return list(xs)
        index = self.local_order[1 if back else 0]
        return [x.index_select(0, index.on(x.device)) for x in xs]


@dataclass(frozen=True, eq=False)
class Plan(PlanBase):
    """What ``distattn.plan`` returns (see module docstring): a schedule, shared by every rank, and on a
    live plan this rank's :class:`PlanRuntime`. What else a scheduler decided is in ``plan.schedule``
    (e.g. ``plan.schedule.segments`` of ``cad``, ``plan.schedule.ulysses_degree`` of ``usp``)."""

    # made by distattn.plan and distattn.local_attention (plan_of); the generated __init__ takes every
    # field, so dataclasses.replace -- which FSDP applies to its forward's dataclass arguments -- copies one
    schedule: Schedule
    batch_size: int | None = None    # B of a batched plan (rows side by side in the schedule); None: one sequence
    comm_dtype: str | None = None    # how Q, K, V, out and dout travel: None (their dtype) or "fp8" (planning.wire)
    deterministic: bool = False      # bitwise-equal results run to run (distattn.plan(deterministic=True))
    # the caller's layout where the schedule runs its tokens in another order (a strided layout planned in
    # its ranks' order, distattn.planning.strided); its order[r] leads to the schedule's compute order.
    # None: the schedule's
    _given: Shards | None = field(default=None, repr=False)
    _runtime: PlanRuntime | None = field(default=None, repr=False)   # None: dry

    # ---- the schedule's facts ------------------------------------------------------------------
    @property
    def scheduler(self) -> str:
        return self.schedule.scheduler

    @property
    def doc_lens(self) -> tuple[int, ...]:
        return self.schedule.doc_lens

    @property
    def world_size(self) -> int:
        return self.schedule.world_size

    @property
    def layout(self) -> Shards:
        """The resolved layout: which tokens each rank holds (``layout.owned[r]``: rank ``r``'s global
        ``(start, end)`` ranges, in its local order)."""
        return self.schedule.shards if self._given is None else self._given

    @property
    def seq_len(self) -> int:
        """``S``: tokens of one row of a batched plan; of the packed sequence otherwise."""
        return self.schedule.total_tokens // (self.batch_size or 1)

    def stats(self, num_heads: int, num_kv_heads: int, head_dim: int, dtype_bytes: int = 2) -> dict:
        """Per-rank forward attention ``flops``, ``tokens``, ``send_bytes`` and ``kernel_segments`` (the
        query segments its kernel calls carry; lists indexed by rank) plus ``flops_imbalance`` and
        ``token_imbalance`` (max / mean), ``min_tokens_per_segment`` and ``fragmented``: True when some
        rank's calls average under 8 tokens a segment -- a layout of tokens scattered with no period, slow
        on any kernel (a strided one, e.g. a stripe, is planned in its ranks' order:
        :mod:`distattn.planning.strided`)."""
        return self.schedule.stats(num_heads, num_kv_heads, head_dim, dtype_bytes, self.comm_dtype == "fp8")

    # ---- this rank -------------------------------------------------------------------------------
    def _live(self, what: str) -> PlanRuntime:
        """This rank's runtime; ``ValueError`` naming ``what`` on a dry plan."""
        if self._runtime is None:
            raise ValueError(f"{what} needs a process group: this plan is dry (mesh was an int world size above 1); "
                             f"build it with a DeviceMesh or ProcessGroup (or mesh=1 on one device)")
        return self._runtime

    @property
    def rank(self) -> int | None:
        """This rank in the plan's group (None when dry)."""
        return None if self._runtime is None else self._runtime.rank

    @property
    def slot(self) -> int | None:
        """This rank's index in :meth:`stats`' per-rank lists: its rank, or under ``cad`` with
        ``pool=`` its slot in the pool (None when dry)."""
        return None if self._runtime is None else self._runtime.executor.rank

    @property
    def num_local_tokens(self) -> int:
        """``S_local``: this rank's tokens (of each row, for a batched plan)."""
        return self.schedule.num_tokens(self._live("num_local_tokens").rank) // (self.batch_size or 1)

    def bytes_sent(self) -> int:
        """Bytes this rank has sent through the plan's communicators so far."""
        return 0 if self._runtime is None else self._runtime.executor.bytes_sent

    def comm_wait_seconds(self) -> float:
        """Seconds this rank was held up waiting for the plan's transfers so far: the communication
        that computation did not hide (host time under gloo; the compute stream's stall on CUDA)."""
        return 0.0 if self._runtime is None else self._runtime.executor.wait_seconds()

    def _rows(self, x: torch.Tensor, dim: int | None, tokens: int, what: str) -> tuple[torch.Tensor, int]:
        """``(x with a batched plan's [B, n] dims at dim - 1, dim flattened, the token dim)``."""
        if self.batch_size is None:
            return x, 0 if dim is None else dim
        dim = 1 if dim is None else dim % x.dim()
        if dim < 1 or x.shape[dim - 1] != self.batch_size or x.shape[dim] != tokens:
            raise ValueError(f"{what} of shape {tuple(x.shape)} is not [..., B={self.batch_size}, {tokens}, ...] with "
                             f"the sequence at dim={dim} and the batch just before it: this plan has "
                             f"{self.batch_size} rows")
        return x.flatten(dim - 1, dim), dim - 1

    def shard(self, x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
        """``x`` with the full packed sequence along ``dim`` (``[S, ...]``, default dim 0) -> this rank's
        tokens ``[S_local, ...]`` in local order. A batched plan takes ``[B, S, ...]`` (default dim 1,
        the batch just before it) and gives ``[B, S_local, ...]``. Differentiable (slices)."""
        rank = self._live("shard").rank
        x, dim = self._rows(x, dim, self.seq_len, "x")
        if x.shape[dim] != self.schedule.total_tokens:
            raise ValueError(f"x has {x.shape[dim]} tokens along dim {dim} but doc_lens sum to "
                             f"{self.schedule.total_tokens}: pass the full packed sequence")
        ranges = self.layout.owned[rank]
        if not ranges:  # fewer tokens than ranks: this one owns none
            out = x.narrow(dim, 0, 0)
        elif len(ranges) > 64:  # an explicit layout of scattered tokens: one gather
            out = x.index_select(dim, torch.from_numpy(token_index(ranges)).to(x.device))
        else:
            out = torch.cat([x.narrow(dim, s, e - s) for s, e in ranges], dim=dim)
        return out if self.batch_size is None else out.unflatten(dim, (self.batch_size, -1))

    def unshard(self, x_local: torch.Tensor, dim: int | None = None) -> torch.Tensor:
        """Inverse of :meth:`shard`: every rank gets the full ``[S, ...]`` (batched: ``[B, S, ...]``)
        in original order; not differentiable (the result is detached).

        A collective over the plan's group: every rank must call it.
        """
        runtime = self._live("unshard")
        rank, layout = runtime.rank, self.layout
        x_local, dim = self._rows(x_local, dim, self.num_local_tokens, "x_local")
        if x_local.shape[dim] != layout.num_tokens(rank):
            raise ValueError(f"x_local has {x_local.shape[dim]} tokens along dim {dim} but rank {rank} owns "
                             f"{layout.num_tokens(rank)}: pass this rank's shard")
        x = x_local.detach().movedim(dim, 0)
        width = max(layout.num_tokens(r) for r in range(self.world_size))
        padded = x.new_zeros((width, *x.shape[1:]))  # gloo's all-gather needs equal sizes
        padded[: x.shape[0]] = x
        gathered = padded
        if self.world_size > 1:   # one rank (mesh=1) may have no process group to gather over
            gathered = padded.new_empty((self.world_size * width, *x.shape[1:]))
            runtime.executor.comm.all_gather(gathered, padded, "unshard").wait()
        full = x.new_empty((self.schedule.total_tokens, *x.shape[1:]))
        for r in range(self.world_size):
            tokens = torch.from_numpy(token_index(layout.owned[r])).to(x.device)
            full[tokens] = gathered[r * width:r * width + len(tokens)]
        full = full.movedim(0, dim)
        return full if self.batch_size is None else full.unflatten(dim, (self.batch_size, -1))

    def position_ids(self, device: torch.device | str | None = None) -> torch.Tensor:
        """``[S_local]`` int64 (batched: ``[B, S_local]``): each local token's position inside its
        document (for RoPE)."""
        tokens = token_index(self.layout.owned[self._live("position_ids").rank])
        starts = self.schedule.doc_starts
        doc = np.searchsorted(starts, tokens, side="right") - 1
        pos = torch.from_numpy(tokens - starts[doc]).to(device)
        return pos if self.batch_size is None else pos.view(self.batch_size, -1)

    def prefetch(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Start the forward transfers of Q, K, V now (``cad``); pass the result to
        ``distattn.attention(q, k, v, plan, prefetch=...)`` with the same tensors. Work done in
        between (another nano-batch's pre-attention layers) overlaps the transfer."""
        ids = (id(q), id(k), id(v))
        q, k, v = flat_rows(q, k, v, self.batch_size)
        runtime = self._live("attention")
        runtime.check_inputs(q, k, v)
        if not runtime.executor.supports_prefetch:
            raise ValueError(f"prefetch works with scheduler='cad', not {self.scheduler!r}")
        return runtime.executor.prefetch(*runtime.to_compute_order(q, k, v))._replace(ids=ids)


def plan_of(schedule: Schedule, rank: int | None = None, executor: Executor | None = None, *,
            batch_size: int | None = None, options: ExecOptions = ExecOptions(), given: Shards | None = None) -> Plan:
    """A dry plan (``rank`` None) or this rank's live one, whose ``executor`` runs with ``options``;
    ``given``: the caller's layout where the schedule runs the tokens in another order (:class:`Plan`)."""
    assert (rank is None) == (executor is None), (rank, executor)
    layout = schedule.shards if given is None else given
    runtime = None if rank is None else PlanRuntime(schedule, rank, executor, batch_size, layout)
    return Plan(schedule, batch_size, options.comm_dtype, options.deterministic, given, runtime)


def flat_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch_size: int | None) -> list[torch.Tensor]:
    """A batched plan's ``[B, S_local, H, D]`` q, k, v as its schedule's ``[B * S_local, H, D]`` (a view
    when they are contiguous, else one copy); unbatched ones (``batch_size`` None) as they are."""
    if batch_size is None:
        return [q, k, v]
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4 or t.shape[0] != batch_size or t.shape[1] != q.shape[1]:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be [B={batch_size}, S_local, heads, head_dim] (q's S_local) under this "
                             f"batched plan, got {got}: pass plan.shard(x) of the [B, S, ...] batch")
    return [t.flatten(0, 1) for t in (q, k, v)]
