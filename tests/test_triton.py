"""The triton backend under Triton's CPU interpreter (TRITON_INTERPRET=1, set by conftest) vs the
fp64 oracle through the pinned ``attn_fwd``/``attn_bwd`` (causal, window, q_offset become a band
per segment): lengths that are not block multiples, several segments, q shorter than k, q_offset,
GQA 4:2 and MQA, windows, soft-capping, fwd and bwd, fp32 / fp16 / bf16 (upcast). Larger shapes are
`slow`; arbitrary bands are in test_triton_bands.py."""

import pytest
import torch

from conftest import max_err
from distattn.kernels import attn_bwd, attn_fwd, available_backends
from test_kernels import HEADS, MASKS, _dout, _oracle, _run, _sdpa

pytestmark = pytest.mark.skipif("triton" not in available_backends(), reason="triton is not installed")

LAYOUTS = {
    "mixed": [(37, 37), (1, 1), (20, 45), (5, 9, 3), (3, 2)],  # q < k, an offset, q > k (empty rows)
    "long-short": [(100, 100), (1, 1)],
}


def _case(layout, heads, d, dtype, seed=0):
    from distattn.planning.masks import cu_seqlens
    from conftest import rand_qkv

    segs = [(*s, 0)[:3] for s in (LAYOUTS[layout] if isinstance(layout, str) else layout)]
    lq, lk, off = zip(*segs)
    hq, hkv = HEADS[heads]
    q, k, v = rand_qkv(sum(lq), sum(lk), hq, hkv, d, torch.float64, seed)
    return q, k, v, cu_seqlens(lq), cu_seqlens(lk), (torch.tensor(off) if any(off) else None)


@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_matches_oracle_within_twice_torch_error(mask, dtype):
    causal, window = MASKS[mask]
    q64, k64, v64, cu_q, cu_k, off = _case("mixed", "gqa-4:2", 32, torch.float64)
    dout64 = _dout(q64)
    want = _oracle(q64, k64, v64, cu_q, cu_k, off, causal, window, dout64)
    q, k, v, dout = (t.to(dtype) for t in (q64, k64, v64, dout64))
    base = _sdpa(q, k, v, cu_q, cu_k, off, causal, window, dout)
    got = _run("triton", q, k, v, cu_q, cu_k, off, causal, window, dout)
    assert got[0].dtype == dtype and got[1].dtype == torch.float32
    for name, a, b, w in zip(("out", "dq", "dk", "dv"), got[:1] + got[2:], base, want[:1] + want[2:]):
        atol = max_err(w.to(dtype), w)
        assert max_err(a, w) <= 2 * max_err(b, w) + atol, (name, max_err(a, w), max_err(b, w))
    assert max_err(got[1], want[1]) < (1e-5 if dtype == torch.float32 else 1e-2)
    # the last segment has 3 queries and 2 keys: its first query sits before every key
    if causal:
        assert torch.isneginf(got[1][-3]).all() and (got[0][-3] == 0).all()


def test_triton_mqa_and_bf16_upcast():
    q64, k64, v64, cu_q, cu_k, off = _case("long-short", "mqa", 16, torch.float64)
    dout64 = _dout(q64)
    want = _oracle(q64, k64, v64, cu_q, cu_k, off, True, None, dout64)
    q, k, v, dout = (t.to(torch.bfloat16) for t in (q64, k64, v64, dout64))
    base = _sdpa(q, k, v, cu_q, cu_k, off, True, None, dout)
    got = _run("triton", q, k, v, cu_q, cu_k, off, True, None, dout)
    assert got[0].dtype == torch.bfloat16 and got[2].dtype == torch.bfloat16
    for name, a, b, w in zip(("out", "dq", "dk", "dv"), got[:1] + got[2:], base, want[:1] + want[2:]):
        assert max_err(a, w) <= 2 * max_err(b, w) + max_err(w.to(torch.bfloat16), w), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_softcap_through_the_pinned_api_matches_reference(dtype):
    """softcap with a causal window and q_offset (HAS_LO and HAS_HI), fp16 with full blocks."""
    q64, k64, v64, cu_q, cu_k, off = _case("mixed", "gqa-4:2", 32, torch.float64)
    dout64 = _dout(q64)
    kw = dict(causal=True, window=9, q_offset=off, softcap=3.0)
    want = attn_fwd(q64, k64, v64, cu_q, cu_k, backend="reference", **kw)
    want_grads = attn_bwd(dout64, q64, k64, v64, *want, cu_q, cu_k, backend="reference", **kw)
    q, k, v, dout = (t.to(dtype) for t in (q64, k64, v64, dout64))
    out, lse = attn_fwd(q, k, v, cu_q, cu_k, backend="triton", **kw)
    grads = attn_bwd(dout, q, k, v, out, lse, cu_q, cu_k, backend="triton", **kw)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for name, a, w in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, *grads), (*want, *want_grads)):
        assert max_err(a, w) < tol * max(1.0, w[torch.isfinite(w)].abs().max().item()), name
    plain = attn_fwd(q, k, v, cu_q, cu_k, backend="triton", causal=True, window=9, q_offset=off)[0]
    assert max_err(plain, out) > 10 * tol  # the cap changed something


def test_triton_refuses_fp64():
    q64, k64, v64, cu_q, cu_k, _ = _case("long-short", "mha", 16, torch.float64)
    with pytest.raises(ValueError, match="backend='triton' computes fp16, bf16 or fp32"):
        attn_fwd(q64, k64, v64, cu_q, cu_k, backend="triton")


