"""Bad inputs raise ValueError naming the argument."""

import pytest
import torch

import distattn
from conftest import rand_qkv
from distattn.kernels import attn_bwd, attn_fwd
from distattn.planning.masks import cu_seqlens


def _fwd(q=None, k=None, v=None, cu_q=None, cu_k=None, **kw):
    q0, k0, v0 = rand_qkv(10, 10, 4, 2, 8)
    return attn_fwd(q if q is not None else q0, k if k is not None else k0, v if v is not None else v0,
                    cu_q if cu_q is not None else cu_seqlens([4, 6]),
                    cu_k if cu_k is not None else cu_seqlens([4, 6]), **kw)


@pytest.mark.parametrize("kwargs,match", [
    (dict(cu_q=torch.tensor([0, 4, 9])), "cu_seqlens_q must start at 0 and end at q.shape"),
    (dict(cu_q=torch.tensor([1, 4, 10])), "cu_seqlens_q must start at 0"),
    (dict(cu_k=torch.tensor([0, 7, 6, 10])), "cu_seqlens_k must be non-decreasing"),
    (dict(cu_k=torch.tensor([0.0, 10.0])), "cu_seqlens_k must be a 1-D integer tensor"),
    (dict(cu_q=torch.tensor([0, 10]), cu_k=torch.tensor([0, 4, 10])), "different segment counts"),
    (dict(q=torch.randn(10, 3, 8, dtype=torch.float64)), r"q heads \(3\) must be a multiple of k/v heads \(2\)"),
    (dict(q=torch.randn(10, 4, 8, dtype=torch.float32)), "dtypes differ"),
    (dict(q=torch.randn(10, 4, 16, dtype=torch.float64)), "head_dim mismatch"),
    (dict(v=torch.randn(10, 1, 8, dtype=torch.float64)), "k and v shapes differ"),
    (dict(q=torch.randn(10, 4, dtype=torch.float64)), "q must be a 3-D tensor"),
    (dict(q=torch.ones(10, 4, 8, dtype=torch.int64)), "q must be a floating-point"),
    (dict(window=0), "window must be a positive int"),
    (dict(scale=-1.0), "scale must be a positive finite float"),
    (dict(backend="cuda-magic"), "backend='cuda-magic' is unknown"),
])
def test_kernel_bad_inputs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _fwd(**kwargs)


def test_bwd_bad_shapes():
    q, k, v = rand_qkv(10, 10, 4, 2, 8)
    cu = cu_seqlens([10])
    out, lse = attn_fwd(q, k, v, cu, cu)
    with pytest.raises(ValueError, match="dout and out must have q's shape"):
        attn_bwd(out[:5], q, k, v, out, lse, cu, cu)
    with pytest.raises(ValueError, match="lse must have shape"):
        attn_bwd(out, q, k, v, out, lse[:, :2], cu, cu)


def test_plan_bad_inputs():
    with pytest.raises(ValueError, match=r"doc_lens\[0\] = -3"):
        distattn.plan([-3, 5], 1)
    with pytest.raises(ValueError, match="scheduler='rings' is unknown"):
        distattn.plan([4], 1, scheduler="rings")
    with pytest.raises(ValueError, match="backend='tpu' is unknown"):
        distattn.plan([4], 1, backend="tpu")
    with pytest.raises(ValueError, match="mesh is None"):
        distattn.plan([4], None)
    with pytest.raises(ValueError, match="mesh as an int is a world size .* must be >= 1"):
        distattn.plan([4], 0)
    with pytest.raises(ValueError, match="window must be a positive int"):
        distattn.plan([4], 1, window=-2)


def test_reference_attention_doc_lens_mismatch():
    q, k, v = rand_qkv(10, 10, 2, 2, 4)
    with pytest.raises(ValueError, match="doc_lens sum to 9 but q has 10 tokens"):
        distattn.reference_attention(q, k, v, [4, 5])
