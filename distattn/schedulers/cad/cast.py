"""Routes of CAD's rows over nodes: group-cast of K/V down a tree of nodes, group-reduce back up it,
and Q over every rail (MagiAttention's group-cast/group-reduce; rail-aligned like NCCL's PXN).

A slot computing tasks needs their query rows and the union of their key rows
(:mod:`distattn.schedulers.cad`). Sent straight from their owners, a long document whose queries
run on many nodes has its key prefix sent by the same owners once per destination *slot*, and
their query rows leave through one network card. Here an owner's rows are cut into *shares*, one
per slot of a node (:meth:`~distattn.planning.layout.Shards.quantiles`); share ``j`` crosses between nodes
only from a slot of local index ``j`` to a slot of local index ``j`` (its *rail*), so what one
owner sends, or one slot needs, spreads over all network cards of both nodes:

* **K/V, group-cast.** A key row crosses the inter-node fabric once per destination *node*. Slots
  of the owner's node get it straight from the owner (NVLink). The other nodes needing
  overlapping rows of an owner (a document's causal prefixes: a *cluster*) form a tree rooted at
  the owner's node, at most ``f`` children a node (:func:`tree_fanout`): the nodes needing the most rows
  join first (of those needing as many, the ones sending most keys of their own: they receive in
  the hop they send in), each under the node of the tree that moves the fewest rows across nodes
  so far, the owner's node counting its first copy of every tree (:func:`_parents`; hop 1 hands
  each share to its rail's slot of the owner's node, the shares weighing a row by the nodes it
  goes to, :func:`covered_quantiles`). In each node, the slot of a share's rail receives what the node's whole subtree
  needs of it from the parent node's slot of that rail, forwards each child node its part, and
  over NVLink each slot of its node its rows. A slot sends at most ``f`` inter-node copies of any
  row, and a tree of ``m`` nodes is at most ``log_f m + 1`` hops deep.
* **dK/dV, group-reduce.** Backward runs the K/V legs in reverse: each slot returns its partial
  gradients to whoever sent it the rows, a relay sums its node's and its subtree's partials with
  its own before passing one partial per row up, and the owner sums what comes back.
* **Q, over the rails.** A query row goes to one slot, so its tree is flat: share ``j`` of the
  rows an owner sends to another node goes over NVLink to its node's slot ``j``, across to the
  destination node's slot ``j`` and over NVLink to the destination -- the rows one owner or one
  destination moves spread over all network cards of both nodes. out, dout and dQ take the same path.

Every transfer is a *leg* ``(hop, src, dst, start, end)``: rows ``[start, end)`` of the global token
space move from slot ``src`` to slot ``dst`` in hop ``1, 2, ...`` (one all-to-all per hop). Hop 1
sends the sender's own rows (to itself too: the rows a slot computes on); a later hop forwards
rows the sender received in an earlier one. The same legs give the dry schedule's bytes and a
live slot's routes.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from ...planning.layout import Shards, index_runs

DEPTH = 3   # levels of a K/V tree below the owner's node (tree_fanout)


def tree_fanout(nodes: int) -> int:
    """Child nodes per node of the K/V trees over ``nodes`` nodes: the fewest (at least 2) whose trees
    reach every node within :data:`DEPTH` levels. Each child is an inter-node copy its parent sends
    of a row -- fewer children, fewer bytes on the busiest links -- but each level is one more hop,
    an all-to-all the next one waits for (:meth:`TaskSchedule.program
    <distattn.schedulers.cad.TaskSchedule.program>` chains them) with its own latency: measured,
    binary trees 7 levels deep over 64 nodes left 0.36 s of a Llama-3 8B step on 512 H100s at 512K
    (ProLong; ``distattn simulate``) to communication, 4 children 0.13 s, at most 7% more inter-node
    bytes on the busiest rank (ProLong and WLB lengths, 64-4096 ranks, seeds 0-2:
    ``python -m distattn.bench.cad_balance``)."""
    f = 2
    while sum(f ** d for d in range(1, DEPTH + 1)) < nodes - 1:
        f += 1
    return f


@dataclass(frozen=True, eq=False)
class Nodes:
    """The node of every slot (any ids; dense numbers ``0..N-1`` in :attr:`dense`)."""

    of: np.ndarray

    @staticmethod
    def even(slots: int, gpus_per_node: int) -> "Nodes":
        """Slot ``i`` on node ``i // gpus_per_node`` (a dry pool, or a mesh whose ranks fill nodes in order)."""
        return Nodes(np.arange(slots, dtype=np.int64) // max(1, gpus_per_node))

    @cached_property
    def _layout(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        _, node = np.unique(self.of, return_inverse=True)
        node = node.astype(np.int64)
        order = np.lexsort((np.arange(len(node)), node))             # slots node by node
        size = np.bincount(node)
        first = np.concatenate([[0], np.cumsum(size)[:-1]])
        local = np.empty(len(node), dtype=np.int64)
        local[order] = np.arange(len(node)) - first[node[order]]
        return node, order.astype(np.int64), first, size, local

    @property
    def dense(self) -> np.ndarray:
        return self._layout[0]

    @property
    def count(self) -> int:
        return len(self._layout[2])

    def same(self, a, b) -> np.ndarray:
        return self.dense[np.asarray(a)] == self.dense[np.asarray(b)]

    def peer(self, slot, local) -> np.ndarray:
        """The slot of ``slot``'s node with local index ``local`` (modulo the node's size)."""
        node, order, first, size, _ = self._layout
        n = node[np.asarray(slot, dtype=np.int64)]
        return order[first[n] + np.asarray(local, dtype=np.int64) % size[n]]

    def size(self, slot) -> np.ndarray:
        """Slots on ``slot``'s node."""
        return self._layout[3][self.dense[np.asarray(slot, dtype=np.int64)]]

    def local(self, slot) -> np.ndarray:
        return self._layout[4][np.asarray(slot, dtype=np.int64)]


@dataclass(frozen=True, eq=False)
class Legs:
    """Rows ``[start, end)`` moving from ``src`` to ``dst`` in ``hop`` (module docstring), sorted by
    ``(hop, src, dst, start)``."""

    hop: np.ndarray
    src: np.ndarray
    dst: np.ndarray
    start: np.ndarray
    end: np.ndarray

    @staticmethod
    def of(hop, src, dst, start, end) -> "Legs":
        """The legs, the rows of one ``(hop, src, dst)`` merged (a row moves once per pair and hop)."""
        hop, src, dst, start, end = (np.asarray(x, dtype=np.int64) for x in (hop, src, dst, start, end))
        p = int(max(src.max(initial=0), dst.max(initial=0))) + 1
        span = int(end.max(initial=0)) + 1
        key = (hop * p + src) * p + dst
        m0, m1 = merge_intervals(key * span + start, key * span + end)   # sorted by (hop, src, dst, start)
        key = m0 // span
        return Legs(key // (p * p), key // p % p, key % p, m0 - key * span, m1 - key * span)

    @property
    def rows(self) -> np.ndarray:
        return self.end - self.start

    @property
    def hops(self) -> int:
        return int(self.hop.max(initial=1))

    def pairs(self, hop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(src, dst, rows)`` per pair that moves rows in ``hop`` (the diagonal included)."""
        at = self.hop == hop
        p = int(max(self.src.max(initial=0), self.dst.max(initial=0))) + 1
        keys, inverse = np.unique(self.src[at] * p + self.dst[at], return_inverse=True)
        return keys // p, keys % p, np.bincount(inverse, self.rows[at], minlength=len(keys)).astype(np.int64)

    def per_peer(self, hop: int, slot: int, slots: int, sending: bool) -> tuple[np.ndarray, ...]:
        """Per slot ``c``: the global tokens ``slot`` sends to ``c`` (``sending``) or receives from it
        in ``hop``, in global order."""
        at = (self.hop == hop) & ((self.src if sending else self.dst) == slot)
        peer = (self.dst if sending else self.src)[at]    # ascending: the legs' sort order
        tokens = index_runs(self.start[at], self.rows[at])
        cuts = np.cumsum(np.bincount(peer, self.rows[at], minlength=slots).astype(np.int64))[:-1]
        return tuple(np.split(tokens, cuts))


def query_legs(comp: np.ndarray, a: np.ndarray, b: np.ndarray, slots: Shards, nodes: Nodes) -> Legs:
    """Legs delivering queries ``[a[i], b[i])`` to slot ``comp[i]``: straight inside a node, else
    share by share over the rails (every destination node a child of the owner's: no relaying)."""
    return key_legs(comp, a, b, slots, nodes, fanout=nodes.count)


def key_legs(comp: np.ndarray, a: np.ndarray, b: np.ndarray, slots: Shards, nodes: Nodes,
             fanout: int | None = None, load: np.ndarray | None = None) -> Legs:
    """Legs delivering keys ``[a[i], b[i])`` to slot ``comp[i]`` (each slot's intervals disjoint) by
    group-cast down a tree of nodes per owner (module docstring), ``fanout`` children a node (default
    :func:`tree_fanout`). ``load``: per node, the rows it already moves across nodes (in key rows;
    default none), which the trees' relays add to."""
    fanout = tree_fanout(nodes.count) if fanout is None else fanout
    i, run, s, e = slots.cut(a, b)
    owner, dest = slots.owner[run], np.asarray(comp, dtype=np.int64)[i]
    node = nodes.dense
    near = node[owner] == node[dest]
    legs = [(np.ones(near.sum(), dtype=np.int64), owner[near], dest[near], s[near], e[near])]
    owner, dest, s, e = owner[~near], dest[~near], s[~near], e[~near]
    if owner.size:
        legs += _tree_legs(owner, dest, s, e, nodes, slots, fanout, load)
    return Legs.of(*(np.concatenate([leg[n] for leg in legs]) for n in range(5)))


def _tree_legs(owner, dest, s, e, nodes: Nodes, slots: Shards, fanout: int, load) -> list[tuple]:
    """The legs of the remote pieces ``(owner, dest, s, e)``: trees of nodes per owner; share
    ``j`` of an owner's rows travels between the nodes' slots of local index ``j`` (hop 1 hands it
    to the owner's node peer ``j`` over NVLink)."""
    node, n_nodes, peer, span = nodes.dense, nodes.count, nodes.peer, slots.total + 1
    # clusters: an owner's rows that overlap between destinations (a document's causal prefixes)
    # form one tree; rows no destination shares with another go in trees of their own (in one
    # tree per owner, a relay received, and sent on, other documents' rows it did not need).
    # Flat (queries): one cluster per owner, whose shares spread all it sends a node
    cluster, c_owner = (_clusters(owner, dest, s, e, len(node), span) if fanout < n_nodes
                        else (owner, np.arange(int(owner.max(initial=-1)) + 1)))
    # groups: (cluster, destination node); a group's rows, merged, offset so groups stay apart
    groups, g = np.unique(cluster * n_nodes + node[dest], return_inverse=True)
    g_tree, g_node = groups // n_nodes, groups % n_nodes
    g_owner = c_owner[g_tree]
    own0, own1 = merge_intervals(g * span + s, g * span + e)
    rows = np.bincount(own0 // span, own1 - own0, minlength=len(groups))   # each group's node receives
    at_node = np.zeros(len(groups), dtype=np.int64)
    at_node[g] = dest                                        # a slot of each group's node
    load = np.zeros(n_nodes) if load is None else np.asarray(load, dtype=np.float64).copy()
    parent = (_parents(g_tree, g_node, rows, node[g_owner], load, fanout) if fanout < n_nodes
              else np.full(len(groups), -1, dtype=np.int64))          # flat: the owner sends each node its rows
    depth, sub0, sub1 = _subtree_rows(parent, own0, own1, span)
    # shares: a long document's whole key prefix, crossing to the node computing its last
    # queries, spreads over all the node's network cards (and the forwarding over all its slots)
    parts = int(nodes.size(np.arange(len(node))).max())
    sub = sub0 // span
    slo, shi = sub0 - sub * span, sub1 - sub * span
    cuts = quantiles(sub, slo, shi, len(groups), parts)      # [group, parts + 1]: of what its node receives
    # an owner's shares weigh a row by the child nodes it goes to, so that every slot of its node
    # sends as much (equal shares of the rows' union left the slots holding a shared prefix's
    # first rows sending it to every child: 6% above the node's mean, measured)
    root = parent[sub] < 0
    owners, out_owner = np.unique(g_owner[sub[root]], return_inverse=True)
    out_cuts = covered_quantiles(out_owner, slo[root], shi[root], len(owners), parts)
    # what each node receives, share by share, from the sending node's slot holding the row's share
    w, share, lo, hi = _shares(slo, shi, cuts[sub])
    sg = sub[w]
    root = parent[sg] < 0
    sending = np.where(root[:, None], out_cuts[np.searchsorted(owners, g_owner[sg])], cuts[np.maximum(parent[sg], 0)])
    w2, by, lo, hi = _shares(lo, hi, sending)
    sg, share, root = sg[w2], share[w2], root[w2]
    sender = peer(np.where(root, g_owner[sg], at_node[np.maximum(parent[sg], 0)]), by)
    # (to itself when it is the owner: a later hop sends only rows an earlier one brought)
    to_peers = (np.ones(root.sum(), dtype=np.int64), g_owner[sg][root], sender[root], lo[root], hi[root])
    down = (depth[sg] + 1, sender, peer(at_node[sg], share), lo, hi)
    # inside the node: each share's slot forwards each other slot its rows
    w, share, lo, hi = _shares(s, e, cuts[g])
    relay, to = peer(at_node[g[w]], share), dest[w]
    fan = to != relay
    inside = (depth[g[w]][fan] + 2, relay[fan], to[fan], lo[fan], hi[fan])
    return [to_peers, down, inside]


def _subtree_rows(parent, own0, own1, span: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per group its depth in its tree (1: a child of the owner's node), and what each group's
    node receives: the union of its subtree's rows (``own0``/``own1``: each group's own rows,
    offset by ``span`` per group; the union as merged intervals, offset the same way)."""
    depth = np.ones(len(parent), dtype=np.int64)
    for _ in range(64):                                          # depth = parent's depth + 1
        new = np.where(parent >= 0, depth[np.maximum(parent, 0)] + 1, 1)
        if np.array_equal(new, depth):
            break
        depth = new
    sub0, sub1 = own0, own1                                      # deepest groups first
    for level in range(int(depth.max()), 1, -1):
        child = depth[sub0 // span] == level
        moved = parent[sub0[child] // span] - sub0[child] // span   # shift into the parent's band
        sub0, sub1 = merge_intervals(np.concatenate([sub0, sub0[child] + moved * span]),
                                     np.concatenate([sub1, sub1[child] + moved * span]))
    return depth, sub0, sub1


def _clusters(owner, dest, s, e, slots: int, span: int) -> tuple[np.ndarray, np.ndarray]:
    """The cluster of each piece ``(owner, dest, s, e)``: a run of an owner's rows that the
    destinations' needs overlap into (one destination's touching pieces merged first); and the
    owner of each cluster."""
    pair = (owner * slots + dest) * span
    p0, p1 = merge_intervals(pair + s, pair + e)
    m_owner = p0 // span // slots
    m0, m1 = m_owner * span + p0 % span, m_owner * span + (p1 - p0 // span * span)
    order = np.argsort(m0, kind="stable")
    reach = np.maximum.accumulate(m1[order])
    cluster = np.empty(len(m0), dtype=np.int64)
    cluster[order] = np.cumsum(np.concatenate([[True], m0[order][1:] >= reach[:-1]])) - 1
    c_owner = np.zeros(int(cluster.max(initial=-1)) + 1, dtype=np.int64)
    c_owner[cluster] = m_owner
    return cluster[np.searchsorted(p0, pair + s, side="right") - 1], c_owner


def _parents(g_tree, g_node, rows, root_node, load, fanout: int) -> np.ndarray:
    """The parent group of each group in its tree (-1: the owner's node). Trees are built
    biggest first; in each, groups needing the most rows first (a causal prefix: a parent needs
    what its children need), each under the node of the tree so far that moves the fewest rows
    across nodes (``load`` -- its query rows, given -- plus every node's own key rows in, plus the
    copies sent so far), at most ``fanout`` children per node, at most one level deeper than a
    ``fanout``-ary heap. A relay receives a key prefix once and sends it up to ``fanout`` times:
    picked blindly (in a heap the node needing a long document's whole prefix tops the tree of
    every owner of it), relays were the busiest links."""
    parent = np.full(len(g_tree), -1, dtype=np.int64)
    np.add.at(load, g_node, rows)          # every node receives its rows, whatever the trees
    order = np.lexsort((g_node, -rows, g_tree))
    trees = np.split(order, np.flatnonzero(np.diff(g_tree[order])) + 1)
    # ... and every owner's node sends each tree's rows once (its first child needs the most):
    # counted as trees are built, an owner whose later trees were not built yet looked idle
    # beside its receivers, and took a second child, sending its rows twice
    firsts = np.asarray([tree[0] for tree in trees], dtype=np.int64)
    sends = np.bincount(root_node[firsts], rows[firsts], minlength=len(load))
    load += sends
    # of the nodes needing as many rows, those sending most come first, straight from the owner:
    # rows a node receives in the hop it sends its own in cost it nothing (an all-to-all waits for
    # the larger way); one hop later, they did (a node exporting a document's tail, keeping rows
    # that need the keys of the node before it)
    order = np.lexsort((g_node, -sends[g_node], -rows, g_tree))
    trees = np.split(order, np.flatnonzero(np.diff(g_tree[order])) + 1)
    for tree in sorted(trees, key=lambda tr: -int(rows[tr].sum())):
        cap = int(np.ceil(np.log(len(tree) + 1) / np.log(fanout))) + 1 if fanout > 1 else len(tree)
        at, group, kids, depth = [int(root_node[tree[0]])], [-1], [0], [0]
        for g in tree.tolist():
            free = [i for i in range(len(at)) if kids[i] < fanout and depth[i] < cap] or [0]
            best = min(free, key=lambda i: (load[at[i]], i))
            parent[g] = group[best]
            if best or kids[0]:          # beyond the owner's first copy
                load[at[best]] += rows[g]
            kids[best] += 1
            at.append(int(g_node[g]))
            group.append(g)
            kids.append(0)
            depth.append(depth[best] + 1)
    return parent


def quantiles(group, lo, hi, groups: int, parts: int) -> np.ndarray:
    """``[groups, parts + 1]``: where each group's ``j``-th of ``parts`` equal shares of its rows
    begins (column ``parts``: its last row + 1), its rows being the disjoint intervals ``[lo, hi)``
    sorted by ``(group, lo)``."""
    length = hi - lo
    reach = np.cumsum(length)
    before = reach - length
    total = np.bincount(group, length, minlength=groups).astype(np.int64)
    base = np.zeros(groups, dtype=np.int64)
    has = total > 0
    base[has] = before[np.searchsorted(group, np.nonzero(has)[0])]
    want = base[:, None] + (np.arange(parts + 1)[None, :] * total[:, None]) // parts
    inner = np.minimum(want, base[:, None] + np.maximum(total[:, None] - 1, 0))
    j = np.minimum(np.searchsorted(reach, inner, side="right"), max(len(lo) - 1, 0))
    if len(lo) == 0:
        return np.zeros((groups, parts + 1), dtype=np.int64)
    pos = lo[j] + inner - before[j] + (want > inner)
    return np.where(has[:, None], pos, 0)


def covered_quantiles(group, lo, hi, groups: int, parts: int) -> np.ndarray:
    """Like :func:`quantiles`, for intervals ``[lo, hi)`` that may overlap: a row weighs as many
    of its group's intervals as cover it, and the shares carry equal weight."""
    if len(lo) == 0:
        return np.zeros((groups, parts + 1), dtype=np.int64)
    group = np.asarray(group, dtype=np.int64)
    g = np.concatenate([group, group])
    pos = np.concatenate([lo, hi]).astype(np.int64)
    step = np.concatenate([np.ones(len(lo)), -np.ones(len(lo))])
    order = np.lexsort((-step, pos, g))       # at one position, intervals open before others close
    g, pos, cover = g[order], pos[order], np.cumsum(step[order])   # each group's steps sum to 0
    # segment i: rows [pos[i], pos[i + 1]) covered cover[i] times (within one group)
    inside = g[:-1] == g[1:]
    weight = np.where(inside, (pos[1:] - pos[:-1]) * cover[:-1], 0)
    reach = np.cumsum(weight)
    before = reach - weight
    total = np.bincount(g[:-1], weight, minlength=groups)
    first = np.searchsorted(g, np.arange(groups))                 # each group's first step
    last = np.searchsorted(g, np.arange(groups), side="right") - 1
    want = before[np.minimum(first, len(before) - 1)][:, None] + total[:, None] * np.arange(parts + 1) / parts
    k = np.minimum(np.searchsorted(reach, want, side="right"), np.maximum(last - 1, first)[:, None])
    cuts = pos[k] + np.ceil((want - before[k]) / np.maximum(cover[k], 1)).astype(np.int64)
    has = first <= last
    cuts[:, 0] = pos[np.minimum(first, len(pos) - 1)]
    cuts[:, -1] = pos[np.maximum(last, 0)]
    cuts = np.maximum.accumulate(np.minimum(cuts, cuts[:, -1:]), axis=1)
    return np.where(has[:, None], cuts, 0)


def _shares(lo, hi, cuts) -> tuple[np.ndarray, ...]:
    """Intervals ``[lo[i], hi[i])`` cut where the shares of ``cuts[i]`` begin (see
    :func:`quantiles`): ``(i, share, lo, hi)`` per non-empty piece."""
    inner = cuts[:, 1:-1]
    first = (inner <= lo[:, None]).sum(1)
    last = (inner <= (hi - 1)[:, None]).sum(1)
    which = np.repeat(np.arange(len(lo)), last - first + 1)
    share = index_runs(first, last - first + 1)
    a = np.maximum(lo[which], cuts[which, share])
    b = np.minimum(hi[which], cuts[which, share + 1])
    keep = b > a
    return which[keep], share[keep], a[keep], b[keep]


def merge_intervals(a0: np.ndarray, a1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The union of intervals ``[a0, a1)`` as sorted disjoint intervals."""
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
