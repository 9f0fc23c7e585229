"""``cad``: core-attention disaggregation -- attention tasks balanced by FLOPs over all ranks, in place.

(Efficient Long-context Language Model Training by Core Attention
Disaggregation; the DistCA system.) Packing balances tokens, so everything
but attention is balanced; attention of a document costs ~ its length
squared, so ranks holding long documents straggle. Core attention has no
weights and needs only its document's Q, K, V, so it can run anywhere.

Layout: ``shard`` gives every rank an equal, contiguous run of tokens (the
rest of the model sees a plain sequence split). ``attention`` runs a task
table planned once per batch:

1. *Tasks.* Each document's queries are cut at the rank boundaries; every
   piece is a task (its queries plus the key prefix it sees) whose home is the
   rank owning it. A long causal document is instead cut into ``2k`` equal
   chunks paired head with tail (chunk ``i`` with ``2k-1-i``), so each pair
   carries the same causal work.
2. *Cost.* Each task's time comes from the cost model
   (:mod:`distattn.sim.cost`: a roofline by default, or a measured profile).
3. *Greedy migration.* While some rank is more than ``epsilon`` from the mean
   load: take the most and the least loaded ranks; among the former's tasks
   pick the one with the fewest bytes moved per unit of work gained (query
   tokens, plus key tokens the receiver does not own) and move it; if it would
   overshoot, split a pair into its halves, or cut a single task's queries so
   that the head moves (the head needs the shorter key prefix).

Execution, forward: one all-to-all sends every task's Q rows to the rank that
computes it and, per destination, the union of the key rows its tasks need
(each K/V row once per destination, however many tasks use it); the
destination runs all its tasks in one varlen kernel call; out and lse return
by all-to-all. Backward keeps no state on the computing rank: Q, K, V, out,
dout and lse are sent again, dq/dk/dv computed there and returned, and dK/dV
of keys that went to several ranks are summed (fp32) by their owner.

**Pool.** ``distattn.plan(doc_lens, cp_group, scheduler="cad", pool=group)``
balances the attention of every CP group inside ``pool`` (e.g. all data-
parallel replicas, each with its own ``doc_lens``) over all the pool's ranks.
Contract: every rank of the pool calls ``plan`` (a collective over the pool:
document lengths are exchanged) and then ``attention`` together; each CP group
is a set of pool ranks; ``shard``/``unshard``/``position_ids`` stay within the
rank's own CP group and sequence; ``stats()`` lists every pool rank.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ..comm import Comm
from ..kernels import Varlen, varlen_bwd, varlen_fwd
from ..masks import MaskSlice, attention_flops
from ..merge import acc_dtype
from ..plans import DeviceIndex, Plan, check_stats_args, imbalance
from ..sim.cost import Roofline
from .blocks import even_bounds
from .cad_planner import Segments, place_tasks


def _merge_intervals(a0: np.ndarray, a1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(a0, kind="stable")
    a0, a1 = a0[order], a1[order]
    keep = a1 > a0
    a0, a1 = a0[keep], a1[keep]
    if a0.size == 0:
        return a0, a1
    reach = np.maximum.accumulate(a1)
    starts = np.concatenate([[True], a0[1:] > reach[:-1]])
    idx = np.nonzero(starts)[0]
    return a0[idx], np.maximum.reduceat(a1, idx)


def _covered_before(i0: np.ndarray, i1: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Tokens of the disjoint sorted intervals ``[i0, i1)`` below each ``x``."""
    if i0.size == 0:  # a slot with no task: nothing below anything
        return np.zeros(np.shape(x), dtype=np.int64)
    cum = np.concatenate([[0], np.cumsum(i1 - i0)])
    j = np.searchsorted(i0, x, side="right")  # intervals starting at or before x
    inside = np.where(j > 0, np.minimum(x, i1[np.maximum(j - 1, 0)]) - i0[np.maximum(j - 1, 0)], 0)
    return cum[np.maximum(j - 1, 0)] * (j > 0) + np.maximum(inside, 0)


