"""CAD placement: which rank computes each attention task, weighing compute saved against bytes moved.

The task table (:class:`~distattn.schedulers.cad_planner.TaskTable`) starts with every task on the
rank owning its queries. Until the most loaded rank is within ``epsilon`` of the mean load:

1. ``src`` is the most loaded rank. Its candidate destinations are under-loaded ranks: the
   ``SHORTLIST`` least loaded of all, every under-loaded rank of ``src``'s node, and every
   under-loaded rank that already holds keys of one of ``src``'s documents (it owns some, or
   earlier moves sent it some).
2. For every (task of ``src``, destination ``u``) the planner prices the move:

   * *gain*: the forward + backward attention seconds taken off ``src`` (the task's time, at most
     what brings ``src`` or ``u`` to the mean; the cost model times the forward, the backward is
     2.5x);
   * *cost*: the network seconds of the bytes the move adds: the task's query rows (Q and dout
     out, out, lse and dQ back) and the key rows ``u`` neither owns nor already receives for this
     document (K/V out, fp32 dK/dV back) -- K/V rows go once to each destination however many
     tasks use them, so a destination already holding a document's keys takes its next chunks
     for the price of their queries; bytes inside a node move at the node's bandwidth, between
     nodes at the inter-node one (:class:`LinkCost`, from the simulator's
     :class:`~distattn.cluster.profile.NetworkProfile`).

   Moves that would push ``src``'s egress, ``u``'s ingress or the egress of the first and last
   owners of the task's keys above ``cap`` times the bytes of a rank's own rows are left out (if
   none is left, the cap grows by a quarter). The move with the lowest cost per gain wins, ties
   to the lowest task and rank.

   With ``overlap_s`` (seconds per layer a rank computes besides attention, behind which
   :func:`distattn.pingpong.ping_pong` hides transfers) a move must also pay off: each rank's
   time is its attention plus the transfer time that its ``overlap_s`` and attention do not
   hide, and after the move neither ``src``, ``u`` nor the keys' first owner may be as slow as
   ``src`` was before. Among the moves that pay off the one leaving the slowest of them fastest
   wins. If none pays off, placement stops: the step would get slower, not faster.
3. The chosen task moves whole when it fits ``u``; a head/tail pair that overshoots is split into
   its two halves (the next round prices them alone); a single task that overshoots has its
   queries cut so that the head -- which sees the shorter key prefix -- carries what ``u`` can
   take, and the head moves.

Egress is charged to the ranks that own the rows sent (K/V owners, not ``src``), ingress to ``u``.
For windowed documents the keys a destination holds are tracked as one hull, a slight
underestimate of the bytes of later moves.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..cluster.profile import NetworkProfile, default_profile
from ..layout import Shards
from .cad_planner import Segments, TaskTable, _ranges

SHORTLIST = 16          # least-loaded ranks of the whole pool considered per move
BACKWARD = 2.5          # backward attention time / forward


@dataclass(frozen=True)
class LinkCost:
    """Seconds per byte a rank sends inside its node and to other nodes, and the node size."""

    gpus_per_node: int
    intra_s_per_byte: float
    inter_s_per_byte: float

    @staticmethod
    def of(network: NetworkProfile | None, ranks: int) -> "LinkCost":
        """An all-to-all rank sending ``b`` bytes takes about ``b / busbw`` (nccl-tests' bus factor
        cancels the ``n / (n-1)`` of its size convention)."""
        net = network or default_profile()
        gpn = net.gpus_per_node
        intra = net.fit("all_to_all", max(2, min(gpn, ranks))).busbw_gbs
        inter = min(intra, net.fit("all_to_all", max(ranks, 2 * gpn)).busbw_gbs)
        return LinkCost(gpn, 1e-9 / intra, 1e-9 / inter)


@dataclass(frozen=True)
class RowBytes:
    """Bytes one moved row costs over forward and backward."""

    q: float       # Q and dout out, out and dQ back (input dtype), lse back (fp32)
    kv: float      # K and V out (input dtype), dK and dV back (fp32)

    @staticmethod
    def of(num_heads: int = 32, num_kv_heads: int = 8, head_dim: int = 128, dtype_bytes: int = 2) -> "RowBytes":
        acc = max(4, dtype_bytes)
        return RowBytes(4 * num_heads * head_dim * dtype_bytes + num_heads * acc,
                        2 * num_kv_heads * head_dim * (dtype_bytes + acc))


class _Ledger:
    """Loads, bytes in and out per rank, and the keys each rank already receives per document."""

    def __init__(self, table: TaskTable, slots: Shards, links: LinkCost, rows: RowBytes, cap: float,
                 overlap_s: float | None):
        p = slots.world_size
        self.table, self.slots, self.links, self.rows = table, slots, links, rows
        self.load = table.load(p)
        self.mean = float(self.load.mean())
        self.node = np.arange(p) // links.gpus_per_node
        self.egress, self.ingress = np.zeros(p), np.zeros(p)     # bytes per layer, both passes
        self.out_s, self.in_s = np.zeros(p), np.zeros(p)         # ... and their network seconds
        self.overlap_s = overlap_s
        self.tokens = slots.total / p
        self.cap = cap * self.tokens * (rows.q + rows.kv)
        self.held: dict[int, dict[int, tuple[int, int]]] = {}   # doc -> rank -> key hull it receives

    def owner(self, x) -> np.ndarray:
        return self.slots.owner_of(x)

    def destinations(self, src: int, docs: np.ndarray) -> np.ndarray:
        p, g = len(self.load), self.links.gpus_per_node
        pick = np.zeros(p, dtype=bool)
        pick[np.argpartition(self.load, min(SHORTLIST, p - 1))[:SHORTLIST]] = True
        pick[self.node[src] * g:(self.node[src] + 1) * g] = True
        docs = np.unique(docs)
        runs = np.searchsorted(self.slots.bounds, np.stack([self.table.ds[docs], self.table.de[docs] - 1]),
                               side="right") - 1
        pick[self.slots.owner[_ranges(runs[0], runs[1] - runs[0] + 1)[1]]] = True   # ranks holding part of them
        for d in docs.tolist():
            pick[list(self.held.get(d, ()))] = True          # ranks already receiving their keys
        return np.nonzero(pick & (self.load < self.mean))[0]

    def new_keys(self, tasks: np.ndarray, dests: np.ndarray) -> np.ndarray:
        """``[tasks, dests]``: key rows each task needs at each destination that it neither owns nor holds."""
        t = self.table
        k0, k1 = t.t_k0[tasks][:, None], t.t_k1[tasks][:, None]
        h0 = np.zeros((len(tasks), len(dests)), dtype=np.int64)
        h1 = np.zeros_like(h0)
        col = {int(u): j for j, u in enumerate(dests)}
        for i, task in enumerate(tasks.tolist()):
            for u, (a, b) in self.held.get(int(t.doc[t.t_seg[task, 0]]), {}).items():
                if u in col:
                    h0[i, col[u]], h1[i, col[u]] = a, b

        held = np.maximum(np.minimum(k1, h1) - np.maximum(k0, h0), 0)
        owned = self.slots.held_in(dests[None, :], k0, k1)
        both = self.slots.held_in(dests[None, :], np.maximum(k0, h0), np.minimum(k1, h1))
        return (k1 - k0) - owned - held + both

    def choose(self, src: int):
        """The cheapest move off ``src``: ``(task, destination, want)`` or None."""
        t = self.table
        tasks = t.tasks_on(src)
        if tasks.size == 0:
            return None
        dests = self.destinations(src, t.doc[t.t_seg[tasks, 0]])
        if dests.size == 0:
            return None
        want = np.minimum(self.load[src] - self.mean, self.mean - self.load[dests])[None, :]
        gain = (1 + BACKWARD) * np.minimum(t.t_time[tasks][:, None], want)
        q_bytes = t.t_q[tasks][:, None] * self.rows.q
        new_keys = self.new_keys(tasks, dests)
        moved = q_bytes + new_keys * self.rows.kv
        per_byte = self.per_byte(src, dests)[None, :]
        score = moved * per_byte / np.maximum(gain, 1e-30)
        # the first and last owners of each task's keys (a causal prefix: the first is the busiest)
        # send at most their own rows of them
        key_owner = self.owner(t.t_k0[tasks])
        key_out = np.maximum(self.egress[key_owner], self.egress[self.owner(t.t_k1[tasks] - 1)])
        key_rows = np.minimum(new_keys, self.tokens)
        key_out = key_out[:, None] + key_rows * self.rows.kv
        while True:
            ok = ((self.ingress[dests][None, :] + moved <= self.cap) & (self.egress[src] + q_bytes <= self.cap)
                  & ((new_keys == 0) | (key_out <= self.cap)))
            if ok.any():
                break
            self.cap *= 1.25
        if self.overlap_s is not None:
            # a move pays off if no rank it touches ends up slower than src was (attention plus
            # communication its computation does not hide): the step waits for the slowest rank
            before = self.busy(np.asarray([src]), 0, 0, 0)
            key_s = key_rows * self.rows.kv * per_byte
            src_owns = (key_owner == src)[:, None]   # src sends these keys itself
            after = np.maximum.reduce([
                self.busy(np.asarray([src])[None, :], q_bytes * per_byte + np.where(src_owns, key_s, 0), 0, -gain),
                self.busy(dests[None, :], 0, moved * per_byte, gain),
                np.where(src_owns, 0, self.busy(key_owner[:, None], key_s, 0, 0))])
            ok &= after < before
            score = after + 1e-3 * moved * per_byte
        score = np.where(ok, score, np.inf)
        i, j = np.unravel_index(np.argmin(score), score.shape)
        if not np.isfinite(score[i, j]):  # every move exposes more communication than it saves
            return None
        return int(tasks[i]), int(dests[j]), float(want[0, j])

    def per_byte(self, src: int, dests) -> np.ndarray:
        return np.where(self.node[dests] == self.node[src], self.links.intra_s_per_byte, self.links.inter_s_per_byte)

    def busy(self, ranks, more_out_s, more_in_s, more_work_s) -> np.ndarray:
        """Seconds per layer ``ranks`` spend on attention and on transfers nothing hides, after
        sending ``more_out_s`` and receiving ``more_in_s`` more and computing ``more_work_s`` more:
        transfers hide behind ``overlap_s`` plus the rank's attention, forward and backward."""
        work = (1 + BACKWARD) * self.load[ranks] + more_work_s
        wire = np.maximum(self.out_s[ranks] + more_out_s, self.in_s[ranks] + more_in_s)
        return work + np.maximum(wire - self.overlap_s - work, 0)

    def charge(self, task: int, u: int) -> None:
        """Book the bytes of ``task`` moving to ``u`` (before the move: its queries' owner sends them)."""
        t = self.table
        d = int(t.doc[t.t_seg[task, 0]])
        q_owner = int(self.owner(t.q0[t.t_seg[task, 0]]))
        q_bytes = float(t.t_q[task]) * self.rows.q
        self._book(q_owner, u, q_bytes)
        k0, k1 = int(t.t_k0[task]), int(t.t_k1[task])
        held = self.held.setdefault(d, {})
        h0, h1 = held.get(u, (k0, k0))
        for a, b in ((k0, min(k1, h0)), (max(k0, h1), k1)):   # keys outside what u already receives
            if b > a:
                self._send_keys(a, b, u)
        held[u] = (min(h0, k0), max(h1, k1))

    def _send_keys(self, a: int, b: int, u: int) -> None:
        """Book keys ``[a, b)`` to ``u`` from the ranks holding them (``u``'s own keys stay)."""
        _, run, start, end = self.slots.cut(a, b)
        sender = self.slots.owner[run]
        for r, n in zip(sender.tolist(), (end - start).tolist()):
            if r != u:
                self._book(r, u, n * self.rows.kv)

    def _book(self, sender: int, u: int, nbytes: float) -> None:
        seconds = nbytes * float(self.per_byte(sender, u))
        self.egress[sender] += nbytes
        self.ingress[u] += nbytes
        self.out_s[sender] += seconds
        self.in_s[u] += seconds


