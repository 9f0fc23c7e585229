"""Issue 67 item 3: per-batch choice screens its layouts in closed form (:mod:`distattn.sim.screen`) and
replays only the screen's best and the fixed choice -- held here to the replay it stands in for."""

import math
from dataclasses import replace

import numpy as np
import pytest

from distattn.costmodel.model_shape import MODELS
from distattn.costmodel.network import default_profile
from distattn.sim import fit
from distattn.sim.job import SimConfig, links_of
from distattn.sim.dp import dp_seconds
from distattn.sim.per_batch import balanced_layout, class_time, lengths_of, setting_index
from distattn.sim.screen import Screen
from distattn.sim.workload import draw_chunks

M = MODELS["llama3-8b"]
GPUS, SEQ = 16, 32768


def _job(seed=0):
    cfg = SimConfig(M, GPUS, SEQ, 1, batch=8)
    links = links_of(default_profile(), cfg)
    fsdp = dp_seconds(replace(cfg, cp=1), links.cp)
    docs = [n for c in draw_chunks(8, SEQ, None, seed) for n in c]
    cap = math.ceil(cfg.token_cap_factor * sum(docs) / GPUS)
    return cfg, links, fsdp, docs, cap


def _at(cfg, name, cp, cap):
    mode, chunk = fit.BY_COST[setting_index(cfg, name, cp, cap * cp)]
    return replace(cfg, activation_checkpointing=mode, mlp_chunk=chunk)


@pytest.mark.parametrize("name,cp", [("ulysses", 4), ("zigzag", 2), ("cad", 4), ("usp", 8)])
def test_the_screen_prices_a_class_within_a_few_percent_of_its_replay(name, cp):
    cfg, links, fsdp, docs, cap = _job()
    replay = lambda at, n, c, groups: class_time(at, n, c, groups, links, fsdp, whole=False)  # noqa: E731
    screen = Screen(cfg, replay, cap)
    at = _at(cfg, name, cp, cap)
    for seed in (1, 2):   # groups the fit never saw: another draw's, packed as the trainer packs them
        other = [n for c in draw_chunks(8, SEQ, None, seed) for n in c]
        layout = balanced_layout(other, GPUS // cp, cp, 1, math.ceil(1.25 * sum(other) * cp / GPUS),
                                 M.pair_weight(), seed)
        groups = [rounds[0] for _, rounds in lengths_of(layout, other)]
        if any(len(g) < 2 for g in groups) and cp > 1:
            at = replace(at, nano_batches=1)   # (cut alike: a group of one document is not cut)
        priced = screen.price(at, name, cp, groups, docs)
        replayed = class_time(at, name, cp, [[g] for g in groups], links, fsdp, whole=True)
        assert priced == pytest.approx(replayed, rel=0.06)
    assert all(f.error < 0.1 for f in screen.fits.values())


def test_the_screen_names_the_slowest_group_where_workload_would_not():
    """One long document against many short ones with more tokens: the long one's group is the slower
    (attention), and the screen ranks it first, as the replay does."""
    cfg, links, fsdp, docs, cap = _job()
    replay = lambda at, n, c, groups: class_time(at, n, c, groups, links, fsdp, whole=False)  # noqa: E731
    screen = Screen(cfg, replay, cap)
    groups = [[2000] * 30, [4 * cap - 4000], [1500] * 40, [3000] * 20]
    at = replace(_at(cfg, "ulysses", 4, cap), nano_batches=1)
    solo = [class_time(at, "ulysses", 4, [[g]], links, fsdp, whole=True) for g in groups]
    ranked = [k for _, k in screen.slowest(at, "ulysses", 4, groups, docs, 2)]
    assert ranked[0] == int(np.argmax(solo))


def test_a_class_of_unlike_groups_extends_each_rank_not_the_slowest_at_a_few_layers():
    """The group with the most tokens ends last after a few layers (its output layer), the one with the most
    attention after all of them: the shortened replay extends each rank's pace, so it matches the whole."""
    cfg, links, fsdp, docs, cap = _job()
    at = _at(cfg, "ulysses", 4, cap)
    groups = [[[4 * cap - 4000]], [[1000] * (4 * cap // 1000 - 1)]]
    whole = class_time(at, "ulysses", 4, groups, links, fsdp, whole=True)
    short = class_time(at, "ulysses", 4, groups, links, fsdp, whole=False)
    assert short == pytest.approx(whole, rel=0.005)


def test_a_layout_the_screen_prices_far_behind_the_fixed_choice_is_not_replayed(monkeypatch):
    """choose_step replays the screen's best only where it could win: the answer is the one it gives
    replaying it anyway."""
    from distattn.sim import per_batch

    cfg, links, fsdp, docs, cap = _job()
    fixed = ("zigzag", 4, 2)
    pruned = per_batch.choose_step(cfg, docs, links, fixed=fixed)
    monkeypatch.setattr(per_batch, "SURE_LOSS", math.inf)
    full = per_batch.choose_step(cfg, docs, links, fixed=fixed)
    assert replace(pruned, planning_s=0.0, fitting_s=0.0) == replace(full, planning_s=0.0, fitting_s=0.0)
