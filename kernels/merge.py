"""Exact combination of partial attention results by log-sum-exp.

Two partial results over disjoint key sets, ``(out_a, lse_a)`` and
``(out_b, lse_b)`` with ``out [T, H, D]`` and ``lse [T, H]`` (natural log),
combine exactly::

    lse = logaddexp(lse_a, lse_b)
    out = exp(lse_a - lse) * out_a + exp(lse_b - lse) * out_b

Rows that have seen no key yet carry ``lse = -inf`` and ``out = 0``; a row
with ``-inf`` on both sides stays ``(0, -inf)`` instead of becoming NaN.
Accumulate in fp32 (fp64 for fp64 inputs) whatever the input dtype: rounding
the running lse or out to bf16 between steps is what makes other ring
implementations' error grow with the ring size.
"""

from __future__ import annotations

import torch


# The running lse of merged partial results, whatever the inputs: [T, H], so it costs next to nothing.
# An fp32 lse near 8 is off by ~1e-6, and every merge passes that into its weights exp(lse_a - lse):
# measured (python -m distattn.bench.precision), a zigzag ring's fp32 out error at 64 ranks was
# 1.31x one rank's with fp32 running lse, 0.95x with fp64.
LSE_ACC = torch.float64


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulator / lse dtype for inputs of ``dtype``: fp64 stays fp64, the rest use fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def merge(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two partial results; returns ``(out, lse)``: out in the accumulator dtype, lse in the
    widest of that and the lses' (an :data:`LSE_ACC` accumulator stays fp64).

    Shapes: ``out_* [..., D]``, ``lse_* [...]`` (lse has out's shape without the last dim).
    """
    dtype = acc_dtype(torch.promote_types(out_a.dtype, out_b.dtype))
    lse_dtype = torch.promote_types(torch.promote_types(lse_a.dtype, lse_b.dtype), dtype)
    lse_a = lse_a.to(lse_dtype)
    lse_b = lse_b.to(lse_dtype)
    lse = torch.logaddexp(lse_a, lse_b)
    # Where both sides are -inf the merged lse is -inf too; subtracting it would
    # give NaN, so weigh against 0 there (both weights then come out 0).
    ref = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
    w_a = torch.exp(lse_a - ref).to(dtype).unsqueeze(-1)
    w_b = torch.exp(lse_b - ref).to(dtype).unsqueeze(-1)
    out = w_a * out_a.to(dtype) + w_b * out_b.to(dtype)
    return out, lse


def row_delta(dout: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``Delta = rowsum(dout * out)`` ``[T, H]`` in the accumulator dtype: the backward's
    correction term, computed once per backward from the final ``out``."""
    dtype = acc_dtype(out.dtype)
    return (dout.to(dtype) * out.to(dtype)).sum(-1)


def merge_(out_acc: torch.Tensor, lse_acc: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor) -> None:
    """In-place :func:`merge` into accumulators ``out_acc``/``lse_acc`` (views allowed)."""
    out, lse = merge(out_acc, lse_acc, out_b, lse_b)
    out_acc.copy_(out)
    lse_acc.copy_(lse)


def add_sink(out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Count learnable attention sinks once in a *final* result: ``sinks [H]`` are logits of an
    extra key with value 0 in every row's softmax (gpt-oss), so ``lse' = logaddexp(lse, s_h)`` and
    ``out' = out * exp(lse - lse')``. Shapes: ``out [T, H, D]``, ``lse [T, H]``; returns ``(out'``
    in out's dtype, ``lse'`` in the accumulator dtype). Rows that saw no key keep ``out = 0`` and
    get ``lse' = s_h``. Apply it after every partial result is merged, never per block."""
    dtype = acc_dtype(out.dtype)
    sink = sinks.detach().to(dtype=dtype, device=lse.device).unsqueeze(0)
    lse = lse.to(dtype)
    new = torch.logaddexp(lse, sink)
    return (out.to(dtype) * torch.exp(lse - new).unsqueeze(-1)).to(out.dtype), new


def sink_grad(delta: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
    """``d sinks [H]`` (accumulator dtype) from rows' ``delta = rowsum(dout * out') [T, H]`` and the
    final ``lse' [T, H]`` (sink included): the sink's probability is ``exp(s_h - lse')`` and its
    score gradient ``-exp(s_h - lse') * delta``, summed over the rows given. With these ``out'``
    and ``lse'``, the kernels' backward already gives the right dq, dk, dv."""
    dtype = acc_dtype(delta.dtype)
    sink = sinks.detach().to(dtype=dtype, device=lse.device).unsqueeze(0)
    return -(torch.exp(sink - lse.to(dtype)) * delta.to(dtype)).sum(0)
