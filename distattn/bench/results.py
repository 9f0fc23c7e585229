"""The columns of ``distattn bench``'s ``results.csv`` and its reader.

Apart from :mod:`distattn.bench.suite` (which imports torch) so ``distattn simulate --calibrate``
refuses a file that is not one at once, before anything heavy is imported or measured.
"""

from __future__ import annotations

import csv
from pathlib import Path

COLUMNS = ("scheduler", "world_size", "seq_len", "mask", "fwd_bwd_ms", "tflops", "flops_imbalance", "send_bytes",
           "peak_mem_mb", "num_docs", "heads", "kv_heads", "head_dim", "dtype", "device", "comm_wait_ms",
           "rank_comm_wait_ms", "cpu_others", "cad_backward")
_INT_COLUMNS = ("world_size", "seq_len", "send_bytes", "num_docs", "heads", "kv_heads", "head_dim")
_FLOAT_COLUMNS = ("fwd_bwd_ms", "tflops", "flops_imbalance", "peak_mem_mb")
# what read_results parses and the calibration reads; results written before the executor's wait
# clock (the CPU other processes took) was recorded have no comm_wait_ms / rank_comm_wait_ms
# (cpu_others), so those stay optional; so does cad_backward (cad's rows: what its attention servers
# did in the backward; empty for the other schedulers, and in cad rows written before it: "keep")
REQUIRED_COLUMNS = ("scheduler", "mask", "dtype") + _INT_COLUMNS + _FLOAT_COLUMNS


def read_results(path: str | Path) -> list[dict]:
    """Rows of a ``results.csv`` with numbers parsed; ``ValueError`` naming the file (and line) when it
    is not one."""
    what = f"{path}: not a `distattn bench` results.csv"
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:   # (a BOM: a CSV Excel saved)
            reader = csv.DictReader(f)
            missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or ())]
            if missing:
                some = f" (missing {', '.join(missing)})" if len(missing) < len(REQUIRED_COLUMNS) else ""
                raise ValueError(f"{what}{some}; expected the columns {', '.join(REQUIRED_COLUMNS)}")
            return [_parse_row(r, f"{path}, line {reader.line_num}") for r in reader]
    except (UnicodeDecodeError, csv.Error) as exc:
        raise ValueError(f"{what} ({exc})") from None


def _parse_row(r: dict, where: str) -> dict:
    def number(column: str, kind: type, text):
        try:
            return kind(text)
        except (TypeError, ValueError):   # TypeError: a short row leaves its last columns None
            raise ValueError(f"{where}: {column} is {text!r}, expected {'an int' if kind is int else 'a number'}") \
                from None

    r.update({k: number(k, int, r[k]) for k in _INT_COLUMNS}, **{k: number(k, float, r[k]) for k in _FLOAT_COLUMNS})
    r["comm_wait_ms"] = number("comm_wait_ms", float, r.get("comm_wait_ms") or "nan")
    r["cpu_others"] = number("cpu_others", float, r.get("cpu_others") or "nan")
    r["cad_backward"] = r.get("cad_backward") or None
    r["rank_comm_wait_ms"] = [number("rank_comm_wait_ms", float, x)
                              for x in (r.get("rank_comm_wait_ms") or "").split(";") if x]
    return r
