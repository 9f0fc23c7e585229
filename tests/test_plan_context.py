"""Planners derive their own options from the job (``distattn.plan(context=PlanContext(...))``); callers
never work them out, and one registry entry names each scheduler's planner, options and executor."""

import pytest

import distattn
from distattn.executors import EXECUTORS
from distattn.costmodel.network import default_profile
from distattn.schedulers import LOCAL, NAMES, REGISTRY, PlanContext, default_ulysses_degree, spec


def test_usp_derives_its_degree_from_the_heads():
    for cp, kv, per_node in [(16, 8, None), (16, 8, 4), (12, 8, None), (8, 2, None)]:
        context = PlanContext(32, kv, gpus_per_node=per_node)
        want = default_ulysses_degree(cp, kv, per_node)
        assert spec("usp").head_split(cp, context) == spec("usp").ulysses_axis(cp, context) == want
        plan = distattn.plan([cp * 64], cp, scheduler="usp", context=context)
        assert plan.schedule.ulysses_degree == want
        assert plan.schedule.num_kv_heads == kv


def test_options_given_by_name_win_over_derived_ones():
    context = PlanContext(32, 8, ulysses_degree=4)
    assert distattn.plan([1024], 16, scheduler="usp", context=context).schedule.ulysses_degree == 4
    plan = distattn.plan([1024], 16, scheduler="usp", context=context, ulysses_degree=2)
    assert plan.schedule.ulysses_degree == 2
    assert spec("usp").head_split(16, context, ulysses_degree=2) == 2


def test_every_scheduler_plans_with_a_context_and_splits_heads_as_it_says():
    context = PlanContext(32, 8, head_groups=2)
    for name in NAMES:
        plan = distattn.plan([700, 300, 24], 8, scheduler=name, context=context)
        assert plan.scheduler == name
        split = spec(name).head_split(8, context)
        assert split == {"ulysses": 8, "usp": default_ulysses_degree(8, 8)}.get(name, 1)
        if split > 1:   # the schedulers that split heads over ranks take head_groups
            assert plan.schedule.head_groups == 2
    # one rank: local attention, whatever the context
    assert distattn.plan([64], 1, scheduler="usp", context=context).scheduler == "usp"


def test_cad_derives_its_cost_model_and_network():
    from distattn.kernels.speed import kernel_model
    from distattn.costmodel.tiles import H100

    net = default_profile()
    options = spec("cad").derive(16, PlanContext(64, 8, head_dim=192, gpu="a100", network=net), {})
    cost = options["cost"]
    assert (cost.num_heads, cost.num_kv_heads, cost.head_dim) == (64, 8, 192)
    assert cost.tiles == kernel_model("a100", 192) and "scaled to a100" in cost.tiles.source
    assert options["network"] is net
    # the context's kernel (the simulator's) wins over its GPU's; gpu= given to plan wins over both
    assert spec("cad").derive(16, PlanContext(64, 8, kernel=H100), {})["cost"].tiles is H100
    assert spec("cad").derive(16, PlanContext(64, 8, kernel=H100), {"gpu": "h200"})["cost"].tiles == \
        kernel_model("h200", 128)
    mine = object()
    assert spec("cad").derive(16, PlanContext(64, 8), {"cost": mine})["cost"] is mine


def test_unknown_options_and_bad_contexts_are_refused():
    with pytest.raises(ValueError, match=r"unexpected option\(s\) \['ulysses_degree'\] for scheduler='ring'"):
        distattn.plan([64], 4, scheduler="ring", ulysses_degree=2)
    with pytest.raises(ValueError, match="PlanContext.num_kv_heads must be a positive int"):
        PlanContext(32, 0)
    with pytest.raises(ValueError, match="PlanContext.head_groups must be a positive int"):
        PlanContext(32, 8, head_groups=1.5)
    assert spec("cad").option_names() == ("backward", "cost", "epsilon", "gpu", "network", "overlap_s", "pool")


def test_each_registry_entry_names_an_executor():
    for entry in (*REGISTRY.values(), LOCAL):
        assert entry.executor in EXECUTORS, entry


def test_the_simulator_refuses_options_as_plan_does():
    from distattn.sim.simulate import dry_schedule

    with pytest.raises(ValueError, match=r"unexpected option\(s\) \['epsilon'\] for scheduler='ring'"):
        dry_schedule("ring", [4096], 8, PlanContext(32, 8), epsilon=0.02)
    assert dry_schedule("cad", [4096], 8, PlanContext(32, 8), epsilon=0.02).scheduler == "cad"


def test_derived_options_follow_those_given_by_name():
    # usp's default degree follows num_kv_heads given by name, not only the context's
    assert spec("usp").head_split(8, PlanContext(num_heads=32), num_kv_heads=4) == 4
    assert distattn.plan([64], 8, scheduler="usp", context=PlanContext(32), num_kv_heads=4).schedule.ulysses_degree == 4
    # one rank with nothing derived plans local attention; cad with a whole head shape plans its tasks
    assert type(distattn.plan([64], 1, scheduler="usp", context=PlanContext(32, 8)).schedule).__name__ == "LocalSchedule"
    assert spec("cad").derive(4, PlanContext(num_kv_heads=2), {}) == {}
