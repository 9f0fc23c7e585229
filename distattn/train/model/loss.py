"""Cross-entropy over a language-model head without ever materialising the full ``[T, V]`` logits.

The plain loss, ``F.cross_entropy((hidden @ weight.T).float(), labels, reduction="sum")``, holds the
logits in the compute dtype, their fp32 copy, log-softmax's fp32 output (saved for backward) and, in
backward, two fp32 ``[T, V]`` gradients next to that output plus a compute-dtype one: at least
``2 * T * V * 4`` bytes, measured 23.5 GiB above the inputs at 16K tokens x Llama-3's 128256 vocab x
4096 in bf16 (``python -m distattn.bench.loss_memory``). ``chunked_cross_entropy`` walks the tokens
``chunk`` at a time; its extra memory is one chunk's logits, about ``chunk * V * (4 + compute-dtype
bytes)``, the ``[T]`` row log-sum-exps saved for backward, and in backward the gradients themselves,
an fp32 ``[V, D]`` weight-gradient accumulator and one chunk's ``[V, D]`` partial product: 3.55 GiB
at the same size (the 2 GiB accumulator, 1 GiB of either a chunk's fp32 logits or the bf16 partial
product, a chunk's bf16 logits, grad_hidden).

Backward strategy: **recompute**. Backward runs the chunk loop again: recompute the chunk's logits
(one extra ``[chunk, D] x [D, V]`` matmul per chunk), turn them into ``softmax - onehot`` with the
saved log-sum-exp, and multiply into the two gradients. The alternative (compute both gradients
during the forward pass and keep only them) saves that matmul (the head does 3 matmuls instead
of 4; ~2% of a Llama-3-8B step at 16K tokens), but holds ``T * D`` (grad_hidden) + ``V * D`` fp32
(grad_weight, 2.1 GB at 128256 x 4096) from the end of the forward pass, exactly when activation
memory peaks; it
also pays for gradients under ``torch.no_grad`` evaluation unless told otherwise, and under FSDP
produces the unsharded weight's gradient in the forward pass, outside the reduce-scatter hooks'
window. Recompute needs only the weight itself in backward, which FSDP2 unshards anyway when the
function is called inside the model's ``forward`` (the loss is then that module's output, so its
pre-backward all-gather runs before this backward). Calling it from outside the FSDP module with
the module's (sharded) weight would not work with either strategy.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

__all__ = ["chunked_cross_entropy"]


def _accum_dtype(compute: torch.dtype) -> torch.dtype:
    # softmax and the loss sum in fp32 whatever the matmul dtype; fp64 inputs keep fp64 so the
    # function can be checked exactly against the plain loss
    return torch.float64 if compute == torch.float64 else torch.float32


def _no_autocast(device: torch.device):
    # under autocast (the DDP bf16 path) a matmul of fp32 tensors would be silently recast to bf16:
    # the dtype is this function's to choose, through compute_dtype
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return torch.autocast("cpu", enabled=False)


def _chunk_logits(h: torch.Tensor, w_cd: torch.Tensor, compute: torch.dtype, accum: torch.dtype) -> torch.Tensor:
    return (h.to(compute) @ w_cd.T).to(accum)


def _chunks(labels: torch.Tensor, n_tokens: int, chunk: int,
            ignore_index: int) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor]]:
    """``(start, end, labels, valid)`` of each ``chunk`` tokens in turn: forward and backward must cut the
    tokens the same way, since backward reads the log-sum-exps forward saved per token."""
    for s in range(0, n_tokens, chunk):
        e = min(s + chunk, n_tokens)
        lab = labels[s:e]
        yield s, e, lab, lab != ignore_index


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int,
                compute: torch.dtype, ignore_index: int) -> torch.Tensor:
        accum = _accum_dtype(compute)
        n_tokens = hidden.shape[0]
        lse = torch.empty(n_tokens, dtype=accum, device=hidden.device)
        total = torch.zeros((), dtype=accum, device=hidden.device)
        with _no_autocast(hidden.device):
            w_cd = weight.to(compute) if n_tokens else weight
            for s, e, lab, valid in _chunks(labels, n_tokens, chunk, ignore_index):
                logits = _chunk_logits(hidden[s:e], w_cd, compute, accum)            # [c, V]
                target = logits.gather(1, torch.where(valid, lab, 0)[:, None]).squeeze(1)
                # the log-sum-exp in place: the chunk's logits are not needed after it
                row_max = logits.amax(dim=1)
                row_lse = logits.sub_(row_max[:, None]).exp_().sum(dim=1).log_().add_(row_max)
                del logits
                lse[s:e] = row_lse
                total += torch.where(valid, row_lse - target, 0).sum()
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.chunk, ctx.compute, ctx.ignore_index = chunk, compute, ignore_index
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        hidden, weight, labels, lse = ctx.saved_tensors
        chunk, compute, ignore_index = ctx.chunk, ctx.compute, ctx.ignore_index
        accum = lse.dtype
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n_tokens = hidden.shape[0]
        grad_h = torch.empty_like(hidden) if need_h else None
        # the weight gradient sums over every token: accumulate it in fp32 (fp64) even when the
        # matmuls run in bf16, and straight into the result when the weight has that dtype already
        grad_w = torch.zeros(weight.shape, dtype=accum, device=weight.device) if need_w else None
        scale = grad_out.to(accum)
        with _no_autocast(hidden.device):
            w_cd = weight.to(compute) if n_tokens else weight
            for s, e, lab, valid in _chunks(labels, n_tokens, chunk, ignore_index):
                h_cd = hidden[s:e].to(compute)
                g = _chunk_logits(h_cd, w_cd, compute, accum)                         # [c, V]
                g.sub_(lse[s:e, None]).exp_()                                         # softmax
                rows = torch.arange(e - s, device=g.device)
                g[rows, torch.where(valid, lab, 0)] -= 1.0
                # ignored rows contribute nothing; scaling here is what autograd of the plain loss
                # does (it multiplies the fp32 logit gradient before the cast to the compute dtype)
                g.mul_(torch.where(valid, scale, 0).to(accum)[:, None])
                g_cd = g.to(compute)
                del g
                if need_h:
                    grad_h[s:e] = g_cd @ w_cd
                if need_w:
                    grad_w += g_cd.T @ h_cd
                del g_cd
        if need_w:
            grad_w = grad_w.to(weight.dtype)
        return grad_h, grad_w, None, None, None, None


def _validate(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int,
              compute_dtype: torch.dtype | None, ignore_index: int) -> None:
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 2 or not hidden.is_floating_point():
        raise ValueError(f"hidden_TD must be a 2-D floating [T, D] tensor, got "
                         f"{getattr(hidden, 'shape', type(hidden))} {getattr(hidden, 'dtype', '')}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"weight_VD must be a 2-D floating [V, D] tensor, got "
                         f"{getattr(weight, 'shape', type(weight))} {getattr(weight, 'dtype', '')}")
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight_VD is [V, D] = {list(weight.shape)} but hidden_TD has D = {hidden.shape[1]}")
    if weight.shape[0] == 0:
        raise ValueError("weight_VD has an empty vocabulary (V = 0)")
    if (not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.dtype == torch.bool
            or labels.is_floating_point() or labels.is_complex()):
        raise ValueError(f"labels_T must be a 1-D integer [T] tensor, got "
                         f"{getattr(labels, 'shape', type(labels))} {getattr(labels, 'dtype', '')}")
    if labels.shape[0] != hidden.shape[0]:
        raise ValueError(f"labels_T has {labels.shape[0]} tokens but hidden_TD has {hidden.shape[0]}")
    if len({hidden.device, weight.device, labels.device}) != 1:
        raise ValueError(f"hidden_TD, weight_VD, labels_T are on different devices: "
                         f"{hidden.device}, {weight.device}, {labels.device}")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk <= 0:
        raise ValueError(f"chunk must be a positive int, got {chunk!r}")
    if compute_dtype is not None and (not isinstance(compute_dtype, torch.dtype) or not compute_dtype.is_floating_point):
        raise ValueError(f"compute_dtype must be a floating torch.dtype or None, got {compute_dtype!r}")
    # meta tensors carry shapes only (memory planning, see distattn.bench.loss_memory): no values to check
    if labels.device.type != "meta" and labels.numel():
        vocab = weight.shape[0]
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
        if bool(bad.any()):  # one host sync per call, the price of an error message instead of a device assert
            first = labels[bad][0].item()
            raise ValueError(f"labels_T holds {first}, outside [0, {vocab}) and not ignore_index={ignore_index}")


def chunked_cross_entropy(hidden_TD: torch.Tensor, weight_VD: torch.Tensor, labels_T: torch.Tensor, *,
                          chunk: int = 2048, compute_dtype: torch.dtype | None = None,
                          ignore_index: int = -100) -> torch.Tensor:
    """Sum over labelled tokens of ``-log softmax(hidden @ weight.T)[label]``, as an fp32 scalar
    (fp64 when the computation is fp64).

    Equals ``F.cross_entropy((hidden_TD @ weight_VD.T).float(), labels_T, ignore_index=ignore_index,
    reduction="sum")`` but computes ``chunk`` tokens' logits at a time and keeps none of them:
    peak extra memory is about ``chunk * V * 4`` bytes (plus the compute-dtype copy of one chunk)
    instead of about ``2 * T * V * 4``; see the module docstring for the backward (recompute) and
    ``python -m distattn.bench.loss_memory`` for measured numbers.

    Args:
        hidden_TD: ``[T, D]`` final hidden states (after the last norm); fp32, bf16 or fp64.
        weight_VD: ``[V, D]`` output projection (the LM head, or the tied embedding).
        labels_T: ``[T]`` integer targets in ``[0, V)`` or ``ignore_index`` (no loss, zero gradient).
        chunk: tokens per chunk (> 0); ``T`` need not be a multiple.
        compute_dtype: dtype of the two matmuls (e.g. ``torch.bfloat16`` whatever the inputs' dtypes);
            ``None``: the promoted dtype of ``hidden_TD`` and ``weight_VD``. Logits are always upcast
            to fp32 (fp64 stays fp64) before the softmax.
        ignore_index: label value that marks a token without loss.

    Returns a 0-dim tensor; ``T == 0`` gives 0. Its gradient flows to ``hidden_TD`` (in its dtype)
    and ``weight_VD`` (accumulated over chunks in fp32, returned in its dtype); double backward is
    not supported. Raises ``ValueError`` for wrong shapes or dtypes, ``chunk <= 0`` and labels
    outside ``[0, V)`` other than ``ignore_index`` (the last check syncs with the device once).
    """
    _validate(hidden_TD, weight_VD, labels_T, chunk, compute_dtype, ignore_index)
    compute = compute_dtype or torch.promote_types(hidden_TD.dtype, weight_VD.dtype)
    return _ChunkedCrossEntropy.apply(hidden_TD, weight_VD, labels_T, chunk, compute, ignore_index)
