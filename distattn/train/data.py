"""Packed long sequences of real documents, deterministic and resumable.

Sources:

* ``stdlib`` (the embedded default, offline anywhere): the Python standard
  library's ``.py`` files, one document per file, byte-level (vocab 256) --
  real text with a real length skew.
* ``tokens``: your own pre-tokenised corpus, either

  - a directory written by ``distattn data prepare`` (:class:`ShardedCorpus`):
    ``index.json`` plus shards ``shard_00000.bin`` / ``shard_00000.idx.npy``, ...
    (the format is spelled out in :mod:`distattn.train.prepare`), or
  - one token file: ``PATH.bin`` (flat uint16 or uint32 tokens, memory-mapped)
    plus ``PATH.idx.npy`` (int64 document offsets, ``n_docs + 1`` entries);
    :func:`write_token_file` writes one. Each shard of a prepared directory is
    such a file.

:class:`Packer` walks the documents in a seeded order per epoch and fills
sequences of ``seq_len`` tokens greedily; a document cut at the end of a
sequence continues at the start of the next one, so nothing is skipped or
repeated. Its whole state is three ints (:meth:`Packer.state`). Data
parallelism: every rank walks the same global batch of ``dp`` sequences and
reads only its own (the others are skipped by arithmetic on lengths).
"""

from __future__ import annotations

import json
import sysconfig
import tokenize
from collections import OrderedDict
from pathlib import Path

import numpy as np

from .safe_io import read_regular

BYTE_VOCAB = 256                # token ids of byte-level text: data.source stdlib, --tokenizer bytes
# what np.load raises for a damaged .npy: a header numpy cannot parse goes through ast (SyntaxError,
# TypeError, RecursionError) and its Python 2 clean-up (tokenize.TokenError); a shape no file holds
# is too large to allocate (MemoryError) or to read (EOFError, ValueError)
_NPY_ERRORS = (OSError, ValueError, EOFError, SyntaxError, TypeError, RecursionError, MemoryError,
               tokenize.TokenError)
_TOKEN_FILE_HINT = "write it again with distattn.train.data.write_token_file"


