"""Layouts: which tokens of the packed sequence each rank holds, apart from how attention is scheduled.

A :class:`Layout` is what a caller asks for (``distattn.plan(..., layout=L)``); resolved for one
batch (document lengths and a world size) it gives :class:`Shards`, the token ownership every
scheduler plans on:

==============================  ==================================================================
layout                          rank ``r`` of ``P`` holds
==============================  ==================================================================
``"contiguous"``                ``[r*S/P, (r+1)*S/P)`` (sizes differ by at most one token)
``"zigzag"``                    chunks ``r`` and ``2P-1-r`` of the sequence cut into ``2P``
``"document"``                  chunks ``r`` and ``2P-1-r`` of *every document* cut into ``2P``
                                (TransformerEngine's and Megatron's THD split; documents must be
                                multiples of ``2P``)
``Layout.from_indices(idx)``    the global token indices ``idx[r]``, in that order (any order,
                                any sizes, every token exactly once)
==============================  ==================================================================

For ``P = 2``, 8 tokens ``t0..t7`` (one document), local order left to right::

    contiguous : rank 0: t0 t1 t2 t3          rank 1: t4 t5 t6 t7
    zigzag     : rank 0: t0 t1 t6 t7          rank 1: t2 t3 t4 t5
    from_indices([[5, 0, 3], [1, 2, 4, 6, 7]]) : rank 0: t5 t0 t3   rank 1: t1 t2 t4 t6 t7

Schedules compute on each rank's tokens in increasing global order (the *compute order*); a
layout whose local order differs (only ``from_indices`` can) costs one gather of q, k, v on the
way in and of out on the way out (:attr:`Shards.order`), done by :func:`distattn.attention`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Sequence

import numpy as np

Ranges = tuple[tuple[int, int], ...]
NAMES = ("contiguous", "zigzag", "document")


def even_bounds(total: int, parts: int) -> np.ndarray:
    """``parts + 1`` boundaries cutting ``total`` tokens into parts that differ by at most one."""
    return (np.arange(parts + 1, dtype=np.int64) * total) // parts


def doc_bounds(doc_lens) -> tuple[np.ndarray, np.ndarray]:
    """``(starts, ends)`` of the documents."""
    ends = np.cumsum(np.asarray(doc_lens, dtype=np.int64))
    return ends - np.asarray(doc_lens, dtype=np.int64), ends


def zigzag_owner(world_size: int) -> np.ndarray:
    """Owner rank of each of the ``2P`` zigzag chunks."""
    r = np.arange(world_size)
    return np.concatenate([r, r[::-1]])


def index_runs(starts: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """Rows ``starts[i] .. starts[i] + lens[i] - 1``, concatenated."""
    lens = np.asarray(lens, dtype=np.int64)
    if lens.size == 0:
        return np.zeros(0, np.int64)
    which = np.repeat(np.arange(len(lens)), lens)
    return np.asarray(starts, dtype=np.int64)[which] + np.arange(len(which)) - np.repeat(np.cumsum(lens) - lens, lens)


def token_index(ranges: Ranges) -> np.ndarray:
    """Global token indices of ``ranges``, in local order."""
    if not len(ranges):
        return np.zeros(0, np.int64)
    s, e = np.asarray(ranges, dtype=np.int64).reshape(-1, 2).T
    return index_runs(s, np.maximum(e - s, 0))


def cut_intervals(bounds: np.ndarray, a, b) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Intervals ``[a[i], b[i])`` cut at sorted ``bounds`` (ranges ``[bounds[j], bounds[j+1])`` tiling
    them): ``(i, j, start, end)`` per non-empty piece, in interval order, then range order."""
    a, b = np.atleast_1d(np.asarray(a, dtype=np.int64)), np.atleast_1d(np.asarray(b, dtype=np.int64))
    keep = np.nonzero(b > a)[0]
    first = np.searchsorted(bounds, a[keep], side="right") - 1
    n = np.searchsorted(bounds, b[keep] - 1, side="right") - first   # ranges each interval touches
    which = np.repeat(np.arange(len(keep)), n)
    j = index_runs(first, n)
    return keep[which], j, np.maximum(a[keep][which], bounds[j]), np.minimum(b[keep][which], bounds[j + 1])


