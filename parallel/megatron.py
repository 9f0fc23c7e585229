"""Megatron-core: ``DistAttnCoreAttention`` for the ``core_attention`` slot of a layer spec.

    from distattn.parallel.megatron import get_gpt_layer_spec
    model = GPTModel(config=cfg, transformer_layer_spec=get_gpt_layer_spec(scheduler="cad", cad_pool="dp"), ...)
    spec = get_gpt_layer_spec(scheduler="cad", nano_batches=2)   # DistCA's ping-pong (cad's default)

Megatron's own local attention refuses context parallelism without
TransformerEngine; this module runs it with any of our schedulers
(``zigzag`` by default; ``ring``, ``allgather``, ``ulysses``, ``usp``, ``cad``),
always on the layout Megatron split the batch with (:mod:`distattn.planning.layout`), so
the tokens never move before attention and RoPE keeps Megatron's positions:

* ``sbhd``/``bshd`` (no ``packed_seq_params``, or ``qkv_format`` "sbhd"/"bshd"):
  the sequence cut into ``2 * cp`` chunks, rank ``r`` holding chunks ``r`` and
  ``2*cp - 1 - r`` (``get_batch_on_this_cp_rank``) -- ``layout="zigzag"``. Each
  batch row is one sequence, and a micro-batch of several rows is one batched plan
  and one attention call; with ``packed_seq_params`` (batch 1) its
  ``cu_seqlens_q`` marks documents that never see each other.
* ``thd`` (``packed_seq_params.qkv_format == "thd"``): *every document* cut into
  ``2 * cp`` chunks, rank ``r`` holding chunks ``r`` and ``2*cp - 1 - r`` of each
  (TransformerEngine's ``thd_get_partitioned_indices``, and what Megatron's THD
  RoPE assumes) -- ``layout="document"``. Documents are ``cu_seqlens_q_padded``
  when given (each a multiple of ``2 * cp``, as Megatron pads them), else
  ``cu_seqlens_q``.

Tensor parallelism needs nothing: each TP rank attends over its own heads (``usp``
plans for the KV heads it holds). **CAD pooled over data parallelism** (DistCA):
``cad_pool="dp"`` balances the attention of every data-parallel replica of this
pipeline stage over all their ``dp x cp`` ranks -- Megatron's data-parallel group
with context parallelism (``pg_collection.dp_cp``, else ``parallel_state``), which
holds one TP rank and one pipeline stage, so each TP rank pools its own heads and
each stage pools with the same stage of the other replicas. Tokens stay where
Megatron put them; attention tasks cross replicas. Document lengths are exchanged
over that group once per batch (the first layer of the stage to see a new
``packed_seq_params``; without one, once per sequence length): every replica must
run the same number of microbatches with the same batch size, as Megatron's
schedules do. The layers of one spec share their plans (one per batch, not per
layer).

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

**Nano-batches** (``nano_batches``; default: the scheduler's, 2 for ``cad``): a packed batch of
several documents runs as two nano-batches whose pieces interleave across the layers, each one's
attention transfers hidden behind the other's linear layers (DistCA's ping-pong,
:mod:`distattn.runtime.pingpong`). The spec's layer is then :class:`~distattn.parallel.megatron_pingpong.PingPongLayer`
(Megatron's ``TransformerLayer``, the same submodules); its module docstring tells how, and what
it runs as one nano-batch or refuses.

**Multi-latent attention** (DeepSeek-V2/V3): ``get_gpt_layer_spec(multi_latent_attention=True)`` is
Megatron's local MLA spec (``MLASelfAttention``, with an ``MLATransformerConfig``) with this core
attention. MLA hands it query and key of head dim ``qk_head_dim + qk_pos_emb_head_dim`` (DeepSeek: 192)
and value of ``v_head_dim`` (128), unpadded, RoPE (``rope`` or ``yarn``) already applied on Megatron's
CP split, and its own softmax scale (YaRN's mscale included); every scheduler takes v with a head dim
of its own. Batches: sbhd without ``packed_seq_params``, or thd (Megatron-core 0.16's MLA itself fails
on sbhd with ``packed_seq_params``, in its RoPE). Nano-batches need ``SelfAttention``: an MLA layer
runs one (``nano_batches=2`` is refused).

The CP group comes from ``pg_collection.cp`` or, without one, from
``megatron.core.parallel_state``. Shapes: query ``[s/cp, b, Hq, D]`` (``thd``: ``[t/cp, Hq, D]``),
key ``[s/cp, b, Hkv, D]``, value ``[s/cp, b, Hkv, Dv]`` (``Dv = D`` but under MLA), output
``[s/cp, b, Hq * Dv]``.
"""

