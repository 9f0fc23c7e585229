"""A checkpoint's manifest: every file it holds with its size and SHA-256, and the run it belongs to.

``manifest.json`` is written last into ``step_N.partial`` (after DCP's ``.metadata``), fsynced, and
only then is the folder renamed to ``step_N`` (:func:`distattn.train.checkpoint.save`). A checkpoint
*verifies* when its folder holds exactly the files its manifest lists, each of the listed size and
hash -- so a flipped bit, a truncated or replaced shard or a stray file is caught before anything is
read, and names the file. Each rank hashes the files it wrote (``__<rank>_*.distcp``), so a save costs
one read of the rank's own share; a load's check is split over the ranks the same way
(:func:`distattn.train.checkpoint.agreed_checkpoint`).

The manifest also records what a resume must agree with, readable without torch or a process group:
the model's shape, the data source and the length of the learning-rate schedule
(``train.lr_decay_steps``). Example::

    {"format": 1, "step": 25,
     "files": {".metadata": {"bytes": 51234, "sha256": "9f2c..."}, "__0_0.distcp": {...}, ...},
     "run": {"model": {"dim": 256, ...}, "data": {"source": "stdlib", "path": null},
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

from ..safe_io import read_regular, replace_text

NAME = "manifest.json"
FORMAT = 1
LIMIT = 64 << 20            # bytes of a manifest read: a few hundred bytes per file
_HEX = re.compile(r"[0-9a-f]{64}")
_SHARD = re.compile(r"__(\d+)_\d+\.distcp")   # a DCP shard and the rank that wrote it
_CHUNK = 8 << 20


@dataclass(frozen=True)
class Manifest:
    step: int
    files: dict[str, tuple[int, str]]      # name -> (bytes, sha256 hex)
    run: dict[str, Any]                     # {"model": {...}, "data": {...}, "lr_decay_steps": int}

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
    """The manifest of the checkpoint ``directory``; ``ValueError`` naming the file when it is missing
    or not a manifest this trainer writes."""
    path = Path(directory) / NAME
    try:
        raw = read_regular(path, LIMIT, "checkpoint manifest")
    except FileNotFoundError:
        raise ValueError(f"{path} is missing: {Path(directory).name} was not saved by this version of distattn "
                         f"(or its manifest was removed), so its files cannot be checked") from None
    try:
        doc = json.loads(raw)
        files = {name: (entry["bytes"], entry["sha256"]) for name, entry in doc["files"].items()}
        run, step = doc["run"], doc["step"]
        ok = (doc["format"] == FORMAT and type(step) is int and isinstance(run, dict)
              and all(isinstance(n, str) and n == Path(n).name and n not in (".", "..", NAME)
                      and type(s) is int and s >= 0 and isinstance(h, str) and _HEX.fullmatch(h)
                      for n, (s, h) in files.items()))
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ValueError(f"{path} is damaged ({type(exc).__name__}: {exc}); the checkpoint cannot be "
                         f"checked") from None
    if not ok:
        raise ValueError(f"{path} is not a distattn checkpoint manifest (format {FORMAT}); the checkpoint cannot "
                         f"be checked")
    return Manifest(step, files, run)


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
