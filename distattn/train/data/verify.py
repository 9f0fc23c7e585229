"""``distattn data verify``: a prepared folder (or a ``PATH.bin`` + ``PATH.idx.npy`` prefix) read
through once -- every shard's SHA-256 against ``index.json``, its offsets (integer, rising, within
its ``.bin``) and every token id below the vocabulary -- each problem one line naming the file and
the offset. Folders prepared before the hashes were recorded are checked on everything else."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from .corpus import load_offsets
from .sharded import INDEX_NAME, is_prepared, read_index

_CHUNK = 1 << 24                  # tokens read at a time: memory stays flat on any shard size
_HASH_BLOCK = 1 << 20
_HINT = "prepare it again with `distattn data prepare`"


def file_sha256(path: Path) -> str:
    """The SHA-256 of ``path``'s bytes, read 1 MiB at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def shard_hashes(directory: Path, name: str) -> dict:
    """What ``index.json`` records of a shard's bytes: ``bin_sha256`` and ``idx_sha256``."""
    return {"bin_sha256": file_sha256(directory / f"{name}.bin"),
            "idx_sha256": file_sha256(directory / f"{name}.idx.npy")}


def verify(path: str | Path, vocab_size: int | None = None) -> tuple[list[str], list[str]]:
    """(problems, notes) of a prepared folder or a token-file prefix; no problems: clean.
    ``vocab_size``: the bound on token ids (a folder's own vocabulary when not given)."""
    path = Path(path)
    if is_prepared(path):
        return _verify_folder(path, vocab_size)
    return _verify_prefix(path, vocab_size)


def _verify_folder(directory: Path, vocab_size: int | None) -> tuple[list[str], list[str]]:
    problems, notes = _hash_problems(directory)
    if problems:   # the bytes differ from what prepare wrote: what follows would only repeat it
        return problems, notes
    try:
        index = read_index(directory)
    except ValueError as exc:
        return [str(exc)], notes
    limit = vocab_size if vocab_size is not None else index["vocab_size"]
    dtype = np.dtype(index["dtype"]).newbyteorder("<")
    for shard in index["shards"]:
        bin_path = directory / f"{shard['name']}.bin"
        problems += _offset_problems(directory / f"{shard['name']}.idx.npy", shard["tokens"])
        problems += _token_problems(bin_path, dtype, limit)
    return problems, notes


def _hash_problems(directory: Path) -> tuple[list[str], list[str]]:
    try:
        shards = json.loads((directory / INDEX_NAME).read_text()).get("shards") or []
    except (OSError, ValueError, AttributeError) as exc:
        return [f"{directory / INDEX_NAME}: not a readable index ({type(exc).__name__}); {_HINT}"], []
    problems, unhashed = [], []
    for shard in shards:
        if not isinstance(shard, dict) or not isinstance(shard.get("name"), str):
            continue   # read_index names it
        if "bin_sha256" not in shard:
            unhashed.append(shard["name"])
            continue
        for suffix, key in ((".bin", "bin_sha256"), (".idx.npy", "idx_sha256")):
            file = directory / f"{shard['name']}{suffix}"
            got = file_sha256(file) if file.is_file() else "missing"
            if got != shard.get(key):
                problems.append(f"{file}: SHA-256 {got[:16]} is not the {str(shard.get(key))[:16]} {INDEX_NAME} "
                                f"records: the shard changed after it was prepared; {_HINT}")
    notes = [f"{directory}: {INDEX_NAME} records no SHA-256 for {len(unhashed)} shard(s) ({unhashed[0]}...), "
             f"prepared before hashes were recorded: their bytes cannot be fully verified"] if unhashed else []
    return problems, notes


def _offset_problems(idx_path: Path, tokens: int) -> list[str]:
    try:
        offsets = load_offsets(idx_path, _HINT, mmap=True)
    except ValueError as exc:
        return [str(exc)]
    steps = np.diff(offsets)
    if len(offsets) < 2 or offsets[0] != 0 or (steps <= 0).any() or offsets[-1] != tokens:
        bad = int(np.flatnonzero(steps <= 0)[0]) + 1 if (steps <= 0).any() else len(offsets) - 1
        return [f"{idx_path} at offset {bad}: document offsets must rise from 0 to the {tokens:,} tokens of its "
                f".bin, got {int(offsets[bad]) if len(offsets) else 'none'}; {_HINT}"]
    return []


def _token_problems(bin_path: Path, dtype: np.dtype, limit: int | None) -> list[str]:
    if limit is None or bin_path.stat().st_size == 0:
        return []
    tokens = np.memmap(bin_path, dtype=dtype, mode="r")
    for start in range(0, len(tokens), _CHUNK):
        chunk = np.asarray(tokens[start:start + _CHUNK])
        if chunk.max() >= limit:
            bad = start + int(np.flatnonzero(chunk >= limit)[0])
            return [f"{bin_path} at token {bad}: id {int(tokens[bad])} is outside the vocabulary of {limit:,}; "
                    f"{_HINT}"]
    return []


def _verify_prefix(prefix: Path, vocab_size: int | None) -> tuple[list[str], list[str]]:
    from .corpus import TokenFileCorpus

    try:
        corpus = TokenFileCorpus(prefix)
    except (ValueError, OSError) as exc:
        return [str(exc).splitlines()[0]], []
    notes = [] if vocab_size is not None else \
        [f"{prefix}: no --vocab-size given: token ids checked only against the file's dtype"]
    return _token_problems(corpus.bin_path, corpus.tokens.dtype, vocab_size), notes
