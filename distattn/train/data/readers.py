"""The reading side of ``distattn data prepare``: input files, per-format readers, tokenizers.

Formats (one document each): a ``.txt`` file (UTF-8); a non-blank ``.jsonl`` line (a JSON object
with a string ``text``); a ``.parquet`` row (a string ``text`` column, read ``PARQUET_ROWS`` rows
at a time). A reader yields each document with the position after it, which is what
``prepare_state.json`` records: ``[input, offset, record]`` with offset the byte offset and
record the line number for JSONL, ``(size, 1)`` once a .txt is read, and rows for Parquet.

A document that cannot be read is a :class:`~.bad_rows.BadDocument` naming the file and line or
row: raised by :func:`decode` (in the tokenizing process), or yielded in place of the raw document
where the reader finds it (a Parquet row group whose page does not decode: each of its rows left;
a string that is not UTF-8), so that ``--on-bad-document skip`` can pass over each one.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Iterator

import numpy as np

from .bad_rows import BadDocument, binary_view, group_problem, not_utf8, text_problem
from .corpus import BYTE_VOCAB

KINDS = {".txt": "txt", ".jsonl": "jsonl", ".parquet": "parquet"}
BATCH_BYTES, BATCH_DOCS, PARQUET_ROWS = 1 << 22, 1024, 256
_FORMATS = ".txt (one document per file), .jsonl (a 'text' field per line) or .parquet (a 'text' column)"


# ---- tokenizers -------------------------------------------------------------------------------
class ByteTokenizer:
    """``--tokenizer bytes``: the UTF-8 bytes of the text, vocab 256 (what ``data.source: stdlib`` feeds)."""

    name, vocab_size, fingerprint = "bytes", BYTE_VOCAB, "bytes"

    def encode(self, texts: list[str]) -> list[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts]


class LoadedTokenizer:
    """A ``tokenizers.Tokenizer`` or a ``transformers`` tokenizer. Documents are encoded with
    ``add_special_tokens=True``: a tokenizer whose own post-processor adds tokens (Llama 3's
    ``<|begin_of_text|>``) gets them, so training sees documents as the tokenizer encodes them at
    inference; nothing else is added (documents are kept apart by offsets, not separator tokens)."""

    def __init__(self, name: str, backend, fingerprint: str, vocab_size: int, slow=None):
        self.name, self.backend, self.fingerprint, self.slow = name, backend, fingerprint, slow
        self.vocab_size = vocab_size

    def encode(self, texts: list[str]) -> list[np.ndarray]:
        if self.slow is not None:
            return [np.array(self.slow.encode(t, add_special_tokens=True), dtype=np.int64) for t in texts]
        encode = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
        return [np.array(e.ids, dtype=np.int64) for e in encode(texts, add_special_tokens=True)]


def _backend_vocab(backend) -> int:
    ids = backend.get_vocab(with_added_tokens=True).values()
    return max(backend.get_vocab_size(with_added_tokens=True), max(ids, default=-1) + 1)


def load_tokenizer(spec: str, key: str = "--tokenizer") -> ByteTokenizer | LoadedTokenizer:
    """``bytes``; a ``tokenizer.json`` or a directory holding one (the ``tokenizers`` library); else a
    directory or Hugging Face name ``transformers.AutoTokenizer`` finds on this machine (nothing is
    downloaded). ``vocab_size`` counts added tokens. ``ValueError`` names ``key`` (the option or
    config key that gave ``spec``) and says what to pass instead."""
    if spec == "bytes":
        return ByteTokenizer()
    path = Path(spec).expanduser()
    file = path / "tokenizer.json" if path.is_dir() else path
    if file.is_file():
        if file.suffix != ".json":
            raise ValueError(f"{key} {spec} is a file but not a tokenizer.json; pass 'bytes', a tokenizer.json, "
                             f"a directory holding one, or a transformers tokenizer directory or name")
        from tokenizers import Tokenizer

        try:
            backend = Tokenizer.from_file(str(file))
        except Exception as exc:  # the library raises its own exception types
            raise ValueError(f"{key} {spec}: the tokenizers library cannot load {file} "
                             f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); pass a valid "
                             f"tokenizer.json") from None
        digest = hashlib.sha256(file.read_bytes()).hexdigest()
        return LoadedTokenizer(spec, backend, digest, _backend_vocab(backend))
    return _auto_tokenizer(spec, key)


def _on_disk(spec: str) -> bool:
    """Whether ``spec`` is a path, or a hub name with a folder in the Hugging Face cache."""
    if Path(spec).expanduser().exists():
        return True
    try:
        from huggingface_hub import constants
    except ImportError:  # no cache to look in: transformers says what is missing
        return True
    return (Path(constants.HF_HUB_CACHE) / f"models--{spec.replace('/', '--')}").is_dir()


def _auto_tokenizer(spec: str, key: str) -> LoadedTokenizer:
    advice = (f"pass 'bytes', a tokenizer.json or a folder holding one, or fetch the tokenizer first (nothing is "
              f"downloaded here), e.g. `huggingface-cli download {spec}`")
    if not _on_disk(spec):  # said before importing transformers (seconds: it imports torch)
        raise ValueError(f"{key} {spec} is not 'bytes', an existing path or a Hugging Face tokenizer in the "
                         f"local cache; {advice}")
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise ValueError(f"{key} {spec} is not 'bytes' or a tokenizer.json, and transformers is not installed "
                         f"to load it (pip install transformers); {advice}") from None
    try:
        # trust_remote_code=False: a folder naming its own tokenizer code is refused, never run or prompted for
        tok = AutoTokenizer.from_pretrained(spec, local_files_only=True, trust_remote_code=False)
    except Exception as exc:  # OSError when absent, others for broken folders
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "trust_remote_code" in str(exc) or "custom code" in str(exc):
            raise ValueError(f"{key} {spec} names its own Python code (auto_map), which distattn does not "
                             f"run; pass the folder's tokenizer.json, or a tokenizer transformers knows") from None
        raise ValueError(f"{key} {spec} cannot be loaded ({reason}); {advice}") from None
    if getattr(tok, "is_fast", False):
        backend = tok.backend_tokenizer
        digest = hashlib.sha256(backend.to_str().encode()).hexdigest()
        return LoadedTokenizer(spec, backend, digest, max(len(tok), _backend_vocab(backend)))
    tok.model_max_length = sys.maxsize  # documents are longer than the model's context: no warnings
    vocab = tok.get_vocab()
    digest = hashlib.sha256(json.dumps(sorted(vocab.items())).encode()).hexdigest()
    return LoadedTokenizer(spec, None, digest, max(len(tok), max(vocab.values(), default=-1) + 1), slow=tok)


# ---- inputs -----------------------------------------------------------------------------------
def input_files(inputs: list[str | Path]) -> list[tuple[Path, str]]:
    """(absolute path, kind) of every input file, checked before any work: exists, known extension,
    Parquet files have a string ``text`` column. A directory stands for its known files."""
    if not inputs:
        raise ValueError("INPUT: give at least one .txt, .jsonl or .parquet file or a directory of them")
    files = []
    for given in inputs:
        path = Path(given).expanduser().absolute()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix.lower() in KINDS and p.is_file())
            if not found:
                raise ValueError(f"INPUT {given}: a directory without .txt, .jsonl or .parquet files")
            files += found
        elif path.is_file():
            if path.suffix.lower() not in KINDS:
                raise ValueError(f"INPUT {given}: unknown extension {path.suffix or '(none)'!r}; give {_FORMATS}")
            files.append(path)
        else:
            raise ValueError(f"INPUT {given} does not exist; give {_FORMATS}, or a directory of them")
    if len(set(files)) != len(files):
        twice = next(p for p in files if files.count(p) > 1)
        raise ValueError(f"INPUT {twice} is given twice; name each input once")
    kinds = [(p, KINDS[p.suffix.lower()]) for p in files]
    for path, kind in kinds:
        if kind == "parquet":
            _check_parquet(path)
    return kinds


def _check_parquet(path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.ParquetFile(path).schema_arrow
    except Exception as exc:  # pyarrow's ArrowInvalid and friends
        raise ValueError(f"INPUT {path}: not a readable Parquet file ({str(exc).splitlines()[0]})") from None
    if "text" not in schema.names:
        raise ValueError(f"INPUT {path}: no 'text' column (columns: {', '.join(schema.names)}); a Parquet input needs "
                         f"the documents in a string column named text")
    kind = schema.field("text").type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise ValueError(f"INPUT {path}: column 'text' is {kind}, not a string column")


def _read(path: Path, kind: str, offset: int, record: int) -> Iterator[tuple]:
    """(raw document, record number, position after it, input bytes done) from ``(offset, record)`` on:
    the byte offset and line number of JSONL, ``(size, 1)`` once a .txt is read, rows for Parquet."""
    if kind == "txt":
        if record == 0:
            data = path.read_bytes()
            yield data, 1, (len(data), 1), len(data)
    elif kind == "jsonl":
        with open(path, "rb") as f:
            f.seek(offset)
            for line in f:
                offset, record = offset + len(line), record + 1
                if line.strip():
                    yield line, record, (offset, record), offset
    else:
        yield from _parquet_rows(path, record)


def _parquet_rows(path: Path, record: int) -> Iterator[tuple]:
    """:func:`_read` of a Parquet file: a row group at a time, so that one whose page does not decode
    costs its own rows (each a :class:`BadDocument`), not the file's."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    meta, size = pf.metadata, path.stat().st_size
    row = 0
    for group in range(meta.num_row_groups):
        start, rows = row, meta.row_group(group).num_rows
        if start + rows <= record:   # done before a resume
            row += rows
            continue
        try:
            for batch in pf.iter_batches(batch_size=PARQUET_ROWS, row_groups=[group], columns=["text"]):
                for text in _texts(path, batch.column(0), row):
                    row += 1
                    if row > record:
                        yield text, row, (row, row), size * row // max(meta.num_rows, 1)
        except Exception as exc:  # a damaged page: pyarrow's OSError or ArrowException
            problem = group_problem(group, start, rows, exc)
            while row < start + rows:
                row += 1
                if row > record:
                    yield BadDocument(f"INPUT {path} row {row}: {problem}; rewrite the file"), row, (row, row), \
                        size * row // max(meta.num_rows, 1)


