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
* ``megatron``: Megatron-core indexed datasets, ``PREFIX.bin`` + ``PREFIX.idx``
  (:mod:`distattn.train.megatron_source`).
* ``hf``: a Hugging Face ``save_to_disk`` folder or Parquet files, ``text``
  tokenized as the packer reaches it, or ``input_ids`` as they are
  (:mod:`distattn.train.hf_source`).
* ``blend``: several of those mixed by weight (:class:`Blend`).

:class:`Packer` walks the documents in a seeded order per epoch and fills
sequences of ``seq_len`` tokens greedily; a document cut at the end of a
sequence continues at the start of the next one, so nothing is skipped or
repeated (empty documents are passed over). Its whole state is three ints
(:meth:`Packer.state`; a blend's is ``1 + 3 * sources``). Data parallelism
(:mod:`.global_batch`): every rank cuts the same global batch, reads only its own.

A blend draws each next document from the source whose share of the tokens
drawn so far lags its weight the most (ties: the first listed), so every
source's token share stays within about one document of its weight (Megatron's
``BlendedDataset`` does the same per sample). Each source is walked in its own
seeded order, epoch after epoch. The stream is a function of the seed alone,
and the state after any sequence says exactly where it is.
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


class FlatCorpus:
    """Documents as ranges of one memory-mapped token array: document ``d`` is
    ``tokens[offsets[d]:offsets[d + 1]]``."""

    tokens: np.ndarray
    offsets: np.ndarray

    def read(self, doc: int, start: int, end: int) -> np.ndarray:
        base = int(self.offsets[doc])
        return np.asarray(self.tokens[base + start:base + end], dtype=np.int64)


class TokenFileCorpus(FlatCorpus):
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


def write_token_file(path: str | Path, docs: list[np.ndarray], dtype=np.uint16) -> None:
    """Write documents (int arrays) as ``PATH.bin`` + ``PATH.idx.npy``."""
    path = Path(path)
    np.concatenate([np.asarray(d, dtype=dtype) for d in docs]).tofile(path.with_name(path.name + ".bin"))
    np.save(path.with_name(path.name + ".idx.npy"),
            np.concatenate([[0], np.cumsum([len(d) for d in docs])]).astype(np.int64))


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

    def __init__(self, corpus, seq_len: int, seed: int = 0):
        self.corpus, self.seq_len, self.seed = corpus, seq_len, seed
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
        """The tokens of ``pieces`` (:meth:`cut`'s), one after the other."""
        return np.concatenate([self.corpora[s].read(d, a, b) for s, d, a, b in pieces] or [np.zeros(0, np.int64)])

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


def make_corpus(source, path: str | None = None, tokenizer: str | None = None):
    """The corpus of a data section: ``make_corpus(cfg.data)`` (a blend needs the whole section), or
    ``make_corpus(source, path, tokenizer)`` for one source. ``tokens``: a prepared directory when
    ``path`` holds ``index.json``, else the ``PATH.bin`` + ``PATH.idx.npy`` prefix."""
    if not isinstance(source, str):   # a DataConfig
        data = source
        if data.source == "blend":
            return Blend([make_corpus(e.source, e.path, e.tokenizer) for e in data.blend],
                         [e.weight for e in data.blend])
        return make_corpus(data.source, data.path, data.tokenizer)
    if source == "blend":
        raise ValueError("data.source: blend needs the whole data section: make_corpus(cfg.data)")
    if source == "stdlib":
        return StdlibCorpus()
    if source == "megatron":
        from .megatron_source import MegatronCorpus

        return MegatronCorpus(path)
    if source == "hf":
        from .hf_source import HFCorpus

        return HFCorpus(path, tokenizer)
    if is_prepared(path):
        return ShardedCorpus(path)
    if path is not None and Path(path).is_dir():
        raise ValueError(f"data.path: {path} is a directory without {INDEX_NAME}; write one with "
                         f"`distattn data prepare INPUT... --out {path}`")
    return TokenFileCorpus(path)
