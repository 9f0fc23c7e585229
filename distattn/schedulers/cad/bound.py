"""Lower bounds on the inter-node bytes of any CAD plan that balances attention (pure numpy).

Node ``n`` holds attention work ``A_n``: the visible (query, key) pairs of the rows its slots
hold, before placement. A plan leaving at most ``(1 + eps) W`` pairs on each slot (``W``: the mean
per slot over the pool) leaves at most ``size_n (1 + eps) W`` on the node, so the node computes
``E_n = max(A_n - size_n (1 + eps) W, 0)`` pairs of its rows elsewhere. CAD computes a query row
whole on one slot, with the keys it sees; so a row of a causal document computed off the node moves
``b_q`` bytes (Q and dout out, out and dQ back) and needs every key row before it, and each of the
node's key rows any such row needs leaves the node at least once (``b_k``: K/V out, dK/dV back).
Exporting rows ``S`` of a run ``[p0, p1)`` of a document the node holds (row ``j`` -- 1-based in
its document -- sees ``j`` keys) sheds ``sum_{j in S} j`` pairs and costs at least
``|S| b_q + (max S - p0) b_k``; the node's fewest bytes to shed ``E_n`` are the cheapest such
choice over all its runs, a knapsack with a fixed cost (the key prefix) per run.

Units: bytes over forward and backward of one layer, as the bench's ``inter`` column counts a
rank's: per all-to-all phase the larger of what it sends and receives across nodes, summed. A
node's ranks together then count at least what the node sends out in each phase (or what it
receives), so the busiest rank has at least the node's bound divided by its slots.

:func:`export_bytes` bounds that minimum from below by its Lagrangian dual: for any ``lam >= 0``,
``lam E_n + sum_runs min_S (cost(S) - lam pairs(S)) <= min cost``. For a run and ``lam``, with the
last exported row ``m`` fixed, the best ``S`` takes the rows worth more than their bytes
(``lam j > b_q``); that value is concave in ``m`` (each further row adds ``b_k`` and a worth that
grows with ``j``), so the best ``m`` is one end of the run: export nothing, or the run's valuable
rows with its whole key prefix -- "the rows with the most pairs per byte first". The dual is
concave in ``lam`` and is maximised by bisection on its supergradient (``E_n`` minus the pairs
taken). It is valid for any ``lam``, hence never above what any placement moves; it is exact when
the excess is a whole document's tail and weaker when a run's key prefix is a large fixed cost
against what it sheds (the dual spreads it over pairs: 6% low for one long document).
:func:`export_rows` is the placement's export: the dual's open runs, filled to the excess.

Tighter, where that matters (:func:`tight_bound`):

* a document going on at the next node needs this node's keys there whatever is exported, unless
  this node computes every later row (taking in their work): ``after`` in the dual;
* :func:`tight_export_bytes` prices the runs carrying most pairs per row exactly (a dynamic
  programme over the amount each sheds), the dual only the rest;
* :func:`receiver_bound`: the excess must end on nodes with room, each receiving its rows' key
  prefixes -- with few such nodes, one takes pieces of several documents.

Pieces of a document held in several runs by one node count each run's own keys only (a later
run's rows also need the earlier run's keys: counting them once per run, not for every run, keeps
the bound below the truth); keys of the document another node holds need not leave this one.
"""

from __future__ import annotations

import numpy as np

from ...planning.layout import Shards
from ...planning.schedule import AttnShape
from .ledger import RowBytes


def row_costs(shape: AttnShape, resend: bool = True) -> tuple[float, float]:
    """``(b_q, b_k)``: bytes a query row computed off its node moves over forward and backward, and
    bytes a key row leaving it moves, as the schedule's phases move them -- the placement's own
    prices (:meth:`.ledger.RowBytes.of`; ``resend``: the backward sends the worker its rows again)."""
    rows = RowBytes.of(shape.num_heads, shape.num_kv_heads, shape.head_dim, shape.dtype_bytes, shape.comm_fp8, resend)
    return rows.q, rows.kv