def test_triton_blocks_merge_with_final_lse():
    """Key blocks differentiated with the merged lse sum to the whole (what schedulers rely on)."""
    from distattn.planning.masks import cu_seqlens
    from distattn.kernels.merge import merge

    q64, k64, v64, _, _, _ = _case([(24, 40)], "gqa-4:2", 16, torch.float64)
    q, k, v = (t.float() for t in (q64, k64, v64))
    dout = _dout(q)
    kw = dict(causal=True, backend="triton")
    o_a, l_a = attn_fwd(q, k[:16], v[:16], cu_seqlens([24]), cu_seqlens([16]), q_offset=torch.tensor([24]), **kw)
    o_b, l_b = attn_fwd(q, k[16:], v[16:], cu_seqlens([24]), cu_seqlens([24]), **kw)
    o, l = merge(o_a, l_a, o_b, l_b)
    o_full, l_full = attn_fwd(q, k, v, cu_seqlens([24]), cu_seqlens([40]), **kw)
    assert max_err(o, o_full) < 1e-5 and max_err(l, l_full) < 1e-5
    ga = attn_bwd(dout, q, k[:16], v[:16], o, l, cu_seqlens([24]), cu_seqlens([16]), q_offset=torch.tensor([24]),
                  **kw)
    gb = attn_bwd(dout, q, k[16:], v[16:], o, l, cu_seqlens([24]), cu_seqlens([24]), **kw)
    gf = attn_bwd(dout, q, k, v, o_full, l_full, cu_seqlens([24]), cu_seqlens([40]), **kw)
    assert max_err(ga[0] + gb[0], gf[0]) < 1e-5
    assert max_err(torch.cat([ga[1], gb[1]]), gf[1]) < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("mask", list(MASKS))
def test_triton_long_segments(mask):
    causal, window = MASKS[mask]
    q64, k64, v64, cu_q, cu_k, off = _case([(257, 257), (100, 257), (1, 1)], "gqa-4:2", 64, torch.float64)
    dout64 = _dout(q64)
    want = _oracle(q64, k64, v64, cu_q, cu_k, off, causal, window, dout64)
    got = _run("triton", *(t.float() for t in (q64, k64, v64)), cu_q, cu_k, off, causal, window, dout64.float())
    for name, a, w in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        assert max_err(a, w) < 1e-4, name


def test_kernel_benchmark_without_gpu_exits_cleanly(capsys):
    from distattn.kernels.tools.bench import main

    if torch.cuda.is_available():
        pytest.skip("has a GPU: the benchmark would run for real")
    assert main([]) == 0
    assert "no GPU" in capsys.readouterr().out


@pytest.mark.parametrize("softcap", [None, 4.0])
@pytest.mark.parametrize("mask", ["causal", "window-causal"])
@pytest.mark.parametrize("layout,heads", [("mixed", "gqa-4:2"), ("offsets", "mqa")])
def test_triton_sinks_softcap_documents_match_fp64_oracle(layout, heads, mask, softcap):
    """The backward with every variant at once, through the pinned calls: attention sinks, soft-cap,
    GQA/MQA (one dK/dV program loops over the query heads of its group), packed documents with
    offsets and empty segments, fp32 against the fp64 autograd oracle."""
    from test_kernel_bands import SINK_CASES, _sink_case
    from distattn.runtime.oracle import dense_attention

    causal, window = SINK_CASES[mask]
    q64, k64, v64, cu_q, cu_k, off, sinks64 = _sink_case(layout, heads)
    dout64 = _dout(q64)
    qq, kk, vv, ss = (t.detach().clone().requires_grad_() for t in (q64, k64, v64, sinks64))
    w_out, _ = dense_attention(qq, kk, vv, cu_q, cu_k, causal, window, q_offset=off, softcap=softcap, sinks=ss)
    w_out.backward(dout64)
    q, k, v, dout, sinks = (t.float() for t in (q64, k64, v64, dout64, sinks64))
    kw = dict(causal=causal, window=window, backend="triton", q_offset=off, softcap=softcap, sinks=sinks)
    out, lse = attn_fwd(q, k, v, cu_q, cu_k, **kw)
    grads = attn_bwd(dout, q, k, v, out, lse, cu_q, cu_k, **kw)
    for name, got, want in zip(("out", "dq", "dk", "dv", "dsinks"), (out, *grads),
                               (w_out, qq.grad, kk.grad, vv.grad, ss.grad)):
        assert max_err(got.double(), want.detach()) < 2e-5, (name, max_err(got.double(), want.detach()))


@pytest.mark.parametrize("mask", ["causal", "full", "window-causal"])
@pytest.mark.parametrize("heads", ["gqa-4:2", "mqa"])
def test_triton_full_block_loops_match_fp64_oracle(monkeypatch, mask, heads):
    """Under the interpreter every input is fp32, whose exact ("ieee") path masks every block: the
    loops over *full* blocks (no masks; dK/dV's steps through a GQA group's heads) run only in 16-bit
    kernels on a GPU. Here the 16-bit path's constexprs (tf32 dots) run on fp32 tensors, so those loops
    run too, on segments long enough to have full 16 x 16 blocks."""
    from distattn.kernels import triton_attn

    real = triton_attn._meta
    monkeypatch.setattr(triton_attn, "_meta", lambda *args: {**real(*args), "PRECISION": "tf32"})
    causal, window = MASKS[mask]
    q64, k64, v64, cu_q, cu_k, off = _case([(100, 100), (37, 70), (1, 1)], heads, 32, torch.float64)
    dout64 = _dout(q64)
    want = _oracle(q64, k64, v64, cu_q, cu_k, off, causal, window, dout64)
    got = _run("triton", *(t.float() for t in (q64, k64, v64)), cu_q, cu_k, off, causal, window, dout64.float())
    for name, a, w in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        assert max_err(a.double(), w) < 2e-5, (name, max_err(a.double(), w))
