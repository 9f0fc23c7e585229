"""Layouts apart from schedules (issue 29): every scheduler on every token layout -- contiguous,
zigzag, per document, an explicit random index list -- exact vs the fp64 oracle (forward and every
gradient), worlds 1-4 (5 and 6 with --slow), documents, windows, GQA/MQA and a slice mask; the split, positions and
errors of explicit layouts; bytes sent equal stats(); CAD's pool and nano-batches on other layouts."""

import itertools

import numpy as np
import pytest
import torch
import torch.distributed as dist

import distattn
from conftest import covers_the_mask, rand_qkv, shard_errors, slow_cases
from distattn.planning.masks import shared_question
from distattn.distributed.spawn import run_distributed

SCHEDULERS = ["ring", "zigzag", "allgather", "ulysses", "usp", "cad"]
LAYOUTS = [None, "contiguous", "zigzag", "document", "random"]
MASKS = [(True, None), (False, None), (True, 5), (False, 7)]


def _docs(p: int) -> list[int]:
    """Uneven documents, each a multiple of 2p tokens (what layout='document' needs)."""
    return [3 * 2 * p, 2 * p, 5 * 2 * p, 2 * 2 * p]


def random_layout(total: int, p: int, seed: int) -> distattn.Layout:
    """A random permutation of the tokens cut into ``p`` lists of random sizes (some may be empty)."""
    rng = np.random.default_rng(seed)
    cuts = np.sort(rng.integers(0, total + 1, p - 1))
    return distattn.Layout.from_indices(np.split(rng.permutation(total), cuts))


def _layout(name, total, p, seed=0):
    return random_layout(total, p, seed) if name == "random" else name


def _options(scheduler, p):
    # usp: a Ulysses degree dividing the world (odd worlds: all ranks in one Ulysses group)
    return {"ulysses_degree": 2 if p % 2 == 0 else p} if scheduler == "usp" else {}


def _case_error(scheduler, layout, docs, causal, window, hq, hkv, mask=None, seed=0):
    """Inside a gloo rank: max error of this rank's out/dq/dk/dv vs the fp64 oracle."""
    p, total = dist.get_world_size(), sum(docs)
    q, k, v = rand_qkv(total, total, hq, hkv, 8, seed=seed)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = distattn.reference_attention(*ref_in, docs, causal=causal, window=window, mask=mask)
    ref.backward(dout)
    kw = {"mask": mask} if mask is not None else {"causal": causal, "window": window}
    plan = distattn.plan(docs, dist.group.WORLD, scheduler=scheduler, layout=_layout(layout, total, p, seed),
                         backend="reference", **kw, **_options(scheduler, p))
    mine = [plan.shard(t).clone().requires_grad_() for t in (q, k, v)]
    out = distattn.attention(*mine, plan)
    out.backward(plan.shard(dout))
    return shard_errors(plan, out, mine, ref, ref_in)


def _worker(cases):
    return [(case, _case_error(*case)) for case in cases]


def _cases(p: int) -> list[tuple]:
    docs, cases = _docs(p), []
    heads = [(6, 2), (6, 3), (6, 1), (6, 6)]   # GQA, MQA, MHA (6 query heads: ulysses up to 6 ranks)
    for n, (scheduler, layout) in enumerate(itertools.product(SCHEDULERS, LAYOUTS)):
        causal, window = MASKS[n % len(MASKS)]
        cases.append((scheduler, layout, docs, causal, window, *heads[n % len(heads)], None, n))
    for n, (scheduler, layout) in enumerate(itertools.product(SCHEDULERS, ("zigzag", "random"))):
        cases.append((scheduler, layout, docs, True, None, 6, 2, shared_question(5, [4, 6, 1, sum(docs) - 16]), n))
    return cases


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, *slow_cases(5, 6)])
def test_every_scheduler_on_every_layout_is_exact(world_size):
    for rank_results in run_distributed(_worker, world_size, _cases(world_size), timeout=600):
        for case, err in rank_results:
            assert err <= 1e-12, (world_size, case[:2], case[3:7], case[7] is not None, err)


# ---- the layouts themselves ----------------------------------------------------------------------

