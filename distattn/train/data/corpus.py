"""The corpus base every source builds on: byte-level text (:data:`BYTE_VOCAB`, the ``stdlib`` source),
token offsets and files (:func:`load_offsets`, :func:`write_token_file`) and the flat token corpora
(:class:`FlatCorpus`, :class:`TokenFileCorpus`). A corpus is ``lengths`` (one per document) and
``read(doc, start, end)`` (an int64 slice of a document's tokens)."""

from __future__ import annotations

import sysconfig
import tokenize
from pathlib import Path

import numpy as np


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
    if not Path(idx_path).is_file():   # np.load would block on a FIFO with no writer
        raise ValueError(f"data.path: {idx_path} is not a regular file of document offsets; {hint}")
    try:
        offsets = np.load(idx_path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except _NPY_ERRORS as exc:
        detail = str(exc.args[0] if isinstance(exc, tokenize.TokenError) and exc.args else exc)  # args: (msg, pos)
        reason = detail.splitlines()[0][:200] if detail.strip() else type(exc).__name__
        raise ValueError(f"data.path: {idx_path} is not a readable .npy array of document offsets ({reason}); "
                         f"{hint}") from None
    # float offsets truncate when used as indices: a token read twice, another never; bool/complex likewise
    if offsets.dtype.kind not in "iu":
        raise ValueError(f"data.path: {idx_path} holds {offsets.dtype} document offsets, not integers; {hint}")
    return offsets


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
            if not p.is_file():   # a FIFO or a device would block the read
                raise ValueError(f"data.path: {p} does not exist or is not a regular file (write one with "
                                 f"distattn.train.data.write_token_file)")
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

