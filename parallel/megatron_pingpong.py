"""Megatron-core: DistCA's ping-pong inside Megatron's own ``TransformerBlock`` -- the layer of
``get_gpt_layer_spec(nano_batches=2)`` (:mod:`distattn.parallel.megatron`; ``cad``'s default).

A packed batch (``packed_seq_params``, batch 1; sbhd or thd) of several documents is cut into two
nano-batches of whole documents (:func:`distattn.runtime.pingpong.nano_batches`, the one with more attention
first: ``A``, then ``B``), each with its own plan, and their *pieces* -- ``pre`` (input layernorm, QKV
projection, RoPE), the attention stages ``dispatch``, ``compute``, ``finish``, ``post`` (output
projection, its bias-dropout-add, the MLP) -- run in :func:`distattn.planning.program.layer_order`'s
cross-layer order, so that each nano-batch's attention transfers hide behind the other's linear
layers; the backward runs the mirror order by itself (:mod:`distattn.runtime.pingpong`). Values and
gradients are those of one nano-batch.

**Inside Megatron's block.** ``GPTModel`` builds a plain ``TransformerBlock`` that calls its layers one
after the other with one hidden-states tensor ``[s_local, 1, hidden]``, so each
:class:`PingPongLayer` runs its own share of the order (the layer's local number, given by Megatron,
says which; ``get_num_layers_to_build`` says how many layers the block has)::

    layer L:  pre A(L), dispatch A(L), [finish B(L-1), post B(L-1)], pre B(L), dispatch B(L),
              compute A(L), compute B(L), finish A(L), post A(L)   [last layer: finish B(L), post B(L)]

B's attention is in flight from layer L into layer L+1, which also runs layer L's ``post`` for B:
the layers of one spec share a :class:`PingPongState` (the spec's params, like the plans) holding
that *carry* -- B's :class:`~distattn.runtime.pingpong.NanoBatch` and layer L's pieces -- between the two
forwards, never as a submodule (no parameter registered twice). The hidden states layer L returns
hold A's rows after layer L and B's rows *before* it (B's residual input of layer L, whose ``post``
runs in layer L+1); the first layer takes, and the last returns, the complete hidden states. Rows
are picked and put back with ``index_select`` (differentiable, exact).

**Tokens never move before attention.** The documents and the layout are the core attention's
(``cu_seqlens_q_padded`` or ``cu_seqlens_q``; ``"document"`` for thd, ``"zigzag"`` for sbhd), so every
CP rank knows every rank's tokens: a nano-batch is this rank's rows of its documents, and its plan's
layout (``Layout.from_indices``) every rank's tokens of it. With ``cad_pool="dp"`` the replicas first
agree (one MIN all-reduce over the pool, per batch) to cut only if every replica can -- a replica's
batch of one document makes everyone run one nano-batch -- since pooled plans are collectives (so
every replica passes ``packed_seq_params`` alike: all, or none). The cut (:class:`Split`) is cached
per batch as the plans are.

**Runs as one nano-batch** (Megatron's own ``TransformerLayer.forward``): batches without
``packed_seq_params`` (one sequence per row), batches of one document, inference (an
``inference_context``). **Refused** (``ValueError`` at construction with ``nano_batches=2``; with the
default ``nano_batches=None`` such a model runs one nano-batch): ``sequence_parallel`` (each TP rank
holds other rows between layers), ``recompute_granularity`` (Megatron reruns one layer alone, and a
layer's forward here runs pieces of its neighbour), ``fine_grained_activation_offloading``, CUDA
graphs (both act on one layer's forward), ``attention_output_gate``, multi-latent attention, MoE
(its load-balancing loss is over one call's tokens), a cross-attention, inference's fused TP
communication. At forward: an ``attention_mask`` or ``attention_bias`` with several packed documents
(describe documents with ``packed_seq_params`` only).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from ..extras import require

require("megatron.core", "megatron", "distattn.parallel.megatron")

from megatron.core.transformer.attention import (
    SelfAttention,
    _yarn_get_concentration_factor_from_config,
    apply_rotary_pos_emb,
)
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.transformer_block import get_num_layers_to_build
from megatron.core.transformer.transformer_layer import TransformerLayer
from megatron.core.utils import get_pg_rank

from ..planning.layout import Layout, token_index
from ..costmodel.model_shape import ModelShape
from ..runtime.pingpong import NanoBatch, all_ranks, nano_batches, run_piece
from ..runtime.plan_cache import PlanCache
from ..planning.program import layer_share
from .megatron_shared import PLANS_KEPT

# TransformerLayer.forward's arguments (it hands them to _forward_attention): bound by name, as the
# block passes them
_ARGUMENTS = inspect.signature(TransformerLayer._forward_attention)


@dataclass(frozen=True, eq=False)
class Split:
    """A packed batch as two nano-batches on this CP rank: ``parts`` ``(doc_lens, start, end)`` (heavier
    attention first), ``layouts`` each part's layout on the CP group (every rank's tokens of it,
    relative to ``start``, in local order), ``rows`` this rank's local rows of each (long tensors),
    ``back`` the permutation putting both parts' rows, concatenated, back in local order."""

    parts: tuple
    layouts: tuple[Layout, Layout]
    rows: tuple[torch.Tensor, torch.Tensor]
    back: torch.Tensor


