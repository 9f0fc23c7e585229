"""``distattn data prepare``: text, JSONL or Parquet files -> a directory of token shards for training.

On disk (``DIR`` is ``--out``)::

    DIR/index.json              {"format": "distattn-tokens", "version": 1,
                                 "tokenizer": "bytes", "vocab_size": 256, "dtype": "uint16",
                                 "tokens": T, "documents": D, "empty_documents": E,
                                 "skipped_documents": S, "skipped": [why, ...], "max_token": M,
                                 "shards": [{"name": "shard_00000", "tokens": t0, "documents": d0,
                                             "max_token": m0, "bin_sha256": h, "idx_sha256": h'}, ...],
                                 "settings": {the inputs (path, bytes, mtime_ns), tokenizer and its
                                              sha256, shard_tokens: what a rerun is checked against}}
    DIR/shard_00000.bin         t0 token ids, flat, little-endian uint16 (vocab_size <= 65536) or uint32
    DIR/shard_00000.idx.npy     int64 document offsets into that .bin: d0 + 1 entries, 0 ... t0
    DIR/shard_00001.bin ...

``max_token`` is the largest token id of a shard (``M``: of them all), recorded as the shard is
written so that ``distattn train`` checks it against ``model.vocab_size`` without reading the
shards (directories prepared before it was recorded are read once there instead).

Every shard is also a one-file corpus (``data.path: DIR/shard_00000`` reads it alone). Documents
are numbered across shards in order and never straddle two: a shard closes before the document
that would take it past ``shard_tokens`` (a longer document gets a shard of its own). There is
no separator token: the offsets keep documents apart, and the trainer's packer and attention
masks use them. Documents that tokenize to nothing are left out (counted as empty_documents).
A document that cannot be read (:mod:`.bad_rows`: a null row, text that is not UTF-8 or holds a
lone surrogate, JSON too deep or with an int too long, a Parquet page that does not decode) stops
the run with one line naming the file and line or row, or with ``on_bad_document="skip"`` is left
out and counted: ``"skipped_documents": S, "skipped": [the first reasons]`` in index.json.

Inputs, in the order given (a directory stands for its .txt/.jsonl/.parquet files, recursively,
sorted by path):

* ``.txt``: one document per file, UTF-8;
* ``.jsonl``: one document per line, a JSON object with a string ``text``; blank lines are skipped;
* ``.parquet``: one document per row of a string ``text`` column, read a batch of rows at a time.

Memory does not grow with the corpus: inputs are read a line or a batch of rows at a time, at
most ``2 * workers`` batches are in flight, and a shard is written to disk as it fills (the
largest single document is held whole). ``workers > 1`` tokenizes in a process pool whose
results are taken in order, so the output is the same for any number of workers.

Resuming: while it runs DIR also holds ``prepare_state.json`` (the settings, the shards done and
the input position after the last document of the last shard) and the ``*.tmp`` files of the
shard being written; a complete shard is renamed into place, then recorded. A rerun with the same
arguments drops the unrecorded files and continues from the recorded position, so the result is
byte-identical to an uninterrupted run; ``index.json`` is written last and marks DIR finished.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
from array import array
from pathlib import Path
from typing import Callable

import numpy as np

from .sharded import FORMAT, FORMAT_VERSION, INDEX_LIMIT, INDEX_NAME, token_dtype
from .corpus import max_token
from .verify import shard_hashes
from .bad_rows import KEEP, ON_BAD_DOCUMENT
from .progress import Progress
from .encode import tokenized
from .readers import batches, bytes_before, input_files, load_tokenizer
from ..safe_io import open_lock, read_regular, replace_text

DEFAULT_SHARD_TOKENS = 2**28
STATE_NAME = "prepare_state.json"
_SHARD_FILE = re.compile(r"shard_(\d+)\.(bin|idx\.npy)(\.tmp)?")


# ---- writing shards ---------------------------------------------------------------------------
def _write_json(path: Path, obj: dict) -> None:
    """Write ``obj`` to ``path`` atomically (:func:`~distattn.train.safe_io.replace_text`)."""
    replace_text(path, json.dumps(obj, indent=1) + "\n")


class _ShardWriter:
    """Appends documents to the current shard's temp files; a full shard is renamed into place and
    recorded in the state file, with the input position after its last document."""

    def __init__(self, out: Path, state: dict, dtype: np.dtype, on_shard: Callable[[int], None] | None):
        self.out, self.state, self.dtype, self.on_shard = out, state, dtype, on_shard
        self.limit = state["settings"]["shard_tokens"]
        self.position, self.empty = list(state["next"]), state["empty_documents"]
        self.skipped, self.reasons = state.get("skipped_documents", 0), list(state.get("skipped", []))
        self.file, self.offsets, self.max_token = None, array("q", [0]), -1

    @property
    def documents(self) -> int:
        return sum(s["documents"] for s in self.state["shards"]) + len(self.offsets) - 1

    def add(self, tokens: np.ndarray, position: list[int]) -> None:
        if len(tokens) == 0:
            self.empty += 1
        else:
            if len(self.offsets) > 1 and self.offsets[-1] + len(tokens) > self.limit:
                self.commit()
            if self.file is None:
                self.file = open(self._path(".bin.tmp"), "wb")
            self.file.write(tokens.tobytes())
            self.offsets.append(self.offsets[-1] + len(tokens))
            self.max_token = max(self.max_token, int(tokens.max()))
        self.position = position

    def skip(self, reason: str, position: list[int]) -> None:
        """A document that cannot be read, left out: counted, and among the first ``KEEP`` named."""
        self.skipped += 1
        if len(self.reasons) < KEEP:
            self.reasons.append(reason)
        self.position = position

    def counts(self) -> dict:
        """The counts of documents left out, as the state and index.json record them."""
        return {"empty_documents": self.empty, "skipped_documents": self.skipped, "skipped": list(self.reasons)}

    def _path(self, suffix: str) -> Path:
        return self.out / f"shard_{len(self.state['shards']):05d}{suffix}"

    def commit(self) -> None:
        """Close the current shard (which holds at least one document) and record it."""
        assert self.file is not None and len(self.offsets) > 1
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        with open(self._path(".idx.npy.tmp"), "wb") as f:
            np.save(f, np.frombuffer(self.offsets, dtype=np.int64))
        for suffix in (".bin", ".idx.npy"):
            os.replace(self._path(suffix + ".tmp"), self._path(suffix))
        name = self._path("").name
        self.state["shards"].append({"name": name, "tokens": self.offsets[-1], "documents": len(self.offsets) - 1,
                                     "max_token": self.max_token})
        self.state["next"] = self.position
        self.state.update(self.counts())
        _write_json(self.out / STATE_NAME, self.state)
        self.file, self.offsets, self.max_token = None, array("q", [0]), -1
        if self.on_shard is not None:
            self.on_shard(len(self.state["shards"]))

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


# ---- the output folder ------------------------------------------------------------------------
def _ours(out: Path) -> list[Path]:
    """Files a prepare writes into ``out``."""
    names = [out / INDEX_NAME, out / STATE_NAME]
    return [p for p in names if p.exists()] + sorted(p for p in out.glob("shard_*") if _SHARD_FILE.fullmatch(p.name)) \
        + sorted(out.glob("*.json.tmp"))


def _difference(old: dict, new: dict) -> str | None:
    """The first argument that differs between two settings, in words (None: the same)."""
    old_in, new_in = old.get("inputs", []), new["inputs"]
    if [i["path"] for i in old_in] != [i["path"] for i in new_in]:
        first = next((k for k, (a, b) in enumerate(zip(old_in, new_in)) if a["path"] != b["path"]), None)
        if first is None:
            return f"{len(old_in)} inputs, now {len(new_in)}"
        return f"input #{first + 1} {old_in[first]['path']}, now {new_in[first]['path']}"
    for a, b in zip(old_in, new_in):
        if a != b:
            return f"input {a['path']} as it was then (it has changed: size or modification time)"
    if old.get("tokenizer_sha256") != new["tokenizer_sha256"]:  # the same tokenizer by another path is fine
        if old.get("tokenizer") != new["tokenizer"]:
            return f"--tokenizer {old.get('tokenizer')}, now {new['tokenizer']}"
        return f"--tokenizer {new['tokenizer']} as it was then (its files have changed)"
    if old.get("shard_tokens") != new["shard_tokens"]:
        return f"--shard-tokens {old.get('shard_tokens')}, now {new['shard_tokens']}"
    return None


def _problem(record, state: bool) -> str | None:
    """What makes ``record`` (index.json, or prepare_state.json with ``state``) unusable, in words:
    enough is checked to compare its settings and to continue from it or report it."""
    if not isinstance(record, dict):
        return f"holds a JSON {type(record).__name__}, not an object"
    settings = record.get("settings")
    inputs = settings.get("inputs") if isinstance(settings, dict) else None
    if not isinstance(inputs, list) or not all(isinstance(i, dict) and isinstance(i.get("path"), str)
                                               for i in inputs):
        return "has no settings with a list of inputs"
    shards = record.get("shards")
    if not isinstance(shards, list):
        return "has no list of shards"
    for i, shard in enumerate(shards):
        want = f"shard_{i:05d}"
        if not isinstance(shard, dict) or shard.get("name") != want \
                or any(type(shard.get(k)) is not int or shard[k] < 1 for k in ("tokens", "documents")) \
                or ("max_token" in shard and (type(shard["max_token"]) is not int or shard["max_token"] < 0)):
            return f"gives shard #{i + 1} as {shard!r:.80}, not {{name: {want}, tokens, documents}}"
    if not (isinstance(settings.get("tokenizer"), str) and isinstance(settings.get("tokenizer_sha256"), str)
            and type(settings.get("shard_tokens")) is int and settings["shard_tokens"] >= 1):
        return "has no settings with a tokenizer and shard_tokens"
    if state:
        position = record.get("next")
        if not (isinstance(position, list) and len(position) == 3
                and all(type(x) is int and x >= 0 for x in position)):
            return f"gives the input position next={position!r:.80}, not three counts"
        size = inputs[position[0]].get("bytes") if position[0] < len(inputs) else 0
        if position[0] > len(inputs) or type(size) is not int or position[1] > size:
            return f"gives the input position next={position!r:.80}, past the end of its inputs"
        keys = ("empty_documents",)
    else:
        keys = ("tokens", "documents", "vocab_size")
    bad = next((k for k in keys if type(record.get(k)) is not int or record[k] < 0), None)
    if bad is None and ("skipped_documents" in record or "skipped" in record):   # since --on-bad-document
        skipped = record.get("skipped")
        if type(record.get("skipped_documents")) is not int or record["skipped_documents"] < 0:
            bad = "skipped_documents"
        elif not isinstance(skipped, list) or not all(isinstance(x, str) for x in skipped):
            return f"gives skipped={skipped!r:.80}, not a list of reasons"
    return None if bad is None else f"gives {bad}={record.get(bad)!r:.80}, not a count"


def _read_record(out: Path, name: str) -> dict:
    """``out``'s index.json or prepare_state.json; ``ValueError`` naming the file and the fix."""
    path = out / name
    try:
        record = json.loads(read_regular(path, INDEX_LIMIT, name))
        problem = _problem(record, name == STATE_NAME)
    except (OSError, UnicodeDecodeError, RecursionError, ValueError) as exc:  # ValueError: bad JSON, a FIFO
        problem = f"cannot be read ({str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__})"
    if problem is not None:
        raise ValueError(f"--out {out}: {path} {problem}; pass a new --out, or --overwrite to start over there")
    return record


