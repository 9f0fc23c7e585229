"""A network profile's measurements (:class:`Measurement`, the collectives' names and bus factors) and
where they are read from: published nccl-tests results (a folder of CSVs, or one) and the older
``nccl_perf`` CSV (:func:`load_csv` tells them by their columns). :mod:`distattn.costmodel.network` fits them.

``nccl_perf`` (``nccl_perf_h100.csv``): ``op, ngpu, size_bytes, t_us_out, ...``, out-of-place times, no
node count: a legacy profile (nodes taken as ``ceil(ngpu / gpus_per_node)``, fallbacks as documented in
:mod:`distattn.costmodel.network`).

The published format: one CSV row per measured size, columns ``op,ngpu,nodes,dtype,size_bytes,time_us,algbw_gbs,
busbw_gbs,source`` (nccl-tests' out-of-place figures; ``op`` as nccl-tests names it -- ``alltoall``,
``sendrecv``, ... -- or as :data:`~distattn.costmodel.network.OPS` does). ``nodes`` is the number of nodes the
``ngpu`` GPUs span, which is what separates an intra-node fit from an inter-node one.

* A row without ``time_us`` (a figure that gives only bandwidth) takes its time from ``busbw_gbs``
  through nccl-tests' bus factor: ``time = factor * size / busbw``; its origin says so.
* A row whose ``source`` ends in a percentile (``p05``, ``p95``: the spread of a plotted figure) is
  skipped: the median row of the same figure is the one measured.
* Repeated runs (one per node or node pair, or several files) stay separate rows; each fit takes the
  median time of a size (:class:`~distattn.costmodel.network.NetworkProfile`).

A profile read here is ``strict``: a query for an op or a scope (intra-/inter-node) with no rows raises,
instead of borrowing another op's fit or assuming an inter-node bandwidth. Its ``gpus_per_node`` is the
densest node of the data (``max ceil(ngpu / nodes)``), the span a query without ``nodes`` assumes.
"""

from __future__ import annotations

import csv
import io
import math
import re
from dataclasses import dataclass
from pathlib import Path

OPS = ("all_gather", "reduce_scatter", "all_to_all", "send_recv", "all_reduce")
_ALIASES = {"alltoall": "all_to_all", "sendrecv": "send_recv", "allgather": "all_gather",
            "reducescatter": "reduce_scatter", "allreduce": "all_reduce"}


def parse_size(token: str, what: str) -> int:
    """``4K``, ``16M``, ``1G`` (powers of 1024) or a plain number; ``ValueError`` names ``what``."""
    tok = token.strip().upper()
    mult = {"K": 2**10, "M": 2**20, "G": 2**30}.get(tok[-1:], 1)
    try:
        return int(float(tok[:-1] if mult > 1 else tok) * mult)
    except ValueError:
        raise ValueError(f"{what}: {token.strip()!r} is not a size like 4K, 16M or 1048576") from None


def bus_factor(op: str, n: int) -> float:
    if op == "send_recv" or n <= 1:
        return 1.0
    return (2.0 if op == "all_reduce" else 1.0) * (n - 1) / n


def canonical_op(op: str) -> str:
    if not isinstance(op, str):
        raise ValueError(f"a collective is named by a string (one of {', '.join(OPS)}), got {op!r}")
    name = _ALIASES.get(op.lower().replace("_perf", ""), op.lower().replace("_perf", ""))
    if name not in OPS:
        raise ValueError(f"unknown collective {op!r}; expected one of {', '.join(OPS)}")
    return name


def config_name(op: str, n: int, nodes: int) -> str:
    """``all_to_all 80 GPUs / 10 nodes``: how a fit's configuration is named in bases and errors."""
    return f"{op} {n} GPUs / {nodes} node{'s' if nodes != 1 else ''}"