from __future__ import annotations

import weakref
from functools import cached_property

import torch

from ..extras import require

require("megatron.core", "megatron", "distattn.parallel.megatron")

from ..runtime.api import attention, plan as make_plan
from ..kernels.speed import device_gpu
from ..sim.memory_model import CAD_BACKWARDS
from ..runtime.plan_cache import PlanCache
from ..schedulers import NAMES, PlanContext, spec as scheduler_spec
from .megatron_shared import PLANS_KEPT

POOLS = (None, "dp")   # cad_pool: no pool, or Megatron's data-parallel group with context parallelism

try:  # Megatron is optional: the module imports without it, the class needs it
    from megatron.core.transformer.module import MegatronModule
except ImportError:  # pragma: no cover - depends on the environment
    MegatronModule = torch.nn.Module


class MicroBatchChoice:
    """The ``(scheduler, cp)`` of the next micro-batch, for a training loop that chooses per
    micro-batch (:func:`distattn.choose`); shared by the layers of one spec and set before each
    micro-batch's forward::

        choice = MicroBatchChoice()
        model = GPTModel(..., transformer_layer_spec=get_gpt_layer_spec(choice=choice))
        for doc_lens, batch in micro_batches:
            choice.set(*distattn.choose([doc_lens], cp, "llama3-8b", cps=[cp])[0])
            loss = forward_step(model, batch)

    Megatron's CP groups are made once, so ``cp`` must be the CP group's size (a ``ValueError`` at the
    next forward names both otherwise); the scheduler replaces the spec's until the next ``set``
    (``clear()``: the spec's again). Its backward runs with the plan its forward made."""

    def __init__(self):
        self.scheduler: str | None = None
        self.cp: int | None = None

    def set(self, scheduler: str, cp: int) -> None:
        check_scheduler(scheduler, None)
        if isinstance(cp, bool) or not isinstance(cp, int) or cp < 1:
            raise ValueError(f"cp={cp!r} must be a positive int, the CP group's size")
        self.scheduler, self.cp = scheduler, cp

    def clear(self) -> None:
        self.scheduler = self.cp = None


