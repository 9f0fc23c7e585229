"""Batched plans: ``doc_lens`` one list per row of a ``[B, S]`` batch, one plan and one attention call.

Every scheduler, on its own layout and on others, is exact per row against the fp64 oracle
(forward and every gradient), and equals the rows planned one by one -- with sinks and softcap
too; shard/unshard/position_ids keep the batch dimension; bad batches are ``ValueError``s.
"""

import pytest
import torch
import torch.distributed as dist

import distattn
from distattn.planning.masks import batch_rows
from distattn.schedulers import NAMES, PlanContext
from distattn.distributed.spawn import run_distributed

P = 4
ROWS = [[5, 11, 8], [24], [1, 20, 3]]
DOC_ROWS = [[8, 16], [24], [16, 8]]   # multiples of 2P, for layout="document"
CASES = [(None, ROWS, True, None), ("contiguous", ROWS, False, None), ("zigzag", ROWS, True, 5),
         ("document", DOC_ROWS, True, None)]


def _tensors(rows, heads=(4, 2)):
    g = torch.Generator().manual_seed(0)
    b, s = len(rows), sum(rows[0])
    q = torch.randn(b, s, heads[0], 8, dtype=torch.float64, generator=g)
    k, v = (torch.randn(b, s, heads[1], 8, dtype=torch.float64, generator=g) for _ in range(2))
    return q, k, v, torch.randn(b, s, heads[0], 8, dtype=torch.float64, generator=g)


def _run(plan, q, k, v, dout, **kw):
    """Output and q/k/v gradients of ``plan``'s attention, gathered to full tensors."""
    ql, kl, vl = (plan.shard(t).detach().requires_grad_() for t in (q, k, v))
    out = distattn.attention(ql, kl, vl, plan, **kw)
    out.backward(plan.shard(dout))
    return [plan.unshard(t) for t in (out, ql.grad, kl.grad, vl.grad)]


