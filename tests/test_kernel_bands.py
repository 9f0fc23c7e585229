"""Local kernels on per-segment bands (``lo <= j - i <= hi``), logit soft-capping and attention
sinks, vs the fp64 autograd oracle (CPU: reference and torch backends)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import max_err, rand_qkv
from distattn.kernels import Varlen, attn_bwd, attn_fwd, torch_cpu, torch_math, varlen_bwd, varlen_fwd
from distattn.planning.masks import UNBOUNDED, band_area, cu_seqlens
from distattn.kernels.merge import add_sink, merge, row_delta, sink_grad
from distattn.runtime.oracle import dense_attention, reference_attention

U = None  # unbounded, in the layouts below


def _random_layout(seed, count=8):
    rng = np.random.default_rng(seed)
    segs = []
    for _ in range(count):
        m, n = (int(x) for x in rng.integers(0, 30, 2))
        lo = None if rng.random() < 0.3 else int(rng.integers(-35, 20))
        hi = None if rng.random() < 0.3 else int(rng.integers(-20, 35))
        segs.append((m, n, lo, hi))
    return segs


# (m, n, lo, hi) per segment, None = unbounded
BANDS = {
    # only lo: "inverse causal" (top-left, j >= i) and shifted versions of it
    "inv-causal": [(9, 9, 0, U), (5, 12, 0, U), (12, 5, 0, U), (7, 7, -3, U), (6, 10, 4, U)],
    # both: bi-causal (j >= i and bottom-right causal j <= i + n - m) and narrow diagonals
    "bi-causal": [(9, 9, 0, 0), (5, 12, 0, 7), (8, 8, -2, 0), (6, 11, 1, 3)],
    # only hi: causal shifted either way (ring blocks, queries before their keys' end)
    "shifted-causal": [(7, 7, U, 0), (6, 9, U, 3), (8, 5, U, -2), (4, 6, U, 10), (5, 5, U, -4)],
    # segments and rows that see nothing: empty band, band outside the keys, no keys, no queries
    "empty": [(0, 5, 0, 1), (4, 0, U, U), (5, 5, 3, 1), (6, 4, 5, U), (5, 6, U, -6), (3, 3, U, U), (0, 0, U, U)],
    "random-a": _random_layout(1),
    "random-b": _random_layout(2),
    # > one 256-row block of the torch backend: masked edges beside an unmasked middle
    "multi-block": [(300, 330, 0, U), (280, 420, -40, 90), (300, 300, U, 0), (270, 270, -260, 250)],
}
HEADS = {"mha": (2, 2), "gqa-4:2": (4, 2), "mqa": (3, 1)}
BACKENDS = ["reference", "torch"]


def _bounds(segs):
    lo = [-UNBOUNDED if s[2] is None else s[2] for s in segs]
    hi = [UNBOUNDED if s[3] is None else s[3] for s in segs]
    return np.array(lo), np.array(hi)


def band_case(layout, heads, d=16, dtype=torch.float64, seed=0):
    """q, k, v, the layout, and the dense ``[Tq, Tk]`` mask the band means (built independently)."""
    segs = BANDS[layout] if isinstance(layout, str) else layout
    lq, lk = [s[0] for s in segs], [s[1] for s in segs]
    q, k, v = rand_qkv(sum(lq), sum(lk), *HEADS[heads], d, dtype, seed)
    keep = torch.zeros(sum(lq), sum(lk), dtype=torch.bool)
    q0 = k0 = 0
    for m, n, lo, hi in segs:
        d = torch.arange(n).unsqueeze(0) - torch.arange(m).unsqueeze(1)  # j - i
        lo, hi = (lo if lo is not None else -m - n), (hi if hi is not None else m + n)
        keep[q0:q0 + m, k0:k0 + n] = (d >= lo) & (d <= hi)
        q0, k0 = q0 + m, k0 + n
    return q, k, v, Varlen.from_lengths(lq, lk, *_bounds(segs)), keep


def _dout(q, seed=7):
    return torch.randn(q.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(q.dtype)


def band_oracle(q, k, v, keep, dout, softcap=None, dtype=torch.float64, seg=None):
    """out, lse, dq, dk, dv of the autograd oracle computed in ``dtype`` over the dense mask (per
    segment of ``seg``, or as one segment)."""
    qq, kk, vv = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    cu_q, cu_k = ((torch.from_numpy(seg.cu_q), torch.from_numpy(seg.cu_k)) if seg is not None
                  else (cu_seqlens([q.shape[0]]), cu_seqlens([k.shape[0]])))
    out, lse = dense_attention(qq, kk, vv, cu_q, cu_k, softcap=softcap, mask=keep)
    out.backward(dout.to(dtype))
    return out.detach(), lse.detach(), qq.grad, kk.grad, vv.grad


def run_band(backend, q, k, v, seg, dout, softcap=None, delta=False):
    scale = q.shape[2] ** -0.5
    out, lse = varlen_fwd(q, k, v, seg, scale=scale, softcap=softcap, backend=backend)
    grads = varlen_bwd(dout, q, k, v, out, lse, seg, scale=scale, softcap=softcap, backend=backend,
                       delta=row_delta(dout, out) if delta else None)
    return (out, lse, *grads)


def test_varlen_normalises_bands():
    # bounds that cut nothing become unbounded; no bound left -> None
    seg = Varlen.from_lengths([3, 4, 0], [5, 4, 2], [-2, -3, 7], [4, 3, -9])
    assert seg.lo is None and seg.hi is None
    seg = Varlen.from_lengths([3, 4], [5, 4], [-1, -5], [2, 9])
    assert seg.lo.tolist() == [-1, -UNBOUNDED] and seg.hi.tolist() == [2, UNBOUNDED]
    assert seg.lo.dtype == np.int32 and seg.max_q == 4 and seg.max_k == 5
    assert list(seg.segments()) == [(0, 3, 0, 5, -1, 2), (3, 7, 5, 9, -UNBOUNDED, UNBOUNDED)]
    # clipped into [-UNBOUNDED, UNBOUNDED]
    seg = Varlen.from_lengths([3], [3], [-(1 << 40)], [1 << 40])
    assert seg.lo is None and seg.hi is None
    seg = Varlen.from_lengths([3], [3], None, [-(1 << 40)])
    assert seg.hi.tolist() == [-UNBOUNDED]
    # from_geometry is masks.band
    seg = Varlen.from_geometry([3, 4], [5, 4], True, 2, [1, 0])
    assert seg.lo.tolist() == [2, -1] and seg.hi.tolist() == [3, 0]
    # device copies
    cu_q, cu_k, lo, hi = seg.tensors("cpu")
    assert lo.dtype == torch.int32 and hi.tolist() == [3, 0] and seg.tensors("cpu")[2] is lo
    cu_q, cu_k, lo, hi = Varlen.from_lengths([2], [2]).tensors("cpu")
    assert lo is None and hi is None and cu_q.tolist() == [0, 2]


def test_varlen_validates():
    with pytest.raises(ValueError, match="lo must be"):
        Varlen.from_lengths([3, 4], [3, 4], [0])
    with pytest.raises(ValueError, match="hi must be"):
        Varlen.from_lengths([3, 4], [3, 4], None, [0.5, 1.0])
    with pytest.raises(ValueError, match="cu_seqlens_k"):
        Varlen.build([0, 3], [0, 4], total_k=5)
    with pytest.raises(ValueError, match="window"):
        Varlen.from_geometry([3], [3], True, 0)
    with pytest.raises(ValueError, match="q_offset"):
        Varlen.from_tensors(cu_seqlens([3]), cu_seqlens([3]), torch.tensor([1, 2]), 3, 3, True, None)
    seg = Varlen.from_tensors(cu_seqlens([3, 2]), cu_seqlens([3, 4]), torch.tensor([1, 0]), 5, 7, True, 2)
    assert seg.lo.tolist() == [0, 1] and seg.hi.tolist() == [1, 2]


def _fp64_cases() -> list:
    """Every layout x heads (multi-block: once, it is the slow one) x backend x softcap. The default slice:
    every (backend, softcap) pair on every layout -- the first and third heads of a layout with the
    reference backend plain and torch soft-capped, the second the other way round; multi-block all four --
    so each layout x heads runs both backends, and each layout x backend both softcaps. The rest: --slow."""
    cases = []
    for layout in BANDS:
        heads_of = [h for h in HEADS if layout != "multi-block" or h == "gqa-4:2"]
        for i, heads in enumerate(heads_of):
            default = {("reference", None), ("torch", 3.0)} if i % 2 == 0 else {("reference", 3.0), ("torch", None)}
            for backend in BACKENDS:
                for softcap in (None, 3.0):
                    slow = len(heads_of) > 1 and (backend, softcap) not in default
                    cases.append(pytest.param(layout, heads, backend, softcap, marks=[pytest.mark.slow] if slow else [],
                                              id=f"{layout}-{heads}-{backend}-{softcap}"))
    return cases


@pytest.mark.parametrize("layout,heads,backend,softcap", _fp64_cases())
def test_bands_fp64_match_oracle(layout, heads, backend, softcap):
    q, k, v, seg, keep = band_case(layout, heads)
    dout = _dout(q)
    got = run_band(backend, q, k, v, seg, dout, softcap, delta=heads == "mqa")
    want = band_oracle(q, k, v, keep, dout, softcap, seg=seg)
    assert got[1].dtype == torch.float64
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        assert a.shape == b.shape, name
        assert max_err(a, b) < 1e-10, (name, max_err(a, b))
    assert int(band_area(*(np.diff(c) for c in (seg.cu_q, seg.cu_k)), *seg.bands()).sum()) == int(keep.sum())


def _sdpa_band(q, k, v, seg, keep, dout):
    """out, dq, dk, dv of PyTorch's own attention (SDPA per segment, dense bool mask) in q's dtype."""
    qq, kk, vv = (t.detach().clone().requires_grad_() for t in (q, k, v))
    outs = []
    for q0, q1, k0, k1, _, _ in seg.segments():
        qs = qq[q0:q1].transpose(0, 1).unsqueeze(0)
        ks, vs = (t[k0:k1].transpose(0, 1).unsqueeze(0) for t in (kk, vv))
        sub = keep[q0:q1, k0:k1]
        if q1 == q0 or k1 == k0:
            outs.append(qq[q0:q1] * 0)
            continue
        o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=sub, enable_gqa=True)
        outs.append(torch.where(sub.any(-1)[None, None, :, None], o, 0)[0].transpose(0, 1))
    out = torch.cat(outs)
    out.backward(dout)
    return out.detach(), qq.grad, kk.grad, vv.grad


def _without_lse(result):
    """out, dq, dk, dv of an (out, lse, dq, dk, dv) result."""
    return result[:1] + result[2:]


LOW_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Two halves of dtype x backend x softcap, each holding every pair of them (each dtype with both backends and
# both softcaps, each backend with both softcaps): the default slice runs one half per layout, alternating,
# so every triple runs on two layouts and every layout meets every pair; the other half: --slow.
PAIRWISE = {(torch.float32, "reference", None), (torch.float32, "torch", 2.0), (torch.float16, "reference", 2.0),
            (torch.float16, "torch", None), (torch.bfloat16, "reference", None), (torch.bfloat16, "torch", 2.0)}


def _low_precision_cases() -> list:
    cases = []
    for n, (layout, heads) in enumerate([("inv-causal", "gqa-4:2"), ("bi-causal", "mqa"), ("random-a", "gqa-4:2"),
                                         ("multi-block", "mha")]):
        for i, dtype in enumerate(LOW_DTYPES):
            for backend in BACKENDS:
                for softcap in (None, 2.0):
                    slow = ((dtype, backend, softcap) in PAIRWISE) != (n % 2 == 0)
                    cases.append(pytest.param(layout, heads, dtype, backend, softcap,
                                              marks=[pytest.mark.slow] if slow else [],
                                              id=f"{layout}-{heads}-dtype{i}-{backend}-{softcap}"))
    return cases


@pytest.mark.parametrize("layout,heads,dtype,backend,softcap", _low_precision_cases())
def test_bands_low_precision_within_twice_torch_error(layout, heads, dtype, backend, softcap):
    """DESIGN's rule: error vs fp64 <= 2x the error PyTorch's own attention makes in the same dtype,
    plus the fp64 result's rounding in that dtype. PyTorch's own: SDPA. With softcap (SDPA has none)
    the larger of SDPA's error on the same inputs without it and the error of the dense math with
    it in the same dtype (the dense math alone, exact-order fp32, is tighter than any blocked
    kernel: 1.1-3.8x below ours over eight seeds)."""
    q64, k64, v64, seg, keep = band_case(layout, heads, d=32, seed=3)
    dout64 = _dout(q64)
    want = band_oracle(q64, k64, v64, keep, dout64, softcap, seg=seg)
    q, k, v, dout = (t.to(dtype) for t in (q64, k64, v64, dout64))
    plain = band_oracle(q, k, v, keep, dout, softcap, dtype=dtype, seg=seg)
    sdpa = _sdpa_band(q, k, v, seg, keep, dout)
    sdpa_err = [max_err(b, w) for b, w in zip(sdpa, _without_lse(band_oracle(q64, k64, v64, keep, dout64, None,
                                                                             seg=seg)))]
    base_err = sdpa_err if softcap is None else [max(s, max_err(b, w)) for s, b, w in
                                                 zip(sdpa_err, _without_lse(plain), _without_lse(want))]
    got = run_band(backend, q, k, v, seg, dout, softcap)
    assert got[0].dtype == dtype and got[1].dtype == torch.float32 and got[2].dtype == dtype
    for name, a, b, w in zip(("out", "dq", "dk", "dv"), _without_lse(got), base_err, _without_lse(want)):
        atol = max_err(w.to(dtype), w)
        assert max_err(a, w) <= 2 * b + atol, (name, max_err(a, w), b)
    assert max_err(got[1], want[1]) <= 2 * max_err(plain[1], want[1]) + 1e-6


# (causal, window) masks through the pinned attn_fwd/attn_bwd, with q_offset on "offsets"
SINK_CASES = {"causal": (True, None), "full": (False, None), "window-causal": (True, 4)}
SINK_LAYOUTS = {"mixed": [(9, 9, 0), (1, 1, 0), (6, 13, 0), (7, 3, 0), (0, 4, 0), (3, 0, 0)],
                "offsets": [(5, 7, 3), (6, 4, 10), (4, 9, -2), (7, 2, -5)]}


def _sink_case(layout, heads, dtype=torch.float64, seed=0):
    lq, lk, off = zip(*SINK_LAYOUTS[layout])
    q, k, v = rand_qkv(sum(lq), sum(lk), *HEADS[heads], 16, dtype, seed)
    sinks = torch.randn(q.shape[1], generator=torch.Generator().manual_seed(seed + 5), dtype=torch.float64)
    return q, k, v, cu_seqlens(lq), cu_seqlens(lk), (torch.tensor(off) if any(off) else None), sinks.to(dtype)


@pytest.mark.parametrize("softcap", [None, 4.0])
@pytest.mark.parametrize("sinks_on", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mask", list(SINK_CASES))
@pytest.mark.parametrize("layout,heads", [("mixed", "gqa-4:2"), ("offsets", "mqa")])
def test_attn_fwd_bwd_softcap_sinks_match_oracle(layout, heads, mask, backend, sinks_on, softcap):
    causal, window = SINK_CASES[mask]
    q, k, v, cu_q, cu_k, off, sinks = _sink_case(layout, heads)
    sinks = sinks if sinks_on else None
    dout = _dout(q)
    kw = dict(causal=causal, window=window, backend=backend, q_offset=off, softcap=softcap, sinks=sinks)
    out, lse = attn_fwd(q, k, v, cu_q, cu_k, **kw)
    grads = attn_bwd(dout, q, k, v, out, lse, cu_q, cu_k, **kw)
    assert len(grads) == (4 if sinks_on else 3)
    qq, kk, vv = (t.detach().clone().requires_grad_() for t in (q, k, v))
    ss = sinks.detach().clone().requires_grad_() if sinks_on else None
    w_out, w_lse = dense_attention(qq, kk, vv, cu_q, cu_k, causal, window, q_offset=off, softcap=softcap, sinks=ss)
    w_out.backward(dout)
    want = (w_out, w_lse, qq.grad, kk.grad, vv.grad) + ((ss.grad,) if sinks_on else ())
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv", "dsinks"), (out, lse, *grads), want):
        assert a.shape == b.shape, name
        assert max_err(a, b.detach()) < 1e-10, (name, max_err(a, b.detach()))
    if sinks_on:  # rows that see no key: out = 0, lse = the sink
        empty = torch.isneginf(dense_attention(q, k, v, cu_q, cu_k, causal, window, q_offset=off)[1])
        assert (out[empty] == 0).all()
        assert torch.equal(lse[empty], sinks.expand_as(lse)[empty])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sinks_low_precision(backend, dtype):
    q64, k64, v64, cu_q, cu_k, off, s64 = _sink_case("mixed", "gqa-4:2", seed=2)
    dout64 = _dout(q64)

    def oracle(q, k, v, s, dout):
        ins = [t.detach().clone().requires_grad_() for t in (q, k, v, s)]
        out, lse = dense_attention(*ins[:3], cu_q, cu_k, True, None, sinks=ins[3])
        out.backward(dout)
        return (out.detach(), lse.detach(), *(t.grad for t in ins))

    want = oracle(q64, k64, v64, s64, dout64)
    q, k, v, s, dout = (t.to(dtype) for t in (q64, k64, v64, s64, dout64))
    base = oracle(q, k, v, s, dout)
    out, lse = attn_fwd(q, k, v, cu_q, cu_k, backend=backend, sinks=s)
    got = (out, lse, *attn_bwd(dout, q, k, v, out, lse, cu_q, cu_k, backend=backend, sinks=s))
    assert got[0].dtype == dtype and got[5].dtype == dtype and got[1].dtype == torch.float32
    for name, a, b, w in zip(("out", "lse", "dq", "dk", "dv", "dsinks"), got, base, want):
        atol = max_err(w.to(dtype), w) + 1e-6
        assert max_err(a, w) <= 2 * max_err(b, w) + atol, (name, max_err(a, w), max_err(b, w))


@pytest.mark.parametrize("backend", BACKENDS)
def test_softcap_key_blocks_merge_to_full_result(backend, monkeypatch):
    """Keys split in two blocks (bands shifted accordingly), merged by lse and differentiated with
    the final out/lse, reproduce one call over all keys: what every scheduler relies on. Small
    math-path blocks, so that one segment spans several."""
    monkeypatch.setattr(torch_math, "_ROWS", 16)
    monkeypatch.setattr(torch_math, "_BUDGET", 1)
    m, n, lo, hi, split = 40, 50, -30, 12, 22
    q, k, v = rand_qkv(m, n, 4, 2, 8)
    dout, scale, cap = _dout(q), 8 ** -0.5, 1.5
    kw = dict(scale=scale, softcap=cap, backend=backend)
    full = Varlen.from_lengths([m], [n], [lo], [hi])
    a = Varlen.from_lengths([m], [split], [lo], [hi])
    b = Varlen.from_lengths([m], [n - split], [lo - split], [hi - split])  # key j of b is split + j
    o_f, l_f = varlen_fwd(q, k, v, full, **kw)
    o_a, l_a = varlen_fwd(q, k[:split], v[:split], a, **kw)
    o_b, l_b = varlen_fwd(q, k[split:], v[split:], b, **kw)
    o, l = merge(o_a, l_a, o_b, l_b)
    assert max_err(o, o_f) < 1e-12 and max_err(l, l_f) < 1e-12
    delta = row_delta(dout, o_f)
    g_f = varlen_bwd(dout, q, k, v, o_f, l_f, full, delta=delta, **kw)
    g_a = varlen_bwd(dout, q, k[:split], v[:split], o, l, a, delta=delta, **kw)
    g_b = varlen_bwd(dout, q, k[split:], v[split:], o, l, b, delta=delta, **kw)
    assert max_err(g_a[0] + g_b[0], g_f[0]) < 1e-12
    assert max_err(torch.cat([g_a[1], g_b[1]]), g_f[1]) < 1e-12
    assert max_err(torch.cat([g_a[2], g_b[2]]), g_f[2]) < 1e-12
    want = band_oracle(q, k, v, *band_case([(m, n, lo, hi)], "gqa-4:2")[4:], dout, cap)
    assert max_err(o_f, want[0]) < 1e-12 and max_err(g_f[1], want[3]) < 1e-12


def test_torch_cpu_tiles_per_band_kind():
    def kinds(m, n, lo, hi):
        return [(t[4], t[5] is not None) for t in torch_cpu._tiles(m, n, lo, hi, torch.float32)]

    assert kinds(600, 600, -UNBOUNDED, UNBOUNDED) == [(False, False)]
    assert kinds(600, 600, -UNBOUNDED, 0) == [(True, False)]                  # bottom-right causal
    assert kinds(6, 9, -UNBOUNDED, 3) == [(False, False), (True, False)]      # key prefix + diagonal
    assert kinds(9, 5, -UNBOUNDED, -2) == [(True, False), (False, False)]     # diagonal + past the keys
    inv = kinds(600, 900, 0, UNBOUNDED)  # per block a masked diagonal edge and an unmasked rest
    assert inv.count((False, False)) == 3 and inv.count((False, True)) == 3
    assert all(mask for _, mask in kinds(20, 20, -3, 2))                      # narrow band: masked blocks
    assert kinds(5, 5, 3, 1) == [] and kinds(5, 5, 5, UNBOUNDED) == []


def test_kernel_arguments_are_validated():
    q, k, v = rand_qkv(4, 4, 2, 1, 8)
    cu = cu_seqlens([4])
    seg = Varlen.from_lengths([4], [4])
    for bad in (0, -1.0, float("inf"), float("nan"), True, "2"):
        with pytest.raises(ValueError, match="softcap"):
            varlen_fwd(q, k, v, seg, scale=1.0, softcap=bad)
        with pytest.raises(ValueError, match="softcap"):
            attn_fwd(q, k, v, cu, cu, softcap=bad)
    for bad in (torch.zeros(3, dtype=torch.float64), torch.zeros(2, dtype=torch.int64), torch.zeros(1, 2), [0.0, 0.0]):
        with pytest.raises(ValueError, match="sinks"):
            attn_fwd(q, k, v, cu, cu, sinks=bad)
        with pytest.raises(ValueError, match="sinks"):
            attn_bwd(q, q, k, v, q, q[:, :, 0], cu, cu, sinks=bad)
    with pytest.raises(ValueError, match="seg must be"):
        varlen_fwd(q, k, v, (cu, cu), scale=1.0)


class _DenseMask:
    """A stand-in for distattn.SliceMask: ``dense(total, device)`` -> bool [S, S]."""

    def __init__(self, keep):
        self.keep = keep

    def dense(self, total, device):
        return self.keep.to(device)


def test_oracle_mask_sinks_softcap():
    docs = [5, 1, 7]
    q, k, v = rand_qkv(13, 13, 4, 2, 8)
    sinks = torch.randn(4, dtype=torch.float64)
    # the document mask written as a dense mask gives the document result
    keep = torch.zeros(13, 13, dtype=torch.bool)
    start = 0
    for n in docs:
        keep[start:start + n, start:start + n] = torch.ones(n, n, dtype=torch.bool).tril()
        start += n
    for kw in ({}, {"sinks": sinks}, {"softcap": 2.0}, {"sinks": sinks, "softcap": 0.5}):
        a = reference_attention(q, k, v, docs, return_lse=True, window=None, **kw)
        b = reference_attention(q, k, v, None, return_lse=True, mask=_DenseMask(keep), **kw)
        assert max_err(a[0], b[0]) < 1e-14 and max_err(a[1], b[1]) < 1e-14
    # an arbitrary mask (here: anti-causal across the whole sequence, a row that sees nothing)
    anti = torch.ones(13, 13, dtype=torch.bool).triu(1)
    out, lse = reference_attention(q, k, v, None, return_lse=True, mask=_DenseMask(anti))
    assert torch.isneginf(lse[-1]).all() and (out[-1] == 0).all()
    # sinks in the oracle (an extra softmax column) agree with merge.add_sink / sink_grad
    ins = [t.clone().requires_grad_() for t in (q, k, v, sinks)]
    out_s, lse_s = reference_attention(*ins[:3], docs, return_lse=True, sinks=ins[3], softcap=3.0)
    base = reference_attention(q, k, v, docs, return_lse=True, softcap=3.0)
    o2, l2 = add_sink(*base, sinks)
    assert max_err(out_s, o2) < 1e-14 and max_err(lse_s, l2) < 1e-14
    dout = _dout(q)
    out_s.backward(dout)
    assert max_err(ins[3].grad, sink_grad(row_delta(dout, o2), l2, sinks)) < 1e-12
    # and autograd through the oracle's sinks and softcap is right (finite differences)
    small = [t.requires_grad_() for t in (*rand_qkv(5, 5, 2, 1, 3, seed=4), torch.randn(2, dtype=torch.float64))]
    torch.autograd.gradcheck(lambda a, b, c, s: reference_attention(a, b, c, [3, 2], sinks=s, softcap=1.5),
                             small)
    with pytest.raises(ValueError, match="mask"):
        reference_attention(q, k, v, None, mask=_DenseMask(keep[:5, :5]))
    with pytest.raises(ValueError, match="sinks"):
        reference_attention(q, k, v, docs, sinks=sinks[:2])
