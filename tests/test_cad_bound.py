"""The lower bound on a node's inter-node export bytes (distattn/schedulers/cad/bound.py) against
every export of small cases, and the rows the placement exports by it."""

import itertools

import numpy as np
import pytest

from distattn.planning.layout import Layout
from distattn.planning.schedule import AttnShape
from distattn.schedulers.cad.bound import (after_pairs, causal_runs, export_bytes, export_excess, export_rows,
                                           node_bound, receiver_bound, row_costs, run_pairs, tight_export_bytes)


def _cheapest(runs, excess, b_q, b_k):
    """The fewest bytes of any set of rows of ``runs`` (``(p0, p1)`` each, one node) carrying at
    least ``excess`` pairs: every subset of every run's rows."""
    options = []   # per run: (pairs, bytes) of each subset of its rows
    for p0, p1 in runs:
        rows = range(p0, p1)
        per = [(0, 0.0)]
        for k in range(1, len(rows) + 1):
            for s in itertools.combinations(rows, k):
                per.append((sum(j + 1 for j in s), k * b_q + (max(s) - p0 + 1) * b_k))
        options.append(per)
    return min((sum(c for _, c in pick) for pick in itertools.product(*options)
                if sum(p for p, _ in pick) >= excess), default=np.inf)


@pytest.mark.parametrize("b_q,b_k", [(32.0, 12.0), (3.0, 20.0), (50.0, 1.0)])
def test_the_bound_never_exceeds_the_cheapest_export(b_q, b_k):
    runs = [(0, 4), (2, 5), (3, 6)]   # a whole document and two documents' later rows
    node = np.zeros(len(runs), dtype=np.int64)
    p0, p1 = np.array(runs).T
    total = int(run_pairs(p0, p1).sum())
    for excess in range(0, total + 1, 3):
        bound = export_bytes(node, p0, p1, [excess], b_q, b_k)[0]
        best = _cheapest(runs, excess, b_q, b_k)
        assert bound <= best * (1 + 1e-9) + 1e-9, (excess, bound, best)
        if excess == total:   # everything leaves: every row and every key, exactly
            assert bound == pytest.approx(sum(p1 - p0) * (b_q + b_k))


def test_obvious_cases_and_monotone():
    node, p0, p1 = np.array([0, 0, 1]), np.array([0, 0, 100]), np.array([1000, 300, 900])
    assert row_costs(AttnShape(32, 8, 128, 2), resend=False) == (32 * 1024, 12 * 1024)
    # resend (the default): Q and out again, and lse (fp32) back and again; K/V again
    b_q, b_k = row_costs(AttnShape(32, 8, 128, 2))
    assert (b_q, b_k) == (48 * 1024 + 32 * 8, 16 * 1024)
    assert (export_bytes(node, p0, p1, [0, 0], b_q, b_k) == 0).all()
    steps = np.linspace(0, run_pairs(0, 1000), 30)
    bounds = [export_bytes(node, p0, p1, [e, 0], b_q, b_k)[0] for e in steps]
    assert (np.diff(bounds) >= -1e-6).all() and bounds[-1] > 0
    # one long document: its last a rows with a = L - sqrt(L^2 - 2E) (schedulers/cad/bound.py) are the
    # cheapest export when E is much of its work; the dual spreads their key prefix over pairs
    length, excess = 100_000, 0.6 * run_pairs(0, 100_000)
    a = length - np.sqrt(length ** 2 - 2 * excess)
    bound = export_bytes([0], [0], [length], [excess], b_q, b_k)[0]
    assert 0.92 * (a * b_q + length * b_k) <= bound <= a * b_q + length * b_k
    with pytest.raises(ValueError):
        export_bytes([0], [5], [3], [1], b_q, b_k)


