"""How many checkpoints a run keeps (``train.keep_last``), and what a full disk says about it.

:func:`keep_newest` runs on rank 0 once every rank has agreed a save succeeded: the complete
checkpoints -- ``step_N`` folders that verify (exactly their manifest's files at the listed sizes,
metadata that reads safely; the checksums were taken from the files as the save read them back) --
beyond the newest ``keep`` are deleted, oldest first. A ``step_N`` that does not verify is not
counted and stays (a resume moves it aside, never deletes it: it may hold what no run wrote), as does
anything else in ``ckpt/``: a link, a ``step_N.rejected``, a user's file or folder. A folder is
renamed to ``step_N.deleting`` before its files go, so a run killed mid-delete leaves no half
checkpoint that a resume would have to skip; the next save removes what is left of it.

:class:`~distattn.train.trainer.Trainer` calls it after :func:`.dcp.save`; a full disk's line is
:func:`.disk.no_room`'s.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable

from ..safe_io import fsync_dir, one_line
from .dcp import candidates, verify

DELETING = ".deleting"   # suffix of a checkpoint folder being deleted (see :func:`keep_newest`)
_DELETING_DIR = re.compile(r"step_(\d+)\.deleting")


def keep_newest(ckpt_root: Path, keep: int, saved: Path, say: Callable[[str], Any] | None = None) -> list[Path]:
    """Rank 0, after the save of ``saved`` was agreed: delete the complete checkpoints under ``ckpt_root``
    beyond the newest ``keep`` (module docstring); the ones deleted. Nothing is deleted unless ``saved``
    verifies. A deletion that fails is said (``say``) and skipped: it never fails the run."""
    assert keep >= 1, keep   # (validation refuses train.keep_last < 1: the newest checkpoint always stays)
    _drop_leftovers(ckpt_root)
    try:
        verify(saved, checksums=False)
    except (ValueError, OSError) as exc:
        if say is not None:
            say(f"train.keep_last: deleted no checkpoint, {saved.name} does not verify: {one_line(exc)}")
        return []
    found, _ = candidates(ckpt_root)
    kept, gone = 0, []
    for path in found:
        if path.is_symlink():   # (candidates follows links: one is the user's, never counted or deleted)
            continue
        try:
            verify(path, checksums=False)
        except (ValueError, OSError):
            continue
        kept += 1
        if kept <= keep:
            continue
        try:
            doomed = path.with_name(path.name + DELETING)
            os.rename(path, doomed)
            fsync_dir(ckpt_root)
            shutil.rmtree(doomed)
        except OSError as exc:
            if say is not None:
                say(f"train.keep_last: could not delete {path}: {one_line(exc)}")
            continue
        gone.append(path)
    if gone and say is not None:
        say(f"train.keep_last {keep}: deleted {', '.join(p.name for p in gone)} (kept the newest {keep} that verify)")
    return gone


def _drop_leftovers(ckpt_root: Path) -> None:
    """Remove what a deletion cut short left (``step_N.deleting`` folders, never a link)."""
    try:
        names = [p for p in Path(ckpt_root).iterdir() if _DELETING_DIR.fullmatch(p.name)]
    except OSError:
        return
    for path in names:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
