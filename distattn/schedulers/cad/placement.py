"""CAD placement: which rank computes each attention task, weighing compute saved against bytes moved.

The task table (:class:`~distattn.schedulers.cad.planner.TaskTable`) starts with every task on the
rank owning its queries, a task's time the cost model's forward plus backward seconds (the kernel's
tile model on the plan's GPU by default: :class:`~distattn.costmodel.cost.TileCost`). With several nodes, a
pass comes first, **export between nodes** (:mod:`.export`): the nodes holding less than their share
even their ranks out by moves inside the node (step 2 below, over NVLink), then each over-loaded
node sheds its excess as the tails of a few documents, the fewest bytes by :mod:`.bound`'s bound,
to nodes chosen so that none takes many key prefixes (with ``overlap_s``, a piece moves only if it
pays off, as below).

Then, until the most loaded rank is within ``epsilon`` of the mean load (the mean now: cutting a
task adds its pieces' fixed costs):

1. ``src`` is the most loaded rank. Its candidate destinations are under-loaded ranks: the
   ``SHORTLIST`` least loaded of all, every under-loaded rank of ``src``'s node, and every
   under-loaded rank that already holds keys of one of ``src``'s documents (it owns some, or
   earlier moves sent it some).
2. For every (task of ``src``, destination ``u``) the planner prices the move:

   * *gain*: the forward + backward attention seconds taken off ``src`` (the task's time by the
     cost model, at most what brings ``src`` or ``u`` to the mean);
   * *cost*: the network seconds of the bytes the move adds: the task's query rows (Q and dout
     out, out, lse and dQ back) and the key rows ``u`` neither owns nor already receives for this
     document (K/V out, fp32 dK/dV back) -- K/V rows go once to each destination however many
     tasks use them, so a destination already holding a document's keys takes its next chunks
     for the price of their queries. Rows are priced as :mod:`.cast` moves them: inside a
     node at the node's bandwidth; keys that ``u``'s node already receives for another slot at
     NVLink's only (they are forwarded there); keys new to the node as one inter-node copy, sent by
     the owner's node or by the parent node of the document's tree and spread share by share over
     the slots of both nodes (:class:`~.ledger.LinkCost`, from :class:`~distattn.costmodel.network.NetworkProfile`).

   Moves that would push ``src``'s egress, ``u``'s ingress or the egress of the senders of the
   task's keys above ``cap`` times the bytes of a rank's own rows are left out (if none is left,
   the moves that overshoot least stay in). The move with the lowest cost per gain wins, ties
   to the lowest task and rank; one pricing serves up to ``PICKS`` moves of distinct tasks to
   distinct ranks, each booked before the next is made.

   With ``overlap_s`` (seconds per layer a rank computes besides attention, behind which
   :func:`distattn.runtime.pingpong.ping_pong` hides transfers) a move must also pay off: each rank's
   time is its attention plus the transfer time that its ``overlap_s`` and attention do not
   hide, and after the move neither ``src``, ``u`` nor the keys' sender may be as slow as
   ``src`` was before. Among the moves that pay off the one leaving the slowest of them fastest
   wins. If none pays off, placement stops: the step would get slower, not faster.
3. The chosen task moves whole when it fits ``u``; a task that overshoots has its queries cut so
   that the head -- which sees the shorter key prefix -- carries what ``u`` can take, and the
   head moves (:func:`.export.take`: no head shorter than the cost model's ``min_task_rows``, whose
   backward loop would be mostly fixed cost, unless balance needs one).

Where moves are stuck on lumps -- pieces of a long document's end, each paying its backward's fixed
cost over the whole key prefix -- the most loaded rank trades with the least loaded ones
(:func:`_trade`): gives a task away, swaps it for a smaller one, or cuts it where the two end most
even (moves after the trades changed no plan measured). At the end a rank's pieces of one document
that meet are merged into one kernel segment (:meth:`~.planner.TaskTable.segments`).

The loads and bytes the moves are priced on and booked to are :mod:`.ledger`'s.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...planning.layout import Shards
from .cast import Nodes
from .export import FILL, export_between_nodes, take
from .ledger import Ledger, LinkCost, RowBytes
from .planner import Segments, TaskTable

SHORTLIST = 16          # least-loaded ranks of the whole pool considered per move
PICKS = 8               # moves made per pricing of a rank's tasks
CHUNK_SHARE = 4         # a long causal document starts as chunks of a rank's tokens over this (min_task_rows at least)
CUT_TASKS, CUT_POINTS = 4, 65   # a trade tries cutting the busiest rank's largest tasks, at this many rows each


def place_tasks(mask, slots: Shards, cost, epsilon: float = 0.04,
                chunk: int | None = None, links: LinkCost | None = None, rows: RowBytes | None = None,
                cap: float = 2.0, overlap_s: float | None = None, nodes: Nodes | None = None) -> Segments:
    """Build the task table and place its tasks (module docstring) over the ``slots``' tokens.
    ``cap``: bytes a rank may send or receive per layer, in units of a rank's own rows (Q, K and V
    of its tokens, both passes). ``overlap_s``: see :func:`distattn.schedulers.cad.build`."""
    p = slots.world_size
    chunk = chunk or max(128, int(getattr(cost, "min_task_rows", 1)), slots.total // p // CHUNK_SHARE)
    table = TaskTable(mask, slots, chunk, cost)
    links = links or LinkCost.of(None, p)
    nodes = nodes or Nodes.even(p, links.gpus_per_node)
    ledger = Ledger(table, slots, links, rows or RowBytes.of(), cap, overlap_s, nodes)
    load = ledger.load
    if nodes.count > 1:
        # under-loaded nodes even out first, so that each of their ranks has room for what they import
        taking = ledger.node_load() < ledger.size * ledger.mean * (1 + FILL * epsilon)
        _balance_inside_nodes(table, ledger, epsilon, taking)
        export_between_nodes(table, ledger, epsilon)
    for _ in range(50 * p + 100):
        src = int(np.argmax(load))
        if load[src] <= (1 + epsilon) * ledger.mean or not _drain(table, ledger, src, None, epsilon):
            break
    _trade(table, ledger, epsilon, p)
    return table.segments()


def _trade(table: TaskTable, ledger: Ledger, epsilon: float, rounds: int) -> None:
    """Where moves are stuck on lumps -- pieces of a long document's end, each paying its backward's
    fixed cost over the whole key prefix, too large for any rank's room -- the most loaded rank trades
    with one of the :data:`SHORTLIST` least loaded ranks: gives a task away, swaps it for a smaller one
    of theirs, or cuts it where the two end most even (the tail it keeps still pays that fixed cost),
    whichever leaves the busier of the two lowest, below it was; until none helps. None with
    ``overlap_s`` (trades do not price the transfers they add)."""
    if ledger.overlap_s is not None:
        return
    load = ledger.load
    for _ in range(rounds):
        src = int(np.argmax(load))
        if load[src] <= (1 + epsilon) * ledger.mean:
            break
        mine = table.tasks_on(src)
        dests = np.argsort(load, kind="stable")[:SHORTLIST]
        best, pick = load[src] * (1 - 1e-6), None
        for u in dests.tolist():
            theirs = table.tasks_on(u)
            give, back = table.t_time[mine][:, None], np.append(table.t_time[theirs], 0.0)[None, :]   # 0: no swap
            after = np.maximum(load[src] - give + back, load[u] + give - back)
            i, j = np.unravel_index(np.argmin(after), after.shape)
            if after[i, j] < best:
                best, pick = after[i, j], (int(mine[i]), u, int(theirs[j]) if j < len(theirs) else None, None)
        for task in mine[np.argsort(-table.t_time[mine], kind="stable")][:CUT_TASKS].tolist():   # its largest
            xs, head, tail = table.cuts(task, CUT_POINTS)
            if not len(xs):
                continue
            after = np.maximum(load[src] - table.t_time[task] + tail[None, :], load[dests][:, None] + head[None, :])
            i, j = np.unravel_index(np.argmin(after), after.shape)
            if after[i, j] < best:
                best, pick = after[i, j], (task, int(dests[i]), None, int(xs[j]))
        if pick is None:
            break
        task, u, other, x = pick
        if x is not None:   # the head [q0, x) to u
            change, head = table.cut(task, x, u)
            ledger.charge(table.n_task - 1, u)
            load[src] += change
            load[u] += head
        else:
            for t, dst in ((task, u), (other, src)):
                if t is not None:
                    ledger.charge(t, dst)
                    load[table.t_rank[t]] -= table.t_time[t]
                    load[dst] += table.t_time[t]
                    table.move(t, dst)


def _balance_inside_nodes(table: TaskTable, ledger: Ledger, epsilon: float, which: np.ndarray) -> None:
    """Move work from the over-loaded to the under-loaded ranks of each node of ``which`` over
    NVLink, so that only a node's own excess or deficit crosses nodes: a node holding more than
    the mean fills its ranks to its own mean."""
    load = ledger.load
    levels = np.maximum(ledger.node_load() / ledger.size, ledger.mean)
    for n in np.nonzero(which)[0].tolist():
        members = ledger.members[n]
        for _ in range(50 * len(members)):
            src = int(members[np.argmax(load[members])])
            if load[src] <= (1 + epsilon) * ledger.mean or \
                    not _drain(table, ledger, src, members, epsilon, levels[n]):
                break


def _drain(table: TaskTable, ledger: Ledger, src: int, dests: np.ndarray | None, epsilon: float,
           level: float | None = None) -> bool:
    """Make the cheapest moves off ``src`` to the ranks of ``dests`` below ``level`` (default: the
    mean; ``dests`` None: those :func:`destinations` offers); False if none pays off or
    fits (placement is stuck: a task's single query row, reading its key prefix, can cost more
    than any rank's room)."""
    load = ledger.load
    level = ledger.mean if level is None else level
    if dests is not None:
        dests = dests[load[dests] < level]
    picks = choose(ledger, src, dests, level) if dests is None or dests.size else []
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


def _move(table: TaskTable, ledger: Ledger, load: np.ndarray, src: int, best: int, u: int, want: float,
          slack: float, dests: np.ndarray | None, level: float) -> bool:
    """Move task ``best`` off ``src`` to ``u`` (room ``want``): whole if it fits (within ``slack``),
    else move the head of its queries; False if neither fits ``u`` nor the least loaded rank of
    ``dests`` (None: of all)."""
    if take(table, ledger, load, best, u, want, slack):
        return True
    # u's room is below one query's cost: the least loaded rank takes the task or its head
    u = int(np.argmin(load)) if dests is None else int(dests[np.argmin(load[dests])])
    return take(table, ledger, load, best, u, min(load[src] - level, level - load[u]), slack) > 0

@dataclass(frozen=True)
class _Moves:
    """Every move of ``src``'s ``tasks`` to ``dests``, priced: arrays ``[tasks, dests]`` (or broadcasting to it)."""

    src: int
    tasks: np.ndarray      # [tasks]
    dests: np.ndarray      # [dests]
    want: np.ndarray       # [1, dests]: the room of a move, what brings src or u to the level
    gain: np.ndarray       # attention seconds (forward + backward) a move takes off src
    q_s: np.ndarray        # network seconds of the query rows
    q_w: np.ndarray        # ... and their weighted bytes (the caps' unit)
    rank_new: np.ndarray   # key rows new to the destination
    node_new: np.ndarray   # ... and of those, the rows new to its node (they cross nodes)
    seconds: np.ndarray    # network seconds of the move
    size: np.ndarray       # [1, dests]: ranks of the destination's node


def destinations(ledger: Ledger, src: int, docs: np.ndarray) -> np.ndarray:
    """The under-loaded ranks a move off ``src`` (of documents ``docs``) may go to (module docstring, step 1)."""
    load, node = ledger.load, ledger.node
    p = len(load)
    pick = np.zeros(p, dtype=bool)
    pick[np.argpartition(load, min(SHORTLIST, p - 1))[:SHORTLIST]] = True
    pick[node == node[src]] = True
    docs = np.unique(docs)
    holders = ledger.holders(docs)
    pick[holders] = True                                  # ranks holding part of them
    nodes = set(node[holders].tolist())
    for d in docs.tolist():
        pick[list(ledger.held.get(d, ()))] = True        # ranks already receiving their keys
        nodes |= set(ledger.node_held.get(d, ()))
    pick |= np.isin(node, list(nodes))                   # ... and their nodes: keys move there over NVLink
    return np.nonzero(pick & (load < ledger.mean))[0]


def choose(ledger: Ledger, src: int, dests: np.ndarray | None = None, level: float | None = None
           ) -> list[tuple[int, int]]:
    """The cheapest moves off ``src`` (to ``dests``, default :func:`destinations`) that bring
    ranks towards ``level`` (default: the mean): ``[(task, destination), ...]`` (none: nothing
    pays off)."""
    tasks = ledger.table.tasks_on(src)
    if tasks.size == 0:
        return []
    if dests is None:
        dests = destinations(ledger, src, ledger.table.doc[tasks])
    if dests.size == 0:
        return []
    level = ledger.mean if level is None else level
    moves = _price(ledger, src, tasks, dests, level)
    key_sender = _key_senders(ledger, tasks)
    ok = _within_caps(ledger, moves, key_sender)
    score = moves.seconds / np.maximum(moves.gain, 1e-30)
    if ledger.overlap_s is not None:
        # a move pays off if no rank it touches ends up slower than src was: the step waits for the slowest rank
        after = _slowest_after(ledger, moves, key_sender)
        ok &= after < ledger.busy(np.asarray([src]), 0, 0, 0)
        score = after + 1e-3 * moves.seconds
    return _picks(ledger.table, moves, np.where(ok, score, np.inf), ledger.load[src] - level)


def _price(ledger: Ledger, src: int, tasks: np.ndarray, dests: np.ndarray, level: float) -> _Moves:
    """Gain and network seconds of every move of ``tasks`` off ``src`` to ``dests`` (step 2)."""
    t = ledger.table
    want = np.minimum(ledger.load[src] - level, level - ledger.load[dests])[None, :]
    gain = np.minimum(t.t_time[tasks][:, None], want)
    q_bytes = t.t_q[tasks][:, None] * ledger.rows.q
    rank_new, node_new = ledger.new_keys(tasks, dests)
    q_s = q_bytes * ledger.per_byte(src, dests)[None, :]
    q_w = q_bytes * ledger.weight(src, dests)[None, :]
    return _Moves(src, tasks, dests, want, gain, q_s, q_w, rank_new, node_new,
                  ledger.move_seconds(q_s, rank_new, node_new), ledger.nodes.size(dests)[None, :])


def _key_senders(ledger: Ledger, tasks: np.ndarray) -> np.ndarray:
    """Per task, the rank sending its first keys to a new node: their owner, until the document's
    tree has ``fanout`` nodes below the owner's (:meth:`Ledger.tree_sender`)."""
    docs = ledger.table.doc[tasks]
    key_owner = ledger.owner(ledger.table.t_k0[tasks])
    key_sender = key_owner.astype(np.int64)
    for i in np.nonzero([len(ledger.node_held.get(d, ())) >= ledger.fanout for d in docs.tolist()])[0].tolist():
        key_sender[i] = ledger.tree_sender(int(docs[i]), int(key_owner[i]))
    return key_sender


def _within_caps(ledger: Ledger, m: _Moves, key_sender: np.ndarray) -> np.ndarray:
    """``[tasks, dests]``: the moves that keep the most loaded link they load (src's egress, u's
    ingress, the keys' sender's egress) within the cap; if none does, those overshooting least."""
    kv, w_intra = ledger.rows.kv, ledger.w_intra
    near_new = m.rank_new - m.node_new                  # keys that reach u over NVLink
    # weighted bytes in at u: keys new to its node arrive at its slots share by share, then over NVLink
    moved = m.q_w + (near_new * w_intra + m.node_new * (w_intra + 1 / m.size)) * kv
    # the first and last owners of each task's keys (a causal prefix: the first is the busiest)
    # send at most their own rows of them, once per node
    key_out = np.maximum(ledger.egress[key_sender], ledger.egress[ledger.owner(ledger.table.t_k1[m.tasks] - 1)])
    key_w = (np.minimum(m.node_new, ledger.tokens) + w_intra * np.minimum(near_new, ledger.tokens)) * kv
    worst = np.maximum.reduce([ledger.ingress[m.dests][None, :] + moved,
                               np.broadcast_to(ledger.egress[m.src] + m.q_w, moved.shape),
                               np.where(m.rank_new == 0, 0, key_out[:, None] + key_w)])
    ok = worst <= ledger.cap
    return ok if ok.any() else worst <= worst.min() * (1 + 1e-9)


def _slowest_after(ledger: Ledger, m: _Moves, key_sender: np.ndarray) -> np.ndarray:
    """``[tasks, dests]``: the busiest of src, u and the keys' sender after each move (attention
    plus the communication their computation does not hide, :meth:`Ledger.busy`). Keys crossing to
    u's node land on its slots share by share (:mod:`.cast`): u takes its share of the
    inter-node time and the NVLink hop."""
    links, kv = ledger.links, ledger.rows.kv
    key_s = m.seconds - m.q_s
    into_u = m.seconds - m.node_new * kv * links.inter_s_per_byte * (1 - 1 / m.size) \
        + m.node_new * kv * links.intra_s_per_byte
    src_owns = (key_sender == m.src)[:, None]   # src sends these keys itself
    return np.maximum.reduce([
        ledger.busy(np.asarray([m.src])[None, :], m.q_s + np.where(src_owns, key_s, 0), 0, -m.gain),
        ledger.busy(m.dests[None, :], 0, into_u, m.gain),
        np.where(src_owns, 0, ledger.busy(key_sender[:, None], key_s, 0, 0))])


def _picks(table: TaskTable, m: _Moves, score: np.ndarray, excess: float) -> list[tuple[int, int]]:
    """The cheapest moves by ``score`` of distinct tasks to distinct ranks, until they would take
    off src its ``excess`` above the level (later ones are priced on the ledger before the earlier
    ones: one pricing serves several moves)."""
    picks = []
    for _ in range(PICKS):
        i, j = np.unravel_index(np.argmin(score), score.shape)
        if not np.isfinite(score[i, j]):  # every move left exposes more communication than it saves
            break
        picks.append((int(m.tasks[i]), int(m.dests[j])))
        excess -= min(table.t_time[m.tasks[i]], m.want[0, j])
        if excess <= 0:
            break
        score[i, :] = np.inf
        score[:, j] = np.inf
    return picks
