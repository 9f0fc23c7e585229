"""Schedules: what one attention call does on every rank, as data.

A scheduler's planner (``distattn/schedulers/<name>.py``) returns a :class:`Schedule`: a frozen,
process-free description of one packed batch on ``P`` ranks. It holds the token layout
(``shards``, :class:`~distattn.planning.layout.Shards`: ``owned[r]`` is rank ``r``'s global token ranges, in
local order) and whatever the scheduler decided (ranges and their owners, a head split, a task
table). From it follow:

* :meth:`Schedule.program` -- for an attention shape, what one forward and one backward do on every
  rank, in the executor's order (:mod:`distattn.planning.program`): its phases (which ranks run how many
  attention FLOPs, which send how many bytes over which collective) and the instructions that
  compute them, start the transfers and wait for them -- so what a transfer hides behind is the
  computation the executor runs between its start and its wait, nothing else;
* :meth:`Schedule.stats` -- per-rank FLOPs and bytes, summed from those phases;
* :meth:`Schedule.saved_bytes` and :meth:`Schedule.buffer_bytes` -- the memory attention holds;
* what an executor (:mod:`distattn.executors`) needs to run one rank's part (each schedule
  derives its kernel calls and routes for a rank on request).

The same object serves a dry plan of thousands of ranks (``plan.stats()``, the simulator) and a
live run: nothing here touches a process group, so no scheduler is described twice.

Phases list entries ``(rank, step, amount)`` (sparse: a rank with nothing to do in a step has no
entry). ``amount`` is forward or backward FLOPs for ``op == "attention"`` and the bytes the rank
sends for a collective (``send_recv``, ``all_gather``, ``reduce_scatter``, ``all_to_all``;
counted as :class:`distattn.distributed.comm.Comm` counts them); a program's instruction names one step of one
phase.

A collective over several nodes may give, per entry, the larger of the bytes the rank sends and
receives inside its node (``intra``) and across nodes (``inter``): the simulator then times the
two kinds of link apart and waits for the slower; ``inter_sent`` is the part of ``amount`` that
crosses nodes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from ..costmodel.cost import attention_flops
from .layout import Ranges, Shards, cut_intervals
from .strided import FRAGMENTED   # fewer tokens a kernel segment on some rank: stats() says fragmented
from .masks import MaskSlice, SliceMask, band_area, check_positive_ints, mask_area, shift_band, slices_area
from .program import START, WAIT, Builder, Instr, Program
from .wire import Wire

COLLECTIVES = ("send_recv", "all_gather", "reduce_scatter", "all_to_all", "all_reduce")


@dataclass(frozen=True)
class AttnShape:
    """The attention shape bytes and FLOPs depend on: heads, head size and bytes per element."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    dtype_bytes: int = 2
    comm_fp8: bool = False   # Q, K, V, out and dout travel as FP8 with a scale per token and head (planning.wire)
    # sinks narrower than fp32: the backward ends with their gradient summed in fp32 over the group
    # (Executor.sink_share: one all-reduce of [num_heads] floats)
    narrow_sinks: bool = False

    def __post_init__(self):
        check_positive_ints(num_heads=self.num_heads, num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
                            dtype_bytes=self.dtype_bytes)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")

    @property
    def acc_bytes(self) -> int:
        """Bytes of an accumulator element: fp32, fp64 for fp64 inputs (:func:`distattn.kernels.merge.acc_dtype`)."""
        return max(4, self.dtype_bytes)

    def row_bytes(self, heads: int, acc: bool = False) -> int:
        """Bytes of one token of ``heads`` heads (input dtype, or the accumulator's)."""
        return heads * self.head_dim * (self.acc_bytes if acc else self.dtype_bytes)

    @property
    def kv_row(self) -> int:
        """Bytes of one token of K and V."""
        return 2 * self.row_bytes(self.num_kv_heads)

    def wire_row(self, heads: int) -> int:
        """Bytes of one token of ``heads`` heads of Q, K, V, out or dout as it travels (:mod:`.wire`)."""
        return heads * Wire(self.comm_fp8).row_bytes((self.head_dim,), self.dtype_bytes)

    def flops(self, pairs, heads: int | None = None, backward: bool = False):
        """Attention FLOPs of ``pairs`` visible (query, key) pairs over ``heads`` (default: all)."""
        return attention_flops(np.asarray(pairs, dtype=np.int64), self.num_heads if heads is None else heads,
                               self.head_dim, backward)


