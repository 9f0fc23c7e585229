"""ring-flash-attention's public API (``pip install ring-flash-attn``, v0.1.x) on distattn plans.

Switching is one import::

    # from ring_flash_attn import zigzag_ring_flash_attn_varlen_func, substitute_hf_flash_attn, ...
    from distattn.compat.ring_flash_attn import zigzag_ring_flash_attn_varlen_func, substitute_hf_flash_attn, ...

Same names, signatures, defaults, return values and sharding conventions as ring-flash-attention;
every function also takes keyword-only ``scheduler=`` (any distattn scheduler; default the one
its name says: ``ring_*``/``stripe_*`` -> ``"ring"``, ``zigzag_*`` -> ``"zigzag"``, ``llama3_*`` ->
``"allgather"``) and ``backend=`` (:func:`distattn.plan`'s). Each rank passes the tokens
ring-flash-attention's own tests give it (``P`` ranks in ``group``, ``group=None``: the default group):

=======================================  =============================================  =====================
function                                 rank ``r`` holds                               distattn layout
=======================================  =============================================  =====================
``ring_flash_attn_varlen_func``          chunk ``r`` of every document cut into ``P``    ``from_indices``
``zigzag_ring_flash_attn_varlen_func``   chunks ``r``, ``2P-1-r`` of every document      ``"document"``
                                         cut into ``2P``
``llama3_flash_attn_varlen_func``        tokens ``[r S/P, (r+1) S/P)`` of the sequence   ``"contiguous"``
``ring_flash_attn_func``                 chunk ``r`` of every batch row cut into ``P``   ``from_indices``
``zigzag_ring_flash_attn_func``          chunks ``r``, ``2P-1-r`` of every row (``2P``)  ``"document"``
``stripe_flash_attn_func``               tokens ``r, r+P, r+2P, ...`` of every row       ``from_indices``
=======================================  =============================================  =====================

The ring and zigzag varlen functions take this rank's ``cu_seqlens`` (the global ones divided by
``P``: every document a multiple of ``P``, or of ``2P`` for zigzag), the llama3 one the values
:func:`llama3_flash_attn_prepare_cu_seqlens` made from the global ones. The batch functions take
``[B, S_local, H, D]`` and treat the ``B`` rows as ``B`` documents of ``S_local * P`` tokens.

Where distattn does more: ``causal=False`` and ``window_size`` work in every function (exactly; the
originals assert causal for zigzag/stripe and document no windows), results merge in fp32 (or fp64),
GQA works everywhere. Not supported: ``dropout_p > 0`` and ``alibi_slopes`` (``ValueError``);
``deterministic`` is accepted and has no effect; ``heads_k_stride`` becomes the ``allgather``
scheduler's ``heads_per_step`` (KV heads per all-gather) and is ignored by the others.
``return_attn_probs=True`` returns ``(out, softmax_lse, None)`` like the originals, ``softmax_lse``
``[H, T_local]`` (varlen) or ``[B, H, S_local]`` (batch), fp32 (fp64 for fp64 inputs), with the
``ring``/``zigzag``/``allgather`` schedulers. Plans are cached per documents and options
(:mod:`distattn.varlen`), so the layers of a step plan once.
"""

from __future__ import annotations

import inspect
from collections import OrderedDict
from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.distributed as dist

from ..layout import Layout
from ..schedulers import spec
from ..varlen import attend, doc_lens_of, plan_for, resolve_group
from ._hf import substitute_hf_flash_attn, update_ring_flash_attn_params, use_ring_attn

__all__ = [
    "ring_flash_attn_varlen_func", "ring_flash_attn_varlen_kvpacked_func", "ring_flash_attn_varlen_qkvpacked_func",
    "zigzag_ring_flash_attn_varlen_func", "zigzag_ring_flash_attn_varlen_kvpacked_func",
    "zigzag_ring_flash_attn_varlen_qkvpacked_func",
    "llama3_flash_attn_prepare_cu_seqlens", "llama3_flash_attn_varlen_func", "llama3_flash_attn_varlen_kvpacked_func",
    "llama3_flash_attn_varlen_qkvpacked_func",
    "ring_flash_attn_func", "ring_flash_attn_kvpacked_func", "ring_flash_attn_qkvpacked_func",
    "zigzag_ring_flash_attn_func", "zigzag_ring_flash_attn_kvpacked_func", "zigzag_ring_flash_attn_qkvpacked_func",
    "stripe_flash_attn_func", "stripe_flash_attn_kvpacked_func", "stripe_flash_attn_qkvpacked_func",
    "substitute_hf_flash_attn", "update_ring_flash_attn_params", "use_ring_attn",
]


# --- ring-flash-attention's splits as distattn layouts ----------------------------------------------

def _per_document(lens: tuple[int, ...], p: int, pick: Callable[[int, int], np.ndarray]) -> Layout:
    """Rank ``r`` holds ``pick(r, n)`` (offsets inside a document of ``n`` tokens) of every
    document, documents in order."""
    starts = np.cumsum(lens) - np.asarray(lens)
    return Layout.from_indices([np.concatenate([s + pick(r, n) for s, n in zip(starts.tolist(), lens)])
                                for r in range(p)])


