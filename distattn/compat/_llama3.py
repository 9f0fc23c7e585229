"""ring-flash-attention's llama3 family (the whole packed sequence split contiguously): the
``cu_seqlens`` preparation, the global documents behind a rank's view, and the attention call.
:mod:`~distattn.compat.ring_flash_attn` exports it and :mod:`~distattn.compat._hf` runs on it,
so it sits below both."""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.distributed as dist

from ..schedulers import spec
from ..runtime.varlen import doc_lens_of, resolve_group
from ._splits import _attention, _refuse

_prepared: OrderedDict = OrderedDict()   # what llama3_flash_attn_prepare_cu_seqlens saw: local view -> documents
_last_llama3: list = [None] * 6          # the tensors of the last call (per layer they repeat): no host sync


def _local_key(rank: int, world_size: int, cu_q, cu_k, local_k_slice: slice) -> tuple:
    return (rank, world_size, tuple(torch.as_tensor(cu_q).tolist()), tuple(torch.as_tensor(cu_k).tolist()),
            int(local_k_slice.start), int(local_k_slice.stop))


def llama3_flash_attn_prepare_cu_seqlens(cu_seqlens: torch.Tensor, causal: bool, rank: int, world_size: int):
    """ring-flash-attention's, unchanged: from the GLOBAL ``cu_seqlens``, this rank's
    ``(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, local_k_slice)`` for rank ``rank``
    holding tokens ``[rank L, (rank+1) L)``, ``L = S / world_size``. It also remembers the global
    documents, so :func:`llama3_flash_attn_varlen_func` needs no collective to find them."""
    total = int(cu_seqlens[-1])
    if total % world_size:
        raise ValueError(f"cu_seqlens[-1] = {total} tokens must be a multiple of world_size = {world_size} "
                         f"(llama3 splits the sequence into equal contiguous slices): pad the sequence")
    length = total // world_size
    left = int(torch.searchsorted(cu_seqlens, rank * length))
    right = int(torch.searchsorted(cu_seqlens, (rank + 1) * length))
    if int(cu_seqlens[left]) != rank * length:   # the slice starts inside document left - 1
        left -= 1
    cu_seqlens_q = cu_seqlens[left:right + 1].clone()
    cu_seqlens_q -= rank * length
    cu_seqlens_q[0], cu_seqlens_q[-1] = 0, length
    cu_seqlens_k = cu_seqlens[left:right + 1].clone()
    # causal: keys up to the slice's end; else the whole last document
    slice_right = (rank + 1) * length if causal else int(cu_seqlens[right])
    if causal:
        cu_seqlens_k[-1] = slice_right
    slice_left = int(cu_seqlens[left])
    cu_seqlens_k -= slice_left
    max_seqlen_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
    max_seqlen_k = int((cu_seqlens_k[1:] - cu_seqlens_k[:-1]).max())
    local_k_slice = slice(slice_left, slice_right)
    _prepared[_local_key(rank, world_size, cu_seqlens_q, cu_seqlens_k, local_k_slice)] = doc_lens_of(cu_seqlens)
    while len(_prepared) > 64:
        _prepared.popitem(last=False)
    return cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, local_k_slice


def _llama3_documents(q, cu_seqlens_q, cu_seqlens_k, local_k_slice, group) -> tuple[int, ...]:
    """The global document lengths behind this rank's llama3 view: remembered from
    :func:`llama3_flash_attn_prepare_cu_seqlens`, else rebuilt from every rank's document starts
    (one small all-gather: prepare with this module's function on every rank to skip it)."""
    last = _last_llama3
    if (last[0] is cu_seqlens_q and last[1] == getattr(cu_seqlens_q, "_version", None) and last[2] is cu_seqlens_k
            and last[3] == getattr(cu_seqlens_k, "_version", None) and last[4] == local_k_slice):
        return last[5]
    rank, p = dist.get_rank(group), dist.get_world_size(group)
    key = _local_key(rank, p, cu_seqlens_q, cu_seqlens_k, local_k_slice)
    lens = _prepared.get(key)
    if lens is None:
        # rank r sees every document start inside its slice, and where the document holding its first token starts
        length = q.shape[0]
        starts = [int(local_k_slice.start)] + [rank * length + s for s in key[2][1:-1]]
        gathered: list = [None] * p
        dist.all_gather_object(gathered, starts, group=group)
        bounds = sorted({0, length * p, *(s for part in gathered for s in part)})
        lens = tuple(b - a for a, b in zip(bounds, bounds[1:]))
    else:
        last[:] = [cu_seqlens_q, getattr(cu_seqlens_q, "_version", None), cu_seqlens_k,
                   getattr(cu_seqlens_k, "_version", None), local_k_slice, lens]
    return lens


def _llama3(q, k, v, cu_seqlens_q, cu_seqlens_k, heads_k_stride, local_k_slice, dropout_p, softmax_scale, causal,
            window_size, alibi_slopes, return_attn_probs, group, scheduler, backend, softcap=None):
    _refuse(dropout_p, alibi_slopes)
    if isinstance(heads_k_stride, bool) or not isinstance(heads_k_stride, int) or heads_k_stride < 1 \
            or k.shape[1] % heads_k_stride:
        raise ValueError(f"heads_k_stride={heads_k_stride!r} must be a positive int dividing the {k.shape[1]} "
                         f"KV heads (KV heads per all-gather)")
    group = resolve_group(group)
    lens = _llama3_documents(q, cu_seqlens_q, cu_seqlens_k, local_k_slice, group)
    options = {"heads_per_step": heads_k_stride} if "heads_per_step" in spec(scheduler).option_names() \
        else None
    out = _attention(q, k, v, lens, "llama3", group, scheduler=scheduler, causal=causal, window_size=window_size,
                     softmax_scale=softmax_scale, return_lse=return_attn_probs, backend=backend, softcap=softcap,
                     options=options)
    return (*out, None) if return_attn_probs else out


def llama3_flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, heads_k_stride,
                                  local_k_slice, dropout_p=0.0, softmax_scale=None, causal=False,
                                  window_size=(-1, -1), alibi_slopes=None, deterministic=False,
                                  return_attn_probs=False, group=None, *, scheduler: str = "allgather",
                                  backend: str = "auto"):
    """q ``[L, Hq, D]``, k/v ``[L, Hkv, D]``: tokens ``[rank L, (rank+1) L)`` of the packed
    sequence; the next five arguments from :func:`llama3_flash_attn_prepare_cu_seqlens`.
    -> ``[L, Hq, D]``."""
    return _llama3(q, k, v, cu_seqlens_q, cu_seqlens_k, heads_k_stride, local_k_slice, dropout_p, softmax_scale,
                   causal, window_size, alibi_slopes, return_attn_probs, group, scheduler, backend)

