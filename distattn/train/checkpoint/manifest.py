"""A checkpoint's manifest: every file it holds with its size and SHA-256, and the run it belongs to.

``manifest.json`` is written last into ``step_N.partial`` (after DCP's ``.metadata``), fsynced, and
only then is the folder renamed to ``step_N`` (:func:`distattn.train.checkpoint.save`). A checkpoint
*verifies* when its folder holds exactly the files its manifest lists, each of the listed size and
hash -- so a flipped bit, a truncated or replaced shard or a stray file is caught before anything is
read, and names the file. Each rank hashes the files it wrote (``__<rank>_*.distcp``), so a save costs
one read of the rank's own share; a load's check is split over the ranks the same way
(:func:`distattn.train.checkpoint.agreed_checkpoint`).

The manifest also records what a resume must agree with, readable without torch or a process group:
the model's shape, the data source, the batch geometry and the length of the learning-rate schedule
(``train.lr_decay_steps``). Example::

    {"format": 1, "step": 25,
     "files": {".metadata": {"bytes": 51234, "sha256": "9f2c..."}, "__0_0.distcp": {...}, ...},
     "run": {"model": {"dim": 256, ...}, "data": {"source": "stdlib", "path": null},
             "geometry": {"seq_len": 8192, "dp": 1, "cp": 4, "world_size": 4, "tokens_per_step": 8192,
                          "packing": "stream"},
             "lr_decay_steps": 50}}
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..safe_io import one_line, read_regular, replace_text

NAME = "manifest.json"
FORMAT = 1
LIMIT = 64 << 20            # bytes of a manifest read: a few hundred bytes per file
_HEX = re.compile(r"[0-9a-f]{64}")
_SHARD = re.compile(r"__(\d+)_\d+\.distcp")   # a DCP shard and the rank that wrote it
_CHUNK = 8 << 20
_DEPTH = 8                  # levels of nesting a manifest may have (a save writes 7)
_STEP_NAME = re.compile(r"step_(\d+)")   # a published checkpoint's folder: its manifest's step is N


@dataclass(frozen=True)
class Manifest:
    step: int
    files: dict[str, tuple[int, str]]      # name -> (bytes, sha256 hex)
    run: dict[str, Any]                     # {"model": {...}, "data": {...}, "geometry": {...}, "lr_decay_steps": int}

    @property
    def total_bytes(self) -> int:
        return sum(size for size, _ in self.files.values())


def digest(path: Path) -> tuple[int, str]:
    """``(bytes, sha256 hex)`` of the regular file ``path`` (not followed if it is a link)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError(f"{path} is not a regular file")
        h, size = hashlib.sha256(), 0
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def own_files(names, rank: int, world: int) -> list[str]:
    """Which of a checkpoint's files ``rank`` hashes: the DCP shards it wrote (``__<rank>_*``), and on
    rank 0 every file no rank claims (``.metadata``)."""
    def owner(name: str) -> int:
        m = _SHARD.fullmatch(name)
        return int(m.group(1)) % world if m else 0
    return sorted(n for n in names if owner(n) == rank)


def write(directory: Path, step: int, files: dict[str, tuple[int, str]], run: dict[str, Any]) -> None:
    """Write ``directory/manifest.json`` durably (temporary file, fsync, rename, fsync the folder)."""
    text = json.dumps({"format": FORMAT, "step": step,
                       "files": {n: {"bytes": s, "sha256": h} for n, (s, h) in sorted(files.items())},
                       "run": run}, indent=1, allow_nan=False)
    replace_text(Path(directory) / NAME, text)


def read(directory: Path) -> Manifest:
    """The manifest of the checkpoint ``directory``; ``ValueError`` in one line naming the file and the
    field when it is missing, a link, or not a manifest this trainer writes (:func:`parse`)."""
    path = Path(directory) / NAME
    try:
        raw = read_regular(path, LIMIT, "checkpoint manifest", follow=False)
    except FileNotFoundError:
        raise ValueError(f"{path} is missing: {Path(directory).name} was not saved by this version of distattn "
                         f"(or its manifest was removed), so its files cannot be checked") from None
    return parse(raw, path)


