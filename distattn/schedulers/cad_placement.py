"""CAD placement: which rank computes each attention task, weighing compute saved against bytes moved.

The task table (:class:`~distattn.schedulers.cad_planner.TaskTable`) starts with every task on the
rank owning its queries. With several nodes, two passes come first:

* **Export between nodes** (:mod:`.cad_export`): the nodes holding less than their share even
  their ranks out, then each over-loaded node sheds its excess as the tails of a few documents,
  the fewest bytes by :mod:`.cad_bound`'s bound, to nodes chosen so that none takes many key
  prefixes (with ``overlap_s``, a piece moves only if it pays off, as below).
* **Inside every node**, moves (step 2 below, over NVLink) from its over-loaded to its
  under-loaded ranks, so that only what a node holds above or below its share crosses nodes.

Then, until the most loaded rank is within ``epsilon`` of the mean load:

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
     for the price of their queries. Rows are priced as :mod:`.cad_cast` moves them: inside a
     node at the node's bandwidth; keys that ``u``'s node already receives for another slot at
     NVLink's only (they are forwarded there); keys new to the node as one inter-node copy, sent by
     the owner's node or by the parent node of the document's tree and spread share by share over
     the slots of both nodes (:class:`LinkCost`, from :class:`~distattn.network.NetworkProfile`).

   Moves that would push ``src``'s egress, ``u``'s ingress or the egress of the senders of the
   task's keys above ``cap`` times the bytes of a rank's own rows are left out (if none is left,
   the moves that overshoot least stay in). The move with the lowest cost per gain wins, ties
   to the lowest task and rank; one pricing serves up to ``PICKS`` moves of distinct tasks to
   distinct ranks, each booked before the next is made.

   With ``overlap_s`` (seconds per layer a rank computes besides attention, behind which
   :func:`distattn.pingpong.ping_pong` hides transfers) a move must also pay off: each rank's
   time is its attention plus the transfer time that its ``overlap_s`` and attention do not
   hide, and after the move neither ``src``, ``u`` nor the keys' sender may be as slow as
   ``src`` was before. Among the moves that pay off the one leaving the slowest of them fastest
   wins. If none pays off, placement stops: the step would get slower, not faster.
3. The chosen task moves whole when it fits ``u``; a task that overshoots has its queries cut so
   that the head -- which sees the shorter key prefix -- carries what ``u`` can take, and the
   head moves.

Egress is charged to the ranks that send the rows (K/V owners, or the slots forwarding a share,
not ``src``), ingress to ``u`` and, for rows crossing nodes, to every slot of ``u``'s node.
For windowed documents the keys a destination holds are tracked as one hull, a slight
underestimate of the bytes of later moves.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..network import NetworkProfile, default_profile
from ..layout import Shards
from ..wire import Wire
from .cad_cast import Nodes, tree_fanout
from .cad_export import FILL, export_between_nodes, take
from .cad_planner import Segments, TaskTable, _ranges

SHORTLIST = 16          # least-loaded ranks of the whole pool considered per move
PICKS = 8               # moves made per pricing of a rank's tasks
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

    q: float       # Q and dout out, out back (as they travel), dQ back (input dtype), lse back (fp32)
    kv: float      # K and V out (as they travel), dK and dV back (fp32)

    @staticmethod
    def of(num_heads: int = 32, num_kv_heads: int = 8, head_dim: int = 128, dtype_bytes: int = 2,
           comm_fp8: bool = False) -> "RowBytes":
        """``comm_fp8``: Q, K, V, out and dout travel as FP8 with a scale per token and head
        (``comm_dtype="fp8"``: :mod:`distattn.wire`)."""
        acc = max(4, dtype_bytes)
        wire = Wire(comm_fp8).row_bytes((head_dim,), dtype_bytes)
        return RowBytes(num_heads * (3 * wire + head_dim * dtype_bytes + acc),
                        2 * num_kv_heads * (wire + head_dim * acc))


class _Ledger:
    """Loads, bytes in and out per rank, and the keys each rank and each node already receive per document."""

    def __init__(self, table: TaskTable, slots: Shards, links: LinkCost, rows: RowBytes, cap: float,
                 overlap_s: float | None, nodes: Nodes):
        p = slots.world_size
        self.table, self.slots, self.links, self.rows, self.nodes = table, slots, links, rows, nodes
        self.fanout = tree_fanout(nodes.count)   # the K/V trees' (.cad_cast): moves priced as they run
        self.load = table.load(p)
        self.mean = float(self.load.mean())
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

    def destinations(self, src: int, docs: np.ndarray) -> np.ndarray:
        p = len(self.load)
        pick = np.zeros(p, dtype=bool)
        pick[np.argpartition(self.load, min(SHORTLIST, p - 1))[:SHORTLIST]] = True
        pick[self.node == self.node[src]] = True
        docs = np.unique(docs)
        holders = self.holders(docs)
        pick[holders] = True                                  # ranks holding part of them
        nodes = set(self.node[holders].tolist())
        for d in docs.tolist():
            pick[list(self.held.get(d, ()))] = True          # ranks already receiving their keys
            nodes |= set(self.node_held.get(d, ()))
        pick |= np.isin(self.node, list(nodes))              # ... and their nodes: keys move there over NVLink
        return np.nonzero(pick & (self.load < self.mean))[0]

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

    def choose(self, src: int, dests: np.ndarray | None = None, level: float | None = None) -> list[tuple[int, int]]:
        """The cheapest moves off ``src`` (to ``dests``, default :meth:`destinations`) that bring
        ranks towards ``level`` (default: the mean): ``[(task, destination), ...]`` (none: nothing
        pays off)."""
        t = self.table
        tasks = t.tasks_on(src)
        if tasks.size == 0:
            return []
        if dests is None:
            dests = self.destinations(src, t.doc[tasks])
        if dests.size == 0:
            return []
        level = self.mean if level is None else level
        want = np.minimum(self.load[src] - level, level - self.load[dests])[None, :]
        gain = (1 + BACKWARD) * np.minimum(t.t_time[tasks][:, None], want)
        q_bytes = t.t_q[tasks][:, None] * self.rows.q
        rank_new, node_new = self.new_keys(tasks, dests)
        near_new = rank_new - node_new                  # keys that reach u over NVLink
        per_byte = self.per_byte(src, dests)[None, :]
        w_q = self.weight(src, dests)[None, :]
        links = self.links
        seconds = self.move_seconds(q_bytes * per_byte, rank_new, node_new)
        # weighted bytes in at u: keys new to its node arrive at its slots share by share, then over NVLink
        size = self.nodes.size(dests)[None, :]
        moved = q_bytes * w_q + (near_new * self.w_intra + node_new * (self.w_intra + 1 / size)) * self.rows.kv
        score = seconds / np.maximum(gain, 1e-30)
        # the first and last owners of each task's keys (a causal prefix: the first is the busiest)
        # send at most their own rows of them, once per node
        key_owner = self.owner(t.t_k0[tasks])
        docs = t.doc[tasks]
        key_sender = key_owner.astype(np.int64)   # the owner, until its node has ``fanout`` children
        for i in np.nonzero([len(self.node_held.get(d, ())) >= self.fanout for d in docs.tolist()])[0].tolist():
            key_sender[i] = self.tree_sender(int(docs[i]), int(key_owner[i]))
        key_out = np.maximum(self.egress[key_sender], self.egress[self.owner(t.t_k1[tasks] - 1)])
        key_w = (np.minimum(node_new, self.tokens) + self.w_intra * np.minimum(near_new, self.tokens)) * self.rows.kv
        key_out = key_out[:, None] + key_w
        # the most loaded link a move leaves (src's egress, u's ingress, the keys' sender's egress)
        worst = np.maximum.reduce([self.ingress[dests][None, :] + moved,
                                   np.broadcast_to(self.egress[src] + q_bytes * w_q, moved.shape),
                                   np.where(rank_new == 0, 0, key_out)])
        ok = worst <= self.cap
        if not ok.any():   # nothing fits the caps: the moves that overshoot them least
            ok = worst <= worst.min() * (1 + 1e-9)
        if self.overlap_s is not None:
            # a move pays off if no rank it touches ends up slower than src was (attention plus
            # communication its computation does not hide): the step waits for the slowest rank.
            # Keys crossing to u's node land on its slots share by share (cad_cast): u takes its
            # share of the inter-node time and the NVLink hop
            before = self.busy(np.asarray([src]), 0, 0, 0)
            key_s = seconds - q_bytes * per_byte
            into_u = seconds - node_new * self.rows.kv * links.inter_s_per_byte * (1 - 1 / size) \
                + node_new * self.rows.kv * links.intra_s_per_byte
            src_owns = (key_sender == src)[:, None]   # src sends these keys itself
            after = np.maximum.reduce([
                self.busy(np.asarray([src])[None, :], q_bytes * per_byte + np.where(src_owns, key_s, 0), 0, -gain),
                self.busy(dests[None, :], 0, into_u, gain),
                np.where(src_owns, 0, self.busy(key_sender[:, None], key_s, 0, 0))])
            ok &= after < before
            score = after + 1e-3 * seconds
        score = np.where(ok, score, np.inf)
        # the cheapest moves of distinct tasks to distinct ranks, until they would take off src
        # what it has above the level (later ones are priced on the ledger before the earlier ones:
        # one pricing serves several moves)
        picks, excess = [], self.load[src] - level
        for _ in range(PICKS):
            i, j = np.unravel_index(np.argmin(score), score.shape)
            if not np.isfinite(score[i, j]):  # every move left exposes more communication than it saves
                break
            picks.append((int(tasks[i]), int(dests[j])))
            excess -= min(t.t_time[tasks[i]], want[0, j])
            if excess <= 0:
                break
            score[i, :] = np.inf
            score[:, j] = np.inf
        return picks

    def tree_sender(self, d: int, owner: int, node: int | None = None) -> int:
        """Who sends ``node`` (default: the next node to receive them) its copy of document ``d``'s
        keys: the owner for the first ``fanout`` nodes, then the relay of the node's parent in a
        ``fanout``-ary tree of the nodes in the order they joined (:mod:`.cad_cast`)."""
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
        transfers hide behind ``overlap_s`` plus the rank's attention, forward and backward."""
        work = (1 + BACKWARD) * self.load[ranks] + more_work_s
        wire = np.maximum(self.out_s[ranks] + more_out_s, self.in_s[ranks] + more_in_s)
        return work + np.maximum(wire - self.overlap_s - work, 0)

    def node_busy(self, node: int, more_out_s: float, more_in_s: float, more_work_s: float) -> float:
        """:meth:`busy` of ``node``'s mean rank, the node sending ``more_out_s``, receiving
        ``more_in_s`` and computing ``more_work_s`` more, spread over its ranks."""
        at = self.members[node]
        k = len(at)
        work = (1 + BACKWARD) * (self.load[at].mean() + more_work_s / k)
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


