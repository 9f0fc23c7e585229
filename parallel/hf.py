"""HF transformers: ``attn_implementation="distattn"`` runs a model's attention context-parallel.

    import distattn
    from distattn.parallel import hf
    hf.register()
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="distattn")

    plan = distattn.plan(doc_lens, cp_group, scheduler="zigzag")
    inputs = hf.shard_inputs(plan, input_ids)          # this rank's tokens, per-document position ids, the plan
    logits = model(**inputs).logits                   # [1, S_local, vocab]
    loss = hf.causal_lm_loss(logits, plan, input_ids, group=cp_group)   # mean over the whole sequence

One packed sequence per call (batch size 1): the plan carries its document
boundaries, so documents never attend to each other and RoPE restarts at
every document (position ids from ``plan.position_ids()``). The loss helper
computes next-token cross-entropy on the full sequence's labels (never across
a document boundary) and averages over every rank's tokens. HF's own
``labels=`` would shift labels across shard and document boundaries and give a
wrong loss: under a distattn plan it is a ``ValueError`` pointing here.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..extras import require

require("transformers", "hf", "distattn.parallel.hf")

from ..api import attention

NAME = "distattn"


def attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, distattn_plan=None,
                      **kwargs):
    """The registered attention function: ``[1, H, S_local, D]`` in, ``([1, S_local, H, D], None)`` out."""
    if distattn_plan is None:
        raise ValueError("attn_implementation='distattn' needs distattn_plan=plan in the model call "
                         "(see distattn.parallel.hf.shard_inputs)")
    if query.shape[0] != 1:
        raise ValueError(f"attn_implementation='distattn' takes one packed sequence per call (batch 1), got batch "
                         f"{query.shape[0]}; pack the batch into one sequence with its doc_lens")
    if dropout:
        raise ValueError("attn_implementation='distattn' has no attention dropout; set attention_dropout=0")
    q, k, v = (t[0].transpose(0, 1).contiguous() for t in (query, key, value))
    return attention(q, k, v, distattn_plan, scale=scaling).unsqueeze(0), None


def _no_mask(*args, **kwargs):
    # document masks live in the plan; a dense mask would only cost memory
    return None


def _refusing_labels(loss_fn):
    """``loss_fn`` (one of transformers' ``LOSS_MAPPING``), refusing calls made under a distattn plan."""
    if getattr(loss_fn, "_distattn_guard", False):
        return loss_fn

    @functools.wraps(loss_fn)
    def guarded(*args, **kwargs):
        # the models pass their forward's kwargs (shard_inputs' distattn_plan among them) on to the loss
        if kwargs.get("distattn_plan") is not None:
            raise ValueError("labels= with a distattn plan gives a wrong loss: HF shifts labels inside this rank's "
                             "shard, across shard and document boundaries. Call the model without labels and use "
                             "distattn.parallel.hf.causal_lm_loss(logits, plan, input_ids, group=cp_group)")
        return loss_fn(*args, **kwargs)

    guarded._distattn_guard = True
    return guarded


def register() -> None:
    """Register ``"distattn"`` with transformers' attention (and mask) interfaces, and make the
    models' own losses refuse ``labels=`` under a distattn plan (see module docstring)."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.loss.loss_utils import LOSS_MAPPING

    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, _no_mask)
    for name, fn in LOSS_MAPPING.items():  # the models look their loss up here on every call
        LOSS_MAPPING[name] = _refusing_labels(fn)


def shard_inputs(plan, input_ids: torch.Tensor) -> dict:
    """Model kwargs for this rank: ``input_ids [1, S]`` (or ``[S]``) of the full packed sequence ->
    this rank's ``input_ids``/``position_ids`` ``[1, S_local]`` and the plan."""
    ids = input_ids.reshape(-1)
    return {"input_ids": plan.shard(ids)[None], "position_ids": plan.position_ids(ids.device)[None],
            "distattn_plan": plan}


def causal_lm_loss(logits: torch.Tensor, plan, input_ids: torch.Tensor, group=None) -> torch.Tensor:
    """Mean next-token cross-entropy over the whole packed sequence, from this rank's ``logits
    [1, S_local, V]``. Summing the gradients over the CP group gives the full gradient."""
    from ..masks import next_token_labels

    labels = plan.shard(next_token_labels(input_ids.reshape(-1), plan.doc_lens))
    loss_sum = F.cross_entropy(logits[0].float(), labels, ignore_index=-100, reduction="sum")
    count = (labels != -100).sum().to(loss_sum.dtype)
    if group is not None:
        dist.all_reduce(count, group=group)
    return loss_sum / count
