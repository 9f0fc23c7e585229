"""``data.source: hf``: a Hugging Face dataset as it lies on disk, one document per row.

``data.path`` is a folder written by ``Dataset.save_to_disk`` (``state.json`` plus Arrow files,
memory-mapped, read with pyarrow as ``datasets.load_from_disk`` reads them: ``datasets`` need
not be installed), a ``.parquet`` file, or a folder of them (recursively, sorted by path). A
``DatasetDict`` folder is refused: name one split's folder.

The column: ``text`` (strings) tokenized with ``data.tokenizer`` (``bytes`` by default, else a
tokenizer.json, a folder holding one or a Hugging Face tokenizer already on disk: what
``distattn data prepare --tokenizer`` takes, encoded the same way); when ``data.tokenizer`` is
unset and the dataset has an ``input_ids`` column (lists of ints), those ids as they are.

Nothing is tokenized up front: a document is tokenized when the packer reaches it (its length is
what the packer asks first), and the last ``CACHE_DOCS`` stay cached, so a document cut over
several sequences is tokenized once per rank. Parquet is decoded a row group at a time, and decoded
row groups are kept up to ``CACHE_BYTES`` per rank: documents come in a random order, so a Parquet
corpus larger than that decodes a row group for most documents (measured with 500-row groups:
1.1 M tokens/s instead of ~150 M) -- for large corpora use a ``save_to_disk`` folder (memory-mapped) or ``distattn data
prepare``.

Bad documents (:mod:`.bad_rows`: a null row, text that is not UTF-8, a row group that does not
decode) are refused by preflight's scan (:meth:`HFCorpus.scan`) before any rank starts; with
``on_bad_document="skip"`` a document found bad as it is read is an empty one (the packer passes
over it), counted in ``skipped``.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from pathlib import Path
from typing import Callable

import numpy as np

from .bad_rows import (ON_BAD_DOCUMENT, SKIP_HINT, BadDocument, FileScan, arrow_table, group_problem, not_utf8,
                       scan_hf)
from .readers import load_tokenizer
from ..safe_io import read_regular

STATE, DATASET_DICT = "state.json", "dataset_dict.json"
TEXT, IDS = "text", "input_ids"
CACHE_DOCS = 256                 # tokenized documents kept per corpus
CACHE_BYTES = 512 << 20          # decoded Parquet row groups kept per corpus (the newest always)
_log = logging.getLogger(__name__)
_WHAT = "data.source: hf reads a folder written by Dataset.save_to_disk, a .parquet file, or a folder of them"


def hf_files(path: str | Path) -> tuple[str, list[Path]]:
    """(``"arrow"`` or ``"parquet"``, the files) of ``data.path``; ``ValueError`` naming it otherwise."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"data.path: {path} does not exist ({_WHAT})")
    if path.is_file():
        if path.suffix.lower() != ".parquet":
            raise ValueError(f"data.path: {path} is not a .parquet file ({_WHAT})")
        return "parquet", [path]
    if (path / DATASET_DICT).is_file():
        splits = _json(path / DATASET_DICT).get("splits") or ["train"]
        raise ValueError(f"data.path: {path} holds a DatasetDict (splits: {', '.join(map(str, splits))}); name one "
                         f"split's folder, e.g. {path / str(splits[0])}")
    if (path / STATE).is_file():
        entries = _json(path / STATE).get("_data_files")
        names = [e.get("filename") if isinstance(e, dict) else None for e in entries or []]
        if not names or not all(isinstance(n, str) and n == Path(n).name and n not in ("", ".", "..")
                                for n in names):
            raise ValueError(f"data.path: {path / STATE} lists no data files inside {path}; save the dataset again "
                             f"with Dataset.save_to_disk")
        for name in names:
            if not (path / name).is_file():
                raise ValueError(f"data.path: {path / name} is missing ({STATE} lists it); save the dataset again "
                                 f"with Dataset.save_to_disk")
        return "arrow", [path / n for n in names]
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() == ".parquet" and p.is_file())
    if not files:
        raise ValueError(f"data.path: {path} is a folder without {STATE} or .parquet files ({_WHAT})")
    return "parquet", files