def place_tasks(mask, slots: Shards, cost, epsilon: float = 0.04,
                chunk: int | None = None, links: LinkCost | None = None, rows: RowBytes | None = None,
                cap: float = 2.0, overlap_s: float | None = None, nodes: Nodes | None = None) -> Segments:
    """Build the task table and place its tasks (module docstring) over the ``slots``' tokens. ``cap``: bytes a rank may send
    or receive per layer, in units of a rank's own rows (Q, K and V of its tokens, both passes).
    ``overlap_s``: see :func:`distattn.schedulers.cad.build`."""
    p = slots.world_size
    chunk = chunk or max(128, slots.total // p // 4)
    table = TaskTable(mask, slots, chunk, cost)
    links = links or LinkCost.of(None, p)
    nodes = nodes or Nodes.even(p, links.gpus_per_node)
    ledger = _Ledger(table, slots, links, rows or RowBytes.of(), cap, overlap_s, nodes)
    load, mean = ledger.load, ledger.mean
    if nodes.count > 1:
        # under-loaded nodes even out first, so that each of their ranks has room for what they import
        taking = ledger.node_load() < ledger.size * mean * (1 + FILL * epsilon)
        _balance_inside_nodes(table, ledger, epsilon, taking)
        export_between_nodes(table, ledger, epsilon)
        _balance_inside_nodes(table, ledger, epsilon, np.ones(nodes.count, dtype=bool))
    for _ in range(50 * p + 100):
        src = int(np.argmax(load))
        if load[src] <= (1 + epsilon) * mean or not _drain(table, ledger, src, None, epsilon):
            break
    return table.segments()


def _balance_inside_nodes(table: TaskTable, ledger: _Ledger, epsilon: float, which: np.ndarray) -> None:
    """Move work from the over-loaded to the under-loaded ranks of each node of ``which`` over
    NVLink, so that only a node's own excess or deficit crosses nodes: a node holding more than
    the mean fills its ranks to its own mean."""
    load, mean = ledger.load, ledger.mean
    levels = np.maximum(ledger.node_load() / ledger.size, mean)
    for n in np.nonzero(which)[0].tolist():
        members = ledger.members[n]
        for _ in range(50 * len(members)):
            src = int(members[np.argmax(load[members])])
            if load[src] <= (1 + epsilon) * mean or not _drain(table, ledger, src, members, epsilon, levels[n]):
                break


def _drain(table: TaskTable, ledger: _Ledger, src: int, dests: np.ndarray | None, epsilon: float,
           level: float | None = None) -> bool:
    """Make the cheapest moves off ``src`` to the ranks of ``dests`` below ``level`` (default: the
    mean; ``dests`` None: those :meth:`_Ledger.destinations` offers); False if none pays off or
    fits (placement is stuck: a task's single query row, reading its key prefix, can cost more
    than any rank's room)."""
    load = ledger.load
    level = ledger.mean if level is None else level
    if dests is not None:
        dests = dests[load[dests] < level]
    picks = ledger.choose(src, dests, level) if dests is None or dests.size else []
    moved = False
    for best, u in picks:
        want = min(load[src] - level, level - load[u])
        if want <= 0:
            break
        # a whole task may overshoot u's level, not the tolerance (a task bounced between two
        # ranks of a node filled to its own mean, just under it)
        slack = max((1 + epsilon) * ledger.mean - level, 0.0)
        moved |= _move(table, ledger, load, src, best, u, want, slack, dests, level)
    return moved


def _move(table: TaskTable, ledger: _Ledger, load: np.ndarray, src: int, best: int, u: int, want: float,
          slack: float, dests: np.ndarray | None, level: float) -> bool:
    """Move task ``best`` off ``src`` to ``u`` (room ``want``): whole if it fits (within ``slack``),
    else move the head of its queries; False if neither fits ``u`` nor the least loaded rank of
    ``dests`` (None: of all)."""
    if take(table, ledger, load, best, u, want, slack):
        return True
    # u's room is below one query's cost: the least loaded rank takes the task or its head
    u = int(np.argmin(load)) if dests is None else int(dests[np.argmin(load[dests])])
    return take(table, ledger, load, best, u, min(load[src] - level, level - load[u]), slack) > 0
