"""Every scheduler on 16, 32 and 64 virtual ranks (threads of this process: distattn.distributed.virtual) vs the
fp64 oracle; the in-memory process group's collectives; a failing, a stuck and a mismatched rank;
nothing left behind."""

import sys
import time
from functools import lru_cache

import pytest
import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

import distattn
from conftest import max_err, rand_qkv
from distattn.distributed import comm
from distattn.distributed.spawn import RankError, run_distributed
from distattn.distributed.virtual import run_virtual

DOCS = [37, 5, 60, 1, 12, 29, 3, 45, 8]   # uneven documents, causal; ~3 tokens a rank at 64
SCHEDULERS = ["ring", "zigzag", "allgather", "ulysses", "usp", "cad"]


def _heads(scheduler: str, world_size: int) -> tuple[int, int, dict]:
    """(Hq, Hkv, options): ulysses needs a query head per rank (its 4 KV heads go to several ranks
    each); usp splits 4 x P/4."""
    if scheduler == "ulysses":
        return world_size, 4, {}
    if scheduler == "usp":
        return 8, 2, {"ulysses_degree": 4}
    return 4, 2, {}


@lru_cache(maxsize=None)
def _oracle(hq: int, hkv: int, with_sinks: bool):
    """Inputs and the fp64 oracle's out, dq, dk, dv (and dsinks), computed once and shared by the ranks."""
    total = sum(DOCS)
    q, k, v = rand_qkv(total, total, hq, hkv, 8)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    sinks = torch.randn(hq, generator=torch.Generator().manual_seed(2), dtype=torch.float64) if with_sinks else None
    ins = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_sinks = sinks.clone().requires_grad_() if with_sinks else None
    out = distattn.reference_attention(*ins, DOCS, causal=True, sinks=ref_sinks)
    out.backward(dout)
    return (q, k, v, dout, sinks), (out.detach(), *(t.grad for t in ins), None if sinks is None else ref_sinks.grad)


def _rank_errors(scheduler, options, inputs, ref, mesh_shape=None):
    """One rank: max error of its out/dq/dk/dv vs the oracle's shard, and its share of dsinks.
    ``mesh_shape``: a 2-D DeviceMesh ("ulysses", "ring") made here instead of the world group."""
    q, k, v, dout, sinks = inputs
    mesh = dist.group.WORLD
    if mesh_shape is not None:
        from torch.distributed.device_mesh import init_device_mesh
        mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=("ulysses", "ring"))
    plan = distattn.plan(DOCS, mesh, scheduler=scheduler, causal=True, backend="reference", **options)
    mine = [plan.shard(t).clone().requires_grad_() for t in (q, k, v)]
    my_sinks = None if sinks is None else sinks.clone().requires_grad_()
    out = distattn.attention(*mine, plan, sinks=my_sinks)
    out.backward(plan.shard(dout))
    errs = [max_err(out.detach(), plan.shard(ref[0]))]
    errs += [max_err(a.grad, plan.shard(b)) for a, b in zip(mine, ref[1:4])]
    return max(errs), None if my_sinks is None else my_sinks.grad


def _check_exact(scheduler: str, world_size: int, with_sinks: bool, mesh_shape=None) -> None:
    hq, hkv, options = _heads(scheduler, world_size)
    inputs, ref = _oracle(hq, hkv, with_sinks)
    if mesh_shape is not None:
        options = {}
    results = run_virtual(_rank_errors, world_size, scheduler, options, inputs, ref, mesh_shape, timeout=300)
    for rank, (err, _) in enumerate(results):
        assert err <= 1e-12, (scheduler, world_size, rank, err)
    if with_sinks:   # each rank's dsinks is its share: summed over the ranks, the full gradient
        assert max_err(sum(ds for _, ds in results), ref[4]) <= 1e-12


