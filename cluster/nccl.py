"""Parse nccl-tests output (``all_reduce_perf``, ``all_gather_perf``, ``alltoall_perf``, ``sendrecv_perf``, ...).

The header line (``#  size  count  type  redop  root  time  algbw  busbw  #wrong  time ...``) names the
columns; of the repeated ``time/algbw/busbw/#wrong`` groups the first is out-of-place and the second,
when there is one, in-place (some runs print only the first). Handled as well: lines prefixed
by mpirun (``[1,0]<stdout>:``), NCCL INFO/WARN lines interleaved with the table, ``N/A`` in any
figure column (kept as ``null``), and the ``# Avg bus bandwidth`` trailer. Output, as pinned in DESIGN::

    {"rows": [{"size", "count", "type", "redop", "root", "time_us", "algbw", "busbw", "wrong",
               "in_place": {"time_us", "algbw", "busbw", "wrong"} | None}, ...],
     "avg_busbw": float | None}

(out-of-place figures in ``time_us``/``algbw``/``busbw``). ``avg_busbw`` is the trailer's figure when
the log has one, else the mean out-of-place ``busbw`` of the rows that have one, else ``None``.
A negative size, count, time or bandwidth, or a non-finite figure, is a ``ValueError`` naming the
line: such a log is corrupt, and its numbers must not reach a profile or a JSON file.

Files are streamed (:func:`write_nccl_json`): memory does not grow with the log, which with
``NCCL_DEBUG=INFO`` or many concatenated runs reaches hundreds of MB. Only the standard library is
imported, so ``distattn cluster nccl-parse`` starts without torch or numpy.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from pathlib import Path
from typing import Iterable, Iterator, TextIO

_PREFIX = re.compile(r"^\[\d+,\d+\]<\w+>:\s?")
_AVG = re.compile(r"#\s*Avg bus bandwidth\s*:\s*(\S+)")
_GROUP_COLUMNS = ("time", "algbw", "busbw", "#wrong", "error")
# physical quantities: a negative one is a corrupt log (``root`` is legitimately -1)
_NON_NEGATIVE = frozenset(("size", "count", "time", "algbw", "busbw", "Avg bus bandwidth"))


def strip_launcher_prefix(line: str) -> str:
    line = line.rstrip("\n")
    return _PREFIX.sub("", line) if line.startswith("[") else line


def _number(token: str, what: str, lineno: int) -> int | float | None:
    if token in ("N/A", "n/a"):
        return None
    try:
        value = float(token) if "." in token or "e" in token or "E" in token else int(token)
    except ValueError:  # int() rejects 'inf' and 'nan' too
        raise ValueError(f"line {lineno}: {what} is {token!r}, not a number") from None
    if type(value) is float and not math.isfinite(value):  # 1e999 parses as inf
        raise ValueError(f"line {lineno}: {what} is {token!r}, not a finite number")
    if type(value) is int and abs(value) >= 2**63:   # no float holds it exactly; nccl-tests prints 64-bit counts
        raise ValueError(f"line {lineno}: {what} is {len(token)} digits long, past any count nccl-tests prints")
    if value < 0 and what in _NON_NEGATIVE:
        raise ValueError(f"line {lineno}: {what} is {token!r}; it cannot be negative (corrupt log?)")
    return value


def _figures(group: dict) -> dict:
    return {"time_us": group.get("time"), "algbw": group.get("algbw"), "busbw": group.get("busbw"),
            "wrong": group.get("#wrong", group.get("error"))}


class _Parser:
    """Line-by-line state: the current header, the trailer, and a running mean of busbw (O(1) memory)."""

    def __init__(self) -> None:
        self.columns: list[str] | None = None
        self.trailer: float | None = None
        self.rows = 0
        self.valid = 0
        self.mean = 0.0

    def rows_of(self, lines: Iterable[str]) -> Iterator[dict]:
        for lineno, raw in enumerate(lines, start=1):
            row = self._line(lineno, raw)
            if row is not None:
                yield row

    def _line(self, lineno: int, raw: str) -> dict | None:
        line = strip_launcher_prefix(raw)
        stripped = line.strip()
        if not stripped or "NCCL INFO" in line or "NCCL WARN" in line:
            return None
        if stripped[0] == "#":
            tokens = stripped.lstrip("#").split()
            if "size" in tokens and "count" in tokens:
                self.columns = tokens
            match = _AVG.match(stripped)
            if match:
                avg = _number(match.group(1), "Avg bus bandwidth", lineno)
                self.trailer = None if avg is None else float(avg)
            return None
        if self.columns is None or not (stripped[0].isdigit() or stripped[0] == "-" and stripped[1:2].isdigit()):
            return None  # banners and other chatter (a row with a negative size is still a row: it must fail)
        tokens = stripped.split()
        if len(tokens) != len(self.columns):
            raise ValueError(f"line {lineno}: {len(tokens)} fields but the header has {len(self.columns)} columns "
                             f"({' '.join(self.columns)}): {stripped!r}")
        row, groups = {}, [{}]
        for name, token in zip(self.columns, tokens):
            if name in _GROUP_COLUMNS:
                if name in groups[-1]:
                    groups.append({})
                groups[-1][name] = _number(token, name, lineno)
            elif name == "type" or name == "redop":
                row[name] = token
            else:
                row[name] = _number(token, name, lineno)
        if "time" not in groups[0]:
            raise ValueError(f"line {lineno}: the header has no time/algbw/busbw columns")
        out = {"size": row.get("size"), "count": row.get("count"), "type": row.get("type"),
               "redop": row.get("redop"), "root": row.get("root"), **_figures(groups[0]),
               "in_place": _figures(groups[1]) if len(groups) > 1 else None}
        self.rows += 1
        if out["busbw"] is not None:
            # a running mean stays finite where a sum of large finite figures could overflow
            self.valid += 1
            self.mean += (out["busbw"] - self.mean) / self.valid
        return out

    def avg_busbw(self) -> float | None:
        """The trailer, else the mean busbw of the rows that have one, else None; raises on an empty table."""
        if self.columns is None:
            raise ValueError("no nccl-tests header line (# size count type ...) found")
        if not self.rows:
            raise ValueError("the nccl-tests output has a header but no result rows")
        if self.trailer is not None:
            return self.trailer
        return self.mean if self.valid else None


def parse_nccl_tests(text: str) -> dict:
    """Parse one nccl-tests run held in memory (see module docstring); ``ValueError`` names the offending line."""
    parser = _Parser()
    rows = list(parser.rows_of(text.splitlines()))
    return {"rows": rows, "avg_busbw": parser.avg_busbw()}


def _open(path: str | Path) -> TextIO:
    # hostnames and device strings in a log may not be UTF-8; they never matter to the table
    return open(path, encoding="utf-8", errors="replace")


def parse_nccl_tests_file(path: str | Path) -> dict:
    """:func:`parse_nccl_tests` of a file, read line by line (the rows are kept: see :func:`write_nccl_json`)."""
    parser = _Parser()
    try:
        with _open(path) as f:
            rows = list(parser.rows_of(f))
        return {"rows": rows, "avg_busbw": parser.avg_busbw()}
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


def write_nccl_json(path: str | Path, out: TextIO) -> None:
    """Write the JSON of :func:`parse_nccl_tests_file` to ``out`` in memory independent of the file's size.

    Two passes over the file: the first validates every line and computes ``avg_busbw`` (so a bad
    line raises before anything is written), the second writes the rows one per line.
    """
    first = _Parser()
    try:
        with _open(path) as f:
            for _ in first.rows_of(f):
                pass
        avg = first.avg_busbw()
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    out.write('{"rows": [')
    sep = "\n "
    with _open(path) as f:  # no more rows than were validated, should the log grow meanwhile
        for row in itertools.islice(_Parser().rows_of(f), first.rows):
            out.write(sep + json.dumps(row, allow_nan=False))
            sep = ",\n "
    out.write(f'\n ],\n "avg_busbw": {json.dumps(avg, allow_nan=False)}\n}}\n')


__all__ = ["parse_nccl_tests", "parse_nccl_tests_file", "write_nccl_json", "strip_launcher_prefix"]