def covered_before(i0: np.ndarray, i1: np.ndarray, x) -> np.ndarray:
    """Tokens of the disjoint sorted intervals ``[i0, i1)`` below each ``x``."""
    if i0.size == 0:  # nothing below anything
        return np.zeros(np.shape(x), dtype=np.int64)
    cum = np.concatenate([[0], np.cumsum(i1 - i0)])
    j = np.searchsorted(i0, x, side="right")  # intervals starting at or before x
    inside = np.where(j > 0, np.minimum(x, i1[np.maximum(j - 1, 0)]) - i0[np.maximum(j - 1, 0)], 0)
    return cum[np.maximum(j - 1, 0)] * (j > 0) + np.maximum(inside, 0)


def runs_of(tokens: np.ndarray) -> np.ndarray:
    """``tokens`` (local order) as runs of consecutive global indices: ``[runs, 2]`` (start, end)."""
    tokens = np.asarray(tokens, dtype=np.int64)
    if tokens.size == 0:
        return np.zeros((0, 2), dtype=np.int64)
    cut = np.nonzero(np.diff(tokens) != 1)[0] + 1
    starts = tokens[np.concatenate([[0], cut])]
    ends = tokens[np.concatenate([cut - 1, [tokens.size - 1]])] + 1
    return np.stack([starts, ends], axis=1)


