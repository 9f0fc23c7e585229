"""``parallel.cad_pool``: the trainer's CAD balances attention over every dp x cp rank (DistCA: no
data-parallel stragglers), with the same losses as CAD inside each replica."""

from unittest import mock

import numpy as np
import pytest
import torch.distributed.distributed_c10d as c10d

from distattn.planning.schedule import imbalance
from distattn.distributed.spawn import run_distributed
from distattn.train.config import RunConfig, validate

# 4096-token sequences: long enough that attention, not memory traffic, dominates CAD's cost model
# (at a few hundred tokens per rank tasks look equally cheap to it and little moves), and the stdlib
# stream's first two global batches give the two replicas different documents (dp 2 x cp 2, FLOPs
# imbalance over the 4 ranks unpooled: 1.28 and 1.29; pooled: 1.07 and 1.05). ~13 s on 2 CPU cores
# for dp 2 x cp 2 (both runs in one spawn), ~8 s for dp 2 x cp 1.
TINY = {"model": {"dim": 32, "n_layers": 1, "n_heads": 4, "n_kv_heads": 2, "ffn_dim": 64},
        "data": {"seq_len": 4096},
        "train": {"steps": 3, "warmup_steps": 1, "ckpt_every": 100, "log_every": 100}}


def _cfg(out: str, dp: int, cp: int, **parallel) -> RunConfig:
    # one nano-batch: one plan per step to compare (two, ping-ponged, are exact too: test_nano_batches.py)
    return validate(RunConfig().replace(model=TINY["model"], data=TINY["data"], train={**TINY["train"], "out": out},
                                        parallel={"dp": dp, "cp": cp, "scheduler": "cad", "nano_batches": 1,
                                                  **parallel}))


