"""The SwiGLU MLP a chunk of tokens at a time, forward and backward (``train.mlp_chunk``).

``swiglu(h [S, dim], w1, w3 [ffn, dim], w2 [dim, ffn], chunk) -> [S, dim]`` equals
``w2(silu(w1 h) * w3 h)``, but its ``[S, ffn]`` intermediates never exist whole: the forward
computes ``chunk`` tokens at a time and keeps only ``h``; the backward recomputes each chunk
and returns ``dh`` and the weights' gradients summed over the chunks -- as the chunked loss does
for the logits (ALST's TiledMLP). At Llama-3 8B (ffn 14336, dim 4096) the intermediates are
3.5x the block's input per token, the largest thing a block holds.

The weights are inputs of the autograd function, so their gradients reach DDP's and FSDP2's
hooks as any layer's do. Under autocast the backward recomputes under the forward's autocast
state, so the chunks compute what the forward did.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _mlp(h, w1, w3, w2):
    return F.linear(F.silu(F.linear(h, w1)) * F.linear(h, w3), w2)


class _TiledSwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w1, w3, w2, chunk: int):
        ctx.chunk = chunk
        ctx.autocast = (h.device.type, torch.is_autocast_enabled(h.device.type),
                        torch.get_autocast_dtype(h.device.type))
        ctx.save_for_backward(h, w1, w3, w2)
        return torch.cat([_mlp(h[i:i + chunk], w1, w3, w2) for i in range(0, h.shape[0], chunk)])

    @staticmethod
    def backward(ctx, dy):
        # the chain rule written out (no autograd.grad inside: torch.compile traces it whole), each
        # chunk's a = h w1^T, b = h w3^T recomputed under the forward's autocast state
        h, w1, w3, w2 = ctx.saved_tensors
        device, enabled, dtype = ctx.autocast
        dh = torch.empty_like(h)
        dw1, dw3, dw2 = (torch.zeros_like(w) for w in (w1, w3, w2))
        with torch.autocast(device, dtype=dtype, enabled=enabled):
            for i in range(0, h.shape[0], ctx.chunk):
                rows = slice(i, i + ctx.chunk)
                part, dy_c = h[rows], dy[rows]
                a, b = F.linear(part, w1), F.linear(part, w3)
                silu = F.silu(a)
                dw2 += torch.matmul(dy_c.t(), silu * b)
                dg = torch.matmul(dy_c, w2)
                # silu's own backward kernel, as autograd runs it (one rounding, not one per factor)
                da, db = torch.ops.aten.silu_backward(dg * b, a), dg * silu
                del a, b, silu, dg   # this chunk's [c, ffn] tensors go before the next chunk's come
                dh[rows] = torch.matmul(da, w1) + torch.matmul(db, w3)
                dw1 += torch.matmul(da.t(), part)
                dw3 += torch.matmul(db.t(), part)
                del da, db
        return dh, dw1, dw3, dw2, None


def swiglu(h: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor, chunk: int = 0) -> torch.Tensor:
    """``w2(silu(w1 h) * w3 h)`` for ``h [S, dim]``; ``chunk`` > 0: ``chunk`` tokens at a time
    (module docstring), 0 or at least ``S``: in one piece, as plain autograd does it."""
    if chunk <= 0 or chunk >= h.shape[0]:
        return _mlp(h, w1, w3, w2)
    return _TiledSwiGLU.apply(h, w1, w3, w2, chunk)
