"""distattn.varlen_attention: flash_attn_varlen_func's semantics (window_size, softcap, softmax_scale,
lse) on context-parallel shards, against an fp64 oracle written from flash_attn's docstring, and
against distattn.attention on the same plan."""

import math

import pytest
import torch
import torch.distributed as dist

import distattn
from conftest import max_err, rand_qkv
from distattn.distributed.spawn import run_distributed
from distattn.runtime.varlen import doc_lens_of, mask_options

HQ, HKV, D = 6, 3, 8     # heads divisible by 3 ranks for ulysses


def flash_varlen_reference(q, k, v, cu_seqlens, causal=False, window_size=(-1, -1), softcap=0.0,
                           softmax_scale=None):
    """``flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, ...)`` as its docstring defines it:
    sequence ``b`` is rows ``cu_seqlens[b]:cu_seqlens[b+1]``; query head ``h`` uses KV head
    ``h // (Hq / Hkv)``; scores ``q k^T * softmax_scale`` (default ``1/sqrt(D)``), then
    ``softcap * tanh(s / softcap)`` when ``softcap > 0``; query ``i`` attends keys ``j`` in
    ``[i + Sk - Sq - window_size[0], i + Sk - Sq + window_size[1]]`` (-1: no bound on that side)
    and ``j <= i + Sk - Sq`` when causal (bottom-right). Returns out ``[T, Hq, D]`` and
    ``softmax_lse [Hq, T]``, the log-sum-exp of each row of the scaled scores. Plain fp64 math."""
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    group = q.shape[1] // k.shape[1]
    outs, lses = [], []
    for a, b in zip(cu_seqlens.tolist(), cu_seqlens.tolist()[1:]):
        qs, ks, vs = q[a:b], k[a:b].repeat_interleave(group, 1), v[a:b].repeat_interleave(group, 1)
        s = torch.einsum("ihd,jhd->hij", qs, ks) * scale
        if softcap > 0:
            s = softcap * torch.tanh(s / softcap)
        i = torch.arange(b - a)[:, None]   # Sk == Sq: the bottom-right shift is 0
        j = torch.arange(b - a)[None, :]
        keep = torch.ones(b - a, b - a, dtype=torch.bool)
        if causal:
            keep &= j <= i
        if window_size[0] >= 0:
            keep &= j >= i - window_size[0]
        if window_size[1] >= 0:
            keep &= j <= i + window_size[1]
        s = s.masked_fill(~keep, -math.inf)
        lses.append(torch.logsumexp(s, -1))
        outs.append(torch.einsum("hij,jhd->ihd", torch.softmax(s, -1), vs))
    return torch.cat(outs), torch.cat(lses, 1)


DOCS = [7, 1, 12, 5, 9]     # 34 tokens: not a multiple of any world size above 1
MASKS = [   # (causal, window_size)
    (False, (-1, -1)), (True, (-1, -1)), (False, (3, 3)), (True, (4, 9)), (False, (2, 5)), (False, (-1, 2)),
    (False, (3, -1)), (False, (4, 0)), (False, (0, 0)),
]


def cases():
    rows = [("zigzag", c, w, 0.0, None, True, None) for c, w in MASKS]
    rows += [("ring", True, (5, 5), 1.5, 0.3, True, None), ("allgather", False, (2, 6), 2.0, None, True, None),
             ("zigzag", True, (-1, -1), 0.0, None, True, "contiguous"),
             ("ulysses", False, (1, 4), 0.5, None, False, None),
             ("cad", True, (6, 0), 0.0, 0.2, False, None)]
    return rows