class Split(NamedTuple):
    """How a family of functions holds the tokens: its distattn layout for ``(doc_lens, P)``, and
    whether it halves each rank's share of a document (zigzag: local lengths must be even)."""

    layout: Callable[[tuple[int, ...], int], str | Layout]
    halves: bool = False


SPLITS: dict[str, Split] = {
    "ring": Split(lambda lens, p: _per_document(lens, p, lambda r, n: np.arange(r * n // p, (r + 1) * n // p))),
    "stripe": Split(lambda lens, p: _per_document(lens, p, lambda r, n: np.arange(r, n, p))),
    "zigzag": Split(lambda lens, p: "document", halves=True),
    "llama3": Split(lambda lens, p: "contiguous"),
}


def _refuse(dropout_p, alibi_slopes) -> None:
    if dropout_p:
        raise ValueError(f"dropout_p={dropout_p!r}: distattn has no attention dropout; pass dropout_p=0.0")
    if alibi_slopes is not None:
        raise ValueError("alibi_slopes is not supported by distattn's kernels; pass alibi_slopes=None")


def _attention(q, k, v, lens: tuple[int, ...], split: str, group, *, scheduler: str, causal: bool, window_size,
               softmax_scale, return_lse: bool, backend: str, softcap: float | None = None, options=None):
    """This rank's attention over documents ``lens`` held the ``split`` way."""
    group = resolve_group(group)
    p = dist.get_world_size(group)
    plan = plan_for(lens, group, scheduler=scheduler, layout_key=(split, p),
                    layout=lambda: SPLITS[split].layout(lens, p), causal=causal, window_size=window_size,
                    backend=backend, options=options)
    return attend(q, k, v, plan, softmax_scale, softcap, return_lse)


def _even(split: str, name: str, lens, what: str, p: int) -> None:
    bad = [n for n in lens if n % 2] if SPLITS[split].halves else []
    if bad:
        raise ValueError(f"{name}: zigzag cuts every {what} into 2 * world_size = {2 * p} chunks, so its local length "
                         f"must be even (global length a multiple of {2 * p}); got local length {bad[0]}: pad it")


# --- varlen ------------------------------------------------------------------------------------------

def _varlen(q, k, v, cu_seqlens, split, dropout_p, softmax_scale, causal, window_size, alibi_slopes,
            return_attn_probs, group, scheduler, backend):
    _refuse(dropout_p, alibi_slopes)
    p = dist.get_world_size(resolve_group(group))
    _even(split, "cu_seqlens", doc_lens_of(cu_seqlens), "document", p)
    out = _attention(q, k, v, doc_lens_of(cu_seqlens, scale=p), split, group, scheduler=scheduler, causal=causal,
                     window_size=window_size, softmax_scale=softmax_scale, return_lse=return_attn_probs,
                     backend=backend)
    return (*out, None) if return_attn_probs else out


def ring_flash_attn_varlen_func(q, k, v, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False,
                                window_size=(-1, -1), alibi_slopes=None, deterministic=False, return_attn_probs=False,
                                group=None, *, scheduler: str = "ring", backend: str = "auto"):
    """q ``[T_local, Hq, D]``, k/v ``[T_local, Hkv, D]``: chunk ``rank`` of each document cut into
    ``P`` equal chunks; ``cu_seqlens`` this rank's offsets (global ones // P). -> ``[T_local, Hq, D]``."""
    return _varlen(q, k, v, cu_seqlens, "ring", dropout_p, softmax_scale, causal, window_size, alibi_slopes,
                   return_attn_probs, group, scheduler, backend)


def zigzag_ring_flash_attn_varlen_func(q, k, v, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None,
                                       causal=False, window_size=(-1, -1), alibi_slopes=None, deterministic=False,
                                       return_attn_probs=False, group=None, *, scheduler: str = "zigzag",
                                       backend: str = "auto"):
    """q ``[T_local, Hq, D]``, k/v ``[T_local, Hkv, D]``: chunks ``rank`` and ``2P-1-rank`` of each
    document cut into ``2P``, in that order, document after document; ``cu_seqlens`` this rank's
    offsets (global ones // P, every local length even). -> ``[T_local, Hq, D]``."""
    return _varlen(q, k, v, cu_seqlens, "zigzag", dropout_p, softmax_scale, causal, window_size, alibi_slopes,
                   return_attn_probs, group, scheduler, backend)


# --- llama3: the whole sequence split contiguously ------------------------------------------------------

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


# --- batch ([B, S_local, H, D]) --------------------------------------------------------------------------

def _batch(q, k, v, split, dropout_p, softmax_scale, causal, window_size, alibi_slopes, return_attn_probs, group,
           scheduler, backend):
    _refuse(dropout_p, alibi_slopes)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4 or t.shape[:2] != q.shape[:2]:
            raise ValueError(f"{name} must be [batch, seqlen_local, heads, head_dim] with q's batch and seqlen "
                             f"{tuple(q.shape[:2])}, got {tuple(t.shape)}")
    b, n = q.shape[:2]
    p = dist.get_world_size(resolve_group(group))
    _even(split, "seqlen", (n,), "sequence", p)
    flat = [t.reshape(b * n, *t.shape[2:]) for t in (q, k, v)]
    res = _attention(*flat, (n * p,) * b, split, group, scheduler=scheduler, causal=causal, window_size=window_size,
                     softmax_scale=softmax_scale, return_lse=return_attn_probs, backend=backend)
    if not return_attn_probs:
        return res.reshape(b, n, *res.shape[1:])
    out, lse = res
    return out.reshape(b, n, *out.shape[1:]), lse.reshape(-1, b, n).transpose(0, 1).contiguous(), None


def ring_flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                         alibi_slopes=None, deterministic=False, return_attn_probs=False, group=None, *,
                         scheduler: str = "ring", backend: str = "auto"):
    """q ``[B, S_local, Hq, D]``, k/v ``[B, S_local, Hkv, D]``: chunk ``rank`` of each row cut into
    ``P``. -> ``[B, S_local, Hq, D]``."""
    return _batch(q, k, v, "ring", dropout_p, softmax_scale, causal, window_size, alibi_slopes, return_attn_probs,
                  group, scheduler, backend)


def zigzag_ring_flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                                alibi_slopes=None, deterministic=False, return_attn_probs=False, group=None, *,
                                scheduler: str = "zigzag", backend: str = "auto"):
    """q ``[B, S_local, Hq, D]``, k/v ``[B, S_local, Hkv, D]``: chunks ``rank`` and ``2P-1-rank`` of
    each row cut into ``2P`` (``S_local`` even). -> ``[B, S_local, Hq, D]``."""
    return _batch(q, k, v, "zigzag", dropout_p, softmax_scale, causal, window_size, alibi_slopes,
                  return_attn_probs, group, scheduler, backend)


def stripe_flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                           alibi_slopes=None, deterministic=False, return_attn_probs=False, group=None, *,
                           scheduler: str = "ring", backend: str = "auto"):
    """q ``[B, S_local, Hq, D]``, k/v ``[B, S_local, Hkv, D]``: tokens ``rank, rank + P, ...`` of
    each row. -> ``[B, S_local, Hq, D]``."""
    return _batch(q, k, v, "stripe", dropout_p, softmax_scale, causal, window_size, alibi_slopes,
                  return_attn_probs, group, scheduler, backend)


