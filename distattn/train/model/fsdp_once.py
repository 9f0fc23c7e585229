"""FSDP2 under nano-batches: a block's pieces (``Block.pre``/``Block.post``, forward methods of their
own, :mod:`.transformer`) share one all-gather of its parameters per pass and one reduce-scatter of
its gradients, by FSDP2's own settings (:class:`GatherOnce`).

FSDP2 has setters for those settings but no getters, and reduces a block's gradients in its
post-backward: :class:`GatherOnce` reads the fields the setters write and calls the post-backward of
the block's parameter groups (``FSDPModule._get_fsdp_state()._fsdp_param_groups``; private as of torch
2.13: ``tests/test_fsdp_gather_once.py`` counts the collectives, so a torch that moves them
fails there first)."""

from __future__ import annotations

import torch


class _AfterBackward(torch.autograd.Function):
    """Identity whose backward calls ``fn()``: on a piece's input, right after the piece's backward
    (FSDP2's post-backward of the piece, which sits on its inputs too, included)."""

    @staticmethod
    def forward(ctx, fn, x):
        ctx.fn = fn
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.fn()
        return None, grad


class GatherOnce:
    """FSDP2 under nano-batches: one all-gather of a block's parameters per pass and one reduce-scatter of
    its gradients, however many pieces it runs (``Block.pre``/``Block.post``: forward methods of their
    own, each of which would gather, reshard and reduce-scatter for itself), by FSDP2's own settings.

    Forward: ``reshard_after_forward`` off from the block's first piece to its last, then ``reshard()``.
    Backward runs the pieces in exactly the reverse order (:mod:`distattn.runtime.pingpong`), so the block's
    first piece is its last there: until it is done ``requires_gradient_sync`` and
    ``reshard_after_backward`` are off (each piece's post-backward only accumulates the gradients, the
    parameters stay gathered); then (:class:`_AfterBackward` on that piece's input) they are back and
    the block's post-backward runs once more, reduce-scattering the sum and resharding. Not in that
    piece's own post-backward: autograd accumulates a parameter's gradient once all its pieces are done,
    so there the gradients of the ``post`` parameters would already sit in FSDP2's accumulator (in the
    reduce dtype, fp32 under bf16 mixed precision) and the ``pre`` ones' not, and FSDP2 reduces one dtype.

    Back means the block's own values (a caller's ``set_requires_gradient_sync(False)`` for gradient
    accumulation stays). A backward that never gets there (none ran, an error) leaves them for
    :meth:`.transformer.Transformer.forward` to set back: a step must not leave later steps' gradients unreduced."""

    # what the setters write, per parameter group (FSDP2 has no getters): forward's, backward's
    FORWARD = ("post_forward_mesh_info",)
    BACKWARD = ("reduce_grads", "all_reduce_grads", "reshard_after_backward")

    def __init__(self, block, pieces: int):
        self.block, self.pieces, self.runs = block, pieces, 0
        self.groups = block._get_fsdp_state()._fsdp_param_groups
        self.saved = [{name: getattr(g, name) for name in self.FORWARD + self.BACKWARD} for g in self.groups]
        self.changed = set(self.FORWARD)
        block.set_reshard_after_forward(False, recurse=False)
        if torch.is_grad_enabled():
            self.changed |= set(self.BACKWARD)
            block.set_requires_gradient_sync(False, recurse=False)
            block.set_reshard_after_backward(False, recurse=False)

    def restore(self, names=FORWARD + BACKWARD) -> None:
        """Set ``names`` back to the block's own values, once (later they are the caller's again)."""
        for group, saved in zip(self.groups, self.saved):
            for name in self.changed.intersection(names):
                setattr(group, name, saved[name])
        self.changed -= set(names)

    def _backward_done(self) -> None:
        if self.changed.intersection(self.BACKWARD):   # else a later forward took the settings over
            self.restore(self.BACKWARD)
            for group in self.groups:
                group.post_backward()

    def first(self, x):
        """The input of a piece, before it runs: the first piece's comes through :class:`_AfterBackward`
        (without a gradient nothing would call it back: the settings are back at once instead)."""
        if self.runs or not self.changed.intersection(self.BACKWARD):
            return x
        if x.requires_grad:
            return _AfterBackward.apply(self._backward_done, x)
        self.restore(self.BACKWARD)
        return x

    def ran(self) -> None:
        """After each piece: after the last the parameters are freed (unless the block keeps them)."""
        self.runs += 1
        if self.runs == self.pieces:
            self.restore(self.FORWARD)
            if any(saved["post_forward_mesh_info"] is not None for saved in self.saved):
                self.block.reshard()