def parse(raw: bytes, path: Path) -> Manifest:
    """The manifest held in ``raw``, read from ``path`` (``.../step_N/manifest.json``: its ``step`` must
    be ``N``); ``ValueError`` naming ``path`` and the first field that breaks the schema."""
    try:
        doc = json.loads(raw, parse_constant=_no_constant)
    except RecursionError:   # json recurses per level: a hostile file must not take the process down
        raise ValueError(f"{path} is nested over {_DEPTH} levels deep; not a distattn checkpoint manifest, "
                         f"the checkpoint cannot be checked") from None
    except ValueError as exc:
        raise ValueError(f"{path} is damaged ({one_line(exc)}); the checkpoint cannot be checked") from None
    try:
        _check_depth(doc, 1)
        return _checked(doc, path)
    except _Bad as bad:
        raise ValueError(f"{path}: {bad}; not a manifest distattn writes (format {FORMAT}), the checkpoint "
                         f"cannot be checked") from None


class _Bad(Exception):
    """A field that breaks the schema, in words (``field is what, not what it must be``)."""


def _no_constant(name: str):
    raise ValueError(f"{name} is not a number a manifest holds")


def _check_depth(value: Any, depth: int) -> None:
    """``_Bad`` if ``value`` nests deeper than ``_DEPTH`` (the deepest a save writes is 7)."""
    if depth > _DEPTH:
        raise _Bad(f"nested over {_DEPTH} levels deep")
    if isinstance(value, (dict, list)):
        for item in value.values() if isinstance(value, dict) else value:
            _check_depth(item, depth + 1)


def _is_int(value: Any, low: int = 0) -> bool:
    return type(value) is int and value >= low


def _need(ok: bool, field: str, value: Any, want: str) -> None:
    if not ok:
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        raise _Bad(f"{field} is {shown}, not {want}")


def _checked(doc: Any, path: Path) -> Manifest:
    _need(isinstance(doc, dict), "the manifest", doc, "a JSON object")
    for key in ("format", "step", "files", "run"):
        if key not in doc:
            raise _Bad(f"{key} is missing")
    _need(type(doc["format"]) is int and doc["format"] == FORMAT, "format", doc["format"], f"{FORMAT}")
    step = doc["step"]
    _need(_is_int(step), "step", step, "a whole number >= 0")
    folder = _STEP_NAME.fullmatch(path.parent.name)
    _need(folder is None or int(folder.group(1)) == step, "step", step,
          f"the N of its folder {path.parent.name} (a manifest copied from another checkpoint?)")
    _need(isinstance(doc["files"], dict), "files", doc["files"], "an object of file names")
    files = {name: _file_entry(name, entry) for name, entry in doc["files"].items()}
    return Manifest(step, files, _checked_run(doc["run"]))


def _file_entry(name: str, entry: Any) -> tuple[int, str]:
    _need(name not in ("", ".", "..", NAME) and "/" not in name and "\\" not in name and "\0" not in name,
          "files", name, "a plain file name")
    _need(isinstance(entry, dict), f"files[{name!r}]", entry, 'an object {"bytes": ..., "sha256": ...}')
    size, sha = entry.get("bytes"), entry.get("sha256")
    _need(_is_int(size), f"files[{name!r}].bytes", size, "a whole number >= 0")
    _need(isinstance(sha, str) and _HEX.fullmatch(sha) is not None, f"files[{name!r}].sha256", sha,
          "64 lowercase hex digits")
    return size, sha


def _checked_run(run: Any) -> dict[str, Any]:
    """``run`` if it has the types :func:`~.resume.resume_config` reads; ``{}`` (a save without a
    run) is allowed, a present field of the wrong type is not."""
    _need(isinstance(run, dict), "run", run, "an object")
    model = run.get("model", {})
    _need(isinstance(model, dict), "run.model", model, "an object")
    for key, value in model.items():
        _need(value is None or isinstance(value, (int, float, bool, str)), f"run.model.{key}", value,
              "a number, true/false, null or a string")
    data = run.get("data", {})
    _need(isinstance(data, dict), "run.data", data, "an object")
    for key in ("source", "path", "tokenizer"):
        _need(data.get(key) is None or isinstance(data[key], str), f"run.data.{key}", data.get(key),
              "a string or null")
    _need(data.get("blend") is None or isinstance(data["blend"], list), "run.data.blend", data.get("blend"),
          "a list or null")
    _check_identities(data.get("identity"))
    _check_geometry(run.get("geometry"))
    decay = run.get("lr_decay_steps")
    _need(decay is None or _is_int(decay, 1), "run.lr_decay_steps", decay, "a whole number >= 1 or null")
    return run


