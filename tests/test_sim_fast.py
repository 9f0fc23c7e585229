"""Issue 66: each simulated row at its best setting (nano-batches, usp's Ulysses degree, as the trainer's
config spells them) and the simulator answering in minutes -- what it keeps and computes once changes
no number. Small clusters: seconds each."""

import json
from dataclasses import replace

import numpy as np
import pytest

from distattn.costmodel.model_shape import MODELS
from distattn.costmodel.network import default_profile
from distattn.sim import micro, sweep
from distattn.sim.job import Links, attention_kernel
from distattn.sim.simulate import SimConfig, simulate_row
from distattn.sim.workload import default_batch, draw_chunks, row_of

M8B = MODELS["llama3-8b"]
MEASURED_HERE = {"planning_s"}   # wall seconds on this CPU: the one figure two runs may differ in


def _same(a: list[dict], b: list[dict]) -> None:
    """Two runs' rows agree in every figure but the planning time measured on this CPU."""
    assert [r["scheduler"] for r in a] == [r["scheduler"] for r in b]
    for x, y in zip(a, b):
        assert {k: v for k, v in x.items() if k not in MEASURED_HERE} == \
            {k: v for k, v in y.items() if k not in MEASURED_HERE}, x["scheduler"]


def test_settings_are_the_trainer_config_choices():
    cfg = SimConfig(M8B, 16, 65536, 8, batch=4)
    # cad: its default (2, ping-pong) first, so a tie keeps it; the rest: 1 first
    assert sweep.settings(cfg, "cad", 8) == [{"ulysses_degree": None, "nano_batches": 2},
                                             {"ulysses_degree": None, "nano_batches": 1}]
    assert [s["nano_batches"] for s in sweep.settings(cfg, "zigzag", 8)] == [1, 2]
    # usp: every degree dividing the CP size and the KV heads (8), the default (a node's 8) first
    usp = sweep.settings(cfg, "usp", 8)
    assert [s["ulysses_degree"] for s in usp[::2]] == [8, 1, 2, 4] and len(usp) == 8
    assert {s["ulysses_degree"] for s in sweep.settings(cfg, "usp", 4)} == {1, 2, 4}
    # TP 2: a TP rank holds 4 KV heads
    assert {s["ulysses_degree"] for s in sweep.settings(replace(cfg, tp=2), "usp", 8)} == {1, 2, 4}
    assert sweep.settings(cfg, "usp", 1) == [{"ulysses_degree": None, "nano_batches": 1},
                                             {"ulysses_degree": None, "nano_batches": 2}]
    # a bound has no nano-batches; what the command line fixes is not swept
    assert sweep.settings(cfg, "ideal", 8) == [{"ulysses_degree": None, "nano_batches": None}]
    fixed = replace(cfg, nano_batches=1, ulysses_degree=2)
    assert sweep.settings(fixed, "usp", 8) == [{"ulysses_degree": 2, "nano_batches": 1}]


def test_sweep_tries_every_setting_and_keeps_the_fastest_median():
    cfg = SimConfig(M8B, 16, 65536, 8, batch=default_batch(16, 65536))
    got = {r["scheduler"]: r for r in sweep.rows(cfg, default_profile(), ["usp", "cad", "ideal"],
                                                 sweep.pool_batches(None), 2, True)}
    for name, r in got.items():
        tried = r["sweep"]
        sizes = list(dict.fromkeys(t["cp"] for t in tried))
        assert sizes == sweep.candidates(cfg, name)[:len(sizes)]
        for cp in sizes:   # every setting at every CP size tried, in settings' order
            at = [{"ulysses_degree": t["ulysses_degree"], "nano_batches": t["nano_batches"]} for t in tried
                  if t["cp"] == cp]
            want = sweep.settings(cfg, name, cp)
            assert len(at) == len(want)
            assert all(a["ulysses_degree"] == w["ulysses_degree"] for a, w in zip(at, want))
            assert all(w["nano_batches"] in (None, a["nano_batches"]) for a, w in zip(at, want))
        # 2 draws, all scored: the row is the setting with the lowest median, and names it
        best = min((t for t in tried if t["fits"]), key=lambda t: t["step_time_s"])
        assert r["step_time_s"] == best["step_time_s"]
        assert (r["cp"], r["nano_batches"], r["ulysses_degree"]) == \
            (best["cp"], best["nano_batches"], best["ulysses_degree"])
    assert {t["nano_batches"] for t in got["cad"]["sweep"]} == {1, 2}
    assert {t["ulysses_degree"] for t in got["usp"]["sweep"] if t["cp"] == 8} == {1, 2, 4, 8}
    assert isinstance(got["usp"]["ulysses_degree"], int) and got["cad"]["ulysses_degree"] is None
    assert {t["nano_batches"] for t in got["ideal"]["sweep"]} == {1}


