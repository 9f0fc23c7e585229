"""A Llama-style decoder whose attention is ``distattn.attention``.

RMSNorm, rotary embeddings at each token's position *inside its document*
(``plan.position_ids()``), grouped-query attention, SwiGLU, tied or untied
embeddings. Inputs are this rank's token shard ``[S_local]``; the plan says
which tokens those are, so every scheduler is a config choice.

Optional: learnable attention sinks (``model.attention_sinks``: one ``[n_heads]`` logit
vector per layer, ``Block.sinks``, initialised to 0 as in gpt-oss) and attention logit
soft-capping (``model.softcap``, Gemma 2). The sinks are an ordinary replicated parameter:
DDP and FSDP2 reduce their gradient over the dp x cp mesh like every other one, which is what
makes it exact (each rank's ``distattn.attention`` returns its share: see its docstring), and
checkpoints save them with the rest of the model.

Activation checkpointing (``checkpointing=``, per block, non-reentrant
``torch.utils.checkpoint``):

* ``"full"``: a block keeps only its input; backward reruns the whole block,
  distributed attention (and its communication) included.
* ``"offload"``: ``"full"`` with the kept inputs in host memory, copied out on a side stream and
  prefetched one block ahead in backward (:mod:`.offload`).
* ``"selective"``: a block keeps its input and what attention itself saves
  (q, k, v, out, lse); backward reruns the norms, projections, RoPE and MLP but
  not attention. Megatron's "selective" does the opposite (recomputes
  attention, whose softmax is the big activation without flash attention);
  here attention already saves only O(tokens) and is the one part of the block
  that communicates, so it is the part worth keeping.

Nano-batches (``parallel.nano_batches``; :meth:`Transformer.forward` given a :class:`.batch.LocalBatch`
of several): the local tokens of each nano-batch run through the blocks' pieces -- ``Block.pre``
(norm, QKV projection, RoPE), the attention stages, ``Block.post`` (output projection, MLP) -- in
:func:`distattn.planning.program.layer_order` (:func:`distattn.runtime.pingpong.run_layers`), so that one nano-batch's
attention transfers hide behind the other's compute. ``selective`` checkpoints each piece; ``full`` and
``offload`` rerun a block whole in backward, so there each block runs both nano-batches, interleaved
inside it, under one checkpoint (keeping the block's inputs only, as without nano-batches). Under FSDP2
a block's pieces share one all-gather a pass and one reduce-scatter, as without nano-batches
(:class:`GatherOnce`).

Precision: RMSNorm and the loss's softmax run in fp32 whatever the compute
dtype; attention runs with autocast off (its kernels accumulate in fp32 and
merge in fp32 on their own; autocast would push their fp32 steps to bf16).
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from ...runtime.api import attention
from ...sim.memory_model import NORM_CHUNK
from ...runtime.pingpong import run_layers
from ...planning.program import layer_order
from ..config import ModelConfig
from .batch import LocalBatch
from .fsdp_once import GatherOnce
from .loss import chunked_cross_entropy
from .offload import Offload
from .tiled import swiglu


class _RMSNormFn(torch.autograd.Function):
    """``(x * rsqrt(mean(x^2) + eps))`` in fp32, cast to ``x``'s dtype, times ``weight``; keeps only
    ``x`` (the residual stream, which is alive anyway) and the fp32 ``rsqrt [S, 1]``: autograd
    through the same ops would keep an fp32 copy of ``x`` and the normalised ``x`` besides, 2.5x
    the input's bytes in bf16. The backward runs :data:`NORM_CHUNK` rows at a time: it comes right
    after attention's, when a block's backward holds the most."""

    @staticmethod
    def forward(ctx, x, weight, eps: float):
        # bf16 has too few mantissa bits for a mean of squares over thousands of features: fp32 at least
        x32 = x.to(torch.promote_types(x.dtype, torch.float32))
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return (x32 * rstd).to(x.dtype) * weight

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        d = x.shape[-1]
        x_SD, dy_SD, rstd_S1 = x.reshape(-1, d), dy.reshape(-1, d), rstd.reshape(-1, 1)
        dx = torch.empty_like(x_SD)
        dw = torch.zeros(d, dtype=rstd.dtype, device=x.device)
        for lo in range(0, x_SD.shape[0], NORM_CHUNK):
            rows = slice(lo, lo + NORM_CHUNK)
            xhat = x_SD[rows].to(rstd.dtype) * rstd_S1[rows]
            dw += (dy_SD[rows] * xhat.to(x.dtype)).sum(0)
            g = (dy_SD[rows] * weight).to(rstd.dtype)
            mean = torch.matmul(g.unsqueeze(-2), xhat.unsqueeze(-1)).squeeze(-1) / d   # mean(g * xhat)
            dx[rows] = g.sub_(xhat.mul_(mean)).mul_(rstd_S1[rows])
        return dx.view_as(x), dw.to(weight.dtype), None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return _RMSNormFn.apply(x, self.weight, self.eps)


def rotary(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate pairs of ``x [S, H, D]`` by angles ``pos * theta^(-2i/D)`` (positions per token), the
    angles in fp32 at least (fp64 for an fp64 model: its RoPE is then as exact as the rest)."""
    d, dtype = x.shape[-1], torch.promote_types(x.dtype, torch.float32)
    freqs = theta ** (-torch.arange(0, d, 2, device=x.device, dtype=dtype) / d)
    angles = pos.to(dtype)[:, None] * freqs[None, :]               # [S, D/2]
    cos, sin = angles.cos()[:, None, :].to(x.dtype), angles.sin()[:, None, :].to(x.dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)