def place_tasks(mask, slots: Shards, cost, epsilon: float = 0.04,
                chunk: int | None = None, links: LinkCost | None = None, rows: RowBytes | None = None,
                cap: float = 2.0, overlap_s: float | None = None) -> Segments:
    """Build the task table and place its tasks (module docstring) over the ``slots``' tokens. ``cap``: bytes a rank may send
    or receive per layer, in units of a rank's own rows (Q, K and V of its tokens, both passes).
    ``overlap_s``: see :func:`distattn.schedulers.cad.build`."""
    p = slots.world_size
    chunk = chunk or max(128, slots.total // p // 4)
    table = TaskTable(mask, slots, chunk, cost)
    ledger = _Ledger(table, slots, links or LinkCost.of(None, p), rows or RowBytes.of(), cap, overlap_s)
    load, mean = ledger.load, ledger.mean
    for _ in range(50 * p + 100):
        src = int(np.argmax(load))
        if load[src] <= (1 + epsilon) * mean:
            break
        chosen = ledger.choose(src)
        if chosen is None:
            break
        best, u, want = chosen
        for _attempt in range(2):
            work = table.t_time[best]
            if work <= want + epsilon * mean:  # fits: move it whole
                ledger.charge(best, u)
                table.move(best, u)
                load[src] -= work
                load[u] += work
                break
            if table.is_pair(best):  # overshoots: its halves may fit
                table.split_pair(best)
                break
            x = table.split_point(best, want)  # the head moves: it needs fewer keys than the tail
            if x is not None:
                tail_change, head_time = table.cut(best, x, u)
                ledger.charge(table.n_task - 1, u)
                load[src] += tail_change
                load[u] += head_time
                break
            # u's room is below one query's cost: the least loaded rank takes the task or its head
            u = int(np.argmin(load))
            want = min(load[src] - mean, mean - load[u])
        else:
            break
    return table.segments()
