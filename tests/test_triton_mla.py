"""MLA head shapes in the triton backend (V's head dim differs from Q/K's: DeepSeek's 192 and 128)
under Triton's CPU interpreter (TRITON_INTERPRET=1, set by conftest) vs fp64 autograd math:
forward and every gradient, causal document masks, bands, GQA/MQA, the soft-cap, and k/v passed
as strided views into one packed ``[T, Hkv, Dqk + Dv]`` buffer (dout and out strided too).

The fp64 oracle is plain autograd (``_dense`` of test_triton_bands), not the ``reference`` backend,
so these tests pin the kernels alone. Also the registry's shape checks for a V head dim of its own."""

import pytest
import torch

from conftest import max_err
from distattn.kernels import attn_bwd, attn_fwd, available_backends, check_qkv, varlen_bwd, varlen_fwd
from distattn.kernels.varlen import Varlen
from distattn.planning.masks import UNBOUNDED as U
from test_triton_bands import BANDS, DEVICE, _dense, _layout

pytestmark = pytest.mark.skipif("triton" not in available_backends(), reason="triton is not installed")

# causal documents packed in one call (q == k per document), lengths not multiples of 16
DOCS = [(37, 37, None, 0), (5, 5, None, 0), (21, 21, None, 0), (1, 1, None, 0)]


def _inputs(seg, hq, hkv, dqk, dv, seed=0):
    """fp64 q [Tq, Hq, Dqk], a packed K|V buffer [Tk, Hkv, Dqk + Dv] and dout [Tq, Hq, Dv]."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(seg.total_q, hq, dqk, generator=g, dtype=torch.float64)
    kv = torch.randn(seg.total_k, hkv, dqk + dv, generator=g, dtype=torch.float64)
    dout = torch.randn(seg.total_q, hq, dv, generator=g, dtype=torch.float64)
    return q, kv, dout


def _triton(q, k, v, dout, seg, softcap, strided_out=False):
    scale = q.shape[2] ** -0.5
    out, lse = varlen_fwd(q, k, v, seg, scale=scale, softcap=softcap, backend="triton")
    out_in, dout_in = out, dout
    if strided_out:  # out and dout as last-dim slices of wider buffers, as an executor may hold them
        out_in = torch.cat([out, torch.full_like(out, float("nan"))], -1)[..., :out.shape[2]]
        dout_in = torch.cat([torch.full_like(dout, float("nan")), dout], -1)[..., dout.shape[2]:]
        assert not out_in.is_contiguous() and not dout_in.is_contiguous()
    grads = varlen_bwd(dout_in, q, k, v, out_in, lse, seg, scale=scale, softcap=softcap, backend="triton")
    return tuple(t.cpu() for t in (out, lse, *grads))


def _check(segs, heads, dims, dtype, softcap=None, packed=True, seed=0):
    """Triton vs fp64: each result within twice the error of the same math in ``dtype`` (plus that
    dtype's rounding of the exact value)."""
    seg = _layout(segs)
    (hq, hkv), (dqk, dv) = heads, dims
    q64, kv64, dout64 = _inputs(seg, hq, hkv, dqk, dv, seed)
    k64, v64 = kv64[..., :dqk], kv64[..., dqk:]
    want = _dense(q64, k64, v64, dout64, seg, softcap, torch.float64)
    base = _dense(q64, k64, v64, dout64, seg, softcap, dtype)
    q, kv, dout = (t.to(dtype).to(DEVICE) for t in (q64, kv64, dout64))
    k, v = (kv[..., :dqk], kv[..., dqk:]) if packed else (kv[..., :dqk].contiguous(), kv[..., dqk:].contiguous())
    assert packed == (k.stride(1) == dqk + dv == v.stride(1))
    got = _triton(q, k, v, dout, seg, softcap, strided_out=packed)
    shapes = [(seg.total_q, hq, dv), (seg.total_q, hq), (seg.total_q, hq, dqk), (seg.total_k, hkv, dqk),
              (seg.total_k, hkv, dv)]
    assert [tuple(t.shape) for t in got] == shapes
    assert got[0].dtype == dtype and got[1].dtype == torch.float32 and got[4].dtype == dtype
    for name, a, b, w in zip(("out", "lse", "dq", "dk", "dv"), got, base, want):
        atol = max_err(w.to(dtype), w) + 1e-6
        assert max_err(a, w) <= 2 * max_err(b, w) + atol, (name, max_err(a, w), max_err(b, w))
    return got


@pytest.mark.parametrize("dims, heads, dtype, softcap", [
    ((192, 128), (4, 2), torch.float16, None),    # MLA, GQA, full blocks unmasked, packed K|V
    ((192, 128), (2, 2), torch.float32, 5.0),     # MLA, every block masked, soft-cap
    ((64, 32), (4, 1), torch.float16, 3.0),       # MQA, soft-cap
])
def test_mla_doc_masks_match_fp64(dims, heads, dtype, softcap):
    _check(DOCS, heads, dims, dtype, softcap)


@pytest.mark.parametrize("kind, dtype", [("band", torch.float32), ("lo_only", torch.float16)])
def test_mla_bands_match_fp64(kind, dtype):
    """Two-sided and one-sided bands, q shorter and longer than k, empty segments and bands."""
    got = _check(BANDS[kind], (4, 2), (64, 32), dtype)
    assert got[0].shape[2] == 32


def test_dv_wider_than_dqk_and_contiguous_inputs():
    _check(DOCS[:2], (2, 1), (32, 64), torch.float16, packed=False)


def test_bf16_upcast_with_packed_kv():
    _check(DOCS[:2], (2, 2), (64, 32), torch.bfloat16, softcap=4.0)


def test_packed_views_are_read_in_place():
    """k and v slices of one buffer (and a sliced dout) reach the kernels without a copy."""
    from distattn.kernels.triton_attn import _work

    kv = torch.randn(10, 2, 96)
    q, k, v = torch.randn(10, 4, 64), kv[..., :64], kv[..., 64:]
    dout = torch.randn(10, 4, 64)[..., :32]
    assert [t.data_ptr() for t in _work(q, k, v, dout)] == [t.data_ptr() for t in (q, k, v, dout)]
    moved = _work(torch.randn(10, 4, 8).transpose(1, 2))[0]  # a unit head-dim stride is all they need
    assert moved.stride(-1) == 1


def test_mla_through_the_pinned_api_with_causal_docs():
    """attn_fwd/attn_bwd with (192, 128) and the default scale 1/sqrt(Dqk)."""
    from distattn.planning.masks import cu_seqlens

    seg = Varlen.from_geometry([20, 7], [20, 7], True, None)
    q64, kv64, dout64 = _inputs(seg, 2, 1, 192, 128, seed=3)
    k64, v64 = kv64[..., :192], kv64[..., 192:]
    want = _dense(q64, k64, v64, dout64, seg, None, torch.float64)
    q, k, v, dout = (t.float().to(DEVICE) for t in (q64, k64, v64, dout64))
    cu = cu_seqlens([20, 7]).to(DEVICE)
    out, lse = attn_fwd(q, k, v, cu, cu, backend="triton")
    grads = attn_bwd(dout, q, k, v, out, lse, cu, cu, backend="triton")
    for name, a, w in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, *grads), want):
        assert max_err(a.cpu(), w) < 1e-4, name