def _check_geometry(geometry: Any) -> None:
    """The batch geometry :func:`~.resume.reshaped` compares: absent or null (saved before it was
    recorded), else an object whose known keys are whole numbers >= 1 and ``packing`` a string (a key
    it lacks is not compared; one it does not know is ignored, as elsewhere in ``run``)."""
    field = "run.geometry"
    _need(geometry is None or isinstance(geometry, dict), field, geometry, "an object or null")
    for key, value in (geometry or {}).items():
        if key == "packing":
            _need(isinstance(value, str), f"{field}.packing", value, "a string")
        elif key in ("seq_len", "dp", "cp", "world_size", "tokens_per_step"):
            _need(_is_int(value, 1), f"{field}.{key}", value, "a whole number >= 1")


def _check_identities(identities: Any) -> None:
    """The data identities :func:`~..data.identity.identity_change` compares: a list of null or
    ``{"index_sha256": str}`` / ``{"files": {name: {"size": int, "sha256": str, "mtime": number}}}``."""
    field = "run.data.identity"
    _need(identities is None or isinstance(identities, list), field, identities, "a list or null")
    for i, ident in enumerate(identities or []):
        _need(ident is None or isinstance(ident, dict), f"{field}[{i}]", ident, "an object or null")
        ident = ident or {}
        _need(isinstance(ident.get("index_sha256", ""), str), f"{field}[{i}].index_sha256",
              ident.get("index_sha256"), "a string")
        files = ident.get("files", {})
        _need(isinstance(files, dict), f"{field}[{i}].files", files, "an object")
        for name, entry in files.items():
            where = f"{field}[{i}].files[{name!r}]"
            _need(isinstance(entry, dict), where, entry, "an object")
            _need(_is_int(entry.get("size", 0)), f"{where}.size", entry.get("size"), "a whole number >= 0")
            _need(isinstance(entry.get("sha256", ""), str), f"{where}.sha256", entry.get("sha256"), "a string")
            mtime = entry.get("mtime", 0)
            _need(isinstance(mtime, (int, float)) and not isinstance(mtime, bool), f"{where}.mtime", mtime,
                  "a number")


def check_listing(directory: Path, manifest: Manifest) -> None:
    """``ValueError`` unless ``directory`` holds exactly the manifest's files (besides the manifest),
    each a regular file of the listed size."""
    directory = Path(directory)
    present = {p.name for p in directory.iterdir()} - {NAME}
    for name in sorted(set(manifest.files) - present):
        raise ValueError(f"{directory / name} is missing: the checkpoint's manifest lists it")
    for name in sorted(present - set(manifest.files)):
        raise ValueError(f"{directory / name} is not in the checkpoint's manifest: the folder was changed "
                         f"after the save")
    for name, (size, _) in sorted(manifest.files.items()):
        info = (directory / name).lstat()
        if not stat.S_ISREG(info.st_mode):
            raise ValueError(f"{directory / name} is not a regular file (the save wrote one)")
        if info.st_size != size:
            raise ValueError(f"{directory / name} is {info.st_size:,} bytes but the manifest says {size:,}: the "
                             f"file was truncated or replaced")


def check_hashes(directory: Path, manifest: Manifest, names) -> None:
    """``ValueError`` naming the first of ``names`` whose content does not match the manifest."""
    for name in names:
        size, want = manifest.files[name]
        got_size, got = digest(Path(directory) / name)
        if (got_size, got) != (size, want):
            raise ValueError(f"{Path(directory) / name} does not match its checksum in the manifest (sha256 "
                             f"{got[:12]}... instead of {want[:12]}...): the file was corrupted after the save")
