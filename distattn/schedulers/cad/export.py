"""CAD's export between nodes: which rows each over-loaded node sheds, which nodes take them, and
the moves (the first pass of :mod:`.placement` on several nodes).

A node holding more than its share of attention must have some of its query rows computed on
other nodes. Every row that leaves moves ``b_q`` bytes (its queries out, its results back) and
needs its document's key prefix; each key row of the node that any of them needs leaves at least
once (``b_k``). The fewest bytes that shed a node's excess are a knapsack with a fixed cost -- a
document's key prefix -- per document, which :mod:`.bound` bounds from below; the pass
follows that bound's own solution, so that the busiest node sends little above it:

1. *Tails where the keys are.* A node holding the head of a document whose few last rows lie on
   the next node sends its keys there, whatever else happens; computing those rows itself instead
   costs their queries (:func:`_pull_tails`).
2. *Which rows.* Each node holding more than ``1 + KEEP * epsilon`` times the mean pairs per rank
   sheds the rest (pairs, what the bound counts) as the tails of a few documents
   (:func:`~.bound.export_rows`: the open documents the bound's dual picks, and the rows of
   most work per byte in them). Moved one rank-sized piece at a time by the busiest rank, a node
   exported up to 1.8x the rows its excess needed; picked by work per query row alone, from as
   many documents as had long tails, each with its key prefix.
3. *Which nodes take them* (:func:`assign`). A receiving node pays for what it takes the same
   way: the query rows, and each document's key prefix up to the last row it takes that it
   neither holds nor already receives. Placed piece by piece, receivers took slivers of many
   documents (at 4096 ranks of WLB lengths the busiest took 94K query rows and 561K foreign key
   rows, 1.35x what the busiest node had to send). Tails go largest first to the node with room
   for them whose bytes end lowest (a node holding the document's head receives only the rest of
   its keys), or, when no node has room, the node with most room takes the last rows (they need
   the whole prefix) and the rows before go on as a shorter tail.
4. *The moves*, task by task, each receiving node's least loaded rank first, up to ``FILL *
   epsilon`` over the mean load (time: what the step waits for).

With ``overlap_s`` (:func:`distattn.schedulers.cad.build`) a piece moves only if it pays off as
the moves one by one must: neither node's mean rank ends slower than the exporter's was
(attention plus the communication its computation and ``overlap_s`` do not hide; the passes inside
nodes then even ranks out over NVLink). One set of planner options serves training and the
simulator alike.
"""

from __future__ import annotations

import numpy as np

from .bound import after_pairs, causal_runs, export_price, export_rows, run_pairs

KEEP = 0.9     # an exporting node keeps up to KEEP * epsilon above the mean (the rest absorbs in-node cuts)
FILL = 0.95    # ... and a receiving rank takes up to FILL * epsilon above it


