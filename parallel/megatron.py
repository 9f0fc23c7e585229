"""Megatron-core: ``DistAttnCoreAttention`` for the ``core_attention`` slot of a layer spec.

    from distattn.parallel.megatron import get_gpt_layer_spec
    model = GPTModel(config=cfg, transformer_layer_spec=get_gpt_layer_spec(), ...)

Megatron's own local attention refuses context parallelism without
TransformerEngine; this module runs it with any of our schedulers. The adapter
uses the layout Megatron split the batch with:

* ``sbhd``/``bshd`` (no ``packed_seq_params``, or ``qkv_format`` "sbhd"/"bshd"):
  the sequence cut into ``2 * cp`` chunks, rank ``r`` holding chunks ``r`` and
  ``2*cp - 1 - r`` (``get_batch_on_this_cp_rank``) -- ``scheduler="zigzag"``'s
  shard, ``layout="sequence"``. Each batch row is one sequence; with
  ``packed_seq_params`` (batch 1) its ``cu_seqlens_q`` marks documents that
  never see each other.
* ``thd`` (``packed_seq_params.qkv_format == "thd"``): *every document* cut into
  ``2 * cp`` chunks, rank ``r`` holding chunks ``r`` and ``2*cp - 1 - r`` of each
  (TransformerEngine's ``thd_get_partitioned_indices``, and what Megatron's THD
  RoPE assumes) -- ``layout="document"`` with ``zigzag`` (or ``allgather``).
  Documents are ``cu_seqlens_q_padded`` when given (each a multiple of
  ``2 * cp``, as Megatron pads them), else ``cu_seqlens_q``.

``attention_mask``: None (Megatron-core's default, and Megatron-LM's with
``--no-create-attention-mask-in-dataloader``), or a boolean mask (True = masked
out, Megatron's convention) equal to the layer's own causal (or, non-causal,
empty) mask for this rank's tokens over one sequence: ``[b, 1, s/cp, s]`` as
Megatron-LM's dataloader makes it (``[b, 1, s, s]``) and
``get_batch_on_this_cp_rank`` splits it (rows), or ``[b, 1, s, s]``. It is
compared once per forward (the same tensor reaches every layer). Anything else --
e.g. the document masks of ``--reset-attention-mask`` -- is a ``ValueError``:
describe documents with ``packed_seq_params`` instead, as a silent mismatch
would let tokens attend across documents.

The CP group comes from ``pg_collection.cp`` or, without one, from
``megatron.core.parallel_state``. Shapes: query ``[s/cp, b, Hq, D]`` (``thd``:
``[t/cp, Hq, D]``), key/value ``[s/cp, b, Hkv, D]``, output ``[s/cp, b, Hq * D]``.
"""

from __future__ import annotations

import weakref

import torch

from ..api import attention, plan as make_plan
from ..schedulers import supporting

THD_SCHEDULERS = supporting("document")  # the schedulers with a per-document layout

try:  # Megatron is optional: the module imports without it, the class needs it
    from megatron.core.transformer.module import MegatronModule
except ImportError:  # pragma: no cover - depends on the environment
    MegatronModule = torch.nn.Module


