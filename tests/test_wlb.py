"""Issue 77 item 4: the simulator's ``wlb`` row as WLB-LLM's paper runs it -- per-document CP with K/V
all-gathered, its packing with outlier queues -- and the GPU a plan balances its kernel on, as the
trainer passes it. Seconds."""

import numpy as np
import pytest

from distattn.costmodel.model_shape import MODELS
from distattn.costmodel.network import default_profile
from distattn.sim import sweep
from distattn.sim.job import dry_schedule, plan_context
from distattn.sim.simulate import SimConfig, simulate_row
from distattn.sim.workload import WLB_OUTLIERS, assign_wlb

M8B = MODELS["llama3-8b"]
SEQ = 8192
BIG = int(WLB_OUTLIERS[1] * SEQ)        # an outlier of the larger class
MID = int(WLB_OUTLIERS[0] * SEQ)        # ... and of the smaller


def _step(*outliers, filler=4 * SEQ):
    """A step's sequences: the outliers, then short documents up to ``filler`` tokens more."""
    return [[*outliers, *[256] * ((filler - sum(outliers)) // 256)]]


def test_outliers_wait_until_every_micro_batch_gets_one():
    pw = M8B.pair_weight()
    # 2 replicas x 2 micro-batches: a queue releases its outliers 4 at a time, one to each
    steps = [_step(BIG), _step(BIG), _step(BIG)]
    held = assign_wlb(steps, 2, 2, pw, 2 * SEQ, SEQ)
    assert all(BIG not in rep for mb in held.micro for rep in mb)   # 3 queued: none released yet
    out = assign_wlb(steps + [_step(BIG)], 2, 2, pw, 2 * SEQ, SEQ)
    counts = [sum(n == BIG for n in rep) for mb in out.micro for rep in mb]
    assert counts == [1, 1, 1, 1]                                     # the 4th: one to every micro-batch
    # each size class queues apart
    mixed = assign_wlb([_step(BIG, MID), _step(BIG, MID), _step(BIG, MID), _step(BIG, MID)], 2, 2, pw, 2 * SEQ, SEQ)
    for size in (BIG, MID):
        assert [sum(n == size for n in rep) for mb in mixed.micro for rep in mb] == [1, 1, 1, 1]
    # a document under the threshold is packed the step it comes
    small = assign_wlb([_step(MID - 1)], 2, 2, pw, 2 * SEQ, SEQ)
    assert sum(n == MID - 1 for mb in small.micro for rep in mb for n in rep) == 1


def test_what_fits_nowhere_waits_and_comes_first_next_step():
    pw = M8B.pair_weight()
    cap = 2000                                   # four documents of 1,500 fill the four micro-batches
    step = assign_wlb([[[1500] * 4 + [1000]]], 2, 2, pw, cap, SEQ)
    assert step.held_tokens == 1000
    nxt = assign_wlb([[[1500] * 4 + [1000]], [[400] * 4]], 2, 2, pw, cap, SEQ)
    trained = sorted(n for mb in nxt.micro for rep in mb for n in rep)
    assert trained == [400] * 4 + [1000] and nxt.held_tokens == 0


def test_the_wlb_row_is_per_document_cp_with_kv_all_gathered():
    cfg = SimConfig(M8B, 16, 32768, 4, batch=4)
    schedule = dry_schedule("wlb", [5000, 300, 12000], 4, plan_context(cfg, default_profile()))
    assert schedule.scheduler == "allgather"
    assert len(schedule.shards.rank_runs(0)[0]) >= 3   # each document's pair of chunks on every rank
    draw, before = sweep.pool_batches(None)(cfg, 0), [sweep.pool_batches(None)(cfg, -k) for k in (2, 1)]
    result, _ = simulate_row(cfg, default_profile(), "wlb", draw, before)
    assert result["step_time_s"] > 0 and 0.2 < result["wlb_work_share"] < 5
    ideal, _ = simulate_row(cfg, default_profile(), "wlb-ideal", draw, before)
    assert ideal["wlb_work_share"] == result["wlb_work_share"] and ideal["step_time_s"] <= result["step_time_s"]


def test_the_trainer_plans_cad_for_its_device(monkeypatch):
    """The trainer's plans carry the device's GPU by name (the Megatron adapter does the same with
    its current device), or on a CPU its kernel: the pairs themselves."""
    import torch

    import distattn
    from distattn.kernels import speed as kernel_speed
    from distattn.schedulers import spec
    from distattn.costmodel.tiles import PAIRS
    from distattn.train.config.loader import load_config
    from distattn.train.plan_ahead import plan_options

    assert kernel_speed.device_gpu(torch.device("cpu")) is None
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some Accelerator")
    assert kernel_speed.device_gpu(torch.device("cuda", 0)) is None
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    assert kernel_speed.device_gpu(torch.device("cuda", 0)) == "h200"
    cfg = load_config("tiny", ["parallel.cp=2", "parallel.scheduler=cad"])
    gpu = plan_options(cfg, 989e12, device=torch.device("cuda", 0))["context"]
    assert gpu.gpu == "h200" and gpu.kernel is None
    assert spec("cad").derive(2, gpu, {})["cost"].tiles == kernel_speed.kernel_model("h200", gpu.head_dim)
    cpu = plan_options(cfg, None, device=torch.device("cpu"))["context"]
    assert cpu.gpu is None and cpu.kernel is PAIRS and spec("cad").derive(2, cpu, {})["cost"].tiles is PAIRS
    # the pairs balance FLOPs: a plan's seconds and FLOPs are even alike
    st = distattn.plan([3000, 100, 100, 100, 100], 4, scheduler="cad", context=cpu).stats(8, 2, 64)
    assert st["flops_imbalance"] <= 1.1 and st["seconds_imbalance"] == pytest.approx(st["flops_imbalance"], rel=1e-6)


def test_sweep_rows_remember_the_steps_before(monkeypatch):
    """Each draw of a wlb row replays the stream's steps before it through the queues."""
    import distattn.sim.sweep as sw

    seen = []
    real = sw.simulate_row
    monkeypatch.setattr(sw, "simulate_row", lambda cfg, net, name, chunks, history=(): seen.append(len(history))
                        or real(cfg, net, name, chunks, history))
    cfg = SimConfig(M8B, 16, 32768, 4, batch=4)
    sw.run_draws(cfg, default_profile(), "wlb", sw.pool_batches(None), range(2))
    sw.run_draws(cfg, default_profile(), "cad", sw.pool_batches(None), range(1))
    assert seen == [8, 8, 0]
    assert np.isfinite(sw.pool_batches(None)(cfg, -3)[0][0])
    with pytest.raises(ValueError):
        assign_wlb([[[SEQ * 2]]], 1, 1, 1e-4, SEQ, SEQ)   # longer than the cap: pack_balanced's ValueError
