"""The ``Plan``: a schedule (what every rank does, as data) and this rank's executor (how it runs).

``distattn.plan`` builds one per packed batch: the scheduler's planner makes the
:class:`~distattn.schedule.Schedule` (frozen, no process group), and for a live plan
:func:`~distattn.executors.executor_for` makes the executor that runs this rank's part on the
mesh's groups, with its kernel layouts and indices copied to the device once. A *dry* plan
(``mesh`` an int world size) has a schedule and no executor: ``stats()`` works,
``shard``/``unshard``/``attention`` raise ``ValueError``.

Token ownership is the schedule's layout (:class:`~distattn.layout.Shards`): ``owned[r]`` lists
global ``(start, end)`` token ranges whose concatenation, in that order, is rank ``r``'s local
tensor. Ranks may own different numbers of tokens (any total length works; collectives pad
internally), or none (fewer tokens than ranks: their shards are ``[0, ...]`` tensors and they still
take part in every collective). Executors compute on a rank's tokens in increasing global order;
when the local order differs (``distattn.Layout.from_indices`` in another order),
:func:`distattn.attention` gathers q, k, v into that order and out back (:attr:`Plan.local_order`).

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

from .comm import Comm
from .executors.base import DeviceIndex, ExecOptions, Executor
from .kernels import check_qkv
from .layout import Shards, token_index
from .masks import MaskSlice, SliceMask
from .schedule import AttnShape, Phase, Schedule, imbalance
from .wire import check_comm_dtype

try:  # an opaque object can be a custom op's argument (distattn.ops)
    from torch._opaque_base import OpaqueBase as PlanBase
except ImportError:
    PlanBase = object

__all__ = ["Plan", "imbalance", "token_index"]


@dataclass(frozen=True, eq=False, init=False)
class Plan(PlanBase):
    """A schedule and, on a live plan, this rank's executor (see module docstring). What else a
    scheduler decided is in ``plan.schedule`` (e.g. ``plan.schedule.segments`` of ``cad``)."""

    schedule: Schedule
    backend: str
    rank: int | None                                   # None: dry
    executor: Executor | None = field(repr=False)      # None when dry
    local_order: tuple[DeviceIndex, DeviceIndex] | None = field(repr=False)  # (to compute order, back)
    batch_size: int | None = None   # B of a batched plan (rows side by side in the schedule); None: one sequence
    options: ExecOptions = ExecOptions()   # deterministic (and the executor's other run options)

    def __init__(self, schedule: Schedule | None = None, backend: str = "auto", rank: int | None = None,
                 executor=None, *, group=None, batch_size: int | None = None, options: ExecOptions = ExecOptions(),
                 **layout):
        """``Plan(schedule, backend, rank, executor)`` (what ``distattn.plan`` builds), or a plan of
        token ownership alone, as plans were made before schedules were data:
        ``Plan(scheduler=, doc_lens=, causal=, window=, backend=, world_size=, rank=, group=, owned=)``
        (``shard``, ``unshard``, ``position_ids``; no attention)."""
        if schedule is None:
            if "mask" not in layout:  # the document mask of doc_lens, causal, window
                layout["mask"] = SliceMask.documents(layout["doc_lens"], layout["causal"], layout["window"])
            layout["shards"] = Shards.from_owned(layout.pop("owned"), sum(layout["doc_lens"]))
            schedule = Schedule(**layout)
            executor = None if rank is None else Executor(schedule, rank, Comm(group), backend)
        order = None if rank is None else schedule.shards.order[rank]
        if order is not None:
            order = (DeviceIndex(order), DeviceIndex(np.argsort(order).astype(np.int64)))
        for name, value in (("schedule", schedule), ("backend", backend), ("rank", rank), ("executor", executor),
                            ("local_order", order), ("batch_size", batch_size), ("options", options)):
            object.__setattr__(self, name, value)

    # ---- the schedule's facts ------------------------------------------------------------------
    @property
    def scheduler(self) -> str:
        return self.schedule.scheduler

    @property
    def doc_lens(self) -> tuple[int, ...]:
        return self.schedule.doc_lens

    @property
    def causal(self) -> bool:
        return self.schedule.causal

    @property
    def window(self) -> int | None:
        return self.schedule.window

    @property
    def world_size(self) -> int:
        return self.schedule.world_size

    @property
    def owned(self):
        return self.schedule.owned

    @property
    def shards(self) -> Shards:
        """The layout: which tokens each rank holds (:class:`~distattn.layout.Shards`)."""
        return self.schedule.shards

    @property
    def ulysses_degree(self) -> int | None:
        """Ranks each Ulysses group splits heads over (``usp``); None for other schedulers."""
        return self.schedule.ulysses_degree

    @property
    def slot(self) -> int | None:
        """This rank's index in :meth:`stats`' per-rank lists: its rank, or under ``cad`` with
        ``pool=`` its slot in the pool (None when dry)."""
        return None if self.executor is None else self.executor.rank

    @property
    def comm_dtype(self) -> str | None:
        """How Q, K, V, out and dout travel: None (their dtype) or ``"fp8"`` (:mod:`distattn.wire`)."""
        return self.options.comm_dtype

    @property
    def deterministic(self) -> bool:
        """Whether results are bitwise equal run to run (``distattn.plan(deterministic=True)``)."""
        return self.options.deterministic

    @property
    def is_dry(self) -> bool:
        return self.rank is None

    @property
    def trace_key(self) -> tuple:
        """What a compiled graph through :mod:`distattn.ops` specializes on: the structure of the
        executor's saved state (not its sizes, which are symbolic there) and whether tokens are
        reordered. Plans with equal keys share a graph."""
        return (None if self.executor is None else self.executor.structure, self.local_order is None,
                self.batch_size)

    @property
    def total_tokens(self) -> int:
        """Tokens of the whole schedule (of all rows of a batched plan)."""
        return self.schedule.total_tokens

    @property
    def seq_len(self) -> int:
        """``S``: tokens of one row of a batched plan; of the packed sequence otherwise."""
        return self.total_tokens // (self.batch_size or 1)

    def num_tokens(self, rank: int) -> int:
        """Tokens ``rank`` holds in the whole schedule (all rows)."""
        return self.schedule.num_tokens(rank)

    @property
    def num_local_tokens(self) -> int:
        """``S_local``: this rank's tokens (of each row, for a batched plan)."""
        return self.num_tokens(self._require_rank("num_local_tokens")) // (self.batch_size or 1)

    def compute_slices(self, rank: int) -> list[MaskSlice]:
        return self.schedule.compute_slices(rank)

    def phases(self, num_heads: int, num_kv_heads: int, head_dim: int, dtype_bytes: int = 2) -> list[Phase]:
        """The schedule's forward and backward phases for this attention shape."""
        return self.schedule.phases(AttnShape(num_heads, num_kv_heads, head_dim, dtype_bytes))

    def stats(self, num_heads: int, num_kv_heads: int, head_dim: int, dtype_bytes: int = 2) -> dict:
        """Per-rank forward attention ``flops``, ``tokens`` and ``send_bytes`` (lists indexed by
        rank) plus ``flops_imbalance`` and ``token_imbalance`` (max / mean)."""
        return self.schedule.stats(num_heads, num_kv_heads, head_dim, dtype_bytes, self.comm_dtype == "fp8")

    # ---- this rank -------------------------------------------------------------------------------
    def _require_rank(self, what: str) -> int:
        if self.rank is None:
            raise ValueError(f"{what} needs a process group: this plan is dry (mesh was an int world size); "
                             f"build it with a DeviceMesh or ProcessGroup")
        return self.rank

    @property
    def group(self):
        """The CP group (None when dry)."""
        return None if self.executor is None else self.executor.comm.group

    def bytes_sent(self) -> int:
        """Bytes this rank has sent through the plan's communicators so far."""
        return 0 if self.executor is None else self.executor.bytes_sent

    def comm_wait_seconds(self) -> float:
        """Seconds this rank was held up waiting for the plan's transfers so far: the communication
        that computation did not hide (host time under gloo; the compute stream's stall on CUDA)."""
        return 0.0 if self.executor is None else self.executor.wait_seconds()

    def prepare(self, device: torch.device | str) -> None:
        """Copy this rank's kernel layouts and indices to ``device``, once (``distattn.plan`` does it
        for the mesh's device; attention on tensors of another device prepares them there)."""
        if self.executor is not None:
            self.executor.prepare(device)
            for index in self.local_order or ():
                index.on(device)

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
        rank = self._require_rank("shard")
        x, dim = self._rows(x, dim, self.seq_len, "x")
        if x.shape[dim] != self.total_tokens:
            raise ValueError(f"x has {x.shape[dim]} tokens along dim {dim} but doc_lens sum to "
                             f"{self.total_tokens}: pass the full packed sequence")
        ranges = self.owned[rank]
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
        rank = self._require_rank("unshard")
        x_local, dim = self._rows(x_local, dim, self.num_local_tokens, "x_local")
        if x_local.shape[dim] != self.num_tokens(rank):
            raise ValueError(f"x_local has {x_local.shape[dim]} tokens along dim {dim} but rank {rank} owns "
                             f"{self.num_tokens(rank)}: pass this rank's shard")
        x = x_local.detach().movedim(dim, 0)
        width = max(self.num_tokens(r) for r in range(self.world_size))
        padded = x.new_zeros((width, *x.shape[1:]))  # gloo's all-gather needs equal sizes
        padded[: x.shape[0]] = x
        gathered = padded.new_empty((self.world_size * width, *x.shape[1:]))
        self.executor.comm.all_gather(gathered, padded, "unshard").wait()
        full = x.new_empty((self.total_tokens, *x.shape[1:]))
        for r in range(self.world_size):
            tokens = torch.from_numpy(token_index(self.owned[r])).to(x.device)
            full[tokens] = gathered[r * width:r * width + len(tokens)]
        full = full.movedim(0, dim)
        return full if self.batch_size is None else full.unflatten(dim, (self.batch_size, -1))

    def position_ids(self, device: torch.device | str | None = None) -> torch.Tensor:
        """``[S_local]`` int64 (batched: ``[B, S_local]``): each local token's position inside its
        document (for RoPE)."""
        tokens = token_index(self.owned[self._require_rank("position_ids")])
        starts = self.schedule.doc_starts
        doc = np.searchsorted(starts, tokens, side="right") - 1
        pos = torch.from_numpy(tokens - starts[doc]).to(device)
        return pos if self.batch_size is None else pos.view(self.batch_size, -1)

    def check_local_qkv(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """``ValueError`` unless q/k/v are this rank's ``[S_local, H, D]`` shards. Checked before any
        communication, so a bad input fails on its rank instead of stalling the others."""
        rank = self._require_rank("attention")
        check_qkv(q, k, v)
        check_comm_dtype(self.comm_dtype, q.dtype)
        n = self.num_tokens(rank)
        for name, t in (("q", q), ("k", k), ("v", v)):
            if t.shape[0] != n:
                rows = "" if self.batch_size is None else f" ({self.batch_size} rows of {n // self.batch_size})"
                raise ValueError(f"{name} has {t.shape[0]} tokens but rank {rank} owns {n}{rows} under this plan: "
                                 f"pass plan.shard(x) of the full sequence")
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

    def prefetch(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Start the forward transfers of Q, K, V now (``cad``); pass the result to
        ``distattn.attention(q, k, v, plan, prefetch=...)`` with the same tensors. Work done in
        between (another nano-batch's pre-attention layers) overlaps the transfer."""
        ids = (id(q), id(k), id(v))
        q, k, v = flat_rows(q, k, v, self.batch_size)
        self.check_inputs(q, k, v)
        if not self.executor.supports_prefetch:
            raise ValueError(f"prefetch works with scheduler='cad', not {self.scheduler!r}")
        return self.executor.prefetch(*self.to_compute_order(q, k, v))._replace(ids=ids)


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
