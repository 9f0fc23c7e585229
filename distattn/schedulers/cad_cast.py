"""Routes of CAD's rows over nodes: group-cast of K/V down a tree of nodes, group-reduce back up it,
and Q through the owner's node peers (MagiAttention's group-cast/group-reduce, NCCL's PXN).

A slot computing tasks needs their query rows and the union of their key rows
(:mod:`distattn.schedulers.cad`). Sent straight from their owners, a long document whose queries
run on many nodes has its key prefix sent by the same owners once per destination *slot*, and
their query rows leave through one network card. Here:

* **K/V, group-cast.** A key row crosses the inter-node fabric once per destination *node*. Slots
  of the owner's node get it straight from the owner (NVLink). The other nodes needing rows of an
  owner form an ``f``-ary tree rooted at the owner's node (``FANOUT``; the owner hands each first
  copy to another slot of its node, which sends it on its own network card; the nodes needing the most rows
  nearest the root): each node's *relay* -- the node's slots in turn, so that the many trees
  through one node spread over its network cards -- receives what its whole subtree needs from its
  parent, forwards each child node's part to the child's relay and, over NVLink, each slot of its
  node its rows. A slot sends at most
  ``f`` inter-node copies of any row, and a tree of ``m`` nodes is ``log_f m`` hops deep.
* **dK/dV, group-reduce.** Backward runs the K/V legs in reverse: each slot returns its partial
  gradients to whoever sent it the rows, a relay sums its node's and its subtree's partials with
  its own before passing one partial per row up, and the owner sums what comes back.
* **Q, PXN.** A query row bound for another node goes first over NVLink to the slot of its owner's
  node with the destination's local index, which sends it over that index's rail: an owner whose
  queries leave spreads them over its node's network cards. out, dout and dQ take the same path.

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

from ..layout import Shards

FANOUT = 2   # child nodes per node of a K/V tree: inter-node copies a slot sends of a row


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
    """Legs delivering queries ``[a[i], b[i])`` to slot ``comp[i]``: straight from their owner on its
    own node or its destination's rail, else through the owner's node peer on that rail (PXN)."""
    i, run, s, e = slots.cut(a, b)
    owner, dest = slots.owner[run], np.asarray(comp, dtype=np.int64)[i]
    via = np.where(nodes.same(owner, dest), owner, nodes.peer(owner, nodes.local(dest)))
    straight = via == owner
    return Legs.of(np.concatenate([np.ones(straight.sum()), np.ones((~straight).sum()), np.full((~straight).sum(), 2)]),
                   np.concatenate([owner[straight], owner[~straight], via[~straight]]),
                   np.concatenate([dest[straight], via[~straight], dest[~straight]]),
                   np.concatenate([s[straight], s[~straight], s[~straight]]),
                   np.concatenate([e[straight], e[~straight], e[~straight]]))


def key_legs(comp: np.ndarray, a: np.ndarray, b: np.ndarray, slots: Shards, nodes: Nodes,
             fanout: int = FANOUT) -> Legs:
    """Legs delivering keys ``[a[i], b[i])`` to slot ``comp[i]`` (each slot's intervals disjoint) by
    group-cast down a tree of nodes per owner (module docstring)."""
    i, run, s, e = slots.cut(a, b)
    owner, dest = slots.owner[run], np.asarray(comp, dtype=np.int64)[i]
    node = nodes.dense
    near = node[owner] == node[dest]
    legs = [(np.ones(near.sum(), dtype=np.int64), owner[near], dest[near], s[near], e[near])]
    owner, dest, s, e = owner[~near], dest[~near], s[~near], e[~near]
    if owner.size:
        legs += _tree_legs(owner, dest, s, e, nodes, slots.total + 1, fanout)
    return Legs.of(*(np.concatenate([leg[n] for leg in legs]) for n in range(5)))


def _tree_legs(owner, dest, s, e, nodes: Nodes, span: int, fanout: int) -> list[tuple]:
    """The legs of the remote pieces ``(owner, dest, s, e)``: one tree of nodes per owner, its
    first copies sent by the owner's node peers (hop 1 hands them the rows over NVLink)."""
    node, n_nodes, peer = nodes.dense, nodes.count, nodes.peer
    # groups: (owner, destination node); a group's rows, merged, offset so groups stay apart
    group_of = owner * n_nodes + node[dest]
    groups, g = np.unique(group_of, return_inverse=True)
    g_owner, g_node = groups // n_nodes, groups % n_nodes
    # rows per (group, destination slot)
    p = len(node)
    pair, inverse = np.unique(g * p + dest, return_inverse=True)
    pair_rows = np.bincount(inverse, e - s, minlength=len(pair))
    pair_group, pair_slot = pair // p, pair % p
    rows = np.bincount(pair_group, pair_rows, minlength=len(groups))
    one_dest = pair_slot[np.searchsorted(pair_group, np.arange(len(groups)))]   # a destination of each group
    # each owner's groups in a heap: most rows first, position 1.. (0 is the owner), parent (i-1)//f
    order = np.lexsort((g_node, -rows, g_owner))
    start = np.searchsorted(g_owner[order], g_owner[order], side="left")   # the owner's first, in order
    rank_in = np.empty(len(groups), dtype=np.int64)
    rank_in[order] = np.arange(len(groups))
    pos = rank_in - start[rank_in] + 1
    parent_pos = (pos - 1) // fanout
    parent = np.where(parent_pos >= 1, order[np.minimum(start[rank_in] + parent_pos - 1, len(groups) - 1)], -1)
    # the relay: the node's slots in turn, largest groups first, so that what crosses to a node --
    # a long document's whole key prefix, for the slot computing its last queries -- spreads over
    # the node's network cards (the hop inside the node is NVLink's)
    by_node = np.lexsort((-rows, g_node))
    turn = np.empty(len(groups), dtype=np.int64)
    turn[by_node] = np.arange(len(groups)) - np.searchsorted(g_node[by_node], g_node[by_node])
    size = nodes.size(one_dest)
    snake = np.where((turn // size) % 2 == 0, turn % size, size - 1 - turn % size)   # 0..g-1, g-1..0, ...
    relay = peer(one_dest, snake)
    depth = np.ones(len(groups), dtype=np.int64)
    for _ in range(64):                                          # depth = parent's depth + 1
        new = np.where(parent >= 0, depth[np.maximum(parent, 0)] + 1, 1)
        if np.array_equal(new, depth):
            break
        depth = new
    # what each group's relay receives: the union of its subtree's rows, deepest groups first
    own0, own1 = merge_intervals(g * span + s, g * span + e)
    sub0, sub1 = own0, own1
    for level in range(int(depth.max()), 1, -1):
        child = depth[sub0 // span] == level
        moved = parent[sub0[child] // span] - sub0[child] // span   # shift into the parent's band
        sub0, sub1 = merge_intervals(np.concatenate([sub0, sub0[child] + moved * span]),
                                     np.concatenate([sub1, sub1[child] + moved * span]))
    # the owner's node peers send its copies (child k by the peer k + 1 places along), so that an
    # owner of a long document does not send them all through its own network card
    first_peer = peer(g_owner, nodes.local(g_owner) + pos)
    sg = sub0 // span
    root = parent[sg] < 0
    sender = np.where(root, first_peer[sg], relay[np.maximum(parent[sg], 0)])
    lo, hi = sub0 - sg * span, sub1 - sg * span
    # (to itself when the node has no other slot: a later hop sends only rows an earlier one brought)
    to_peers = (np.ones(root.sum(), dtype=np.int64), g_owner[sg][root], first_peer[sg][root], lo[root], hi[root])
    down = (depth[sg] + 1, sender, relay[sg], lo, hi)
    # inside the node: the relay forwards each other slot its rows
    fan = dest != relay[g]
    inside = (depth[g][fan] + 2, relay[g][fan], dest[fan], s[fan], e[fan])
    return [to_peers, down, inside]


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


def index_runs(starts: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """Rows ``starts[i] .. starts[i] + lens[i] - 1``, concatenated."""
    lens = np.asarray(lens, dtype=np.int64)
    if lens.size == 0:
        return np.zeros(0, np.int64)
    which = np.repeat(np.arange(len(lens)), lens)
    return np.asarray(starts, dtype=np.int64)[which] + np.arange(len(which)) - np.repeat(np.cumsum(lens) - lens, lens)