def test_named_layouts_hold_what_they_say():
    docs, p = [8, 16, 4], 2
    expected = {
        "contiguous": [list(range(0, 14)), list(range(14, 28))],
        "zigzag": [[*range(0, 7), *range(21, 28)], list(range(7, 21))],
        "document": [[0, 1, 6, 7, 8, 9, 10, 11, 20, 21, 22, 23, 24, 27], [2, 3, 4, 5, *range(12, 20), 25, 26]],
    }
    for scheduler, (name, tokens) in itertools.product(SCHEDULERS, expected.items()):
        plan = distattn.plan(docs, p, scheduler=scheduler, layout=name, **_options(scheduler, p))
        got = [distattn.runtime.plans.token_index(plan.layout.owned[r]).tolist() for r in range(p)]
        assert got == tokens, (scheduler, name)
    # each scheduler's own layout is unchanged when layout= is left out
    own = {"ring": "contiguous", "zigzag": "zigzag", "allgather": "zigzag", "ulysses": "contiguous", "cad": "contiguous"}
    for scheduler, name in own.items():
        assert distattn.plan(docs, p, scheduler=scheduler).layout.owned == \
            distattn.plan(docs, p, scheduler=scheduler, layout=name).layout.owned
        assert distattn.plan(docs, p, scheduler=scheduler, layout="sequence").layout.owned == \
            distattn.plan(docs, p, scheduler=scheduler).layout.owned


def _explicit_worker(indices, docs):
    plan = distattn.plan(docs, dist.group.WORLD, scheduler="ring", layout=distattn.Layout.from_indices(indices))
    x = torch.arange(sum(docs) * 2, dtype=torch.float64).view(-1, 2)
    local = plan.shard(x)
    return local, plan.position_ids(), plan.unshard(local * 3), plan.unshard(plan.shard(x.t(), dim=1), dim=1)


def test_explicit_layout_shard_positions_unshard():
    docs = [5, 3, 9]
    indices = [[16, 2, 3, 4, 0], [], [9, 8, 7, 1, 5, 6, 10, 11, 12, 13, 14, 15]]
    starts = np.cumsum([0] + docs[:-1])
    x = torch.arange(sum(docs) * 2, dtype=torch.float64).view(-1, 2)
    for rank, (local, pos, back, back_t) in enumerate(run_distributed(_explicit_worker, 3, indices, docs,
                                                                      timeout=120)):
        assert torch.equal(local, x[indices[rank]]), rank          # in the order the layout lists them
        doc = np.searchsorted(np.cumsum(docs), indices[rank], side="right")
        assert pos.tolist() == (np.asarray(indices[rank], dtype=np.int64) - starts[doc]).tolist()
        assert torch.equal(back, x * 3) and torch.equal(back_t, x.t())


@pytest.mark.parametrize("indices,match", [
    ([[0, 1], [2]], "2 lists but the mesh has 3 ranks"),
    ([[0, 1], [1, 2], [3, 4, 5]], "token 1 is held twice"),
    ([[0, 1], [2], [3, 4]], "token 5 is held by no rank"),
    ([[0, 1], [2, 9], [3, 4, 5]], "outside the 6-token sequence"),
    ([[0, -1], [2], [3, 4, 5, 1]], "element 1 is -1, a negative token index"),
])
def test_bad_explicit_layouts_are_refused(indices, match):
    with pytest.raises(ValueError, match=match):
        distattn.plan([6], 3, scheduler="zigzag", layout=distattn.Layout.from_indices(indices))


def test_bad_layout_arguments_are_refused():
    with pytest.raises(ValueError, match="flat list of int token indices"):
        distattn.Layout.from_indices([[0.5, 1.0]])
    with pytest.raises(ValueError, match="one list of token indices per rank"):
        distattn.Layout.from_indices("0123")
    with pytest.raises(ValueError, match="layout='rows' is unknown"):
        distattn.plan([8], 2, layout="rows")
    with pytest.raises(ValueError, match="layout must be None"):
        distattn.plan([8], 2, layout=3)


@pytest.mark.parametrize("world_size", [2, 3, 5])
def test_every_rank_computes_its_share_once(world_size):
    docs = _docs(world_size)
    for scheduler, layout in itertools.product(SCHEDULERS, LAYOUTS):
        for causal, window in MASKS:
            plan = distattn.plan(docs, world_size, scheduler=scheduler, causal=causal, window=window,
                                 layout=_layout(layout, sum(docs), world_size, seed=world_size),
                                 **_options(scheduler, world_size))
            area = distattn.SliceMask.documents(docs, causal, window).area()
            assert sum(plan.stats(6, 2, 8)["flops"]) == 4 * area * 6 * 8, (scheduler, layout)
            if scheduler not in ("ulysses", "usp"):  # head-split schedulers compute every pair on a share of heads
                assert covers_the_mask(plan, docs, causal, window), (scheduler, layout, causal, window)


