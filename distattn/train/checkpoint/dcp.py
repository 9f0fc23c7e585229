"""Checkpoints with ``torch.distributed.checkpoint`` (DCP) that prove themselves and fail cleanly.

State: model and optimizer (``get_state_dict``, so DDP and FSDP2 both work), the step, the data
packer's cursor and the RNG state, in ``ckpt/step_N/``::

    step_N/  .metadata  __0_0.distcp  __1_0.distcp ...  manifest.json

* **A save is all or nothing.** Every rank writes into ``step_N.partial``; each rank then hashes the
  files it wrote, rank 0 writes ``manifest.json`` (every file's size and SHA-256, and the run's
  model shape, data source and schedule length: :mod:`.manifest`), fsyncs it and renames the folder.
  Before writing, rank 0 checks the file system has room for the checkpoint. Any error -- no space,
  a read-only folder, a failed rank -- is agreed on by all ranks, the partial folder is removed and
  every rank raises :class:`~distattn.train.safe_io.WriteFailed` with one line: the cause (errno
  text) and the path. A rank that dies or hangs cannot agree: the others raise
  :class:`~distattn.distributed.comm.PeerFailed` (one line: the phase, the path, the rank when known) and rank 0
  removes the partial folder (the launching process does, when rank 0 is the one gone:
  :func:`drop_new_partials`). Older checkpoints are never touched. A full disk -- before the write
  or under it -- is one line naming the disk, the bytes the save needs and ``train.keep_last``
  (:func:`.disk.no_room`).
* **Keep the last N** (``train.keep_last``): once every rank has agreed a save succeeded, rank 0
  deletes the complete checkpoints beyond the newest N (:func:`.retention.keep_newest`, which the
  trainer calls after :func:`save`); one that does not verify is neither counted nor deleted, nor is
  anything else in the folder.
* **A checkpoint verifies** (:func:`verify`) when its folder holds exactly its manifest's files, each
  of the listed size and hash, and DCP's metadata reads safely (:mod:`.dcp_safe`). "Newest good"
  always means newest that verifies: :func:`newest_usable` (the launching process, ``distattn ckpt
  verify``) and :func:`agreed_checkpoint` (the ranks, splitting the hashing between them) skip the
  ones that do not, and say which file failed.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from . import manifest
from ...distributed.comm import PeerFailed, peer_phase
from .dcp_safe import SafeLoadPlanner, SafeReader, check_storage, read_metadata
from .disk import no_room
from ..safe_io import WriteFailed, fsync_dir, move_aside, one_line, remove

_STEP_DIR = re.compile(r"step_(\d+)")
PARTIAL = ".partial"   # suffix of a checkpoint folder being written (see :func:`save`)
_PARTIAL_DIR = re.compile(r"step_(\d+)\.partial")
ROOM_MARGIN, ROOM_SLACK = 1.05, 1 << 20   # a save wants this times its tensors' bytes free, plus this
                                         # (DCP's metadata, the manifest, the pickled optimizer settings)


def verify(directory: Path, checksums: bool = True) -> manifest.Manifest:
    """Check a checkpoint without loading it; returns its manifest. The folder must hold exactly the
    manifest's files at their sizes, DCP's metadata must read safely and name only files that are
    there, and with ``checksums`` every file must hash to its manifest entry. ``ValueError`` naming
    the file otherwise."""
    directory = Path(directory)
    if directory.is_symlink() or not directory.is_dir():
        raise ValueError(f"checkpoint {directory} does not exist or is not a folder")
    found = manifest.read(directory)
    manifest.check_listing(directory, found)
    if checksums:   # .metadata first: it is the only file unpickled
        manifest.check_hashes(directory, found, sorted(found.files))
    check_storage(directory, read_metadata(directory / ".metadata"))
    return found


def _step(path: Path) -> int:
    return int(_STEP_DIR.fullmatch(path.name).group(1))


def unfinished(name: str, live: bool) -> str:
    """The line for the unfinished save ``name`` (``step_N.partial``); ``live``: its run's lock is held."""
    state = "being written by a live run (its lock is held)" if live else "abandoned: the run stopped while writing it"
    return f"{name}: a save that did not finish, {state}"


