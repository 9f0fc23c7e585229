"""A prepared corpus: the folder ``distattn data prepare`` writes (``index.json`` and its shards,
format in :mod:`.prepare`), checked when opened and read shard by shard (:class:`ShardedCorpus`)."""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import numpy as np

from ..safe_io import read_regular
from .corpus import load_offsets, max_token


INDEX_NAME = "index.json"
INDEX_LIMIT = 64 << 20          # bytes: an index lists shards, a few hundred bytes each
FORMAT = "distattn-tokens"
FORMAT_VERSION = 1
_CHUNK = 1 << 24                # offsets checked at a time
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
    if not isinstance(index, dict) or index.get("format") != FORMAT or type(index.get("version")) is not int \
            or index["version"] != FORMAT_VERSION:
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


def plain_name(name) -> bool:
    """Whether a shard's ``name`` in ``index.json`` is a file name inside its folder (no path, no link
    out of it through ``..``)."""
    return (isinstance(name, str) and bool(name) and "\0" not in name and "\\" not in name
            and name not in (".", "..") and name == Path(name).name)


def _check_entry(path: Path, shard) -> None:
    """A shard entry of ``index.json``: a plain file name inside its folder and two counts."""
    name = shard.get("name") if isinstance(shard, dict) else None
    if not plain_name(name):
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
    # what ShardedCorpus refuses in every rank, refused here before any starts (a chunk at a time: a
    # memory map of any size)
    for a in range(0, len(offsets) - 1, _CHUNK):
        if (np.diff(offsets[a:a + _CHUNK + 1]) <= 0).any():
            raise ValueError(f"data.path: {idx_path} has empty or decreasing documents; {_PREPARE_HINT}")


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

