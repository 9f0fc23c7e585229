"""Slice masks (``distattn.SliceMask``) under every scheduler: constructors, validation, FLOPs that
follow the true mask area, coverage of every rank's slices, and exactness vs the fp64 oracle (worlds 1-4; 5 and 6 with --slow)."""

import itertools

import numpy as np
import pytest

import distattn
from conftest import covers_the_mask, oracle_case_error, slow_cases
from distattn.planning.masks import SliceMask, causal_blockwise, prefix_lm, shared_question
from distattn.distributed.spawn import run_distributed

SCHEDULERS = ["ring", "zigzag", "allgather", "ulysses", "usp", "cad"]


def _random_mask(total: int, seed: int, rows_disjoint: bool = False) -> SliceMask:
    """Random non-overlapping slices of every kind (rejection sampling)."""
    rng = np.random.default_rng(seed)
    rows: list = []
    for _ in range(40):
        q0, k0 = (int(x) for x in rng.integers(0, total, 2))
        q1, k1 = q0 + int(rng.integers(1, total - q0 + 1)), k0 + int(rng.integers(1, total - k0 + 1))
        cand = rows + [(q0, q1, k0, k1, str(rng.choice(distattn.planning.masks.KINDS)))]
        try:
            mask = SliceMask(cand)
        except ValueError:
            continue
        if rows_disjoint and not mask.rows_disjoint:
            continue
        rows = cand
    return SliceMask(rows)


MASKS = {
    "shared_question": ([5, 3, 6, 2, 4], shared_question(5, [3, 6, 2, 4])),
    "prefix_lm": ([9, 4, 7], prefix_lm([9, 4, 7], [3, 0, 7])),
    "causal_blockwise": ([20], causal_blockwise([3, 5, 1, 7, 4])),
    "inv_and_bi": ([12, 8], SliceMask([(0, 12, 0, 12, "inv_causal"), (12, 20, 12, 20, "bi_causal"),
                                       (12, 20, 0, 6, "full")])),
    "random": ([23], _random_mask(23, 0)),
    "random_rows": ([19], _random_mask(19, 1, rows_disjoint=True)),
}


# ---- constructors and validation ----------------------------------------------------------------

def test_constructors_match_their_definition():
    q, k = np.arange(20)[:, None], np.arange(20)[None, :]
    # shared question: question causal; answers see the question and themselves causally
    dense = shared_question(5, [7, 8]).dense(20).numpy()
    ans = np.where(q < 5, 0, np.where(q < 12, 1, 2))
    key_ans = np.where(k < 5, 0, np.where(k < 12, 1, 2))
    assert (dense == ((k <= q) & ((key_ans == 0) | (key_ans == ans)))).all()
    # prefix-LM: prefix bidirectional, rest causal, documents apart
    dense = prefix_lm([12, 8], [4, 3]).dense(20).numpy()
    doc, kdoc = q >= 12, k >= 12
    start = np.where(doc, 12, 0)
    prefix_end = np.where(doc, 15, 4)
    assert (dense == ((doc == kdoc) & ((k <= q) | (k < prefix_end)) & (k >= start))).all()
    # block causal: a block sees every earlier block and itself whole
    dense = causal_blockwise([6, 4, 10]).dense(20).numpy()
    block_end = np.where(q < 6, 6, np.where(q < 10, 10, 20))
    assert (dense == (k < block_end)).all()
    # kinds, MagiAttention's alignment: causal bottom-right, inv_causal top-left
    m = SliceMask([(0, 3, 0, 5, "causal"), (3, 6, 0, 5, "inv_causal"), (6, 9, 0, 5, "bi_causal")])
    i, j = np.arange(3)[:, None], np.arange(5)[None, :]
    d = m.dense(9).numpy()
    assert (d[0:3, :5] == (j <= i + 2)).all() and (d[3:6, :5] == (j >= i)).all()
    assert (d[6:9, :5] == ((j >= i) & (j <= i + 2))).all()
    assert m.area() == d.sum()
    # document masks expressed through it
    assert SliceMask.documents([3, 5], True, 2).area() == distattn.planning.masks.mask_area([3, 5], [3, 5], True, 2).sum()


@pytest.mark.parametrize("rows,match", [
    ([(0, 4, 0, 4, "causal"), (2, 4, 0, 2, "full")], "overlap in 4"),
    ([(0, 4, 0, 4, "diagonal")], "kind='diagonal'"),
    ([(0, 4, 3, 2, "full")], "k_start <= k_end"),
    ([(0, -1, 0, 2, "full")], "non-negative"),
    ([(0, 4, 0, 4)], "each slice is"),
    ([], "at least one"),
])
def test_slice_mask_validation(rows, match):
    with pytest.raises(ValueError, match=match):
        SliceMask(rows)