def _rows(i0, i1, lo, hi) -> np.ndarray:
    """Indices (relative to ``lo``) of tokens of intervals ``[i0, i1)`` inside ``[lo, hi)``."""
    a, b = np.maximum(i0, lo), np.minimum(i1, hi)
    keep = b > a
    return np.concatenate([np.arange(x, y) for x, y in zip(a[keep], b[keep])] or [np.zeros(0, np.int64)]) - lo


@dataclass(frozen=True)
class Route:
    """Rows of one kind (Q, or K/V) between this rank and every slot."""

    send: tuple[DeviceIndex, ...]   # per slot: my local rows that slot needs
    recv: tuple[int, ...]           # per slot: rows I receive from it (in slot order)
    back: DeviceIndex               # the sent rows in slot order: where results for them come back

    @staticmethod
    def build(send: list[np.ndarray], recv) -> "Route":
        return Route(tuple(DeviceIndex(r) for r in send), tuple(int(x) for x in recv),
                     DeviceIndex(np.concatenate(send).astype(np.int64)))

    def sent(self) -> tuple[int, ...]:
        return tuple(len(r.array) for r in self.send)

    def indices(self):
        return [*self.send, self.back]


@dataclass(frozen=True)
class Exchange:
    """This rank's part of the task table: the routes of the all-to-alls and the kernel layout."""

    q: Route
    kv: Route
    varlen: Varlen                      # my tasks: queries as received, keys as gathered by kv_index
    kv_index: DeviceIndex               # per segment key row -> row of my received K/V buffer


def _exchange(seg: Segments, bounds: np.ndarray, me: int) -> Exchange:
    p = len(bounds) - 1
    lo, hi = bounds[me], bounds[me + 1]
    q_send, kv_send = [], []
    for c in range(p):
        mine = seg.rank == c
        order = np.argsort(seg.q0[mine], kind="stable")
        q_send.append(_rows(seg.q0[mine][order], seg.q1[mine][order], lo, hi))
        u0, u1 = _merge_intervals(seg.k0[mine], seg.k1[mine])
        kv_send.append(_rows(u0, u1, lo, hi))
    mine = np.nonzero(seg.rank == me)[0]
    mine = mine[np.argsort(seg.q0[mine], kind="stable")]
    q0, q1, k0, k1 = seg.q0[mine], seg.q1[mine], seg.k0[mine], seg.k1[mine]
    u0, u1 = _merge_intervals(k0, k1)
    start = _covered_before(u0, u1, k0)
    kv_index = np.concatenate([np.arange(s, s + n) for s, n in zip(start, k1 - k0)] or [np.zeros(0, np.int64)])
    # a slot with no task (fewer tokens than ranks) still runs one empty kernel call: no special path
    varlen = Varlen.from_lengths(q1 - q0, k1 - k0, q1 - k1) if mine.size else Varlen.from_lengths([0], [0])
    return Exchange(Route.build(q_send, np.diff(_covered_before(q0, q1, bounds))),
                    Route.build(kv_send, np.diff(_covered_before(u0, u1, bounds))), varlen,
                    DeviceIndex(kv_index.astype(np.int64)))


