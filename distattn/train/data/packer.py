"""Packing a corpus (or a weighted :class:`Blend` of corpora) into sequences of ``seq_len`` tokens,
deterministic and resumable (the walk and the blend's schedule: :mod:`distattn.train.data`)."""

from __future__ import annotations

import numpy as np


def token_place(corpus, doc: int, pos: int) -> str:
    """Where token ``pos`` of document ``doc`` lies on disk, as precisely as ``corpus`` tells."""
    if hasattr(corpus, "locate"):   # a prepared directory: the shard's file
        shard, local = corpus.locate(doc)
        return f"{corpus.directory / corpus.names[shard]}.bin at token {int(corpus.offsets[shard][local]) + pos}"
    if hasattr(corpus, "bin_path"):
        return f"{corpus.bin_path} at token {int(corpus.offsets[doc]) + pos}"
    return f"{getattr(corpus, 'path', 'data.path')} document {doc} at token {pos}"


class Blend:
    """Corpora mixed by weight (normalised to shares); :class:`Packer` walks it."""

    def __init__(self, corpora: list, weights: list[float], names: list[str] | None = None):
        if len(corpora) != len(weights) or not corpora:
            raise ValueError("data.blend: give one weight per source, and at least one source")
        total = float(sum(weights))
        if not all(w > 0 for w in weights) or not np.isfinite(total):
            raise ValueError(f"data.blend: weights must be positive and finite, got {weights}")
        self.corpora, self.shares = list(corpora), [w / total for w in weights]
        self.names = names or [f"data.blend[{i}]" for i in range(len(corpora))]


class _Walk:
    """One corpus's documents in a seeded order, a new permutation per epoch; ``doc`` is the one at
    the cursor. ``salt`` tells a blend's sources apart (a single corpus has none, as before blends)."""

    def __init__(self, corpus, seed: int, salt: tuple[int, ...] = ()):
        self.corpus, self.seed, self.salt = corpus, seed, salt
        self.epoch, self.pos = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        # salts are >= 1: numpy's SeedSequence pads its entropy with zeros, so [s, e, 0] == [s, e]
        return np.random.default_rng([self.seed, epoch, *self.salt]).permutation(len(self.corpus.lengths))

    @property
    def doc(self) -> int:
        return int(self._order[self.pos])

    def advance(self) -> None:
        self.pos += 1
        if self.pos == len(self._order):
            self.epoch, self.pos = self.epoch + 1, 0
            self._order = self._permutation(self.epoch)

    def seek(self, epoch: int, pos: int) -> None:
        if epoch < 0 or not 0 <= pos < len(self._order):
            raise ValueError(f"the data cursor (epoch {epoch}, document {pos}) is outside this corpus of "
                             f"{len(self._order)} documents: the checkpoint was saved with other data; resume "
                             f"with the data it was saved with")
        self.epoch, self.pos = epoch, pos
        self._order = self._permutation(epoch)