def causal_runs(start, end, slots: Shards, node_of) -> tuple[np.ndarray, ...]:
    """``(node, doc, p0, p1)`` per run of a causal document one node holds: rows ``[p0, p1)`` of
    document ``doc`` (global rows ``[start[doc], end[doc])``; 0-based, row ``j`` sees ``j + 1``
    keys), runs of consecutive rows on one node merged."""
    start, end = np.asarray(start, dtype=np.int64), np.asarray(end, dtype=np.int64)
    which, run, a, b = slots.cut(start, end)
    node = np.asarray(node_of, dtype=np.int64)[slots.owner[run]]
    # a run continues the previous one if it is the same document and node and starts where it ended
    new = np.ones(len(a), dtype=bool)
    new[1:] = (which[1:] != which[:-1]) | (node[1:] != node[:-1]) | (a[1:] != b[:-1])
    first = np.nonzero(new)[0]
    last = np.append(first[1:], len(a))[:len(first)] - 1
    doc = which[first]
    return node[first], doc, a[first] - start[doc], b[last] - start[doc]


def run_pairs(p0, p1) -> np.ndarray:
    """Visible pairs of rows ``[p0, p1)`` of a causal document."""
    p0, p1 = np.asarray(p0, dtype=np.float64), np.asarray(p1, dtype=np.float64)
    return (p1 * (p1 + 1) - p0 * (p0 + 1)) / 2


def export_excess(node, p0, p1, size, eps: float = 0.05) -> np.ndarray:
    """Pairs each node must compute elsewhere: its runs' pairs above ``size[n] (1 + eps) W``."""
    size = np.asarray(size, dtype=np.float64)
    work = np.bincount(node, run_pairs(p0, p1), minlength=len(size))
    return np.maximum(work - size * (1 + eps) * work.sum() / size.sum(), 0)


def after_pairs(node, doc, p0, p1, length) -> np.ndarray:
    """Per run (as :func:`causal_runs` gives them, in global order), the pairs of its document's
    rows after it that other nodes hold (0: the document ends on the run's node)."""
    node, doc = np.asarray(node, dtype=np.int64), np.asarray(doc, dtype=np.int64)
    after = run_pairs(p1, np.asarray(length, dtype=np.float64)[doc])
    # a node's later runs of the same document (not on a contiguous layout) keep their rows home:
    # per (document, node), the pairs of the runs after each, by a suffix sum in run order
    key = doc * (int(node.max(initial=0)) + 1) + node
    order = np.lexsort((np.arange(len(key)), key))
    pairs = run_pairs(p0, p1)[order]
    suffix = np.cumsum(pairs[::-1])[::-1] - pairs                 # later runs, across groups too
    ends = np.flatnonzero(np.append(np.diff(key[order]) != 0, True))   # each group's last run
    group_end = ends[np.searchsorted(ends, np.arange(len(key)))]
    later = np.empty(len(key))
    later[order] = suffix - (suffix[group_end] if len(key) else 0)
    return np.maximum(after - later, 0)


def _dual(lam, node, p0, p1, excess, b_q, b_k, scale, after):
    """The dual at ``lam[n]`` per node, and per run the first row its minimiser exports (``p1``:
    none) and the work it sheds (negative: it takes in the rows after the run)."""
    lam_r = lam[node] * scale
    # valuable rows: 1-based j > b_q / lam, from lo to p1 (lo > p1: none)
    lo = np.maximum(p0 + 1, np.floor(b_q / np.maximum(lam_r, 1e-300)) + 1)
    take = lo <= p1
    pairs = np.where(take, run_pairs(lo - 1, p1), 0.0)
    rows = np.where(take, (p1 - lo + 1) * b_q - lam_r * pairs, 0.0)
    keys = (p1 - p0) * b_k
    # a run whose document goes on at other nodes sends its keys, unless its node computes
    # every later row (taking in their work); a run that ends its document pays them to export
    ahead = after > 0
    value = np.where(ahead, np.minimum(keys + rows, lam_r * after), np.minimum(keys + rows, 0))
    out = np.where(ahead, keys + rows <= lam_r * after, keys + rows < 0)
    shed = np.where(out, pairs, np.where(ahead, -after, 0.0)) * scale
    dual = lam * excess + np.bincount(node, value, minlength=len(excess))
    return dual, np.where(out & take, lo - 1, p1), shed


