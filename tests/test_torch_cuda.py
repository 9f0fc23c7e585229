"""``backend="torch"`` on CUDA maps our per-segment bands (bottom-right causal, windows, q_offset,
inverse- and bi-causal, any band) onto FlashAttention's ``(left, right)`` window and its lse
conventions. No GPU here: the aten ops are replaced by an fp64 emulation written from FlashAttention's documented semantics -- query ``i``
of a segment with ``m`` queries and ``n`` keys attends to keys ``[i + n - m - left, i + n - m + right]``
(-1: unbounded; ``is_causal`` means right = 0), lse ``[H, T]`` natural log, ``+inf`` on rows that see
no key -- and the backend's grouping, gathers and conversions are checked against the fp64 oracle.
The GPU suite (tests/test_gpu.py) runs the real kernels."""

import pytest
import torch

from conftest import max_err
from distattn.kernels import Varlen, torch_cuda
from distattn.planning.masks import UNBOUNDED
from test_kernel_bands import BANDS, band_case, band_oracle
from test_kernels import HEADS, MASKS, _case, _dout, _oracle


def _visible(m, n, left, right, is_causal):
    i = torch.arange(m).unsqueeze(1) + n - m
    j = torch.arange(n).unsqueeze(0)
    right = 0 if is_causal else right
    keep = torch.ones(m, n, dtype=torch.bool)
    if left >= 0:
        keep &= j >= i - left
    if right >= 0:
        keep &= j <= i + right
    return keep


def _segments(cu_q, cu_k):
    bq, bk = cu_q.tolist(), cu_k.tolist()
    return [(bq[s], bq[s + 1], bk[s], bk[s + 1]) for s in range(len(bq) - 1)]


def fake_fwd(q, k, v, cu_q, cu_k, max_q, max_k, dropout, is_causal, debug, *, scale, window_size_left,
             window_size_right):
    assert dropout == 0.0 and max_q >= int((cu_q[1:] - cu_q[:-1]).max()) and max_k >= int((cu_k[1:] - cu_k[:-1]).max())
    g = q.shape[1] // k.shape[1]
    out = torch.zeros_like(q)
    lse = torch.full((q.shape[1], q.shape[0]), float("inf"), dtype=torch.float64)
    for q0, q1, k0, k1 in _segments(cu_q, cu_k):
        s = torch.einsum("mhd,nhd->hmn", q[q0:q1], k[k0:k1].repeat_interleave(g, 1)) * scale
        s = s.masked_fill(~_visible(q1 - q0, k1 - k0, window_size_left, window_size_right, is_causal), float("-inf"))
        l = torch.logsumexp(s, -1)
        p = torch.exp(s - l.nan_to_num(neginf=0).unsqueeze(-1))
        out[q0:q1] = torch.einsum("hmn,nhd->mhd", p, v[k0:k1].repeat_interleave(g, 1))
        lse[:, q0:q1] = l.masked_fill(torch.isneginf(l), float("inf"))
    return out, lse, None, None, None


def fake_bwd(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, dropout, is_causal, rng, unused, *, scale,
             window_size_left, window_size_right):
    assert lse.shape == (q.shape[1], q.shape[0]) and not torch.isneginf(lse).any()
    g = q.shape[1] // k.shape[1]
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    delta = (dout * out).sum(-1).t()
    for q0, q1, k0, k1 in _segments(cu_q, cu_k):
        if q1 == q0 or k1 == k0:  # FlashAttention writes zeros there
            continue
        kr, vr = k[k0:k1].repeat_interleave(g, 1), v[k0:k1].repeat_interleave(g, 1)
        s = torch.einsum("mhd,nhd->hmn", q[q0:q1], kr) * scale
        s = s.masked_fill(~_visible(q1 - q0, k1 - k0, window_size_left, window_size_right, is_causal), float("-inf"))
        p = torch.exp(s - lse[:, q0:q1].unsqueeze(-1))
        dp = torch.einsum("mhd,nhd->hmn", dout[q0:q1], vr)
        ds = p * (dp - delta[:, q0:q1].unsqueeze(-1))
        dq[q0:q1] = torch.einsum("hmn,nhd->mhd", ds, kr) * scale
        n = k1 - k0
        dk[k0:k1] = (torch.einsum("hmn,mhd->nhd", ds, q[q0:q1]) * scale).view(n, k.shape[1], g, -1).sum(2)
        dv[k0:k1] = torch.einsum("hmn,mhd->nhd", p, dout[q0:q1]).view(n, k.shape[1], g, -1).sum(2)
    return dq, dk, dv


@pytest.fixture
def emulated(monkeypatch):
    monkeypatch.setattr(torch_cuda, "_fwd_op", fake_fwd)
    monkeypatch.setattr(torch_cuda, "_bwd_op", fake_bwd)
    monkeypatch.setattr(torch_cuda, "_check", lambda q: None)
    monkeypatch.setattr(torch_cuda, "_dummies", lambda device: (None, None))


# layouts the schedulers produce: bottom-right segments, ring blocks (queries after the keys, trimmed
# to what the window sees), q shorter than k, segments with no keys or no queries
LAYOUTS = {
    "mixed": [(37, 37), (1, 1), (20, 45), (3, 2), (0, 4), (6, 0)],
    "ring-blocks": [(8, 8, 8), (5, 9, 5), (6, 6), (4, 4, 4)],
}