class Packer:
    """Deterministic packing of a corpus (or a :class:`Blend`) into sequences of ``seq_len`` tokens.

    State (:meth:`state`, what a checkpoint stores): ``[epoch, pos, offset]`` for one corpus; for a
    blend of n sources ``[offset, epoch_0, pos_0, tokens_0, ..., epoch_n-1, pos_n-1, tokens_n-1]``,
    with tokens_i the tokens of source i's finished documents (what the blend's schedule weighs)."""

    def __init__(self, corpus, seq_len: int, seed: int = 0, vocab_size: int | None = None):
        self.corpus, self.seq_len, self.seed = corpus, seq_len, seed
        # checked as each piece is read: an id past the embedding would die there as a bare IndexError
        self.vocab_size = vocab_size
        self.blend = corpus if isinstance(corpus, Blend) else None
        self._walks = [_Walk(c, seed, (i + 1,) if self.blend else ()) for i, c in enumerate(self.corpora)]
        self.taken = [0] * len(self._walks)
        self.offset = 0

    @property
    def corpora(self) -> list:
        """The sources a piece's ``source`` index counts: a blend's, or the one corpus."""
        return self.blend.corpora if self.blend else [self.corpus]

    @property
    def epoch(self) -> int:
        return self._walks[0].epoch

    @property
    def pos(self) -> int:
        return self._walks[0].pos

    def state(self) -> list[int]:
        if self.blend is None:
            return [self.epoch, self.pos, self.offset]
        return [self.offset] + [x for w, t in zip(self._walks, self.taken) for x in (w.epoch, w.pos, t)]

    def load_state(self, state) -> None:
        state = [int(x) for x in state]
        want = 3 if self.blend is None else 1 + 3 * len(self._walks)
        if len(state) != want:
            raise ValueError(f"the checkpoint's data cursor has {len(state)} numbers but this data section needs "
                             f"{want} ({'one corpus' if self.blend is None else f'a blend of {len(self._walks)}'}): "
                             f"it was saved with other data; resume with the data it was saved with")
        if self.blend is None:
            (epoch, pos, self.offset), taken = state, [0]
            cursors = [(epoch, pos)]
        else:
            self.offset, rest = state[0], state[1:]
            cursors, taken = list(zip(rest[0::3], rest[1::3])), rest[2::3]
        for walk, (epoch, pos) in zip(self._walks, cursors):
            walk.seek(epoch, pos)
        self.taken = list(taken)
        walk = self._walks[self._source()]
        if not 0 <= self.offset < max(int(walk.corpus.lengths[walk.doc]), 1) or min(self.taken) < 0:
            raise ValueError(f"the checkpoint's data cursor {state} does not fit this data (offset {self.offset} "
                             f"in a document of {int(walk.corpus.lengths[walk.doc])} tokens): it was saved with "
                             f"other data; resume with the data it was saved with")

    def _source(self) -> int:
        """The source of the document at the cursor: the one whose token share lags its weight most.
        Only finished documents count, so the choice holds while a document is being cut."""
        if self.blend is None:
            return 0
        total = sum(self.taken)
        lag = [share * total - taken for share, taken in zip(self.blend.shares, self.taken)]
        return lag.index(max(lag))

    def cut(self, need: int) -> list[tuple[int, int, int, int]]:
        """The next ``need`` tokens of the stream as pieces ``(source, document, start, end)``, none
        read; a document cut at the end continues in the next call."""
        pieces, empty = [], 0
        while need > 0:
            source = self._source()
            walk = self._walks[source]
            doc, length = walk.doc, int(walk.corpus.lengths[walk.doc])
            take = min(need, length - self.offset)
            if take > 0:
                pieces.append((source, doc, self.offset, self.offset + take))
                need -= take
                self.offset += take
                empty = 0
            elif (empty := empty + 1) > len(walk.corpus.lengths):   # a whole epoch without a token
                name = self.blend.names[source] if self.blend else "data.path"
                raise ValueError(f"{name}: every document is empty (no tokens to train on); check the corpus")
            if self.offset == length:
                walk.advance()
                self.taken[source] += length
                self.offset = 0
        return pieces

    def read(self, pieces) -> np.ndarray:
        """The tokens of ``pieces`` (:meth:`cut`'s), one after the other; ``ValueError`` naming the
        file and offset of a token id outside ``vocab_size`` (when given)."""
        parts = [self._read(s, d, a, b) for s, d, a, b in pieces]
        return np.concatenate(parts or [np.zeros(0, np.int64)])

    def _read(self, source: int, doc: int, start: int, end: int) -> np.ndarray:
        tokens = self.corpora[source].read(doc, start, end)
        if self.vocab_size is not None and len(tokens) and (tokens.max() >= self.vocab_size or tokens.min() < 0):
            bad = int(np.flatnonzero((tokens >= self.vocab_size) | (tokens < 0))[0])
            raise ValueError(f"{token_place(self.corpora[source], doc, start + bad)} holds token id "
                             f"{int(tokens[bad])}, outside model.vocab_size {self.vocab_size}; the data is damaged "
                             f"or was tokenized for another vocabulary: check it with `distattn data verify`")
        return tokens

    def next(self, read: bool = True) -> tuple[np.ndarray | None, list[int]]:
        """The next sequence: (tokens ``[seq_len]`` or None when ``read`` is False, document lengths)."""
        pieces = self.cut(self.seq_len)
        return (self.read(pieces) if read else None), [b - a for _, _, a, b in pieces]

    def next_batch(self, dp: int, dp_rank: int) -> tuple[np.ndarray, list[int]]:
        """This data-parallel rank's sequence of the next global batch of ``dp`` sequences."""
        mine = None
        for i in range(dp):
            seq = self.next(read=i == dp_rank)
            if i == dp_rank:
                mine = seq
        return mine

