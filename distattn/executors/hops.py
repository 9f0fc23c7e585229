"""Rows moved hop by hop along a schedule's routes on one slot, the transport of
:class:`~distattn.executors.task_a2a.TaskExecutor`: to the slots computing on them (group-cast: every
hop's received rows in one buffer), and their results back up the hops in reverse, summed at every
slot they pass (group-reduce). The routes are :mod:`distattn.schedulers.cad.cast`'s legs.

A hop after the first needs the rows the one before brought (relays forward them; on the way back
they sum the partials first): it is chained to it when the first hop starts
(:meth:`TaskExecutor.chained <distattn.executors.task_a2a.TaskExecutor.chained>`) -- on CUDA the
wait for the earlier hop and the gathering of its rows run on a side stream, so the compute stream
goes on and the whole chain hides behind what the caller computes; on CPU the process waits there.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import NamedTuple, Protocol, Sequence

import numpy as np
import torch

from ..distributed.comm import Pending
from ..schedulers.cad import Route
from ..planning.wire import Wire
from .base import DeviceIndex, ExecOptions

_EMPTY = np.zeros(0, dtype=np.int64)


class HopTransport(Protocol):
    """What the hops need of the executor they move rows for
    (:class:`~distattn.executors.task_a2a.TaskExecutor` is one): named here so that the hops, which the
    executor is built on, need not import it back."""

    options: ExecOptions   # only ``deterministic``: how the hops sum what comes back

    def all_to_all(self, send: torch.Tensor, send_rows: Sequence[int], recv_rows: Sequence[int],
                   what: str) -> Transfer:
        """Start sending ``send`` (``send_rows[i]`` rows to pool rank ``i``), receiving ``recv_rows``."""
        ...

    def chained(self, device: torch.device) -> AbstractContextManager:
        """The context a hop chain runs in (see the module docstring)."""
        ...


def rows_of(buffer_tokens: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """The row of ``buffer_tokens`` holding each of ``tokens`` (each held once)."""
    order = np.argsort(buffer_tokens, kind="stable")
    rows = order[np.searchsorted(buffer_tokens[order], tokens)] if len(tokens) else _EMPTY
    assert np.array_equal(buffer_tokens[rows], tokens), "a route sends a token its sender does not have"
    return rows.astype(np.int64)


@dataclass(frozen=True)
class HopRoute:
    """One hop on one slot, in the all-to-all's (pool-rank) order: the rows it sends (``gather``: rows
    of the hop's source -- my own rows in hop 1, what earlier hops brought after), and how many go
    to and come from each pool rank."""

    gather: DeviceIndex
    send: tuple[int, ...]
    recv: tuple[int, ...]


class Cast:
    """One kind of rows (Q, or K/V) moved over the schedule's hops on one slot: to the workers
    (:meth:`forward`: my rows in, every hop's received rows out, in one buffer), and results back
    (:meth:`back`: a buffer like that in, the sums for my own rows out)."""

    def __init__(self, routes: tuple[Route, ...], by_rank, own_tokens: np.ndarray):
        self.hops: list[HopRoute] = []
        received: list[np.ndarray] = []
        for h, route in enumerate(routes):
            send = np.concatenate([np.asarray(route.send[c], dtype=np.int64) for c in by_rank] or [_EMPTY])
            source = own_tokens if h == 0 else np.concatenate(received)
            self.hops.append(HopRoute(DeviceIndex(rows_of(source, send)), tuple(len(route.send[c]) for c in by_rank),
                                      tuple(len(route.recv[c]) for c in by_rank)))
            received.append(np.concatenate([np.asarray(route.recv[c], dtype=np.int64) for c in by_rank] or [_EMPTY]))
        self.tokens = np.concatenate(received)      # the global token of each row of the buffer
        self.starts = np.cumsum([0] + [len(r) for r in received])   # where each hop's rows begin in it
        self.own = len(own_tokens)
        first = self.hops[0].gather.array
        # hop 1 sends each of my rows exactly once (Q): results come back in one gather
        self.place = DeviceIndex(np.argsort(first).astype(np.int64)) \
            if len(first) == self.own and np.array_equal(np.sort(first), np.arange(self.own)) else None

    def indices(self) -> list[DeviceIndex]:
        return [h.gather for h in self.hops] + ([self.place] if self.place is not None else [])

    # forward: hop by hop to the workers
    def start(self, ex: HopTransport, own: torch.Tensor, what: str) -> list["Transfer"]:
        """Start hop 1 (my rows)."""
        hop = self.hops[0]
        return [ex.all_to_all(own.index_select(0, hop.gather.on(own.device)), hop.send, hop.recv, what)]

    def advance(self, ex: HopTransport, flights: list["Transfer"], what: str) -> list["Transfer"]:
        """Start every later hop, each once the hops before it are in (chained: module docstring)."""
        if len(flights) == len(self.hops):
            return flights
        with ex.chained(flights[0].buffer.device):
            for hop in self.hops[len(flights):]:
                source = torch.cat([t.wait(chained=True) for t in flights])
                flights = flights + [ex.all_to_all(source.index_select(0, hop.gather.on(source.device)), hop.send,
                                                   hop.recv, what)]
        return flights

    @staticmethod
    def buffer(flights: list["Transfer"]) -> torch.Tensor:
        return torch.cat([t.wait() for t in flights])

    # back: results up the hops in reverse, summed at every slot they pass
    def back_start(self, ex: HopTransport, results: torch.Tensor, what: str, wire: Wire = Wire()) -> "Return":
        """Start the last hop's rows of ``results`` (a buffer like :meth:`buffer`'s) back, each hop's
        rows travelling as ``wire`` encodes them (sums are made decoded)."""
        return self._send_back(ex, results, len(self.hops) - 1, what, wire)

    def _send_back(self, ex: HopTransport, results, h, what, wire) -> "Return":
        hop = self.hops[h]
        rows = wire.encode(results[self.starts[h]:self.starts[h + 1]])
        return Return(results, h, ex.all_to_all(rows, hop.recv, hop.send, what), wire)

    def back_advance(self, ex: HopTransport, ret: "Return", what: str) -> "Return":
        """Sum each hop's returned partials into the rows they were forwarded from and send those
        back in turn, down to hop 1's (on its way to the owners; chained: see module docstring)."""
        if ret.hop == 0:
            return ret
        with ex.chained(ret.results.device):
            while ret.hop > 0:
                hop = self.hops[ret.hop]
                got = ret.got(chained=True)
                results = hop.gather.add_into(ret.results[:self.starts[ret.hop]], got, ex.options.deterministic)
                ret = self._send_back(ex, results, ret.hop - 1, what, ret.wire)
        return ret

    def back_finish(self, ex: HopTransport, ret: "Return", what: str) -> torch.Tensor:
        """My own rows' sums (``[own rows, ...]``)."""
        ret = self.back_advance(ex, ret, what)
        got = ret.got()
        if self.place is not None:
            return got.index_select(0, self.place.on(got.device))
        return self.hops[0].gather.add_into(got.new_zeros((self.own, *got.shape[1:])), got, ex.options.deterministic)


class Transfer(NamedTuple):
    """One all-to-all in flight: its receive buffer (rows) and its pending handle."""

    buffer: torch.Tensor
    pending: Pending

    def wait(self, chained: bool = False) -> torch.Tensor:
        """The received rows, once they are in; ``chained``: for the next hop of a chain (on CUDA a
        side stream's wait, which holds up no computation: not on the executor's wait clock)."""
        self.pending.wait(timed=not (chained and self.buffer.is_cuda))
        if self.buffer.is_cuda:   # received on a chain's side stream, read on this one (TaskExecutor.chained)
            self.buffer.record_stream(torch.cuda.current_stream(self.buffer.device))
        return self.buffer


class Return(NamedTuple):
    """Results on their way back: the buffer they are summed into, the hop in flight, its transfer,
    the encoding its rows travel in."""

    results: torch.Tensor
    hop: int
    transfer: Transfer
    wire: Wire

    def got(self, chained: bool = False) -> torch.Tensor:
        """The hop's received rows, decoded into the results' dtype."""
        rows = self.transfer.wait(chained)
        return self.wire.decode(rows, (self.results.shape[-1],), self.results.dtype)