class DistAttnCoreAttention(MegatronModule):
    """Megatron ``core_attention`` running distattn (see module docstring)."""

    _checked_mask = None  # (weakref to the last attention_mask found valid, what it was checked against)

    def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str = "self",
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 cp_comm_type: str | None = None, pg_collection=None, scheduler: str = "zigzag"):
        super().__init__(config=config)
        if attention_type != "self":
            raise ValueError(f"DistAttnCoreAttention runs self-attention, got attention_type={attention_type!r}")
        if (attention_dropout if attention_dropout is not None else config.attention_dropout):
            raise ValueError("DistAttnCoreAttention has no attention dropout; set attention_dropout=0.0")
        if pg_collection is not None and getattr(pg_collection, "cp", None) is not None:
            self.cp_group = pg_collection.cp
        else:
            from megatron.core import parallel_state

            self.cp_group = parallel_state.get_context_parallel_group()
        self.causal = "causal" in str(attn_mask_type)
        self.scale = softmax_scale
        self.scheduler = scheduler
        self._plan_cache: dict = {}

    def _plan(self, doc_lens: tuple[int, ...], layout: str):
        key = (doc_lens, layout)
        if key not in self._plan_cache:  # the same layout every layer and, usually, every step
            if layout == "document" and self.scheduler not in THD_SCHEDULERS:
                raise ValueError(f"qkv_format='thd' splits every document over the CP ranks, which scheduler="
                                 f"{self.scheduler!r} does not run; use one of {THD_SCHEDULERS}")
            self._plan_cache = {key: make_plan(list(doc_lens), self.cp_group, scheduler=self.scheduler,
                                               causal=self.causal, layout=layout)}
        return self._plan_cache[key]

    def _check_mask(self, mask: torch.Tensor, plan, layout: str, s_local: int) -> None:
        """Accept ``mask`` only if it is what this layer computes anyway (see module docstring)."""
        # Megatron hands the same mask tensor to every layer: check it once per forward, not per layer
        # (inference tensors keep no version counter to tell an in-place change: always checked)
        version = None if mask.is_inference() else mask._version
        key = (plan.doc_lens, layout, plan.rank, plan.world_size, self.causal, s_local, version)
        last = DistAttnCoreAttention._checked_mask
        if version is not None and last is not None and last[0]() is mask and last[1] == key:
            return
        total = plan.total_tokens
        if mask.dim() != 4 or mask.shape[-1] != total or mask.shape[-2] not in (s_local, total):
            raise ValueError(f"attention_mask of shape {tuple(mask.shape)} is not [b, 1, {s_local} or {total}, "
                             f"{total}]; describe documents with packed_seq_params instead")
        keys = torch.arange(total, device=mask.device)
        rows = keys if mask.shape[-2] == total else plan.shard(keys)
        same = plan.doc_lens == (total,)
        step = max(1, (1 << 24) // total)  # compare a row block at a time: no second [rows, s] tensor
        for i in range(0, len(rows) if same else 0, step):
            r = rows[i:i + step]
            want = keys[None, :] > r[:, None] if self.causal else torch.zeros(len(r), total, dtype=torch.bool,
                                                                                 device=mask.device)
            same = bool((mask[..., i:i + step, :].bool() == want).all())
            if not same:
                break
        if plan.world_size > 1:  # every rank sees its own rows: all refuse together, none waits in attention
            verdict = torch.tensor([int(same)], device=mask.device)
            torch.distributed.all_reduce(verdict, op=torch.distributed.ReduceOp.MIN, group=self.cp_group)
            same = bool(verdict.item())
        if not same:
            raise ValueError("DistAttnCoreAttention honours attention_mask only when it is None or the layer's own "
                             f"{'causal' if self.causal else 'empty'} mask over one sequence; for documents "
                             "(e.g. --reset-attention-mask) pass packed_seq_params with cu_seqlens_q (qkv_format "
                             "'thd', or 'sbhd' with batch 1) and attention_mask=None")
        DistAttnCoreAttention._checked_mask = (weakref.ref(mask), key)

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if attention_bias is not None:
            raise ValueError("DistAttnCoreAttention does not take an attention_bias")
        if attn_mask_type is not None and ("causal" in str(attn_mask_type)) != self.causal:
            # the plans are built for the mask type the layer was made with; never run the other one silently
            raise ValueError(f"attn_mask_type={attn_mask_type} at forward disagrees with the layer's "
                             f"{'causal' if self.causal else 'non-causal'} mask type given at construction")
        if query.dim() == 3:  # packed "thd": [t, h, d], batch squeezed away by Megatron
            query, key, value = (t.unsqueeze(1) for t in (query, key, value))
        s_local, batch = query.shape[0], query.shape[1]
        cp = torch.distributed.get_world_size(self.cp_group)
        layout = "sequence"
        if packed_seq_params is not None:
            if batch != 1:
                raise ValueError("packed sequences (packed_seq_params) need batch size 1")
            thd = packed_seq_params.qkv_format == "thd"
            layout = "document" if thd else "sequence"
            cu = packed_seq_params.cu_seqlens_q_padded if thd and packed_seq_params.cu_seqlens_q_padded is not None \
                else packed_seq_params.cu_seqlens_q
            if thd and not self.causal and not torch.equal(cu.cpu(), packed_seq_params.cu_seqlens_q.cpu()):
                # padding at a document's end is invisible to its real tokens only under a causal mask
                raise ValueError("padded thd documents (cu_seqlens_q_padded) need a causal mask here")
            kv = packed_seq_params.cu_seqlens_kv_padded if thd and packed_seq_params.cu_seqlens_kv_padded is not None \
                else packed_seq_params.cu_seqlens_kv
            if kv is not None and not torch.equal(cu.cpu(), kv.cpu()):
                raise ValueError("packed_seq_params: self-attention needs the same documents for queries and keys "
                                 "(cu_seqlens_kv equal to cu_seqlens_q, and their _padded forms)")
            doc_lens = tuple(int(x) for x in torch.diff(cu.cpu()).tolist() if x > 0)
        else:
            doc_lens = (s_local * cp,)
        plan = self._plan(doc_lens, layout)  # thd: the core's ValueError names a document not a multiple of 2*cp
        if plan.num_local_tokens != s_local:
            how = ("each document split into 2*cp chunks as get_thd_batch_on_this_cp_rank does, with cu_seqlens "
                   "of the whole batch" if layout == "document" else "split batches with get_batch_on_this_cp_rank")
            raise ValueError(f"{s_local} local tokens do not match the {sum(doc_lens)}-token sequence split over "
                             f"{cp} CP ranks: {how}")
        if attention_mask is not None:
            self._check_mask(attention_mask, plan, layout, s_local)
        outs = [attention(query[:, i].contiguous(), key[:, i].contiguous(), value[:, i].contiguous(), plan,
                          scale=self.scale) for i in range(batch)]
        return torch.stack(outs, dim=1).reshape(s_local, batch, -1)


def get_gpt_layer_spec(**kwargs):
    """``get_gpt_layer_local_spec(**kwargs)`` with ``DistAttnCoreAttention`` as core attention."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    spec = get_gpt_layer_local_spec(**kwargs)
    spec.submodules.self_attention.submodules.core_attention = DistAttnCoreAttention
    return spec