def _exact_worker(scheduler):
    errors = {}
    context = PlanContext(4, 2)
    for layout, rows, causal, window in CASES:
        q, k, v, dout = _tensors(rows)
        plan = distattn.plan(rows, dist.group.WORLD, scheduler=scheduler, causal=causal, window=window,
                             layout=layout, context=context)
        assert plan.batch_size == 3 and plan.seq_len == 24 and plan.num_local_tokens == 24 // P
        assert plan.position_ids().shape == (3, 24 // P)
        got = _run(plan, q, k, v, dout)
        worst = 0.0
        for b, docs in enumerate(rows):
            qr, kr, vr = (t[b].clone().requires_grad_() for t in (q, k, v))
            ref = distattn.reference_attention(qr, kr, vr, docs, causal=causal, window=window)
            ref.backward(dout[b])
            for mine, want in zip(got, (ref, qr.grad, kr.grad, vr.grad)):
                worst = max(worst, (mine[b] - want).abs().max().item())
        errors[layout] = worst
    return errors


@pytest.mark.parametrize("scheduler", NAMES)
def test_every_scheduler_is_exact_per_row(scheduler):
    for errors in run_distributed(_exact_worker, P, scheduler, timeout=300):
        assert max(errors.values()) <= 1e-12, errors


def _rows_one_by_one_worker():
    """The batched plan against the same rows planned one at a time, with sinks and softcap."""
    q, k, v, dout = _tensors(ROWS, heads=(4, 4))
    sinks = torch.randn(4, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    worst = 0.0
    for scheduler in ("zigzag", "cad"):
        batched = distattn.plan(ROWS, dist.group.WORLD, scheduler=scheduler)
        s_b = sinks.clone().requires_grad_()
        got = _run(batched, q, k, v, dout, sinks=s_b, softcap=3.0)
        s_rows = sinks.clone().requires_grad_()
        for b, docs in enumerate(ROWS):
            single = distattn.plan(docs, dist.group.WORLD, scheduler=scheduler)
            want = _run(single, q[b], k[b], v[b], dout[b], sinks=s_rows, softcap=3.0)
            worst = max([worst] + [(g[b] - w).abs().max().item() for g, w in zip(got, want)])
        sink_grads = torch.stack([s_b.grad, s_rows.grad])
        dist.all_reduce(sink_grads)   # each rank holds its share of the sinks' gradient
        worst = max(worst, (sink_grads[0] - sink_grads[1]).abs().max().item())
    return worst


def test_batched_equals_the_rows_one_by_one_with_sinks_and_softcap():
    assert max(run_distributed(_rows_one_by_one_worker, 3, timeout=300)) <= 1e-12


def _shapes_worker():
    plan = distattn.plan([[3, 9], [12]], dist.group.WORLD, scheduler="zigzag")
    x = torch.arange(2 * 12 * 5, dtype=torch.float64).view(2, 12, 5)
    local = plan.shard(x)                       # default: the sequence at dim 1
    lead = torch.stack([x, -x])                 # [2, B, S, 5]: the sequence at dim 2
    out = {"local": tuple(local.shape), "roundtrip": torch.equal(plan.unshard(local), x),
           "dim2": torch.equal(plan.unshard(plan.shard(lead, dim=2), dim=2), lead),
           "pos": plan.position_ids().tolist()}
    try:
        distattn.attention(*(torch.zeros(plan.num_local_tokens, 2, 4, dtype=torch.float64) for _ in range(3)), plan)
    except ValueError as exc:
        out["flat_q"] = str(exc)
    try:
        distattn.attention(*(torch.zeros(2, 5, 2, 4, dtype=torch.float64) for _ in range(3)), plan)
    except ValueError as exc:
        out["short_q"] = str(exc)
    try:
        plan.shard(x[0])
    except ValueError as exc:
        out["flat_x"] = str(exc)
    return out


def test_shard_unshard_and_positions_keep_the_batch():
    results = run_distributed(_shapes_worker, 2, timeout=120)
    for rank, res in enumerate(results):
        assert res["local"] == (2, 6, 5) and res["roundtrip"] and res["dim2"]
        assert "q must be [B=2, S_local, heads, head_dim] (q's S_local) under this batched plan" in res["flat_q"]
        assert f"q has 10 tokens but rank {rank} owns 12 (2 rows of 6) under this plan" in res["short_q"]
        assert "is not [..., B=2, 12, ...]" in res["flat_x"]
    # zigzag over 4 chunks of 3 per row: rank 0 holds chunks 0 and 3 of each row
    assert results[0]["pos"] == [[0, 1, 2, 6, 7, 8], [0, 1, 2, 9, 10, 11]]
    assert results[1]["pos"] == [[0, 1, 2, 3, 4, 5], [3, 4, 5, 6, 7, 8]]


def test_bad_batches_are_refused():
    with pytest.raises(ValueError, match=r"doc_lens rows sum to 10 \.\. 12 tokens: every row of a \[B, S\] batch"):
        batch_rows([[4, 6], [12]])
    with pytest.raises(ValueError, match=r"doc_lens mixes rows and lengths \(doc_lens\[1\] = 5\)"):
        batch_rows([[4, 6], 5])
    with pytest.raises(ValueError, match=r"doc_lens\[1\]\[0\] = 0: document lengths must be positive"):
        distattn.plan([[4], [0, 4]], 2)
    with pytest.raises(ValueError, match="mask= takes one packed sequence"):
        distattn.plan([[4], [4]], 2, mask=distattn.SliceMask.documents((4, 4), True, None))
    assert batch_rows([3, 4]) is None and batch_rows(torch.tensor([[2, 2], [1, 3]])) == ((2, 2), (1, 3))


def test_a_dry_batched_plan_counts_every_row():
    one = distattn.plan([24], 4, scheduler="zigzag").stats(4, 2, 8)
    three = distattn.plan([[24]] * 3, 4, scheduler="zigzag").stats(4, 2, 8)
    assert three["flops"] == [3 * f for f in one["flops"]] and three["tokens"] == [3 * t for t in one["tokens"]]


def _compiled_worker():
    torch._dynamo.reset()
    compiled = torch.compile(lambda q, k, v, plan: distattn.attention(q, k, v, plan), fullgraph=True, backend="eager")
    worst = 0.0
    for rows in (ROWS, [[24], [12, 12], [2, 22]]):   # a second batch reuses the graph
        plan = distattn.plan(rows, dist.group.WORLD, scheduler="zigzag")
        q, k, v, dout = _tensors(rows)
        eager = _run(plan, q, k, v, dout)
        ql, kl, vl = (plan.shard(t).detach().requires_grad_() for t in (q, k, v))
        out = compiled(ql, kl, vl, plan)
        out.backward(plan.shard(dout))
        got = [plan.unshard(t) for t in (out, ql.grad, kl.grad, vl.grad)]
        worst = max([worst] + [(a - b).abs().max().item() for a, b in zip(got, eager)])
    return worst


def test_a_batched_plan_compiles_without_a_graph_break():
    assert max(run_distributed(_compiled_worker, 2, timeout=300)) <= 1e-12


def test_the_batched_bench_prints_both_ways(capsys):
    from distattn.bench.batched import main

    main(["--batch", "2", "--seq-len", "64", "--repeats", "1", "--schedulers", "zigzag,cad"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ["scheduler", "per-row", "ms", "batched", "ms", "speedup"]
    assert [line.split()[0] for line in lines[2:]] == ["zigzag", "cad"] and lines[-1].endswith("x")
