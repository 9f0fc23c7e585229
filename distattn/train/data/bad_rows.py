"""Bad documents: a line or row that cannot become a document -- a null text, text that is not valid
UTF-8 or holds a lone surrogate (which no UTF-8 tokenizer can encode), JSON nested past Python's
recursion limit or with an int too long to convert, a Parquet page that does not decode. Each is
named by file and line or row (:class:`BadDocument`, a ``ValueError``), and ``data.on_bad_document:
skip`` (``distattn data prepare --on-bad-document skip``) passes over them instead of refusing.

``data.source: hf`` is scanned in full before any rank starts (:func:`scan_hf`): every file's column
is read once, each Parquet row group on its own (a corrupt page names the file and row group, and
its rows are the bad ones: the trainer reads a row group whole, so it loses them all too). Parquet
statistics are not trusted for this: a writer may leave them out, and they say nothing of the
bytes. What a file holds is remembered in ``SCAN_DIR`` under ``train.out`` (one small JSON per file,
named by a hash of the file's absolute path, size, mtime_ns and the column), so a resume, or a
rerun with ``data.on_bad_document: skip``, does not read it again; a changed file gets a new entry,
and an entry that cannot be read or does not match is ignored and the file scanned again. The
tokenizer is not part of the key: what is checked is a property of the bytes, not of a vocabulary.
Each entry has a ``.lock`` beside it, held while it is made: every rank of a launched job runs the
preflight, and those sharing ``train.out`` wait for one scan instead of each making its own.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..safe_io import one_line, open_lock, read_regular, replace_text
from .progress import Progress

ON_BAD_DOCUMENT = ("fail", "skip")
SCAN_DIR = ".data_scan"     # under train.out: a dot-folder, which no check of a run's files counts
SCAN_VERSION = 1
KEEP = 5                    # bad rows named per file (the count covers them all)
SKIP_HINT = "fix or drop it, or set data.on_bad_document: skip to train without it"
_log = logging.getLogger(__name__)


class BadDocument(ValueError):
    """A document that cannot be read, in one line naming the file and its line or row."""


def text_problem(text: str) -> str | None:
    """Why a decoded ``text`` cannot be tokenized (a lone surrogate: a JSON ``\\ud800`` escape), or None."""
    if text.isascii():   # the common case, without a copy
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"holds a lone surrogate {text[exc.start]!r} at character {exc.start}, which UTF-8 cannot encode"
    return None


@dataclass(frozen=True)
class FileScan:
    """What one file's column holds: its rows, how many are bad and the first ``KEEP`` as (row, reason)."""
    file: str
    rows: int
    bad: int
    first: tuple[tuple[int, str], ...]

    def line(self) -> str:
        """The first bad row in words."""
        row, reason = self.first[0]
        return f"{self.file} row {row + 1}: {reason}"   # (rows counted from 1 in words, as data prepare counts)


def binary_view(values):
    """An Arrow string array's bytes as they are: Arrow does not check the UTF-8 a writer gave it."""
    import pyarrow as pa

    return values.view(pa.large_binary() if pa.types.is_large_string(values.type) else pa.binary())


def not_utf8(column: str, exc: UnicodeDecodeError) -> str:
    """Why a string of ``column`` that failed to decode is bad."""
    return f"'{column}' is not valid UTF-8 at byte {exc.start} ({exc.reason})"


def array_problems(values, start: int, column: str) -> tuple[int, list[tuple[int, str]]]:
    """(how many, (row, reason) of the first ``KEEP``) bad rows of an Arrow array (a Parquet row
    group's or an Arrow chunk's column) whose first row is row ``start`` of its file: nulls, and
    strings that are not UTF-8."""
    import pyarrow as pa

    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    found, count = [], values.null_count
    if values.null_count:
        nulls = values.is_null().to_numpy(zero_copy_only=False).nonzero()[0][:KEEP]
        found += [(start + int(i), f"'{column}' is null") for i in nulls]
    if pa.types.is_string(values.type) or pa.types.is_large_string(values.type):
        try:
            values.validate(full=True)   # checks every string's UTF-8, in C
        except pa.ArrowInvalid:
            for i, data in enumerate(binary_view(values).to_pylist()):
                try:
                    data is None or data.decode("utf-8")
                except UnicodeDecodeError as exc:
                    count += 1
                    found.append((start + i, not_utf8(column, exc)))
    return count, sorted(found)[:KEEP]


def group_problem(group: int, start: int, rows: int, exc: BaseException) -> str:
    """Why every row of a Parquet row group that does not decode is bad (``start``: its first row, from 0;
    the words count rows from 1, as every message of ours does)."""
    return f"row group {group} (rows {start + 1}-{start + rows}) cannot be decoded ({one_line(exc)[:200]})"


def _block_problems(pf, group: int, start: int, rows: int, column: str) -> tuple[int, list[tuple[int, str]]]:
    """(bad rows, the first named) of Parquet row group ``group``: all of them when it does not decode."""
    try:
        values = pf.read_row_group(group, columns=[column]).column(0)
    except Exception as exc:  # pyarrow raises OSError / ArrowException (and others) for a damaged page
        return rows, [(start, group_problem(group, start, rows, exc))]
    return array_problems(values, start, column)