@dataclass(frozen=True, eq=False)
class Shards:
    """A layout resolved for one batch: runs of consecutive tokens partitioning ``[0, S)`` and the
    rank holding each (see module docstring).

    ``bounds [C + 1]`` and ``owner [C]`` list the runs in global order; ``owned[r]`` lists rank
    ``r``'s runs in its local order (``plan.shard``'s order); ``order[r]`` is None when that order
    is increasing, else the local index of each token in compute order (``compute = local[order]``).
    ``slot [C]`` groups a rank's runs for kernel calls: runs of one slot never need two calls
    against the runs of one slot of another rank (zigzag: the early and the late chunks), so the
    ring and all-gather schedules make one call per slot pair; an explicit layout has one slot and
    its calls are layered as the pieces require (:func:`distattn.schedulers.blocks.layers`).
    """

    bounds: np.ndarray = field(repr=False)
    owner: np.ndarray = field(repr=False)
    world_size: int
    owned: tuple[Ranges, ...] = field(repr=False)
    order: tuple[np.ndarray | None, ...] = field(repr=False)
    slot: np.ndarray = field(repr=False)

    @staticmethod
    def from_bounds(bounds: np.ndarray, owner: np.ndarray, world_size: int, slot: np.ndarray | None = None) -> "Shards":
        """Runs ``[bounds[i], bounds[i+1])`` held by ``owner[i]``, each rank's in increasing order."""
        bounds, owner = np.asarray(bounds, dtype=np.int64), np.asarray(owner, dtype=np.int64)
        owned = tuple(tuple(zip(bounds[:-1][owner == r].tolist(), bounds[1:][owner == r].tolist()))
                      for r in range(world_size))
        slot = np.zeros(len(owner), dtype=np.int64) if slot is None else np.asarray(slot, dtype=np.int64)
        return Shards(bounds, owner, world_size, owned, (None,) * world_size, slot)

    @staticmethod
    def from_owned(owned: Sequence[Ranges | np.ndarray], total: int) -> "Shards":
        """Each rank's ``(start, end)`` runs in its local order (pairs, or a ``[runs, 2]`` array);
        ``ValueError`` unless together they hold every token of ``[0, total)`` exactly once."""
        arrays = [np.asarray(ranges, dtype=np.int64).reshape(-1, 2) for ranges in owned]
        rank = np.repeat(np.arange(len(arrays)), [len(x) for x in arrays])
        runs = np.concatenate(arrays) if arrays else np.zeros((0, 2), dtype=np.int64)
        keep = runs[:, 1] > runs[:, 0]
        runs, rank = runs[keep], rank[keep]
        by_start = np.lexsort((rank, runs[:, 1], runs[:, 0]))
        starts, ends, owners = runs[by_start, 0], runs[by_start, 1], rank[by_start]
        if not len(starts) or starts[0] != 0 or ends[-1] != total or (starts[1:] != ends[:-1]).any():
            # vectorised (a difference array, not a loop over runs): a bad million-token layout is refused
            # as fast as a good one is planned
            held = np.zeros(total + 1, dtype=np.int64)
            np.add.at(held, np.clip(starts, 0, total), 1)
            np.add.at(held, np.clip(ends, 0, total), -1)
            held = np.cumsum(held[:total])
            missing, twice = np.nonzero(held == 0)[0], np.nonzero(held > 1)[0]
            outside = np.nonzero((starts < 0) | (ends > total))[0]
            what = (f"tokens {int(starts[outside[0]])}..{int(ends[outside[0]]) - 1} lie outside the {total}-token "
                    f"sequence" if outside.size else f"token {int(twice[0])} is held twice" if twice.size
                    else f"token {int(missing[0])} is held by no rank ({missing.size} missing)")
            raise ValueError(f"layout: the ranks must hold every token of the {total}-token sequence exactly once, "
                             f"but {what}")
        order = []
        for ranges in arrays:
            tokens = token_index(ranges)
            increasing = tokens.size < 2 or bool((np.diff(tokens) > 0).all())
            order.append(None if increasing else np.argsort(tokens, kind="stable").astype(np.int64))
        return Shards(np.append(starts, total), owners, len(owned), tuple(tuple(zip(*x.T.tolist())) for x in arrays),
                      tuple(order), np.zeros(len(owners), dtype=np.int64))

    @staticmethod
    def stack(rows: Sequence["Shards"]) -> "Shards":
        """The shards of a batch's rows side by side (a batched plan): row ``b``'s tokens follow the
        rows before it, and each rank holds its tokens of row 0, then of row 1, ... -- a ``[B,
        S_local]`` local tensor, row-major (the rows cut alike: each rank holds as many tokens of
        every row)."""
        first = rows[0]
        assert all(row.num_tokens(r) == first.num_tokens(r) for row in rows for r in range(first.world_size))
        shift = np.cumsum([0] + [row.total for row in rows])
        if any(order is not None for row in rows for order in row.order):  # an explicit local order
            return Shards.from_owned([tuple((s + int(shift[b]), e + int(shift[b])) for b, row in enumerate(rows)
                                            for s, e in row.owned[r]) for r in range(first.world_size)],
                                     int(shift[-1]))
        bounds = np.concatenate([row.bounds[:-1] + shift[b] for b, row in enumerate(rows)] + [shift[-1:]])
        return Shards.from_bounds(bounds, np.concatenate([row.owner for row in rows]), first.world_size,
                                  np.concatenate([row.slot for row in rows]))

    @property
    def total(self) -> int:
        return int(self.bounds[-1])

    def num_tokens(self, rank: int) -> int:
        return sum(e - s for s, e in self.owned[rank])

    @cached_property
    def rows(self) -> np.ndarray:
        """``[C]``: row of each run's first token in its owner's compute-order buffer."""
        sizes = np.diff(self.bounds)
        out = np.zeros(len(sizes), dtype=np.int64)
        for r in np.unique(self.owner):
            mine = np.nonzero(self.owner == r)[0]
            out[mine] = np.cumsum(sizes[mine]) - sizes[mine]
        return out

    @cached_property
    def _rank_runs(self) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
        return tuple((self.bounds[:-1][self.owner == r], self.bounds[1:][self.owner == r])
                     for r in range(self.world_size))

    def rank_runs(self, rank: int) -> tuple[np.ndarray, np.ndarray]:
        """``(starts, ends)`` of rank's runs, in compute (increasing) order."""
        return self._rank_runs[rank]

    def compute_tokens(self, rank: int) -> np.ndarray:
        """Rank's global tokens in compute order (increasing)."""
        return token_index(tuple(zip(*(a.tolist() for a in self.rank_runs(rank)))))

    @cached_property
    def _by_owner(self) -> tuple[np.ndarray, ...]:
        """The runs sorted by (owner, start): their keys ``owner * (S + 1) + start``, starts, ends,
        and the owner's tokens before each."""
        order = np.lexsort((self.bounds[:-1], self.owner))
        owner, starts, ends = self.owner[order], self.bounds[:-1][order], self.bounds[1:][order]
        sizes = ends - starts
        before = np.cumsum(sizes) - sizes
        before = before - before[np.searchsorted(owner, owner)]   # restart at each owner's first run
        return owner * (self.total + 1) + starts, owner, starts, ends, before

    def held_in(self, ranks, a, b) -> np.ndarray:
        """Tokens of ``[a, b)`` that ``ranks`` hold (arrays broadcast together)."""
        a, b = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
        below = self.held_before(np.asarray(ranks, dtype=np.int64)[None], np.stack(np.broadcast_arrays(b, a)))
        return np.maximum(below[0] - below[1], 0) * (b > a)

    def held_before(self, rank, x) -> np.ndarray:
        """How many of ``rank``'s tokens lie below each global position ``x`` (arrays broadcast)."""
        rank, x = np.asarray(rank, dtype=np.int64), np.asarray(x, dtype=np.int64)
        key, owner, starts, ends, before = self._by_owner
        j = np.searchsorted(key, rank * (self.total + 1) + np.minimum(np.maximum(x, 0), self.total), side="right") - 1
        jj = np.maximum(j, 0)
        inside = np.minimum(np.maximum(x - starts[jj], 0), ends[jj] - starts[jj])
        return np.where((j >= 0) & (owner[jj] == rank), before[jj] + inside, 0)

    def owner_of(self, x) -> np.ndarray:
        """The rank holding each global token ``x``."""
        return self.owner[np.searchsorted(self.bounds, x, side="right") - 1]

    def cut(self, a, b) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Intervals ``[a[i], b[i])`` cut at the runs: ``(i, run, start, end)`` per non-empty piece,
        in interval order, then global order."""
        return cut_intervals(self.bounds, a, b)

    def regroup(self, group_of: np.ndarray, groups: int) -> "Shards":
        """The same runs held by groups of ranks (``group_of[r]``: rank ``r``'s group), each group
        computing on its members' tokens in increasing order (usp's ring ranks)."""
        owner = np.asarray(group_of, dtype=np.int64)[self.owner]
        # a group's neighbouring runs of one slot are one run of the group (usp's pieces of one chunk)
        keep = np.ones(len(owner), dtype=bool)
        keep[1:] = (owner[1:] != owner[:-1]) | (self.slot[1:] != self.slot[:-1])
        return Shards.from_bounds(np.append(self.bounds[:-1][keep], self.total), owner[keep], groups, self.slot[keep])

    def offset(self, shift: int, rank_of: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(starts, ends, owners)`` of the runs moved by ``shift`` tokens, rank ``r`` renamed
        ``rank_of[r]`` (a CP group's runs inside a pool's token space)."""
        return self.bounds[:-1] + shift, self.bounds[1:] + shift, np.asarray(rank_of, dtype=np.int64)[self.owner]


