"""The triton backend's band masks and logit soft-capping under Triton's CPU interpreter
(TRITON_INTERPRET=1, set by conftest) vs the fp64 ``reference`` backend.

Each call mixes many segments: causal, full, sliding windows, only-lo (inverse causal), bi-causal,
random bands, an empty band, q shorter / longer than k, empty segments and lengths that are not
multiples of the interpreter's 16-row blocks (masked left-edge, full and masked right-edge runs).
Calls cover every (HAS_LO, HAS_HI) pair, with and without the soft-cap, in fp32 (every block
masked) and fp16 (full blocks unmasked). The tile tables are checked against brute force."""

import numpy as np
import pytest
import torch

from conftest import max_err, rand_qkv
from distattn.kernels import available_backends, varlen_bwd, varlen_fwd
from distattn.kernels.varlen import Varlen
from distattn.planning.masks import UNBOUNDED

pytestmark = pytest.mark.skipif("triton" not in available_backends(), reason="triton is not installed")
# the interpreter runs on CPU tensors; with a GPU the same checks run the compiled kernels
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

U = UNBOUNDED
# (m, n, lo, hi) per segment; None stands for the call's missing bound
BANDS = {
    # every segment bounded on both sides (HAS_LO and HAS_HI), UNBOUNDED where a side is open
    "band": [
        (72, 72, -39, 0),                  # causal window 40: masked, full and masked blocks
        (37, 37, -U, 0),                   # causal, not a block multiple
        (20, 45, -U, U),                   # full, q shorter than k
        (33, 33, 0, U),                    # only-lo: inverse causal j >= i
        (18, 30, 0, 12),                   # bi-causal: lo = 0, hi = n - m
        (45, 20, -7, 3),                   # q longer than k, a narrow band: early rows see no key
        (0, 5, 0, 0), (6, 0, -U, U),       # empty segments
        (9, 9, 4, 2),                      # empty band: lo > hi
        (50, 21, -30, -10),                # a band below the diagonal
        (1, 1, 0, 0),
    ],
    "causal": [(40, 40, None, 0), (20, 45, None, 25), (45, 20, None, -25), (37, 37, None, U), (3, 2, None, -1),
               (0, 4, None, 0)],
    "lo_only": [(40, 40, 0, None), (20, 45, 10, None), (45, 20, -U, None), (33, 33, -5, None), (2, 3, 2, None)],
    "full": [(40, 40, None, None), (20, 45, None, None), (45, 20, None, None), (1, 1, None, None),
             (0, 3, None, None)],
}


def _layout(segs):
    m, n, lo, hi = zip(*segs)
    lo = None if lo[0] is None else list(lo)
    hi = None if hi[0] is None else list(hi)
    return Varlen.from_lengths(m, n, lo, hi)


