"""CAD's group-cast of K/V over nodes and group-reduce of dK/dV (distattn/schedulers/cad_cast.py):
the legs on a hand-made case, exactness in gloo runs whose "nodes" are smaller than the world, and
the bytes each rank sends inside and across nodes, counted by the executor, against the schedule."""

import dataclasses

import numpy as np
import pytest
import torch
import torch.distributed as dist

import distattn
from conftest import max_err, rand_qkv
from distattn.layout import Layout
from distattn.network import default_profile
from distattn.schedule import AttnShape
from distattn.schedulers.cad_cast import Nodes, key_legs, query_legs
from distattn.spawn import run_distributed


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
    # hop 1: slot 1 gets slot 0's rows over NVLink, to compute on and to send on; slot 1 hands its
    # rows to slot 0 (each owner's node peer sends its copy to another node)
    assert _legs(legs, 1) == [(0, 1, 0, 100), (1, 0, 100, 180)]
    # hop 2: each owner's rows cross to node 1 once, to its slots in turn (the larger group first)
    assert _legs(legs, 2) == [(0, 3, 100, 180), (1, 2, 0, 100)]
    # hop 3: each relay forwards inside node 1 what the other slot needs
    assert _legs(legs, 3) == [(2, 3, 0, 100), (3, 2, 100, 180)]
    for c in range(4):   # every slot receives its keys, and a relay what it forwards
        need = set().union(*(range(x, y) for x, y, cc in zip(a, b, comp) if cc == c))
        assert need <= _received(legs, c, 4)


def test_a_tree_of_nodes_bounds_the_copies_a_slot_sends():
    """One slot per node; slot 0's keys are needed by 4 nodes, nested (a causal prefix): with
    fanout 2 slot 0 sends two copies, and the node needing most forwards to the other two."""
    slots = Layout("contiguous").shards([500], 5)
    comp = np.array([1, 2, 3, 4])
    a, b = np.zeros(4, dtype=np.int64), np.array([90, 80, 70, 60])
    legs = key_legs(comp, a, b, slots, Nodes.even(5, 1), fanout=2)
    assert _legs(legs, 1) == [(0, 0, 0, 90)]       # a node of one slot: no peer to hand rows to
    assert _legs(legs, 2) == [(0, 1, 0, 90), (0, 2, 0, 80)]
    assert _legs(legs, 3) == [(1, 3, 0, 70), (1, 4, 0, 60)]
    assert legs.hops == 3


def test_queries_leave_a_node_on_their_destination_rail():
    """Slot 0's queries to slot 3 (local index 1 on node 1) go first to slot 1 (index 1 on node 0);
    those to slot 2 (index 0) go straight, as do those inside the node."""
    slots = Layout("contiguous").shards([400], 4)
    legs = query_legs(np.array([1, 2, 3]), np.array([0, 10, 20]), np.array([10, 20, 30]), slots, Nodes.even(4, 2))
    assert _legs(legs, 1) == [(0, 1, 0, 10), (0, 1, 20, 30), (0, 2, 10, 20)]
    assert _legs(legs, 2) == [(1, 3, 20, 30)]


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
    ex = plan.executor
    out = distattn.attention(*mine, plan)
    fwd = dict(ex.link_bytes)
    out.backward(plan.shard(dout))
    bwd = {kind: ex.link_bytes[kind] - fwd[kind] for kind in fwd}
    errs = [max_err(out.detach(), plan.shard(ref.detach()))]
    errs += [max_err(a.grad, plan.shard(b.grad)) for a, b in zip(mine, ref_in)]
    want = {}
    for direction in ("forward", "backward"):
        phases = [ph for ph in plan.schedule.phases(AttnShape(hq, hkv, d, 8)) if ph.is_comm and ph.direction == direction]
        inter = sum(int(ph.inter_sent[plan.rank]) for ph in phases)
        want[direction] = {"intra": sum(int(ph.amount[plan.rank]) for ph in phases) - inter, "inter": inter}
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
    assert max(q for q, _ in hops) == 2 and max(kv for _, kv in hops) >= 2, hops   # relays and PXN do run
