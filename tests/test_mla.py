"""MLA head shapes: v with a head dim of its own (DeepSeek-V2/V3: q/k 192, v 128) through every
scheduler and layout, exact in fp64 against the oracle (worlds 1-4; 5 and 6 with --slow), with sinks and softcap on the torch backend."""

import itertools

import pytest
import torch
import torch.distributed as dist

import distattn
from conftest import max_err, shard_errors, slow_cases
from distattn.distributed.spawn import run_distributed
from test_layouts import LAYOUTS, MASKS, SCHEDULERS, _docs, _layout, _options

DK, DV = 192, 128


def _qkv(total: int, hq: int, hkv: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(total, hq, DK, generator=g, dtype=torch.float64),
            torch.randn(total, hkv, DK, generator=g, dtype=torch.float64),
            torch.randn(total, hkv, DV, generator=g, dtype=torch.float64))


def _case_error(scheduler, layout, causal, window, hq, hkv, backend, extras, seed):
    """Inside a gloo rank: max error of this rank's out/dq/dk/dv (and the summed dsinks) vs the oracle."""
    p = dist.get_world_size()
    docs = _docs(p)
    total = sum(docs)
    q, k, v = _qkv(total, hq, hkv, seed)
    dout = torch.randn(total, hq, DV, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    sinks = torch.linspace(-1, 1, hq, dtype=torch.float64) if extras else None
    softcap = 3.0 if extras else None
    ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_sinks = None if sinks is None else sinks.clone().requires_grad_()
    ref = distattn.reference_attention(*ref_in, docs, causal=causal, window=window, sinks=ref_sinks, softcap=softcap)
    ref.backward(dout)
    plan = distattn.plan(docs, dist.group.WORLD, scheduler=scheduler, causal=causal, window=window, backend=backend,
                         layout=_layout(layout, total, p, seed), **_options(scheduler, p))
    mine = [plan.shard(t).clone().requires_grad_() for t in (q, k, v)]
    my_sinks = None if sinks is None else sinks.clone().requires_grad_()
    out = distattn.attention(*mine, plan, sinks=my_sinks, softcap=softcap)
    assert out.shape == (*mine[0].shape[:2], DV)
    out.backward(plan.shard(dout))
    return shard_errors(plan, out, mine, ref, ref_in, my_sinks, ref_sinks)


def _worker(cases):
    return [(case, _case_error(*case)) for case in cases]


def _cases() -> list[tuple]:
    heads = [(6, 2), (6, 3), (6, 1), (6, 6)]
    cases = []
    for n, (scheduler, layout) in enumerate(itertools.product(SCHEDULERS, LAYOUTS)):
        causal, window = MASKS[n % len(MASKS)]
        cases.append((scheduler, layout, causal, window, *heads[n % len(heads)], "reference", False, n))
    # the torch backend (its plain-ops path: the fused CPU op wants one head dim), sinks and softcap
    cases += [(s, None, True, None, 6, 2, "torch", True, 100 + n) for n, s in enumerate(SCHEDULERS)]
    return cases


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, *slow_cases(5, 6)])
def test_every_scheduler_and_layout_is_exact_with_v_head_dim_of_its_own(world_size):
    for rank_results in run_distributed(_worker, world_size, _cases(), timeout=600):
        for case, err in rank_results:
            assert err <= 1e-12, (world_size, case, err)


def test_local_attention_and_kernels_take_mla_shapes():
    total, docs = 40, [15, 25]
    q, k, v = _qkv(total, 4, 2, seed=3)
    ins = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = distattn.reference_attention(*ins, docs)
    dout = torch.randn(ref.shape, dtype=torch.float64)
    ref.backward(dout)
    for backend in ("torch", "reference"):
        mine = [t.clone().requires_grad_() for t in (q, k, v)]
        out = distattn.local_attention(*mine, docs, backend=backend)
        out.backward(dout)
        assert out.shape == (total, 4, DV)
        assert max(max_err(out, ref), *(max_err(a.grad, b.grad) for a, b in zip(mine, ins))) <= 1e-12, backend


def test_mismatched_head_dims_are_refused():
    q, k, v = _qkv(8, 2, 2, seed=0)
    with pytest.raises(ValueError, match="head_dim"):
        distattn.local_attention(q, k[..., :64], v, [8])
    with pytest.raises(ValueError, match="tokens or heads"):
        distattn.local_attention(q, k, v[:4], [8])
