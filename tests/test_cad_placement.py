"""CAD's communication-aware placement and what the simulator charges for it (dry plans, no processes)."""

import dataclasses

import numpy as np
import pytest

import distattn
from distattn.costmodel.network import default_profile
from distattn.planning.doclens import pack
from distattn.planning.schedule import AttnShape
from distattn.costmodel.cost import Roofline
from distattn.planning.layout import even_bounds
from distattn.schedulers.cad import Traffic
from distattn.schedulers.cad.ledger import LinkCost, RowBytes
from distattn.sim.simulate import comm_time

SHAPE = AttnShape(32, 8, 128, 2)
# the placement's own behaviour (which rows move where, what they cost to move) on a cost model that
# prices every pair alike; the tile model's seconds (the default) are balanced in test_balance_at_the_defaults
ROOF = Roofline()


def _docs(ranks, tokens_per_rank=16384, seed=0):
    """Packed documents with a few long ones (a log-normal body and a 6-rank document)."""
    return pack(ranks * tokens_per_rank - 6 * tokens_per_rank, seed=seed, median=2000) + [6 * tokens_per_rank]


def _moved(schedule) -> tuple[np.ndarray, np.ndarray]:
    """Per slot: bytes sent and received over forward and backward (the phases' transfers)."""
    tr = schedule.traffic()
    sent = sum(ph.total(schedule.pool_size) for ph in schedule.phases(SHAPE) if ph.is_comm)
    q_b, dkv_b = SHAPE.row_bytes(32), 2 * SHAPE.row_bytes(8, acc=True)
    off = tr.owner != tr.comp
    to_w = tr.q * 2 * q_b + tr.kv * SHAPE.kv_row   # Q, dout; K/V
    back = tr.q * 2 * q_b + tr.kv * dkv_b           # out, dQ; dK/dV
    recv = np.bincount(tr.comp[off], to_w[off], schedule.pool_size) + np.bincount(tr.owner[off], back[off],
                                                                                   schedule.pool_size)
    return np.asarray(sent), recv


def test_link_cost_and_row_bytes():
    links = LinkCost.of(default_profile(), 64)
    assert links.gpus_per_node == 8 and links.inter_s_per_byte > 4 * links.intra_s_per_byte
    assert LinkCost.of(default_profile(), 8).intra_s_per_byte == links.intra_s_per_byte
    keep = RowBytes.of(32, 8, 128, 2, resend=False)   # Q, dout out and out, dQ back (bf16); K/V bf16 out, fp32 back
    assert keep.q == 4 * 32 * 128 * 2 and keep.kv == 2 * 8 * 128 * (2 + 4)
    # resend (the default): Q, out, dout again and lse back and out again (fp32); K/V again
    rows = RowBytes.of(32, 8, 128, 2)
    assert rows.q == 6 * 32 * 128 * 2 + 2 * 32 * 4 and rows.kv == 2 * 8 * 128 * (2 * 2 + 4)


@pytest.mark.parametrize("ranks,seconds", [(16, 1.05), (64, 1.16)])
def test_balance_at_the_defaults(ranks, seconds):
    """By default cad balances the kernel's seconds on an H100 (the tile model); with a roofline, FLOPs.
    At 64 ranks the 6-rank document's last rows each pay the backward's fixed cost over its 98K keys
    (~6 ms of a rank's ~36): a piece cut off its end duplicates that cost, so its chunk's rank keeps
    ~14% above the mean."""
    docs = _docs(ranks)
    st = distattn.plan(docs, ranks, scheduler="cad").stats(32, 8, 128)
    assert st["seconds_imbalance"] <= seconds
    roof = distattn.plan(docs, ranks, scheduler="cad", cost=ROOF).stats(32, 8, 128)
    assert roof["flops_imbalance"] <= 1.05
    zig = distattn.plan(docs, ranks, scheduler="zigzag").stats(32, 8, 128)
    assert zig["flops_imbalance"] > max(st["flops_imbalance"], roof["flops_imbalance"])