# The default slice: every scheduler at 16 and at one larger world -- 32 (no sinks) for zigzag, ulysses and
# cad, 64 (sinks, ~3 tokens a rank) for ring, allgather and usp -- so each world size and both sinks settings
# run, and each scheduler beyond 16 ranks. Every scheduler x world (the other six, the costliest of them the
# 64-rank zigzag, ulysses and cad): --slow.
LARGER = {"zigzag": 32, "ulysses": 32, "cad": 32, "ring": 64, "allgather": 64, "usp": 64}
VIRTUAL_CASES = [pytest.param(scheduler, world_size, id=f"{scheduler}-{world_size}",
                              marks=[] if world_size in (16, LARGER[scheduler]) else [pytest.mark.slow])
                 for scheduler in SCHEDULERS for world_size in (16, 32, 64)]


@pytest.mark.parametrize("scheduler, world_size", VIRTUAL_CASES)
def test_every_scheduler_exact_on_virtual_ranks(scheduler, world_size):
    _check_exact(scheduler, world_size, with_sinks=world_size != 32)


def test_usp_on_a_2d_device_mesh_of_virtual_ranks():
    _check_exact("usp", 16, with_sinks=True, mesh_shape=(4, 4))


def test_128_virtual_ranks():
    _check_exact("allgather", 128, with_sinks=True)


@pytest.mark.slow
@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_every_scheduler_exact_on_128_virtual_ranks(scheduler):
    _check_exact(scheduler, 128, with_sinks=True)


# ---- the in-memory process group --------------------------------------------------------------------