def test_setting_reported_with_and_without_sweep(capsys):
    from distattn.cli import main

    base = ["simulate", "--gpus", "16", "--seq-len", "32K", "--draws", "1", "--schedulers", "usp", "cad", "zigzag",
            "ideal", "--json"]
    assert main(base + ["--cp", "4"]) == 0
    rows = {r["scheduler"]: r for r in json.loads(capsys.readouterr().out)["results"]}
    assert rows["cad"]["nano_batches"] == 2 and rows["zigzag"]["nano_batches"] == 1   # the defaults used
    assert rows["usp"]["ulysses_degree"] == 4 and rows["usp"]["nano_batches"] == 1
    assert rows["ideal"]["nano_batches"] == 1
    assert all(rows[n]["ulysses_degree"] is None for n in ("cad", "zigzag", "ideal"))
    assert main(base + ["--cp", "4", "--nano-batches", "2", "--ulysses-degree", "2"]) == 0
    rows = {r["scheduler"]: r for r in json.loads(capsys.readouterr().out)["results"]}
    assert rows["usp"]["ulysses_degree"] == 2 and rows["usp"]["nano_batches"] == 2 and rows["cad"]["nano_batches"] == 2
    assert main(base[:-1] + ["--cp", "4"]) == 0
    out = capsys.readouterr().out
    assert " nb  U " in out and "parallel.nano_batches" in out and "parallel.ulysses_degree" in out


def test_bounds_from_their_layout_are_the_planned_bounds():
    """The bounds computed from the layout (no planner) equal the bounds of the planned schedules."""
    links = Links.of(default_profile(), 8, 1)
    for world, tp in ((1, 1), (2, 1), (4, 2), (8, 1)):
        cfg = SimConfig(M8B, 32, 65536, world, tp=tp)
        kernel = attention_kernel(cfg)
        docs = draw_chunks(3, 65536, None, world) + [[7, 65529]]
        for name in ("ideal", "wlb-ideal"):
            fast = micro._bound_groups(cfg, name, docs, world, kernel)
            planned = micro._bound(row_of(name), micro._groups(cfg, name, docs, world, kernel, links.cp)[0], world,
                                   cfg.ranks)
            for a, b in zip(fast, planned, strict=True):
                assert all(np.array_equal(a.rates[d], b.rates[d]) for d in micro.DIRECTIONS)
                assert np.array_equal(a.tokens, b.tokens) and a.program.stages == b.program.stages
                for x, y in zip(a.program.phases, b.program.phases, strict=True):
                    assert np.asarray(x.amount).dtype == np.asarray(y.amount).dtype
                    assert np.array_equal(x.amount, y.amount), (name, world)


def test_kept_plans_change_no_number():
    cfg = SimConfig(M8B, 16, 65536, 4, batch=4)
    links = Links.of(default_profile(), 8, 1)
    names = ["cad", "usp", "ideal"]
    micro._PLANS.clear()
    fresh = sweep.rows(cfg, links, names, sweep.pool_batches(None), 2, True)
    assert micro._PLANS   # it kept plans
    again = sweep.rows(cfg, links, names, sweep.pool_batches(None), 2, True)   # from what it kept
    _same(fresh, again)
    # a micro-batch that cannot be cut in two: nano-batches 2 is nano-batches 1, from the kept plans
    chunks = [[65536], [65536], [40000, 25536], [65536]]
    micro._PLANS.clear()
    one, _ = simulate_row(replace(cfg, nano_batches=1), links, "zigzag", chunks)
    kept = len(micro._PLANS)
    two, _ = simulate_row(replace(cfg, nano_batches=2), links, "zigzag", chunks)
    assert len(micro._PLANS) == kept and two["nano_batches"] == 2
    assert {k: v for k, v in one.items() if k != "nano_batches"} == {k: v for k, v in two.items() if k != "nano_batches"}


def test_kept_plans_are_bounded_and_keyed_by_the_job(monkeypatch):
    cfg = SimConfig(M8B, 16, 65536, 4, batch=4)
    links = Links.of(default_profile(), 8, 1)
    micro._PLANS.clear()
    a, _ = simulate_row(cfg, links, "usp", [[65536]] * 4)
    b, _ = simulate_row(replace(cfg, ulysses_degree=2), links, "usp", [[65536]] * 4)   # another plan
    assert (a["ulysses_degree"], b["ulysses_degree"]) == (4, 2) and a["step_time_s"] != b["step_time_s"]
    assert len(micro._PLANS) == 2
    monkeypatch.setattr(micro, "PLANS_KEPT", 6)
    for seed in range(3):   # 4 groups each
        simulate_row(cfg, links, "ring", draw_chunks(4, 65536, None, seed))
    assert len(micro._PLANS) == 6