def _bisect(node, p0, p1, excess, b_q, b_k, scale, after, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """``lam`` per node just below and just above where the dual's minimiser sheds ``excess``:
    bisection in log ``lam`` on the sign of the supergradient (``excess`` minus the work shed)."""
    n = len(excess)
    # lam above b_q + b_k takes every row of every run: the dual falls from there (excess <= work)
    lo = np.full(n, 1e-12 / max(float(np.max(scale, initial=1.0)), 1e-300))
    hi = np.full(n, float(b_q + b_k + 1) / max(float(np.min(scale, initial=1.0)), 1e-300))
    for _ in range(steps):
        mid = np.sqrt(lo * hi)
        up = np.bincount(node, _dual(mid, node, p0, p1, excess, b_q, b_k, scale, after)[2], minlength=n) < excess
        lo, hi = np.where(up, mid, lo), np.where(up, hi, mid)
    return lo, hi


def _runs(node, p0, p1, excess, scale, after):
    node = np.asarray(node, dtype=np.int64)
    p0, p1 = np.asarray(p0, dtype=np.float64), np.asarray(p1, dtype=np.float64)
    excess = np.asarray(excess, dtype=np.float64)
    scale = np.broadcast_to(np.asarray(scale, dtype=np.float64), p0.shape)
    after = np.broadcast_to(np.asarray(after, dtype=np.float64), p0.shape)
    if (p1 < p0).any() or (p0 < 0).any() or (excess < 0).any() or (scale <= 0).any() or (after < 0).any():
        raise ValueError("runs need 0 <= p0 <= p1, scale > 0, after >= 0 and excess >= 0")
    return node, p0, p1, excess, scale, after


def export_bytes(node, p0, p1, excess, b_q: float, b_k: float, scale=1.0, after=0.0, steps: int = 100) -> np.ndarray:
    """A lower bound on the bytes each node sends out (and gets back) to shed ``excess[n]`` of its
    runs' work (module docstring): the Lagrangian dual, maximised over ``lam`` per node. Runs
    ``(node, p0, p1)``; ``scale``: work per pair of each run (1: work in pairs); ``after``: pairs
    of the document's rows after the run that other nodes hold (0: none, or not counted)."""
    node, p0, p1, excess, scale, after = _runs(node, p0, p1, excess, scale, after)
    lo, hi = _bisect(node, p0, p1, excess, b_q, b_k, scale, after, steps)
    best = np.maximum(_dual(lo, node, p0, p1, excess, b_q, b_k, scale, after)[0],
                      _dual(hi, node, p0, p1, excess, b_q, b_k, scale, after)[0])
    return np.maximum(best, 0)


def export_price(node, p0, p1, excess, b_q: float, b_k: float, scale=1.0, after=0.0, steps: int = 60) -> np.ndarray:
    """Per node, the bytes its cheapest export pays per unit of work at the margin: the dual's
    optimal ``lam`` (0: no excess)."""
    node, p0, p1, excess, scale, after = _runs(node, p0, p1, excess, scale, after)
    return np.where(excess > 0, _bisect(node, p0, p1, excess, b_q, b_k, scale, after, steps)[1], 0.0)


def export_rows(node, p0, p1, excess, b_q: float, b_k: float, scale=1.0, after=0.0, prefix=None, steps: int = 60,
                tries: int = 6) -> np.ndarray:
    """Per run, the first of the rows its node exports (``p1``: none) to shed ``excess[n]`` of work
    for few bytes. Given the runs that open (pay their key prefix; a run whose document goes on at
    other nodes sends it anyway), the rows carrying the most work are the cheapest (one threshold
    on a row's work per node, down to the excess). The open runs tried: those of the dual's
    minimiser just above the optimal ``lam``, and those just below it plus one more, each of the
    ``tries`` longest others in turn (the dual's next run is the one worth most at that price,
    not always the cheapest way to make up the rest: measured, it cost up to 10% more bytes); the
    cheapest export is kept: the fewest bytes the node sends, or, if more, the most one node
    taking a whole tail receives (its key prefix: ``prefix`` keys before the run, default ``p0``,
    and the run's own up to the tail's end)."""
    node, p0, p1, excess, scale, after = _runs(node, p0, p1, excess, scale, after)
    prefix = p0 if prefix is None else np.asarray(prefix, dtype=np.float64)
    lo, hi = _bisect(node, p0, p1, excess, b_q, b_k, scale, after, steps)
    n = len(excess)
    below = (_dual(lo, node, p0, p1, excess, b_q, b_k, scale, after)[1] < p1) | (after > 0)
    above = (_dual(hi, node, p0, p1, excess, b_q, b_k, scale, after)[1] < p1) | (after > 0)
    # each node's runs outside the set below, longest first, ranked 0, 1, ... (those inside after them)
    order = np.lexsort((-scale * p1, below, node))
    rank = np.empty(len(node), dtype=np.int64)
    rank[order] = np.arange(len(node)) - np.searchsorted(node[order], np.arange(n))[node[order]]
    best, cost = p1.copy(), np.full(n, np.inf)
    for opened in [above] + [below | (~below & (rank == k)) for k in range(tries)]:
        first = _fill(node, p0, p1, excess, scale, opened, steps)
        shed = np.bincount(node, scale * run_pairs(first, p1), minlength=n)
        paid = (first < p1) & (after == 0)
        bytes_ = np.bincount(node, (p1 - first) * b_q + np.where(paid, p1 - p0, 0) * b_k, minlength=n)
        np.maximum.at(bytes_, node, np.where(first < p1, (p1 - first) * b_q + (p1 - p0 + prefix) * b_k, 0))
        bytes_ = np.where(shed >= excess * (1 - 1e-9), bytes_, np.inf)
        better = bytes_ < cost
        best = np.where(better[node], first, best)
        cost = np.where(better, bytes_, cost)
    return best.astype(np.int64)


def _fill(node, p0, p1, excess, scale, opened, steps: int) -> np.ndarray:
    """Per run, the first exported row when the ``opened`` runs export their rows ``j`` (1-based)
    with ``scale * j >= w``, ``w`` the largest threshold (by bisection) shedding ``excess``."""
    n = len(excess)
    lo_w, hi_w = np.zeros(n), np.bincount(node, scale * p1, minlength=n) + 1

    def first(w):
        return np.where(opened, np.clip(np.ceil(w[node] / scale) - 1, p0, p1), p1)
    for _ in range(steps):
        mid = (lo_w + hi_w) / 2
        enough = np.bincount(node, scale * run_pairs(first(mid), p1), minlength=n) >= excess
        lo_w, hi_w = np.where(enough, mid, lo_w), np.where(enough, hi_w, mid)
    return first(lo_w)


def _tail_rows(m, x):
    """Rows (real-valued) of the fewest rows ending at 0-based row ``m`` that carry ``x`` pairs
    (row ``j`` carries ``j + 1``): the root of ``a (m + 1) - a (a - 1) / 2 = x``."""
    b = 2 * m + 3
    return (b - np.sqrt(np.maximum(b * b - 8 * x, 0))) / 2


def _run_costs(p0, p1, x, b_q, b_k, after, cells: int) -> np.ndarray:
    """A lower bound on the bytes one run ``[p0, p1)`` pays to shed at least ``x[i]`` pairs (inf:
    it cannot), exact up to the grid of last rows. A run whose document goes on elsewhere pays its
    keys anyway and sheds its top rows; another ends its export at some row ``m``, paying the keys
    up to ``m`` and the fewest rows ending there: for ``m`` in a cell ``[M_k, M_k+1]`` at least
    ``M_k``'s keys and ``M_k+1``'s rows (the keys grow with ``m``, the rows needed fall)."""
    if after > 0:
        need = _tail_rows(p1 - 1, x)
        return np.where(x <= run_pairs(p0, p1), (p1 - p0) * b_k + need * b_q, np.inf)
    m = np.unique(np.round(np.linspace(p0, p1 - 1, cells + 1)))
    lo, hi = m, np.append(m[1:], m[-1])              # each cell, and the last row alone
    rows = _tail_rows(hi[None, :], x[:, None])
    cost = (lo - p0 + 1)[None, :] * b_k + rows * b_q
    cost = np.where(x[:, None] <= run_pairs(p0, hi + 1)[None, :], cost, np.inf)
    return np.where(x > 0, cost.min(axis=1), 0.0)


def _grid_costs(p0, p1, after, x, b_q: float, b_k: float, cells: int) -> np.ndarray:
    """Per amount ``x[c]`` (a grid from 0 by equal steps): a lower bound on the bytes runs ``[p0,
    p1)`` together pay to shed at least it, each run credited a step more than it sheds (a dynamic
    programme over the grid; amounts past the last point count as the last)."""
    grid = len(x) - 1
    dp = np.full(grid + 1, np.inf)
    dp[0] = 0.0
    step = np.minimum(np.arange(grid + 1)[:, None] + np.arange(grid + 1)[None, :], grid)
    for r in range(len(p0)):
        cost = _run_costs(p0[r], p1[r], np.concatenate([[0.0], x[:-1]]), b_q, b_k, after[r], cells)
        new = np.full(grid + 1, np.inf)
        np.minimum.at(new, step.ravel(), (dp[:, None] + cost[None, :]).ravel())
        dp = new
    return dp


def tight_export_bytes(p0, p1, excess: float, b_q: float, b_k: float, after=0.0, top: int = 6,
                       grid: int = 512, cells: int = 256) -> float:
    """A lower bound on the bytes one node sends out to shed ``excess`` pairs of its runs ``[p0,
    p1)`` (``after``: as :func:`export_bytes`), tighter than the dual where a few long runs carry
    the export: the ``top`` runs with the most pairs per row are priced exactly (each its fewest
    bytes for every amount it sheds, :func:`_run_costs`), the others by the dual, and a dynamic
    programme over a grid of ``grid`` amounts splits the excess (each run credited a grid step
    more than it sheds, the others' dual taken at the rest: both below the truth). A run whose
    document goes on elsewhere either sends its keys or has its node compute all later rows
    (both tried, as the dual does)."""
    p0, p1 = np.asarray(p0, dtype=np.float64), np.asarray(p1, dtype=np.float64)
    after = np.broadcast_to(np.asarray(after, dtype=np.float64), p0.shape)
    if excess <= 0:
        return 0.0
    order = np.argsort(-p1, kind="stable")
    exact, rest = order[:top], order[top:]
    ahead = exact[after[exact] > 0]
    best = np.inf
    for k in range(2 ** len(ahead)):               # which of them take in their later rows instead
        pulled = ahead[[(k >> i) & 1 == 1 for i in range(len(ahead))]]
        need = excess + after[pulled].sum()
        x = np.arange(grid + 1) * need / grid
        kept = np.setdiff1d(exact, pulled)
        dp = _grid_costs(p0[kept], p1[kept], after[kept], x, b_q, b_k, cells)
        # the other runs shed the rest, at least what their dual says (0 for none)
        n = len(rest)
        others = export_bytes(np.repeat(np.arange(grid + 1), n), np.tile(p0[rest], grid + 1),
                              np.tile(p1[rest], grid + 1), need - x, b_q, b_k,
                              after=np.tile(after[rest], grid + 1)) if n else np.where(x < need, np.inf, 0.0)
        best = min(best, float(np.min(dp + others)))
    return best


def _run_pairs_for(p0, p1, c, b_q: float, b_k: float, cells: int, keys: float = 0.0) -> np.ndarray:
    """An upper bound on the pairs rows of one run ``[p0, p1)`` carry for at most ``c[i]`` bytes
    (their query rows, ``keys`` keys before the run and the run's up to the last): for a last row
    ``m`` in a cell ``[M_k, M_k+1]``, at most ``M_k``'s keys paid and rows carrying up to
    ``M_k+1 + 1`` pairs each."""
    m = np.unique(np.round(np.linspace(p0, p1 - 1, cells + 1)))
    lo, hi = m, np.append(m[1:], m[-1])
    rows = np.clip((c[:, None] - (lo - p0 + 1 + keys)[None, :] * b_k) / b_q, 0, (hi - p0 + 1)[None, :])
    return np.max(rows * (hi + 1)[None, :] - rows * (rows - 1) / 2, axis=1)


def receiver_bound(node, doc, p0, p1, size, b_q: float, b_k: float, eps: float = 0.05, top: int = 64,
                   grid: int = 512, cells: int = 128, points: int = 256, each: int = 16) -> float:
    """A lower bound on the bytes per slot of the busiest node, from the receiving side. The excess
    of the over-loaded nodes must end on nodes with room (a node's net intake is at most its
    room), and a node's bytes are at least what it receives: the query rows it takes in and, per
    run they come from, the document's keys up to the last but those it holds (runs as
    :func:`causal_runs` gives them). With ``B`` bytes per slot a node of ``s`` slots so takes in at
    most ``T(B s)`` pairs, and ``B`` is at least the least with ``sum_rooms min(room, T(B s)) >=
    sum_excess``. ``T`` bounds what any rows of the pool yield for a budget from above: a knapsack
    over a grid of ``grid`` budgets for the runs reaching an eighth of the longest (up to ``top``;
    each priced down to the grid: their key prefixes are fixed costs a dual would spread) and the
    dual at ``points`` prices for the others; per node with room when at most ``each`` have room,
    else once, crediting every one with the keys the best placed of them holds. Every node with
    room may take the pool's best rows, so this binds only when few nodes have room."""
    node, doc = np.asarray(node, dtype=np.int64), np.asarray(doc, dtype=np.int64)
    p0, p1 = np.asarray(p0, dtype=np.float64), np.asarray(p1, dtype=np.float64)
    size = np.asarray(size, dtype=np.float64)
    work = np.bincount(node, run_pairs(p0, p1), minlength=len(size))
    room = size * (1 + eps) * work.sum() / size.sum() - work
    need, takers = np.maximum(-room, 0).sum(), np.nonzero(room > 0)[0]
    if need <= 0 or takers.size == 0:
        return 0.0
    order = np.argsort(-p1, kind="stable")
    exact = order[:min(top, int((p1 >= p1.max() / 8).sum()))]
    held = _held_keys(node, doc, p0, p1, len(size), takers, exact)
    if len(takers) > each:
        held = held.max(axis=0, keepdims=True)
    c, yields = _intake(order, exact, held, p0, p1, room.max(), b_q, b_k, grid, cells, points)

    def takes(per_slot):   # a budget between grid points buys at most the next point's
        budget = per_slot * size[takers]
        k = np.minimum(np.searchsorted(c, budget), grid)
        got = yields[np.arange(len(takers)) % len(yields), k]
        return np.minimum(room[takers], np.where(budget > c[-1], np.inf, got)).sum()
    lo, hi = 0.0, float(c[-1] / size[takers].min())
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if takes(mid) < need else (lo, mid)
    return lo


def _held_keys(node, doc, p0, p1, nodes: int, takers, exact) -> np.ndarray:
    """``[takers, exact]``: the keys before each run of ``exact`` a taker holds (a document's earlier runs)."""
    held = np.zeros((len(takers), len(exact)))
    for k, i in enumerate(exact.tolist()):
        j = np.nonzero((doc == doc[i]) & (p1 <= p0[i]))[0]
        held[:, k] = np.bincount(node[j], p1[j] - p0[j], minlength=nodes)[takers]
    return held


def _intake(order, exact, held, p0, p1, most: float, b_q: float, b_k: float, grid: int, cells: int, points: int
            ) -> tuple[np.ndarray, np.ndarray]:
    """:func:`receiver_bound`'s ``T``: the budgets ``c [grid + 1]`` (up to what importing ``most``
    pairs through the longest run costs) and per row of ``held`` the most pairs rows carry for
    each, ``[len(held), grid + 1]``: the runs ``exact`` (the first of ``order``, longest first) by
    a knapsack, the rest by the dual."""
    rest = order[len(exact):]
    # budgets up to what the cheapest import of the largest room costs through the longest run
    i = order[0]
    a = p1[i] - np.sqrt(max(p1[i] ** 2 - 2 * most, 0.0))
    c = np.arange(grid + 1) * (a * b_q + p1[i] * b_k + most / max(p1[i], 1) * b_q) / grid
    pick = np.arange(grid + 1)[:, None] - np.arange(grid + 1)[None, :]          # [budget, spent]
    lam = np.geomspace(b_q / max(float(p1.max()), 1.0) / 16, (b_q + b_k) * 4, points)
    one = np.zeros(len(rest), dtype=np.int64)
    value = np.array([_dual(np.array([v]), one, p0[rest], p1[rest], np.zeros(1), b_q, b_k, 1.0,
                            np.zeros(len(rest)))[0][0] for v in lam])
    others = np.min((c[:, None] - value[None, :]) / lam[None, :], axis=1)     # the dual, any price
    yields = []
    for h in held:
        dp = others.copy()            # most pairs for each budget (a long run's cost rounded down)
        for k, r in enumerate(exact.tolist()):
            gain = _run_pairs_for(p0[r], p1[r], c + c[1], b_q, b_k, cells, p0[r] - h[k])
            dp = np.max(np.where(pick >= 0, dp[np.maximum(pick, 0)] + gain[None, :], -np.inf), axis=1)
        yields.append(dp)
    return c, np.asarray(yields)


def node_bound(doc_lens, slots: Shards, node_of, shape: AttnShape, eps: float = 0.05,
               boundary: bool = False, tight: float = 0.0, resend: bool = True) -> np.ndarray:
    """Per node: the fewest inter-node bytes per slot of the node, over forward and backward, of
    any CAD plan leaving at most ``(1 + eps)`` times the mean pairs on every slot (causal
    documents ``doc_lens`` over the ``slots``' tokens; ``node_of[slot]`` dense node numbers).
    ``boundary``: also count the keys of documents going on at other nodes (module docstring);
    ``tight``: nodes whose dual bound is within this share of the largest also get
    :func:`tight_export_bytes` (a few per cell: it runs a dynamic programme per node); ``resend``: the
    backward's bytes (:func:`row_costs`)."""
    node_of = np.asarray(node_of, dtype=np.int64)
    size = np.bincount(node_of).astype(np.float64)
    lens = np.asarray(doc_lens, dtype=np.int64)
    node, doc, p0, p1 = causal_runs(np.cumsum(lens) - lens, np.cumsum(lens), slots, node_of)
    after = after_pairs(node, doc, p0, p1, lens) if boundary else np.zeros(len(node))
    b_q, b_k = row_costs(shape, resend)
    excess = export_excess(node, p0, p1, size, eps)
    bound = export_bytes(node, p0, p1, excess, b_q, b_k, after=after) / size
    if tight > 0:
        for n in np.nonzero(bound >= (1 - tight) * bound.max())[0].tolist():
            at = node == n
            bound[n] = max(bound[n], tight_export_bytes(p0[at], p1[at], excess[n], b_q, b_k, after[at]) / size[n])
    return bound


def tight_bound(doc_lens, slots: Shards, node_of, shape: AttnShape, eps: float = 0.05, near: float = 0.15,
                resend: bool = True) -> float:
    """A lower bound on the busiest slot's inter-node bytes, tighter than :func:`node_bound`'s
    largest: the keys of documents going on at other nodes counted, the nodes whose dual bound is
    within ``near`` of the largest priced by :func:`tight_export_bytes`, and what the nodes with
    room can take in (:func:`receiver_bound`)."""
    node_of = np.asarray(node_of, dtype=np.int64)
    size = np.bincount(node_of).astype(np.float64)
    lens = np.asarray(doc_lens, dtype=np.int64)
    node, doc, p0, p1 = causal_runs(np.cumsum(lens) - lens, np.cumsum(lens), slots, node_of)
    sending = node_bound(doc_lens, slots, node_of, shape, eps, boundary=True, tight=near, resend=resend).max()
    return max(float(sending), receiver_bound(node, doc, p0, p1, size, *row_costs(shape, resend), eps=eps))
