"""Attention sinks and logit soft-capping under every scheduler on gloo ranks vs the fp64 oracle:
out, dq, dk, dv of each rank's shard and the sinks' gradient summed over the ranks (each rank
returns its share: what DDP/FSDP's reduction of a replicated parameter adds up); cad's
ping-pong and pools; input validation."""

import itertools

import pytest
import torch
import torch.distributed as dist

import distattn
from conftest import max_err, oracle_case_error, rand_qkv, slow_cases
from distattn.runtime.pingpong import ping_pong
from distattn.distributed.spawn import RankError, run_distributed

SCHEDULERS = ["ring", "zigzag", "allgather", "ulysses", "usp", "cad"]
DOCS = [[3, 21, 2, 1, 4], [1, 2, 1, 3, 1, 5, 2], [17]]
MASKS = [(True, None), (False, None), (True, 5), (False, 4)]
COMBOS = [(True, None), (True, 2.5), (False, 2.5), (True, 0.7)]  # (sinks, softcap); 0.7 caps hard


def _sinks_case(scheduler, docs, causal, window, hq, hkv, with_sinks, softcap, options=None, seed=0):
    """Inside a gloo rank: max error of out/dq/dk/dv of this rank's shard and of the rank-summed
    dsinks vs the fp64 oracle."""
    return oracle_case_error(scheduler, docs, hq, hkv, seed, {"causal": causal, "window": window}, "reference",
                             options, with_sinks, softcap)


def _worker(cases):
    return [(case, _sinks_case(*case)) for case in cases]


def _cases(world_size):
    cases = []
    for n, scheduler in enumerate(SCHEDULERS):
        if scheduler == "usp" and world_size in (1, 2, 3, 5):
            continue  # a 2-D mesh needs a composite world size (world 1 runs usp as local anyway)
        options = {"ulysses_degree": 2} if scheduler == "usp" else {}
        # GQA 6:2 (uneven head split on 4 and 5 ranks, replicated KV heads on 4+), MQA 4:1
        hq, hkv = ((6, 2), (4, 1))[n % 2]
        if scheduler in ("ulysses", "usp") and hq < world_size:
            hq, hkv = 6, 2
        for i, (with_sinks, softcap) in enumerate(COMBOS):
            docs, (causal, window) = DOCS[(n + i) % len(DOCS)], MASKS[(n + 2 * i + world_size) % len(MASKS)]
            cases.append((scheduler, docs, causal, window, hq, hkv, with_sinks, softcap, options))
        if world_size >= 4:  # fewer tokens than ranks: ranks without rows still return a (zero) share
            cases.append((scheduler, [2, 1], True, None, hq, hkv, True, 2.5, options))
        if (scheduler, world_size) in (("ulysses", 2), ("usp", 4)):  # head groups: each its share of the sinks
            cases.append((scheduler, DOCS[0], True, None, 6, 2, True, 2.5, {**options, "head_groups": 2}))
    return cases


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, *slow_cases(5, 6)])
def test_sinks_softcap_exact_vs_fp64_oracle(world_size):
    cases = _cases(world_size)
    if world_size == 1:  # every scheduler is local on one rank: once each is enough
        cases = cases[::4] + cases[1:4]
    for rank_results in run_distributed(_worker, world_size, cases, timeout=600):
        for case, err in rank_results:
            assert err < 1e-12, (world_size, case, err)


def test_local_attention_sinks_softcap():
    docs = [5, 1, 12]
    q, k, v = rand_qkv(18, 18, 4, 2, 8)
    sinks = torch.tensor([0.5, -1.0, 2.0, 0.0], dtype=torch.float64)
    ins = [t.clone().requires_grad_() for t in (q, k, v, sinks)]
    refs = [t.clone().requires_grad_() for t in (q, k, v, sinks)]
    out = distattn.local_attention(*ins[:3], docs, window=4, backend="reference", sinks=ins[3], softcap=3.0)
    ref = distattn.reference_attention(*refs[:3], docs, True, 4, sinks=refs[3], softcap=3.0)
    assert max_err(out, ref) < 1e-12
    dout = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(out, ins, dout), torch.autograd.grad(ref, refs, dout)):
        assert max_err(a, b) < 1e-12
    # a sink takes probability mass: a very large one drives every output towards 0
    big = distattn.local_attention(q, k, v, docs, backend="reference", sinks=torch.full((4,), 50.0).double())
    assert big.abs().max() < 1e-12


def test_validation():
    q, k, v = rand_qkv(6, 6, 4, 2, 8)
    for bad in (torch.zeros(3, dtype=torch.float64), torch.zeros(4, 1), torch.zeros(4, dtype=torch.int64), [0.0] * 4):
        with pytest.raises(ValueError, match="sinks"):
            distattn.local_attention(q, k, v, [6], backend="reference", sinks=bad)
    for bad in (0.0, -1.0, float("inf"), float("nan"), True, "30"):
        with pytest.raises(ValueError, match="softcap"):
            distattn.local_attention(q, k, v, [6], backend="reference", softcap=bad)


