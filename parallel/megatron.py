"""Megatron-core: ``DistAttnCoreAttention`` for the ``core_attention`` slot of a layer spec.

    from distattn.parallel.megatron import get_gpt_layer_spec
    model = GPTModel(config=cfg, transformer_layer_spec=get_gpt_layer_spec(), ...)

Megatron's own local attention refuses context parallelism without
TransformerEngine; this module runs it with any of our schedulers. Layout: the
batch must be split the way ``get_batch_on_this_cp_rank`` splits it -- the
sequence cut into ``2 * cp`` chunks, rank ``r`` holding chunks ``r`` and
``2*cp - 1 - r`` -- which is exactly ``scheduler="zigzag"``'s shard (the
default). Each batch row is one sequence; with ``packed_seq_params``
(``cu_seqlens_q`` of the whole packed sequence, batch 1, ``qkv_format`` "sbhd"
or "thd") documents never see each other. (TransformerEngine's THD CP splits
each document zigzag instead; batches prepared for it need re-sharding.) The CP group comes from ``pg_collection.cp`` or, without one, from
``megatron.core.parallel_state``. Shapes: query ``[s/cp, b, Hq, D]``, key/value
``[s/cp, b, Hkv, D]``, output ``[s/cp, b, Hq * D]``.
"""

from __future__ import annotations

import torch

from ..api import attention, plan as make_plan

try:  # Megatron is optional: the module imports without it, the class needs it
    from megatron.core.transformer.module import MegatronModule
except ImportError:  # pragma: no cover - depends on the environment
    MegatronModule = torch.nn.Module


class DistAttnCoreAttention(MegatronModule):
    """Megatron ``core_attention`` running distattn (see module docstring)."""

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

    def _plan(self, doc_lens: tuple[int, ...]):
        if doc_lens not in self._plan_cache:  # the same layout every layer and, usually, every step
            self._plan_cache = {doc_lens: make_plan(list(doc_lens), self.cp_group, scheduler=self.scheduler,
                                                    causal=self.causal)}
        return self._plan_cache[doc_lens]

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if attention_bias is not None:
            raise ValueError("DistAttnCoreAttention does not take an attention_bias")
        if query.dim() == 3:  # packed "thd": [t, h, d], batch squeezed away by Megatron
            query, key, value = (t.unsqueeze(1) for t in (query, key, value))
        s_local, batch = query.shape[0], query.shape[1]
        cp = torch.distributed.get_world_size(self.cp_group)
        if packed_seq_params is not None:
            if batch != 1:
                raise ValueError("packed sequences (packed_seq_params) need batch size 1")
            doc_lens = tuple(int(x) for x in torch.diff(packed_seq_params.cu_seqlens_q.cpu()).tolist() if x > 0)
        else:
            doc_lens = (s_local * cp,)
        plan = self._plan(doc_lens)
        if plan.num_local_tokens != s_local:
            raise ValueError(f"{s_local} local tokens do not match the {sum(doc_lens)}-token sequence split over "
                             f"{cp} CP ranks: split batches with get_batch_on_this_cp_rank")
        outs = [attention(query[:, i].contiguous(), key[:, i].contiguous(), value[:, i].contiguous(), plan,
                          scale=self.scale) for i in range(batch)]
        return torch.stack(outs, dim=1).reshape(s_local, batch, -1)


def get_gpt_layer_spec(**kwargs):
    """``get_gpt_layer_local_spec(**kwargs)`` with ``DistAttnCoreAttention`` as core attention."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    spec = get_gpt_layer_local_spec(**kwargs)
    spec.submodules.self_attention.submodules.core_attention = DistAttnCoreAttention
    return spec
