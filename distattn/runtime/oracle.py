"""Single-device dense attention built on torch autograd: the oracle for every test.

Independent of the kernels' hand-written backward (and of :mod:`distattn.kernels.merge`):
gradients come from autograd through plain ``einsum``/``logsumexp``, soft-capping
is ``c * tanh(s / c)`` on the scores, attention sinks are an extra score column
(value 0) in each row's softmax, so computing in fp64 gives a trustworthy
reference for out, lse, dq, dk, dv and d sinks.
"""

from __future__ import annotations

import torch

from ..kernels.registry import check_scale
from ..planning.masks import as_doc_lens, check_window, cu_seqlens, dense_mask


def _attend(q, k, v, keep, scale, softcap, sinks):
    """One segment: ``q [m, Hq, D]``, ``k, v [n, Hkv, D]``, ``keep [m, n]`` bool -> out ``[m, Hq, D]``,
    lse ``[m, Hq]`` (differentiable in every input, ``sinks`` included)."""
    group = q.shape[1] // k.shape[1]
    s = torch.einsum("mhd,nhd->hmn", q, k.repeat_interleave(group, 1)) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~keep, float("-inf"))
    vr = v.repeat_interleave(group, 1)
    if sinks is not None:
        # one more key per head: score sinks[h], value 0; softmax over it, then drop its column
        col = sinks.to(s.dtype).view(-1, 1, 1).expand(s.shape[0], s.shape[1], 1)
        s = torch.cat([s, col], -1)
        lse = torch.logsumexp(s, -1)
        p = torch.softmax(s, -1)[..., :-1]
    else:
        lse = torch.logsumexp(s, -1)
        # softmax of an all -inf row is NaN: zero those rows (where(), not nan_to_num, keeps grads clean)
        p = torch.where(keep.any(-1, keepdim=True), torch.softmax(s, -1), torch.zeros_like(s))
    return torch.einsum("hmn,nhd->mhd", p, vr), lse.transpose(0, 1)


def _check_sinks(sinks, q):
    if sinks is not None and (not isinstance(sinks, torch.Tensor) or sinks.shape != (q.shape[1],)
                              or not sinks.dtype.is_floating_point):
        raise ValueError(f"sinks must be a floating-point tensor [Hq] = [{q.shape[1]}], got "
                         f"{tuple(sinks.shape) if isinstance(sinks, torch.Tensor) else type(sinks).__name__}")