def _texts(path: Path, values, row: int) -> list:
    """A batch's strings; one that is not UTF-8 (Arrow does not check what a writer gave it) is a
    :class:`BadDocument` naming its row (``row``: the rows before the batch)."""
    try:
        return values.to_pylist()
    except UnicodeDecodeError:
        texts = []
        for i, data in enumerate(binary_view(values).to_pylist()):
            try:
                texts.append(data if data is None else data.decode("utf-8"))
            except UnicodeDecodeError as exc:
                texts.append(BadDocument(f"INPUT {path} row {row + i + 1}: {not_utf8('text', exc)}; fix or drop "
                                         f"that row"))
        return texts


def batches(files: list[tuple[Path, str]], start: list[int]) -> Iterator[dict]:
    """Batches of documents of one input each, from position ``start`` = [input, offset, record]."""
    first, offset, record = start
    before = bytes_before(files)
    for i in range(first, len(files)):
        path, kind = files[i]
        batch = _new_batch(path, kind)
        for raw, rec, (off, rec_after), done in _read(path, kind, *((offset, record) if i == first else (0, 0))):
            batch["raws"].append(raw)
            batch["records"].append(rec)
            batch["positions"].append([i, off, rec_after])
            batch["done"].append(before[i] + done)
            batch["size"] += len(raw) if isinstance(raw, (bytes, str)) else 0
            if batch["size"] >= BATCH_BYTES or len(batch["raws"]) >= BATCH_DOCS:
                yield batch
                batch = _new_batch(path, kind)
        if batch["raws"]:
            yield batch


