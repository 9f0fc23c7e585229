"""Local kernels (reference, torch) vs the fp64 autograd oracle: fwd and bwd."""

import pytest
import torch
import torch.nn.functional as F

from conftest import max_err, rand_qkv
from distattn.kernels import attn_bwd, attn_fwd
from distattn.planning.masks import cu_seqlens, dense_mask
from distattn.runtime.oracle import dense_attention

LAYOUTS = {
    "single-token": [(1, 1)],
    "mixed": [(37, 37), (1, 1), (100, 100), (2, 2)],
    "q-shorter": [(5, 17), (16, 16), (1, 9), (8, 40)],
    "q-longer": [(9, 3), (4, 4)],            # causal: first rows see no key
    "empty-segments": [(0, 5), (3, 3), (4, 0), (0, 0)],
    "multi-block": [(300, 300), (200, 520)],  # > one 256-row tile of the torch backend
    # q_offset extension: queries after the keys' end (ring blocks), before it, far away
    "offsets": [(5, 7, 3), (6, 4, 10), (4, 9, -2), (3, 3, 0), (7, 2, -5), (4, 6, 40)],
}
HEADS = {"mha": (4, 4), "gqa-4:2": (4, 2), "mqa": (4, 1)}
MASKS = {"causal": (True, None), "full": (False, None), "window-causal": (True, 7), "window-full": (False, 5)}
BACKENDS = ["reference", "torch"]


def _case(layout, heads, d=16, dtype=torch.float64, seed=0):
    segs = [(*s, 0)[:3] for s in LAYOUTS[layout]]
    lq, lk, off = zip(*segs)
    hq, hkv = HEADS[heads]
    q, k, v = rand_qkv(sum(lq), sum(lk), hq, hkv, d, dtype, seed)
    return q, k, v, cu_seqlens(lq), cu_seqlens(lk), (torch.tensor(off) if any(off) else None)


def _dout(q, seed=7):
    return torch.randn(q.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(q.dtype)


def _oracle(q, k, v, cu_q, cu_k, off, causal, window, dout, dtype=torch.float64):
    """out, lse, dq, dk, dv of the autograd oracle computed in ``dtype``."""
    qq, kk, vv = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    out, lse = dense_attention(qq, kk, vv, cu_q, cu_k, causal, window, q_offset=off)
    out.backward(dout.to(dtype))
    return out.detach(), lse.detach(), qq.grad, kk.grad, vv.grad


def _run(backend, q, k, v, cu_q, cu_k, off, causal, window, dout):
    out, lse = attn_fwd(q, k, v, cu_q, cu_k, causal=causal, window=window, backend=backend, q_offset=off)
    # Like a scheduler, differentiate with the final out/lse.
    dq, dk, dv = attn_bwd(dout, q, k, v, out, lse, cu_q, cu_k, causal=causal, window=window, backend=backend,
                          q_offset=off)
    return out, lse, dq, dk, dv


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("heads", list(HEADS))
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_fp64_matches_oracle(backend, layout, heads, mask):
    causal, window = MASKS[mask]
    q, k, v, cu_q, cu_k, off = _case(layout, heads)
    dout = _dout(q)
    got = _run(backend, q, k, v, cu_q, cu_k, off, causal, window, dout)
    want = _oracle(q, k, v, cu_q, cu_k, off, causal, window, dout)
    assert got[1].dtype == torch.float64
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        assert a.shape == b.shape, name
        assert max_err(a, b) < 1e-10, (name, max_err(a, b))


def _sdpa(q, k, v, cu_q, cu_k, off, causal, window, dout):
    """out, dq, dk, dv of PyTorch's own attention (SDPA per segment, dense bool mask) in q's dtype."""
    qq, kk, vv = (t.detach().clone().requires_grad_() for t in (q, k, v))
    outs = []
    bq, bk = cu_q.tolist(), cu_k.tolist()
    offsets = off.tolist() if off is not None else [0] * (len(bq) - 1)
    for i in range(len(bq) - 1):
        qs = qq[bq[i]:bq[i + 1]].transpose(0, 1).unsqueeze(0)
        ks, vs = (t[bk[i]:bk[i + 1]].transpose(0, 1).unsqueeze(0) for t in (kk, vv))
        keep = dense_mask(qs.shape[2], ks.shape[2], causal, window, offsets[i], device=qs.device)
        o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=keep, enable_gqa=True)
        outs.append(torch.where(keep.any(-1)[None, None, :, None], o, 0)[0].transpose(0, 1))
    out = torch.cat(outs)
    out.backward(dout)
    return out.detach(), qq.grad, kk.grad, vv.grad


def _low_precision_cases() -> list:
    """Every layout x mask x dtype x backend; on multi-block (the slow layout) the default run takes each
    mask x dtype once, the backend alternating (each mask and each dtype meets both), the other half --slow."""
    cases = []
    for layout, heads in [("mixed", "gqa-4:2"), ("q-shorter", "mqa"), ("multi-block", "mha"), ("offsets", "gqa-4:2")]:
        for m, mask in enumerate(["causal", "window-causal", "full"]):
            for d, dtype in enumerate([torch.float32, torch.float16, torch.bfloat16]):
                for b, backend in enumerate(BACKENDS):
                    slow = layout == "multi-block" and (m + d + b) % 2 == 1
                    cases.append(pytest.param(backend, dtype, mask, layout, heads,
                                              marks=[pytest.mark.slow] if slow else [],
                                              id=f"{layout}-{heads}-{mask}-dtype{d}-{backend}"))
    return cases