def test_keys_go_once_per_destination_and_moves_stay_in_the_node():
    """Rank 0 holds one long document, ranks 1-7 (its node) tiny documents, ranks 8-15 documents
    that load them to about the mean: most of rank 0's work goes to its own node (7 of the 15
    other ranks), and each (owner, destination) pair moves its keys once."""
    ranks, tokens = 16, 8192
    docs = [tokens] + [64] * (7 * tokens // 64) + [1024] * (8 * tokens // 1024)
    schedule = distattn.plan(docs, ranks, scheduler="cad", cost=ROOF).schedule
    seg = schedule.segments
    moved = (seg.q0 < tokens) & (seg.rank != 0)
    area = np.bincount(seg.rank[moved], seg.area[moved], ranks)
    assert area[:8].sum() >= 0.75 * area.sum()
    tr = schedule.traffic()
    pairs = tr.owner * ranks + tr.comp
    assert len(np.unique(pairs)) == len(pairs)


def test_a_slow_network_moves_less_than_a_fast_one_when_overlap_is_priced():
    """With ``overlap_s`` given, a move must save more attention than the communication it exposes:
    the slower the network, the fewer the moves (and the more imbalance is left)."""
    ranks, docs = 32, _docs(32)
    fast = distattn.plan(docs, ranks, scheduler="cad", network=default_profile(), overlap_s=0.05).schedule
    slow_net = default_profile()
    slow_net = dataclasses.replace(slow_net, inter_busbw_gbs=0.5, rows=tuple(
        dataclasses.replace(m, time_us=m.time_us * 100) for m in slow_net.rows))
    slow = distattn.plan(docs, ranks, scheduler="cad", network=slow_net, overlap_s=0.0).schedule
    moved_fast = int(_moved(fast)[0].sum())
    moved_slow = int(_moved(slow)[0].sum())
    assert moved_slow < moved_fast
    assert slow.stats(32, 8, 128)["flops_imbalance"] > fast.stats(32, 8, 128)["flops_imbalance"]


def test_traffic_is_sparse_and_matches_the_dense_matrices():
    docs = [5000, 300, 40, 1200, 7000, 90, 2000]
    schedule = distattn.plan(docs, 6, scheduler="cad", epsilon=0.01).schedule
    tr = schedule.traffic()
    q, kv = tr.matrices()
    seg = schedule.segments
    for c in range(6):  # query rows per computing slot are the rows of its segments
        assert q[:, c].sum() == (seg.q1 - seg.q0)[seg.rank == c].sum()
    assert isinstance(tr, Traffic) and q.sum() == sum(docs)
    # K/V rows to a slot: the union of its segments' key ranges
    for c in range(6):
        mine = seg.rank == c
        keys = set()
        for a, b in zip(seg.k0[mine], seg.k1[mine]):
            keys |= set(range(int(a), int(b)))
        assert kv[:, c].sum() == len(keys)


def test_phases_split_intra_and_inter_node_bytes_and_the_simulator_waits_for_the_slower():
    ranks = 32
    schedule = distattn.plan(_docs(ranks), ranks, scheduler="cad").schedule
    net = default_profile()
    for ph in schedule.phases(SHAPE):
        if not ph.is_comm:
            continue
        assert ph.intra is not None and ph.inter is not None and ph.peers is not None and ph.links is not None
        assert (ph.intra + ph.inter >= ph.amount).all()   # max(sent, recv) per kind covers what is sent
        t, moving = comm_time(net, ph), ph.amount > 0
        for n, sent in ((ranks, ph.inter), (8, ph.intra)):   # each link's bytes; the latency of the rank's peers
            bandwidth = net.time("all_to_all", n, sent * n / (n - 1)) - net.fit("all_to_all", n).alpha_us * 1e-6
            assert (t[moving] >= bandwidth[moving] - 1e-12).all()
    q_hops, kv_hops = schedule.hops   # 4 nodes: K/V down trees, Q in shares over the slots of both nodes
    assert q_hops == 3 and kv_hops >= 3
    # one phase per kind of rows, hop h its step h - 1: resend (the default) sends lse back with out
    # and the workers' rows again in the backward; keep only dout
    q, kv = ("Q", q_hops), ("K/V", kv_hops)
    want = {"resend": [q, kv, ("out", q_hops), ("lse", q_hops), ("Q, out, dout, lse", q_hops), kv],
            "keep": [q, kv, ("out", q_hops), ("dout", q_hops)]}
    for backward, phases in want.items():
        got = distattn.plan(_docs(ranks), ranks, scheduler="cad", backward=backward).schedule
        assert got.hops == schedule.hops
        phases = phases + [("dQ", q_hops), ("dK/dV", kv_hops)]
        assert [(ph.what, int(ph.steps.max()) + 1) for ph in got.phases(SHAPE) if ph.is_comm] == \
            [(f"{rows} to {'workers' if i < len(phases) - 2 and rows not in ('out', 'lse') else 'owners'}", hops)
             for i, (rows, hops) in enumerate(phases)]
        one_node = distattn.plan(_docs(8), 8, scheduler="cad", backward=backward).schedule
        assert [int(ph.steps.max()) for ph in one_node.phases(SHAPE) if ph.is_comm] == [0] * len(phases)


def test_bad_options():
    with pytest.raises(ValueError, match="overlap_s"):
        distattn.plan([100, 200], 2, scheduler="cad", overlap_s=-1)
    with pytest.raises(ValueError, match="network"):
        distattn.plan([100, 200], 2, scheduler="cad", network="fast")


def test_even_bounds_pool_matches_simulated_pool():
    """The simulator pools replicas as one token space: replica boundaries are slot boundaries."""
    b = even_bounds(4 * 1000, 8)
    assert set(range(0, 4001, 1000)) <= set(b.tolist())


def test_balance_and_planning_tables_run(capsys):
    from distattn.bench import cad_balance, planning

    assert cad_balance.main(["--ranks", "8", "--tokens-per-rank", "2048"]) == 0
    out = capsys.readouterr().out
    assert "max/mean" in out and out.count("\n") == 5   # header + cad, cad eps, zigzag, ring
    assert planning.main(["--ranks", "16", "--tokens-per-rank", "1024"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[2:8] == ["ring", "zigzag", "allgather", "ulysses", "usp", "cad"] and len(lines) == 2


def test_simulated_cad_table_quick(capsys):
    from distattn.sim import cad_table

    assert cad_table.main(["--quick", "--draws", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    row = lines[2].split()
    assert row[:3] == ["lognormal", "llama3-8b", "h100"] and "1 configurations" in lines[-1]
    assert float(row[7]) >= 1 and float(row[8]) > 0 and float(row[9]) > 0   # cad/ideal, wlb/cad, wlb-ideal/cad


def test_placement_stops_when_no_move_fits(monkeypatch):
    """A rank none of whose tasks fits anywhere (one query row, reading its key prefix, costing more
    than any rank's room: seen in the simulator's 512-GPU rows) ends placement; it used to price
    the same moves until the iteration cap (50 x ranks + 100 rounds, a minute at 512 ranks)."""
    from distattn.schedulers.cad import placement as cad_placement

    rounds = []
    real_choose = cad_placement.choose
    monkeypatch.setattr(cad_placement, "choose", lambda *a: rounds.append(1) or real_choose(*a))
    monkeypatch.setattr(cad_placement, "_move", lambda *a: False)
    distattn.plan(_docs(16), 16, scheduler="cad")   # two nodes of 8: the node passes run too
    assert 0 < len(rounds) <= 16 + 2, len(rounds)


def test_an_overloaded_node_exports_its_excess_as_the_tails_of_its_documents():
    """Node 0 (ranks 0-7) holds one causal document of 65536 tokens, nodes 1-3 short documents:
    almost all the work is node 0's. What leaves node 0 is the document's last rows -- within 5%
    of the fewest query rows that carry that much work (moved piece by piece by the busiest rank,
    22% more rows left)."""
    ranks, tokens = 32, 8192
    n = 8 * tokens
    plan = distattn.plan([n] + [512] * (24 * tokens // 512), ranks, scheduler="cad", cost=ROOF)
    assert plan.stats(32, 8, 128)["flops_imbalance"] <= 1.05
    s = plan.schedule.segments
    away = (s.q0 < n) & (s.rank >= 8)
    work = float(s.area[away].sum())                 # (query, key) pairs computed off node 0
    fewest = n - np.sqrt(n * n - 2 * work)           # the last r rows: r n - r^2 / 2 pairs
    assert fewest > n / 3
    assert (s.q1[away] - s.q0[away]).sum() <= 1.05 * fewest


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_busiest_rank_moves_close_to_the_bound(seed):
    """Four nodes of 8 ranks, one long document among short ones: the busiest rank's inter-node
    bytes (forward and backward) stay within 10% of the busiest node's export lower bound (rank by
    rank piece moves and relays sending a document's keys to every node took 12-13% more), and
    never below the tighter bound (it is one)."""
    from distattn.schedulers.cad.bound import node_bound, tight_bound

    ranks = 32
    docs = _docs(ranks, seed=seed)
    for backward in ("resend", "keep"):
        schedule = distattn.plan(docs, ranks, scheduler="cad", backward=backward, cost=ROOF).schedule
        inter = sum(np.bincount(ph.rank, ph.inter, ranks) for ph in schedule.phases(SHAPE) if ph.is_comm)
        nodes, resend = schedule.nodes.dense, backward == "resend"
        assert inter.max() <= 1.10 * node_bound(docs, schedule.slots, nodes, SHAPE, resend=resend).max(), backward
        assert inter.max() >= tight_bound(docs, schedule.slots, nodes, SHAPE, resend=resend), backward
        assert schedule.stats(32, 8, 128)["flops_imbalance"] <= 1.05


def test_the_export_pass_runs_with_overlap_priced():
    """With ``overlap_s`` the export between nodes still runs where it pays off: node 0's long
    document leaves as its tail, as without; on a network too slow for it to pay off, nothing of it
    leaves the node."""
    ranks, tokens = 32, 8192
    n = 8 * tokens
    docs = [n] + [512] * (24 * tokens // 512)

    def away(**options):
        s = distattn.plan(docs, ranks, scheduler="cad", cost=ROOF, **options).schedule.segments
        return ((s.q0 < n) & (s.rank >= 8)), s
    plain, s0 = away()
    priced, s1 = away(network=default_profile(), overlap_s=0.05)
    assert (s1.q1 - s1.q0)[priced].sum() == pytest.approx((s0.q1 - s0.q0)[plain].sum(), rel=0.03)
    slow_net = default_profile()
    slow_net = dataclasses.replace(slow_net, inter_busbw_gbs=0.01, rows=tuple(
        dataclasses.replace(m, time_us=m.time_us * 1e4) for m in slow_net.rows))
    slow, _ = away(network=slow_net, overlap_s=0.0)
    assert not slow.any()