def candidates(ckpt_root: Path, live: bool = False) -> tuple[list[Path], list[str]]:
    """``step_N`` folders under ``ckpt_root``, newest first (unchecked), and a line for each unfinished
    save newer than all of them (``live``: the run's lock is held, so it is being written now)."""
    ckpt_root = Path(ckpt_root)
    if not ckpt_root.is_dir():
        return [], []
    found = sorted((p for p in ckpt_root.iterdir() if _STEP_DIR.fullmatch(p.name) and p.is_dir()),
                   key=_step, reverse=True)
    newest = _step(found[0]) if found else -1
    skipped = [unfinished(p.name, live)
               for p in sorted(ckpt_root.iterdir(), key=lambda p: p.name, reverse=True)
               if (m := _PARTIAL_DIR.fullmatch(p.name)) and int(m.group(1)) > newest]
    return found, skipped


def partials(ckpt_root: Path) -> dict[str, int]:
    """The unfinished saves (``step_N.partial`` folders) under ``ckpt_root``: name -> inode."""
    try:
        return {p.name: p.lstat().st_ino for p in Path(ckpt_root).iterdir()
                if _PARTIAL_DIR.fullmatch(p.name) and p.is_dir() and not p.is_symlink()}
    except OSError:
        return {}


def drop_new_partials(ckpt_root: Path, before: dict[str, int]) -> None:
    """Remove the unfinished saves that are not in ``before`` (:func:`partials` when the run started):
    the launching process cleans up after a rank that died or hung mid-save. What the run did not
    write stays."""
    for name, inode in partials(ckpt_root).items():
        if before.get(name) != inode:
            shutil.rmtree(Path(ckpt_root) / name, ignore_errors=True)


def _none_usable(ckpt_root: Path, skipped: list[str]) -> ValueError:
    return ValueError(f"no checkpoint under {ckpt_root} verifies: " + "; ".join(skipped)
                      + f"; move {ckpt_root} aside (or pass --overwrite) to start over")


def _skipped_line(path: Path, skipped: list[str]) -> str:
    return f"resuming from {path.name}, the newest checkpoint that verifies; skipped " + "; ".join(skipped)


def _rejected(path: Path, reason: str, aside: bool) -> str:
    """A skipped checkpoint's entry in the resume's line; with ``aside`` it is first moved to
    ``step_N.rejected`` (never deleted: it may hold what no run wrote) and the entry says where."""
    if not aside:
        return f"{path.name}: {reason}"
    try:
        where = move_aside(path, f"distattn train --resume skipped this checkpoint: {reason}")
    except OSError as exc:
        return f"{path.name}: {reason} (could not be moved aside: {one_line(exc)})"
    return f"{path.name}: {reason} (moved to {where})"


def newest_usable(ckpt_root: Path, say: Callable[[str], Any] | None = None, checksums: bool = True,
                  aside: bool = False) -> Path | None:
    """The newest ``step_N`` checkpoint under ``ckpt_root`` that :func:`verify` accepts.

    None when there is no checkpoint at all. Newer ones that fail (an unfinished save, a truncated or
    corrupted file) are skipped and, with ``say``, reported in one line with the one used; with
    ``aside`` (a resume deciding, on rank 0) each is moved to ``step_N.rejected`` once one is found.
    ``ValueError`` listing the reasons when checkpoints exist but none verifies."""
    found, skipped = candidates(ckpt_root)
    failed: list[tuple[Path, str]] = []
    for path in found:
        try:
            verify(path, checksums)
        except (ValueError, OSError) as exc:
            failed.append((path, one_line(exc)))
            continue
        skipped += [_rejected(bad, reason, aside) for bad, reason in failed]
        if skipped and say is not None:
            say(_skipped_line(path, skipped))
        return path
    skipped += [f"{bad.name}: {reason}" for bad, reason in failed]
    if skipped:
        raise _none_usable(ckpt_root, skipped)
    return None