def _json(path: Path) -> dict:
    try:
        obj = json.loads(read_regular(path, 64 << 20, path.name))
    except (OSError, ValueError, RecursionError) as exc:
        raise ValueError(f"data.path: {path} cannot be read ({type(exc).__name__}: {exc})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"data.path: {path} is not a JSON object; save the dataset again with save_to_disk")
    return obj


def _column(schema, tokenizer: str | None, where: Path) -> str:
    """The column read from a file of this ``schema``: ``text`` when a tokenizer is named, else
    ``input_ids`` if there is one, else ``text``; its type checked."""
    import pyarrow as pa

    name = IDS if tokenizer is None and IDS in schema.names else TEXT
    if name not in schema.names:
        raise ValueError(f"data.path: {where} has no '{TEXT}' column" + ("" if tokenizer else f" or '{IDS}' column")
                         + f" (columns: {', '.join(schema.names)}); give the documents as strings in '{TEXT}'"
                         + ("" if tokenizer else f" or token ids in '{IDS}'"))
    kind = schema.field(name).type
    if name == TEXT and not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise ValueError(f"data.path: {where}: column '{TEXT}' is {kind}, not strings")
    if name == IDS and not ((pa.types.is_list(kind) or pa.types.is_large_list(kind))
                            and pa.types.is_integer(kind.value_type)):
        raise ValueError(f"data.path: {where}: column '{IDS}' is {kind}, not lists of integer token ids")
    return name


class _LazyLengths:
    """``corpus.lengths`` when a length is known only by tokenizing: ``lengths[doc]`` tokenizes
    the document (cached for the read that follows)."""

    def __init__(self, corpus: "HFCorpus"):
        self.corpus = corpus

    def __len__(self) -> int:
        return self.corpus.rows

    def __getitem__(self, doc: int) -> int:
        return len(self.corpus.tokens(int(doc)))


class HFCorpus:
    """A Hugging Face dataset on disk as documents (module docstring)."""

    def __init__(self, path: str | Path, tokenizer: str | None = None, on_bad_document: str = "fail"):
        if on_bad_document not in ON_BAD_DOCUMENT:
            raise ValueError(f"data.on_bad_document must be one of {', '.join(ON_BAD_DOCUMENT)}, got "
                             f"{on_bad_document!r}")
        self.on_bad_document = on_bad_document
        self.skipped: dict[int, str] = {}   # documents passed over as they were read: why
        self._bad_blocks: dict[int, str] = {}   # Parquet row groups that do not decode: why
        try:
            import pyarrow.parquet as pq
        except ImportError:   # a config mistake to say in one line, before any rank starts
            raise ValueError("data.source: hf reads its files with pyarrow, which is not installed: pip install "
                             "'distattn[data]' (or pyarrow)") from None
        self.path = Path(path)
        self.kind, self.files = hf_files(self.path)
        self._blocks: list = []          # arrow: the column's chunks; parquet: (file, row group)
        rows, self._block_file = [], []
        self.column = None
        for i, file in enumerate(self.files):
            if self.kind == "arrow":
                table = arrow_table(file)
                self.column = self._same_column(self.column, _column(table.schema, tokenizer, file), file)
                chunks = table.column(self.column).chunks
                self._blocks += chunks
                rows += [len(c) for c in chunks]
                self._block_file += [i] * len(chunks)
            else:
                try:
                    meta = pq.read_metadata(file)
                except Exception as exc:  # pyarrow's ArrowInvalid and friends
                    raise ValueError(f"data.path: {file} is not a readable Parquet file "
                                     f"({str(exc).splitlines()[0]})") from None
                self.column = self._same_column(self.column, _column(meta.schema.to_arrow_schema(), tokenizer, file),
                                                file)
                self._blocks += [(i, g) for g in range(meta.num_row_groups)]
                rows += [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
                self._block_file += [i] * meta.num_row_groups
        self.block_start = np.concatenate([[0], np.cumsum(rows, dtype=np.int64)])
        self.rows = int(self.block_start[-1])
        if self.rows == 0:
            raise ValueError(f"data.path: {self.path} holds no rows")
        self.tokenizer = load_tokenizer(tokenizer or "bytes", key="data.tokenizer") if self.column == TEXT else None
        self._docs: OrderedDict[int, np.ndarray] = OrderedDict()
        self._groups: OrderedDict[int, object] = OrderedDict()
        self._group_bytes = 0
        if self.kind == "arrow" and self.column == IDS:   # the list offsets give every length, memory-mapped
            self.lengths = np.concatenate([np.diff(np.asarray(c.offsets)) for c in self._blocks]).astype(np.int64)
        else:
            self.lengths = _LazyLengths(self)

    def _same_column(self, seen: str | None, column: str, file: Path) -> str:
        if seen is not None and column != seen:
            raise ValueError(f"data.path: {file} gives its documents in '{column}' but {self.files[0]} in '{seen}'; "
                             f"give every file the same columns")
        return column

    def _block(self, block: int):
        """The column's values in a block: an Arrow chunk, or a decoded Parquet row group (cached)."""
        if self.kind == "arrow":
            return self._blocks[block]
        values = self._groups.pop(block, None)
        if values is None:
            import pyarrow.parquet as pq

            file, group = self._blocks[block]
            if block in self._bad_blocks:   # known bad: not decoded again for each of its rows
                raise BadDocument(self._bad_blocks[block])
            try:
                values = pq.ParquetFile(self.files[file]).read_row_group(group, columns=[self.column]).column(0)
            except Exception as exc:  # a damaged page: pyarrow's OSError or ArrowException
                first = int(self.block_start[block]) - int(self.block_start[self._block_file.index(file)])
                self._bad_blocks[block] = group_problem(group, first, self._rows(block), exc)
                raise BadDocument(self._bad_blocks[block]) from None
            values = values.combine_chunks()
            self._group_bytes += values.nbytes
            while self._groups and self._group_bytes > CACHE_BYTES:
                self._group_bytes -= self._groups.popitem(last=False)[1].nbytes
        self._groups[block] = values
        return values

    def _rows(self, block: int) -> int:
        return int(self.block_start[block + 1] - self.block_start[block])

    def _locate(self, doc: int) -> tuple[int, int]:
        """(block, row in the block) of document ``doc``."""
        block = int(np.searchsorted(self.block_start, doc, side="right")) - 1
        return block, doc - int(self.block_start[block])

    def where(self, doc: int) -> str:
        """Document ``doc`` as a file and row, for messages."""
        block, _ = self._locate(doc)
        file = self._block_file[block]
        first = self._block_file.index(file)
        return f"{self.files[file]} row {doc - int(self.block_start[first]) + 1}"   # (from 1, as prepare counts)

    def tokens(self, doc: int) -> np.ndarray:
        """Document ``doc``'s token ids (int64), tokenized on first use and kept among the last
        ``CACHE_DOCS``."""
        ids = self._docs.pop(doc, None)
        if ids is None:
            try:
                ids = self._decode(doc)
            except BadDocument as exc:
                if self.on_bad_document != "skip":
                    raise BadDocument(f"data.path: {self.where(doc)}: {exc}; {SKIP_HINT}") from None
                if doc not in self.skipped:   # preflight's scan logged the count; this is each one
                    _log.debug("data.on_bad_document: skip: passing over %s: %s", self.where(doc), exc)
                self.skipped[doc] = str(exc)
                ids = np.zeros(0, np.int64)
            if len(self._docs) >= CACHE_DOCS:
                self._docs.popitem(last=False)
        self._docs[doc] = ids
        return ids

    def _decode(self, doc: int) -> np.ndarray:
        """Document ``doc``'s token ids; :class:`BadDocument` (the reason alone) when it cannot be read."""
        block, row = self._locate(doc)
        values = self._block(block)
        if not values[row].is_valid:
            raise BadDocument(f"'{self.column}' is null")
        if self.column == IDS:
            start, end = int(values.offsets[row].as_py()), int(values.offsets[row + 1].as_py())
            return values.values.slice(start, end - start).to_numpy(zero_copy_only=False).astype(np.int64)
        try:
            text = values[row].as_py()
        except UnicodeDecodeError as exc:   # Arrow does not check the UTF-8 of what a writer gave it
            raise BadDocument(not_utf8(self.column, exc)) from None
        return np.asarray(self.tokenizer.encode([text])[0], dtype=np.int64)

    def read(self, doc: int, start: int, end: int) -> np.ndarray:
        return self.tokens(doc)[start:end]

    # ---- what the launching process checks (distattn.train.preflight.check_data) ----------------
    def scan(self, cache: Path | None = None, say: Callable[[str], None] | None = None) -> list[FileScan]:
        """Every file's column read through for bad documents (:func:`.bad_rows.scan_hf`: nulls,
        undecodable text, damaged pages; statistics are not trusted), ``cache`` a folder that keeps
        each file's result."""
        return scan_hf(self.kind, self.files, self.column, cache, say)

    def _leaf(self, meta) -> int:
        """The Parquet leaf column holding ``self.column``'s values."""
        return next(j for j in range(meta.num_columns)
                    if meta.schema.column(j).path.split(".")[0] == self.column)

    def id_ranges(self) -> list[tuple[Path, int, int]]:
        """``[(file, smallest id, largest id)]`` of an ``input_ids`` column (empty for ``text``):
        Arrow's values computed over the memory map; Parquet's from its statistics where every row
        group has them, else read once."""
        if self.column != IDS:
            return []
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        def ranges(file: Path, arrays):
            found = []
            for a in arrays:
                flat = a.flatten()
                if flat.null_count:
                    raise ValueError(f"data.path: {file} has null token ids inside '{IDS}' lists; drop or fill them")
                found.append(pc.min_max(flat).as_py())
            found = [r for r in found if r["min"] is not None]
            return (min(r["min"] for r in found), max(r["max"] for r in found)) if found else None

        out = []
        if self.kind == "arrow":
            found = ranges(self.path, self._blocks)
            return [(self.path, *found)] if found else []
        for file in self.files:
            meta = pq.read_metadata(file)
            leaf = self._leaf(meta)
            stats = [meta.row_group(g).column(leaf).statistics for g in range(meta.num_row_groups)]
            # a list column's null_count also counts empty lists: with none, no id is null either
            if stats and all(s is not None and s.has_min_max and s.has_null_count and s.null_count == 0
                             for s in stats):
                found = (min(s.min for s in stats), max(s.max for s in stats))
            else:
                found = ranges(file, self._groups_of(file, meta.num_row_groups))
            if found:
                out.append((file, *found))
        return out

    def _groups_of(self, file: Path, count: int):
        """``file``'s row groups of the column, one at a time, but those that do not decode: preflight's
        scan refused them, or ``on_bad_document: skip`` passes over their rows."""
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(file)
        for group in range(count):
            try:
                yield pf.read_row_group(group, columns=[self.column]).column(0).combine_chunks()
            except Exception:  # a damaged page (the scan named it)
                continue
