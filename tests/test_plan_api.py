"""The public API end to end at world size 1, dry plans, and the Plan base on several gloo ranks."""

import itertools

import numpy as np
import pytest
import torch
import torch.distributed as dist

import distattn
from conftest import max_err, rand_qkv
from distattn.distributed.spawn import run_distributed

DOCS = [5, 1, 17, 9]


SCHEDULERS = ["zigzag", "ring", "allgather", "ulysses", "usp", "cad", "local"]
MASKS = [(True, None), (False, None), (True, 4)]


def _world_one_worker():
    """Every scheduler name at world size 1, on the WORLD group and on a 1-D DeviceMesh."""
    from torch.distributed.device_mesh import init_device_mesh

    meshes = {"group": dist.group.WORLD, "device_mesh": init_device_mesh("cpu", (1,))}
    q, k, v = rand_qkv(32, 32, 4, 2, 8)
    rows = []
    for (causal, window), scheduler, (mesh_name, mesh) in itertools.product(MASKS, SCHEDULERS, meshes.items()):
        ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
        ref = distattn.reference_attention(*ref_in, DOCS, causal=causal, window=window)
        dout = torch.randn_like(ref)
        ref.backward(dout)
        plan = distattn.plan(DOCS, mesh, scheduler=scheduler, causal=causal, window=window)
        mine = [plan.shard(t).clone().requires_grad_() for t in (q, k, v)]
        out = distattn.attention(*mine, plan)
        out.backward(plan.shard(dout))
        errs = [max_err(plan.unshard(out.detach()), ref)] + [max_err(a.grad, b.grad) for a, b in zip(mine, ref_in)]
        rows.append((scheduler, mesh_name, causal, window, plan.scheduler, max(errs), plan.position_ids().tolist()))
    errors = []
    for call in (lambda: plan.shard(q[:20]), lambda: distattn.attention(q[:20], k, v, plan),
                 lambda: plan.unshard(q[:3])):
        try:
            call()
        except ValueError as exc:
            errors.append(str(exc))
    return rows, errors


def test_world_size_one_end_to_end():
    ((rows, errors),) = run_distributed(_world_one_worker, 1, timeout=120)
    assert len(errors) == 3
    assert "x has 20 tokens along dim 0 but doc_lens sum to 32" in errors[0]
    assert "q has 20 tokens but rank 0 owns 32" in errors[1]
    assert "x_local has 3 tokens along dim 0 but rank 0 owns 32" in errors[2]
    assert len(rows) == len(SCHEDULERS) * len(MASKS) * 2
    for scheduler, mesh_name, causal, window, planned, err, pos in rows:
        assert planned == scheduler
        assert err < 1e-12, (scheduler, mesh_name, causal, window, err)
        assert pos == [*range(5), 0, *range(17), *range(9)]


def test_dry_plan_refuses_execution():
    plan = distattn.plan(DOCS, 2)
    q, k, v = rand_qkv(32, 32, 4, 2, 8)
    for call in (lambda: plan.shard(q), lambda: plan.position_ids(), lambda: distattn.attention(q, k, v, plan)):
        with pytest.raises(ValueError, match="plan is dry"):
            call()


def test_dry_plan_stats():
    plan = distattn.plan([6, 10], 1, causal=True)
    st = plan.stats(num_heads=8, num_kv_heads=2, head_dim=64)
    area = 6 * 7 // 2 + 10 * 11 // 2
    assert st["flops"] == [4 * area * 8 * 64]
    assert st["tokens"] == [16] and st["send_bytes"] == [0]
    assert st["flops_imbalance"] == 1.0 and st["token_imbalance"] == 1.0
    with pytest.raises(ValueError, match="num_heads \\(6\\) must be a multiple of num_kv_heads \\(4\\)"):
        plan.stats(6, 4, 64)
    with pytest.raises(ValueError, match="head_dim must be a positive int"):
        plan.stats(8, 2, 0)


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_mesh_one_runs_without_a_process_group(scheduler):
    """``mesh=1`` is one device with no process group: before, it made a dry plan, so a one-GPU user had
    to set up torch.distributed before the first call. Every scheduler (with its options) runs locally."""
    assert not dist.is_initialized() or dist.get_world_size() == 1
    options = {"usp": {"ulysses_degree": 1}}.get(scheduler, {})
    rows = [[6, 10], [16]]
    plan = distattn.plan(rows, 1, scheduler=scheduler, causal=True, window=4, **options)
    q, k, v = (t.unflatten(0, (2, 16)) for t in rand_qkv(32, 32, 4, 2, 8))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = distattn.attention(*(plan.shard(t) for t in leaves), plan)
    out.square().sum().backward()
    assert plan.unshard(out).shape == q.shape and plan.position_ids().tolist() == [[*range(6), *range(10)], [*range(16)]]
    for row, docs in enumerate(rows):
        ref_in = [t[row].clone().requires_grad_() for t in (q, k, v)]
        ref = distattn.reference_attention(*ref_in, docs, causal=True, window=4)
        ref.square().sum().backward()
        assert max_err(plan.unshard(out)[row], ref) < 1e-12
        assert all(max_err(a.grad[row], b.grad) < 1e-12 for a, b in zip(leaves, ref_in))
    assert plan.stats(4, 2, 8)["world_size"] == 1


