"""CAD placement's books (:mod:`.placement`): what a moved row costs, and per rank its load and the
bytes it sends and receives.

* :class:`LinkCost`: seconds per byte inside a node and across nodes (from
  :class:`~distattn.costmodel.network.NetworkProfile`); :class:`RowBytes`: the bytes of one moved query or
  key row over forward and backward.
* :class:`Ledger`: the loads, the weighted bytes and network seconds in and out per rank, and the
  keys each rank and each node already receive per document. It prices a move's new key rows and
  network seconds as :mod:`.cast` will move them, and books a move once it is made.

Egress is charged to the ranks that send the rows (K/V owners, or the slots forwarding a share,
not the rank giving the task away), ingress to the destination and, for rows crossing nodes, to
every slot of the destination's node. For windowed documents the keys a destination holds are
tracked as one hull, a slight underestimate of the bytes of later moves.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...planning.layout import Shards
from ...costmodel.network import NetworkProfile, default_profile
from ...planning.wire import Wire
from .cast import Nodes, tree_fanout
from .planner import TaskTable, _ranges


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

    q: float       # Q and out as they travel, dQ back (input dtype); keep: dout; resend: Q, out, dout, lse again
    kv: float      # K and V out (as they travel), dK and dV back (fp32); resend: K and V again

    @staticmethod
    def of(num_heads: int = 32, num_kv_heads: int = 8, head_dim: int = 128, dtype_bytes: int = 2,
           comm_fp8: bool = False, resend: bool = True) -> "RowBytes":
        """``comm_fp8``: Q, K, V, out and dout travel as FP8 with a scale per token and head
        (``comm_dtype="fp8"``: :mod:`distattn.planning.wire`). ``resend``: the backward sends the worker its
        rows again (``TaskSchedule.backward``), else only dout."""
        acc = max(4, dtype_bytes)
        wire = Wire(comm_fp8).row_bytes((head_dim,), dtype_bytes)
        if resend:   # forward Q, out, lse back; backward Q, out, dout, lse; dQ back
            return RowBytes(num_heads * (5 * wire + head_dim * dtype_bytes + 2 * acc),
                            2 * num_kv_heads * (2 * wire + head_dim * acc))
        return RowBytes(num_heads * (3 * wire + head_dim * dtype_bytes), 2 * num_kv_heads * (wire + head_dim * acc))


class Ledger:
    """Loads, bytes in and out per rank, and the keys each rank and each node already receive per document."""

    def __init__(self, table: TaskTable, slots: Shards, links: LinkCost, rows: RowBytes, cap: float,
                 overlap_s: float | None, nodes: Nodes):
        p = slots.world_size
        self.table, self.slots, self.links, self.rows, self.nodes = table, slots, links, rows, nodes
        self.fanout = tree_fanout(nodes.count)   # the K/V trees' (.cast): moves priced as they run
        self.load = table.load(p)
        self.node = nodes.dense
        self.members = [np.nonzero(self.node == n)[0] for n in range(nodes.count)]
        self.size = np.bincount(self.node, None, nodes.count).astype(np.float64)
        self.node_slots = slots.regroup(self.node, nodes.count)   # the tokens each node holds
        # caps weigh a byte by its link's time: NVLink bytes count intra/inter of an inter-node byte
        self.w_intra = links.intra_s_per_byte / links.inter_s_per_byte if nodes.count > 1 else 1.0
        self.egress, self.ingress = np.zeros(p), np.zeros(p)     # weighted bytes per layer, both passes
        self.out_s, self.in_s = np.zeros(p), np.zeros(p)         # ... and their network seconds
        self.overlap_s = overlap_s
        self.tokens = slots.total / p
        self.cap = cap * self.tokens * (rows.q + rows.kv)
        self.held: dict[int, dict[int, tuple[int, int]]] = {}        # doc -> rank -> key hull it receives
        self.node_held: dict[int, dict[int, tuple[int, int]]] = {}   # doc -> node -> key hull crossing to it
        self.node_relay: dict[int, dict[int, int]] = {}              # doc -> node -> its first receiving rank

    @property
    def mean(self) -> float:
        """The mean load now: a cut adds the fixed cost of a piece's own CTAs, so the total grows as
        placement cuts (a tile model's; a roofline's stays)."""
        return float(self.load.mean())

    def owner(self, x) -> np.ndarray:
        return self.slots.owner_of(x)

    def node_load(self) -> np.ndarray:
        return np.bincount(self.node, self.load, self.nodes.count)

    def holders(self, docs: np.ndarray) -> np.ndarray:
        """The ranks holding rows of documents ``docs`` (a rank once per run it holds)."""
        docs = np.asarray(docs)
        runs = np.searchsorted(self.slots.bounds, np.stack([self.table.ds[docs], self.table.de[docs] - 1]),
                               side="right") - 1
        return self.slots.owner[_ranges(runs[0], runs[1] - runs[0] + 1)[1]]

    def _hulls(self, tasks: np.ndarray, held: dict, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``[tasks, cols]`` key hulls already received, per task's document and column key."""
        t = self.table
        h0 = np.zeros((len(tasks), len(cols)), dtype=np.int64)
        h1 = np.zeros_like(h0)
        col = {}
        for j, u in enumerate(cols.tolist()):
            col.setdefault(u, []).append(j)
        for i, task in enumerate(tasks.tolist()):
            for u, (a, b) in held.get(int(t.doc[task]), {}).items():
                for j in col.get(u, ()):
                    h0[i, j], h1[i, j] = a, b
        return h0, h1

    def new_keys(self, tasks: np.ndarray, dests: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``[tasks, dests]``: key rows each task needs at each destination that it neither owns nor
        receives, and of those the rows its node neither holds nor receives (they cross nodes)."""
        t = self.table
        k0, k1 = t.t_k0[tasks][:, None], t.t_k1[tasks][:, None]

        def missing(shards, who, hulls):
            h0, h1 = hulls
            a, b = np.maximum(k0, h0), np.minimum(k1, h1)
            below = shards.held_before(who[None, None, :], np.stack(np.broadcast_arrays(k1, k0, b, a)))
            owned = below[0] - below[1]
            both = np.maximum(below[2] - below[3], 0) * (b > a)
            return (k1 - k0) - owned - np.maximum(b - a, 0) + both
        rank_new = missing(self.slots, dests, self._hulls(tasks, self.held, dests))
        node = self.node[dests]
        node_new = missing(self.node_slots, node, self._hulls(tasks, self.node_held, node))
        return rank_new, np.minimum(node_new, rank_new)

    def move_seconds(self, q_seconds, rank_new, node_new):
        """Network seconds of a move: its query rows' ``q_seconds`` plus the new key rows, those new
        to the destination's node crossing nodes and the rest arriving over NVLink."""
        links, kv = self.links, self.rows.kv
        return q_seconds + (rank_new - node_new) * kv * links.intra_s_per_byte + node_new * kv * links.inter_s_per_byte

    def tree_sender(self, d: int, owner: int, node: int | None = None) -> int:
        """Who sends ``node`` (default: the next node to receive them) its copy of document ``d``'s
        keys: the owner for the first ``fanout`` nodes, then the relay of the node's parent in a
        ``fanout``-ary tree of the nodes in the order they joined (:mod:`.cast`)."""
        nodes = list(self.node_held.get(d, {}))
        at = nodes.index(node) if node in nodes else len(nodes)
        parent = at // self.fanout
        return owner if parent == 0 else self.node_relay[d][nodes[parent - 1]]

    def per_byte(self, src, dests) -> np.ndarray:
        same = self.node[dests] == self.node[src]
        return np.where(same, self.links.intra_s_per_byte, self.links.inter_s_per_byte)

    def weight(self, src, dests) -> np.ndarray:
        return np.where(self.node[dests] == self.node[src], self.w_intra, 1.0)

    def busy(self, ranks, more_out_s, more_in_s, more_work_s) -> np.ndarray:
        """Seconds per layer ``ranks`` spend on attention and on transfers nothing hides, after
        sending ``more_out_s`` and receiving ``more_in_s`` more and computing ``more_work_s`` more:
        transfers hide behind ``overlap_s`` plus the rank's attention, forward and backward (its load)."""
        work = self.load[ranks] + more_work_s
        wire = np.maximum(self.out_s[ranks] + more_out_s, self.in_s[ranks] + more_in_s)
        return work + np.maximum(wire - self.overlap_s - work, 0)

    def node_busy(self, node: int, more_out_s: float, more_in_s: float, more_work_s: float) -> float:
        """:meth:`busy` of ``node``'s mean rank, the node sending ``more_out_s``, receiving
        ``more_in_s`` and computing ``more_work_s`` more, spread over its ranks."""
        at = self.members[node]
        k = len(at)
        work = self.load[at].mean() + more_work_s / k
        wire = max(self.out_s[at].mean() + more_out_s / k, self.in_s[at].mean() + more_in_s / k)
        return work + max(wire - self.overlap_s - work, 0)

    def charge(self, task: int, u: int) -> None:
        """Book the bytes of ``task`` moving to ``u`` (before the move: its queries' owner sends them)."""
        t = self.table
        d = int(t.doc[task])
        q_owner = int(self.owner(t.q0[task]))
        if self.node[q_owner] == self.node[u]:
            self._book(q_owner, u, float(t.t_q[task]) * self.rows.q)
        else:
            self._cast(q_owner, u, float(t.t_q[task]) * self.rows.q, 0.0)
        k0, k1 = int(t.t_k0[task]), int(t.t_k1[task])
        held = self.held.setdefault(d, {})
        h0, h1 = held.get(u, (k0, k0))
        for a, b in ((k0, min(k1, h0)), (max(k0, h1), k1)):   # keys outside what u already receives
            if b > a:
                self._send_keys(d, a, b, u)
        held[u] = (min(h0, k0), max(h1, k1))

    def _send_keys(self, d: int, a: int, b: int, u: int) -> None:
        """Book keys ``[a, b)`` of document ``d`` to ``u`` from the ranks holding them (``u``'s own
        keys stay): from a rank of ``u``'s node, from the node's relays for keys already crossing to
        it, else one inter-node copy from the tree's sending node (:meth:`tree_sender`)."""
        node = int(self.node[u])
        nodes = self.node_held.setdefault(d, {})
        self.node_relay.setdefault(d, {}).setdefault(node, u)
        n0, n1 = nodes.get(node, (a, a))
        _, run, start, end = self.slots.cut(a, b)
        for r, s, e in zip(self.slots.owner[run].tolist(), start.tolist(), end.tolist()):
            if r == u:
                continue
            if self.node[r] == node:
                self._book(r, u, (e - s) * self.rows.kv)
                continue
            near = max(min(e, n1) - max(s, n0), 0)
            self._cast(self.tree_sender(d, r, node), u, (e - s - near) * self.rows.kv, near * self.rows.kv)
        nodes[node] = (min(n0, a), max(n1, b))

    def _book(self, sender: int, u: int, nbytes: float) -> None:
        """``nbytes`` straight from ``sender`` to ``u``."""
        self.egress[sender] += nbytes * float(self.weight(sender, u))
        self.out_s[sender] += nbytes * float(self.per_byte(sender, u))
        self.ingress[u] += nbytes * float(self.weight(sender, u))
        self.in_s[u] += nbytes * float(self.per_byte(sender, u))

    def _cast(self, sender: int, u: int, far: float, near: float) -> None:
        """``far`` bytes crossing from ``sender``'s node to ``u``'s in equal shares over the slots of
        both nodes, then with ``near`` bytes already on ``u``'s node forwarded to ``u`` by the slots
        holding their shares (NVLink)."""
        src, dst = self.members[self.node[sender]], self.members[self.node[u]]
        inter, intra = self.links.inter_s_per_byte, self.links.intra_s_per_byte
        self.egress[src] += far / len(src)
        self.out_s[src] += far * inter / len(src)
        self.ingress[dst] += far / len(dst)
        self.in_s[dst] += far * inter / len(dst)
        self.egress[dst] += (far + near) * self.w_intra / len(dst)
        self.out_s[dst] += (far + near) * intra / len(dst)
        self.ingress[u] += (far + near) * self.w_intra
        self.in_s[u] += (far + near) * intra