def agreed_checkpoint(ckpt_root: Path, say: Callable[[str], Any] | None = None) -> Path | None:
    """:func:`newest_usable` for the ranks of a job: rank 0 lists the candidates, every rank checks
    each one's structure and hashes its share of the files (:func:`manifest.own_files`), and all take
    the newest that passed everywhere. Every rank makes the same collectives."""
    with peer_phase("checkpoint agreement", ckpt_root):   # a peer gone or silent: one line (PeerFailed)
        return _agreed_checkpoint(ckpt_root, say)


def _agreed_checkpoint(ckpt_root: Path, say: Callable[[str], Any] | None) -> Path | None:
    rank, world = dist.get_rank(), dist.get_world_size()
    listing = [candidates(ckpt_root) if rank == 0 else None]
    dist.broadcast_object_list(listing, src=0)
    found, skipped = listing[0]
    failed: list[tuple[Path, str]] = []
    for path in found:
        try:
            found_manifest = verify(path, checksums=False)
            manifest.check_hashes(path, found_manifest, manifest.own_files(found_manifest.files, rank, world))
            error = None
        except (ValueError, OSError) as exc:
            error = one_line(exc)
        error = _together(error)
        if error is None:
            skipped += [_rejected(bad, reason, rank == 0) for bad, reason in failed]
            if skipped and say is not None:
                say(_skipped_line(path, skipped))
            return path
        failed.append((path, error))
    skipped += [f"{bad.name}: {reason}" for bad, reason in failed]
    if skipped:
        raise _none_usable(ckpt_root, skipped)
    return None


def _together(error: str | None) -> str | None:
    """Every rank's error for one phase, agreed on: the lowest rank's that failed, or None. (Each
    names its file, which names the rank that wrote it; DCP's own errors name the rank.)"""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return error
    errors: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    return next((e for e in errors if e), None)


def room_needed(state_bytes: int) -> int:
    """Free bytes a save of tensors of ``state_bytes`` bytes asks for before it writes."""
    return int(state_bytes * ROOM_MARGIN) + ROOM_SLACK


