"""Mask area/FLOPs in closed form vs dense masks; doc_lens validation; the lse merge."""

import itertools

import numpy as np
import pytest
import torch

from distattn.costmodel.cost import attention_flops
from distattn.planning.masks import (MaskSlice, as_doc_lens, dense_mask, document_mask, mask_area, slices_area,
                                     visible_keys)
from distattn.kernels.merge import merge


def _explicit_mask(m, n, causal, window, offset=0):
    """The definition, written out pair by pair."""
    keep = np.zeros((m, n), dtype=bool)
    for i in range(m):
        p = i + n - m + offset
        for j in range(n):
            ok = True
            if causal and j > p:
                ok = False
            if window is not None and abs(p - j) >= window:
                ok = False
            keep[i, j] = ok
    return keep


@pytest.mark.parametrize("causal,window", [(True, None), (False, None), (True, 1), (True, 4), (False, 1), (False, 3)])
def test_area_and_visible_keys_match_definition(causal, window):
    shapes = list(itertools.product(range(0, 9), range(0, 9), range(-10, 11, 3)))
    m_, n_, o_ = (np.array(x) for x in zip(*shapes))
    areas = mask_area(m_, n_, causal, window, o_)
    for (m, n, off), area in zip(shapes, areas):
        want = _explicit_mask(m, n, causal, window, off)
        assert dense_mask(m, n, causal, window, off).numpy().tolist() == want.tolist()
        assert area == want.sum(), (m, n, off)
        lo, hi = visible_keys(m, n, causal, window, off)
        for i in range(m):
            cols = np.nonzero(want[i])[0]
            assert (lo[i] > hi[i]) if cols.size == 0 else (lo[i], hi[i]) == (cols[0], cols[-1])


def test_slice_geometry_is_global():
    # queries [10, 14) against earlier keys [2, 6) of the same document: offset 8
    s = MaskSlice.document(10, 14, 2, 6, causal=True, window=10)
    assert (s.lo, s.hi) == (-9, 0) and s.local_band() == (-9 + 8, 0 + 8)
    assert s.area() == sum(1 for g in range(10, 14) for j in range(2, 6) if j <= g and g - j < 10)


def test_area_large_values_closed_form():
    # a causal square of n tokens has n(n+1)/2 visible pairs
    n = 1 << 20
    assert mask_area([n], [n], True, None)[0] == n * (n + 1) // 2
    assert mask_area([n], [n], True, n)[0] == n * (n + 1) // 2
    # causal window W on a long document: W(W+1)/2 + (n - W) W
    w = 4096
    assert mask_area([n], [n], True, w)[0] == w * (w + 1) // 2 + (n - w) * w


def test_flops_convention():
    assert attention_flops(10, 8, 64) == 4 * 10 * 8 * 64
    assert attention_flops(10, 8, 64, backward=True) == 2.5 * 4 * 10 * 8 * 64
    slices = document_mask([3, 5], causal=True)
    assert [(s.lo, s.hi) for s in slices] == [(None, 0), (None, 0)]
    assert slices_area(slices) == 6 + 15
    assert MaskSlice.document(0, 4, 0, 4, causal=True, window=2).area() == 4 + 3
    assert MaskSlice.document(0, 4, 0, 8, causal=False).area() == 32


@pytest.mark.parametrize("bad,match", [
    ([3, -1], r"doc_lens\[1\] = -1"),
    ([3, 0], r"doc_lens\[1\] = 0"),
    ([], "empty"),
    ([2.5], "not an int"),
    (torch.tensor([1.0, 2.0]), "integer tensor"),
    ("12", "list of ints"),
])
def test_doc_lens_validation(bad, match):
    with pytest.raises(ValueError, match=match):
        as_doc_lens(bad)


def test_doc_lens_accepts_tensor_and_array():
    assert as_doc_lens(torch.tensor([3, 4])) == (3, 4)
    assert as_doc_lens(np.array([1, 2], dtype=np.int32)) == (1, 2)


def test_merge_is_exact_and_finite_on_empty_rows():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(3, 10, generator=g, dtype=torch.float64)
    v = torch.randn(10, 4, generator=g, dtype=torch.float64)
    s[2] = float("-inf")  # row 2 sees no key at all
    s[1, :6] = float("-inf")  # row 1 sees nothing in the first block

    def part(cols):
        lse = torch.logsumexp(s[:, cols], -1)
        p = torch.exp(s[:, cols] - torch.where(torch.isneginf(lse), 0, lse)[:, None])
        return p @ v[cols], lse

    o_a, l_a = part(slice(0, 6))
    o_b, l_b = part(slice(6, 10))
    o_full, l_full = part(slice(0, 10))
    o, l = merge(o_a, l_a, o_b, l_b)
    assert torch.isfinite(o).all()
    assert torch.allclose(o, o_full, atol=1e-14) and torch.equal(torch.isneginf(l), torch.isneginf(l_full))
    assert torch.allclose(l[:2], l_full[:2], atol=1e-14)
    assert (o[2] == 0).all() and torch.isneginf(l[2])
    # merging with an all-empty partial is the identity; accumulators come out fp32 for half inputs
    o2, l2 = merge(o_a.half(), l_a.float(), torch.zeros_like(o_a).half(), torch.full_like(l_a, float("-inf")))
    assert o2.dtype == torch.float32 and torch.isfinite(o2).all()
