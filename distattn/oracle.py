"""Single-device dense attention built on torch autograd: the oracle for every test.

Independent of the kernels' hand-written backward: gradients come from autograd
through plain ``einsum``/``logsumexp``, so computing in fp64 gives a trustworthy
reference for out, lse, dq, dk and dv.
"""

from __future__ import annotations

import torch

from .masks import as_doc_lens, check_window, cu_seqlens, dense_mask


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                    cu_seqlens_k: torch.Tensor, causal: bool = True, window: int | None = None,
                    scale: float | None = None, q_offset: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable varlen attention with the kernels' semantics (bottom-right causal,
    ``q_offset`` as in :func:`distattn.kernels.attn_fwd`).

    Returns ``out [Tq, Hq, D]`` (q's dtype) and ``lse [Tq, Hq]`` (q's dtype);
    rows that see no key give ``out = 0``, ``lse = -inf``.
    """
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    group = q.shape[1] // k.shape[1]
    outs, lses = [], []
    bq, bk = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    offsets = q_offset.tolist() if q_offset is not None else [0] * (len(bq) - 1)
    for i in range(len(bq) - 1):
        qs, ks, vs = q[bq[i]:bq[i + 1]], k[bk[i]:bk[i + 1]], v[bk[i]:bk[i + 1]]
        s = torch.einsum("mhd,nhd->hmn", qs, ks.repeat_interleave(group, 1)) * scale
        keep = dense_mask(qs.shape[0], ks.shape[0], causal, window, offsets[i], device=q.device)
        s = s.masked_fill(~keep, float("-inf"))
        lse = torch.logsumexp(s, -1)
        # softmax of an all -inf row is NaN: zero those rows (where(), not nan_to_num, keeps grads clean)
        p = torch.where(keep.any(-1, keepdim=True), torch.softmax(s, -1), torch.zeros_like(s))
        outs.append(torch.einsum("hmn,nhd->mhd", p, vs.repeat_interleave(group, 1)))
        lses.append(lse.transpose(0, 1))
    return torch.cat(outs), torch.cat(lses)


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_lens, causal: bool = True,
                        window: int | None = None, scale: float | None = None, return_lse: bool = False):
    """Exact attention of a whole packed sequence on one device (differentiable).

    Args:
        q: ``[S, Hq, D]``; k, v: ``[S, Hkv, D]`` with ``Hq % Hkv == 0``.
        doc_lens: document lengths summing to ``S``; documents never see each other.
        causal, window, scale: as in :func:`distattn.plan` / :func:`distattn.kernels.attn_fwd`.
        return_lse: also return ``lse [S, Hq]``.

    Returns ``out [S, Hq, D]`` (and ``lse``). Compute in fp64 for an oracle.
    """
    lens = as_doc_lens(doc_lens)
    window = check_window(window)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 3:
            raise ValueError(f"{name} must be [S, heads, head_dim], got shape {tuple(t.shape)}")
        if t.shape[0] != sum(lens):
            raise ValueError(f"doc_lens sum to {sum(lens)} but {name} has {t.shape[0]} tokens: "
                             f"doc_lens must describe the whole packed sequence")
    if k.shape != v.shape or q.shape[2] != k.shape[2] or q.shape[1] % k.shape[1]:
        raise ValueError(f"incompatible shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: "
                         f"need k == v shape, equal head_dim and q heads a multiple of k heads")
    cu = cu_seqlens(lens, q.device)
    out, lse = dense_attention(q, k, v, cu, cu, causal=causal, window=window, scale=scale)
    return (out, lse) if return_lse else out