class DistAttnCoreAttention(MegatronModule):
    """Megatron ``core_attention`` running distattn (see module docstring): ``scheduler`` any of
    ``distattn.schedulers.NAMES``; ``cad_pool`` None, or ``"dp"`` with ``scheduler="cad"``;
    ``plans`` a :class:`~distattn.runtime.plan_cache.PlanCache` shared by the layers of one spec (default: the
    layer's own); ``choice``: a :class:`MicroBatchChoice` whose scheduler, when set, runs instead."""

    _checked_mask = None  # (weakref to the last attention_mask found valid, what it was checked against)

    def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str = "self",
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 cp_comm_type: str | None = None, pg_collection=None, scheduler: str = "zigzag",
                 cad_pool: str | None = None, plans: PlanCache | None = None, *, k_channels: int | None = None,
                 v_channels: int | None = None, choice: MicroBatchChoice | None = None,
                 cad_backward: str | None = None):
        super().__init__(config=config)
        check_scheduler(scheduler, cad_pool, cad_backward)
        self.cad_backward = cad_backward
        # MLA (MLASelfAttention) names the head dims of query/key and of value, which differ
        self.k_channels, self.v_channels = k_channels, v_channels
        if attention_type != "self":
            raise ValueError(f"DistAttnCoreAttention runs self-attention, got attention_type={attention_type!r}")
        if (attention_dropout if attention_dropout is not None else config.attention_dropout):
            raise ValueError("DistAttnCoreAttention has no attention dropout; set attention_dropout=0.0")
        from megatron.core import parallel_state

        if pg_collection is not None and getattr(pg_collection, "cp", None) is not None:
            self.cp_group = pg_collection.cp
        else:
            self.cp_group = parallel_state.get_context_parallel_group()
        self.pool = None
        if cad_pool == "dp":
            self.pool = getattr(pg_collection, "dp_cp", None) if pg_collection is not None else None
            if self.pool is None:
                self.pool = parallel_state.get_data_parallel_group(with_context_parallel=True)
        self.causal = "causal" in str(attn_mask_type)
        self.scale = softmax_scale
        self.scheduler, self.choice = scheduler, choice
        self.plans = plans if plans is not None else PlanCache(PLANS_KEPT)

    @cached_property
    def gpu(self) -> str | None:
        """This rank's GPU by name (:func:`distattn.kernels.speed.device_gpu`); None on CPU or a GPU
        distattn does not know (plans then balance an H100's kernel)."""
        return device_gpu(torch.cuda.current_device()) if torch.cuda.is_available() else None

    def _scheduler(self) -> str:
        """The spec's scheduler, or the micro-batch's choice (checked against the CP group)."""
        if self.choice is None or self.choice.scheduler is None:
            return self.scheduler
        cp = torch.distributed.get_world_size(self.cp_group)
        if self.choice.cp != cp:
            raise ValueError(f"MicroBatchChoice: cp={self.choice.cp}, but Megatron's CP group has {cp} ranks; "
                             f"choose with cps=[{cp}] (distattn.choose)")
        if self.pool is not None and not scheduler_spec(self.choice.scheduler).pools:
            raise ValueError(f"MicroBatchChoice: scheduler={self.choice.scheduler!r} cannot run under cad_pool='dp'")
        return self.choice.scheduler

    def plan(self, doc_lens: tuple[int, ...], layout, kv_heads: int, batch, name=None):
        """The plan of documents ``doc_lens`` on ``layout`` (a name, or a :class:`~distattn.Layout`
        that ``name`` identifies in the cache: a nano-batch's) for ``kv_heads`` KV heads; pooled plans
        made anew for every ``batch`` (:mod:`distattn.runtime.plan_cache`)."""
        # the planner derives its options (usp: its degree) from this TP rank's heads
        options = {"context": PlanContext(num_kv_heads=kv_heads)}
        if self.pool is not None:
            options["pool"] = self.pool
        scheduler = self._scheduler()
        taken = scheduler_spec(scheduler).option_names()
        if self.cad_backward is not None and "backward" in taken:
            options["backward"] = self.cad_backward
        if "gpu" in taken and self.gpu is not None:   # cad balances its kernel's seconds on this GPU
            options["gpu"] = self.gpu

        def make():
            return make_plan(list(doc_lens), self.cp_group, scheduler=scheduler, causal=self.causal,
                             layout=layout, **options)
        key = (name if name is not None else (doc_lens, layout), self.causal, kv_heads, id(self.cp_group),
               id(self.pool), scheduler, options.get("backward"))
        return self.plans.get(key, make, batch if self.pool is not None else None, keep=(self.cp_group, self.pool))

    def _check_mask(self, mask: torch.Tensor, plan, layout: str, s_local: int) -> None:
        """Accept ``mask`` only if it is what this layer computes anyway (see module docstring)."""
        # Megatron hands the same mask tensor to every layer: check it once per forward, not per layer
        # (inference tensors keep no version counter to tell an in-place change: always checked)
        version = None if mask.is_inference() else mask._version
        key = (plan.doc_lens, layout, plan.rank, plan.world_size, self.causal, s_local, version)
        last = DistAttnCoreAttention._checked_mask
        if version is not None and last is not None and last[0]() is mask and last[1] == key:
            return
        total = plan.seq_len   # one row's tokens
        if mask.dim() != 4 or mask.shape[-1] != total or mask.shape[-2] not in (s_local, total):
            raise ValueError(f"attention_mask of shape {tuple(mask.shape)} is not [b, 1, {s_local} or {total}, "
                             f"{total}]; describe documents with packed_seq_params instead")
        keys = torch.arange(total, device=mask.device)
        if mask.shape[-2] == total:
            rows = keys
        else:  # a batched plan cuts every row alike: the first row's local positions are every row's
            rows = plan.shard(keys) if plan.batch_size is None else plan.shard(keys.expand(plan.batch_size, total))[0]
        same = set(plan.doc_lens) == {total}
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

    def documents(self, packed_seq_params, s_local: int, batch: int) -> tuple[tuple, str]:
        """``(doc_lens, layout)`` of a batch of ``batch`` rows of ``s_local`` local tokens: its
        documents (without ``packed_seq_params``, one per row: a batched plan's rows when ``batch >
        1``) and the layout Megatron split it with (module docstring); ``ValueError`` for packed
        sequences this layer cannot take."""
        if packed_seq_params is None:
            row = (s_local * torch.distributed.get_world_size(self.cp_group),)
            return (row if batch == 1 else (row,) * batch), "zigzag"
        if batch != 1:
            raise ValueError("packed sequences (packed_seq_params) need batch size 1")
        thd = packed_seq_params.qkv_format == "thd"
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
        # thd: get_thd_batch_on_this_cp_rank's per-document split; sbhd: get_batch_on_this_cp_rank's
        return tuple(int(x) for x in torch.diff(cu.cpu()).tolist() if x > 0), "document" if thd else "zigzag"

    def local_tokens_error(self, s_local: int, doc_lens, layout: str) -> str:
        """Why ``s_local`` local tokens cannot be this rank's share of documents ``doc_lens`` split
        over the CP group on ``layout``, and how Megatron splits them."""
        how = ("each document split into 2*cp chunks as get_thd_batch_on_this_cp_rank does, with cu_seqlens "
               "of the whole batch" if layout == "document" else "split batches with get_batch_on_this_cp_rank")
        return (f"{s_local} local tokens do not match the {sum(doc_lens)}-token sequence split over "
                f"{torch.distributed.get_world_size(self.cp_group)} CP ranks: {how}")

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if attention_bias is not None:
            raise ValueError("DistAttnCoreAttention does not take an attention_bias")
        if attn_mask_type is not None and ("causal" in str(attn_mask_type)) != self.causal:
            # the plans are built for the mask type the layer was made with; never run the other one silently
            raise ValueError(f"attn_mask_type={attn_mask_type} at forward disagrees with the layer's "
                             f"{'causal' if self.causal else 'non-causal'} mask type given at construction")
        if value is None:   # MLA's absorbed decoding (cache_mla_latents) hands latents, not values
            raise ValueError("DistAttnCoreAttention needs value; MLA's cache_mla_latents (absorbed inference) "
                             "is not supported")
        for name, t, want in (("k_channels", query, self.k_channels), ("k_channels", key, self.k_channels),
                              ("v_channels", value, self.v_channels)):
            if want is not None and t.shape[-1] != want:
                raise ValueError(f"{name}={want} given at construction, but a head dim of {t.shape[-1]} arrived "
                                 f"(query/key {query.shape[-1]}/{key.shape[-1]}, value {value.shape[-1]})")
        if query.dim() == 3:  # packed "thd": [t, h, d], batch squeezed away by Megatron
            query, key, value = (t.unsqueeze(1) for t in (query, key, value))
        s_local, batch = query.shape[0], query.shape[1]
        doc_lens, layout = self.documents(packed_seq_params, s_local, batch)
        # thd: the core's ValueError names a document not a multiple of 2*cp
        plan = self.plan(doc_lens, layout, key.shape[-2], packed_seq_params)
        if plan.num_local_tokens != s_local:
            raise ValueError(self.local_tokens_error(s_local, doc_lens if batch == 1 else doc_lens[0], layout))
        if attention_mask is not None:
            self._check_mask(attention_mask, plan, layout, s_local)
        if batch == 1:
            out = attention(query[:, 0], key[:, 0], value[:, 0], plan, scale=self.scale)
            return out.reshape(s_local, 1, -1)
        # [s, b, h, d] -> the batched plan's [b, s, h, d]: one call for every row
        out = attention(query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1), plan, scale=self.scale)
        return out.transpose(0, 1).reshape(s_local, batch, -1)


