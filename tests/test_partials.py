"""Kernel partials (``varlen_fwd/varlen_bwd(partial=True)``): a call whose result the caller merges or
sums returns it in the accumulator dtype, so a context-parallel result is rounded to bf16 once,
whatever the number of parts. Triton under its interpreter (TRITON_INTERPRET=1, set by conftest)
and the fp64 ``reference`` backend store fp32; the others are upcast after rounding."""

import pytest
import torch

from distattn.kernels import available_backends, varlen_bwd, varlen_fwd
from distattn.kernels.varlen import Varlen

SEG = Varlen.from_geometry([40, 24], [40, 24], causal=True, window=None)
BACKENDS = ["reference", "torch", *(["triton"] if "triton" in available_backends() else [])]


def _inputs(dv=16):
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(64, h, 16, generator=g, dtype=torch.float64) for h in (4, 2))
    v = torch.randn(64, 2, dv, generator=g, dtype=torch.float64)
    dout = torch.randn(64, 4, dv, generator=g, dtype=torch.float64)
    return q, k, v, dout


@pytest.mark.parametrize("backend", BACKENDS)
def test_partials_are_fp32_and_round_to_the_plain_result(backend):
    q, k, v, dout = (t.to(torch.bfloat16) for t in _inputs())
    out, lse = varlen_fwd(q, k, v, SEG, scale=0.25, backend=backend)
    wide, wide_lse = varlen_fwd(q, k, v, SEG, scale=0.25, backend=backend, partial=True)
    assert (out.dtype, wide.dtype, wide_lse.dtype) == (torch.bfloat16, torch.float32, torch.float32)
    assert torch.equal(wide.to(torch.bfloat16), out) and torch.equal(wide_lse, lse)
    grads = varlen_bwd(dout, q, k, v, out, lse, SEG, scale=0.25, backend=backend)
    wide_grads = varlen_bwd(dout, q, k, v, out, lse, SEG, scale=0.25, backend=backend, partial=True)
    for plain, partial in zip(grads, wide_grads):
        assert plain.dtype == torch.bfloat16 and partial.dtype == torch.float32
        assert torch.equal(partial.to(torch.bfloat16), plain)


@pytest.mark.parametrize("backend", ["reference", *(["triton"] if "triton" in available_backends() else [])])
def test_stored_partials_are_closer_to_fp64_than_rounded_ones(backend):
    """What the executors gain: a backend that stores fp32 keeps the digits a bf16 store drops (MLA
    head dims too)."""
    q64, k64, v64, dout64 = (t.to(torch.bfloat16).double() for t in _inputs(dv=8))   # bf16 values: no input error
    q, k, v, dout = (t.to(torch.bfloat16) for t in (q64, k64, v64, dout64))
    out, lse = varlen_fwd(q, k, v, SEG, scale=0.25, backend=backend, partial=True)
    ref_out, ref_lse = varlen_fwd(q64, k64, v64, SEG, scale=0.25, backend="reference")
    final = out.to(torch.bfloat16)   # the backward sees the rows' final out, in bf16 as executors keep it
    got = (out, *varlen_bwd(dout, q, k, v, final, lse, SEG, scale=0.25, backend=backend, partial=True))
    ref = (ref_out, *varlen_bwd(dout64, q64, k64, v64, final.double(), ref_lse, SEG, scale=0.25,
                                backend="reference"))
    for name, g, r in zip(("out", "dq", "dk", "dv"), got, ref):
        wide_err = (g.double() - r).norm() / r.norm()
        rounded_err = (g.to(torch.bfloat16).double() - r).norm() / r.norm()
        assert wide_err < 0.6 * rounded_err, (name, float(wide_err), float(rounded_err))
