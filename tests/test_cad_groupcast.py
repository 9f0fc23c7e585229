"""CAD's group-cast of K/V over nodes and group-reduce of dK/dV (distattn/schedulers/cad/cast.py):
the legs on a hand-made case, exactness in gloo runs whose "nodes" are smaller than the world, and
the bytes each rank sends inside and across nodes, counted by the executor, against the schedule."""

import dataclasses

import numpy as np
import pytest
import torch
import torch.distributed as dist

import distattn
from conftest import max_err, rand_qkv
from distattn.planning.layout import Layout
from distattn.costmodel.network import default_profile
from distattn.planning.schedule import AttnShape
from distattn.schedulers.cad.cast import Nodes, key_legs, query_legs
from distattn.distributed.spawn import run_distributed


def _legs(legs, hop):
    at = legs.hop == hop
    return sorted(zip(legs.src[at].tolist(), legs.dst[at].tolist(), legs.start[at].tolist(), legs.end[at].tolist()))


def _received(legs, slot, slots):
    return set(np.concatenate([np.concatenate(legs.per_peer(h, slot, slots, sending=False))
                               for h in range(1, legs.hops + 1)]).tolist())


def test_keys_cross_to_a_node_once_and_fan_out_inside_it():
    """4 slots of 100 tokens, 2 per node. Slots 2 and 3 (node 1) both need keys 0..149, slot 2
    150..179 too; slot 1 needs 0..99 (its own node holds them)."""
    slots = Layout("contiguous").shards([400], 4)
    comp = np.array([1, 2, 2, 3])
    a, b = np.array([0, 0, 150, 0]), np.array([100, 150, 180, 150])
    legs = key_legs(comp, a, b, slots, Nodes.even(4, 2))
    # what crosses to a node, per owner, in two equal shares, one per slot there: owner 0 sends
    # rows 0..99 (shares 0..49, 50..99), owner 1 rows 100..179 (100..139, 140..179). Hop 1: slot 1
    # gets slot 0's rows over NVLink (to compute on, and share 1 to send on), slot 0 slot 1's share
    # 0; an owner keeps the share it sends itself
    assert _legs(legs, 1) == [(0, 0, 0, 50), (0, 1, 0, 100), (1, 0, 100, 140), (1, 1, 140, 180)]
    # hop 2: each row crosses to node 1 once, share 0 to slot 2, share 1 to slot 3
    assert _legs(legs, 2) == [(0, 2, 0, 50), (0, 2, 100, 140), (1, 3, 50, 100), (1, 3, 140, 180)]
    # hop 3: each slot forwards inside node 1 what the other slot needs of its shares
    assert _legs(legs, 3) == [(2, 3, 0, 50), (2, 3, 100, 140), (3, 2, 50, 100), (3, 2, 140, 180)]
    for c in range(4):   # every slot receives its keys, and a relay what it forwards
        need = set().union(*(range(x, y) for x, y, cc in zip(a, b, comp) if cc == c))
        assert need <= _received(legs, c, 4)


def test_a_tree_of_nodes_bounds_the_copies_a_slot_sends():
    """One slot per node; slot 0's keys are needed by 4 nodes, nested (a causal prefix): with
    fanout 2 slot 0 sends two copies, and each further node hangs under the node of the tree with
    the fewest rows to move so far (a relay receives once and sends up to twice)."""
    slots = Layout("contiguous").shards([500], 5)
    comp = np.array([1, 2, 3, 4])
    a, b = np.zeros(4, dtype=np.int64), np.array([90, 80, 70, 60])
    legs = key_legs(comp, a, b, slots, Nodes.even(5, 1), fanout=2)
    assert _legs(legs, 1) == [(0, 0, 0, 90)]       # a node of one slot: no peer to hand rows to
    assert _legs(legs, 2) == [(0, 1, 0, 90), (0, 2, 0, 80)]
    # node 2 (80 rows in) relays to node 3; then node 3 (70 in) moves less than node 1 (90 in)
    # or node 2 (80 in, 70 out)
    assert _legs(legs, 3) == [(2, 3, 0, 70)]
    assert _legs(legs, 4) == [(3, 4, 0, 60)]
    # a node already moving many rows (its queries) relays nothing
    legs = key_legs(comp, a, b, slots, Nodes.even(5, 1), fanout=2, load=np.array([0, 0, 1000, 0, 0]))
    assert _legs(legs, 3) == [(1, 3, 0, 70)]
    assert _legs(legs, 4) == [(3, 4, 0, 60)]
    for c in range(1, 5):
        assert set(range(b[c - 1])) <= _received(legs, c, 5)


def test_queries_cross_nodes_share_by_share():
    """Slot 0's queries 0..9 go to slot 1 (its node: straight), 10..19 to slot 2, 20..69 to slot 3:
    the 60 rows crossing to node 1 go in two shares, 10..39 by slot 0 to slot 2 and 40..69 by slot
    1 to slot 3, and slot 2 forwards slot 3 its part of share 0 -- both network cards of both nodes
    carry half, though one slot sends them and another gets most."""
    slots = Layout("contiguous").shards([400], 4)
    legs = query_legs(np.array([1, 2, 3]), np.array([0, 10, 20]), np.array([10, 20, 70]), slots, Nodes.even(4, 2))
    assert _legs(legs, 1) == [(0, 0, 10, 40), (0, 1, 0, 10), (0, 1, 40, 70)]
    assert _legs(legs, 2) == [(0, 2, 10, 40), (1, 3, 40, 70)]
    assert _legs(legs, 3) == [(2, 3, 20, 40)]