def check_scheduler(scheduler: str, cad_pool, cad_backward: str | None = None) -> None:
    """``ValueError`` unless ``scheduler`` is a distattn scheduler and ``cad_pool`` and ``cad_backward``
    ones it can take."""
    if scheduler not in NAMES:
        raise ValueError(f"scheduler={scheduler!r} is unknown; choose one of {list(NAMES)}")
    if cad_pool not in POOLS:
        raise ValueError(f"cad_pool={cad_pool!r} is unknown; choose None or 'dp' (Megatron's data-parallel group "
                         f"with context parallelism)")
    if cad_pool is not None and not scheduler_spec(scheduler).pools:
        pooling = [n for n in NAMES if scheduler_spec(n).pools]
        raise ValueError(f"cad_pool={cad_pool!r} balances attention over data-parallel replicas, which scheduler="
                         f"{scheduler!r} does not do; use scheduler={pooling[0]!r} or cad_pool=None")
    if cad_backward is not None:
        takes = [n for n in NAMES if "backward" in scheduler_spec(n).option_names()]
        if "backward" not in scheduler_spec(scheduler).option_names():
            raise ValueError(f"cad_backward={cad_backward!r} chooses what {' and '.join(takes)}'s attention servers "
                             f"keep for the backward; scheduler={scheduler!r} has none: drop cad_backward")
        if cad_backward not in CAD_BACKWARDS:
            raise ValueError(f"cad_backward={cad_backward!r} is unknown; choose one of {list(CAD_BACKWARDS)} or None "
                             f"(the default, 'resend')")