def _start(out: Path, settings: dict, overwrite: bool, say: Callable[[str], None]) -> dict | None:
    """The state to continue from (a fresh one, or an interrupted run's), or None when ``out`` is finished."""
    if overwrite:
        ours = _ours(out)
        for path in ours:
            path.unlink()
        if ours:
            say(f"--overwrite: removed {len(ours)} files from {out}")
    for name in (INDEX_NAME, STATE_NAME):
        if (out / name).is_file():
            old = _read_record(out, name)
            diff = _difference(old["settings"], settings)
            if diff is not None:
                raise ValueError(f"--out {out} was prepared with other arguments ({diff}); use a new --out, or "
                                 f"--overwrite to replace it")
            if name == INDEX_NAME:
                (out / STATE_NAME).unlink(missing_ok=True)
                return None
            done = len(old["shards"])
            lost = next((s["name"] for s in old["shards"] if not all((out / f"{s['name']}{ext}").is_file()
                                                                   for ext in (".bin", ".idx.npy"))), None)
            if lost is not None:
                raise ValueError(f"--out {out}: {out / STATE_NAME} records {lost}, whose .bin or .idx.npy is "
                                 f"missing; pass a new --out, or --overwrite to start over there")
            for path in _ours(out):  # files of the shard being written, or renamed but not recorded
                shard = _SHARD_FILE.fullmatch(path.name)
                if path.name.endswith(".tmp") or (shard is not None and int(shard.group(1)) >= done):
                    path.unlink()
            say(f"resuming {out}: {done} shards done")
            return old
    if _ours(out) or any(not p.name.startswith(".") for p in out.iterdir()):
        raise ValueError(f"--out {out} is not empty and holds no unfinished prepare; use a new --out or --overwrite")
    state = {"settings": settings, "shards": [], "empty_documents": 0, "next": [0, 0, 0]}
    _write_json(out / STATE_NAME, state)  # a run stopped before its first shard is resumable too
    return state


