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
from .sharded import INDEX_LIMIT, INDEX_NAME, index_vocab, is_prepared, plain_name, read_index, token_dtype
from ..safe_io import read_regular

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
    if path.is_dir():   # (not PATH.bin: a folder is never a prefix)
        return [f"{path} is a folder without an index.json, so not one `distattn data prepare` wrote: pass a "
                f"prepared folder, or the prefix of a token file (PREFIX.bin and PREFIX.idx.npy)"], []
    return _verify_prefix(path, vocab_size)


def _verify_folder(directory: Path, vocab_size: int | None) -> tuple[list[str], list[str]]:
    problems, notes = _hash_problems(directory)
    if problems:   # the bytes differ from what prepare wrote: what follows would only repeat it
        return problems, notes
    try:
        index = read_index(directory)
        _check_totals(directory, index)
    except ValueError as exc:
        return [str(exc)], notes
    limit = vocab_size if vocab_size is not None else index["vocab_size"]
    dtype = np.dtype(index["dtype"]).newbyteorder("<")
    for shard in index["shards"]:
        bin_path = directory / f"{shard['name']}.bin"
        problems += _offset_problems(directory / f"{shard['name']}.idx.npy", shard["tokens"])
        problems += _token_problems(bin_path, dtype, limit, shard.get("max_token"))
    return problems, notes


def _check_totals(directory: Path, index: dict) -> None:
    """``ValueError`` unless the index's vocabulary is a size and its totals are its shards' sums."""
    vocab = index_vocab(directory, index)
    if vocab > 2**32 or token_dtype(vocab).name != index["dtype"]:
        raise ValueError(f"{directory / INDEX_NAME} gives vocab_size={vocab:,}, which {index['dtype']} token ids do "
                         f"not match: the index was changed after it was prepared; {_HINT}")
    shards = index["shards"]
    sums = {"tokens": sum(s["tokens"] for s in shards), "documents": sum(s["documents"] for s in shards)}
    if all("max_token" in s for s in shards) and "max_token" in index:
        sums["max_token"] = max(s["max_token"] for s in shards)
    for key, want in sums.items():
        if index.get(key) != want or type(index.get(key)) is not int:
            raise ValueError(f"{directory / INDEX_NAME} gives {key}={index.get(key)!r:.40}, but its shards add up to "
                             f"{want:,}: the index was changed after it was prepared; {_HINT}")


def _hash_problems(directory: Path) -> tuple[list[str], list[str]]:
    try:
        index = json.loads(read_regular(directory / INDEX_NAME, INDEX_LIMIT, INDEX_NAME))
    except (OSError, ValueError, RecursionError) as exc:   # RecursionError: nested past the parser's depth
        return [f"{directory / INDEX_NAME}: not a readable index ({type(exc).__name__}); {_HINT}"], []
    shards = index.get("shards") if isinstance(index, dict) else None
    problems, unhashed = [], []
    for shard in shards if isinstance(shards, list) else []:
        # a name that leads out of the folder is not hashed (read_index refuses it unread)
        if not isinstance(shard, dict) or not plain_name(shard.get("name")):
            continue
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


def _token_problems(bin_path: Path, dtype: np.dtype, limit: int | None, recorded: int | None = None) -> list[str]:
    """The first token id of ``bin_path`` at or above ``limit``; else, when the index ``recorded`` the
    shard's largest id (what ``train`` checks the vocabulary against), a largest id that differs."""
    if (limit is None and recorded is None) or bin_path.stat().st_size == 0:
        return []
    tokens = np.memmap(bin_path, dtype=dtype, mode="r")
    top = -1
    for start in range(0, len(tokens), _CHUNK):
        chunk = np.asarray(tokens[start:start + _CHUNK])
        top = max(top, int(chunk.max()))
        if limit is not None and top >= limit:
            bad = start + int(np.flatnonzero(chunk >= limit)[0])
            return [f"{bin_path} at token {bad}: id {int(tokens[bad])} is outside the vocabulary of {limit:,}; "
                    f"{_HINT}"]
    if recorded is not None and recorded != top:
        return [f"{bin_path}: its largest token id is {top}, but {INDEX_NAME} records max_token={recorded} (what "
                f"`distattn train` checks model.vocab_size against); {_HINT}"]
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