class Compiled:
    """``torch.compile(fn, fullgraph=True)``, traced -- first call, checkpointing's recompute, any
    recompile -- with dynamo capturing ops whose output sizes it cannot know: ``cad``'s worker
    buffers change size with the documents (:mod:`distattn.runtime.ops`)."""

    def __init__(self, fn):
        self.fn = torch.compile(fn, fullgraph=True)

    def __call__(self, *args, **kwargs):
        with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
            return self.fn(*args, **kwargs)


class Block(nn.Module):
    # what nano-batches call apart from ``forward``: under FSDP2 each must be a forward method
    # (``register_fsdp_forward_method``), whose hooks gather the parameters and reduce the gradients
    FORWARD_METHODS = ("pre", "post", "interleaved")

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        hd = cfg.dim // cfg.n_heads
        self.attn_norm = RMSNorm(cfg.dim)
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * hd, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * hd, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * hd, bias=False)
        self.wo = nn.Linear(cfg.n_heads * hd, cfg.dim, bias=False)
        self.mlp_norm = RMSNorm(cfg.dim)
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.w2 = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)
        self.sinks = nn.Parameter(torch.zeros(cfg.n_heads)) if cfg.attention_sinks else None
        self.compiled: dict = {}   # method name -> its torch.compile'd self (compile_parts); empty: eager

    def compile_parts(self) -> None:
        """``torch.compile`` what the block runs -- ``plain``, and for selective checkpointing ``qkv``
        and ``out_and_mlp`` -- each a whole graph (``fullgraph``: a graph break is an error; attention
        is a custom op: :mod:`distattn.runtime.ops`). Checkpointing and offload stay eager around them, so
        every ``checkpointing`` mode runs compiled."""
        self.compiled = {name: Compiled(getattr(self, name)) for name in ("plain", "qkv", "out_and_mlp")}

    def _run(self, name: str):
        return self.compiled.get(name) or getattr(self, name)

    def qkv(self, x, pos):
        """``x [S, dim]`` -> q ``[S, H, hd]``, k, v ``[S, H_kv, hd]`` (RoPE applied to q and k)."""
        cfg = self.cfg
        s, hd = x.shape[0], cfg.dim // cfg.n_heads
        h = self.attn_norm(x)
        q = rotary(self.wq(h).view(s, cfg.n_heads, hd), pos, cfg.rope_theta)
        k = rotary(self.wk(h).view(s, cfg.n_kv_heads, hd), pos, cfg.rope_theta)
        v = self.wv(h).view(s, cfg.n_kv_heads, hd)
        return q.contiguous(), k.contiguous(), v.contiguous()

    def attend(self, q, k, v, plan):
        with torch.autocast(q.device.type, enabled=False):
            return attention(q, k, v, plan, sinks=self.sinks, softcap=self.cfg.softcap)

    def out_and_mlp(self, x, a, mlp_chunk: int = 0):
        """Residual stream after attention output ``a [S, H, hd]`` and the MLP (``mlp_chunk`` tokens
        at a time: :mod:`.tiled`)."""
        x = x + self.wo(a.flatten(1))
        return x + swiglu(self.mlp_norm(x), self.w1.weight, self.w3.weight, self.w2.weight, mlp_chunk)

    def plain(self, x, pos, plan, mlp_chunk: int = 0):
        return self.out_and_mlp(x, self.attend(*self.qkv(x, pos), plan), mlp_chunk)

    def forward(self, x, pos, plan, checkpointing: str = "none", mlp_chunk: int = 0, offload: Offload | None = None):
        """The block on ``x [S_local, dim]`` at positions ``pos [S_local]``, attention planned by ``plan``."""
        plain = self._run("plain")
        if checkpointing == "offload":
            # the checkpoint saves its inputs under these hooks (its own hooks cover the block's inside)
            with (offload or Offload(x.device)).hooks():
                return checkpoint(plain, x, pos, plan, mlp_chunk, use_reentrant=False)
        if checkpointing == "full":
            return checkpoint(plain, x, pos, plan, mlp_chunk, use_reentrant=False)
        if checkpointing == "selective":
            return self._post(x, self.attend(*self._pre(x, pos, checkpointing), plan), checkpointing, mlp_chunk)
        return plain(x, pos, plan, mlp_chunk)

    def interleaved(self, xs, poss, plans, checkpointing: str, mlp_chunk: int = 0,
                    offload: Offload | None = None) -> list:
        """Nano-batches (``xs``, ``poss``, ``plans``: one each) through this block, ping-ponged inside it,
        rerun whole in backward: how ``full``/``offload`` run nano-batches (:meth:`Transformer.forward`;
        under FSDP2 a forward method of its own, which gathers the parameters)."""
        assert checkpointing in ("full", "offload"), checkpointing
        pieces = Pieces(self, poss, "none", mlp_chunk, direct=True)

        def layer(*xs):
            return run_layers([pieces], xs, plans, layer_order(1, len(xs), across_layers=False))
        with (offload or Offload(xs[0].device)).hooks() if checkpointing == "offload" else nullcontext():
            return checkpoint(layer, *xs, use_reentrant=False)

    def _pre(self, x, pos, checkpointing: str):
        """``qkv`` (``selective``: recomputed in backward)."""
        if checkpointing == "selective":
            return checkpoint(self._run("qkv"), x, pos, use_reentrant=False)
        return self._run("qkv")(x, pos)

    def _post(self, x, a, checkpointing: str, mlp_chunk: int):
        """``out_and_mlp`` (``selective``: recomputed in backward)."""
        if checkpointing == "selective":
            return checkpoint(self._run("out_and_mlp"), x, a, mlp_chunk, use_reentrant=False)
        return self._run("out_and_mlp")(x, a, mlp_chunk)

    # the pieces around attention when nano-batches interleave across blocks (distattn.runtime.pingpong): under
    # FSDP2 each is a forward method of its own (the trainer registers them), all of a block's sharing one
    # gather (GatherOnce)
    def pre(self, x, pos, checkpointing: str = "none"):
        """``_pre`` and the attention's keyword arguments: the sinks a copy, made while FSDP2 has
        gathered them (their gradient flows back through the copy)."""
        return (*self._pre(x, pos, checkpointing),
                {"sinks": None if self.sinks is None else self.sinks.clone(), "softcap": self.cfg.softcap})

    def post(self, x, a, checkpointing: str = "none", mlp_chunk: int = 0):
        return self._post(x, a, checkpointing, mlp_chunk)