def test_every_scheduler_plans_dry():
    for scheduler in ["ring", "zigzag", "allgather", "ulysses", "cad"]:
        assert distattn.plan([8, 9], 4, scheduler=scheduler).stats(4, 4, 8)["world_size"] == 4
    assert distattn.plan([8, 9], 4, scheduler="usp", ulysses_degree=2).stats(4, 4, 8)["world_size"] == 4
    with pytest.raises(ValueError, match="scheduler='local' needs world size 1"):
        distattn.plan([8], 4, scheduler="local")


def test_plan_shows_users_only_what_they_use():
    """The pinned names and a few facts of the run; the executor, the local order and the input
    checks are the plan's runtime, and what else the scheduler decided is in ``plan.schedule``."""
    pinned = {"shard", "unshard", "position_ids", "stats", "scheduler", "layout", "world_size", "schedule"}
    others = {"doc_lens", "rank", "slot", "batch_size", "seq_len", "num_local_tokens", "comm_dtype", "deterministic",
              "prefetch", "bytes_sent", "comm_wait_seconds"}
    plan = distattn.plan(DOCS, 2, scheduler="usp", ulysses_degree=2)
    assert {name for name in dir(plan) if not name.startswith("_")} == pinned | others
    assert plan.layout is plan.schedule.shards and plan.schedule.ulysses_degree == 2


# --- shard/unshard/position_ids over real gloo ranks, with hand-made ownership --------------

OWNED = (((0, 3), (20, 23)), ((3, 10),), ((10, 20),))   # uneven and non-contiguous over 23 tokens, like zigzag


def _ranges_plan(group):
    layout = distattn.Layout.from_indices([np.concatenate([np.arange(s, e) for s, e in r]) for r in OWNED])
    plan = distattn.plan([4, 1, 11, 7], group, scheduler="ring", layout=layout)
    assert plan.layout.owned == OWNED
    return plan


def _shard_unshard_worker():
    plan = _ranges_plan(dist.group.WORLD)
    x = torch.arange(23 * 2, dtype=torch.float32).view(23, 2)
    local = plan.shard(x)
    back = plan.unshard(local * 10)
    back_dim1 = plan.unshard(plan.shard(x.t(), dim=1), dim=1)
    return local, back, back_dim1, plan.position_ids()


def test_shard_unshard_position_ids_on_three_ranks():
    results = run_distributed(_shard_unshard_worker, 3, timeout=120)
    x = torch.arange(23 * 2, dtype=torch.float32).view(23, 2)
    pos = np.concatenate([np.arange(n) for n in (4, 1, 11, 7)])
    for rank, (local, back, back_dim1, position_ids) in enumerate(results):
        idx = np.concatenate([np.arange(s, e) for s, e in OWNED[rank]])
        assert torch.equal(local, x[idx])
        assert torch.equal(back, x * 10)
        assert torch.equal(back_dim1, x.t())
        assert position_ids.tolist() == pos[idx].tolist()


def _wrong_length_worker():
    plan = _ranges_plan(dist.group.WORLD)
    plan.unshard(torch.zeros(99, 2))


def test_unshard_wrong_length_raises_with_rank_traceback():
    with pytest.raises(Exception, match="x_local has 99 tokens along dim 0 but rank"):
        run_distributed(_wrong_length_worker, 3, timeout=120)


def test_stats_flag_a_layout_of_scattered_tokens():
    """Tokens scattered with no period reach the kernels as a segment per token or so: stats say so. A
    stripe is planned in its ranks' order (distattn.planning.strided): a segment per document and rank."""
    import numpy as np

    lens, p = [512, 512], 4
    plain = distattn.plan(lens, p, scheduler="ring").stats(8, 2, 64)
    assert plain["kernel_segments"] == [1, 1, 1, 1] and not plain["fragmented"]
    stripe = distattn.Layout.from_indices([np.concatenate([s + np.arange(r, n, p) for s, n in zip((0, 512), lens)])
                                           for r in range(p)])
    striped = distattn.plan(lens, p, scheduler="ring", layout=stripe).stats(8, 2, 64)
    assert striped["kernel_segments"] == [2] * 4 and striped["min_tokens_per_segment"] == 128.0
    assert not striped["fragmented"]
    shuffled = np.random.default_rng(0).permutation(sum(lens))
    scattered = distattn.plan(lens, p, scheduler="ring", layout=distattn.Layout.from_indices(np.split(shuffled, p)))
    stats = scattered.stats(8, 2, 64)
    assert min(stats["kernel_segments"]) > 150 and stats["min_tokens_per_segment"] < 2 and stats["fragmented"]