def split_batch(tokens: list[np.ndarray], rank: int, doc_lens, weight: float, causal: bool, device) -> Split:
    """Documents ``doc_lens`` of which CP rank ``r`` holds global tokens ``tokens[r]`` (local order),
    cut into two nano-batches balancing tokens and ``weight`` per attention pair, as rank ``rank``
    sees them."""
    parts = nano_batches(doc_lens, 2, weight, causal)
    rows, layouts = [], []
    for _, start, end in parts:
        rows.append(np.flatnonzero((tokens[rank] >= start) & (tokens[rank] < end)))
        layouts.append(Layout.from_indices([t[(t >= start) & (t < end)] - start for t in tokens]))
    back = np.argsort(np.concatenate(rows), kind="stable")
    rows_t = tuple(torch.as_tensor(r, dtype=torch.long, device=device) for r in rows)
    return Split(tuple(parts), tuple(layouts), rows_t, torch.as_tensor(back, dtype=torch.long, device=device))


class PingPongState:
    """What the layers of one spec share: the cuts of the last ``kept`` batches (a :class:`PlanCache`
    of :class:`Split`, None for a batch run as one nano-batch) and, during a block's forward, the
    carry from one layer into the next (:class:`_Carry`)."""

    def __init__(self, kept: int = PLANS_KEPT):
        self.splits = PlanCache(kept)
        self.carry: _Carry | None = None


@dataclass
class _Carry:
    """Nano-batch B between the forwards of layer ``index`` and the next: its state (attention in
    flight), layer ``index``'s pieces (whose ``post`` it still needs), the cut, its plans and the
    batch (``packed_seq_params``) they belong to."""

    index: int
    pieces: _Pieces
    nano: NanoBatch
    split: Split
    plans: tuple
    batch: object


class _Pieces:
    """One layer's pieces around attention in one forward -- the :class:`distattn.runtime.pingpong.Layer` that
    :func:`~distattn.runtime.pingpong.run_piece` runs -- exactly as ``TransformerLayer``/``SelfAttention.forward``
    compute them, on the local rows ``split.rows[n]`` of nano-batch ``n``: ``x`` ``[rows, 1, hidden]``,
    q ``[rows, Hq, D]``, k/v ``[rows, Hkv, D]`` (this TP rank's heads)."""

    def __init__(self, layer: "PingPongLayer", split: Split, s_local: int, rotary_pos_emb, packed_seq_params):
        attention, config = layer.self_attention, layer.config
        if config.no_rope_freq and config.no_rope_freq[attention.layer_number - 1]:
            rotary_pos_emb = None   # the layers no_rope_freq names take no RoPE
        if rotary_pos_emb is not None and not isinstance(rotary_pos_emb, tuple):
            rotary_pos_emb = (rotary_pos_emb,) * 2   # one table for q, one for k
        p = packed_seq_params
        self.thd = p.qkv_format == "thd"
        # thd RoPE restarts at each (padded) document: its cu_seqlens
        self.cu = (p.cu_seqlens_q_padded if p.cu_seqlens_q_padded is not None else p.cu_seqlens_q,
                   p.cu_seqlens_kv_padded if p.cu_seqlens_kv_padded is not None else p.cu_seqlens_kv) \
            if self.thd else (None, None)
        self.layer, self.split, self.s_local, self.rotary = layer, split, s_local, rotary_pos_emb

    def pre(self, x, n):
        attention = self.layer.self_attention
        q, k, v = attention.get_query_key_value_tensors(self.layer.input_layernorm(x), None)   # [rows, 1, H, D]
        if self.thd:   # Megatron's thd RoPE and core attention take [t, H, D]
            q, k, v = q.squeeze(1), k.squeeze(1), v.squeeze(1)
        if self.rotary is not None:
            q, k = (t if freqs is None else self._rope(t, freqs, cu, self.split.rows[n])
                    for t, freqs, cu in zip((q, k), self.rotary, self.cu))
        q, k, v = (t.reshape(t.shape[0], -1, t.shape[-1]).contiguous() for t in (q, k, v))
        return q, k, v, {"scale": attention.core_attention.scale}

    def _rope(self, t, freqs, cu, rows):
        """Megatron's RoPE of the local ``rows``: it takes the whole local sequence (the zigzag chunks'
        positions; thd: every document's share), so the rows go into a zero tensor of its length and
        come back out -- exact, each row is rotated by its own position alone."""
        attention = self.layer.self_attention
        full = t.new_zeros((self.s_local, *t.shape[1:])).index_copy(0, rows, t)
        out = apply_rotary_pos_emb(full, freqs, config=self.layer.config, cu_seqlens=cu,
                                   mscale=_yarn_get_concentration_factor_from_config(self.layer.config),
                                   cp_group=attention.pg_collection.cp)
        return out.index_select(0, rows)

    def post(self, x, attn_out, n):
        layer = self.layer
        projected = layer.self_attention.linear_proj(attn_out.reshape(attn_out.shape[0], 1, -1))   # (out, bias)
        with layer.bias_dropout_add_exec_handler():
            x = layer.self_attn_bda(layer.training, layer.config.bias_dropout_fusion)(projected, x,
                                                                                       layer.hidden_dropout)
        # GPT's cross-attention, its layernorm and bias-dropout-add are identities (refused otherwise)
        return layer._forward_mlp(x)