class Pieces:
    """A :class:`Block` as :func:`distattn.runtime.pingpong.run_layers` runs it: nano-batch ``n`` at positions
    ``pos[n]``. ``direct``: inside the block's own forward (its parameters already gathered), the
    pieces themselves; else its ``pre``/``post`` forward methods (``once``: under FSDP2, told of each:
    :class:`GatherOnce`)."""

    def __init__(self, block: Block, pos, checkpointing: str, mlp_chunk: int, direct: bool = False,
                 once: GatherOnce | None = None):
        self.block, self.pos, self.checkpointing = block, pos, checkpointing
        self.mlp_chunk, self.direct, self.once = mlp_chunk, direct, once

    def pre(self, x, n):
        if self.direct:
            block = self.block
            args = {"sinks": block.sinks, "softcap": block.cfg.softcap}
            return (*block._pre(x, self.pos[n], self.checkpointing), args)
        if self.once is None:
            return self.block.pre(x, self.pos[n], self.checkpointing)
        out = self.block.pre(self.once.first(x), self.pos[n], self.checkpointing)
        self.once.ran()
        return out

    def post(self, x, a, n):
        if self.direct:
            return self.block._post(x, a, self.checkpointing, self.mlp_chunk)
        x = self.block.post(x, a, self.checkpointing, self.mlp_chunk)
        if self.once is not None:
            self.once.ran()
        return x


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim)
        self.head = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.gathers: list[GatherOnce | None] = []   # FSDP2: the last nano-batch forward's, a block each
        self.reset_parameters()

    def reset_parameters(self):
        std = 0.02
        for name, p in self.named_parameters():
            if p.dim() == 2:
                # residual projections scaled down with depth (GPT-2 / Llama practice)
                scale = 1 / math.sqrt(2 * self.cfg.n_layers) if name.endswith(("wo.weight", "w2.weight")) else 1.0
                nn.init.normal_(p, std=std * scale)

    def compile_blocks(self) -> None:
        """Compile every block (:meth:`Block.compile_parts`); the embedding and the chunked loss stay eager."""
        for layer in self.layers:
            layer.compile_parts()

    def _nano_batches(self, xs, batch, checkpointing: str, mlp_chunk: int, offload) -> list:
        """The blocks on nano-batches (``xs``: their residual streams, ``batch``'s plans and positions):
        interleaved across the blocks (:func:`distattn.runtime.pingpong.run_layers`), or, where a block is
        rerun whole in backward (``full``, ``offload``), a block at a time, the nano-batches
        interleaved inside it."""
        if checkpointing in ("full", "offload"):
            for layer in self.layers:
                xs = layer.interleaved(xs, batch.pos, batch.plans, checkpointing, mlp_chunk, offload)
            return list(xs)
        from torch.distributed.fsdp import FSDPModule

        # FSDP2: each block gathered once for its pieces (a pre and a post per nano-batch)
        self.gathers = [GatherOnce(layer, 2 * len(xs)) if isinstance(layer, FSDPModule) else None
                        for layer in self.layers]
        return run_layers([Pieces(layer, batch.pos, checkpointing, mlp_chunk, once=once)
                           for layer, once in zip(self.layers, self.gathers)], xs, batch.plans)

    def _restore_fsdp_settings(self) -> None:
        """Every block's FSDP2 settings back to its own (:class:`GatherOnce`), where the last nano-batch
        forward's backward has not (none ran, or an error stopped it or the forward)."""
        for once in self.gathers:
            if once is not None:
                once.restore()
        self.gathers = []

    @property
    def output_weight(self) -> torch.Tensor:
        """``[vocab, dim]``: the tied embedding or the untied head."""
        return self.embed.weight if self.head is None else self.head.weight

    def forward(self, batch: LocalBatch, *, checkpointing: str = "none", loss_chunk: int = 2048, mlp_chunk: int = 0,
                compute_dtype: torch.dtype | None = None) -> torch.Tensor:
        """This rank's ``batch`` (:class:`.batch.LocalBatch`: one or more nano-batches) -> logits
        ``[S_local, vocab]`` (the nano-batches' tokens one after the other); with ``batch.labels`` the
        summed cross-entropy instead (an fp32 scalar), computed ``loss_chunk`` tokens at a time so the
        full logits never exist (``compute_dtype``: the projection's dtype). ``mlp_chunk`` > 0: each
        MLP runs that many tokens at a time (:mod:`.tiled`). Several nano-batches run interleaved
        (module docstring)."""
        self._restore_fsdp_settings()
        offload = Offload(batch.tokens[0].device) if checkpointing == "offload" else None   # one prefetch chain
        xs = [self.embed(tokens) for tokens in batch.tokens]
        if len(batch) > 1:
            xs = self._nano_batches(xs, batch, checkpointing, mlp_chunk, offload)
        else:
            for layer in self.layers:
                xs = [layer(xs[0], batch.pos[0], batch.plans[0], checkpointing, mlp_chunk, offload)]
        x = self.norm(torch.cat(xs) if len(xs) > 1 else xs[0])
        if batch.labels is None:
            return x @ self.output_weight.t()
        labels = torch.cat(batch.labels) if len(batch) > 1 else batch.labels[0]
        with torch.autocast(x.device.type, enabled=False):  # the loss casts explicitly (compute_dtype)
            return chunked_cross_entropy(x, self.output_weight, labels, chunk=loss_chunk,
                                         compute_dtype=compute_dtype)
