"""Mutations of the files a run reads (``manifest.json``, ``index.json``, ``prepare_state.json``,
``.idx.npy``, Megatron's ``.idx``) and the snapshot that tells a file a run wrote from one it must not
touch: the helpers of ``tests/test_fuzz_files.py``.

A mutation changes one file in place, by its field (type, range, nesting, deletion, an extra field,
a path that leads out of the folder) or as a whole (truncated, empty, not UTF-8, a link, a folder, a
FIFO, oversized). Every list is in a fixed order, so a run's mutations are the same every time: the
covering slice takes each field with a rotating share of the kinds, which covers every field and
every kind; ``everything=True`` takes all of them."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

DEEP = 10_000                    # levels of the nested list a "nest:deep" field holds
_DEEP_MARK = "@@fuzz-deep@@"
PER_FIELD = 2                    # kinds per field in the covering slice


@dataclass(frozen=True)
class Mutation:
    field: str                              # where: "shards[0].tokens", "header.version"; "" is the file
    kind: str                               # what: "type:str", "range:huge", "file:truncate-half", ...
    apply: Callable[[Path, Path], None]     # (the file, a folder outside the run that links may reach)

    @property
    def name(self) -> str:
        return f"{self.field or '<file>'}:{self.kind}"


# ---- JSON files, field by field -----------------------------------------------------------------------------
VALUES: dict[str, Any] = {
    "type:str": "fuzz", "type:int": 7, "type:float": 0.5, "type:bool": True, "type:null": None,
    "type:list": [1, "a"], "type:dict": {"fuzz": 1},
    "range:-1": -1, "range:0": 0, "range:huge": 10**18, "range:-huge": -10**18, "range:2**64": 2**64,
    "range:NaN": float("nan"), "range:Infinity": float("inf"), "range:-Infinity": float("-inf"),
    "nest:deep": _DEEP_MARK,
}
STRUCTURAL = ("delete", "extra", "link:abs", "link:up")   # extra: dicts only


def _field(path: tuple) -> str:
    return "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in path).lstrip(".") or "<root>"


def _walk(value: Any, path: tuple = ()):
    yield path, value
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        yield from _walk(item, path + (key,))


def _render(doc: Any) -> bytes:
    text = json.dumps(doc, indent=1, allow_nan=True)
    return text.replace(json.dumps(_DEEP_MARK), "[" * DEEP + "]" * DEEP).encode()


def _edit(original: Any, path: tuple, kind: str) -> Callable[[Path, Path], None]:
    def apply(file: Path, outside: Path) -> None:
        doc = json.loads(json.dumps(original))
        if not path:   # the document itself
            doc = {"fuzz": 1} if kind == "extra" else _value(kind, outside)
            file.write_bytes(_render(doc))
            return
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        last = path[-1]
        if kind == "delete":
            del parent[last]
        elif kind == "extra":
            parent[last]["fuzz_extra"] = {"unknown": [1, 2]}
        else:
            parent[last] = _value(kind, outside)
        file.write_bytes(_render(doc))
    return apply


def _value(kind: str, outside: Path) -> Any:
    if kind == "link:abs":
        return str(outside / "victim.txt")
    if kind == "link:up":
        return "../../../outside/victim"
    return VALUES[kind]


def json_mutations(raw: bytes, everything: bool) -> list[Mutation]:
    """Mutations of every field of the JSON document ``raw``: all kinds for each with ``everything``,
    else :data:`PER_FIELD` kinds each, the ones used least so far (the covering slice)."""
    original = json.loads(raw)
    kinds = list(VALUES) + list(STRUCTURAL)
    found, uses = [], {kind: 0 for kind in kinds}
    for path, value in _walk(original):
        usable = [k for k in kinds if (k != "extra" or isinstance(value, dict)) and (path or k != "delete")]
        # the kinds used least so far: every kind comes round, those only some fields take included
        chosen = usable if everything else sorted(usable, key=lambda k: (uses[k], kinds.index(k)))[:PER_FIELD]
        for kind in chosen:
            uses[kind] += 1
        found += [Mutation(_field(path), kind, _edit(original, path, kind)) for kind in chosen]
    return found


# ---- any file, as a whole ---------------------------------------------------------------------------------
def _truncate(fraction: float | int) -> Callable[[Path, Path], None]:
    def apply(file: Path, outside: Path) -> None:
        data = file.read_bytes()
        size = fraction if isinstance(fraction, int) and fraction >= 0 else \
            len(data) + fraction if isinstance(fraction, int) else int(len(data) * fraction)
        file.write_bytes(data[:max(size, 0)])
    return apply


def _garbage(file: Path, outside: Path) -> None:
    data = bytearray(file.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 4] = b"\xff\xfe\xc3\x28"   # no UTF-8 decoder takes these
    file.write_bytes(bytes(data))


def _replace_with(make: Callable[[Path, Path], None]) -> Callable[[Path, Path], None]:
    def apply(file: Path, outside: Path) -> None:
        valid = outside / f"valid-{file.name}"
        if not valid.exists():
            shutil.copyfile(file, valid)
        file.unlink()
        make(file, outside)
    return apply


def _oversized(file: Path, outside: Path) -> None:
    with open(file, "r+b") as f:   # sparse: costs no disk
        f.truncate((64 << 20) + 1)


FILE_KINDS: dict[str, Callable[[Path, Path], None]] = {
    "file:empty": _truncate(0), "file:truncate-1": _truncate(1), "file:truncate-half": _truncate(0.5),
    "file:truncate-last": _truncate(-1), "file:not-utf8": _garbage, "file:oversized": _oversized,
    "file:removed": _replace_with(lambda f, o: None),
    "file:folder": _replace_with(lambda f, o: f.mkdir()),
    "file:fifo": _replace_with(lambda f, o: os.mkfifo(f)),
    "file:link-valid": _replace_with(lambda f, o: os.symlink(o / f"valid-{f.name}", f)),
    "file:link-victim": _replace_with(lambda f, o: os.symlink(o / "victim.txt", f)),
    "file:link-dangling": _replace_with(lambda f, o: os.symlink(o / "nothing-here", f)),
    "file:link-loop": _replace_with(lambda f, o: os.symlink(f.name, f)),
}


def file_mutations() -> list[Mutation]:
    return [Mutation("", kind, apply) for kind, apply in FILE_KINDS.items()]


# ---- .idx.npy: document offsets -----------------------------------------------------------------------------
def _npy(header: str, body: bytes, version: bytes = b"\x01\x00") -> bytes:
    text = header + " " * (-(len(header) + 11) % 64) + "\n"
    return b"\x93NUMPY" + version + struct.pack("<H", len(text)) + text.encode("latin-1") + body


def _save(make: Callable[[np.ndarray], Any], pickle: bool = False) -> Callable[[Path, Path], None]:
    def apply(file: Path, outside: Path) -> None:
        offsets = np.load(file)
        with open(file, "wb") as f:   # np.save(path) would add a second .npy suffix
            np.save(f, make(offsets.copy()), allow_pickle=pickle)
    return apply


def _raw_npy(header: str, version: bytes = b"\x01\x00", body: str = "same") -> Callable[[Path, Path], None]:
    def apply(file: Path, outside: Path) -> None:
        offsets = np.load(file)
        data = offsets.tobytes() if body == "same" else b""
        file.write_bytes(_npy(header.replace("N", str(len(offsets))), data, version))
    return apply


def _swap(a: np.ndarray) -> np.ndarray:
    a[1], a[2] = a[2], a[1]
    return a


def _set(index: int, value: int) -> Callable[[np.ndarray], np.ndarray]:
    def make(a: np.ndarray) -> np.ndarray:
        a[index] = value
        return a
    return make


NPY_KINDS: dict[str, Callable[[Path, Path], None]] = {
    "dtype:float64": _save(lambda a: a.astype(np.float64)), "dtype:float32": _save(lambda a: a.astype(np.float32)),
    "dtype:complex": _save(lambda a: a.astype(np.complex128)), "dtype:bool": _save(lambda a: a.astype(bool)),
    "dtype:object-pickle": _save(lambda a: a.astype(object), pickle=True),
    "dtype:int32": _save(lambda a: a.astype(np.int32)), "dtype:uint64": _save(lambda a: a.astype(np.uint64)),
    "dtype:big-endian": _save(lambda a: a.astype(">i8")), "dtype:uint8": _save(lambda a: a.astype(np.uint8)),
    "dtype:str": _save(lambda a: a.astype("<U8")),
    "shape:2d-column": _save(lambda a: a.reshape(-1, 1)), "shape:2d-row": _save(lambda a: a.reshape(1, -1)),
    "shape:empty": _save(lambda a: a[:0]), "shape:scalar": _save(lambda a: np.int64(a[-1])),
    "shape:one": _save(lambda a: a[:1]),
    "value:non-monotone": _save(_swap), "value:past-end": _save(_set(-1, 10**6)),
    "value:huge": _save(_set(-1, 2**62)), "value:negative": _save(_set(1, -5)),
    "value:first-not-0": _save(_set(0, 1)), "value:zeros": _save(lambda a: a * 0),
    "value:repeat": _save(lambda a: np.concatenate([a[:2], a[1:]])),
    "header:huge-shape": _raw_npy("{'descr': '<i8', 'fortran_order': False, 'shape': (999999999999999,), }"),
    "header:negative-shape": _raw_npy("{'descr': '<i8', 'fortran_order': False, 'shape': (-1,), }"),
    "header:unknown-dtype": _raw_npy("{'descr': '<x9', 'fortran_order': False, 'shape': (N,), }"),
    "header:deep": _raw_npy("{'descr': '<i8', 'fortran_order': False, 'shape': " + "(" * 3000 + ")" * 3000 + ", }"),
    "header:not-a-dict": _raw_npy("[1, 2, 3]"), "header:code": _raw_npy("__import__('os').getcwd()"),
    "header:fortran": _raw_npy("{'descr': '<i8', 'fortran_order': True, 'shape': (N,), }"),
    "header:version-9": _raw_npy("{'descr': '<i8', 'fortran_order': False, 'shape': (N,), }", b"\x09\x00"),
    "header:no-body": _raw_npy("{'descr': '<i8', 'fortran_order': False, 'shape': (N,), }", body="none"),
    "header:bad-magic": lambda f, o: f.write_bytes(b"\x93NUMPZ" + f.read_bytes()[6:]),
    "truncate:in-header": _truncate(20), "truncate:in-body": _truncate(-3),
}


def npy_mutations() -> list[Mutation]:
    return [Mutation(kind.split(":")[0], kind, apply) for kind, apply in NPY_KINDS.items()] + file_mutations()


# ---- Megatron's .idx: header and arrays ---------------------------------------------------------------------
_HEAD = struct.Struct("<9sQBQQ")


def _megatron(change: Callable[[dict], None]) -> Callable[[Path, Path], None]:
    """Rewrite a Megatron .idx with ``change`` applied to its parts (raw header fields and arrays)."""
    def apply(file: Path, outside: Path) -> None:
        data = file.read_bytes()
        magic, version, code, seqs, docs = _HEAD.unpack(data[:_HEAD.size])
        at = _HEAD.size
        parts = {"magic": magic, "version": version, "code": code, "sequences": seqs, "documents": docs,
                 "lengths": np.frombuffer(data[at:at + 4 * seqs], "<i4").copy(),
                 "pointers": np.frombuffer(data[at + 4 * seqs:at + 12 * seqs], "<i8").copy(),
                 "bounds": np.frombuffer(data[at + 12 * seqs:at + 12 * seqs + 8 * docs], "<i8").copy(),
                 "tail": data[at + 12 * seqs + 8 * docs:]}
        change(parts)
        file.write_bytes(_HEAD.pack(*(parts[k] for k in ("magic", "version", "code", "sequences", "documents")))
                         + parts["lengths"].tobytes() + parts["pointers"].tobytes() + parts["bounds"].tobytes()
                         + parts["tail"])
    return apply


def _put(key: str, value: Any, index: int | None = None) -> Callable[[dict], None]:
    def change(parts: dict) -> None:
        if index is None:
            parts[key] = value(parts) if callable(value) else value
        else:
            parts[key][index] = value
    return change


_U64 = 2**64 - 1
MEGATRON_KINDS: dict[tuple[str, str], Callable[[dict], None]] = {
    ("header.magic", "value:other"): _put("magic", b"MMIDIDX\x00\x01"),
    ("header.magic", "value:empty"): _put("magic", b"\x00" * 9),
    ("header.version", "range:0"): _put("version", 0), ("header.version", "range:2"): _put("version", 2),
    ("header.version", "range:max"): _put("version", _U64),
    ("header.dtype", "range:0"): _put("code", 0), ("header.dtype", "float:6"): _put("code", 6),
    ("header.dtype", "float:7"): _put("code", 7), ("header.dtype", "range:255"): _put("code", 255),
    ("header.dtype", "other:uint8"): _put("code", 1), ("header.dtype", "other:int64"): _put("code", 5),
    ("header.sequences", "range:0"): _put("sequences", 0),
    ("header.sequences", "range:+1"): _put("sequences", lambda p: p["sequences"] + 1),
    ("header.sequences", "range:-1"): _put("sequences", lambda p: p["sequences"] - 1),
    ("header.sequences", "range:2**63"): _put("sequences", 2**63),
    ("header.sequences", "range:max"): _put("sequences", _U64),
    ("header.documents", "range:0"): _put("documents", 0), ("header.documents", "range:1"): _put("documents", 1),
    ("header.documents", "range:+1"): _put("documents", lambda p: p["documents"] + 1),
    ("header.documents", "range:max"): _put("documents", _U64),
    ("lengths", "range:-1"): _put("lengths", -1, 0), ("lengths", "range:max"): _put("lengths", 2**31 - 1, 0),
    ("lengths", "range:0"): _put("lengths", 0, 1),
    ("pointers", "range:-8"): _put("pointers", -8, 1), ("pointers", "value:odd"): _put("pointers", 7, 0),
    ("pointers", "range:huge"): _put("pointers", 2**62, -1),
    ("document_indices", "value:first-1"): _put("bounds", 1, 0),
    ("document_indices", "range:past-end"): _put("bounds", 10**6, -1),
    ("document_indices", "range:-1"): _put("bounds", -1, -1),
    ("document_indices", "value:non-monotone"): _put("bounds", lambda p: p["bounds"][::-1].copy()),
    ("modes", "value:multimodal"): _put("tail", lambda p: b"\x00" * p["sequences"]),
    ("modes", "value:stray-byte"): _put("tail", b"\x01"),
}


def megatron_mutations() -> list[Mutation]:
    return [Mutation(field, kind, _megatron(change)) for (field, kind), change in MEGATRON_KINDS.items()] \
        + [Mutation("header", "truncate:in-header", _truncate(20)),
           Mutation("header", "truncate:header-only", _truncate(_HEAD.size))] + file_mutations()


# ---- what a run may change ------------------------------------------------------------------------------
def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under ``root`` (relative) -> (kind, content hash or link target, mode); links are
    not followed."""
    found: dict[str, tuple] = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            info = path.lstat()
            rel = str(path.relative_to(root))
            if stat.S_ISLNK(info.st_mode):
                found[rel] = ("link", os.readlink(path), 0)
            elif stat.S_ISREG(info.st_mode):
                found[rel] = ("file", _sha(path), stat.S_IMODE(info.st_mode))
            else:
                found[rel] = ("dir" if stat.S_ISDIR(info.st_mode) else "other", None, stat.S_IMODE(info.st_mode))
    return found


def _sha(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def foreign_changes(before: dict[str, tuple], after: dict[str, tuple], owned: Callable[[str], bool]) -> list[str]:
    """Paths of ``before`` that ``after`` lacks or holds otherwise, except those ``owned`` by the run
    (what it writes) and checkpoint files moved aside whole: ``ckpt/step_N/F`` found unchanged as
    ``ckpt/step_N.rejected[.k]/F``."""
    bad = []
    for rel, entry in before.items():
        if after.get(rel) == entry or owned(rel):
            continue
        if not _moved_aside(rel, entry, after):
            bad.append(f"{rel}: {entry[:2]} -> {after.get(rel, ('gone',))[:2]}")
    return bad


def _moved_aside(rel: str, entry: tuple, after: dict[str, tuple]) -> bool:
    parts = Path(rel).parts
    for i, part in enumerate(parts):
        if part.startswith("step_") and i > 0 and parts[i - 1] == "ckpt":
            rest = parts[i + 1:]
            for k in ["", *(f".{n}" for n in range(1, 10))]:
                moved = str(Path(*parts[:i], f"{part}.rejected{k}", *rest))
                if after.get(moved) == entry:
                    return True
    return False