def _collectives():
    """What the executors and comm use, on 6 ranks (uneven splits, async waits, sub-groups)."""
    r, p, world = dist.get_rank(), dist.get_world_size(), dist.group.WORLD
    got = {"backend": dist.get_backend(world), "timeout": comm.group_timeout(world).total_seconds()}
    ins = [j + 1 for j in range(p)]                     # j + 1 elements to rank j, r + 1 from each
    out = torch.empty((r + 1) * p)
    work = dist.all_to_all_single(out, torch.full((sum(ins),), float(r)), [r + 1] * p, ins, async_op=True)
    work.wait()
    got["a2a"] = out.tolist()
    gathered = torch.empty(2 * p)
    comm.all_gather_single(gathered, torch.full((2,), float(r)), async_op=True).wait()
    got["gather"] = gathered.tolist()
    mine = torch.empty(2)
    comm.reduce_scatter_single(mine, torch.arange(2.0 * p) * (r + 1), async_op=True).wait()
    got["scatter"] = mine.tolist()
    sent, recv = torch.full((3,), float(r)), torch.empty(3)
    works = dist.batch_isend_irecv([dist.P2POp(dist.irecv, recv, (r - 1) % p),
                                    dist.P2POp(dist.isend, sent, (r + 1) % p)])
    sent.fill_(-1.0)   # a send owns a copy once issued
    for w in works:
        w.wait()
    got["p2p"] = recv.tolist()
    got["meet"] = comm.meet(world, "test", str(r), "the test")
    halves = [[0, 1, 2], [3, 4, 5]]
    (half,) = comm.subgroups(world, [halves[r // 3]], "halves", "the test")
    t = torch.tensor([float(r)])
    dist.all_reduce(t, group=half)
    got["sub"] = (t.item(), dist.get_rank(half), comm.subgroups(world, [halves[r // 3]], "halves", "")[0] is half)
    objects = [None] * p
    dist.all_gather_object(objects, {"rank": r})
    got["objects"] = objects

    class RankInBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            return g * dist.get_rank()
    x = torch.ones(2, requires_grad=True)
    RankInBackward.apply(x).sum().backward()
    got["backward"] = x.grad.tolist()
    dist.barrier()
    return got


def test_collectives_of_the_virtual_group():
    p = 6
    for r, got in enumerate(run_virtual(_collectives, p, collective_timeout=7, timeout=60)):
        assert got["backend"] == "distattn_virtual" and got["timeout"] == 7
        assert got["a2a"] == [float(s) for s in range(p) for _ in range(r + 1)]
        assert got["gather"] == [float(s) for s in range(p) for _ in range(2)]
        assert got["scatter"] == [float((2 * r + i) * sum(range(1, p + 1))) for i in range(2)]
        assert got["p2p"] == [float((r - 1) % p)] * 3
        assert got["meet"] == [str(s) for s in range(p)]
        assert got["sub"] == (float(sum(range(3 * (r // 3), 3 * (r // 3) + 3))), r % 3, True)
        assert got["objects"] == [{"rank": s} for s in range(p)]
        assert got["backward"] == [float(r)] * 2


# ---- failures: named, fast, never a hang ------------------------------------------------------------

def _fail_on_5():
    if dist.get_rank() == 5:
        raise ValueError("rank five broke")
    dist.barrier()   # the others wait for rank 5: woken when it fails


def test_a_raising_rank_is_named():
    start = time.monotonic()
    with pytest.raises(RankError, match="rank five broke") as info:
        run_virtual(_fail_on_5, 16, collective_timeout=60)
    assert info.value.rank == 5 and "_fail_on_5" in info.value.remote_traceback
    assert time.monotonic() - start < 10


def _deadlock():
    r = dist.get_rank()
    if r < 2:   # 0 and 1 each wait for the other; the rest for them
        dist.recv(torch.empty(1), src=1 - r)
    dist.barrier()


def _mismatched():
    t = torch.ones(2)
    if dist.get_rank() == 3:
        time.sleep(0.2)   # the others post theirs first
        dist.all_reduce(t)
    else:
        comm.all_gather_single(torch.empty(2 * dist.get_world_size()), t)


def test_a_stuck_or_mismatched_collective_fails_fast():
    start = time.monotonic()
    with pytest.raises(RankError, match="timed out after 1 s"):
        run_virtual(_deadlock, 16, collective_timeout=1)
    assert time.monotonic() - start < 10
    with pytest.raises(RankError, match=r"rank 3: .*allreduce \(collective #0\).*mismatched collectives"):
        run_virtual(_mismatched, 8, collective_timeout=60)
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="did not finish within 0.5 s"):
        run_virtual(time.sleep, 4, 2.0, timeout=0.5)
    assert time.monotonic() - start < 2


def _different_plans():
    """Rank 3 plans another scheduler: its peers' transfers never come."""
    scheduler = "ring" if dist.get_rank() == 3 else "allgather"
    plan = distattn.plan(DOCS, dist.group.WORLD, scheduler=scheduler, backend="reference")
    q, k, v = (plan.shard(t) for t in rand_qkv(sum(DOCS), sum(DOCS), 4, 2, 8))
    return distattn.attention(q, k, v, plan)


def test_ranks_with_different_plans_fail_fast():
    start = time.monotonic()
    with pytest.raises(RankError, match="Every rank of the group must call attention with the same plan"):
        run_virtual(_different_plans, 8, collective_timeout=2)
    assert time.monotonic() - start < 10


# ---- nothing left behind -------------------------------------------------------------------------------

def _rank_and_size():
    return dist.get_rank(), dist.get_world_size()


def test_runs_repeat_and_leave_torch_distributed_as_it_was():
    world, hook, initialized = c10d._world, sys.excepthook, dist.is_initialized()
    for p in (3, 5):
        assert run_virtual(_rank_and_size, p) == [(r, p) for r in range(p)]
    assert c10d._world is world and sys.excepthook is hook and dist.is_initialized() == initialized
    assert "DISTATTN_VIRTUAL" not in dist.Backend._plugins
    # a group of the caller's (conftest's one-rank group, or one made here) survives a run
    if not initialized:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        assert run_virtual(_rank_and_size, 4) == [(r, 4) for r in range(4)]
        t = torch.ones(1)
        dist.all_reduce(t)
        assert (dist.get_rank(), dist.get_world_size(), t.item()) == (0, 1, 1.0)
    finally:
        if not initialized:
            dist.destroy_process_group()
    assert run_distributed(_rank_and_size, 2, timeout=120) == [(0, 2), (1, 2)]


def test_bad_arguments():
    for bad in (0, -1, True, 2.0, "4"):
        with pytest.raises(ValueError, match="world_size must be a positive int"):
            run_virtual(_rank_and_size, bad)
    with pytest.raises(ValueError, match="timeout"):
        run_virtual(_rank_and_size, 2, timeout=0)