def _case(scheduler, causal, window_size, softcap, scale, lse, layout, seed):
    group = dist.group.WORLD
    cu = torch.tensor([0, *torch.tensor(DOCS).cumsum(0).tolist()], dtype=torch.int32)
    q, k, v = rand_qkv(sum(DOCS), sum(DOCS), HQ, HKV, D, seed=seed)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
    ref, ref_lse = flash_varlen_reference(*ref_in, cu, causal, window_size, softcap, scale)
    ref.backward(dout)
    plan = distattn.varlen_plan(cu, group=group, scheduler=scheduler, causal=causal, window_size=window_size,
                                layout=layout)
    mine = [plan.shard(t).clone().requires_grad_() for t in (q, k, v)]
    res = distattn.varlen_attention(*mine, cu, max(DOCS), group=group, scheduler=scheduler, causal=causal,
                                    window_size=window_size, softcap=softcap, softmax_scale=scale, return_lse=lse,
                                    layout=layout)
    out, got_lse = res if lse else (res, None)
    out.backward(plan.shard(dout))
    errs = [max_err(out.detach(), plan.shard(ref.detach()))] + [max_err(a.grad, plan.shard(b.grad))
                                                                for a, b in zip(mine, ref_in)]
    if lse:
        assert got_lse.shape == (HQ, out.shape[0]) and not got_lse.requires_grad
        errs.append(max_err(got_lse, plan.shard(ref_lse.detach(), dim=1)))
    # distattn.attention on the same (cached) plan gives the same numbers
    same = distattn.attention(*(t.detach() for t in mine), plan, scale=scale, softcap=softcap or None)
    return max(errs), max_err(same, out.detach())


def _worker():
    rows = [(c, _case(*c, seed=i)) for i, c in enumerate(cases())]
    cu = torch.tensor([0, *torch.tensor(DOCS).cumsum(0).tolist()])
    plan = distattn.varlen_plan(cu, group=dist.group.WORLD, scheduler="ulysses", window_size=(1, 4))
    q = plan.shard(torch.zeros(sum(DOCS), HQ, D, dtype=torch.float64))
    try:
        distattn.varlen_attention(q, q, q, cu, 12, group=dist.group.WORLD, scheduler="ulysses", window_size=(1, 4),
                                  return_lse=True)
        refused = None
    except NotImplementedError as exc:
        refused = str(exc)
    return rows, refused


@pytest.mark.parametrize("world", [1, 3])
def test_flash_semantics_on_shards(world):
    for rows, refused in run_distributed(_worker, world, timeout=240):
        assert len(rows) == len(cases())
        for case, (err, vs_attention) in rows:
            assert err <= 1e-12, (world, case, err)
            assert vs_attention == 0.0, (world, case, vs_attention)
        if world > 1:
            assert "return_lse=True needs a scheduler that keeps each query's merged lse" in refused
            assert "'ring', 'zigzag' or 'allgather', not 'ulysses'" in refused


def test_flash_window_size_to_distattn_masks():
    lens = (4, 6)
    assert mask_options(lens, False, (-1, -1)) == dict(causal=False, window=None)
    assert mask_options(lens, True, (-1, -1)) == dict(causal=True, window=None)
    assert mask_options(lens, True, (3, 7)) == dict(causal=True, window=4)     # causal: right = 0
    assert mask_options(lens, False, (3, 0)) == dict(causal=True, window=4)
    assert mask_options(lens, False, (2, 2)) == dict(causal=False, window=3)
    band = mask_options(lens, False, (1, 3))["mask"]
    k, q = torch.meshgrid(torch.arange(10), torch.arange(10), indexing="xy")
    doc = torch.tensor([0] * 4 + [1] * 6)
    want = (doc[:, None] == doc[None, :]) & (k - q >= -1) & (k - q <= 3)
    assert torch.equal(band.dense(10), want)


def test_flash_argument_errors():
    q = torch.zeros(6, 2, 4)
    cu = torch.tensor([0, 2, 6])
    for bad in [(-2, 0), (1,), (1.0, 2), "full"]:
        with pytest.raises(ValueError, match="window_size must be \\(left, right\\), two ints >= -1"):
            mask_options((6,), False, bad)
    with pytest.raises(ValueError, match="softcap must be a float >= 0 \\(0.0: off"):
        distattn.varlen_attention(q, q, q, cu, 4, group=None, softcap=-1.0)
    with pytest.raises(ValueError, match="max_seqlen must be an int >= the longest document \\(4 tokens"):
        distattn.varlen_attention(q, q, q, cu, 3, group=None)
    with pytest.raises(ValueError, match="cu_seqlens must be non-decreasing offsets starting at 0"):
        doc_lens_of(torch.tensor([1, 4]))
    with pytest.raises(ValueError, match="cu_seqlens must be a 1-D integer tensor"):
        doc_lens_of(torch.tensor([0.0, 4.0]))
    assert doc_lens_of([0, 3, 3, 5]) == (3, 2)   # an empty sequence holds no token: dropped