@pytest.mark.parametrize("name", ["usp", "cad"])
def test_reported_degree_is_the_planned_one(name):
    cfg = SimConfig(M8B, 16, 65536, 8, batch=2)
    links = Links.of(default_profile(), 8, 1)
    for degree in (None, 2):
        got, _ = simulate_row(replace(cfg, ulysses_degree=degree), links, name, draw_chunks(2, 65536, None, 0))
        micro_ = micro.micro_batch(replace(cfg, ulysses_degree=degree), name, [[65536], [65536]],
                                   attention_kernel(cfg), links)
        assert got["ulysses_degree"] == micro_["ulysses"]


def _replay_one_pass_at_a_time(ops, ranks: int, comm: bool = True, slowdown: float = 0.0):
    """The replay as it was before it ran both passes at once (issue 54's, one scattered maximum per
    pair): what :func:`~distattn.sim.replay.replay_both` must equal to the bit."""
    from distattn.planning.program import CHAIN, RUN, START
    from distattn.sim.replay import _slowed

    def coupled(x, op):
        if op.links is not None:
            src, dst = op.links
            out = x.copy()
            np.maximum.at(out, src, x[dst])
            np.maximum.at(out, dst, x[src])
            return out
        return np.repeat(x.reshape(-1, op.span).max(1), op.span) if op.span > 1 else x

    def sent(op):
        if not op.p2p or op.links is None:
            return op.seconds
        out = op.seconds.copy()
        np.maximum.at(out, op.links[1], op.seconds[op.links[0]])
        return out
    clock, queues, inflight, ends = np.zeros(ranks), {}, np.zeros(ranks), {}
    compute, stalled, moving = np.zeros(ranks), np.zeros(ranks), np.zeros(ranks)
    for op in ops:
        if op.op == RUN:
            took = _slowed(op.seconds, np.maximum(inflight - clock, 0), slowdown) if slowdown else op.seconds
            clock = clock + took
            compute += took
        elif op.op in (START, CHAIN):
            ready = np.maximum(clock, queues.get(op.link, 0.0))
            if op.op == CHAIN:
                ready = np.maximum(ready, ends.pop(op.after))
            seconds = sent(op) if comm else 0.0
            queues[op.link] = coupled(ready, op) + seconds
            moving += seconds
            ends[op.key] = queues[op.link]
            if comm:
                inflight = np.maximum(inflight, queues[op.link])
        else:
            end = ends.pop(op.key)
            stalled += np.maximum(end - clock, 0)
            clock = np.maximum(clock, end)
    return clock, compute, stalled, moving


@pytest.mark.parametrize("name", ["zigzag", "cad", "usp", "ulysses"])
def test_both_passes_at_once_are_each_pass(name):
    from distattn.sim.dp import dp_seconds
    from distattn.sim.replay import replay, replay_both
    from distattn.sim.step import step_ops

    cfg = SimConfig(M8B, 32, 65536, 8, batch=8, activation_checkpointing="selective", nano_batches=2)
    links = Links.of(default_profile(), 8, 1)
    chunks = draw_chunks(8, 65536, None, 3)
    replicas = [chunks[2 * r] + chunks[2 * r + 1] for r in range(cfg.dp)]
    mb = micro.micro_batch(cfg, name, replicas, attention_kernel(cfg), links)["micro"]
    ops = step_ops([mb], 4, "selective", cfg.ranks, dp_seconds(cfg, links.cp))
    run, still = replay_both(ops, cfg.ranks, slowdown=0.19)
    for got, comm, slowdown in ((run, True, 0.19), (still, False, 0.0), (replay(ops, cfg.ranks), True, 0.0)):
        want = _replay_one_pass_at_a_time(ops, cfg.ranks, comm, slowdown)
        for a, b in zip((got.end, got.compute, got.stalled, got.comm), want, strict=True):
            assert np.array_equal(a, b)


def test_per_batch_choice_is_the_same_from_kept_plans():
    """choose_step screens the layouts (its screen's fits made once per job), then replays the best and the
    fixed choice: a step chosen again plans nothing twice and answers the same."""
    from distattn.sim.per_batch import choose_step

    cfg = SimConfig(M8B, 16, 32768, 1)
    docs = [n for c in draw_chunks(8, 32768, None, 1) for n in c]
    links = Links.of(default_profile(), 8, 1)
    choose_step(cfg, docs, links, fixed=("zigzag", 8, 1))   # (the screen's fits)
    micro._PLANS.clear()
    fresh = choose_step(cfg, docs, links, fixed=("zigzag", 8, 1))
    planned = len(micro._PLANS)
    assert 0 < planned < micro.PLANS_KEPT
    again = choose_step(cfg, docs, links, fixed=("zigzag", 8, 1))
    assert len(micro._PLANS) == planned   # nothing planned twice
    assert replace(fresh, planning_s=0.0) == replace(again, planning_s=0.0)
