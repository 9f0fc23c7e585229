"""HF transformers: ``attn_implementation="distattn"`` runs a model's attention context-parallel.

    import distattn
    from distattn.parallel import hf
    hf.register()
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="distattn")

    plan = distattn.plan(doc_lens, cp_group, scheduler="zigzag")
    inputs = hf.shard_inputs(plan, input_ids)          # this rank's tokens, per-document position ids, the plan
    logits = model(**inputs).logits                   # [1, S_local, vocab]
    loss = hf.causal_lm_loss(logits, plan, input_ids, group=cp_group)   # mean over the whole sequence

One packed sequence per call (batch 1), or a batch of ``B`` rows under a batched
plan (``distattn.plan([[docs of row 0], [docs of row 1], ...], group)``; ``input_ids
[B, S]``; one attention call for all rows). The plan carries its document
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

from ..runtime.api import attention

NAME = "distattn"


def attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, distattn_plan=None,
                      **kwargs):
    """The registered attention function: ``[B, H, S_local, D]`` in, ``([B, S_local, H, D], None)`` out
    (``B`` 1 under a plan of one packed sequence, the plan's rows under a batched plan)."""
    if distattn_plan is None:
        raise ValueError("attn_implementation='distattn' needs distattn_plan=plan in the model call "
                         "(see distattn.parallel.hf.shard_inputs)")
    rows = distattn_plan.batch_size or 1
    if query.shape[0] != rows:
        raise ValueError(f"attn_implementation='distattn' got batch {query.shape[0]} under a plan of {rows} row(s); "
                         f"plan a batch with one doc_lens list per row: distattn.plan([[...], [...]], group)")
    if dropout:
        raise ValueError("attn_implementation='distattn' has no attention dropout; set attention_dropout=0")
    # [B, H, S, D] -> views [B, S, H, D]: no copy here (the engine copies once where it must)
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    if distattn_plan.batch_size is None:
        return attention(q[0], k[0], v[0], distattn_plan, scale=scaling).unsqueeze(0), None
    return attention(q, k, v, distattn_plan, scale=scaling), None


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


def _rows(plan, input_ids: torch.Tensor) -> torch.Tensor:
    """``input_ids`` as the plan takes it: ``[S]`` (one packed sequence), ``[B, S]`` (batched)."""
    if plan.batch_size is None:
        return input_ids.reshape(-1)
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, S] under a batched plan, got shape {tuple(input_ids.shape)}")
    return input_ids


def shard_inputs(plan, input_ids: torch.Tensor) -> dict:
    """Model kwargs for this rank: ``input_ids [1, S]`` (or ``[S]``) of the full packed sequence --
    or ``[B, S]`` under a batched plan -- -> this rank's ``input_ids``/``position_ids`` ``[B,
    S_local]`` (``B`` = 1 for one sequence) and the plan."""
    ids = _rows(plan, input_ids)
    local, pos = plan.shard(ids), plan.position_ids(ids.device)
    if plan.batch_size is None:
        local, pos = local[None], pos[None]
    return {"input_ids": local, "position_ids": pos, "distattn_plan": plan}


def causal_lm_loss(logits: torch.Tensor, plan, input_ids: torch.Tensor, group=None) -> torch.Tensor:
    """Mean next-token cross-entropy over the whole packed sequence (every row of a batched plan),
    from this rank's ``logits [B, S_local, V]``. Summing the gradients over the CP group gives the
    full gradient."""
    from ..planning.labels import next_token_labels

    ids = _rows(plan, input_ids)
    # a row ends a document, so labels never cross rows either
    labels = plan.shard(next_token_labels(ids.reshape(-1), plan.doc_lens).view(ids.shape))
    logits = logits.reshape(-1, logits.shape[-1])
    loss_sum = F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), labels.reshape(-1),
                               ignore_index=-100, reduction="sum")   # fp32 at least; fp64 stays fp64
    count = (labels != -100).sum().to(loss_sum.dtype)
    if group is not None:
        dist.all_reduce(count, group=group)
    return loss_sum / count