def _state_bytes(state: Any) -> int:
    """Bytes the tensors of a (nested) state dict take in a checkpoint: a DTensor's global size,
    counted once however it is sharded."""
    if isinstance(state, dict):
        return sum(_state_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(_state_bytes(v) for v in state)
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()   # a DTensor's numel is its global one
    return 0


def _dcp_reason(exc: CheckpointException) -> str:
    failures = sorted(getattr(exc, "failures", {}).items())
    if not failures:
        return one_line(exc)
    rank, failure = failures[0]
    error = failure[0] if isinstance(failure, tuple) else failure   # (exception, traceback) on torch 2.x
    return f"{one_line(error) if isinstance(error, BaseException) else error} (on rank {rank})"


def _state_dicts(model, optimizer) -> tuple[dict, dict]:
    """The model's and optimizer's state by parameter name -- ``get_state_dict``'s (DDP, FSDP2, HSDP), or
    a sharded optimizer's own in the same layout (:meth:`distattn.train.zero1.Zero1.state_dicts`) -- so
    that a checkpoint resumes under any ``parallel.dp_mode`` (DCP reshards)."""
    own = getattr(optimizer, "state_dicts", None)
    return own() if own is not None else get_state_dict(model, optimizer)


def save(directory: Path, model, optimizer, step: int, data_state: list[int], run: dict | None = None, *,
         keep_last: int | None = None) -> None:
    """Save into ``directory`` (module docstring): written under ``directory.partial``, hashed, given a
    manifest, then renamed. ``WriteFailed`` on every rank, with the cause and the path, when any
    part fails; nothing is left behind and older checkpoints are untouched (a full disk names the
    disk, the bytes the save needs and ``train.keep_last``: :func:`.disk.no_room`). Every rank returns
    only once all have agreed the save succeeded."""
    directory = Path(directory)
    partial = directory.with_name(directory.name + PARTIAL)
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    model_sd, optim_sd = _state_dicts(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd,
             "train": {"step": torch.tensor(step), "data": torch.tensor(data_state, dtype=torch.int64),
                       "rng": torch.get_rng_state()}}
    try:
        # a peer that dies or hangs surfaces as gloo's error in a collective: one line (PeerFailed)
        with peer_phase(f"saving checkpoint {directory.name}", directory):
            error = _save_steps(state, partial, directory, step, run, rank, world, keep_last)
    except PeerFailed as exc:
        # the partial folder is this save's own (rank 0's _make_room made it): nothing of it stays. Rank 0
        # removes it, or the rank that saw rank 0 go (under a launcher no other process would)
        if rank == 0 or 0 in exc.failure.ranks:
            shutil.rmtree(partial, ignore_errors=True)
        raise
    if error is not None:
        if rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
        raise WriteFailed(f"saving checkpoint {directory} failed: {error}")


def _save_steps(state: dict, partial: Path, directory: Path, step: int, run: dict | None, rank: int,
                world: int, keep_last: int | None = None) -> str | None:
    """:func:`save`'s phases; the error every rank agreed on, or None."""
    # each phase's errors are agreed on (_together) before the next starts, so every rank takes the same path
    error = _together(_make_room(partial, state, keep_last) if rank == 0 else None)
    if error is None:
        error = _together(_write(state, partial, keep_last))
    files: dict[str, tuple[int, str]] = {}
    if error is None:
        files, error = _hash(partial, rank, world)
    if error is None and rank == 0:
        error = _publish(partial, directory, step, files, run, _state_bytes(state), keep_last)
    return _together(error)


def _make_room(partial: Path, state: dict, keep_last: int | None = None) -> str | None:
    """Rank 0: remove what an earlier run left of this step at ``partial`` and check the disk has
    room for ``state``; the error, or None."""
    try:
        remove(partial)
        partial.mkdir(parents=True)
        need = room_needed(_state_bytes(state))
        free = shutil.disk_usage(partial).free
        if free < need:
            return no_room(partial.parent, need, free, keep_last)
    except OSError as exc:
        return one_line(exc)
    return None


def _write(state: dict, partial: Path, keep_last: int | None = None) -> str | None:
    """Every rank: write its part of ``state`` under ``partial`` (DCP); the error, or None."""
    try:
        dcp.save(state, checkpoint_id=str(partial))
    except CheckpointException as exc:   # a BaseException; its str is a traceback per rank
        return _disk_said(_dcp_reason(exc), partial, _state_bytes(state), keep_last)
    except (OSError, RuntimeError, ValueError) as exc:
        return _disk_said(one_line(exc), partial, _state_bytes(state), keep_last)
    return None


_FULL = (os.strerror(errno.ENOSPC), os.strerror(errno.EDQUOT))   # how a full disk (or quota) reads


def _disk_said(error: str, partial: Path, state_bytes: int, keep_last: int | None) -> str:
    """``error``, or the full disk's line (:func:`.disk.no_room`) when the disk filled under the
    write (the room check passed, then another writer took the space): ENOSPC, or torch's stream
    writer's ``unexpected pos N vs M`` for a short write, which names no disk (the disk is full when
    what is free, with what the save wrote so far, is short of what it needs)."""
    try:
        free = shutil.disk_usage(partial).free
        written = sum(e.stat(follow_symlinks=False).st_size for e in os.scandir(partial) if e.is_file()) \
            if partial.is_dir() else 0
    except OSError:
        return error
    need = room_needed(state_bytes)
    if not any(text in error for text in _FULL) and free + written > need:
        return error
    return no_room(partial.parent, need, free, keep_last, cause=error)


def _hash(partial: Path, rank: int, world: int) -> tuple[dict[str, tuple[int, str]], str | None]:
    """Every rank hashes what it wrote (rank 0 also the metadata): ``(every rank's files, agreed
    error)``."""
    error = None
    try:
        mine = {name: manifest.digest(partial / name) for name in manifest.own_files(os.listdir(partial), rank, world)}
    except (OSError, ValueError) as exc:
        mine, error = {}, one_line(exc)
    error = _together(error)
    if error is None and world > 1:
        shares: list[dict | None] = [None] * world
        dist.all_gather_object(shares, mine)
        files: dict[str, tuple[int, str]] = {}
        for share in shares:
            files.update(share)
        return files, None
    return mine, error


def _publish(partial: Path, directory: Path, step: int, files: dict, run: dict | None, state_bytes: int = 0,
             keep_last: int | None = None) -> str | None:
    """Rank 0: write the manifest and rename ``partial`` to ``directory``; the error, or None."""
    try:
        manifest.write(partial, step, files, run or {})
        _clear_way(directory)
        os.replace(partial, directory)
        fsync_dir(directory.parent)
    except OSError as exc:
        full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
        return _disk_said(one_line(exc), partial, state_bytes, keep_last) if full else one_line(exc)
    return None


def _clear_way(directory: Path) -> None:
    """Rank 0: make room for a save at ``directory``. A checkpoint that verifies was written by this
    trainer and is replaced; anything else there (a user's file, an older version's checkpoint) was
    maybe not, so it is moved to ``step_N.rejected``, never deleted."""
    if not os.path.lexists(directory):
        return
    try:
        verify(directory)
    except (ValueError, OSError) as exc:
        move_aside(directory, f"distattn train saved step {_step(directory)} here and moved this aside: "
                              f"{one_line(exc)}")
        return
    remove(directory)


def load(directory: Path, model, optimizer) -> tuple[int, list[int]]:
    """Load a checkpoint into ``model`` and ``optimizer`` (its structure checked; :func:`agreed_checkpoint`
    checked its checksums); returns (step, data state). ``ValueError`` naming the file and the fix
    when it cannot be read."""
    directory = Path(directory)
    # every rank fails here with the same one-line reason, before DCP's collectives and their tracebacks
    verify(directory, checksums=False)
    saved = read_metadata(directory / ".metadata").state_dict_metadata.get("train.data")
    if saved is None or len(saved.size) != 1:
        raise ValueError(f"checkpoint {directory} holds no data cursor (train.data); it was not saved by this trainer")
    model_sd, optim_sd = _state_dicts(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd,   # the data cursor's length is the data source's
             "train": {"step": torch.tensor(0), "data": torch.zeros(saved.size, dtype=torch.int64),
                       "rng": torch.get_rng_state()}}
    try:
        dcp.load(state, storage_reader=SafeReader(str(directory)), planner=SafeLoadPlanner(directory))
    except CheckpointException as exc:  # a BaseException: one per rank, its str a traceback per rank
        failures = sorted(exc.failures.items())
        ours = [f[0] for _, f in failures if isinstance(f, tuple) and isinstance(f[0], ValueError)]
        if ours:
            raise ValueError(str(ours[0])) from exc
        raise ValueError(f"checkpoint {directory} could not be loaded: {_dcp_reason(exc)}. If the model or "
                         f"parallel layout changed since it was saved, resume with the config it was saved with; "
                         f"else move {directory} aside to resume from an older one") from exc
    if hasattr(optimizer, "load_state_dicts"):
        optimizer.load_state_dicts(state["optim"])
    else:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    torch.set_rng_state(state["train"]["rng"])
    return int(state["train"]["step"]), [int(x) for x in state["train"]["data"]]