def _dout(q, seed=7):
    return torch.randn(q.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(q.dtype)


def _run(backend, q, k, v, dout, seg, softcap):
    scale = q.shape[2] ** -0.5
    device = DEVICE if backend == "triton" else "cpu"
    q, k, v, dout = (t.to(device) for t in (q, k, v, dout))
    out, lse = varlen_fwd(q, k, v, seg, scale=scale, softcap=softcap, backend=backend)
    dq, dk, dv = varlen_bwd(dout, q, k, v, out, lse, seg, scale=scale, softcap=softcap, backend=backend)
    return tuple(t.cpu() for t in (out, lse, dq, dk, dv))


def _dense(q, k, v, dout, seg, softcap, dtype):
    """out, lse, dq, dk, dv of plain autograd math in ``dtype`` (the baseline a kernel in that
    dtype is held to: twice its error vs fp64)."""
    qq, kk, vv = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    group = q.shape[1] // k.shape[1]
    outs, lses = [], []
    for q0, q1, k0, k1, lo, hi in seg.segments():
        s = torch.einsum("mhd,nhd->hmn", qq[q0:q1], kk[k0:k1].repeat_interleave(group, 1)) * q.shape[2] ** -0.5
        if softcap is not None:
            s = softcap * torch.tanh(s / softcap)
        d = torch.arange(k1 - k0)[None, :] - torch.arange(q1 - q0)[:, None]
        s = s.masked_fill(~((d >= lo) & (d <= hi)), float("-inf"))
        lse = torch.logsumexp(s, -1)
        p = torch.exp(s - torch.where(torch.isinf(lse), 0, lse)[..., None])
        outs.append(torch.einsum("hmn,nhd->mhd", p, vv[k0:k1].repeat_interleave(group, 1)))
        lses.append(lse.T)
    out = torch.cat(outs)
    out.backward(dout.to(dtype))
    return out.detach(), torch.cat(lses).detach(), qq.grad, kk.grad, vv.grad


def _check(segs, heads, dtype, softcap, d=32, seed=0):
    seg = _layout(segs)
    q64, k64, v64 = rand_qkv(seg.total_q, seg.total_k, *heads, d, torch.float64, seed)
    dout64 = _dout(q64)
    want = _run("reference", q64, k64, v64, dout64, seg, softcap)
    q, k, v, dout = (t.to(dtype) for t in (q64, k64, v64, dout64))
    got = _run("triton", q, k, v, dout, seg, softcap)
    base = _dense(q, k, v, dout, seg, softcap, dtype)
    assert got[0].dtype == dtype and got[1].dtype == torch.float32 and got[2].dtype == dtype
    for name, a, b, w in zip(("out", "lse", "dq", "dk", "dv"), got, base, want):
        atol = max_err(w.to(dtype), w) + 1e-6
        assert max_err(a, w) <= 2 * max_err(b, w) + atol, (name, max_err(a, w), max_err(b, w))
    # rows that see no key: out 0 (and lse -inf: max_err demands the same infinities)
    assert (got[0][torch.isneginf(want[1])] == 0).all()
    return got


@pytest.mark.parametrize("kind, dtype, softcap", [
    ("band", torch.float32, None), ("band", torch.float16, 5.0),
    ("causal", torch.float16, None), ("causal", torch.float32, 5.0),
    ("lo_only", torch.float16, 5.0), ("lo_only", torch.float32, None),
    ("full", torch.float16, None), ("full", torch.float32, 5.0),
])
def test_band_kinds_match_reference(kind, dtype, softcap):
    _check(BANDS[kind], (4, 2), dtype, softcap)


def test_random_bands_mqa_fp16_softcap():
    rng = np.random.default_rng(5)
    segs = []
    for _ in range(8):
        m, n = (int(x) for x in rng.integers(0, 48, 2))
        lo = int(rng.integers(-m - 2, n + 2))
        segs.append((m, n, lo, lo + int(rng.integers(-2, m + n + 2))))
    _check(segs, (4, 1), torch.float16, 2.0, d=16, seed=1)


def test_softcap_actually_caps():
    """Large logits: a soft-capped call differs from an uncapped one and matches the reference."""
    seg = _layout([(20, 20, -U, 0)])
    q, k, v = (t.float() * 4 for t in rand_qkv(20, 20, 2, 2, 16, torch.float64, 3))
    gq, gk, gv = (t.to(DEVICE) for t in (q, k, v))
    uncapped = varlen_fwd(gq, gk, gv, seg, scale=1.0, backend="triton")[0].cpu()
    capped = varlen_fwd(gq, gk, gv, seg, scale=1.0, softcap=1.0, backend="triton")[0].cpu()
    want = varlen_fwd(q.double(), k.double(), v.double(), seg, scale=1.0, softcap=1.0, backend="reference")[0]
    assert max_err(capped, want) < 1e-5 and max_err(capped, uncapped) > 0.1


def _brute_tiles(seg, block):
    """(segment, first row) of the query tiles and key tiles that hold a visible pair."""
    q_tiles, k_tiles = set(), set()
    for s, (q0, q1, k0, k1, lo, hi) in enumerate(seg.segments()):
        d = np.arange(k1 - k0)[None, :] - np.arange(q1 - q0)[:, None]
        vis = (d >= lo) & (d <= hi)
        q_tiles |= {(s, r) for r in range(0, q1 - q0, block) if vis[r:r + block].any()}
        k_tiles |= {(s, c) for c in range(0, k1 - k0, block) if vis[:, c:c + block].any()}
    return q_tiles, k_tiles


@pytest.mark.parametrize("kind", list(BANDS) + ["random"])
def test_tile_tables_list_exactly_the_tiles_with_work(kind):
    from distattn.kernels.triton_plan import TILE_BLOCKS, _tables

    if kind == "random":
        rng = np.random.default_rng(0)
        segs = [(int(m), int(n), int(lo), int(lo + w)) for m, n, lo, w in
                zip(rng.integers(0, 300, 40), rng.integers(0, 300, 40), rng.integers(-300, 300, 40),
                    rng.integers(-5, 400, 40))]
    else:
        segs = BANDS[kind]
    seg = _layout(segs)
    q_table, q_counts, k_table, k_counts = _tables(seg)
    for block in TILE_BLOCKS:
        q_want, k_want = _brute_tiles(seg, block)
        for table, counts, want in ((q_table, q_counts, q_want), (k_table, k_counts, k_want)):
            start = table[block // 16]
            pairs = table[start:start + 2 * counts[block]].reshape(-1, 2)
            assert {tuple(p) for p in pairs.tolist()} == want
            assert len(pairs) == len(want)