@contextlib.contextmanager
def _locked(out: Path):
    try:
        out.mkdir(parents=True, exist_ok=True)
    except FileExistsError:   # a file, or a link to one or to nothing
        raise ValueError(f"--out {out} exists and is not a folder; pass a new --out (a folder, made if missing)") \
            from None
    except OSError as exc:    # a file on the way, no permission, /proc
        raise ValueError(f"--out {out} cannot be made a folder ({exc.strerror}); pass a new --out") from None
    lock = out / ".prepare.lock"
    there = lock.exists() or lock.is_symlink()
    try:
        handle = open_lock(lock)
    except ValueError:
        if there:   # open_lock's message says what to remove
            raise
        raise ValueError(f"--out {out} is a folder where no file can be made (read-only, or not a real file "
                         f"system); pass a new --out") from None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"--out {out} is being prepared by another process; wait for it or use a new --out") \
                from None
        # the lock file stays: unlinking it would let a process that opened it before (blocked on this
        # inode) and one that creates a new file both hold "the" lock. A dot-name: no check counts it.
        yield


def prepare(inputs: list[str | Path], out: str | Path, tokenizer: str = "bytes",
            shard_tokens: int = DEFAULT_SHARD_TOKENS, workers: int = 1, overwrite: bool = False,
            say: Callable[[str], None] | None = None, on_shard: Callable[[int], None] | None = None,
            on_bad_document: str = "fail") -> dict:
    """Tokenize ``inputs`` into shards under ``out`` (see the module docstring); returns the index.

    Continues an interrupted run of the same arguments; returns at once when ``out`` is finished.
    ``on_shard(n)`` is called after the n-th shard is recorded; ``on_bad_document`` ``"skip"`` leaves
    out a document that cannot be read (counted in the index) where ``"fail"`` refuses it. ``ValueError``
    for bad arguments and inputs, naming the argument and the fix."""
    if shard_tokens < 1 or workers < 1:
        raise ValueError(f"--shard-tokens ({shard_tokens}) and --workers ({workers}) must be >= 1")
    if on_bad_document not in ON_BAD_DOCUMENT:
        raise ValueError(f"--on-bad-document must be one of {', '.join(ON_BAD_DOCUMENT)}, got {on_bad_document!r}")
    say = say or logging.getLogger(__name__).info
    files = input_files(inputs)
    tok = load_tokenizer(tokenizer)
    dtype = token_dtype(tok.vocab_size)
    settings = {"inputs": [{"path": str(p), "bytes": p.stat().st_size, "mtime_ns": p.stat().st_mtime_ns}
                           for p, _ in files],
                "tokenizer": tokenizer, "tokenizer_sha256": tok.fingerprint, "shard_tokens": shard_tokens}
    out = Path(out)
    with _locked(out):
        state = _start(out, settings, overwrite, say)
        if state is None:
            index = _read_record(out, INDEX_NAME)
            say(f"{out} is already prepared: {index['documents']:,} documents, {index['tokens']:,} tokens in "
                f"{len(index['shards'])} shards; nothing to do")
            return index
        before = bytes_before(files)
        writer = _ShardWriter(out, state, dtype, on_shard)
        progress = Progress(before[-1], _position_bytes(files, before, state["next"]), say, "prepare")
        skip = on_bad_document == "skip"
        try:
            with contextlib.closing(tokenized(batches(files, state["next"]), tok, workers, skip)) as results:
                for batch, (tokens, lengths, bad) in results:
                    _add(writer, batch, tokens, lengths, bad)
                    progress.update(batch["done"][-1], lambda: f"{writer.documents:,} documents, "
                                                               f"{len(writer.state['shards'])} shards")
            if len(writer.offsets) > 1:
                writer.commit()
        finally:
            writer.close()
            progress.close()
        state.update(writer.counts())   # those after the last shard too (all of them, when no shard was written)
        if writer.skipped and writer.reasons:
            say(f"--on-bad-document skip: left out {writer.skipped:,} documents that cannot be read (first: "
                f"{writer.reasons[0]})")
        return _finish(out, state, tok, dtype)