@dataclass(frozen=True)
class Measurement:
    op: str
    world_size: int
    size_bytes: int
    time_us: float
    nodes: int | None = None     # nodes the ranks span; None: unknown, ceil(world_size / gpus_per_node)
    source: str | None = None    # what measured it (a published row's source column)
    origin: str | None = None    # the file and line it was read from (what describe_fit prints)

    def __post_init__(self):
        # every source (probe, nccl-tests, JSON, CSV) comes through here: a corrupt figure stops at the door
        where = f"{self.op} on {self.world_size} ranks, {self.size_bytes} B"
        if self.world_size < 1 or self.size_bytes < 0:
            raise ValueError(f"{where}: world_size must be >= 1 and size_bytes >= 0")
        if not (math.isfinite(self.time_us) and self.time_us > 0):
            raise ValueError(f"{where}: time_us is {self.time_us}; a measured time must be positive and finite")
        if self.nodes is not None and not (isinstance(self.nodes, int) and 1 <= self.nodes <= self.world_size):
            raise ValueError(f"{where}: nodes is {self.nodes!r}; it must be an int from 1 to world_size "
                             "(every node holds at least one rank), or None when unknown")

    def row(self) -> dict:
        algbw = self.size_bytes / (self.time_us * 1e3)  # GB/s
        extra = {k: v for k, v in (("nodes", self.nodes), ("source", self.source), ("origin", self.origin))
                 if v is not None}
        return {"op": self.op, "world_size": self.world_size, "size_bytes": self.size_bytes,
                "time_us": self.time_us, "algbw_gbs": algbw,
                "busbw_gbs": algbw * bus_factor(self.op, self.world_size), **extra}


COLUMNS = ("op", "ngpu", "nodes", "size_bytes", "time_us", "busbw_gbs", "source")
_PERCENTILE = re.compile(r"\bp\d{1,2}\s*$")


def is_published(fieldnames) -> bool:
    """Whether a CSV header is the published format (the columns tell it from ``nccl_perf`` CSVs)."""
    return set(COLUMNS) <= set(fieldnames or ())


def _number(row: dict, column: str, kind):
    text = (row.get(column) or "").strip()
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"{column} is {text!r}, not {'an integer' if kind is int else 'a number'}") from None


def _measurement(row: dict, origin: str) -> Measurement:
    """One published row; the time from ``busbw_gbs`` when ``time_us`` is empty."""
    op = canonical_op((row.get("op") or "").strip())
    n, nodes, size = _number(row, "ngpu", int), _number(row, "nodes", int), _number(row, "size_bytes", int)
    if (row.get("time_us") or "").strip():
        time_us = _number(row, "time_us", float)
    else:
        busbw = _number(row, "busbw_gbs", float) if (row.get("busbw_gbs") or "").strip() else math.nan
        if not (math.isfinite(busbw) and busbw > 0):
            raise ValueError("time_us is empty and busbw_gbs is not a positive number: the row gives no time; "
                             "fill in time_us or busbw_gbs")
        time_us = bus_factor(op, n) * size / (busbw * 1e3)   # bytes / (GB/s) = ns -> us
        origin += " (time from busbw)"
    return Measurement(op, n, size, time_us, nodes=nodes, source=(row.get("source") or "").strip() or None,
                       origin=origin)


