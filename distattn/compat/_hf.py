"""ring-flash-attention's HF transformers adapter (``ring_flash_attn.adapters.hf_adapter``) on distattn.

    substitute_hf_flash_attn(group, heads_k_stride=1)     # once
    update_ring_flash_attn_params(cu_seqlens, group)      # every batch: the GLOBAL cu_seqlens
    model(input_ids=ids.chunk(P, dim=1)[rank], position_ids=pos.chunk(P, dim=1)[rank])

Like the original, it replaces transformers' ``_flash_attention_forward`` (for models that call
it directly) and the ``"flash_attention_2"`` entry of ``ALL_ATTENTION_FUNCTIONS`` (the attention
interface of transformers >= 4.48), so a model loaded with ``attn_implementation="flash_attention_2"``
runs :func:`~distattn.compat.ring_flash_attn.llama3_flash_attn_varlen_func` on the llama3 split
(rank ``r`` holds tokens ``[r S/P, (r+1) S/P)`` of the packed sequence, batch size 1, position ids
restarting at every document). ``use_ring_attn(False)`` switches back to transformers' own path.

Beyond the original: the model's ``sliding_window`` (as transformers' flash path reads it: a
query sees the ``sliding_window - 1`` keys before it), ``softcap`` and non-causal attention work;
q/k/v stay in the model's dtype (no cast to half precision: distattn's kernels run fp32 and fp64).
Refused with ``ValueError``: attention dropout, padding masks (pack instead) and attention sinks.
Without the ``flash_attn`` package (CPU), transformers will not load a model with
``attn_implementation="flash_attention_2"``; load it with ``"sdpa"`` and set
``model.config._attn_implementation = "flash_attention_2"`` after substituting.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..runtime.varlen import flash_softcap
from ._llama3 import _llama3, llama3_flash_attn_prepare_cu_seqlens

DATA_PARAMS: dict = {}
RING_ATTN_SWITCH = True
_SETTINGS: dict = {}


def update_ring_flash_attn_params(cu_seqlens: torch.Tensor, process_group) -> None:
    """This batch's GLOBAL ``cu_seqlens`` (``[0, l0, l0+l1, ..., S]``, the same on every rank)."""
    rank, world_size = dist.get_rank(group=process_group), dist.get_world_size(group=process_group)
    cu_q, cu_k, max_q, max_k, local_k_slice = llama3_flash_attn_prepare_cu_seqlens(cu_seqlens, True, rank, world_size)
    DATA_PARAMS.update(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q, max_seqlen_k=max_k,
                       local_k_slice=local_k_slice)


def use_ring_attn(flag: bool) -> None:
    """Switch the substituted path on (default) or back to transformers' own flash attention."""
    global RING_ATTN_SWITCH
    RING_ATTN_SWITCH = bool(flag)


def _ring_flash_attention_forward(query_states, key_states, value_states, attention_mask, query_length, is_causal,
                                  dropout=0.0, position_ids=None, softmax_scale=None, sliding_window=None,
                                  use_top_left_mask=False, softcap=None, deterministic=None, **kwargs):
    """transformers' ``_flash_attention_forward`` (``[1, S_local, H, D]`` in and out) on distattn."""
    if not DATA_PARAMS:
        raise ValueError("call update_ring_flash_attn_params(cu_seqlens, group) with the batch's global cu_seqlens "
                         "before the model's forward")
    if query_states.shape[0] != 1:
        raise ValueError(f"ring attention takes one packed sequence (batch size 1), got batch "
                         f"{query_states.shape[0]}: pack the batch and pass its cu_seqlens")
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError("a padding attention_mask is not supported: pack the documents without padding and pass "
                         "their cu_seqlens to update_ring_flash_attn_params")
    if kwargs.get("s_aux") is not None:
        raise ValueError("attention sinks (s_aux) are not supported by the ring-flash-attn adapter; use "
                         "distattn.attention(..., sinks=) through distattn.parallel.hf")
    causal = is_causal and not (use_top_left_mask and query_length == 1)
    # transformers' flash path: (sliding_window - 1, sliding_window - 1); under CP the local key
    # count says nothing about the document's length, so the window always applies
    window = (-1, -1) if sliding_window is None else (sliding_window - 1, sliding_window - 1)
    out = _llama3(query_states[0], key_states[0], value_states[0], DATA_PARAMS["cu_seqlens_q"],
                  DATA_PARAMS["cu_seqlens_k"], _SETTINGS["heads_k_stride"], DATA_PARAMS["local_k_slice"], dropout,
                  softmax_scale, causal, window, None, False, _SETTINGS["group"], _SETTINGS["scheduler"],
                  _SETTINGS["backend"], softcap=flash_softcap(softcap or 0.0))
    return out.unsqueeze(0)


def _flash_attention_forward_dispatch(*args, **kwargs):
    fn = _ring_flash_attention_forward if RING_ATTN_SWITCH else _SETTINGS["original"]
    return fn(*args, **kwargs)


def flash_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                            sliding_window=None, softcap=None, is_causal=None, **kwargs):
    """The ``"flash_attention_2"`` attention interface: ``[B, H, S, D]`` in, ``([B, S, H, D], None)``
    out, through ``transformers.modeling_flash_attention_utils._flash_attention_forward`` (looked up
    at call time: the substituted one)."""
    import transformers.modeling_flash_attention_utils as fa_utils

    if not RING_ATTN_SWITCH:
        return _SETTINGS["interface"](module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      sliding_window=sliding_window, softcap=softcap, is_causal=is_causal, **kwargs)
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    out = fa_utils._flash_attention_forward(
        q, k, v, attention_mask, query_length=q.shape[1],
        is_causal=module.is_causal if is_causal is None else is_causal,
        dropout=dropout, softmax_scale=scaling, sliding_window=sliding_window, softcap=softcap, **kwargs)
    return out, None


def substitute_hf_flash_attn(process_group, heads_k_stride: int, *, scheduler: str = "allgather",
                             backend: str = "auto") -> None:
    """Route transformers' flash attention 2 through distattn on ``process_group`` (see module
    docstring). ``heads_k_stride``: KV heads per all-gather (``allgather``'s ``heads_per_step``)."""
    from ..extras import require

    require("transformers", "hf", "substitute_hf_flash_attn")
    import transformers.modeling_flash_attention_utils as fa_utils
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if fa_utils._flash_attention_forward is not _flash_attention_forward_dispatch:   # a second call keeps
        _SETTINGS["original"] = fa_utils._flash_attention_forward                     # transformers' own
        _SETTINGS["interface"] = ALL_ATTENTION_FUNCTIONS["flash_attention_2"]
    _SETTINGS.update(group=process_group, heads_k_stride=heads_k_stride, scheduler=scheduler, backend=backend)
    fa_utils._flash_attention_forward = _flash_attention_forward_dispatch
    ALL_ATTENTION_FUNCTIONS["flash_attention_2"] = flash_attention_forward
