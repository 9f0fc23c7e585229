"""Reading files a run did not necessarily write, and holding lock files, without being led astray.

A checkpoint folder or a prepared corpus may come from somewhere else. ``read_regular`` reads a
file only if it is a regular file (a FIFO would block forever, a link to ``/dev/zero`` would read
until memory runs out) no larger than a cap. ``open_lock`` opens a lock file without following a
link and refuses anything but a plain file of one name (a link or hard link placed there would
have the pid written into another file); ``open_append`` opens a run's log the same way.
``replace_text`` rewrites a file so that a failure (a full disk) leaves the old one whole.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import stat
from pathlib import Path


def read_regular(path: Path, limit: int, what: str, follow: bool = True) -> bytes:
    """The bytes of ``path``; ``FileNotFoundError`` if it is missing, ``ValueError`` naming ``what``
    (e.g. ``"checkpoint metadata"``) if it is not a regular file or is over ``limit`` bytes, or, with
    ``follow=False``, if it is a symbolic link."""
    # O_NONBLOCK: opening a FIFO for reading returns at once instead of waiting for a writer
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW))
    except OSError as exc:
        if follow or exc.errno != errno.ELOOP:
            raise
        raise ValueError(f"{path} is a symbolic link; refusing to read it as {what} (a save writes a "
                         f"plain file there)") from None
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


def _open_own(path: Path, flags: int, what: str) -> int:
    """A descriptor of ``path`` (created if missing) opened without following a link; ``ValueError``
    if it is a link, not a regular file, or has other names."""
    try:
        fd = os.open(path, flags | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise ValueError(f"{path} cannot be opened as {what} ({exc.strerror}); {_open_advice(exc, path)}") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
        os.close(fd)
        raise ValueError(f"{path} is not a plain file of its own (a device, FIFO or hard link); remove it")
    return fd


def _open_advice(exc: OSError, path: Path) -> str:
    """What to do about ``path`` that :func:`_open_own` could not open, for its errno."""
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "not writable: choose another --out or fix the permissions of it or its folder"
    if exc.errno == errno.ELOOP:   # (O_NOFOLLOW on a symbolic link)
        return "it is a symbolic link: remove the link (a run writes a plain file there)"
    if exc.errno in (errno.ENXIO, errno.EISDIR):   # a FIFO nobody reads; a folder
        return "it is not a plain file: move it away"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"the disk holding {Path(path).parent} is full: free space there or choose another --out"
    return "remove it if it is a link or not a plain file"


def open_lock(path: Path):
    """``path`` opened for reading and writing (created if missing) without following a link and
    without truncating it; ``ValueError`` if it is a link, not a regular file, or has other names."""
    return os.fdopen(_open_own(path, os.O_RDWR, "a lock file"), "r+")


def open_append(path: Path):
    """``path`` opened for appending text, like :func:`open_lock` (a run's log: ``metrics.jsonl``)."""
    return os.fdopen(_open_own(path, os.O_WRONLY | os.O_APPEND, "a log to append to"), "a")


def one_line(exc: BaseException) -> str:
    """An error in one line: an ``OSError``'s errno text and path, else its message's first line."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror + (f" ({exc.filename})" if exc.filename else "")
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


class WriteFailed(RuntimeError):
    """Writing the run's output (a checkpoint, metrics) failed; the message is one line with the cause
    (errno text) and the path. What was written before is intact."""


def remove(path: Path) -> None:
    """Delete a file, a link (not what it points to) or a folder, if there."""
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def lock_held(path: Path) -> bool:
    """Whether a live process holds the lock file ``path`` (:func:`open_lock` and ``flock``), asked
    without creating it or following a link: a missing or odd file is held by nobody."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        try:   # a shared lock for an instant: refused exactly while a run holds its exclusive one
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


REJECTED = "REJECTED"   # the note a folder moved aside holds: why it was


def move_aside(path: Path, reason: str) -> Path:
    """Rename ``path`` to ``NAME.rejected`` (``NAME.rejected.1``, ... if taken) beside it, with a
    ``REJECTED`` note giving ``reason`` in it if it is a folder; returns where it went. What a run did
    not write (a user's file, an older version's checkpoint) is kept, never deleted."""
    path = Path(path)
    target = path.with_name(path.name + ".rejected")
    n = 0
    while os.path.lexists(target):
        n += 1
        target = path.with_name(f"{path.name}.rejected.{n}")
    os.rename(path, target)   # a link moves as itself: what it points to is untouched
    if target.is_dir() and not target.is_symlink():
        note = target / REJECTED
        if not os.path.lexists(note):   # a file of that name is the user's: keep it
            replace_text(note, reason.rstrip() + "\n")
    fsync_dir(path.parent)
    return target


def replace_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically: a new file beside it, fsynced, renamed over it. A failure
    (a full disk) leaves the old file as it was and raises ``OSError``."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.unlink()
    except FileNotFoundError:
        pass
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    """Make a rename or creation inside ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