def _plan_record(plan, cp: int, groups_made: int, kwargs: dict) -> dict:
    """What one step's plan did: the ranks it balanced, query rows computed on another replica's
    ranks (the pool's token space is the replicas' sequences one after another, in the order of
    their CP groups' first ranks, i.e. slot ``s`` is global rank ``s`` and holds replica ``s // cp``),
    and the per-rank FLOPs of its stats."""
    st, sched = plan.stats(4, 2, 8), plan.schedule
    bounds = np.concatenate([[0], np.cumsum(sched.rank_tokens())])
    cross = 0
    for slot in range(st["world_size"]):
        lo, hi = bounds[slot // cp * cp], bounds[(slot // cp + 1) * cp]  # the slot's replica's tokens
        cross += sum(max(0, min(s.q_end, lo) - s.q_start) + max(0, s.q_end - max(s.q_start, hi))
                     for s in sched.compute_slices(slot))
    return {"world_size": st["world_size"], "cross_replica_q_rows": int(cross), "flops": st["flops"],
            "groups_made": groups_made, "pool": kwargs.get("pool") is not None}


def _pooled_and_unpooled(out: str, dp: int, cp: int) -> dict:
    """On every rank: train pooled, then unpooled, from the same seed; the plans of every step."""
    import distattn.train.trainer as trainer
    from distattn.runtime.plan_cache import PlanCache

    made: list = []
    real_plan, real_new_group = PlanCache.plan, c10d._new_group_with_tag
    runs = {}
    for name, pool in (("pooled", True), ("unpooled", False)):
        plans = []

        def plan(cache, *args, **kwargs):   # each step's plan from the trainer's cache, made or reused
            before = len(made)
            p = real_plan(cache, *args, **kwargs)
            plans.append(_plan_record(p, cp, len(made) - before, kwargs))
            return p

        def new_group(*args, **kwargs):  # dist.new_group, DeviceMesh and distattn.distributed.comm.subgroups
            made.append(args[0] if args else kwargs.get("ranks"))
            return real_new_group(*args, **kwargs)

        with mock.patch.object(PlanCache, "plan", plan), mock.patch.object(c10d, "_new_group_with_tag", new_group):
            history = trainer.train(_cfg(f"{out}/{name}", dp, cp, cad_pool=pool))
        runs[name] = {"history": history, "plans": plans}
    return runs


@pytest.mark.parametrize("dp,cp", [(2, 2), (2, 1)])  # cp 1: CAD balances the replicas with no CP at all
def test_pooled_cad_gives_the_same_losses_and_balances_the_replicas(dp, cp, tmp_path):
    ranks = run_distributed(_pooled_and_unpooled, dp * cp, str(tmp_path), dp, cp, timeout=300)
    pooled, unpooled = ranks[0]["pooled"], ranks[0]["unpooled"]

    # Same losses. Attention is exact both ways; only the order of fp32 sums differs (how CAD cuts
    # and merges a document's tasks, and where dK/dV partial sums are added). Step 1's loss sees
    # the forward alone; steps 2-3 also carry the gradients through AdamW updates (observed: at most
    # 3e-8 relative, step 2). rtol 1e-5 is ~100 fp32 ulps: far above that noise, far below any real
    # difference (the loss moves ~1e-2 per step; a replica on the wrong tokens or a lost dK/dV
    # contribution from another replica's rank moves it more).
    want = [m["loss"] for m in unpooled["history"]]
    got = [m["loss"] for m in pooled["history"]]
    assert len(got) == TINY["train"]["steps"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=0)

    for rank, runs in enumerate(ranks):
        # the flag reached the planner: one plan over all 4 ranks, which moved work across replicas
        # on the unbalanced steps; unpooled, each replica's plan covers its own cp ranks
        p, u = runs["pooled"]["plans"], runs["unpooled"]["plans"]
        assert all(r["pool"] and r["world_size"] == dp * cp for r in p), (rank, p)
        assert all(not r["pool"] and r["world_size"] == cp for r in u), (rank, u)
        assert any(r["cross_replica_q_rows"] > 0 for r in p), (rank, p)
        assert all(r["cross_replica_q_rows"] == 0 for r in u), (rank, u)
        # the pool is a group that exists already: planning makes no process group, pooled or not
        assert all(r["groups_made"] == 0 for r in p + u), (rank, p + u)

    # metrics: flops_imbalance_all is over all dp x cp ranks in both modes (unpooled, gathered
    # through the loss all-reduce: it matches both replicas' plans put side by side)
    for step, (pm, um) in enumerate(zip(pooled["history"], unpooled["history"])):
        side_by_side = ranks[0]["unpooled"]["plans"][step]["flops"] + ranks[cp]["unpooled"]["plans"][step]["flops"]
        assert um["flops_imbalance_all"] == pytest.approx(imbalance(side_by_side))
        assert pm["flops_imbalance_all"] == pm["flops_imbalance"] == pytest.approx(
            imbalance(ranks[0]["pooled"]["plans"][step]["flops"]))
        # pooled: within CAD's default epsilon (0.04) of the mean, or no worse than unpooled
        assert pm["flops_imbalance_all"] <= max(um["flops_imbalance_all"], 1.04) + 1e-9, (step, pm, um)
    imb = [(m["flops_imbalance_all"], u["flops_imbalance_all"]) for m, u in zip(pooled["history"], unpooled["history"])]
    assert any(um > 1.15 and pm < 1.11 for pm, um in imb), imb  # CAD's epsilon 0.1 over the pool


def test_cad_pool_config():
    base = RunConfig().replace(parallel={"dp": 2, "cp": 2, "scheduler": "cad"})
    assert validate(base).parallel.cad_pool is True and validate(base).parallel.pools_replicas
    assert not validate(base.replace(parallel={"cad_pool": False})).parallel.pools_replicas
    # ignored (no error) where there is nothing to pool: another scheduler, or one replica
    assert not validate(base.replace(parallel={"scheduler": "zigzag"})).parallel.pools_replicas
    assert not validate(base.replace(parallel={"dp": 1, "cp": 4})).parallel.pools_replicas
    for bad in ("yes", 1, None):
        with pytest.raises(ValueError, match="parallel.cad_pool must be"):
            validate(base.replace(parallel={"cad_pool": bad}))