def bytes_before(files: list[tuple[Path, str]]) -> list[int]:
    """Input bytes before each input, and the total at the end."""
    out = [0]
    for path, _ in files:
        out.append(out[-1] + path.stat().st_size)
    return out


def _new_batch(path: Path, kind: str) -> dict:
    return {"path": str(path), "kind": kind, "raws": [], "records": [], "positions": [], "done": [], "size": 0}


# ---- decoding (in the tokenizing process) -----------------------------------------------------
def decode(path: str, kind: str, raw, record: int) -> str:
    """The text of a raw document of input ``path``; :class:`BadDocument` (a ``ValueError``) names
    the file, line or row of one that cannot be read."""
    if isinstance(raw, BadDocument):   # found by the reader
        raise raw
    where = f"INPUT {path}" + (f" line {record}" if kind == "jsonl" else f" row {record}" if kind == "parquet" else "")
    if kind == "parquet":
        if raw is None:
            raise BadDocument(f"{where}: 'text' is null; drop or fill that row")
        return raw
    if kind == "jsonl":
        text = _json_text(where, raw)
        problem = text_problem(text)   # a JSON \ud800 escape: no tokenizer can encode it
        if problem is not None:
            raise BadDocument(f"{where}: 'text' {problem}; fix or drop that line")
        return text
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise BadDocument(f"{where} line {line}: not UTF-8 text at byte {exc.start} ({exc.reason}); convert it to "
                          f"UTF-8") from None


def _json_text(where: str, raw: bytes) -> str:
    try:
        obj = json.loads(raw)
    except RecursionError:
        raise BadDocument(f"{where}: JSON nested too deeply to read; each line must be an object with a string "
                          f"'text' field") from None
    except ValueError as exc:   # bad JSON, bytes that are not UTF-8, an int of more digits than Python converts
        raise BadDocument(f"{where}: not a JSON object ({str(exc).splitlines()[0][:200]}); each line must be an "
                          f"object with a string 'text' field") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
        keys = ", ".join(map(str, obj)) if isinstance(obj, dict) else type(obj).__name__
        raise BadDocument(f"{where}: no string 'text' field (found: {keys or 'nothing'}); each line must be a "
                          f"JSON object with a string 'text' field")
    return obj["text"]
