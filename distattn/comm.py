"""A small communicator over one process group: the only place schedulers touch torch.distributed.

:class:`Comm` wraps point-to-point batches and the few collectives the
schedulers use, counts the bytes this rank sends (``bytes_sent``, what
``plan.stats()["send_bytes"]`` predicts) and turns a timed-out wait into an
error that says which step of which scheduler was waiting and for whom.

Bytes are counted the way the algorithm moves them: a P2P send counts its
tensor; an all-gather counts ``(P - 1)`` times the input (each rank's shard
reaches every other rank); a reduce-scatter counts ``(P - 1) / P`` of the input;
an all-to-all counts what goes to other ranks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

# torch 2.13 renamed all_gather_into_tensor / reduce_scatter_tensor to *_single
# (the old names warn); we accept torch >= 2.5, so pick whichever exists.
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _failed(what: str, exc: Exception) -> RuntimeError:
    return RuntimeError(f"distattn: {what} failed or timed out ({exc}). Every rank of the group must call "
                        f"attention with the same plan.")


class Pending:
    """Outstanding requests of one batch; :meth:`wait` raises a clear error on timeout."""

    def __init__(self, start, what: str):
        """``start()`` issues the requests and returns their works (a peer that is gone can make
        issuing fail already, so it is wrapped like the wait)."""
        self.what = what
        try:
            self.works = start()
        except RuntimeError as exc:
            raise _failed(what, exc) from exc

    def wait(self) -> None:
        for w in self.works:
            try:
                w.wait()
            except RuntimeError as exc:
                raise _failed(self.what, exc) from exc
        self.works = []


@dataclass(eq=False)
class Comm:
    """Communication over ``group`` for one plan (mutable: it counts ``bytes_sent``)."""

    group: Any
    bytes_sent: int = field(default=0)

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)

    @property
    def size(self) -> int:
        return dist.get_world_size(self.group)

    def global_rank(self, rank: int) -> int:
        return dist.get_global_rank(self.group, rank) if self.group is not dist.group.WORLD else rank

    def exchange(self, sends: list[tuple[torch.Tensor, int]], recvs: list[tuple[torch.Tensor, int]],
                 what: str) -> Pending:
        """Start sends ``(tensor, peer)`` and receives ``(buffer, peer)`` (group ranks) as one batch.

        Both sides must list the operations between the same two ranks in the same order.
        """
        ops = [dist.P2POp(dist.isend, t.contiguous(), self.global_rank(p), self.group) for t, p in sends]
        ops += [dist.P2POp(dist.irecv, t, self.global_rank(p), self.group) for t, p in recvs]
        self.bytes_sent += sum(nbytes(t) for t, _ in sends)
        return Pending(lambda: dist.batch_isend_irecv(ops) if ops else [], what)

    def all_gather(self, output: torch.Tensor, input: torch.Tensor, what: str) -> Pending:
        """Start gathering equal-sized ``input`` from every rank into ``output`` (concatenated on dim 0)."""
        self.bytes_sent += (self.size - 1) * nbytes(input)
        return Pending(lambda: [all_gather_single(output, input.contiguous(), group=self.group, async_op=True)],
                       what)

    def reduce_scatter(self, output: torch.Tensor, input: torch.Tensor, what: str) -> Pending:
        """Start summing ``input`` over ranks; this rank gets its equal dim-0 chunk in ``output``."""
        self.bytes_sent += nbytes(input) * (self.size - 1) // self.size
        return Pending(lambda: [reduce_scatter_single(output, input.contiguous(), group=self.group,
                                                       async_op=True)], what)

    def all_to_all(self, output: torch.Tensor, input: torch.Tensor, output_splits: list[int],
                   input_splits: list[int], what: str) -> Pending:
        """Start an all-to-all of 1-D buffers: ``input_splits[j]`` elements go to rank ``j``,
        ``output_splits[i]`` arrive from rank ``i``."""
        self.bytes_sent += (sum(input_splits) - input_splits[self.rank]) * input.element_size()
        return Pending(lambda: [dist.all_to_all_single(output, input.contiguous(), output_splits, input_splits,
                                                       group=self.group, async_op=True)], what)