@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("heads", list(HEADS))
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_flash_mapping_matches_oracle(emulated, layout, heads, mask):
    import test_kernels

    causal, window = MASKS[mask]
    test_kernels.LAYOUTS["_flash"] = LAYOUTS[layout]
    try:
        q, k, v, cu_q, cu_k, off = _case("_flash", heads)
    finally:
        del test_kernels.LAYOUTS["_flash"]
    if window is not None and off is not None:  # a ring block trimmed to the window, as pair_block does
        off = torch.clamp(off, max=window - 1)
    dout = _dout(q)
    seg = Varlen.from_tensors(cu_q, cu_k, off, q.shape[0], k.shape[0], causal, window)
    scale = q.shape[2] ** -0.5
    out, lse = torch_cuda.flash_fwd(q, k, v, seg, scale)
    grads = torch_cuda.flash_bwd(dout, q, k, v, out, lse, seg, scale)
    want = _oracle(q, k, v, cu_q, cu_k, off, causal, window, dout)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, *grads), want):
        assert max_err(a, b) < 1e-12, (name, max_err(a, b))
    calls = torch_cuda.groups(seg, q.device)
    if layout == "mixed":  # every segment bottom-right aligned: one call on the tensors as they are
        assert len(calls) == 1 and calls[0].q_index is None


# bands FlashAttention's window can say: m <= n for lo-bounded ("inverse causal" j >= i is left = n - m),
# hi >= n - m where hi cuts (right = hi - (n - m) >= 0)
FLASH_BANDS = {
    "inv-causal": [(9, 9, 0, None), (5, 12, 0, None), (6, 10, 4, None), (12, 5, -8, None)],
    "bi-causal": [(9, 9, 0, 0), (5, 12, 0, 7), (6, 11, 1, 7), (3, 3, 0, 0)],
    "mixed-bands": [(7, 7, None, 0), (6, 9, None, 5), (6, 10, -3, 6), (4, 0, None, None), (5, 5, 3, 1)],
}


@pytest.mark.parametrize("heads", list(HEADS))
@pytest.mark.parametrize("layout", list(FLASH_BANDS))
def test_flash_mapping_of_bands_matches_oracle(emulated, layout, heads):
    q, k, v, seg, keep = band_case(FLASH_BANDS[layout], heads)
    dout = _dout(q)
    scale = q.shape[2] ** -0.5
    out, lse = torch_cuda.flash_fwd(q, k, v, seg, scale)
    grads = torch_cuda.flash_bwd(dout, q, k, v, out, lse, seg, scale)
    want = band_oracle(q, k, v, keep, dout)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, *grads), want):
        assert max_err(a, b) < 1e-12, (name, max_err(a, b))


def test_band_to_window_values():
    U = UNBOUNDED
    #                 (m, n): (lo, hi)  -> (left, right)
    cases = [((4, 4), (-U, U), (-1, -1)), ((4, 4), (-U, 0), (-1, 0)), ((4, 9), (-U, 5), (-1, 0)),
             ((4, 4), (0, U), (0, -1)), ((4, 9), (0, 5), (5, 0)), ((6, 6), (-2, 2), (2, 2)),
             ((3, 8), (-U, 6), (-1, 1)), ((3, 8), (-U, 7), (-1, -1)), ((5, 5), (-1, U), (1, -1))]
    for (m, n), (lo, hi), want in cases:
        left, right, visible = torch_cuda.windows(Varlen.from_lengths([m], [n], [lo], [hi]))
        assert (int(left[0]), int(right[0])) == want and visible[0], ((m, n), (lo, hi))


def test_softcap_runs_the_math_path(monkeypatch):
    """FlashAttention has no softcap: flash_fwd/flash_bwd with one run torch_math, any band."""
    def refuse(*args, **kwargs):
        raise AssertionError("the FlashAttention op must not run with softcap")
    monkeypatch.setattr(torch_cuda, "_fwd_op", refuse)
    monkeypatch.setattr(torch_cuda, "_bwd_op", refuse)
    q, k, v, seg, keep = band_case(BANDS["random-a"], "gqa-4:2")
    dout = _dout(q)
    out, lse = torch_cuda.flash_fwd(q, k, v, seg, 0.25, 2.0)
    grads = torch_cuda.flash_bwd(dout, q, k, v, out, lse, seg, 0.25, 2.0)
    qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
    from distattn.runtime.oracle import dense_attention
    from distattn.planning.masks import cu_seqlens
    w_out, w_lse = dense_attention(qq, kk, vv, cu_seqlens([q.shape[0]]), cu_seqlens([k.shape[0]]), scale=0.25,
                                   softcap=2.0, mask=keep)
    w_out.backward(dout)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, *grads), (w_out, w_lse, qq.grad, kk.grad,
                                                                                  vv.grad)):
        assert max_err(a, b.detach()) < 1e-12, (name, max_err(a, b.detach()))


def test_flash_refuses_what_its_window_cannot_say():
    seg = Varlen.from_geometry([4], [4], True, None, [-2])
    with pytest.raises(ValueError, match="q_offset < 0"):
        torch_cuda.windows(seg)
    seg = Varlen.from_geometry([4], [4], True, 3, [6])  # queries 6 past the keys, window 3: they see nothing
    assert not torch_cuda.windows(seg)[2].any()
    with pytest.raises(ValueError, match="backend='triton'"):
        torch_cuda.windows(Varlen.from_geometry([8], [4], True, 3, [3]))
    # inverse causal with more queries than keys, a diagonal below bottom-right: no window says them
    for lo, hi in ((0, None), (None, -3), (-1, 0)):
        with pytest.raises(ValueError, match="backend='triton'"):
            torch_cuda.windows(Varlen.from_lengths([6], [4], None if lo is None else [lo],
                                                   None if hi is None else [hi]))
