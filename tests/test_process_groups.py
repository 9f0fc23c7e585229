"""Process groups are made once per job (ParallelDims), never per step: training steps create no
group and leak no file descriptor or thread, and building a mesh again creates nothing."""

import os
import threading
from unittest import mock

import pytest
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

from distattn.parallel import ParallelDims
from distattn.distributed.spawn import run_distributed
from distattn.train.config import RunConfig, validate

TINY = {"model": {"dim": 32, "n_layers": 1, "n_heads": 4, "n_kv_heads": 2, "ffn_dim": 64},
        "data": {"seq_len": 256}, "train": {"steps": 4, "warmup_steps": 1, "ckpt_every": 100, "log_every": 100}}


def _counting_groups(made: list):
    """Patch for ``c10d._new_group_with_tag``, which ``dist.new_group``, ``DeviceMesh`` and
    ``distattn.distributed.comm.subgroups`` all call: records the ranks of every group made."""
    real = c10d._new_group_with_tag

    def counting(*args, **kwargs):
        made.append(args[0] if args else kwargs.get("ranks"))
        return real(*args, **kwargs)

    return mock.patch.object(c10d, "_new_group_with_tag", counting)


def _steps_worker(scheduler: str, dp: int, out: str):
    import distattn.train.trainer as trainer
    from distattn.runtime.plan_cache import PlanCache

    made, by_plans, seen = [], [], []
    real_plan = PlanCache.plan

    def plan(cache, *args, **kwargs):  # the trainer's plan of every step (made or cached): it must find its groups
        before = len(made)
        p = real_plan(cache, *args, **kwargs)
        by_plans.append(len(made) - before)
        return p

    cfg = validate(RunConfig().replace(model=TINY["model"], data=TINY["data"], train={**TINY["train"], "out": out},
                                       parallel={"dp": dp, "cp": 4 // dp, "scheduler": scheduler}))
    with _counting_groups(made), mock.patch.object(PlanCache, "plan", plan):
        trainer.train(cfg, on_step=lambda m: seen.append((len(made), len(os.listdir("/proc/self/fd")),
                                                          threading.active_count())))
    return seen, by_plans


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts open files in /proc")
@pytest.mark.parametrize("scheduler,dp", [("usp", 1), ("usp", 2), ("zigzag", 2)])
def test_steps_create_no_group_and_leak_nothing(scheduler, dp, tmp_path):
    for rank, (seen, by_plans) in enumerate(run_distributed(_steps_worker, 4, scheduler, dp, str(tmp_path / "run"),
                                                            timeout=300)):
        assert len(seen) == TINY["train"]["steps"] and by_plans == [0] * len(seen), (rank, by_plans)
        # (groups made, open fds, threads) after every step: as after the first
        assert all(s == seen[0] for s in seen[1:]), (rank, scheduler, dp, seen)


def test_parallel_dims_names_axes_and_checks_degrees():
    assert ParallelDims(2, 4).names == ("dp", "cp") and ParallelDims(2, 4).shape == (2, 4)
    usp = ParallelDims(2, 8, ulysses=4)
    assert usp.names == ("dp", "ring", "ulysses") and usp.shape == (2, 2, 4) and usp.world_size == 16
    with pytest.raises(ValueError, match="ulysses=3 must divide cp=8"):
        ParallelDims(1, 8, ulysses=3)
    with pytest.raises(ValueError, match="dp must be a positive int"):
        ParallelDims(0, 8)


def _mesh_worker():
    dims = ParallelDims(dp=2, cp=2, ulysses=2)
    mesh = dims.build("cpu")
    made = []
    with _counting_groups(made):  # the same mesh again (a second run, a second MPU): found, not made
        again = dims.cp_mesh(dims.build("cpu"))
        ParallelDims(dp=2, cp=2).build("cpu")  # its "dp" and "cp" axes are the usp mesh's "dp" and flat cp
    cp = dims.cp_mesh(mesh)
    return (made, again["ulysses"].get_group() is cp["ulysses"].get_group(), tuple(cp.mesh_dim_names),
            dist.get_process_group_ranks(cp["ulysses"].get_group()), dist.get_process_group_ranks(mesh["dp"].get_group()))


def test_usp_axes_put_ulysses_on_consecutive_ranks_and_are_made_once():
    got = run_distributed(_mesh_worker, 4, timeout=120)
    assert all(r[:2] == ([], True) for r in got), got
    assert got[0][2:] == (("ring", "ulysses"), [0, 1], [0, 2]) and got[3][2:] == (("ring", "ulysses"), [2, 3], [1, 3])