def _token_indices(r: int, idx) -> tuple[int, ...]:
    """Rank ``r``'s entry of :meth:`Layout.from_indices` as ints; ``ValueError`` for anything else (None, a
    bool, float, string or nested list, a negative index), in time linear in its length: each element's
    type is read once (``map(type)``, at C speed), and only a refused entry is searched for its first bad
    element."""
    def bad(what: str) -> ValueError:
        return ValueError(f"Layout.from_indices: rank {r}'s entry must be a flat list of int token indices (0 or "
                          f"more), but {what}")

    if hasattr(idx, "tolist") and not isinstance(idx, np.ndarray):   # a torch tensor
        idx = idx.tolist()
    if isinstance(idx, np.ndarray):
        if idx.size and (idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer)):
            raise bad(f"it is an array of {idx.dtype} of shape {idx.shape}")
        arr = idx.astype(np.int64, copy=False)
    else:
        if idx is None or isinstance(idx, (str, bytes, dict, set, frozenset)) or not hasattr(idx, "__iter__"):
            raise bad(f"it is {_short(idx)} ({type(idx).__name__})")
        seq = list(idx)
        # bool is an int subclass (True would be token 1): only int and numpy's integers are indices
        if not all(issubclass(t, (int, np.integer)) and not issubclass(t, (bool, np.bool_))
                   for t in set(map(type, seq))):
            i, x = next((i, x) for i, x in enumerate(seq) if isinstance(x, (bool, np.bool_))
                        or not isinstance(x, (int, np.integer)))
            raise bad(f"its element {i} is {_short(x)} ({type(x).__name__})")
        try:
            arr = np.asarray(seq, dtype=np.int64)
        except OverflowError:
            i = next(i for i, x in enumerate(seq) if not -2**63 <= x < 2**63)
            raise bad(f"its element {i} is {_short(seq[i])}, past int64") from None
    if arr.size and arr.min() < 0:
        i = int(np.argmax(arr < 0))
        raise bad(f"its element {i} is {int(arr[i])}, a negative token index")
    return tuple(arr.tolist())


