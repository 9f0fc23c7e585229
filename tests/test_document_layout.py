"""layout="document": every document split zigzag over the ranks (TransformerEngine's and Megatron's
THD split under CP), for zigzag and allgather: exact vs fp64 (worlds 1-4; 5 and 6 with --slow), the split itself, stats, errors (every
scheduler on every layout: tests/test_layouts.py)."""

import itertools

import numpy as np
import pytest
import torch
import torch.distributed as dist

import distattn
from conftest import case_error, covers_the_mask, sent_vs_stats, slow_cases
from distattn.distributed.spawn import run_distributed

MASKS = [(True, None), (False, None), (True, 5), (False, 4)]


def _docs(p: int) -> list[list[int]]:
    """Document lengths in units of 2p tokens: uneven, one dominant, one of a single unit each."""
    c = 2 * p
    return [[3 * c, c, 7 * c, 2 * c], [c, 9 * c], [c] * 5]


def _exactness_worker(cases):
    return [(case, case_error(*case)) for case in cases]


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, *slow_cases(5, 6)])
def test_exact_vs_fp64_reference(world_size):
    cases = []
    for scheduler, docs, (causal, window) in itertools.product(["zigzag", "allgather"], _docs(world_size), MASKS):
        hq, hkv = [(4, 2), (2, 1)][len(cases) % 2]  # GQA and MQA
        cases.append((scheduler, docs, causal, window, hq, hkv, "reference", {"layout": "document"}))
    for scheduler, (causal, window) in itertools.product(["zigzag", "allgather"], MASKS[:3]):
        cases.append((scheduler, _docs(world_size)[0], causal, window, 4, 2, "torch", {"layout": "document"}))
    cases.append(("allgather", _docs(world_size)[0], True, None, 4, 2, "reference",
                  {"layout": "document", "heads_per_step": 1}))
    for rank_results in run_distributed(_exactness_worker, world_size, cases, timeout=600):
        for case, err in rank_results:
            assert err < 1e-12, (world_size, case, err)


def test_the_split_is_transformer_engines():
    """Rank r holds chunks r and 2cp-1-r of every document, documents in order (what
    TransformerEngine's thd_get_partitioned_indices gives), and positions count within documents."""
    docs, cp = [8, 16, 4], 2
    for scheduler in ("zigzag", "allgather"):
        plan = distattn.plan(docs, cp, scheduler=scheduler, layout="document")
        assert plan.layout.owned == (((0, 2), (6, 8), (8, 12), (20, 24), (24, 25), (27, 28)),
                              ((2, 4), (4, 6), (12, 16), (16, 20), (25, 26), (26, 27)))
    expected = []
    for r in range(cp):
        idx, start = [], 0
        for n in docs:
            chunk = n // (2 * cp)
            for c in (r, 2 * cp - 1 - r):
                idx += range(start + c * chunk, start + (c + 1) * chunk)
            start += n
        expected.append(idx)
    assert [distattn.runtime.plans.token_index(plan.layout.owned[r]).tolist() for r in range(cp)] == expected


def _positions_worker(docs):
    plan = distattn.plan(docs, dist.group.WORLD, layout="document")
    x = torch.arange(sum(docs))
    return plan.shard(x).tolist(), plan.position_ids().tolist(), plan.unshard(plan.shard(x)).tolist()


def test_shard_positions_and_unshard():
    docs = [8, 16, 4]
    starts = np.cumsum([0] + docs[:-1])
    for rank, (tokens, positions, back) in enumerate(run_distributed(_positions_worker, 2, docs, timeout=120)):
        doc_of = np.searchsorted(np.cumsum(docs), tokens, side="right")
        assert positions == (np.asarray(tokens) - starts[doc_of]).tolist(), rank
        assert back == list(range(sum(docs)))


def test_every_document_is_balanced():
    """Causal work is even across ranks for any document mix (the sequence layout is not, for
    documents that do not line up with its chunks)."""
    rng = np.random.default_rng(0)
    lens = (rng.integers(1, 60, 300) * 16).tolist()
    for scheduler in ("zigzag", "allgather"):
        doc = distattn.plan(lens, 8, scheduler=scheduler, layout="document").stats(8, 2, 64)
        assert doc["flops_imbalance"] < 1.0001, (scheduler, doc["flops_imbalance"])


def test_compute_slices_cover_the_mask():
    docs = [12, 6, 30, 18]
    for scheduler, (causal, window) in itertools.product(["zigzag", "allgather"], MASKS):
        plan = distattn.plan(docs, 3, scheduler=scheduler, causal=causal, window=window, layout="document")
        assert covers_the_mask(plan, docs, causal, window), (scheduler, causal, window)


def _sent_worker(cases):
    return [sent_vs_stats(s, d, options={"layout": "document"}) for s, d in cases]


def test_stats_match_bytes_sent():
    cases = [("zigzag", [8, 16, 24]), ("zigzag", [40]), ("allgather", [8, 16, 24])]
    for rank_results in run_distributed(_sent_worker, 4, cases, timeout=300):
        for sent, predicted, _ in rank_results:
            assert sent == predicted


def test_bad_layouts_are_refused():
    with pytest.raises(ValueError, match=r"document 1 has 6 tokens .*pad each document to a multiple of 4"):
        distattn.plan([8, 6, 12], 2, layout="document")
    for scheduler in ("ring", "ulysses", "usp", "cad"):  # every scheduler runs every layout (issue 29)
        options = {"ulysses_degree": 2} if scheduler == "usp" else {}
        assert distattn.plan([8], 2, scheduler=scheduler, layout="document", **options).layout.owned == \
            (((0, 2), (6, 8)), ((2, 4), (4, 6)))
    with pytest.raises(ValueError, match="layout='thd' is unknown"):
        distattn.plan([8], 2, layout="thd")
    # on one rank both layouts are the sequence itself: any document length
    assert distattn.plan([3, 5], 1, layout="document").layout.owned == (((0, 8),),)