def export_between_nodes(table, ledger, epsilon: float) -> None:
    """The export pass (module docstring) over ``table``'s tasks, booked on ``ledger``
    (:class:`~.ledger.Ledger`). Only plain causal documents are exported here (the passes
    after place the rest)."""
    t, load, mean, rows = table, ledger.load, ledger.mean, ledger.rows
    count, level = ledger.nodes.count, mean * (1 + FILL * epsilon)
    g = t.groups
    causal = np.nonzero(g.plain_causal)[0]
    node, doc, p0, p1 = causal_runs(g.q0[causal], g.q1[causal], ledger.slots, ledger.node)
    doc = causal[doc]
    after = after_pairs(node, doc, p0, p1, g.q1 - g.q0)
    pulled = _pull_tails(t, ledger, node, doc, p0, p1, after, _excess(t, ledger, epsilon), level)
    after[pulled] = 0
    gone = np.zeros(len(doc), dtype=bool)        # the runs whose rows were pulled
    for i in np.nonzero(pulled)[0].tolist():
        gone |= (doc == doc[i]) & (p0 >= p1[i])
    excess = _excess(t, ledger, epsilon)
    room = np.minimum(np.bincount(ledger.node, np.maximum(level - load, 0), count),
                      np.maximum(ledger.size * level - ledger.node_load(), 0))
    room[excess > 0] = 0
    run = run_pairs(p0, p1)
    out = (excess[node] > 0) & (run > 0) & ~gone
    if not out.any() or room.sum() <= 0:
        return
    scale = t.cost.task_time(p1 - p0, p1, run) / np.maximum(run, 1)     # work per pair of each run
    # the keys before a run its tail's receiver needs: none if the node holding them has room
    before = np.concatenate([[-1], np.where(doc[1:] == doc[:-1], node[:-1], -1)])
    near = (before >= 0) & (room[np.maximum(before, 0)] >= scale * np.minimum(excess[node], run) / 2)
    prefix = np.where(near, 0, p0)
    node, doc, p0, p1, run, after, prefix, scale = (x[out] for x in (node, doc, p0, p1, run, after, prefix, scale))
    first = export_rows(node, p0, p1, np.minimum(excess, np.bincount(node, run, count)), rows.q, rows.kv,
                        after=after, prefix=prefix)
    go = first < p1
    tails = doc[go]
    start, end = g.q0[tails] + first[go], g.q0[tails] + p1[go]
    h_node, h_doc, h0, h1 = causal_runs(g.q0[tails], g.q1[tails], ledger.slots, ledger.node)   # who holds their rows
    held = (h_node, tails[h_doc], g.q0[tails][h_doc] + h0, g.q0[tails][h_doc] + h1)
    pieces = assign(node[go], tails, start, end, scale[go], g.q0, held, room, rows.q, rows.kv)
    tiny = 1e-3 * mean
    for d, a, b, n, m in zip(*(x.tolist() for x in pieces)):
        tasks = np.concatenate([t.tasks_on(int(r)) for r in ledger.members[n]])
        tasks = tasks[(t.doc[tasks] == d) & (t.q0[tasks] < b) & (t.q1[tasks] > a)]
        dst = ledger.members[m]
        if ledger.overlap_s is not None:
            ds = int(g.q0[d])
            work = float(t.cost.task_time([b - a], [b - ds], [run_pairs(a - ds, b - ds)])[0])
            if not _pays_off(ledger, n, m, work, (b - a) * rows.q + (b - ds) * rows.kv):
                continue
        for task in tasks[np.argsort(-t.q0[tasks])].tolist():
            task = _clip(t, load, task, a, b)
            while True:   # the task, or its head, to the least loaded rank of the receiver
                u = int(dst[np.argmin(load[dst])])
                if level - load[u] <= tiny or not take(t, ledger, load, task, u, level - load[u], tiny) \
                        or t.t_rank[task] == u:
                    break


def _pays_off(ledger, n: int, m: int, work: float, nbytes: float) -> bool:
    """With ``overlap_s``: whether moving ``work`` seconds of attention from node ``n`` to node
    ``m`` with ``nbytes`` crossing between them (at most: its query rows and whole key prefix)
    leaves both nodes' ranks faster than ``n``'s were (the rule of the moves one by one, for a
    node's mean rank: the passes inside nodes even its ranks out, over NVLink)."""
    seconds = nbytes * ledger.links.inter_s_per_byte
    before = ledger.node_busy(n, 0, 0, 0)
    return max(ledger.node_busy(n, seconds, 0, -work), ledger.node_busy(m, 0, seconds, work)) < before


def _excess(table, ledger, epsilon: float) -> np.ndarray:
    """Pairs each node computes above ``1 + KEEP * epsilon`` times the mean per rank."""
    n = table.n_task
    pairs = np.bincount(ledger.node[table.t_rank[:n]], table.area[:n], ledger.nodes.count)
    return np.maximum(pairs - ledger.size * (1 + KEEP * epsilon) * pairs.sum() / len(ledger.load), 0)