class PingPongLayer(TransformerLayer):
    """Megatron's ``TransformerLayer`` (the same submodules and parameters) running packed batches as
    two nano-batches ping-ponged across the layers of its block (module docstring). ``nano_batches``:
    2 (refuse what cannot run so) or None (then such a model runs one nano-batch); ``state``: the
    :class:`PingPongState` shared by the layers of one spec."""

    def __init__(self, config, submodules, layer_number: int = 1, hidden_dropout=None, pg_collection=None,
                 vp_stage=None, nano_batches: int | None = None, state: PingPongState | None = None):
        super().__init__(config, submodules, layer_number, hidden_dropout, pg_collection, vp_stage)
        # the block builds this many layers from the spec, numbered 1.. (the local number given here)
        count = get_num_layers_to_build(config, vp_stage, get_pg_rank(self.pg_collection.pp))
        self._index, self._last = layer_number - 1, layer_number == count
        reason = self._unsupported(layer_number, count)
        if reason is not None and nano_batches == 2:
            raise ValueError(f"nano_batches=2 cannot run with {reason}; pass nano_batches=1 (or None: one "
                             f"nano-batch where it cannot run)")
        self._pingpong = reason is None
        self._pingpong_state = state if state is not None else PingPongState()
        if self._pingpong:
            self._share = layer_share(count, self._index)   # this layer's pieces, in order
            # where the cut balances linear and attention work: a layer's counts (no vocabulary in them)
            self._weight = ModelShape(config.hidden_size, config.num_layers, config.num_attention_heads,
                                      config.num_query_groups, config.ffn_hidden_size, vocab_size=0,
                                      head_dim=config.kv_channels,
                                      gated_mlp=bool(config.gated_linear_unit)).pair_weight()

    @property
    def nano_batches(self) -> int:
        """2 if this layer ping-pongs packed batches of several documents, else 1."""
        return 2 if self._pingpong else 1

    def _unsupported(self, layer_number: int, count: int) -> str | None:
        """What of this layer's configuration the nano-batches cannot run (module docstring), or None."""
        cfg = self.config
        reasons = [
            (cfg.sequence_parallel, "sequence_parallel=True (each TP rank holds other rows between layers)"),
            (cfg.recompute_granularity is not None,
             f"recompute_granularity={cfg.recompute_granularity!r} (Megatron recomputes one layer alone, and "
             f"a layer's forward here runs pieces of the layer before)"),
            (cfg.fine_grained_activation_offloading, "fine_grained_activation_offloading=True"),
            (cfg.enable_cuda_graph or cfg.cuda_graph_impl != "none",
             f"CUDA graphs (cuda_graph_impl={cfg.cuda_graph_impl!r}), which capture one layer's forward"),
            (cfg.inference_fuse_tp_communication, "inference_fuse_tp_communication=True"),
            (cfg.attention_output_gate, "attention_output_gate=True"),
            (not isinstance(self.self_attention, SelfAttention),
             f"{type(self.self_attention).__name__} (e.g. multi_latent_attention); it needs SelfAttention"),
            (self.is_moe_layer, "MoE (num_experts): its load-balancing loss is over the tokens of one call"),
            (not isinstance(self.cross_attention, IdentityOp), "a cross-attention"),
            (layer_number > count, f"layer {layer_number} of a block of {count} (get_num_layers_to_build)"),
        ]
        return next((why for bad, why in reasons if bad), None)

    def forward(self, *args, **kwargs):
        """``TransformerLayer.forward``: ``(hidden_states [s_local, b, hidden], context)``; with a packed
        batch cut in two, this layer's share of the cross-layer order (module docstring)."""
        if not self._pingpong:
            return super().forward(*args, **kwargs)
        given = {k: v for k, v in kwargs.items() if k != "dynamic_inference_decode_only"}   # (cudagraph's tag)
        bound = _ARGUMENTS.bind(self, *args, **given)
        bound.apply_defaults()
        a, state = bound.arguments, self._pingpong_state
        carry, state.carry = state.carry, None
        if self._index == 0:
            if carry is not None:
                raise RuntimeError(f"a forward of the block ended after layer {carry.index + 1} with nano-batch B "
                                   f"in flight: the layers of get_gpt_layer_spec(nano_batches=2) must run as one "
                                   f"TransformerBlock of get_num_layers_to_build layers")
            cut = self._cut(a)
            if cut is None:
                return super().forward(*args, **kwargs)
            split, plans = cut
        elif carry is None:   # the first layer ran this batch as one nano-batch
            return super().forward(*args, **kwargs)
        elif carry.index != self._index - 1 or carry.batch is not a["packed_seq_params"]:
            raise RuntimeError(f"layer {self._index + 1} got nano-batch B from layer {carry.index + 1} of another "
                               f"forward: the block's layers must run in order, each once per forward")
        else:
            split, plans = carry.split, carry.plans
        try:
            return self._run_share(a, split, plans, carry), a["context"]
        except BaseException:
            state.carry = None   # nothing in flight survives a failed forward
            raise

    def _run_share(self, a: dict, split: Split, plans, carry: _Carry | None) -> torch.Tensor:
        """This layer's pieces on hidden states ``h [s_local, 1, hidden]`` (A's rows: A's input of this
        layer; B's rows: B's input of the layer before, or of this one if it is the first); returns
        A's rows after this layer and B's rows before it (after it, if it is the last)."""
        h = a["hidden_states"]
        pieces = _Pieces(self, split, h.shape[0], a["rotary_pos_emb"], a["packed_seq_params"])
        layers = {self._index: pieces}
        b_rows = h.index_select(0, split.rows[1])
        if carry is None:
            nano_b = NanoBatch(b_rows)
        else:   # B's residual for the post of the layer before: the rows Megatron handed this layer
            nano_b, nano_b.x, layers[carry.index] = carry.nano, b_rows, carry.pieces
        nanos = (NanoBatch(h.index_select(0, split.rows[0])), nano_b)
        for piece, n, index in self._share:
            run_piece(piece, layers[index], plans[n], nanos[n], n)
        if not self._last:
            self._pingpong_state.carry = _Carry(self._index, pieces, nano_b, split, plans, a["packed_seq_params"])
        return torch.cat([nanos[0].x, nanos[1].x]).index_select(0, split.back)

    def _cut(self, a: dict):
        """``(Split, its two plans)`` of this batch, or None to run it as one nano-batch (module docstring)."""
        params, h = a["packed_seq_params"], a["hidden_states"]
        if params is None or a["inference_context"] is not None or a["inference_params"] is not None:
            return None
        core = self.self_attention.core_attention
        doc_lens, layout = core.documents(params, h.shape[0], h.shape[1])
        if len(doc_lens) > 1:
            for name in ("attention_mask", "attention_bias"):
                if a[name] is not None:
                    raise ValueError(f"{name} is not None with {len(doc_lens)} packed documents: nano-batches take "
                                     f"the documents from packed_seq_params alone; pass {name}=None")
        if len(doc_lens) < 2 and core.pool is None:
            return None
        cp, rank = dist.get_world_size(core.cp_group), dist.get_rank(core.cp_group)

        def make():
            # pooled plans are collectives: every replica plans as many nano-batches
            can = len(doc_lens) > 1 if core.pool is None else all_ranks(len(doc_lens) > 1, core.pool, h.device)
            if not can:
                return None
            shards = Layout(layout).shards(doc_lens, cp)   # thd: ValueError naming a document not a multiple of 2cp
            tokens = [token_index(shards.owned[r]) for r in range(cp)]
            if len(tokens[rank]) != h.shape[0]:
                raise ValueError(core.local_tokens_error(h.shape[0], doc_lens, layout))
            return split_batch(tokens, rank, doc_lens, self._weight, core.causal, h.device)
        key = (doc_lens, layout, cp, rank, h.shape[0], core.causal, self._weight, str(h.device), id(core.pool))
        split = self._pingpong_state.splits.get(key, make, params if core.pool is not None else None,
                                                keep=core.pool)
        if split is None:
            return None
        kv_heads = self.self_attention.num_query_groups_per_partition
        plans = tuple(core.plan(tuple(docs), layout_, kv_heads, params, name=(doc_lens, layout, start, end))
                      for (docs, start, end), layout_ in zip(split.parts, split.layouts))
        return split, plans
