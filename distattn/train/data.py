"""Packed long sequences of real documents, deterministic and resumable.

Sources:

* ``stdlib`` (the embedded default, offline anywhere): the Python standard
  library's ``.py`` files, one document per file, byte-level (vocab 256) --
  real text with a real length skew.
* ``tokens``: your own pre-tokenised corpus, ``PATH.bin`` (flat uint16 or
  uint32 tokens, memory-mapped) plus ``PATH.idx.npy`` (int64 document offsets,
  ``n_docs + 1`` entries); :func:`write_token_file` writes one.

:class:`Packer` walks the documents in a seeded order per epoch and fills
sequences of ``seq_len`` tokens greedily; a document cut at the end of a
sequence continues at the start of the next one, so nothing is skipped or
repeated. Its whole state is three ints (:meth:`Packer.state`). Data
parallelism: every rank walks the same global batch of ``dp`` sequences and
reads only its own (the others are skipped by arithmetic on lengths).
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import numpy as np


class StdlibCorpus:
    """Python standard library sources as byte documents."""

    def __init__(self):
        root = Path(sysconfig.get_paths()["stdlib"])
        files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and p.stat().st_size > 0)
        if not files:
            raise ValueError(f"no .py files under {root}: use data.source: tokens")
        self.files = files
        self.lengths = np.array([p.stat().st_size for p in files], dtype=np.int64)

    def read(self, doc: int, start: int, end: int) -> np.ndarray:
        with open(self.files[doc], "rb") as f:
            f.seek(start)
            return np.frombuffer(f.read(end - start), dtype=np.uint8).astype(np.int64)


class TokenFileCorpus:
    """``PATH.bin`` + ``PATH.idx.npy``, memory-mapped (see module docstring)."""

    def __init__(self, path: str | Path):
        path = Path(path)
        bin_path, idx_path = path.with_name(path.name + ".bin"), path.with_name(path.name + ".idx.npy")
        for p in (bin_path, idx_path):
            if not p.exists():
                raise ValueError(f"data.path: {p} does not exist (write one with distattn.train.data.write_token_file)")
        offsets = np.load(idx_path, allow_pickle=False)
        if offsets.ndim != 1 or len(offsets) < 2 or offsets[0] != 0 or (np.diff(offsets) <= 0).any():
            raise ValueError(f"{idx_path}: expected increasing int64 offsets starting at 0, one per document + 1")
        width = bin_path.stat().st_size // int(offsets[-1])
        if width not in (2, 4) or width * int(offsets[-1]) != bin_path.stat().st_size:
            raise ValueError(f"{bin_path}: size does not match {int(offsets[-1])} uint16 or uint32 tokens")
        self.tokens = np.memmap(bin_path, dtype=np.uint16 if width == 2 else np.uint32, mode="r")
        self.offsets = offsets
        self.lengths = np.diff(offsets)

    def read(self, doc: int, start: int, end: int) -> np.ndarray:
        base = int(self.offsets[doc])
        return np.asarray(self.tokens[base + start:base + end], dtype=np.int64)


def write_token_file(path: str | Path, docs: list[np.ndarray], dtype=np.uint16) -> None:
    """Write documents (int arrays) as ``PATH.bin`` + ``PATH.idx.npy``."""
    path = Path(path)
    np.concatenate([np.asarray(d, dtype=dtype) for d in docs]).tofile(path.with_name(path.name + ".bin"))
    np.save(path.with_name(path.name + ".idx.npy"),
            np.concatenate([[0], np.cumsum([len(d) for d in docs])]).astype(np.int64))


class Packer:
    """Deterministic packing of a corpus into sequences of ``seq_len`` tokens."""

    def __init__(self, corpus, seq_len: int, seed: int = 0):
        self.corpus, self.seq_len, self.seed = corpus, seq_len, seed
        self.epoch, self.pos, self.offset = 0, 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.corpus.lengths))

    def state(self) -> list[int]:
        return [self.epoch, self.pos, self.offset]

    def load_state(self, state) -> None:
        self.epoch, self.pos, self.offset = (int(x) for x in state)
        self._order = self._permutation(self.epoch)

    def next(self, read: bool = True) -> tuple[np.ndarray | None, list[int]]:
        """The next sequence: (tokens ``[seq_len]`` or None when ``read`` is False, document lengths)."""
        pieces, lens, need = [], [], self.seq_len
        while need > 0:
            doc = int(self._order[self.pos])
            take = min(need, int(self.corpus.lengths[doc]) - self.offset)
            if read:
                pieces.append(self.corpus.read(doc, self.offset, self.offset + take))
            lens.append(take)
            need -= take
            self.offset += take
            if self.offset == self.corpus.lengths[doc]:
                self.pos, self.offset = self.pos + 1, 0
                if self.pos == len(self._order):
                    self.epoch, self.pos = self.epoch + 1, 0
                    self._order = self._permutation(self.epoch)
        return (np.concatenate(pieces) if read else None), lens

    def next_batch(self, dp: int, dp_rank: int) -> tuple[np.ndarray, list[int]]:
        """This data-parallel rank's sequence of the next global batch of ``dp`` sequences."""
        mine = None
        for i in range(dp):
            seq = self.next(read=i == dp_rank)
            if i == dp_rank:
                mine = seq
        return mine


def make_corpus(source: str, path: str | None):
    return StdlibCorpus() if source == "stdlib" else TokenFileCorpus(path)