def _check_softcap(softcap):
    if softcap is not None and (isinstance(softcap, bool) or not isinstance(softcap, (int, float))
                                or not softcap > 0 or softcap == float("inf")):
        raise ValueError(f"softcap must be a positive finite float or None, got {softcap!r}")


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                    cu_seqlens_k: torch.Tensor, causal: bool = True, window: int | None = None,
                    scale: float | None = None, q_offset: torch.Tensor | None = None,
                    softcap: float | None = None, sinks: torch.Tensor | None = None,
                    mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable varlen attention with the kernels' semantics (bottom-right causal,
    ``q_offset``, ``softcap`` and ``sinks`` as in :func:`distattn.kernels.attn_fwd`).

    ``mask``: optional bool ``[Tq, Tk]`` (True = attend) used instead of the segments' geometry
    (``causal``, ``window``, ``q_offset``); pairs across segments stay invisible.

    Returns ``out [Tq, Hq, D]`` (q's dtype) and ``lse [Tq, Hq]`` (q's dtype; the sinks counted
    in it); rows that see no key give ``out = 0``, ``lse = -inf`` (``lse = sinks[h]`` with sinks).
    """
    _check_sinks(sinks, q)
    _check_softcap(softcap)
    if mask is not None and (mask.shape != (q.shape[0], k.shape[0]) or mask.dtype != torch.bool):
        raise ValueError(f"mask must be a bool tensor [Tq, Tk] = [{q.shape[0]}, {k.shape[0]}], got "
                         f"{tuple(mask.shape)} {mask.dtype}")
    scale = check_scale(scale, q.shape[-1])
    outs, lses = [], []
    bq, bk = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    offsets = q_offset.tolist() if q_offset is not None else [0] * (len(bq) - 1)
    for i in range(len(bq) - 1):
        qs, ks, vs = q[bq[i]:bq[i + 1]], k[bk[i]:bk[i + 1]], v[bk[i]:bk[i + 1]]
        if mask is not None:
            keep = mask[bq[i]:bq[i + 1], bk[i]:bk[i + 1]].to(q.device)
        else:
            keep = dense_mask(qs.shape[0], ks.shape[0], causal, window, offsets[i], device=q.device)
        out, lse = _attend(qs, ks, vs, keep, scale, softcap, sinks)
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses)


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_lens, causal: bool = True,
                        window: int | None = None, scale: float | None = None, return_lse: bool = False, *,
                        mask=None, sinks: torch.Tensor | None = None, softcap: float | None = None):
    """Exact attention of a whole packed sequence on one device (differentiable).

    Args:
        q: ``[S, Hq, D]``; k: ``[S, Hkv, D]``; v: ``[S, Hkv, Dv]`` (MLA: its own head dim), ``Hq % Hkv == 0``.
        doc_lens: document lengths summing to ``S``; documents never see each other. May be None
            when ``mask`` is given.
        causal, window, scale: as in :func:`distattn.plan` / :func:`distattn.kernels.attn_fwd`.
        return_lse: also return ``lse [S, Hq]`` (the sinks counted in it).
        mask: an object with ``.dense(total, device) -> bool [S, S]`` (True = attend), e.g. a
            :class:`distattn.SliceMask`; used instead of the documents' (causal, window) mask.
        sinks: ``[Hq]`` logits of attention sinks (a key with value 0 in every row's softmax).
        softcap: ``c > 0``: scores ``s`` become ``c * tanh(s / c)`` before masking.

    Returns ``out [S, Hq, Dv]`` (v's head dim; and ``lse``). Compute in fp64 for an oracle; every input,
    ``sinks`` included, gets gradients through autograd.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 3:
            raise ValueError(f"{name} must be [S, heads, head_dim], got shape {tuple(t.shape)}")
    if mask is None or doc_lens is not None:
        lens = as_doc_lens(doc_lens)
        for name, t in (("q", q), ("k", k), ("v", v)):
            if t.shape[0] != sum(lens):
                raise ValueError(f"doc_lens sum to {sum(lens)} but {name} has {t.shape[0]} tokens: "
                                 f"doc_lens must describe the whole packed sequence")
    if not (q.shape[0] == k.shape[0] == v.shape[0]):
        raise ValueError(f"q, k, v must have the same number of tokens, got {q.shape[0]}, {k.shape[0]}, {v.shape[0]}")
    window = check_window(window)
    if k.shape[1] != v.shape[1] or q.shape[2] != k.shape[2] or q.shape[1] % k.shape[1]:
        raise ValueError(f"incompatible shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: "
                         f"need k and v heads equal, q and k head_dim equal (v may have its own) and q heads a "
                         f"multiple of k heads")
    total = q.shape[0]
    if mask is not None:
        if not hasattr(mask, "dense"):
            raise ValueError(f"mask must have a .dense(total, device) method (e.g. distattn.SliceMask), "
                             f"got {type(mask).__name__}")
        keep = mask.dense(total, q.device)
        if not isinstance(keep, torch.Tensor) or keep.shape != (total, total) or keep.dtype != torch.bool:
            raise ValueError(f"mask.dense({total}, device) must return a bool tensor [{total}, {total}]")
        cu = cu_seqlens([total], q.device)
        out, lse = dense_attention(q, k, v, cu, cu, scale=scale, softcap=softcap, sinks=sinks, mask=keep)
    else:
        cu = cu_seqlens(lens, q.device)
        out, lse = dense_attention(q, k, v, cu, cu, causal=causal, window=window, scale=scale, softcap=softcap,
                                   sinks=sinks)
    return (out, lse) if return_lse else out