def _pull_tails(table, ledger, node, doc, p0, p1, after, excess, level: float) -> np.ndarray:
    """Runs whose node takes in its document's later rows, held by other nodes: the rows a node
    holds of a document going on elsewhere send their keys there, unless the node computes what
    comes after. Worth it when the later rows' queries, plus the export their work then needs
    (at the node's price per pair, :func:`~.bound.export_price`), cost under half the keys;
    a node with no excess takes them only into its room. Returns the runs that pull."""
    t, load, rows = table, ledger.load, ledger.rows
    g = t.groups
    later = (g.q1 - g.q0)[doc] - p1
    out = excess[node] > 0
    price = export_price(node[out], p0[out], p1[out], excess, rows.q, rows.kv, after=after[out])
    pull = (after > 0) & (2 * (later * rows.q + price[node] * after) <= (p1 - p0) * rows.kv)
    room = np.bincount(ledger.node, np.maximum(level - load, 0), ledger.nodes.count)
    for i in np.nonzero(pull)[0].tolist():
        n, d = int(node[i]), int(doc[i])
        cut = int(g.q0[d] + p1[i])
        tasks = np.nonzero((t.doc[:t.n_task] == d) & (t.q0[:t.n_task] >= cut))[0]
        work = float(t.t_time[tasks].sum())
        if excess[n] <= 0 and work > room[n]:
            pull[i] = False
            continue
        room[n] -= work
        members = ledger.members[n]
        for task in tasks.tolist():
            take(t, ledger, load, task, int(members[np.argmin(load[members])]), np.inf, 0.0)
    return pull


def _clip(table, load: np.ndarray, task: int, a: int, b: int) -> int:
    """The part of ``task`` inside queries ``[a, b)`` as a task of its own (the rest stays)."""
    r = int(table.t_rank[task])
    if table.q1[task] > b:
        change, head = table.cut(task, b, r)
        load[r] += change + head
        task = table.n_task - 1
    if table.q0[task] < a:
        change, head = table.cut(task, a, r)
        load[r] += change + head
    return task


def take(table, ledger, load: np.ndarray, task: int, u: int, want: float, slack: float) -> float:
    """Move ``task`` to ``u`` whole if it fits ``want`` (within ``slack``), else the head of its
    queries that does (it needs fewer keys than the tail), at least the cost model's
    ``min_task_rows`` (a head against a long key prefix pays its backward's fixed cost over every key
    block, whatever its rows): that head also where it overshoots ``u``'s room but leaves ``u`` below
    the task's rank; where even that does not, the shorter head that evens the two. Returns the work
    moved (0: nothing)."""
    src = int(table.t_rank[task])
    work = float(table.t_time[task])
    if work <= want + slack:
        ledger.charge(task, u)
        table.move(task, u)
        load[src] -= work
        load[u] += work
        return work
    smallest = min(int(table.q0[task]) + table.min_rows, int(table.q1[task]) - 1)
    if smallest <= table.q0[task]:   # a single row: it moves whole or not at all
        return 0.0
    head = table.piece_time(task, smallest)
    if head <= want + slack:                    # the head that fills u's room, min_task_rows at least
        x = max(table.split_point(task, want) or smallest, smallest)
    elif load[u] + head < load[src] - slack:    # too large for u's room, but it lowers the busier of the two
        x = smallest
    else:                                       # balance needs a shorter head: the one evening them, if any
        x = table.split_point(task, (load[src] - load[u]) / 2)
        if x is None:
            return 0.0
    tail_change, head_time = table.cut(task, x, u)
    ledger.charge(table.n_task - 1, u)
    load[src] += tail_change
    load[u] += head_time
    return head_time


def tail_start(p0, p1, work):
    """The first row ``p`` (0-based in the document, ``p0 <= p <= p1``) of the shortest tail of rows
    ``[p0, p1)`` carrying at least ``work`` pairs (row ``j`` carries ``j + 1``)."""
    p0, p1, work = (np.asarray(x, dtype=np.float64) for x in (p0, p1, work))
    below = p1 * (p1 + 1) - 2 * work                       # p (p + 1) of the start
    p = np.floor((np.sqrt(1 + 4 * np.maximum(below, 0)) - 1) / 2)
    return np.clip(p, p0, p1).astype(np.int64)


