"""``distattn.plan(deterministic=True)``: bitwise-equal results run to run, for every scheduler, on
real gloo processes (world 3) and on virtual ranks (world 16); and the fixed-order row sums it
switches on."""

import numpy as np
import pytest
import torch
import torch.distributed as dist

import distattn
from distattn.executors.base import DeviceIndex
from distattn.distributed.spawn import run_distributed

SCHEDULERS = ["ring", "zigzag", "allgather", "ulysses", "usp", "cad"]


def _grads(scheduler: str, hq: int, hkv: int, seed: int) -> list[torch.Tensor]:
    """Inside a rank: this rank's out, dq, dk, dv and dsinks of one fp32 step with sinks and softcap."""
    p = dist.get_world_size()
    docs = [5 * p, 2 * p + 1, 7 * p - 1, 3 * p]
    g = torch.Generator().manual_seed(seed)
    total = sum(docs)
    q, k, v = (torch.randn(total, h, 16, generator=g) for h in (hq, hkv, hkv))
    dout = torch.randn(total, hq, 16, generator=g)
    options = {"ulysses_degree": 4 if p % 4 == 0 else p} if scheduler == "usp" else {}
    plan = distattn.plan(docs, dist.group.WORLD, scheduler=scheduler, deterministic=True, **options)
    mine = [plan.shard(t).requires_grad_() for t in (q, k, v)]
    sinks = torch.linspace(-1, 1, hq).requires_grad_()
    out = distattn.attention(*mine, plan, sinks=sinks, softcap=5.0)
    out.backward(plan.shard(dout))
    return [out.detach(), *(t.grad for t in mine), sinks.grad]


def _all(hq: int, hkv: int, seed: int):
    return {s: _grads(s, hq, hkv, seed) for s in SCHEDULERS}


def _assert_reruns_bitwise_equal(runner, world: int, *args, timeout: float) -> None:
    """Two runs of :func:`_all` on ``world`` ranks (``runner``: processes or virtual ranks) agree bit for bit."""
    first, second = (runner(_all, world, *args, timeout=timeout) for _ in range(2))
    for rank, (a, b) in enumerate(zip(first, second)):
        for s in SCHEDULERS:
            assert all(torch.equal(x, y) for x, y in zip(a[s], b[s])), (rank, s)


def test_two_runs_are_bitwise_equal_on_three_processes():
    _assert_reruns_bitwise_equal(run_distributed, 3, 6, 3, 0, timeout=300)


def test_two_runs_are_bitwise_equal_on_sixteen_virtual_ranks():
    from distattn.distributed.virtual import run_virtual

    _assert_reruns_bitwise_equal(run_virtual, 16, 16, 16, 1, timeout=600)


def test_ordered_row_sums_add_repeated_rows_in_index_order():
    index = DeviceIndex(np.array([3, 0, 3, 1, 3, 0], dtype=np.int64))
    src = torch.tensor([1e8, 1.0, -1e8, 2.0, 3.0, 4.0], dtype=torch.float32).unsqueeze(1)
    ordered = index.add_into(torch.zeros(4, 1), src, ordered=True)
    plain = torch.zeros(4, 1).index_add_(0, torch.from_numpy(index.array), src)
    assert torch.equal(ordered, plain)   # on CPU index_add_ is sequential: the same order
    assert ordered[:, 0].tolist() == [5.0, 2.0, 0.0, 3.0]


def test_deterministic_must_be_a_bool():
    with pytest.raises(ValueError, match="deterministic"):
        distattn.plan([8, 8], 2, deterministic="yes")


def test_train_deterministic_reruns_are_bitwise_equal(tmp_path):
    """``train.deterministic: true``: two runs of one config log bitwise-equal losses and grad norms."""
    from conftest import small_run
    from distattn.train.trainer import run

    base = {"model": {"dim": 32, "n_layers": 1, "n_heads": 4, "n_kv_heads": 2, "ffn_dim": 64},
            "data": {"seq_len": 256}, "parallel": {"dp": 1, "cp": 2, "scheduler": "cad"},
            "train": {"steps": 3, "warmup_steps": 1, "ckpt_every": 100, "deterministic": True}}
    runs = [run(small_run(base, tmp_path / name)) for name in ("a", "b")]
    keys = ("loss", "grad_norm")
    assert [[m[k] for k in keys] for m in runs[0]] == [[m[k] for k in keys] for m in runs[1]]
