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
``stripe_flash_attn_func``               tokens ``r, r+P, r+2P, ...`` of every row       rank ``r``'s block of
                                                                                        the ranks' order
=======================================  =============================================  =====================

Stripe plans the sequence in the ranks' order, each block against each a band (causal with the diagonal
for key rank <= query rank, without it above): one kernel call per (query rank, key rank, row), not a
segment per token (:mod:`distattn.planning.strided`, which ``distattn.plan`` applies to any strided layout;
``python -m distattn.bench.stripe`` times it beside ``ring_flash_attn_func``).

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
(:mod:`distattn.runtime.varlen`), so the layers of a step plan once.
"""

from __future__ import annotations

import inspect
from typing import Callable

import torch.distributed as dist

from ..runtime.varlen import doc_lens_of, resolve_group
from ._hf import substitute_hf_flash_attn, update_ring_flash_attn_params, use_ring_attn
from ._llama3 import llama3_flash_attn_prepare_cu_seqlens, llama3_flash_attn_varlen_func
from ._splits import _attention, _even, _refuse

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