def _add(writer: _ShardWriter, batch: dict, tokens: np.ndarray, lengths: np.ndarray, bad: dict) -> None:
    """A tokenized batch's documents into the shards, those in ``bad`` counted as skipped."""
    ends = np.cumsum(lengths)
    for i, (end, length, position) in enumerate(zip(ends.tolist(), lengths.tolist(), batch["positions"])):
        if i in bad:
            writer.skip(bad[i], position)
        else:
            writer.add(tokens[end - length:end], position)


def _position_bytes(files: list[tuple[Path, str]], before: list[int], position: list[int]) -> int:
    """Input bytes done at a resume position (Parquet rows counted as their share of the file)."""
    i, offset, record = position
    if i >= len(files) or files[i][1] != "parquet":
        return min(before[i] + offset, before[-1])
    import pyarrow.parquet as pq

    rows = pq.ParquetFile(files[i][0]).metadata.num_rows
    return before[i] + files[i][0].stat().st_size * record // max(rows, 1)


def _finish(out: Path, state: dict, tok, dtype: np.dtype) -> dict:
    shards = state["shards"]
    if not shards:
        raise ValueError(f"INPUT: no document has any tokens ({state['empty_documents']} empty, "
                         f"{state['skipped_documents']} skipped); nothing to prepare")
    for shard in shards:
        if "max_token" not in shard:   # recorded by an older prepare that was interrupted: read once, here
            shard["max_token"] = max_token(out / f"{shard['name']}.bin", dtype)
        if "bin_sha256" not in shard:   # what `distattn data verify` and a resume's data identity check
            shard.update(shard_hashes(out, shard["name"]))
    index = {"format": FORMAT, "version": FORMAT_VERSION, "tokenizer": state["settings"]["tokenizer"],
             "vocab_size": tok.vocab_size,
             "dtype": dtype.name, "tokens": sum(s["tokens"] for s in shards),
             "documents": sum(s["documents"] for s in shards), "empty_documents": state["empty_documents"],
             "skipped_documents": state["skipped_documents"], "skipped": state["skipped"],
             "max_token": max(s["max_token"] for s in shards), "shards": shards, "settings": state["settings"]}
    _write_json(out / INDEX_NAME, index)
    (out / STATE_NAME).unlink(missing_ok=True)
    return index
