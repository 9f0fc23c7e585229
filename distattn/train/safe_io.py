"""Reading files a run did not necessarily write, and holding lock files, without being led astray.

A checkpoint folder or a prepared corpus may come from somewhere else. ``read_regular`` reads a
file only if it is a regular file (a FIFO would block forever, a link to ``/dev/zero`` would read
until memory runs out) no larger than a cap. ``open_lock`` opens a lock file without following a
link and refuses anything but a plain file of one name (a link or hard link placed there would
have the pid written into another file).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path


def read_regular(path: Path, limit: int, what: str) -> bytes:
    """The bytes of ``path``; ``FileNotFoundError`` if it is missing, ``ValueError`` naming ``what``
    (e.g. ``"checkpoint metadata"``) if it is not a regular file or is over ``limit`` bytes."""
    # O_NONBLOCK: opening a FIFO for reading returns at once instead of waiting for a writer
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ValueError(f"{path} is not a regular file; refusing to read it as {what}")
        if info.st_size > limit:
            raise ValueError(f"{path} is {info.st_size:,} bytes, over the {limit:,} a {what} file may have; "
                             f"refusing to read it")
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(limit + 1)
        if len(data) > limit:   # grew while being read
            raise ValueError(f"{path} is over the {limit:,} bytes a {what} file may have; refusing to read it")
        return data
    finally:
        os.close(fd)


def open_lock(path: Path):
    """``path`` opened for reading and writing (created if missing) without following a link and
    without truncating it; ``ValueError`` if it is a link, not a regular file, or has other names."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    except OSError as exc:   # ELOOP: a symbolic link; others: a folder, no permission
        raise ValueError(f"{path} cannot be opened as a lock file ({exc.strerror}); remove it if it is a link "
                         f"or not a plain file") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
        os.close(fd)
        raise ValueError(f"{path} is not a plain file of its own (a device, FIFO or hard link); remove it")
    return os.fdopen(fd, "r+")
