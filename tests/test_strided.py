"""Strided layouts planned in their ranks' order (issue 69, :mod:`distattn.planning.strided`): a stripe (rank ``r``
holds positions ``r, r + P, ...`` of each document, or of the whole sequence) and blocks of tokens dealt
round-robin run as one band per (query class, key class) -- exact vs the fp64 oracle for every scheduler,
forward and every gradient, at 2, 3, 4 and 8 gloo ranks, causal documents, windows and a slice mask; the
reordered mask equals the caller's token by token; shard, positions and unshard keep the caller's layout;
no kernel call carries a segment per token."""

import itertools

import numpy as np
import pytest
import torch.distributed as dist

import distattn
from distattn.kernels import available_backends
from distattn.planning.layout import Layout, token_index
from distattn.planning.masks import SliceMask, shared_question
from distattn.distributed.spawn import run_distributed
from distattn.planning.strided import reorder
from test_layouts import SCHEDULERS, _case_error, random_layout


def dealt(lens, p: int, block: int = 1, per_document: bool = True, reverse: bool = False) -> Layout:
    """Blocks of ``block`` tokens dealt round-robin over ``p`` ranks, restarting at each document (or
    over the whole sequence); ``reverse``: each rank lists its tokens backwards."""
    starts = np.cumsum(lens) - np.asarray(lens)
    spans = list(zip(starts.tolist(), lens)) if per_document else [(0, sum(lens))]
    ranks = [np.concatenate([s + np.flatnonzero((np.arange(n) // block) % p == r) for s, n in spans])
             for r in range(p)]
    return Layout.from_indices([idx[::-1] if reverse else idx for idx in ranks])


def _positions(shards, moved) -> np.ndarray:
    """Where each token of the caller's layout sits in the reordered sequence."""
    pos = np.empty(shards.total, dtype=np.int64)
    for r in range(shards.world_size):
        tokens, order = token_index(shards.owned[r]), moved.given.order[r]
        pos[tokens if order is None else tokens[order]] = token_index(moved.shards.owned[r])
    return pos


MASKS = {"causal": lambda lens: SliceMask.documents(lens, True, None),
         "window": lambda lens: SliceMask.documents(lens, True, 7),
         "bidirectional window": lambda lens: SliceMask.documents(lens, False, 5),
         "shared question": lambda lens: shared_question(5, [sum(lens) - 5])}


@pytest.mark.parametrize("p", [2, 3, 4, 8])
def test_the_reordered_mask_is_the_callers(p):
    for lens, (name, mask), (block, per_doc) in itertools.product(
            ([61], [40, 9, 3, 77], [16 * p, 16 * p]), MASKS.items(), ((1, True), (1, False), (2, True), (3, False))):
        shards = dealt(lens, p, block, per_doc).shards(lens, p)
        moved = reorder(lens, shards, mask(lens))
        if block == 1:
            assert moved is not None, (p, lens, name, block, per_doc)
        if moved is None:
            continue
        pos, total = _positions(shards, moved), sum(lens)
        got = moved.mask.dense(total).numpy()[np.ix_(pos, pos)]
        assert (got == mask(lens).dense(total).numpy()).all(), (p, lens, name, block, per_doc)


def test_what_is_not_fragmented_or_periodic_is_left_alone():
    lens, p = [100, 60], 3
    mask = SliceMask.documents(lens)
    for layout in ("contiguous", "zigzag", random_layout(sum(lens), p, 0), dealt(lens, p, block=8)):
        assert reorder(lens, Layout.of(layout).shards(lens, p), mask) is None, layout


def test_periods_are_found_where_a_document_starts_inside_a_block():
    """Blocks dealt over the whole sequence cut a document mid-block, and a rank may hold several
    classes of a period: both are still planned as bands."""
    lens = [5, 200]
    pattern = np.tile([0, 1, 0, 2, 0, 3], 35)[:sum(lens)]        # rank 0 holds every other token
    for layout, p in ((dealt(lens, 2, block=2, per_document=False), 2),
                      (Layout.from_indices([np.flatnonzero(pattern == r) for r in range(4)]), 4)):
        shards = layout.shards(lens, p)
        moved = reorder(lens, shards, SliceMask.documents(lens, True, 9))
        assert moved is not None
        pos = _positions(shards, moved)
        want = SliceMask.documents(lens, True, 9).dense(sum(lens)).numpy()
        assert (moved.mask.dense(sum(lens)).numpy()[np.ix_(pos, pos)] == want).all()


def _plan_worker(lens, indices):
    plan = distattn.plan(lens, dist.group.WORLD, scheduler="ring", layout=Layout.from_indices(indices))
    x = np.arange(sum(lens) * 2, dtype=np.float64).reshape(-1, 2)
    import torch
    local = plan.shard(torch.from_numpy(x))
    return local.numpy(), plan.position_ids().numpy(), plan.unshard(local * 3).numpy(), plan.stats(2, 2, 8)


def test_shard_positions_unshard_keep_the_callers_layout():
    lens, p = [37, 20], 3
    layout = dealt(lens, p, reverse=True)
    x = np.arange(sum(lens) * 2, dtype=np.float64).reshape(-1, 2)
    starts = np.cumsum(lens) - np.asarray(lens)
    for r, (local, pos, back, stats) in enumerate(run_distributed(_plan_worker, p, lens, layout.indices, timeout=120)):
        idx = np.asarray(layout.indices[r])
        assert (local == x[idx]).all() and (back == x * 3).all(), r
        doc = np.searchsorted(np.cumsum(lens), idx, side="right")
        assert (pos == idx - starts[doc]).all(), r
        assert stats["kernel_segments"] == [2, 2, 2] and not stats["fragmented"], stats


def test_dry_stats_of_a_stripe_are_not_fragmented():
    lens, p = [1024, 512], 4
    for scheduler in SCHEDULERS:
        options = {"ulysses_degree": 2} if scheduler == "usp" else {}
        stats = distattn.plan(lens, p, scheduler=scheduler, layout=dealt(lens, p), **options).stats(4, 4, 64)
        # a segment per token before; cad cuts its tasks smaller than a rank's run
        assert not stats["fragmented"] and stats["min_tokens_per_segment"] >= 48, (scheduler, stats)
    # what the simulator prices a rank's kernels by: its segments' pairs, under the reordered mask
    plan = distattn.plan(lens, p, scheduler="ring", layout=dealt(lens, p))
    rank, _, area, _ = plan.schedule.kernel_segments()
    pairs = [f // (4 * 4 * 64) for f in plan.stats(4, 4, 64)["flops"]]
    assert np.bincount(rank, weights=area).tolist() == pairs


def _exact_worker(cases):
    return [(case[:2], _case_error(*case)) for case in cases]


def _cases(p: int) -> list[tuple]:
    docs = [29, 8 * p, 3, 41]
    layouts = {"stripe": dealt(docs, p), "stripe over the sequence": dealt(docs, p, per_document=False),
               "blocks of 2, reversed": dealt(docs, p, block=2, reverse=True)}
    masks = [(True, None, None), (True, 9, None), (False, 6, None), (True, None, shared_question(5, [sum(docs) - 5]))]
    hq = 8 if p == 8 else 6      # ulysses splits the query heads over every rank
    heads = [(hq, 2), (hq, hq // 2), (hq, 1), (hq, hq)]
    cases = []
    for n, (scheduler, name) in enumerate(itertools.product(SCHEDULERS, layouts)):
        causal, window, mask = masks[n % len(masks)]
        cases.append((scheduler, layouts[name], docs, causal, window, *heads[n % len(heads)], mask, n))
    return cases


@pytest.mark.parametrize("world_size", [2, 3, 4, 8])
def test_every_scheduler_is_exact_on_strided_layouts(world_size):
    for rank_results in run_distributed(_exact_worker, world_size, _cases(world_size), timeout=600):
        for (scheduler, _), err in rank_results:
            assert err <= 1e-12, (world_size, scheduler, err)


def _triton_worker(scheduler: str, block: int, docs):
    """fp32 through the triton backend (conftest's TRITON_INTERPRET=1 reaches the ranks) and through
    PyTorch's fp32 reference, each vs the fp64 oracle."""
    import torch
    from conftest import max_err, rand_qkv

    p, total = dist.get_world_size(), sum(docs)
    q, k, v = rand_qkv(total, total, 4, 2, 16, seed=block)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    errors = {}
    for backend, dtype in (("reference", torch.float64), ("triton", torch.float32), ("torch", torch.float32)):
        plan = distattn.plan(docs, dist.group.WORLD, scheduler=scheduler, layout=dealt(docs, p, block),
                             backend=backend, causal=True, window=11)
        mine = [plan.shard(t).to(dtype).requires_grad_() for t in (q, k, v)]
        out = distattn.attention(*mine, plan)
        out.backward(plan.shard(dout).to(dtype))
        errors[backend] = [out.detach(), *(t.grad for t in mine)]
    want = errors.pop("reference")
    return {b: [max_err(x.double(), w) for x, w in zip(got, want)] for b, got in errors.items()}


@pytest.mark.skipif("triton" not in available_backends(), reason="needs triton (its interpreter)")
@pytest.mark.parametrize("scheduler,block", [("ring", 1), ("allgather", 2), ("cad", 1)])
def test_triton_runs_the_bands_of_a_strided_layout(scheduler, block):
    """The bands are the kernels' existing lo/hi mask (HAS_LO/HAS_HI, compiled for sm_80/sm_90a by
    test_aot's matrix): here the triton backend runs them, forward and backward, within twice the error
    of PyTorch's own fp32 math."""
    for errs in run_distributed(_triton_worker, 2, scheduler, block, [37, 24], timeout=300):
        for triton_err, torch_err in zip(errs["triton"], errs["torch"]):
            assert triton_err <= 2 * torch_err + 1e-6, errs


def _batched_worker(rows):
    import torch
    from conftest import max_err

    p, total = dist.get_world_size(), sum(rows[0])
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(len(rows), total, 4, 8, generator=g, dtype=torch.float64) for _ in range(3))
    ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = torch.stack([distattn.reference_attention(*(t[b] for t in ref_in), row) for b, row in enumerate(rows)])
    ref.sum().backward()
    errors = []
    for scheduler in ("ring", "allgather", "ulysses", "cad"):
        plan = distattn.plan(rows, dist.group.WORLD, scheduler=scheduler, layout=dealt([total], p), backend="reference")
        mine = [plan.shard(t).clone().requires_grad_() for t in (q, k, v)]
        out = distattn.attention(*mine, plan)
        out.sum().backward()
        errors.append(max([max_err(plan.unshard(out.detach()), ref.detach())] +
                          [max_err(a.grad, plan.shard(b.grad)) for a, b in zip(mine, ref_in)]))
    return errors


def test_a_batch_of_striped_rows_is_exact():
    """``[B, S]`` rows, each striped over the ranks (its documents in phases of their own)."""
    for errors in run_distributed(_batched_worker, 3, [[20, 31, 9], [60]], timeout=300):
        assert max(errors) <= 1e-12, errors
