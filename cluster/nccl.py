"""Parse nccl-tests output (``all_reduce_perf``, ``all_gather_perf``, ``alltoall_perf``, ``sendrecv_perf``, ...).

The header line (``#  size  count  type  redop  root  time  algbw  busbw  #wrong  time ...``) names the
columns; of the repeated ``time/algbw/busbw/#wrong`` groups the first is out-of-place and the second,
when there is one, in-place (some runs print only the first). Handled as well: lines prefixed
by mpirun (``[1,0]<stdout>:``), NCCL INFO/WARN lines interleaved with the table, ``N/A`` in the
error-count column, and the ``# Avg bus bandwidth`` trailer. Output, as pinned in DESIGN::

    {"rows": [{"size", "count", "type", "redop", "root", "time_us", "algbw", "busbw", "wrong",
               "in_place": {"time_us", "algbw", "busbw", "wrong"} | None}, ...],
     "avg_busbw": float}

(out-of-place figures in ``time_us``/``algbw``/``busbw``).
"""

from __future__ import annotations

import re
from pathlib import Path

_PREFIX = re.compile(r"^\[\d+,\d+\]<\w+>:\s?")
_GROUP_COLUMNS = ("time", "algbw", "busbw", "#wrong", "error")


def strip_launcher_prefix(line: str) -> str:
    return _PREFIX.sub("", line.rstrip("\n"))


def _number(token: str, what: str, lineno: int):
    if token in ("N/A", "n/a"):
        return None
    try:
        return float(token) if any(c in token for c in ".eE") else int(token)
    except ValueError:
        raise ValueError(f"line {lineno}: {what} is {token!r}, not a number") from None


def _figures(group: dict) -> dict:
    return {"time_us": group.get("time"), "algbw": group.get("algbw"), "busbw": group.get("busbw"),
            "wrong": group.get("#wrong", group.get("error"))}


def parse_nccl_tests(text: str) -> dict:
    """Parse one nccl-tests run (see module docstring); ``ValueError`` names the offending line."""
    columns, rows, avg = None, [], None
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = strip_launcher_prefix(raw)
        stripped = line.strip()
        if not stripped or "NCCL INFO" in line or "NCCL WARN" in line:
            continue
        if stripped.startswith("#"):
            tokens = stripped.lstrip("#").split()
            if "size" in tokens and "count" in tokens:
                columns = tokens
            match = re.match(r"#\s*Avg bus bandwidth\s*:\s*([0-9.eE+-]+)", stripped)
            if match:
                avg = float(match.group(1))
            continue
        if columns is None or not re.match(r"^\d", stripped):
            continue  # banners and other chatter before the table
        tokens = stripped.split()
        if len(tokens) != len(columns):
            raise ValueError(f"line {lineno}: {len(tokens)} fields but the header has {len(columns)} columns "
                             f"({' '.join(columns)}): {stripped!r}")
        row, groups = {}, [{}]
        for name, token in zip(columns, tokens):
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
        rows.append({"size": row.get("size"), "count": row.get("count"), "type": row.get("type"),
                     "redop": row.get("redop"), "root": row.get("root"), **_figures(groups[0]),
                     "in_place": _figures(groups[1]) if len(groups) > 1 else None})
    if columns is None:
        raise ValueError("no nccl-tests header line (# size count type ...) found")
    if not rows:
        raise ValueError("the nccl-tests output has a header but no result rows")
    if avg is None:
        avg = sum(r["busbw"] for r in rows) / len(rows)
    return {"rows": rows, "avg_busbw": avg}


def parse_nccl_tests_file(path: str | Path) -> dict:
    try:
        return parse_nccl_tests(Path(path).read_text())
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