def test_on_one_node_everything_is_direct():
    slots = Layout("zigzag").shards([64, 64], 4)
    comp = np.array([0, 1, 2, 3, 3])
    a, b = np.array([0, 0, 10, 64, 100]), np.array([60, 30, 40, 90, 128])
    legs = key_legs(comp, a, b, slots, Nodes.even(4, 8))
    assert legs.hops == 1
    assert sorted(_received(legs, 3, 4)) == list(range(64, 90)) + list(range(100, 128))


def _network(gpus_per_node):
    return dataclasses.replace(default_profile(), gpus_per_node=gpus_per_node)


DOCS = [[600, 40, 10, 30, 24], [300, 250, 50, 10, 10], [12, 900]]


def _worker(cases, gpus_per_node):
    return [_case(*case, gpus_per_node) for case in cases]


def _case(docs, causal, window, gpus_per_node):
    hq, hkv, d = 4, 2, 8
    total = sum(docs)
    q, k, v = rand_qkv(total, total, hq, hkv, d, seed=3)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = distattn.reference_attention(*ref_in, docs, causal=causal, window=window)
    ref.backward(dout)
    plan = distattn.plan(docs, dist.group.WORLD, scheduler="cad", causal=causal, window=window, epsilon=0.01,
                         network=_network(gpus_per_node))
    mine = [plan.shard(t).clone().requires_grad_() for t in (q, k, v)]
    ex = plan._runtime.executor
    out = distattn.attention(*mine, plan)
    fwd = dict(ex.link_bytes)
    out.backward(plan.shard(dout))
    bwd = {kind: ex.link_bytes[kind] - fwd[kind] for kind in fwd}
    errs = [max_err(out.detach(), plan.shard(ref.detach()))]
    errs += [max_err(a.grad, plan.shard(b.grad)) for a, b in zip(mine, ref_in)]
    want = {}
    for direction in ("forward", "backward"):
        phases = [ph for ph in plan.schedule.phases(AttnShape(hq, hkv, d, 8))
                  if ph.is_comm and ph.direction == direction]
        mine = [ph.rank == plan.rank for ph in phases]   # every hop's entry of this rank
        inter = sum(int(ph.inter_sent[m].sum()) for ph, m in zip(phases, mine))
        want[direction] = {"intra": sum(int(ph.amount[m].sum()) for ph, m in zip(phases, mine)) - inter, "inter": inter}
    return max(errs), fwd, bwd, want, plan.schedule.hops


@pytest.mark.parametrize("world, gpus_per_node", [(4, 2), (6, 2), (6, 3)])
def test_group_cast_is_exact_and_sends_what_the_schedule_says(world, gpus_per_node):
    cases = [(docs, causal, window) for docs in DOCS for causal, window in ((True, None), (False, None), (True, 64))]
    hops = set()
    for results in run_distributed(_worker, world, cases, gpus_per_node, timeout=600):
        for case, (err, fwd, bwd, want, q_kv_hops) in zip(cases, results):
            assert err < 1e-12, (case, err)
            assert fwd == want["forward"] and bwd == want["backward"], (case, fwd, bwd, want)
            hops.add(q_kv_hops)
    assert max(q for q, _ in hops) == 3 and max(kv for _, kv in hops) >= 3, hops   # shares cross and fan out


def test_covered_quantiles_weigh_rows_by_the_intervals_covering_them():
    """Rows 0..59 go to two nodes, 60..99 to one: equal shares of what leaves cut at 40, not 50."""
    from distattn.schedulers.cad.cast import covered_quantiles

    cuts = covered_quantiles(np.array([0, 0, 1]), np.array([0, 0, 10]), np.array([100, 60, 20]), 3, 2)
    assert cuts.tolist() == [[0, 40, 100], [10, 15, 20], [0, 0, 0]]


def test_a_relay_gets_only_rows_it_needs_and_senders_take_keys_first_hand():
    """One slot per node, chains (fanout 1). Slot 0's rows 0..39 are needed by nodes 1 and 2,
    its rows 50..89 by node 3 alone: node 3 gets them straight from node 0 (in one tree per owner it
    hung under node 1, which received and sent on rows it did not need). Of nodes 1 and 2, which
    need as many of slot 0's rows, node 2 -- sending keys of its own (rows 200..259, to node 1) --
    gets them first hand, in the hop it sends in."""
    slots = Layout("contiguous").shards([500], 5)
    comp = np.array([1, 2, 3, 1])
    a, b = np.array([0, 0, 50, 200]), np.array([40, 40, 90, 260])
    legs = key_legs(comp, a, b, slots, Nodes.even(5, 1), fanout=1, load=np.array([100.0, 0, 0, 0, 0]))
    assert (0, 3, 50, 90) in _legs(legs, 2) and (0, 2, 0, 40) in _legs(legs, 2)
    assert set(range(50, 90)).isdisjoint(_received(legs, 1, 5))