@pytest.mark.parametrize("change, match", [
    (dict(q=(9, 4, 16)), r"head_dim mismatch: q has 16, k has 8"),
    (dict(v=(9, 1, 4)), "k and v shapes differ in tokens or heads"),
    (dict(v=(8, 2, 4)), "k and v shapes differ in tokens or heads"),
])
def test_check_qkv_lets_v_have_its_own_head_dim(change, match):
    shapes = {**dict(q=(9, 4, 8), k=(9, 2, 8), v=(9, 2, 4)), **change}
    check_qkv(torch.zeros(9, 4, 8), torch.zeros(9, 2, 8), torch.zeros(9, 2, 24))  # Dv != Dqk is fine
    with pytest.raises(ValueError, match=match):
        check_qkv(*(torch.zeros(shapes[n]) for n in "qkv"))


def test_bwd_wants_dout_and_out_with_vs_head_dim():
    seg = _layout([(6, 6, -U, 0)])
    q, k, v = torch.zeros(6, 2, 16), torch.zeros(6, 2, 16), torch.zeros(6, 2, 8)
    lse = torch.zeros(6, 2)
    with pytest.raises(ValueError, match=r"dout and out must have q's shape with v's head dim.*\(6, 2, 8\)"):
        varlen_bwd(torch.zeros(6, 2, 16), q, k, v, torch.zeros(6, 2, 8), lse, seg, scale=1.0, backend="triton")


def test_triton_refuses_head_dims_over_256():
    seg = _layout([(4, 4, None, None)])
    q, k, v = (torch.zeros(4, 1, d, device=DEVICE) for d in (64, 64, 272))
    with pytest.raises(ValueError, match=r"head dims up to 256, got 64 \(q/k\) and 272 \(v\)"):
        varlen_fwd(q, k, v, seg, scale=1.0, backend="triton")


def test_row64_when_one_segment_passes_int32():
    """In-segment offsets go int64 only once a segment's rows times its token stride pass 2^31
    (MLA's packed K|V rows of 128 heads: 40960 elements, so at 52K keys)."""
    from distattn.kernels.triton_attn import _meta

    q, kv = torch.empty(1, 128, 192), torch.empty(1, 128, 320)
    k, v = kv[..., :192], kv[..., 192:]
    assert not _meta(q, k, v, Varlen.from_lengths([4096], [4096]), None)["ROW64"]
    assert _meta(q, k, v, Varlen.from_lengths([4096], [2**16]), None)["ROW64"]
    assert _meta(q, k, v, Varlen.from_lengths([2**17], [4096]), None)["ROW64"]  # 2^17 * 128 * 192 rows of q


def test_row64_offsets_give_the_same_results(monkeypatch):
    from distattn.kernels import triton_attn

    seg = _layout(DOCS[:2])
    q, kv, dout = (t.float().to(DEVICE) for t in _inputs(seg, 2, 1, 64, 32, seed=4))
    plain = _triton(q, kv[..., :64], kv[..., 64:], dout, seg, None)
    meta = triton_attn._meta
    monkeypatch.setattr(triton_attn, "_meta", lambda *args: {**meta(*args), "ROW64": True})
    wide = _triton(q, kv[..., :64], kv[..., 64:], dout, seg, None)
    assert all(torch.equal(a, b) for a, b in zip(plain, wide))