def _csv_text(path: str | Path) -> io.StringIO:
    """The text of the CSV file ``path`` (read whole: these are small); ``ValueError`` naming the file when it
    is not text, cannot be read, or holds what the csv module refuses (a NUL byte)."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")   # (a BOM: a CSV Excel saved)
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} cannot be read as a CSV ({exc}); pass a published-format or nccl_perf CSV") from None
    if "\0" in text:
        raise ValueError(f"{path} holds NUL bytes, so it is not a CSV; pass a published-format or nccl_perf CSV")
    return io.StringIO(text, newline="")


def read_published_csv(path: str | Path) -> list[Measurement]:
    """The measurements of one published-format CSV; ``ValueError`` names the file and line of a bad row."""
    path = Path(path)
    with _csv_text(path) as f:
        reader = csv.DictReader(f)
        if not is_published(reader.fieldnames):
            missing = sorted(set(COLUMNS) - set(reader.fieldnames or ()))
            raise ValueError(f"{path}: missing columns {missing}; a published-format CSV has the columns "
                             "op,ngpu,nodes,dtype,size_bytes,time_us,algbw_gbs,busbw_gbs,source")
        rows = []
        for r in reader:
            if _PERCENTILE.search(r.get("source") or ""):  # the spread of a figure, not a measurement
                continue
            try:
                rows.append(_measurement(r, f"{path.name}:{reader.line_num}"))
            except ValueError as exc:
                raise ValueError(f"{path}: line {reader.line_num}: {exc}") from None
    return rows


def read_nccl_perf_csv(path: str | Path) -> list[Measurement]:
    """The rows of an ``nccl_perf`` CSV (out-of-place times); ``ValueError`` names the file and line of a bad row."""
    with _csv_text(path) as f:
        reader = csv.DictReader(f)
        missing = {"op", "ngpu", "size_bytes", "t_us_out"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: missing columns {sorted(missing)}; expected an nccl_perf CSV (op, ngpu, "
                             "size_bytes, t_us_out) or a published one (op, ngpu, nodes, size_bytes, time_us, "
                             "busbw_gbs, source)")
        rows = []
        for r in reader:
            try:
                rows.append(Measurement(canonical_op(r["op"]), int(r["ngpu"]), int(r["size_bytes"]),
                                        float(r["t_us_out"]), origin=f"{Path(path).name}:{reader.line_num}"))
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{path}: line {reader.line_num}: {exc}") from None
    return rows


def load_csv(path: str | Path) -> tuple[tuple[Measurement, ...], dict]:
    """One CSV: published format (a strict profile) or ``nccl_perf`` (a legacy one), told by its header:
    ``(rows, the profile's options)`` (``NetworkProfile(rows, **options)``)."""
    with _csv_text(path) as f:
        published = is_published(next(csv.reader(f), None))
    return load_published(path) if published else (tuple(read_nccl_perf_csv(path)), {"source": str(path)})


def load_published(path: str | Path) -> tuple[tuple[Measurement, ...], dict]:
    """A strict profile's ``(rows, options)`` from a folder (every ``*.csv`` in it, all published format) or
    one published CSV."""
    path = Path(path)
    files = sorted(path.glob("*.csv")) if path.is_dir() else [path]
    if not files:
        raise ValueError(f"{path}: no *.csv files in the folder; pass a folder of published-format CSVs "
                         "(op,ngpu,nodes,dtype,size_bytes,time_us,algbw_gbs,busbw_gbs,source)")
    rows = [m for f in files for m in read_published_csv(f)]
    if not rows:
        raise ValueError(f"{path}: no measurements (every row empty or a percentile); add nccl-tests rows")
    densest = max(-(-m.world_size // m.nodes) for m in rows)
    return tuple(rows), {"source": str(path), "gpus_per_node": densest, "strict": True}


# ---- packaged profiles ---------------------------------------------------------------------------
# distattn/profiles/<name>.json, shipped in the wheel (pyproject.toml's package-data): profiles a fresh
# install names (``--network h100``) without measuring or fetching anything; found through
# importlib.resources, so an installed wheel finds its own. ``h100``: distattn's alpha-beta fits of the
# published nccl-tests tables, each fit stored as two rows on its line (the file's ``source`` says which).
# Names and ``--network``'s parsing live here, beside the readers, so the CLI's parsers stay light (no
# numpy); :func:`distattn.costmodel.network.profile_of` and ``packaged_profile`` load them.

def packaged_file(name: str):
    """The packaged profile ``name``'s file (an importlib.resources Traversable; a Path when installed on disk)."""
    from importlib.resources import files

    return files("distattn") / "profiles" / f"{name}.json"


def packaged_profiles() -> list[str]:
    """The names of the profiles the package ships (``distattn/profiles/<name>.json``)."""
    from importlib.resources import files

    folder = files("distattn") / "profiles"
    return sorted(p.name[:-len(".json")] for p in folder.iterdir() if p.name.endswith(".json")) \
        if folder.is_dir() else []


def unknown_network(source) -> ValueError:
    """The refusal of a network that is neither a path nor a packaged name: it names the packaged ones."""
    return ValueError(f"network {str(source)!r} is neither an existing path nor a packaged profile (packaged: "
                      f"{', '.join(packaged_profiles()) or 'none'}); name one of those, or pass a path: a folder of "
                      "published nccl-tests CSVs, one CSV, or a profile JSON (distattn cluster probe/nccl-tests)")


def network_source(text: str) -> str:
    """What a ``--network`` value names, as a path ``NetworkProfile.load`` reads: an existing path as given
    (a path wins over a packaged name), else the packaged profile's file; ``ValueError`` otherwise."""
    if Path(text).exists():
        return text
    if text in packaged_profiles():
        ref = packaged_file(text)
        return str(ref) if isinstance(ref, Path) else text   # not a file on disk (a zip): profile_of takes the name
    raise unknown_network(text)


def network_argument(text: str) -> str:
    """``type=`` of every ``--network`` option: :func:`network_source`, a refusal an argparse error (rc 2)."""
    import argparse

    try:
        return network_source(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def network_help(default: str) -> str:
    """The help of every ``--network`` option, ending with what it defaults to."""
    return (f"a packaged profile by name ({', '.join(packaged_profiles()) or 'none'}: distattn's fits of published "
            "H100 nccl-tests runs) or a path: a folder of published nccl-tests CSVs, one such CSV, an nccl_perf CSV or "
            f"a profile JSON (distattn cluster probe/nccl-tests); default: {default}")
