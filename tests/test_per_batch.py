"""Issue 55 in the simulator: each step's CP groups, documents and schedulers chosen on the honest model
(:mod:`distattn.sim.per_batch`), ``distattn.choose`` for trainers we do not own, and ``simulate
--per-batch``'s row."""

import json
import math
from dataclasses import replace

import numpy as np
import pytest

import distattn
from distattn.costmodel.model_shape import MODELS
from distattn.costmodel.network import default_profile
from distattn.sim.job import SimConfig
from distattn.sim.dp import dp_seconds
from distattn.sim.job import links_of
from distattn.sim.per_batch import (MIXED, PER_MICRO_BATCH, arrange, balanced_layout, choose_step, class_time, lengths_of)
from distattn.sim.workload import draw_chunks

M = MODELS["llama3-8b"]


def _batch(gpus=16, seq=32768, seed=0):
    chunks = draw_chunks(gpus * 16384 // seq, seq, None, seed)
    return [n for c in chunks for n in c]


@pytest.mark.parametrize("small,spread", [(1, 1.0), (2, 2.0), (1, 4.0)])
def test_arrange_tiles_the_ranks_and_places_every_document_once(small, spread):
    docs = [30000, 12000] + [500] * 300 + [3000] * 40
    ranks, cap = 16, math.ceil(1.25 * sum(docs) / 16)
    layout = arrange(docs, ranks, cap, small, M.pair_weight(), spread)
    assert sum(cp for cp, _ in layout) == ranks
    assert all(cp & (cp - 1) == 0 for cp, _ in layout)                 # powers of two
    assert [cp for cp, _ in layout] == sorted((cp for cp, _ in layout), reverse=True)  # largest first: aligned
    placed = sorted(i for _, (r,) in layout for i in r)
    assert placed == list(range(len(docs)))
    assert all(sum(docs[i] for i in r) <= cp * cap for cp, (r,) in layout)
    # a document no group of the small size holds got a larger group
    long_group = next(cp for cp, (r,) in layout if 0 in r)
    assert long_group * cap >= docs[0] and (long_group > small or docs[0] <= small * cap)


def test_arrange_says_when_the_long_documents_need_more_ranks_than_there_are():
    assert arrange([1000] * 4, 2, 300, 1, 0.0) is None


def test_choose_step_tiles_aligned_groups_and_beats_or_keeps_the_fixed_choice():
    cfg = SimConfig(M, 16, 32768, 1)
    docs = _batch()
    net = default_profile()
    got = choose_step(cfg, docs, net, fixed=("zigzag", 8, 1))
    first = 0
    for g in got.groups:
        assert g.first == first and g.first % g.cp == 0 and g.scheduler in MIXED
        first += g.cp
    assert first == 16
    assert sorted(i for g in got.groups for i in g.pieces[0]) == list(range(len(docs)))
    assert [list(g.rounds[0]) for g in got.groups] == [[docs[i] for i in g.pieces[0]] for g in got.groups]
    assert got.choice == [(g.scheduler, g.cp) for g in got.groups]
    # the fixed choice, packed as the trainer packs it and timed under the chosen checkpointing
    at = replace(cfg, activation_checkpointing=got.checkpointing, mlp_chunk=got.mlp_chunk)
    links = links_of(net, cfg)
    cap = math.ceil(1.25 * sum(docs) / 16)
    fixed = balanced_layout(docs, 2, 8, 1, cap * 8, M.pair_weight())
    fixed_s = class_time(at, "zigzag", 8, [r for _, r in lengths_of(fixed, docs)], links,
                         dp_seconds(replace(cfg, cp=1), links.cp))
    assert got.predicted_step_s <= fixed_s * 1.02, (got.predicted_step_s, fixed_s)


def test_a_fixed_cad_is_scored_pooled_as_a_fixed_cad_runs():
    """cad among the fixed choices is priced over one pool of every group (the fixed cad row), and the
    step is never predicted slower than it; the groups say whether they pool."""
    cfg = SimConfig(M, 16, 32768, 1)
    docs = _batch()
    net = default_profile()
    got = choose_step(cfg, docs, net, fixed=[("zigzag", 8, 1), ("cad", 8, 1)])
    at = replace(cfg, activation_checkpointing=got.checkpointing, mlp_chunk=got.mlp_chunk)
    links = links_of(net, cfg)
    fixed = balanced_layout(docs, 2, 8, 1, math.ceil(1.25 * sum(docs) / 16) * 8, 0.0)
    groups = [r for _, r in lengths_of(fixed, docs)]
    fsdp = dp_seconds(replace(cfg, cp=1), links.cp)
    pooled = class_time(at, "cad", 8, groups, links, fsdp, pool=True)
    assert got.predicted_step_s <= pooled * 1.02, (got.predicted_step_s, pooled)
    assert pooled != class_time(at, "cad", 8, groups, links, fsdp)   # pooled or not: two different plans
    assert {g.pooled for g in got.groups} in ({False}, {True})
    assert all(g.scheduler == "cad" and g.cp == 8 for g in got.groups if g.pooled)
    assert [row[3] for row in got.layout()] == [g.pooled for g in got.groups]


def test_a_class_of_cad_groups_replays_each_group_alone_cut_alike():
    """Groups of cad each plan their own (different programs): the class's time is its slowest group's,
    each in two nano-batches only where every group of the class holds two documents or more."""
    cfg = SimConfig(M, 16, 32768, 1, activation_checkpointing="selective", mlp_chunk=0)
    links = links_of(default_profile(), cfg)
    fsdp = dp_seconds(replace(cfg, cp=1), links.cp)
    groups = [[[3000, 2000, 1000]], [[5000, 800]], [[4000, 300, 200, 100]], [[6000]]]

    def alone(at, gs):
        return max(class_time(at, "cad", 4, [g], links, fsdp) for g in gs)
    assert class_time(cfg, "cad", 4, groups[:3], links, fsdp) == alone(cfg, groups[:3])
    assert class_time(cfg, "cad", 4, groups, links, fsdp) == alone(replace(cfg, nano_batches=1), groups)
    assert alone(replace(cfg, nano_batches=1), groups[:3]) != alone(cfg, groups[:3])


def test_an_unknown_scheduler_is_refused():
    with pytest.raises(ValueError, match="scheduler 'ringo' is unknown"):
        choose_step(SimConfig(M, 8, 4096, 1), [4096], default_profile(), schedulers=("ringo",))


def test_choose_gives_a_pair_per_micro_batch():
    micro = [[65536], [2048] * 32, [16384] + [1024] * 48]
    got = distattn.choose(micro, 16, "llama3-8b")
    assert len(got) == 3
    for name, cp in got:
        assert name in PER_MICRO_BATCH and isinstance(cp, int) and 16 % cp == 0
    # a document of 64K tokens needs CP: no rank holds it
    assert got[0][1] >= math.ceil(65536 / (1.25 * 65536 / 16))
    assert distattn.choose(micro, 16, M, memory_gib=80) == got


@pytest.mark.parametrize("kwargs, words", [
    ({"model": "gpt-9"}, "model"), ({"gpu": "tpu"}, "gpu"), ({"world_size": 0}, "world_size"),
    ({"memory_gib": -1}, "memory_gib"), ({"doc_lens_per_micro_batch": []}, "doc_lens_per_micro_batch"),
    ({"doc_lens_per_micro_batch": [[0, 5]]}, "doc_lens"),
])
def test_choose_refuses_bad_arguments(kwargs, words):
    args = {"doc_lens_per_micro_batch": [[1024]], "world_size": 8, "model": "llama3-8b", **kwargs}
    with pytest.raises(ValueError, match=words):
        distattn.choose(**args)


def test_simulate_per_batch_row(capsys):
    from distattn.cli import main

    assert main(["simulate", "--gpus", "16", "--seq-len", "32K", "--draws", "2", "--per-batch",
                 "--schedulers", "zigzag", "ulysses", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["results"]
    row = next(r for r in rows if r["scheduler"] == "per-batch")
    for key in ("step_time_s", "step_time_p10_s", "step_time_p90_s"):
        assert row[key] > 0
    assert row["best_fixed"]["scheduler"] in ("zigzag", "ulysses") and row["best_fixed"]["cp"] >= 1
    fixed = next(r for r in rows if r["scheduler"] == row["best_fixed"]["scheduler"])
    assert fixed["step_time_s"] == min(r["step_time_s"] for r in rows if r["scheduler"] != "per-batch")
    ratio = np.asarray(fixed["step_times_s"]) / np.asarray(row["step_times_s"])
    assert row["speedup_vs_best_fixed"] == pytest.approx(float(np.median(ratio)))
    assert sum(row["choices"].values()) >= 2 and row["draws"] == 2
    # the screen's fits are the job's, once, reported apart: not charged to a draw's step
    assert row["screen_fit_s"] > 0 and "fitting_s" not in row
    assert ratio.min() > 0.9   # (the fits charged to the first draw made it several times the fixed step)


def test_choose_within_fixed_cp_groups_picks_the_scheduler_only():
    """Megatron's CP groups are made once: ``cps=[cp]`` leaves the scheduler to choose."""
    got = distattn.choose([[8192], [512] * 16], 4, "llama3-8b", cps=[4], schedulers=("zigzag", "ulysses"))
    assert [cp for _, cp in got] == [4, 4] and {name for name, _ in got} <= {"zigzag", "ulysses"}
    with pytest.raises(ValueError, match="cps"):
        distattn.choose([[8192]], 4, "llama3-8b", cps=[3])
    with pytest.raises(ValueError, match="schedulers"):
        distattn.choose([[8192]], 4, "llama3-8b", schedulers=("cad",))


def test_a_document_too_heavy_for_a_small_group_gets_a_group_of_its_own():
    """Its tokens fit 8 ranks' room, but its attention is many mean ranks' worth: it is not dealt among the
    short documents (that group would set the step), it gets the ranks that even it out."""
    docs = [150_000] + [2000] * 900
    ranks, cap = 64, math.ceil(1.25 * sum(docs) / 64)
    assert docs[0] <= 8 * cap
    layout = arrange(docs, ranks, cap, 8, M.pair_weight())
    own = next(rounds[0] for cp, rounds in layout if 0 in rounds[0])
    big = next(cp for cp, rounds in layout if 0 in rounds[0])
    assert big > 8 and own[0] == 0


def test_each_class_takes_the_nano_batches_priced_faster():
    """Mixed layouts sweep nano-batches per group size (as the fixed rows' sweep does), and the choice
    carries them to the trainer (``StepChoice.layout``'s fifth field)."""
    from distattn.sim import per_batch

    cfg = SimConfig(M, 16, 32768, 1)
    layout = [(8, [[30000, 2000]]), (8, [[3000, 3000, 3000]])]

    def price(at, name, cp, groups, how):   # two nano-batches pay for zigzag, not for ulysses
        return {("zigzag", 2): 1.0, ("zigzag", 1): 2.0}.get((name, at.nano_batches), 3.0)
    got = per_batch._score(cfg, layout, 40000, ("zigzag", "ulysses"), {}, price)
    assert got[2] == {8: ("zigzag", 2)} and got[0] == 1.0
    docs = _batch()
    choice = choose_step(cfg, docs, links_of(default_profile(), cfg), fixed=("zigzag", 8, 1))
    assert all(len(g) == 5 and g[4] in (1, 2) for g in choice.layout())