# --- the kvpacked / qkvpacked variants ----------------------------------------------------------------

def _packed(func: Callable, packed: str, dim: int) -> Callable:
    """``func`` taking ``kv`` (``packed="kv"``) or ``qkv`` stacked along ``dim`` (1 for varlen,
    2 for batch) in place of its leading tensors, with ring-flash-attention's signature."""
    params = list(inspect.signature(func).parameters.values())

    def variant(*args, **kwargs):
        bound = inspect.signature(variant).bind(*args, **kwargs)
        rest = dict(bound.arguments)
        if packed == "kv":
            tensors = (rest.pop("q"), *rest.pop("kv").unbind(dim)[:2])
        else:
            tensors = rest.pop("qkv").unbind(dim)[:3]
        return func(*tensors, **rest)

    lead = [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD)
            for name in (("q", "kv") if packed == "kv" else ("qkv",))]
    variant.__signature__ = inspect.Signature(lead + params[3:])
    variant.__name__ = variant.__qualname__ = func.__name__.replace("_func", f"_{packed}packed_func")
    variant.__doc__ = f"{func.__name__} with {'kv' if packed == 'kv' else 'q, k, v'} stacked along dim {dim}."
    return variant


ring_flash_attn_varlen_kvpacked_func = _packed(ring_flash_attn_varlen_func, "kv", 1)
ring_flash_attn_varlen_qkvpacked_func = _packed(ring_flash_attn_varlen_func, "qkv", 1)
zigzag_ring_flash_attn_varlen_kvpacked_func = _packed(zigzag_ring_flash_attn_varlen_func, "kv", 1)
zigzag_ring_flash_attn_varlen_qkvpacked_func = _packed(zigzag_ring_flash_attn_varlen_func, "qkv", 1)
llama3_flash_attn_varlen_kvpacked_func = _packed(llama3_flash_attn_varlen_func, "kv", 1)
llama3_flash_attn_varlen_qkvpacked_func = _packed(llama3_flash_attn_varlen_func, "qkv", 1)
ring_flash_attn_kvpacked_func = _packed(ring_flash_attn_func, "kv", 2)
ring_flash_attn_qkvpacked_func = _packed(ring_flash_attn_func, "qkv", 2)
zigzag_ring_flash_attn_kvpacked_func = _packed(zigzag_ring_flash_attn_func, "kv", 2)
zigzag_ring_flash_attn_qkvpacked_func = _packed(zigzag_ring_flash_attn_func, "qkv", 2)
stripe_flash_attn_kvpacked_func = _packed(stripe_flash_attn_func, "kv", 2)
stripe_flash_attn_qkvpacked_func = _packed(stripe_flash_attn_func, "qkv", 2)