def test_zigzag_is_the_ring_on_the_zigzag_layout():
    docs = [40, 24, 64]
    ring = distattn.plan(docs, 4, scheduler="ring", layout="zigzag").stats(8, 2, 64)
    zig = distattn.plan(docs, 4, scheduler="zigzag").stats(8, 2, 64)
    assert {k: v for k, v in ring.items() if k != "scheduler"} == {k: v for k, v in zig.items() if k != "scheduler"}
    assert zig["scheduler"] == "zigzag"


# ---- bytes, pools and nano-batches on other layouts ----------------------------------------------

def _sent_worker(cases):
    out = []
    for scheduler, layout in cases:
        p = dist.get_world_size()
        docs = _docs(p)
        q, k, v = rand_qkv(sum(docs), sum(docs), 6, 2, 8, dtype=torch.float32)
        plan = distattn.plan(docs, dist.group.WORLD, scheduler=scheduler, layout=_layout(layout, sum(docs), p),
                             **_options(scheduler, p))
        before = plan.bytes_sent()
        with torch.no_grad():
            distattn.attention(plan.shard(q), plan.shard(k), plan.shard(v), plan)
        out.append((plan.bytes_sent() - before, plan.stats(6, 2, 8, 4)["send_bytes"][plan.rank]))
    return out


def test_stats_match_bytes_sent():
    cases = [(s, layout) for s in SCHEDULERS for layout in ("zigzag", "random")]
    for rank_results in run_distributed(_sent_worker, 4, cases, timeout=300):
        for (sent, predicted), case in zip(rank_results, cases):
            assert sent == predicted, case


def _pool_worker(layout_name):
    """Two CP groups of 2 ranks, each with its own documents and the given layout, pooled."""
    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    g = dist.get_rank() // 2
    docs = [[12, 4, 24], [8, 32]][g]
    layout = random_layout(sum(docs), 2, seed=g) if layout_name == "random" else layout_name
    q, k, v = rand_qkv(sum(docs), sum(docs), 4, 2, 8, seed=g)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(10 + g), dtype=torch.float64)
    ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = distattn.reference_attention(*ref_in, docs)
    ref.backward(dout)
    plan = distattn.plan(docs, groups[g], scheduler="cad", pool=dist.group.WORLD, layout=layout, backend="reference")
    mine = [plan.shard(t).clone().requires_grad_() for t in (q, k, v)]
    out = distattn.attention(*mine, plan)
    out.backward(plan.shard(dout))
    return shard_errors(plan, out, mine, ref, ref_in)


@pytest.mark.parametrize("layout", ["document", "random"])
def test_cad_pool_on_other_layouts(layout):
    assert max(run_distributed(_pool_worker, 4, layout, timeout=300)) <= 1e-12


def _pingpong_worker():
    from distattn.runtime.pingpong import ping_pong

    p = dist.get_world_size()
    docs_a, docs_b = [20, 4, 12], [6, 30]
    plans = [distattn.plan(d, dist.group.WORLD, scheduler="cad", layout=random_layout(sum(d), p, seed=i))
             for i, d in enumerate((docs_a, docs_b))]
    w = torch.randn(8, 3 * 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64, requires_grad=True)
    xs = [torch.randn(sum(d), 8, generator=torch.Generator().manual_seed(1 + i), dtype=torch.float64)
          for i, d in enumerate((docs_a, docs_b))]

    def pre(x):
        q, k, v = (x @ w).view(-1, 3, 2, 4).unbind(1)
        return q, k, v

    def loss_of(outs):
        return sum((o ** 2).sum() for o in outs)

    local = [plan.shard(x) for plan, x in zip(plans, xs)]
    loss_of(ping_pong(pre, lambda o, x: o, local, plans)).backward()
    mine = w.grad.clone()
    w.grad = None
    loss_of([distattn.attention(*pre(x), plan) for plan, x in zip(plans, local)]).backward()
    return float((mine - w.grad).abs().max())


def test_pingpong_on_a_permuted_layout():
    assert max(run_distributed(_pingpong_worker, 3, timeout=300)) <= 1e-12
