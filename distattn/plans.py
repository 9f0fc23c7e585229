"""The ``Plan`` base class: token ownership, shard/unshard, positions and stats.

A plan is built once per packed batch by a scheduler's *planner* (a pure
function of the document lengths, the mesh shape and options) and is a frozen
dataclass holding everything precomputed. Its type selects the *executor*:
each scheduler subclasses :class:`Plan` in its own file and implements

* ``compute_slices(rank)`` -- the mask slices (global coordinates) that rank computes,
* ``send_bytes(rank, ...)`` -- the bytes that rank sends in one forward pass,
* ``forward(q, k, v, scale)`` / ``backward(dout, saved, scale)`` -- the executor;
* ``device_data()`` -- the kernel layouts (:class:`~distattn.kernels.Varlen`) and index
  arrays (:class:`DeviceIndex`) the executor uses, which :meth:`Plan.prepare` copies to
  the device once, when the plan is made: the executor then launches kernels and
  collectives without a host synchronisation.

Token ownership is stored as ranges: ``owned[r]`` is a tuple of global
``(start, end)`` token ranges; rank ``r``'s local tensor is their
concatenation in that order. Ranks may own different numbers of tokens (any
total length works); collectives pad internally.

A *dry* plan (``world_size`` given as an int) has ``rank = None`` and no group:
``stats()`` works, ``shard``/``unshard``/``attention`` raise ``ValueError``.

Ranks can own nothing (fewer tokens than ranks): their shards are ``[0, ...]``
tensors and they still take part in every collective.

Before attention on inputs of a shape new to this rank, the ranks of the plan's
group compare heads, head_dim and dtype through the group's key-value store
(:func:`distattn.comm.meet_once`: host only, so no device synchronisation; the
group's store remembers agreed shapes, so a plan per training step checks on the
first step only): a mismatch is a ``ValueError`` on every rank naming both
sides, not a gloo abort, a hang or a silently wrong result.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Iterable

import numpy as np
import torch
import torch.distributed as dist

from .comm import Comm, meet_once
from .kernels import Varlen, prepare
from .kernels.registry import check_qkv
from .masks import MaskSlice, attention_flops, slices_area

Ranges = tuple[tuple[int, int], ...]


@dataclass(frozen=True, eq=False)
class DeviceIndex:
    """A host index array and its copies on devices, each made once."""

    array: np.ndarray
    _copies: dict = field(default_factory=dict, repr=False)

    def on(self, device: torch.device) -> torch.Tensor:
        device = torch.device(device)
        if device not in self._copies:
            self._copies[device] = torch.from_numpy(np.ascontiguousarray(self.array)).to(device)
        return self._copies[device]


@dataclass(frozen=True, eq=False, kw_only=True)
class Plan:
    """Metadata of one packed batch on one context-parallel group (see module docstring)."""

    scheduler: str
    doc_lens: tuple[int, ...]
    causal: bool
    window: int | None
    backend: str
    world_size: int
    rank: int | None
    group: Any = field(default=None, repr=False)  # ProcessGroup, or None for dry plans
    owned: tuple[Ranges, ...] = field(repr=False)
    comm: Comm | None = field(init=False, repr=False)  # counts the bytes this rank sends
    _agreed: set = field(init=False, repr=False, default_factory=set)  # input signatures all ranks share

    def __post_init__(self):
        object.__setattr__(self, "comm", Comm(self.group) if self.group is not None else None)

    # ---- executor interface (subclasses) -------------------------------------------------
    def compute_slices(self, rank: int) -> list[MaskSlice]:
        raise NotImplementedError

    def send_bytes(self, rank: int, num_heads: int, num_kv_heads: int, head_dim: int, dtype_bytes: int) -> int:
        raise NotImplementedError

    def visible_pairs(self, rank: int) -> int:
        """Visible (query, key) pairs that rank computes; subclasses may answer faster."""
        return slices_area(self.compute_slices(rank))

    def rank_flops(self, rank: int, num_heads: int, num_kv_heads: int, head_dim: int) -> int:
        """Forward attention FLOPs of rank (all heads over its pairs, unless a scheduler splits heads)."""
        return int(attention_flops(self.visible_pairs(rank), num_heads, head_dim))

    def bytes_sent(self) -> int:
        """Bytes this rank has sent through the plan's communicators so far."""
        return self.comm.bytes_sent if self.comm is not None else 0

    def extra_stats(self) -> dict:
        """Scheduler-specific per-rank lists added to :meth:`stats`."""
        return {}

    def device_data(self) -> Iterable[Varlen | DeviceIndex]:
        """Kernel layouts and index arrays the executor uses on this rank (see module docstring)."""
        return ()

    def prepare(self, device: torch.device | str) -> None:
        """Copy this rank's kernel layouts and indices to ``device`` and let the kernel backend
        precompute from them, once. ``distattn.plan`` does it for the mesh's device; attention on
        tensors of another device prepares them there on first use."""
        device = torch.device(device)
        for item in self.device_data():
            if isinstance(item, Varlen):
                try:
                    prepare(item, device, causal=self.causal, window=self.window, backend=self.backend)
                except ValueError:  # no backend for this device: attention will say so
                    continue
            else:
                item.on(device)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """Returns ``(out, saved)``; ``saved`` is handed back to :meth:`backward`."""
        raise NotImplementedError

    def backward(self, dout: torch.Tensor, saved: tuple[torch.Tensor, ...], scale: float
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    # ---- derived metadata ----------------------------------------------------------------
    @property
    def total_tokens(self) -> int:
        return sum(self.doc_lens)

    @property
    def is_dry(self) -> bool:
        return self.rank is None

    def num_tokens(self, rank: int) -> int:
        return sum(e - s for s, e in self.owned[rank])

    @property
    def num_local_tokens(self) -> int:
        return self.num_tokens(self._require_rank("num_local_tokens"))

    @cached_property
    def doc_starts(self) -> np.ndarray:
        """Global start offset of each document."""
        return np.concatenate([[0], np.cumsum(self.doc_lens[:-1], dtype=np.int64)]).astype(np.int64)

    def _require_rank(self, what: str) -> int:
        if self.rank is None:
            raise ValueError(f"{what} needs a process group: this plan is dry (mesh was an int world size); "
                             f"build it with a DeviceMesh or ProcessGroup")
        return self.rank

    # ---- public API ----------------------------------------------------------------------
    def shard(self, x: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """``x`` with the full packed sequence along ``dim`` (``[S, ...]``) -> this rank's tokens
        ``[S_local, ...]`` in local order. Differentiable (a concatenation of slices)."""
        rank = self._require_rank("shard")
        if x.shape[dim] != self.total_tokens:
            raise ValueError(f"x has {x.shape[dim]} tokens along dim {dim} but doc_lens sum to "
                             f"{self.total_tokens}: pass the full packed sequence")
        if not self.owned[rank]:  # fewer tokens than ranks: this one owns none
            return x.narrow(dim, 0, 0)
        return torch.cat([x.narrow(dim, s, e - s) for s, e in self.owned[rank]], dim=dim)

    def unshard(self, x_local: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """Inverse of :meth:`shard`: every rank gets the full ``[S, ...]`` in original order.

        A collective over the plan's group: every rank must call it.
        """
        rank = self._require_rank("unshard")
        if x_local.shape[dim] != self.num_tokens(rank):
            raise ValueError(f"x_local has {x_local.shape[dim]} tokens along dim {dim} but rank {rank} owns "
                             f"{self.num_tokens(rank)}: pass this rank's shard")
        x = x_local.movedim(dim, 0)
        width = max(self.num_tokens(r) for r in range(self.world_size))
        padded = x.new_zeros((width, *x.shape[1:]))  # gloo's all-gather needs equal sizes
        padded[: x.shape[0]] = x
        gathered = padded.new_empty((self.world_size * width, *x.shape[1:]))
        self.comm.all_gather(gathered, padded, "unshard").wait()
        full = x.new_empty((self.total_tokens, *x.shape[1:]))
        for r in range(self.world_size):
            offset = r * width
            for s, e in self.owned[r]:
                full[s:e] = gathered[offset:offset + e - s]
                offset += e - s
        return full.movedim(0, dim)

    def position_ids(self, device: torch.device | str | None = None) -> torch.Tensor:
        """``[S_local]`` int64: each local token's position inside its document (for RoPE)."""
        tokens = token_index(self.owned[self._require_rank("position_ids")])
        doc = np.searchsorted(self.doc_starts, tokens, side="right") - 1
        return torch.from_numpy(tokens - self.doc_starts[doc]).to(device)

    def stats(self, num_heads: int, num_kv_heads: int, head_dim: int, dtype_bytes: int = 2) -> dict:
        """Per-rank forward attention ``flops``, ``tokens`` and ``send_bytes`` (lists indexed by
        rank) plus ``flops_imbalance`` and ``token_imbalance`` (max / mean)."""
        check_stats_args(num_heads, num_kv_heads, head_dim, dtype_bytes)
        ranks = range(self.world_size)
        flops = [self.rank_flops(r, num_heads, num_kv_heads, head_dim) for r in ranks]
        tokens = [self.num_tokens(r) for r in ranks]
        send = [int(self.send_bytes(r, num_heads, num_kv_heads, head_dim, dtype_bytes)) for r in ranks]
        return {
            "scheduler": self.scheduler,
            "world_size": self.world_size,
            "flops": flops,
            "tokens": tokens,
            "send_bytes": send,
            "flops_imbalance": imbalance(flops),
            "token_imbalance": imbalance(tokens),
            **self.extra_stats(),
        }

    def check_local_qkv(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """``ValueError`` unless q/k/v are this rank's ``[S_local, H, D]`` shards. Checked before any
        communication, so a bad input fails on its rank instead of stalling the others."""
        rank = self._require_rank("attention")
        check_qkv(q, k, v)
        n = self.num_tokens(rank)
        for name, t in (("q", q), ("k", k), ("v", v)):
            if t.shape[0] != n:
                raise ValueError(f"{name} has {t.shape[0]} tokens but rank {rank} owns {n} under this plan: "
                                 f"pass plan.shard(x) of the full sequence")

    # ---- agreement between the ranks ---------------------------------------------------------
    @property
    def agreement_group(self):
        """The group whose ranks exchange data in attention (and so must agree on shapes)."""
        return self.group

    def check_inputs(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """:meth:`check_local_qkv`, then a ``ValueError`` on every rank unless all ranks of the group
        pass the same heads, head_dim and dtype (see module docstring)."""
        self.check_local_qkv(q, k, v)
        dtype = str(q.dtype).removeprefix("torch.")
        shapes = f"Hq={q.shape[1]}, Hkv={k.shape[1]}, head_dim={q.shape[2]}, dtype={dtype}"
        group = self.agreement_group
        if group is None or self.world_size == 1 or shapes in self._agreed:
            return
        theirs = meet_once(group, "attention", shapes, "the check that all ranks pass the same shapes")
        for r, their_shapes in enumerate(theirs or ()):
            if their_shapes != shapes:
                raise ValueError(f"ranks pass different q/k/v to attention: rank {_global_rank(group)} has "
                                 f"({shapes}) but rank {_global_rank(group, r)} has ({their_shapes}); every rank "
                                 f"of the plan's group must pass the same heads, head_dim and dtype")
        self._agreed.add(shapes)


def _global_rank(group, rank: int | None = None) -> int:
    if rank is None:
        return dist.get_rank()
    return rank if group is dist.group.WORLD else dist.get_global_rank(group, rank)


def check_stats_args(num_heads, num_kv_heads, head_dim, dtype_bytes) -> None:
    for name, val in (("num_heads", num_heads), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim),
                      ("dtype_bytes", dtype_bytes)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise ValueError(f"{name} must be a positive int, got {val!r}")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")


def imbalance(values) -> float:
    """max / mean (1.0 when everything is zero)."""
    mean = sum(values) / len(values)
    return max(values) / mean if mean > 0 else 1.0


def token_index(ranges: Ranges) -> np.ndarray:
    """Global token indices of ``ranges``, in local order."""
    return np.concatenate([np.arange(s, e, dtype=np.int64) for s, e in ranges] or [np.zeros(0, np.int64)])
