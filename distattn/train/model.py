"""A Llama-style decoder whose attention is ``distattn.attention``.

RMSNorm, rotary embeddings at each token's position *inside its document*
(``plan.position_ids()``), grouped-query attention, SwiGLU, tied or untied
embeddings. Inputs are this rank's token shard ``[S_local]``; the plan says
which tokens those are, so every scheduler is a config choice.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..api import attention
from .config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotary(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate pairs of ``x [S, H, D]`` by angles ``pos * theta^(-2i/D)`` (positions per token)."""
    d = x.shape[-1]
    freqs = theta ** (-torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)
    angles = pos.to(torch.float32)[:, None] * freqs[None, :]               # [S, D/2]
    cos, sin = angles.cos()[:, None, :].to(x.dtype), angles.sin()[:, None, :].to(x.dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)


class Block(nn.Module):
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

    def forward(self, x, pos, plan):
        cfg = self.cfg
        s, hd = x.shape[0], cfg.dim // cfg.n_heads
        h = self.attn_norm(x)
        q = rotary(self.wq(h).view(s, cfg.n_heads, hd), pos, cfg.rope_theta)
        k = rotary(self.wk(h).view(s, cfg.n_kv_heads, hd), pos, cfg.rope_theta)
        v = self.wv(h).view(s, cfg.n_kv_heads, hd)
        x = x + self.wo(attention(q.contiguous(), k.contiguous(), v.contiguous(), plan).reshape(s, cfg.n_heads * hd))
        h = self.mlp_norm(x)
        return x + self.w2(F.silu(self.w1(h)) * self.w3(h))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim)
        self.head = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self):
        std = 0.02
        for name, p in self.named_parameters():
            if p.dim() == 2:
                # residual projections scaled down with depth (GPT-2 / Llama practice)
                scale = 1 / math.sqrt(2 * self.cfg.n_layers) if name.endswith(("wo.weight", "w2.weight")) else 1.0
                nn.init.normal_(p, std=std * scale)

    def forward(self, tokens: torch.Tensor, pos: torch.Tensor, plan) -> torch.Tensor:
        """``tokens``, ``pos``: ``[S_local]`` -> logits ``[S_local, vocab]``."""
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x, pos, plan)
        x = self.norm(x)
        return x @ self.embed.weight.t() if self.head is None else self.head(x)