def test_runs_excess_and_node_bound():
    """Two nodes of two slots: node 0 holds a 6000-token document and the head of one crossing to
    node 1; the bound per slot is what node 0 must export, halved."""
    docs = [6000, 3000, 3000]     # 12000 tokens, 3000 a slot
    slots = Layout("contiguous").shards(docs, 4)
    lens = np.asarray(docs)
    node, doc, p0, p1 = causal_runs(np.cumsum(lens) - lens, np.cumsum(lens), slots, [0, 0, 1, 1])
    assert node.tolist() == [0, 1, 1] and doc.tolist() == [0, 1, 2]
    assert p0.tolist() == [0, 0, 0] and p1.tolist() == [6000, 3000, 3000]
    excess = export_excess(node, p0, p1, [2, 2], eps=0.05)
    work = run_pairs(p0, p1)
    assert excess[1] == 0 and excess[0] == pytest.approx(work[0] - 2 * 1.05 * work.sum() / 4)
    shape = AttnShape(32, 8, 128, 2)
    bound = node_bound(docs, slots, [0, 0, 1, 1], shape)
    alone = export_bytes([0], [0], [6000], excess[:1], *row_costs(shape))[0]
    assert bound[1] == 0 and bound[0] == pytest.approx(alone / 2)


def test_export_rows_shed_the_excess_from_few_documents():
    """A node holding one long and many short documents sheds its excess as the long one's tail
    (one key prefix), not as slivers of every document; the rows chosen carry the excess."""
    node = np.zeros(11, dtype=np.int64)
    p0 = np.zeros(11, dtype=np.int64)
    p1 = np.array([50_000] + [5_000] * 10)
    excess = 0.3 * run_pairs(0, 50_000)
    first = export_rows(node, p0, p1, [excess], 32.0, 12.0)
    assert (first[1:] == p1[1:]).all() and first[0] < p1[0]
    shed = run_pairs(first, p1).sum()
    assert excess <= shed <= excess + 50_000


@pytest.mark.parametrize("b_q,b_k", [(32.0, 12.0), (3.0, 20.0)])
def test_the_tight_bound_never_exceeds_the_cheapest_export(b_q, b_k):
    runs = [(0, 5), (2, 6), (3, 7)]
    p0, p1 = np.array(runs).T
    total = int(run_pairs(p0, p1).sum())
    for excess in range(1, total + 1, 2):
        assert tight_export_bytes(p0, p1, excess, b_q, b_k, top=2, grid=64) <= _cheapest(runs, excess, b_q, b_k) + 1e-9


def test_the_tight_bound_prices_a_long_document_exactly():
    """Where the dual spreads one long document's key prefix (6% low above), the tight bound is
    within 1% of its tail's bytes; beside short documents it still is."""
    b_q, b_k = row_costs(AttnShape(32, 8, 128, 2))
    length, excess = 100_000, 0.6 * run_pairs(0, 100_000)
    tail = (length - np.sqrt(length ** 2 - 2 * excess)) * b_q + length * b_k
    assert 0.99 * tail <= tight_export_bytes([0], [length], excess, b_q, b_k) <= tail
    p0, p1 = np.zeros(41), np.array([length] + [3000] * 40)
    assert 0.99 * tail <= tight_export_bytes(p0, p1, excess, b_q, b_k) <= tail


def test_receiver_bound():
    """Two nodes of one slot: node 0 holds a long document, node 1 ten rows: node 1 must take in
    node 0's excess, the fewest rows carrying it at the document's end with its whole key prefix;
    with no excess nothing need move."""
    b_q, b_k = 32.0, 12.0
    node, doc, p0, p1 = np.array([0, 1]), np.arange(2), np.zeros(2), np.array([3000.0, 10])
    work = run_pairs(p0, p1)
    need = work[0] - 1.05 * work.sum() / 2
    rows = 3000 - np.sqrt(3000 ** 2 - 2 * need)
    bound = receiver_bound(node, doc, p0, p1, np.ones(2), b_q, b_k)
    assert 0.97 * (rows * b_q + 3000 * b_k) <= bound <= rows * b_q + 3000 * b_k
    assert receiver_bound(node, doc, p0, np.array([10.0, 10]), np.ones(2), b_q, b_k) == 0


def test_after_pairs_counts_the_rows_other_nodes_hold_later():
    """Node 0 holds rows 0..9 and 20..29 of a 40-row document, node 1 rows 10..19 and 30..39: what
    comes after a run on other nodes is the later rows but the node's own later run."""
    node, doc = np.array([0, 1, 0, 1, 1]), np.array([0, 0, 0, 0, 1])
    p0, p1 = np.array([0, 10, 20, 30, 0]), np.array([10, 20, 30, 40, 5])
    want = [run_pairs(10, 40) - run_pairs(20, 30), run_pairs(20, 40) - run_pairs(30, 40), run_pairs(30, 40), 0, 0]
    assert after_pairs(node, doc, p0, p1, [40, 5]).tolist() == want
