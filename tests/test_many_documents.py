"""Many short documents on one rank: the ``torch`` CPU backend batches them into a few calls
(kernels/torch_cpu_buckets.py) and must give what the per-document path and the oracle give."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import distattn
from distattn.kernels import Varlen, torch_cpu, torch_cpu_buckets

LENS = [1, 2, 3, 17, 64, 65, 200, 300, 5, 128, 129, 1, 40, 31, 8, 9]


def _inputs(lens, hq=4, hkv=2, d=8, dv=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = sum(lens)
    mk = lambda h, dd: torch.randn(s, h, dd, generator=g, dtype=torch.float64, requires_grad=True)  # noqa: E731
    return mk(hq, d), mk(hkv, d), mk(hkv, dv or d)


def _grads(fn, q, k, v, seed=1):
    out = fn(q, k, v)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return (out, *torch.autograd.grad(out, (q, k, v), dout))


def _max_err(a, b):
    return max(float((x - y).detach().abs().max()) for x, y in zip(a, b))


@pytest.mark.parametrize("causal,window,softcap,hkv,dv", [
    (True, None, None, 2, None),
    (False, None, None, 4, None),
    (True, 5, None, 1, None),
    (False, 7, None, 2, None),
    (True, None, 3.0, 2, None),
    (True, 6, 2.5, 1, 12),
])
def test_matches_the_oracle_in_fp64(causal, window, softcap, hkv, dv):
    q, k, v = _inputs(LENS, hkv=hkv, dv=dv)
    ours = _grads(lambda a, b, c: distattn.local_attention(a, b, c, LENS, causal=causal, window=window,
                                                          backend="torch", softcap=softcap), q, k, v)
    ref = _grads(lambda a, b, c: distattn.reference_attention(a, b, c, LENS, causal=causal, window=window,
                                                              softcap=softcap), q, k, v)
    assert _max_err(ours, ref) <= 1e-12


def test_sinks_match_the_oracle():
    q, k, v = _inputs(LENS)
    sinks = torch.randn(4, dtype=torch.float64, requires_grad=True)
    args = dict(causal=True, window=None)
    out = distattn.local_attention(q, k, v, LENS, backend="torch", sinks=sinks, **args)
    ref = distattn.reference_attention(q, k, v, LENS, sinks=sinks, **args)
    dout = torch.randn(out.shape, dtype=out.dtype)
    got = (out, *torch.autograd.grad(out, (q, k, v, sinks), dout))
    want = (ref, *torch.autograd.grad(ref, (q, k, v, sinks), dout))
    assert _max_err(got, want) <= 1e-12


def _band_layout(lens, offsets):
    """Segments with shifted bands (queries after their keys, as a CP rank's pieces): lo/hi per
    segment from ``offsets``, some rows seeing nothing."""
    lens = np.asarray(lens)
    cu = np.concatenate([[0], np.cumsum(lens)])
    return Varlen.build(cu, cu, lo=-np.asarray(offsets) - 3, hi=-np.asarray(offsets))


@pytest.mark.parametrize("softcap", [None, 1.5])
def test_kernel_matches_the_per_document_path_on_shifted_bands(softcap):
    lens = [4, 17, 1, 33, 200, 9, 64]
    seg = _band_layout(lens, [0, 2, -1, 40, 1, 12, -5])
    q, k, v = (x.detach() for x in _inputs(lens))
    out, lse = torch_cpu.torch_fwd(q, k, v, seg, 0.3, softcap)
    out0, lse0 = torch_cpu.torch_fwd(q, k, v, seg, 0.3, softcap, per_document=True)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(lse0))
    live = ~torch.isneginf(lse0)
    assert _max_err((out, lse[live]), (out0, lse0[live])) <= 1e-12
    dout = torch.randn(out.shape, dtype=out.dtype)
    new = torch_cpu.torch_bwd(dout, q, k, v, out0, lse0, seg, 0.3, softcap)
    old = torch_cpu.torch_bwd(dout, q, k, v, out0, lse0, seg, 0.3, softcap, per_document=True)
    assert _max_err(new, old) <= 1e-12


def test_bf16_stays_close_to_the_per_document_path():
    lens = [20] * 50 + [300]
    seg = Varlen.from_geometry(lens, lens, True, None)
    q, k, v = (x.detach().to(torch.bfloat16) for x in _inputs(lens))
    out, lse = torch_cpu.torch_fwd(q, k, v, seg, 0.35)
    out0, lse0 = torch_cpu.torch_fwd(q, k, v, seg, 0.35, per_document=True)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    assert float((out.float() - out0.float()).abs().max()) < 2e-2
    assert float((lse - lse0).abs().max()) < 1e-4
    dq, dk, dv = torch_cpu.torch_bwd(out, q, k, v, out, lse, seg, 0.35)
    assert dq.dtype == dk.dtype == dv.dtype == torch.bfloat16


def test_two_thousand_documents_make_a_few_batched_calls(monkeypatch):
    rng = np.random.default_rng(0)
    lens = rng.integers(1, 129, size=2000).tolist()
    calls = {"batch": 0, "fused": 0}
    batch = torch_cpu_buckets._Batch

    def counted(*a):
        calls["batch"] += 1
        return batch(*a)

    def no_fused(*a, **kw):
        calls["fused"] += 1
        raise AssertionError("short documents must not reach the per-segment fused op")

    monkeypatch.setattr(torch_cpu_buckets, "_Batch", counted)
    monkeypatch.setattr(torch_cpu_buckets, "_BUDGET", 1 << 30)  # no split for memory: one call a shape
    monkeypatch.setattr(torch_cpu, "_fwd_op", no_fused)
    monkeypatch.setattr(torch_cpu, "_bwd_op", no_fused)
    q, k, v = _inputs(lens, hq=2, hkv=2, d=4)
    out = distattn.local_attention(q, k, v, lens, backend="torch")
    out.sum().backward()
    # documents have as many keys as queries: 12 padded lengths (8..64 by 8, 80..128 by 16), a
    # call each in forward and backward
    assert 0 < calls["batch"] <= 2 * 12 and calls["fused"] == 0


def test_the_budget_splits_a_bucket_by_tokens_not_documents():
    short = np.array([[20 * i, 20 * i + 20, 20 * i, 20 * i + 20, -19, 0] for i in range(10_000)]).T
    shapes = list(torch_cpu_buckets.chunks(short, 2))
    per_call = torch_cpu_buckets._BUDGET // (2 * 24 * 24)
    assert len(shapes) == -(-10_000 // per_call) and {(lq, lk) for _, lq, lk in shapes} == {(24, 24)}


def test_long_documents_keep_the_tiled_path():
    lens = [129, 300]
    seg = Varlen.from_geometry(lens, lens, True, None)
    short, rest = torch_cpu_buckets.split_short(seg)
    assert short is None and [s[:4] for s in rest.segments()] == [(0, 129, 0, 129), (129, 429, 129, 429)]