def test_plan_validation():
    mask = shared_question(4, [3, 3])
    with pytest.raises(ValueError, match="inside \\[0, 8\\)"):
        distattn.plan([8], 2, mask=mask)
    with pytest.raises(ValueError, match="window= or mask="):
        distattn.plan([10], 2, mask=mask, window=4)
    with pytest.raises(ValueError, match="pool="):
        distattn.plan([10], 2, scheduler="cad", mask=mask, pool=object())
    with pytest.raises(ValueError, match="distattn.SliceMask"):
        distattn.plan([10], 2, mask=[(0, 10, 0, 10, "full")])


# ---- planning: FLOPs follow the true area, every pair computed once --------------------------------

@pytest.mark.parametrize("name", list(MASKS))
@pytest.mark.parametrize("world_size", [1, 2, 3, 5, 6])
def test_every_rank_computes_its_share_once(name, world_size):
    docs, mask = MASKS[name]
    for scheduler in SCHEDULERS:
        opts = {"ulysses_degree": 2 if world_size % 2 == 0 else 1} if scheduler == "usp" else {}
        plan = distattn.plan(docs, world_size, scheduler=scheduler, mask=mask, **opts)
        stats = plan.stats(num_heads=6, num_kv_heads=2, head_dim=8)
        assert sum(stats["flops"]) == 4 * mask.area() * 6 * 8, (name, scheduler, world_size)
        if scheduler not in ("ulysses", "usp"):  # head-split schedulers compute every pair on a share of heads
            assert covers_the_mask(plan, docs, True, None, mask), (name, scheduler, world_size)


@pytest.mark.parametrize("mask", [prefix_lm([4096] * 4, [3000, 100, 2000, 50]),
                                  shared_question(4096, [2000, 6000, 500, 3788]),
                                  causal_blockwise([1000, 3000, 500, 4000, 2000, 5884])])
def test_cad_balances_slice_masks(mask):
    """FLOPs with a roofline; the kernel's seconds by default (the tile model: 2K tokens a rank, each
    piece paying its CTAs' fixed cost over the group's key hull, so less even)."""
    from distattn.costmodel.cost import Roofline

    docs = [16384]
    zig = distattn.plan(docs, 8, scheduler="zigzag", mask=mask).stats(8, 8, 64)
    roof = distattn.plan(docs, 8, scheduler="cad", mask=mask, cost=Roofline()).stats(8, 8, 64)
    cad = distattn.plan(docs, 8, scheduler="cad", mask=mask).stats(8, 8, 64)
    assert sum(cad["flops"]) == sum(roof["flops"]) == sum(zig["flops"])
    assert roof["flops_imbalance"] < 1.1 and roof["flops_imbalance"] <= zig["flops_imbalance"]
    assert cad["seconds_imbalance"] < 1.3


# ---- exactness vs the fp64 oracle on gloo ranks --------------------------------------------------

def _slice_case(scheduler, name, hq, hkv, backend="reference", options=None, with_sinks=False, softcap=None):
    docs, mask = MASKS[name]
    return oracle_case_error(scheduler, docs, hq, hkv, 3, {"mask": mask}, backend, options, with_sinks, softcap)


def _worker(cases):
    return [(case, _slice_case(*case)) for case in cases]


def _cases(world_size):
    cases = []
    for n, (scheduler, name) in enumerate(itertools.product(SCHEDULERS, MASKS)):
        hq, hkv = [(6, 2), (6, 3), (6, 6)][n % 3]
        opts = {"ulysses_degree": 2 if world_size % 2 == 0 else 1} if scheduler == "usp" else {}
        cases.append((scheduler, name, hq, hkv, "reference", opts))
    # sinks and soft-capping on slice masks (cad: rows of a shared question merged on one slot)
    for scheduler, name in (("cad", "shared_question"), ("zigzag", "random"), ("usp", "prefix_lm")):
        opts = {"ulysses_degree": 2 if world_size % 2 == 0 else 1} if scheduler == "usp" else {}
        cases += [(scheduler, name, 6, 2, "reference", opts, True, None), (scheduler, name, 6, 3, "reference", opts,
                                                                           True, 1.5)]
    # the torch backend's band tiles under a ring and locally
    cases += [("zigzag", "shared_question", 4, 2, "torch", {}), ("ulysses", "random", 6, 6, "torch", {})]
    return cases


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, *slow_cases(5, 6)])
def test_slice_masks_exact_under_every_scheduler(world_size):
    results = run_distributed(_worker, world_size, _cases(world_size), timeout=600)
    for rank_results in results:
        for case, err in rank_results:
            tol = 1e-12 if case[4] == "reference" else 1e-9
            assert err < tol, (world_size, case, err)