def load_offsets(idx_path: Path, hint: str, mmap: bool = False) -> np.ndarray:
    """The document offsets in ``idx_path`` (memory-mapped with ``mmap``); ``ValueError`` naming the
    file and ``hint`` (the fix) when it is not a readable .npy array."""
    try:
        return np.load(idx_path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except _NPY_ERRORS as exc:
        detail = str(exc.args[0] if isinstance(exc, tokenize.TokenError) and exc.args else exc)  # args: (msg, pos)
        reason = detail.splitlines()[0][:200] if detail.strip() else type(exc).__name__
        raise ValueError(f"data.path: {idx_path} is not a readable .npy array of document offsets ({reason}); "
                         f"{hint}") from None


def max_token(bin_path: Path, dtype) -> int:
    """The largest token id in ``bin_path`` (-1 when empty): one pass over a memory map."""
    if bin_path.stat().st_size == 0:   # np.memmap refuses an empty file
        return -1
    return int(np.memmap(bin_path, dtype=np.dtype(dtype).newbyteorder("<"), mode="r").max())


class StdlibCorpus:
    """Python standard library sources as byte documents (ids below ``BYTE_VOCAB``)."""

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
        offsets = load_offsets(idx_path, _TOKEN_FILE_HINT)
        if offsets.ndim != 1 or len(offsets) < 2 or offsets[0] != 0 or (np.diff(offsets) <= 0).any():
            raise ValueError(f"data.path: {idx_path}: expected increasing int64 offsets starting at 0, one per "
                             f"document + 1; {_TOKEN_FILE_HINT}")
        width = bin_path.stat().st_size // int(offsets[-1])
        if width not in (2, 4) or width * int(offsets[-1]) != bin_path.stat().st_size:
            raise ValueError(f"data.path: {bin_path}: size does not match {int(offsets[-1])} uint16 or uint32 "
                             f"tokens; {_TOKEN_FILE_HINT}")
        self.tokens = np.memmap(bin_path, dtype=np.uint16 if width == 2 else np.uint32, mode="r")
        self.bin_path, self.offsets = bin_path, offsets
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


INDEX_NAME = "index.json"
INDEX_LIMIT = 64 << 20          # bytes: an index lists shards, a few hundred bytes each
FORMAT = "distattn-tokens"
FORMAT_VERSION = 1
_PREPARE_HINT = "rerun `distattn data prepare` with --overwrite, or prepare into a new --out"


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest token dtype of a vocabulary: little-endian uint16 when every id fits
    (``vocab_size <= 65536``), else uint32."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    if vocab_size <= 2**16:
        return np.dtype("<u2")
    if vocab_size <= 2**32:
        return np.dtype("<u4")
    raise ValueError(f"vocab_size {vocab_size:,} does not fit in uint32 token ids")


def is_prepared(path: str | Path | None) -> bool:
    """Whether ``path`` is a directory written by ``distattn data prepare`` (holds ``index.json``)."""
    return path is not None and (Path(path) / INDEX_NAME).is_file()


def read_index(directory: str | Path) -> dict:
    """``DIR/index.json`` of a prepared directory, checked against the shards on disk: every shard's
    ``.bin`` holds the token count the index says and its ``.idx.npy`` the document count (read
    through a memory map: nothing is loaded). ``ValueError`` names the file and the fix."""
    directory = Path(directory)
    path = directory / INDEX_NAME
    try:
        index = json.loads(read_regular(path, INDEX_LIMIT, INDEX_NAME))
    except FileNotFoundError:
        raise ValueError(f"data.path: {path} does not exist (write the directory with `distattn data prepare`)") \
            from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ValueError(f"data.path: {path} cannot be read ({type(exc).__name__}: {exc}); {_PREPARE_HINT}") \
            from None
    except ValueError as exc:
        raise ValueError(f"data.path: {exc}; {_PREPARE_HINT}") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT or index.get("version") != FORMAT_VERSION:
        raise ValueError(f"data.path: {path} is not a version-{FORMAT_VERSION} {FORMAT} index; {_PREPARE_HINT}")
    shards = index.get("shards")
    if index.get("dtype") not in ("uint16", "uint32") or not isinstance(shards, list) or not shards:
        raise ValueError(f"data.path: {path} names no list of shards or an unknown dtype; {_PREPARE_HINT}")
    for shard in shards:
        _check_entry(path, shard)
    width = np.dtype(index["dtype"]).itemsize
    for shard in index["shards"]:
        _check_shard(directory, shard, width)
    return index


def _check_entry(path: Path, shard) -> None:
    """A shard entry of ``index.json``: a plain file name inside its folder and two counts."""
    name = shard.get("name") if isinstance(shard, dict) else None
    if not (isinstance(name, str) and name and name == Path(name).name and name not in (".", "..")
            and "\\" not in name and "\0" not in name):
        raise ValueError(f"data.path: {path} lists the shard {(name if name is not None else shard)!r:.80}, which "
                         f"is not a file name inside {path.parent}; refusing to read it. {_PREPARE_HINT}")
    # max_token: recorded by prepare since it was added; folders from before lack it
    for key in ("tokens", "documents") + (("max_token",) if "max_token" in shard else ()):
        if type(shard.get(key)) is not int or shard[key] < 0:
            raise ValueError(f"data.path: {path} gives shard {name!r} {key}={shard.get(key)!r:.80}, not a count; "
                             f"{_PREPARE_HINT}")


def _check_shard(directory: Path, shard: dict, width: int) -> None:
    bin_path, idx_path = directory / f"{shard['name']}.bin", directory / f"{shard['name']}.idx.npy"
    for p in (bin_path, idx_path):
        if not p.is_file():
            raise ValueError(f"data.path: {p} is missing ({INDEX_NAME} lists it); {_PREPARE_HINT}")
    want = shard["tokens"] * width
    if bin_path.stat().st_size != want:
        raise ValueError(f"data.path: {bin_path} holds {bin_path.stat().st_size:,} bytes but {INDEX_NAME} says "
                         f"{shard['tokens']:,} tokens ({want:,} bytes); the directory is incomplete or damaged: "
                         f"{_PREPARE_HINT}")
    offsets = load_offsets(idx_path, _PREPARE_HINT, mmap=True)
    if offsets.shape != (shard["documents"] + 1,) or offsets.dtype != np.int64 or offsets[0] != 0 \
            or offsets[-1] != shard["tokens"]:
        raise ValueError(f"data.path: {idx_path} is not {shard['documents']:,} + 1 int64 offsets from 0 to "
                         f"{shard['tokens']:,} as {INDEX_NAME} says; {_PREPARE_HINT}")


def index_vocab(directory: str | Path, index: dict) -> int:
    """The tokenizer's vocabulary size a prepared directory's (checked) ``index`` gives."""
    vocab = index.get("vocab_size")
    if type(vocab) is not int or vocab < 1:
        raise ValueError(f"data.path: {Path(directory) / INDEX_NAME} gives vocab_size={vocab!r:.80}, not the "
                         f"tokenizer's vocabulary size; {_PREPARE_HINT}")
    return vocab


def shard_maxima(directory: str | Path, index: dict) -> list[tuple[Path, int]]:
    """``(shard .bin, its largest token id)`` of a prepared directory's (checked) ``index``: as
    ``distattn data prepare`` recorded it, else (folders prepared before it did) read once."""
    directory = Path(directory)
    return [(directory / f"{s['name']}.bin", s["max_token"] if "max_token" in s
             else max_token(directory / f"{s['name']}.bin", index["dtype"])) for s in index["shards"]]


class ShardedCorpus:
    """A directory written by ``distattn data prepare``: documents numbered across the shards in
    order (documents never straddle shards). The offsets of every shard are loaded (8 bytes a
    document); tokens are read through memory maps, opened on first use, at most
    ``OPEN_SHARDS`` at a time."""

    OPEN_SHARDS = 64

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.index = read_index(self.directory)
        self.dtype = np.dtype(self.index["dtype"]).newbyteorder("<")
        self.names = [shard["name"] for shard in self.index["shards"]]
        self.offsets = [load_offsets(self.directory / f"{name}.idx.npy", _PREPARE_HINT) for name in self.names]
        lengths = [np.diff(o) for o in self.offsets]
        for name, lens in zip(self.names, lengths):
            if (lens <= 0).any():
                raise ValueError(f"data.path: {self.directory / name}.idx.npy has empty or decreasing documents; "
                                 f"{_PREPARE_HINT}")
        self.lengths = np.concatenate(lengths).astype(np.int64)
        # document numbers where each shard starts, and one past the last document
        self.first_doc = np.concatenate([[0], np.cumsum([len(x) for x in lengths])]).astype(np.int64)
        self._open: OrderedDict[int, np.memmap] = OrderedDict()

    def _tokens(self, shard: int) -> np.memmap:
        tokens = self._open.pop(shard, None)
        if tokens is None:
            tokens = np.memmap(self.directory / f"{self.names[shard]}.bin", dtype=self.dtype, mode="r")
            if len(self._open) >= self.OPEN_SHARDS:
                self._open.popitem(last=False)
        self._open[shard] = tokens
        return tokens

    def locate(self, doc: int) -> tuple[int, int]:
        """(shard, document number inside that shard) of document ``doc``."""
        shard = int(np.searchsorted(self.first_doc, doc, side="right")) - 1
        return shard, doc - int(self.first_doc[shard])

    def read(self, doc: int, start: int, end: int) -> np.ndarray:
        shard, local = self.locate(doc)
        base = int(self.offsets[shard][local])
        assert 0 <= start <= end <= int(self.offsets[shard][local + 1]) - base, (doc, start, end)
        return np.asarray(self._tokens(shard)[base + start:base + end], dtype=np.int64)


def make_corpus(source: str, path: str | None):
    """The corpus of ``data.source`` / ``data.path``: a prepared directory when ``path`` holds
    ``index.json``, else the ``PATH.bin`` + ``PATH.idx.npy`` prefix."""
    if source == "stdlib":
        return StdlibCorpus()
    if is_prepared(path):
        return ShardedCorpus(path)
    if path is not None and Path(path).is_dir():
        raise ValueError(f"data.path: {path} is a directory without {INDEX_NAME}; write one with "
                         f"`distattn data prepare INPUT... --out {path}`")
    return TokenFileCorpus(path)