@dataclass(frozen=True, eq=False)
class Phase:
    """One step of a schedule on every rank at once (see module docstring)."""

    direction: str            # "forward" | "backward"
    op: str                   # "attention" or a collective
    what: str                 # e.g. "K/V ring", "Q/K/V to heads"
    span: int                 # consecutive ranks the group covers (intra- or inter-node for the network)
    rank: np.ndarray          # [N] rank of each entry
    amount: np.ndarray        # [N] FLOPs (attention) or bytes the rank sends
    step: np.ndarray | None = None   # [N] step of each entry (None: all in step 0)
    # a collective spanning nodes (cad's all-to-all): per entry, the larger of the bytes the rank sends
    # and receives inside its node, and across nodes; None: all bytes move as ``span`` ranks' collective
    intra: np.ndarray | None = None
    inter: np.ndarray | None = None
    inter_sent: np.ndarray | None = None   # per entry: the bytes of ``amount`` that cross nodes
    # a sparse all-to-all (cad's): per entry, the most peers the rank sends to or receives from --
    # what its latency grows with, not the group's size; None: every member of the group
    peers: np.ndarray | None = None
    # ... and the bytes of the rows it sends itself (its own rows it computes on): in its buffers, on no link
    kept: np.ndarray | None = None
    # point-to-point (the ring) or a sparse all-to-all (cad): ``(step, src, dst)`` of every pair of ranks
    # that moves data in a step -- a rank waits for those it exchanges with, not for the whole group;
    # None: a collective of every member of the group
    links: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    def __post_init__(self):
        assert self.direction in ("forward", "backward"), self
        assert self.op == "attention" or self.op in COLLECTIVES, self.op

    @staticmethod
    def per_rank(direction: str, op: str, what: str, span: int, amount, step: int = 0) -> "Phase":
        """A phase with one entry per rank ``0..len(amount)-1``, all in ``step``."""
        amount = np.asarray(amount)
        return Phase(direction, op, what, span, np.arange(len(amount)), amount,
                     np.full(len(amount), step, dtype=np.int64))

    @staticmethod
    def stepped(direction: str, op: str, what: str, span: int, amounts, ranks=None) -> "Phase":
        """A phase whose step ``s`` gives rank ``ranks[i]`` (default ``i``) ``amounts[s][i]``."""
        amounts = np.asarray(amounts)
        ranks = np.arange(amounts.shape[1]) if ranks is None else np.asarray(ranks)
        return Phase(direction, op, what, span, np.tile(ranks, len(amounts)), amounts.ravel(),
                     np.repeat(np.arange(len(amounts)), len(ranks)))

    @property
    def steps(self) -> np.ndarray:
        return np.zeros(len(self.rank), dtype=np.int64) if self.step is None else self.step

    @property
    def is_comm(self) -> bool:
        return self.op != "attention"

    def total(self, ranks: int) -> np.ndarray:
        """``[ranks]``: the phase's amount summed per rank (int64 stays exact)."""
        amount = np.asarray(self.amount)
        out = np.zeros(ranks, dtype=amount.dtype)
        np.add.at(out, self.rank, amount)
        return out