def assign(src, doc, start, end, scale, first, held, room, b_q: float, b_k: float):
    """Receivers for the exported rows: item ``i`` is rows ``[start[i], end[i])`` of document
    ``doc[i]`` (global rows; the document begins at ``first[doc[i]]``) on node ``src[i]``, each of
    its pairs ``scale[i]`` work. ``held``: ``(node, doc, h0, h1)`` of the rows every node holds of
    these documents (global); ``room[n]``: the work node ``n`` can take. Returns ``(doc, a, b, src,
    dst)`` per piece: rows ``[a, b)`` of ``doc`` go from node ``src`` to node ``dst``."""
    room = np.asarray(room, dtype=np.float64).copy()
    taken = np.zeros(len(room))                            # bytes each receiver takes so far
    tiny = 1e-6 * max(float(room.max(initial=0)), 1e-300)
    hold = {}                                              # doc -> (nodes, h0, h1) holding its rows
    h_node, h_doc, h0, h1 = (np.asarray(x, dtype=np.int64) for x in held)
    for d in np.unique(h_doc).tolist():
        at = h_doc == d
        hold[d] = (h_node[at], h0[at], h1[at])
    reach: dict[int, dict[int, int]] = {}                  # doc -> node -> keys [first, reach) it receives
    pieces = []
    sizes = scale * run_pairs(start - first[doc], end - first[doc])
    for i in np.argsort(-sizes, kind="stable").tolist():
        d, a, e, s = int(doc[i]), int(start[i]), int(end[i]), float(scale[i])
        ds = int(first[d])
        while e > a:
            open_ = np.nonzero(room > tiny)[0]
            if open_.size == 0:
                return _out(pieces)
            work = s * float(run_pairs(a - ds, e - ds))
            new = _new_keys(open_, d, ds, e, hold, reach.get(d, {}))
            cost = taken[open_] + (e - a) * b_q + new * b_k
            fits = room[open_] >= work
            if fits.any():
                j = np.lexsort((room[open_], np.where(fits, cost, np.inf)))[0]
                m, y = int(open_[j]), a
            else:
                j = int(np.argmax(room[open_]))
                m = int(open_[j])
                y = max(ds + int(tail_start(a - ds, e - ds, room[m] / s)), a)
                if y >= e:                                  # not one row fits: the room is spent
                    room[m] = 0
                    continue
            pieces.append((d, y, e, int(src[i]), m))
            taken[m] += (e - y) * b_q + new[j] * b_k
            room[m] -= s * float(run_pairs(y - ds, e - ds))
            reach.setdefault(d, {})[m] = max(reach.get(d, {}).get(m, ds), e)
            e = y
    return _out(pieces)


def _new_keys(nodes: np.ndarray, d: int, ds: int, e: int, hold: dict, reach: dict) -> np.ndarray:
    """Key rows ``[ds, e)`` of document ``d`` that each of ``nodes`` neither holds nor receives."""
    lo = np.asarray([max(reach.get(m, ds), ds) for m in nodes.tolist()], dtype=np.int64) if reach else \
        np.full(len(nodes), ds, dtype=np.int64)
    new = np.maximum(e - lo, 0).astype(np.float64)
    if d in hold:
        h_node, h0, h1 = hold[d]
        for m, a, b in zip(h_node.tolist(), h0.tolist(), h1.tolist()):
            at = nodes == m
            new[at] -= np.maximum(np.minimum(b, e) - np.maximum(a, lo[at]), 0)
    return new


def _out(pieces):
    cols = np.asarray(pieces, dtype=np.int64).reshape(-1, 5)
    return tuple(cols[:, k] for k in range(5))