def _pool_worker():
    """Two CP groups of 2 ranks in a cad pool of 4: the dsinks summed over the pool is the sum of
    both groups' full gradients (their batches differ)."""
    layout = [[0, 1], [2, 3]]
    groups = [dist.new_group(ranks) for ranks in layout]
    g = dist.get_rank() // 2
    docs = ([3, 30, 2], [11, 1, 9, 14])[g]
    q, k, v = rand_qkv(sum(docs), sum(docs), 4, 2, 8, seed=g)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(5 + g), dtype=torch.float64)
    sinks = torch.tensor([0.3, -0.2, 1.0, 0.1], dtype=torch.float64)
    want = torch.zeros(4, dtype=torch.float64)
    for h, hd in enumerate(([3, 30, 2], [11, 1, 9, 14])):  # every group's reference gradient
        qh, kh, vh = (t.requires_grad_() for t in rand_qkv(sum(hd), sum(hd), 4, 2, 8, seed=h))
        s = sinks.clone().requires_grad_()
        ref = distattn.reference_attention(qh, kh, vh, hd, sinks=s, softcap=4.0)
        ref.backward(torch.randn(ref.shape, generator=torch.Generator().manual_seed(5 + h), dtype=torch.float64))
        want += s.grad
        if h == g:
            ref_out, ref_dq = ref.detach(), qh.grad
    plan = distattn.plan(docs, groups[g], scheduler="cad", pool=dist.group.WORLD, backend="reference")
    mine = [plan.shard(t).clone().requires_grad_() for t in (q, k, v)]
    s = sinks.clone().requires_grad_()
    out = distattn.attention(*mine, plan, sinks=s, softcap=4.0)
    out.backward(plan.shard(dout))
    dsinks = s.grad.clone()
    dist.all_reduce(dsinks)
    return max(max_err(out.detach(), plan.shard(ref_out)), max_err(mine[0].grad, plan.shard(ref_dq)),
               max_err(dsinks, want))


def test_cad_pool_sinks():
    for err in run_distributed(_pool_worker, 4, timeout=300):
        assert err < 1e-12


HQ, HKV, D, HIDDEN = 4, 2, 8, 16


def _ping_pong_worker():
    """ping_pong with sinks and softcap: the same outputs and gradients (sinks included) as the
    sequential loop of distattn.attention calls."""
    nano = [[20, 7, 3], [30, 1]]
    plans = [distattn.plan(d, dist.group.WORLD, scheduler="cad", backend="reference") for d in nano]
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(HIDDEN, (HQ + 2 * HKV) * D, generator=gen, dtype=torch.float64) / 4).requires_grad_()
    sinks = torch.randn(HQ, generator=gen, dtype=torch.float64).requires_grad_()
    xs = [p.shard(torch.randn(sum(d), HIDDEN, generator=gen, dtype=torch.float64)) for p, d in zip(plans, nano)]

    def pre(x):
        q, k, v = (x @ w).split([HQ * D, HKV * D, HKV * D], dim=-1)
        return q.reshape(-1, HQ, D), k.reshape(-1, HKV, D), v.reshape(-1, HKV, D)

    def post(o, x):
        return x + o.reshape(o.shape[0], -1)[:, :HIDDEN]

    results = []
    for mode in ("sequential", "ping_pong"):
        ins = [x.clone().requires_grad_() for x in xs]
        if mode == "sequential":
            ys = [post(distattn.attention(*pre(x), p, sinks=sinks, softcap=2.0), x) for x, p in zip(ins, plans)]
        else:
            ys = ping_pong(pre, post, ins, plans, sinks=sinks, softcap=2.0)
        grads = torch.autograd.grad(sum((y * y).sum() for y in ys), [*ins, w, sinks])
        results.append([y.detach() for y in ys] + list(grads))
    return max(max_err(a, b) for a, b in zip(*results))


def test_ping_pong_sinks_softcap():
    for err in run_distributed(_ping_pong_worker, 3, timeout=300):
        assert err < 1e-12


def _mismatch_worker():
    q, k, v = rand_qkv(12, 12, 4, 2, 8)
    plan = distattn.plan([12], dist.group.WORLD, scheduler="ring", backend="reference")
    sinks = torch.zeros(4, dtype=torch.float64) if dist.get_rank() == 0 else None
    distattn.attention(plan.shard(q), plan.shard(k), plan.shard(v), plan, sinks=sinks)


def test_ranks_disagreeing_on_sinks_fail_clearly():
    with pytest.raises(RankError, match="sinks"):
        run_distributed(_mismatch_worker, 2, timeout=120)


def test_combos_cover_every_scheduler():
    seen = {(c[0], c[6], c[7] is not None) for w in (2, 4, 6) for c in _cases(w)}
    assert seen == set(itertools.product(SCHEDULERS, (True, False), (True, False))) - \
        {(s, False, False) for s in SCHEDULERS}