@dataclass(frozen=True, eq=False, kw_only=True)
class Schedule:
    """One packed batch on ``world_size`` ranks (see module docstring); subclassed per scheduler."""

    scheduler: str
    doc_lens: tuple[int, ...]
    causal: bool
    window: int | None
    world_size: int
    shards: Shards = field(repr=False)    # who holds which tokens (the plan's layout)
    mask: SliceMask = field(repr=False)   # who attends to whom: the document mask, or the plan's mask=

    # the rank's own q, k, v, out and lse are what attention keeps for backward (the ring family,
    # local): ``out`` is then the very tensor the output projection reads (a memory estimate counts it once)
    keeps_local_out = True
    ulysses_degree = None   # ranks each Ulysses group splits heads over (usp's field)

    # ---- what each scheduler says ------------------------------------------------------------
    def program(self, shape: AttnShape) -> Program:
        """What the executor does on every rank, forward and backward, as instructions over phases
        (:mod:`distattn.planning.program`)."""
        raise NotImplementedError

    def call_program(self, shape: AttnShape) -> Program:
        """What one attention call runs: :meth:`program`, and with ``shape.narrow_sinks`` the sinks'
        gradient summed over the ranks at the end of ``compute_backward``
        (:meth:`distattn.executors.base.Executor.sink_share`)."""
        program = self.program(shape)
        if not shape.narrow_sinks or self.stat_ranks == 1:
            return program
        n, size = self.stat_ranks, 4 * shape.num_heads
        phase = Phase.per_rank("backward", "all_reduce", "dsinks sum", n, np.full(n, 2 * (n - 1) * size // n))
        k = len(program.phases)
        stages = dict(program.stages, compute_backward=(*program.stage("compute_backward"), Instr(START, k),
                                                        Instr(WAIT, k)))
        return Program((*program.phases, phase), stages)

    def phases(self, shape: AttnShape) -> list[Phase]:
        """The call's phases (:meth:`call_program`): forward then backward."""
        return list(self.call_program(shape).phases)

    def compute_slices(self, rank: int) -> list[MaskSlice]:
        """The mask slices (global coordinates) rank computes."""
        raise NotImplementedError

    def visible_pairs(self, rank: int) -> int:
        """Visible (query, key) pairs rank computes (all its heads)."""
        return slices_area(self.compute_slices(rank))

    def kernel_heads(self, shape: AttnShape) -> float:
        """Query heads one kernel call runs on a rank, of ``shape.num_heads`` (a TP rank's): all of them
        here (the ring family, CAD, one rank); a head split runs fewer (the simulator's heads term,
        :mod:`distattn.sim.kernel`)."""
        return float(shape.num_heads)

    def check_heads(self, num_heads: int, num_kv_heads: int) -> None:
        """``ValueError`` when the schedule was made for other head counts (``usp``'s ``num_kv_heads``)."""

    def buffer_bytes(self, shape: AttnShape) -> np.ndarray:
        """``[ranks]``: peak bytes of the receive buffers the executor holds at once, per rank."""
        return np.zeros(self.stat_ranks)

    def grad_bytes(self, shape: AttnShape) -> np.ndarray:
        """``[ranks]``: attention's backward working set besides :meth:`buffer_bytes` -- the fp32
        dQ/dK/dV accumulators and one kernel call's gradients (at most as many rows, fp32 at most)
        of the rank's own tokens by default."""
        per_token = 2 * shape.row_bytes(shape.num_heads + 2 * shape.num_kv_heads, acc=True)
        return np.asarray(self.rank_tokens(), dtype=np.int64) * per_token

    def saved_bytes(self, shape: AttnShape) -> np.ndarray:
        """``[ranks]``: bytes attention keeps from forward to backward per rank (by default the rank's
        own q, k, v, out and the fp32 lse; schedulers that compute elsewhere override it)."""
        per_token = shape.row_bytes(2 * shape.num_heads + 2 * shape.num_kv_heads) + shape.num_heads * 4
        return np.asarray(self.rank_tokens(), dtype=np.int64) * per_token

    def extra_stats(self) -> dict:
        """Scheduler-specific per-rank lists added to :meth:`stats`."""
        return {}

    @property
    def stat_ranks(self) -> int:
        """Ranks the phases and stats list (``cad`` with a pool: every rank of the pool)."""
        return self.world_size

    def rank_tokens(self) -> list[int]:
        return [self.num_tokens(r) for r in range(self.stat_ranks)]

    # ---- derived -------------------------------------------------------------------------------
    @property
    def owned(self) -> tuple[Ranges, ...]:
        """Rank ``r``'s global token ranges, in its local order."""
        return self.shards.owned

    @property
    def total_tokens(self) -> int:
        return sum(self.doc_lens)

    def num_tokens(self, rank: int) -> int:
        return self.shards.num_tokens(rank)

    def kernel_segments(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(rank, q_len, area, k_len)``: the query segments the ranks' kernel calls run, each one's
        rows, visible pairs and the span of keys they see -- what a kernel's time depends on
        (:mod:`distattn.costmodel.tiles`). Here: each rank's own rows, cut at document boundaries, each seeing its
        document's keys (the ring family and the all-gather: every step pairs the same query rows with
        another block of keys), their pairs those of the schedule's mask (a strided layout's is over its
        ranks' order: :mod:`distattn.planning.strided`)."""
        return layout_segments(self.shards, self.doc_lens, self.causal, self.window, self.mask)

    @cached_property
    def doc_starts(self) -> np.ndarray:
        """Global start offset of each document."""
        return np.concatenate([[0], np.cumsum(self.doc_lens[:-1], dtype=np.int64)]).astype(np.int64)

    def stats(self, num_heads: int, num_kv_heads: int, head_dim: int, dtype_bytes: int = 2,
              comm_fp8: bool = False) -> dict:
        """Per-rank forward attention ``flops``, ``tokens`` and forward ``send_bytes`` (lists indexed by
        rank), summed from :meth:`phases`, plus ``flops_imbalance`` and ``token_imbalance`` (max / mean).
        ``comm_fp8``: Q, K, V, out and dout travel as FP8 (``comm_dtype="fp8"``)."""
        shape = AttnShape(num_heads, num_kv_heads, head_dim, dtype_bytes, comm_fp8)
        p = self.stat_ranks
        flops, send = [0] * p, [0] * p
        for ph in self.phases(shape):
            if ph.direction == "forward":
                for r, x in enumerate(ph.total(p).tolist()):
                    (send if ph.is_comm else flops)[r] += int(x)
        tokens = self.rank_tokens()
        segments = list(self.segments_per_rank)   # (a copy: the cached list stays as made)
        per_segment = min((t / n for t, n in zip(tokens, segments) if n), default=0.0)
        return {"scheduler": self.scheduler, "world_size": p, "flops": flops, "tokens": tokens, "send_bytes": send,
                "flops_imbalance": imbalance(flops), "token_imbalance": imbalance(tokens),
                "kernel_segments": segments, "min_tokens_per_segment": per_segment,
                "fragmented": bool(segments and 0 < per_segment < FRAGMENTED), **self.extra_stats()}

    @cached_property
    def segments_per_rank(self) -> list[int]:
        """``[ranks]``: the query segments each rank's kernel calls carry (:meth:`kernel_segments`; made
        once per schedule, as :meth:`stats` is asked again for a cached plan). A layout whose ranks hold
        tokens scattered with no period makes about a segment per token, which no kernel runs fast:
        :meth:`stats` flags it (``fragmented``)."""
        rank = np.asarray(self.kernel_segments()[0], dtype=np.int64)
        return np.bincount(rank, minlength=self.stat_ranks)[:self.stat_ranks].astype(int).tolist()




def layout_segments(shards: Shards, doc_lens, causal: bool, window: int | None, mask: SliceMask | None = None
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(rank, q_len, area, k_len)`` of the runs ``shards`` gives each rank, cut at the documents'
    boundaries: rows ``[p0, p1)`` of a document of length ``L`` see its keys as its mask allows, or as
    ``mask`` does; ``k_len``: the span of the keys they see (vectorised)."""
    lens = np.asarray(doc_lens, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    cuts = np.union1d(shards.bounds, starts)
    a, b = cuts[:-1], cuts[1:]
    a, b = a[b > a], b[b > a]
    rank = shards.owner[np.searchsorted(shards.bounds, a, side="right") - 1]
    if mask is not None:   # the segments' pairs under the mask: its slices' rows cut at the segments
        q0, q1, k0, k1, lo, hi = mask.arrays
        s, seg, r0, r1 = cut_intervals(cuts, q0, q1)
        area = band_area(r1 - r0, k1[s] - k0[s], *shift_band(lo[s], hi[s], k0[s] - r0))
        seen = area > 0      # the keys each piece sees: the band's reach from its first and last row
        ks, ke = np.maximum(k0[s], r0 + lo[s])[seen], np.minimum(k1[s], r1 + hi[s])[seen]
        first, last = np.full(len(a), np.iinfo(np.int64).max), np.full(len(a), np.iinfo(np.int64).min)
        np.minimum.at(first, seg[seen], ks)
        np.maximum.at(last, seg[seen], ke)
        return (rank, b - a, np.bincount(seg, weights=area, minlength=len(a)).astype(np.int64),
                np.maximum(last - first, 0))
    doc = np.searchsorted(starts, a, side="right") - 1
    p0, p1, length = a - starts[doc], b - starts[doc], lens[doc]
    area = mask_area(b - a, length, causal, window, offsets=p1 - length)
    k0 = np.zeros_like(p0) if window is None else np.maximum(p0 - window + 1, 0)
    k1 = p1 if causal else (length if window is None else np.minimum(p1 + window - 1, length))
    return rank, b - a, area, k1 - k0

def attention_program(flops, span: int) -> Program:
    """A program computing ``flops [P]`` forward (2.5x that backward) on ranks ``0..P-1``, with no
    communication (one rank's attention; the simulator's bounds)."""
    b = Builder()
    b.run("compute", b.phase(Phase.per_rank("forward", "attention", "attention", span, flops)))
    b.run("compute_backward", b.phase(Phase.per_rank("backward", "attention", "attention", span,
                                                     np.asarray(flops) * 2.5)))
    return b.build()


def imbalance(values) -> float:
    """max / mean (1.0 when everything is zero)."""
    mean = sum(values) / len(values)
    return max(values) / mean if mean > 0 else 1.0

