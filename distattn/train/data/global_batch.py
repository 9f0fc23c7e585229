"""A step's global batch, and each data-parallel rank's micro-batch of it (``data.packing``).

Every step takes the next ``dp * seq_len`` tokens of the :class:`~.data.Packer`'s stream, cut at
every ``seq_len`` tokens as stream packing cuts its sequences: a document cut at the end of a
sequence is two *pieces*, each ``(source, document, start, end)``. Each rank cuts the same pieces
without reading a token, decides the same way which are its own, and reads only those: a rank's
micro-batch is its pieces, one after the other in stream order (each piece its own document for
attention, positions and labels, as in stream packing).

* ``stream``: rank ``r`` takes the ``r``-th sequence of ``seq_len`` tokens.
* ``balanced``: :func:`distattn.pack_balanced` deals the pieces out so every rank holds the same
  workload (tokens + ``pair_weight`` x visible causal pairs; ``pair_weight``: the model's,
  :meth:`~distattn.costmodel.model_shape.ModelShape.pair_weight`) under ``data.token_cap`` tokens -- or the
  same tokens, where the scheduler spreads attention over every rank itself (``cad`` pooled over the
  replicas: ``balance_weight`` 0). A piece
  that fits no rank is *held*: the next step's global batch is the held pieces, placed first, and
  the next ``dp * seq_len - held tokens`` tokens of the stream (cut at every ``seq_len`` tokens
  from where they start, and at their end). So a step never has more than
  ``dp * seq_len`` tokens, no token is skipped or trained twice, and a held piece waits one step:
  fewer than ``dp`` pieces are ever held (each found every rank fuller than ``token_cap`` minus
  its length, and a step has at most ``dp * seq_len <= dp * token_cap`` tokens), so each piece
  placed first takes a rank still empty, which has room for any piece.

The tokens trained are the stream's in either packing, only dealt out differently. The state (what
a checkpoint stores) is the packer's, then, under balanced packing, the held pieces:
``[*packer.state(), n, source_0, doc_0, start_0, end_0, ...]``; a state of the packer's alone (a
checkpoint from before balanced packing, or of a stream run) holds none.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from ...planning.packing import imbalance, pack_balanced, workload
from .packer import Packer

_log = logging.getLogger(__name__)

Piece = tuple[int, int, int, int]     # (source, document, start, end): tokens [start, end) of a document
_RESUME_HINT = "it was saved with other data; resume with the data it was saved with"


@dataclass(frozen=True)
class MicroBatch:
    """One rank's share of a step: ``tokens`` (its pieces, one after the other) and their lengths
    ``doc_lens``; and, the same on every rank, ``imbalance`` (max / mean workload over the ranks),
    ``trained`` (the tokens all ranks train this step) and ``held`` (pieces held for the next
    step; None under stream packing); ``replicas``: every DP rank's ``doc_lens`` by DP rank (this
    rank's among them), which every rank knows without a collective -- what pooled plans and the
    nano-batch cut of every replica need (:mod:`.plan_ahead`)."""
    tokens: np.ndarray
    doc_lens: list[int]
    imbalance: float
    trained: int
    held: int | None
    replicas: tuple[tuple[int, ...], ...] = ()


def _lens(pieces) -> list[int]:
    return [end - start for _, _, start, end in pieces]


class GlobalBatches:
    """The steps' global batches of ``packer``'s stream over ``dp`` ranks (module docstring):
    ``next(dp_rank)`` gives that rank's :class:`MicroBatch` of the next step; ``state()`` and
    ``load_state()`` resume it exactly."""

    def __init__(self, packer: Packer, dp: int, packing: str = "stream", token_cap: int | None = None,
                 pair_weight: float = 0.0, seed: int = 0, balance_weight: float | None = None):
        if packing not in ("stream", "balanced"):
            raise ValueError(f"data.packing must be one of stream, balanced, got {packing!r}")
        self.packer, self.dp, self.packing = packer, dp, packing
        self.token_cap = packer.seq_len if token_cap is None else token_cap
        if self.token_cap < packer.seq_len:
            raise ValueError(f"data.token_cap ({self.token_cap}) must be at least data.seq_len ({packer.seq_len})")
        # what the packer evens out: tokens + balance_weight x pairs (default: the metric's pair_weight;
        # 0 where the scheduler spreads attention over every rank itself, as pooled cad does)
        self.pair_weight, self.seed = pair_weight, seed
        self.balance_weight = pair_weight if balance_weight is None else balance_weight
        self.held: list[Piece] = []

    def next(self, dp_rank: int) -> MicroBatch:
        """Rank ``dp_rank``'s micro-batch of the next step (every rank must call this every step)."""
        if self.packing == "stream":
            return self._stream(dp_rank)
        return self._balanced(dp_rank)

    def _stream(self, dp_rank: int) -> MicroBatch:
        seq_len = self.packer.seq_len
        seqs = self.sequences()
        work = [workload(_lens(s), self.pair_weight).sum() for s in seqs]
        mine = seqs[dp_rank]
        return MicroBatch(self.packer.read(mine), _lens(mine), imbalance(work), self.dp * seq_len, None,
                          tuple(tuple(_lens(s)) for s in seqs))

    def _balanced(self, dp_rank: int) -> MicroBatch:
        seq_len, held = self.packer.seq_len, self.held
        room = max(0, self.dp * seq_len - sum(_lens(held)))
        pieces = list(held)
        while room > 0:
            take = min(seq_len, room)
            pieces += self.packer.cut(take)
            room -= take
        lens = _lens(pieces)
        packing = pack_balanced(lens, self.dp, 1, self.token_cap, self.balance_weight, self.seed,
                                first=range(len(held)))
        self.held = [pieces[i] for i in packing.held]
        if self.held:
            _log.info("balanced packing: %d piece(s) of %s tokens fit no rank under data.token_cap %d; held "
                      "for the next step", len(self.held), ", ".join(map(str, _lens(self.held))), self.token_cap)
        mine = [pieces[i] for i in packing[dp_rank][0]]
        replicas = tuple(tuple(lens[i] for i in rank[0]) for rank in packing)
        work = [workload(r, self.pair_weight).sum() if r else 0.0 for r in replicas]
        return MicroBatch(self.packer.read(mine), _lens(mine), imbalance(work), int(packing.tokens.sum()),
                          len(self.held), replicas)

    def sequences(self) -> list[list[Piece]]:
        """The next step's ``dp`` sequences of ``seq_len`` tokens as pieces, none read: what
        ``parallel.cp/scheduler: auto`` deals to its groups itself (:mod:`.auto_plan`)."""
        return [self.packer.cut(self.packer.seq_len) for _ in range(self.dp)]

    def peek_lengths(self, steps: int) -> list[list[list[int]]]:
        """The next ``steps`` steps' sequences as document lengths (``[step][sequence][piece]``), the
        stream left where it was: what a choice made before the first step prices."""
        state = self.state()
        try:
            return [[_lens(seq) for seq in self.sequences()] for _ in range(steps)]
        finally:
            self.load_state(state)

    def state(self) -> list[int]:
        """The packer's state, then (balanced) the held pieces (module docstring)."""
        if self.packing == "stream":
            return self.packer.state()
        return self.packer.state() + [len(self.held)] + [int(x) for piece in self.held for x in piece]

    def load_state(self, state) -> None:
        """Continue from :meth:`state`'s list (or a packer's alone: nothing held); ``ValueError``
        when it does not fit this data or packing."""
        state = [int(x) for x in state]
        width = len(self.packer.state())
        self.packer.load_state(state[:width])
        rest = state[width:]
        if rest and (rest[0] < 0 or len(rest) != 1 + 4 * rest[0]):
            raise ValueError(f"the checkpoint's data state has {len(state)} numbers, not the packer's {width} and "
                             f"1 + 4 per held piece: {_RESUME_HINT}")
        held = [tuple(rest[i:i + 4]) for i in range(1, len(rest), 4)]
        for piece in held:
            self._check(piece)
        if held and self.packing == "stream":
            raise ValueError(f"the checkpoint holds {len(held)} piece(s) that balanced packing held back for the "
                             f"next step; resume with data.packing: balanced")
        if (self.packing == "balanced") != bool(rest) and self.dp > 1:
            # (a balanced state always ends with its count of held pieces, 0 included)
            _log.info("resuming a checkpoint saved under %s packing with data.packing: %s: the stream goes on at "
                      "the same token, dealt out to the ranks the new way", "balanced" if rest else "stream",
                      self.packing)
        self.held = held

    def _check(self, piece: Piece) -> None:
        corpora = self.packer.corpora
        source, doc, start, end = piece
        length = int(corpora[source].lengths[doc]) if 0 <= source < len(corpora) and \
            0 <= doc < len(corpora[source].lengths) else -1
        if not 0 <= start < end <= length:
            raise ValueError(f"the checkpoint's held piece {piece} (source, document, start, end) is not in this "
                             f"data: {_RESUME_HINT}")
        if end - start > self.token_cap:
            raise ValueError(f"the checkpoint holds a piece of {end - start} tokens, more than data.token_cap "
                             f"{self.token_cap}: resume with data.token_cap >= {end - start}")