def get_gpt_layer_spec(scheduler: str = "zigzag", cad_pool: str | None = None, nano_batches: int | None = None,
                       choice: MicroBatchChoice | None = None, cad_backward: str | None = None, **kwargs):
    """``get_gpt_layer_local_spec(**kwargs)`` with ``DistAttnCoreAttention`` running ``scheduler`` as
    core attention (``cad_pool="dp"``: CAD balanced over every data-parallel replica of a stage; see
    module docstring). ``nano_batches``: 1, 2 (packed batches ping-ponged through the layers as two
    nano-batches: :mod:`distattn.parallel.megatron_pingpong`), or None, the scheduler's default (2 for
    ``cad``, where the layers can run it). The spec's layers share one
    :class:`~distattn.runtime.plan_cache.PlanCache`.

    ``multi_latent_attention=True`` (one of ``kwargs``): Megatron's local MLA layer
    (``MLASelfAttention``, for a model built with an ``MLATransformerConfig``) with this core
    attention; q/k and v head dims may differ (module docstring). Its layers run one nano-batch.

    ``choice``: a :class:`MicroBatchChoice` the training loop sets per micro-batch (its scheduler
    replaces ``scheduler`` while set). ``cad_backward``: with ``scheduler="cad"``, what its attention
    servers keep for the backward, ``"resend"`` (nothing received: the backward sends Q, K/V, out, lse
    and dout again; the default) or ``"keep"`` (``distattn.plan``'s ``backward``)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import ModuleSpec

    check_scheduler(scheduler, cad_pool, cad_backward)
    nano = scheduler_spec(scheduler).nano_batches_for(nano_batches)
    if kwargs.get("multi_latent_attention"):
        _mla_without_te()
    spec = get_gpt_layer_local_spec(**kwargs)
    spec.submodules.self_attention.submodules.core_attention = ModuleSpec(
        module=DistAttnCoreAttention,
        params={"scheduler": scheduler, "cad_pool": cad_pool, "plans": PlanCache(PLANS_KEPT), "choice": choice,
                "cad_backward": cad_backward})
    if nano == 2:
        from .megatron_pingpong import PingPongLayer, PingPongState

        spec.module = PingPongLayer
        spec.params = {**spec.params, "nano_batches": nano_batches, "state": PingPongState(PLANS_KEPT)}
    return spec


def _mla_without_te() -> None:
    """Let Megatron's MLA build on the local spec when TransformerEngine is missing: Megatron-core (0.16)
    then defines ``TELinear`` on a mock, which its MLA module's import of it does not notice (its
    ``HAVE_TE`` stays True), so ``MultiLatentAttention.__init__`` calls ``isinstance(linear_proj,
    TELinear)`` on a non-class -- a ``TypeError``. The flag is corrected only when it is that wrong."""
    from megatron.core.transformer import multi_latent_attention as mla

    if getattr(mla, "HAVE_TE", False) and not isinstance(getattr(mla, "TELinear", None), type):
        mla.HAVE_TE = False