@dataclass(frozen=True, eq=False, kw_only=True)
class CADPlan(Plan):
    segments: Segments = field(repr=False)
    bounds: np.ndarray = field(repr=False)          # token ranges of the pool's slots
    slot_ranks: tuple[int, ...]                     # pool-group rank of each slot
    slot: int | None = None                         # this rank's slot (None: dry)
    pool_comm: Comm | None = field(default=None, repr=False)
    exchange: Exchange | None = field(default=None, repr=False)

    @property
    def agreement_group(self):
        return self.pool_comm.group if self.pool_comm is not None else self.group  # tasks cross the pool

    @property
    def pool_size(self) -> int:
        return len(self.bounds) - 1

    def compute_slices(self, rank: int) -> list[MaskSlice]:
        s = self.segments
        return [MaskSlice(int(a), int(b), int(c), int(d), self.causal, self.window)
                for a, b, c, d in zip(s.q0[s.rank == rank], s.q1[s.rank == rank], s.k0[s.rank == rank],
                                      s.k1[s.rank == rank])]

    def stats(self, num_heads: int, num_kv_heads: int, head_dim: int, dtype_bytes: int = 2) -> dict:
        """Per pool slot (the CP ranks when there is no pool): forward attention FLOPs, tokens and
        bytes sent (Q and K/V out, out and lse back)."""
        check_stats_args(num_heads, num_kv_heads, head_dim, dtype_bytes)
        p, seg = self.pool_size, self.segments
        flops = [int(attention_flops(a, num_heads, head_dim)) for a in np.bincount(seg.rank, seg.area, minlength=p)]
        tokens = [int(x) for x in np.diff(self.bounds)]
        q_rows, kv_rows = self._traffic()
        np.fill_diagonal(q_rows, 0)
        np.fill_diagonal(kv_rows, 0)
        q_b = num_heads * head_dim * dtype_bytes
        kv_b = 2 * num_kv_heads * head_dim * dtype_bytes
        # out in the input dtype, lse in fp32 (fp64 for fp64 inputs)
        back_b = num_heads * (head_dim * dtype_bytes + max(4, dtype_bytes))
        send = q_rows.sum(1) * q_b + kv_rows.sum(1) * kv_b + q_rows.sum(0) * back_b
        return {"scheduler": "cad", "world_size": p, "flops": flops, "tokens": tokens,
                "send_bytes": [int(x) for x in send], "flops_imbalance": imbalance(flops),
                "token_imbalance": imbalance(tokens)}

    def visible_pairs(self, rank: int) -> int:
        return int(self.segments.area[self.segments.rank == rank].sum())

    def send_bytes(self, rank, num_heads, num_kv_heads, head_dim, dtype_bytes) -> int:
        return self.stats(num_heads, num_kv_heads, head_dim, dtype_bytes)["send_bytes"][rank]

    def _traffic(self) -> tuple[np.ndarray, np.ndarray]:
        """``[owner slot, computing slot]`` matrices of Q rows and K/V rows moved."""
        p, s = self.pool_size, self.segments
        q_rows = np.zeros((p, p), dtype=np.int64)
        kv_rows = np.zeros((p, p), dtype=np.int64)
        for c in range(p):
            mine = s.rank == c
            order = np.argsort(s.q0[mine], kind="stable")
            q_rows[:, c] = np.diff(_covered_before(s.q0[mine][order], s.q1[mine][order], self.bounds))
            u0, u1 = _merge_intervals(s.k0[mine], s.k1[mine])
            kv_rows[:, c] = np.diff(_covered_before(u0, u1, self.bounds))
        return q_rows, kv_rows

    def bytes_sent(self) -> int:
        return self.pool_comm.bytes_sent if self.pool_comm is not None else 0

    # ---- execution ---------------------------------------------------------------------------
    def _start(self, parts: list[torch.Tensor], recv_rows, like: torch.Tensor, what: str):
        """Start sending ``parts[slot]`` to each slot (rows of ``like``'s shape); the all-to-all
        orders peers by pool rank, the plan by slot."""
        width = int(np.prod(like.shape[1:]))
        by_rank = sorted(range(self.pool_size), key=lambda c: self.slot_ranks[c])
        flat_in = torch.cat([parts[c].reshape(-1) for c in by_rank])
        flat_out = like.new_empty(sum(recv_rows) * width)
        pending = self.pool_comm.all_to_all(flat_out, flat_in, [recv_rows[c] * width for c in by_rank],
                                            [parts[c].numel() for c in by_rank], what)
        return flat_out, by_rank, pending

    def _finish(self, started, recv_rows, like):
        flat, by_rank, pending = started
        pending.wait()
        chunks, offset = {}, 0
        for c in by_rank:
            n = recv_rows[c] * int(np.prod(like.shape[1:]))
            chunks[c] = flat[offset:offset + n].view(recv_rows[c], *like.shape[1:])
            offset += n
        return torch.cat([chunks[c] for c in range(self.pool_size)])

    def device_data(self):
        ex = self.exchange
        return [ex.varlen, ex.kv_index, *ex.q.indices(), *ex.kv.indices()]

    def _send(self, t: torch.Tensor, route: Route, what: str):
        return self._start([t.index_select(0, rows.on(t.device)) for rows in route.send], route.recv, t, what)

    def _to_workers(self, jobs, what, started=None):
        """``jobs``: (tensor, route). Rows of each tensor go to the slots computing them; returns
        what this rank receives, in slot order. ``started``: the transfers :meth:`prefetch` already
        began for these jobs."""
        if started is None:
            started = [self._send(t, route, what) for t, route in jobs]
        return [self._finish(s, route.recv, t) for s, (t, route) in zip(started, jobs)]

    def _forward_jobs(self, q, k, v):
        ex = self.exchange
        return [(q, ex.q), (torch.stack([k, v], dim=1), ex.kv)]

    def prefetch(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> "Prefetch":
        """Start the forward all-to-all of Q, K, V now; pass the result to
        ``distattn.attention(q, k, v, plan, prefetch=...)`` with the same tensors. Work done in
        between (another nano-batch's pre-attention layers) overlaps the transfer."""
        self.check_inputs(q, k, v)
        jobs = self._forward_jobs(q.detach(), k.detach(), v.detach())
        return Prefetch(self, (id(q), id(k), id(v)), jobs, [self._send(t, route, "cad forward") for t, route in jobs])

    def _to_owners(self, jobs, what):
        """``jobs``: (computed rows in slot order, route, local rows, sum?). Inverse of
        :meth:`_to_workers`; summed jobs add up rows that come from several slots (in fp32), the
        others place them."""
        started = []
        for t, route, _, _ in jobs:
            starts = np.concatenate([[0], np.cumsum(route.recv)])
            started.append(self._start([t[starts[c]:starts[c + 1]] for c in range(self.pool_size)], route.sent(), t,
                                       what))
        out = []
        for s, (t, route, n_local, add) in zip(started, jobs):
            got = self._finish(s, route.sent(), t)
            index = route.back.on(t.device)
            local = torch.zeros((n_local, *t.shape[1:]), dtype=acc_dtype(t.dtype) if add else t.dtype,
                                device=t.device)
            out.append(local.index_add_(0, index, got.to(local.dtype)) if add else local.index_copy_(0, index, got))
        return out

    def _kernel_args(self):
        return dict(causal=self.causal, window=self.window, backend=self.backend)

    def forward(self, q, k, v, scale, prefetch: "Prefetch | None" = None):
        ex = self.exchange
        if prefetch is not None:
            if prefetch.plan is not self or prefetch.ids != (id(q), id(k), id(v)):
                raise ValueError("prefetch was started by another plan or for other q, k, v tensors")
            q_buf, kv_buf = self._to_workers(prefetch.jobs, "cad forward", prefetch.started)
        else:
            q_buf, kv_buf = self._to_workers(self._forward_jobs(q, k, v), "cad forward")
        kv_seg = kv_buf.index_select(0, ex.kv_index.on(q.device))
        out_buf, lse_buf = varlen_fwd(q_buf, kv_seg[:, 0], kv_seg[:, 1], ex.varlen, scale=scale, **self._kernel_args())
        out, lse = self._to_owners([(out_buf, ex.q, q.shape[0], False), (lse_buf, ex.q, q.shape[0], False)],
                                   "cad forward")
        return out, (q, k, v, out, lse)

    def backward(self, dout, saved, scale):
        q, k, v, out, lse = saved
        ex = self.exchange
        q_buf, out_buf, dout_buf, lse_buf, kv_buf = self._to_workers(
            [(t, ex.q) for t in (q, out, dout, lse)] + [(torch.stack([k, v], dim=1), ex.kv)], "cad backward")
        index = ex.kv_index.on(q.device)
        kv_seg = kv_buf.index_select(0, index)
        dq_buf, dk_seg, dv_seg = varlen_bwd(dout_buf, q_buf, kv_seg[:, 0], kv_seg[:, 1], out_buf, lse_buf, ex.varlen,
                                            scale=scale, **self._kernel_args())
        dkv_buf = torch.zeros(kv_buf.shape, dtype=acc_dtype(q.dtype), device=q.device)
        dkv_buf.index_add_(0, index, torch.stack([dk_seg, dv_seg], dim=1).to(dkv_buf.dtype))
        dq, dkv = self._to_owners([(dq_buf, ex.q, q.shape[0], False), (dkv_buf, ex.kv, k.shape[0], True)],
                                  "cad backward")
        return dq, dkv[:, 0].to(k.dtype), dkv[:, 1].to(v.dtype)


@dataclass(eq=False)
class Prefetch:
    """Forward transfers :meth:`CADPlan.prefetch` started (consumed by ``attention``)."""

    plan: CADPlan
    ids: tuple[int, int, int]
    jobs: list
    started: list


def _pool_layout(doc_lens, mesh, pool):
    """(all documents in slot order, slot bounds, pool rank per slot, my slot, pool group)."""
    if pool is None:
        bounds = even_bounds(sum(doc_lens), mesh.world_size)
        slots = tuple(range(mesh.world_size))
        return list(doc_lens), bounds, slots, mesh.rank, mesh.group
    if mesh.is_dry:
        raise ValueError("pool= needs a live plan (a ProcessGroup or DeviceMesh for mesh), not a dry world size")
    if not isinstance(pool, dist.ProcessGroup):
        raise ValueError(f"pool must be a ProcessGroup containing every rank of the CP groups, "
                         f"got {type(pool).__name__}")
    key = dist.get_global_rank(mesh.group, 0) if mesh.group is not dist.group.WORLD else 0
    mine = (key, mesh.rank, mesh.world_size, list(doc_lens))
    entries: list[Any] = [None] * pool.size()
    try:
        dist.all_gather_object(entries, mine, group=pool)
    except RuntimeError as exc:
        others = [r for r in dist.get_process_group_ranks(pool) if r != dist.get_rank()]
        raise RuntimeError(f"distattn: cad's pool plan failed or timed out waiting for rank(s) {others} ({exc}); "
                           f"every rank of the pool must call distattn.plan with pool=") from exc
    order = sorted(range(pool.size()), key=lambda i: (entries[i][0], entries[i][1]))
    docs, sizes, seen = [], [], {}
    for i in order:
        k, r, size, lens = entries[i]
        if k in seen:
            if seen[k] != lens:
                raise ValueError("ranks of one CP group passed different doc_lens to distattn.plan")
            continue
        seen[k] = lens
        docs += lens
        sizes.append((sum(lens), size))
    bounds = np.concatenate([[0]] + [offset + even_bounds(total, size)[1:] for offset, (total, size)
                                     in zip(np.cumsum([0] + [t for t, _ in sizes[:-1]]), sizes)]).astype(np.int64)
    if len(bounds) - 1 != pool.size():
        raise ValueError(f"the pool's {pool.size()} ranks do not match its CP groups' sizes {[s for _, s in sizes]}: "
                         f"every pool rank must belong to exactly one CP group")
    return docs, bounds, tuple(order), order.index(dist.get_rank(pool)), pool


def build(doc_lens, mesh, *, causal, window, backend, pool=None, epsilon: float = 0.1, cost=None) -> CADPlan:
    if not isinstance(epsilon, (int, float)) or not 0 <= epsilon < 1:
        raise ValueError(f"epsilon must be in [0, 1) (allowed load above/below the mean), got {epsilon!r}")
    docs, bounds, slot_ranks, slot, pool_group = _pool_layout(doc_lens, mesh, pool)
    segments = place_tasks(docs, bounds, causal, window, cost or Roofline(), epsilon)
    own = even_bounds(sum(doc_lens), mesh.world_size)
    plan = CADPlan(scheduler="cad", doc_lens=doc_lens, causal=causal, window=window, backend=backend,
                   world_size=mesh.world_size, rank=mesh.rank, group=mesh.group,
                   owned=tuple(((int(a), int(b)),) for a, b in zip(own, own[1:])), segments=segments,
                   bounds=bounds, slot_ranks=slot_ranks, slot=slot,
                   exchange=None if mesh.is_dry else _exchange(segments, bounds, slot))
    if not mesh.is_dry:
        object.__setattr__(plan, "pool_comm", plan.comm if pool is None else Comm(pool_group))
    return plan