@pytest.mark.parametrize("backend,dtype,mask,layout,heads", _low_precision_cases())
def test_low_precision_within_twice_torch_error(backend, dtype, mask, layout, heads):
    """DESIGN's rule: error vs fp64 <= 2x the error PyTorch's own attention (SDPA) makes in the
    same dtype, plus the rounding error of the fp64 result in that dtype as atol."""
    causal, window = MASKS[mask]
    q64, k64, v64, cu_q, cu_k, off = _case(layout, heads, d=32, seed=3)
    dout64 = _dout(q64)
    want = _oracle(q64, k64, v64, cu_q, cu_k, off, causal, window, dout64)
    q, k, v, dout = (t.to(dtype) for t in (q64, k64, v64, dout64))
    base = _sdpa(q, k, v, cu_q, cu_k, off, causal, window, dout)
    got = _run(backend, q, k, v, cu_q, cu_k, off, causal, window, dout)
    assert got[0].dtype == dtype and got[1].dtype == torch.float32 and got[2].dtype == dtype
    for name, a, b, w in zip(("out", "dq", "dk", "dv"), got[:1] + got[2:], base, want[:1] + want[2:]):
        atol = max_err(w.to(dtype), w)
        assert max_err(a, w) <= 2 * max_err(b, w) + atol, (name, max_err(a, w), max_err(b, w))
    # SDPA has no lse: hold ours to the plain math in the same dtype
    lse_base = _oracle(q, k, v, cu_q, cu_k, off, causal, window, dout, dtype=dtype)[1]
    assert max_err(got[1], want[1]) <= 2 * max_err(lse_base, want[1]) + 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_blocks_merge_to_full_result(backend):
    """Splitting keys into blocks and merging by lse, then differentiating each block with the
    final out/lse, reproduces the unsplit result (what every scheduler relies on)."""
    from distattn.kernels.merge import merge

    n = 40
    q, k, v = rand_qkv(n, n, 2, 1, 8)
    cu = cu_seqlens([n])
    dout = _dout(q)
    full = _run(backend, q, k, v, cu, cu, None, True, None, dout)
    # block 1: keys [0, 25) seen fully by queries at positions >= 25 ... express as two varlen calls
    # with bottom-right alignment: queries [25, 40) against keys [0, 25) (full) and [0, 40) prefix.
    q2 = q[25:]
    o_a, l_a = attn_fwd(q2, k[:25], v[:25], cu_seqlens([15]), cu_seqlens([25]), causal=False, backend=backend)
    o_b, l_b = attn_fwd(q2, k[25:], v[25:], cu_seqlens([15]), cu_seqlens([15]), causal=True, backend=backend)
    o, l = merge(o_a, l_a, o_b, l_b)
    assert max_err(o, full[0][25:]) < 1e-12 and max_err(l, full[1][25:]) < 1e-12
    ga = attn_bwd(dout[25:], q2, k[:25], v[:25], o, l, cu_seqlens([15]), cu_seqlens([25]), causal=False,
                  backend=backend)
    gb = attn_bwd(dout[25:], q2, k[25:], v[25:], o, l, cu_seqlens([15]), cu_seqlens([15]), causal=True,
                  backend=backend)
    gfull = attn_bwd(dout[25:], q2, k, v, o, l, cu_seqlens([15]), cu_seqlens([40]), causal=True, backend=backend)
    assert max_err(ga[0] + gb[0], gfull[0]) < 1e-12
    assert max_err(torch.cat([ga[1], gb[1]]), gfull[1]) < 1e-12
    assert max_err(torch.cat([ga[2], gb[2]]), gfull[2]) < 1e-12


def test_empty_rows_are_zero_and_neg_inf():
    q, k, v = rand_qkv(6, 2, 2, 2, 4)
    for backend in BACKENDS:
        out, lse = attn_fwd(q, k, v, cu_seqlens([6]), cu_seqlens([2]), causal=True, backend=backend)
        assert torch.isneginf(lse[:4]).all() and (out[:4] == 0).all()
        assert torch.isfinite(lse[4:]).all()
        dq, dk, dv = attn_bwd(torch.ones_like(q), q, k, v, out, lse, cu_seqlens([6]), cu_seqlens([2]),
                              causal=True, backend=backend)
        assert (dq[:4] == 0).all() and torch.isfinite(dq).all() and torch.isfinite(dk).all()


def test_auto_picks_torch_on_cpu():
    from distattn.kernels import resolve_backend

    assert resolve_backend("auto", torch.device("cpu")).name == "torch"
    with pytest.raises(ValueError, match="backend='torch' runs on"):
        resolve_backend("torch", torch.device("meta"))