def _short(x) -> str:
    text = repr(x)
    return text if len(text) <= 40 else f"{text[:32]}...{text[-5:]}"


@dataclass(frozen=True)
class Layout:
    """Which tokens each rank holds (see module docstring): ``Layout("contiguous" | "zigzag" |
    "document")`` or :meth:`from_indices`. ``distattn.plan(layout=)`` also takes the names."""

    kind: str
    indices: tuple[tuple[int, ...], ...] | None = field(default=None, repr=False)

    def __post_init__(self):
        if self.kind not in (*NAMES, "indices"):
            raise ValueError(f"layout={self.kind!r} is unknown; choose one of {list(NAMES)}, "
                             f"distattn.Layout.from_indices([...]) or None (the scheduler's own)")
        if (self.kind == "indices") != (self.indices is not None):
            raise ValueError("Layout: pass indices only through Layout.from_indices")

    @staticmethod
    def from_indices(indices: Sequence[Sequence[int]]) -> "Layout":
        """Rank ``r`` holds global tokens ``indices[r]``, in that order (a list per rank of the
        mesh; lists may differ in size or be empty; together they hold each token once)."""
        if isinstance(indices, (str, bytes)) or not hasattr(indices, "__len__") or not len(indices):
            raise ValueError("Layout.from_indices takes one list of token indices per rank, e.g. [[0, 3], [1, 2]]")
        return Layout("indices", tuple(_token_indices(r, idx) for r, idx in enumerate(indices)))

    @staticmethod
    def of(layout: "str | Layout | None") -> "Layout | None":
        """``distattn.plan``'s ``layout=`` argument as a Layout; None (or ``"sequence"``): the
        scheduler's own."""
        if layout is None or layout == "sequence":
            return None
        if isinstance(layout, Layout):
            return layout
        if isinstance(layout, str):
            return Layout(layout)
        raise ValueError(f"layout must be None, one of {list(NAMES)} or a distattn.Layout, got {type(layout).__name__}")

    def shards(self, doc_lens, world_size: int) -> Shards:
        """This layout for documents ``doc_lens`` on ``world_size`` ranks."""
        total, p = int(sum(doc_lens)), world_size
        if self.kind == "indices":
            if len(self.indices) != p:
                raise ValueError(f"Layout.from_indices has {len(self.indices)} lists but the mesh has {p} ranks: "
                                 f"give one list of token indices per rank")
            return Shards.from_owned([runs_of(np.asarray(idx, dtype=np.int64)) for idx in self.indices], total)
        if self.kind == "contiguous" or p == 1:  # on one rank every layout is the sequence in order
            return Shards.from_bounds(even_bounds(total, p), np.arange(p), p)
        late = (np.arange(2 * p) >= p).astype(np.int64)  # zigzag slots: each rank's early and late chunk
        if self.kind == "zigzag":
            return Shards.from_bounds(even_bounds(total, 2 * p), zigzag_owner(p), p, late)
        return Shards.from_bounds(*document_runs(doc_lens, p), p, np.tile(late, len(doc_lens)))


def document_runs(doc_lens, p: int) -> tuple[np.ndarray, np.ndarray]:
    """``(bounds, owner)``: every document in ``2P`` equal chunks, chunk ``c`` held by the zigzag
    owner of ``c``; ``ValueError`` naming a document that is not a multiple of ``2P``."""
    chunks = 2 * p
    lens = np.asarray(doc_lens, dtype=np.int64)
    bad = np.nonzero(lens % chunks)[0]
    if len(bad):
        d = int(bad[0])
        raise ValueError(f"layout='document' cuts every document into 2 * cp = {chunks} equal chunks, but document "
                         f"{d} has {int(lens[d])} tokens ({len(bad)} of {len(lens)} documents are not multiples of "
                         f"{chunks}): pad each document to a multiple of {chunks}, as Megatron does for THD under "
                         f"context parallelism")
    starts, _ = doc_bounds(lens)
    bounds = (starts[:, None] + np.arange(chunks)[None, :] * (lens // chunks)[:, None]).ravel()
    return np.append(bounds, lens.sum()), np.tile(zigzag_owner(p), len(lens))
