"""Faults at the edges of the contract: fewer tokens than ranks, ranks that disagree, ranks that
never come. Each must give the exact answer or a clear error within the collective timeout."""

import time

import pytest
import torch.distributed as dist

import distattn
from conftest import case_error, rand_qkv, slow_cases
from distattn.distributed.spawn import run_distributed

# --- fewer tokens than ranks --------------------------------------------------------------------

TINY_MASKS = [(True, None), (False, 2), (True, 1)]


def _tiny_docs(world_size):
    """Packed sequences of S in {1, 2, 3, world_size - 1} tokens: one document, and S of one token."""
    out = []
    for s in sorted({1, 2, 3, world_size - 1} - {0}):
        for docs in ([s], [1] * s):
            if docs not in out:
                out.append(docs)
    return out


def _tiny_schedulers(world_size):
    usp = [("usp", {"num_kv_heads": 2})]                   # the default degree: gcd(world size, 2)
    if world_size != 2:
        usp.append(("usp", {"ulysses_degree": world_size}))  # all Ulysses, a ring of one
    return [("ring", {}), ("zigzag", {}), ("allgather", {}), ("ulysses", {}), ("cad", {}), *usp]


def _tiny_worker(world_size):
    rows = []
    for scheduler, options in _tiny_schedulers(world_size):
        for docs in _tiny_docs(world_size):
            for causal, window in TINY_MASKS:
                case = (scheduler, docs, causal, window, 6, 2, "reference", options)  # GQA: 3 q heads per kv head
                try:
                    rows.append((case, case_error(*case)))
                except Exception as exc:  # reported by the test, with every other failing case
                    rows.append((case, f"{type(exc).__name__}: {exc}"[:300]))
    return rows


@pytest.mark.parametrize("world_size", [2, 3, 4, *slow_cases(5, 6)])
def test_fewer_tokens_than_ranks_is_exact(world_size):
    """Every scheduler exact on sequences of fewer tokens than ranks (ranks left without any): worlds
    2-4, odd and even; 5 and 6 with --slow."""
    bad = []
    for rank, rows in enumerate(run_distributed(_tiny_worker, world_size, world_size, timeout=300,
                                                collective_timeout=10)):
        bad += [(rank, case, err) for case, err in rows if isinstance(err, str) or err > 1e-12]
    assert not bad, bad[:10]


def test_demo_with_fewer_tokens_than_ranks():
    from distattn.bench.demo import run_demo

    rows = run_demo(world_size=4, seq_len=3, heads=4, kv_heads=2, head_dim=8, dtype="fp64", repeats=1)
    assert [r["scheduler"] for r in rows] == ["ring", "zigzag", "allgather", "ulysses", "usp", "cad"]
    for row in rows:
        assert max(row[f"err_{x}"] for x in ("out", "dq", "dk", "dv")) < 1e-12, row


# --- ranks that disagree, ranks that never come --------------------------------------------------

MISMATCH_SCHEDULERS = [("ring", {}), ("zigzag", {}), ("allgather", {}), ("ulysses", {}),
                       ("usp", {"num_kv_heads": 2}), ("cad", {})]


def _mismatch_worker():
    """Rank 1 passes another head_dim (then, for ring, other KV heads): every rank must get a
    ValueError naming both, before any data moves."""
    rows = []
    me = dist.get_rank()
    cases = [(name, options, 8 if me != 1 else 16, 2) for name, options in MISMATCH_SCHEDULERS]
    cases.append(("ring", {}, 8, 2 if me != 1 else 1))
    for name, options, head_dim, kv_heads in cases:
        q, k, v = rand_qkv(13, 13, 4, kv_heads, head_dim)
        plan = distattn.plan([6, 7], dist.group.WORLD, scheduler=name, backend="reference", **options)
        start = time.monotonic()
        try:
            distattn.attention(plan.shard(q), plan.shard(k), plan.shard(v), plan)
            rows.append((name, None, time.monotonic() - start))
        except ValueError as exc:
            rows.append((name, str(exc), time.monotonic() - start))
    # the ranks are still in step: a matching call works
    q, k, v = rand_qkv(13, 13, 4, 2, 8)
    plan = distattn.plan([6, 7], dist.group.WORLD, scheduler="zigzag", backend="reference")
    distattn.attention(plan.shard(q), plan.shard(k), plan.shard(v), plan)
    return rows


def test_shape_mismatch_between_ranks_is_a_value_error_on_every_rank():
    results = run_distributed(_mismatch_worker, 3, timeout=120, collective_timeout=10)
    for rank, rows in enumerate(results):
        for (name, msg, seconds), expect in zip(rows, ["head_dim=16"] * 6 + ["Hkv=1"]):
            assert msg is not None, (rank, name)
            assert "head_dim=8" in msg and expect in msg and "Hkv=2" in msg, (rank, name, msg)
            assert "rank 1 has" in msg or "but rank 1" in msg, (rank, msg)
            assert seconds < 5, (rank, name, seconds)


def _absent_worker():
    """Ranks 0 and 1 build a usp mesh, ranks 2 and 3 a usp plan on the world group (whose
    sub-groups they would create): neither pair ever meets the other."""
    start = time.monotonic()
    try:
        if dist.get_rank() < 2:
            from distattn.parallel import usp_mesh

            usp_mesh("cpu", 2)
        else:
            distattn.plan([16], dist.group.WORLD, scheduler="usp", ulysses_degree=2)
        return None, time.monotonic() - start
    except RuntimeError as exc:
        return str(exc), time.monotonic() - start


def test_group_creation_fails_within_the_collective_timeout_naming_the_absent_ranks():
    results = run_distributed(_absent_worker, 4, timeout=60, collective_timeout=5)
    for rank, (msg, seconds) in enumerate(results):
        assert msg is not None, rank
        absent = "[2, 3]" if rank < 2 else "[0, 1]"
        assert f"rank {rank} waited" in msg and f"for rank(s) {absent}" in msg, msg
        assert ("creating a DeviceMesh" if rank < 2 else "usp's process groups") in msg, msg
        assert 4.5 < seconds < 8, (rank, seconds)   # 5 s timeout + spawn and teardown on 2 loaded cores