def arrow_table(path: Path):
    """A ``save_to_disk`` Arrow file's table, memory-mapped; ``ValueError`` naming it when unreadable."""
    import pyarrow as pa

    try:   # memory-mapped: the record batches point into the file, nothing is copied
        return pa.ipc.open_stream(pa.memory_map(str(path), "r")).read_all()
    except (pa.ArrowInvalid, OSError) as exc:
        raise ValueError(f"data.path: {path} is not a readable Arrow stream ({str(exc).splitlines()[0]}); save "
                         f"the dataset again with Dataset.save_to_disk") from None


def _scan_file(kind: str, file: Path, column: str, progress: Callable[[int], None]) -> FileScan:
    """Read ``file``'s column through; ``progress(bytes)`` after each block."""
    import pyarrow.parquet as pq

    found, start, bad = [], 0, 0
    if kind == "arrow":
        chunks = arrow_table(file).column(column).chunks
        sizes = [len(c) for c in chunks]
    else:
        pf = pq.ParquetFile(file)
        sizes = [pf.metadata.row_group(g).num_rows for g in range(pf.metadata.num_row_groups)]
    size, total = file.stat().st_size, max(sum(sizes), 1)
    for block, rows in enumerate(sizes):
        if kind == "arrow":
            count, problems = array_problems(chunks[block], start, column)
        else:
            count, problems = _block_problems(pf, block, start, rows, column)
        bad += count
        found += problems[:max(KEEP - len(found), 0)]
        start += rows
        progress(size * start // total)
    return FileScan(str(file), start, bad, tuple(found))


def _cache_path(cache: Path, file: Path, column: str) -> tuple[Path, dict]:
    info = file.stat()
    key = {"path": str(file.absolute()), "bytes": info.st_size, "mtime_ns": info.st_mtime_ns, "column": column,
           "version": SCAN_VERSION}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    return cache / f"{digest}.json", key


def _cached(path: Path, key: dict, file: Path) -> FileScan | None:
    """The scan stored at ``path`` if it is for ``key``; None for anything else (absent, damaged, stale)."""
    try:
        obj = json.loads(read_regular(path, 1 << 20, "data scan"))
        if obj["key"] != key:
            return None
        rows, bad, first = obj["rows"], obj["bad"], tuple((int(r), str(w)) for r, w in obj["first"])
        if type(rows) is not int or type(bad) is not int or not 0 <= bad <= rows or (bad > 0) != bool(first):
            return None
        return FileScan(str(file), rows, bad, first)
    except FileNotFoundError:
        return None
    except Exception as exc:  # any damage: scan again (the cache only saves time)
        _log.debug("ignoring the data scan cache %s (%s); scanning %s again", path, one_line(exc), file)
        return None


def _store(path: Path, key: dict, scan: FileScan) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        replace_text(path, json.dumps({"key": key, "rows": scan.rows, "bad": scan.bad,
                                       "first": [list(p) for p in scan.first]}) + "\n")
    except OSError as exc:   # a read-only out: the next run scans again, nothing worse
        _log.debug("cannot store the data scan %s (%s)", path, one_line(exc))


@contextlib.contextmanager
def _scanning(entry: Path | None):
    """Hold ``entry``'s lock while it is looked up and, if missing, made: every rank of a launched job
    runs the preflight, and those sharing ``train.out`` then read one scan instead of each making one."""
    handle = None
    if entry is not None:
        try:
            entry.parent.mkdir(parents=True, exist_ok=True)
            handle = open_lock(entry.with_suffix(".lock"))
        except (OSError, ValueError) as exc:   # no lock where no cache can be kept either: scan alone
            _log.debug("data scan without a lock at %s (%s)", entry, exc)
    try:
        if handle is not None:
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield
    finally:
        if handle is not None:
            handle.close()   # the lock file stays (unlinked, a waiter could lock a file no one else sees)


def scan_hf(kind: str, files: list[Path], column: str, cache: Path | None,
            say: Callable[[str], None] | None = None) -> list[FileScan]:
    """Every file of a ``data.source: hf`` corpus scanned for bad rows (module docstring), from
    ``cache`` (a folder; None: no cache) where it holds the file's scan."""
    say = say or _log.info
    sizes = [f.stat().st_size for f in files]
    progress = Progress(sum(sizes), 0, say, "data scan")
    out, before = [], 0
    try:
        for file, size in zip(files, sizes):
            where = _cache_path(cache, file, column) if cache is not None else None
            with _scanning(where[0] if where is not None else None):
                scan = _cached(*where, file) if where is not None else None
                if scan is None:
                    scan = _scan_file(kind, file, column, lambda done: progress.update(before + done, file.name))
                    if where is not None:
                        _store(where[0], where[1], scan)
            out.append(scan)
            before += size
            progress.update(before)
    finally:
        progress.close()
    return out
