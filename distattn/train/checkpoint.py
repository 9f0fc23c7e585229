"""Checkpoints with ``torch.distributed.checkpoint`` (DCP) that load without running code from the files.

State: model and optimizer (``get_state_dict``, so DDP and FSDP2 both work), the step, the data
packer's cursor and the RNG state. A checkpoint folder is not trusted input: a resume may read one
that someone else wrote or edited. Two places in DCP unpickle from it, and both are closed here:

* ``.metadata`` is a pickle. :class:`SafeReader` reads it with an unpickler that resolves exactly the
  ``(module, name)`` pairs DCP's metadata holds (its dataclasses, ``torch.Size``, dtypes, layouts) --
  no dotted names, no other callables -- and lets BUILD set state only on instances of those classes.
* non-tensor values (the optimizer's ``param_groups``) are stored as ``torch.save`` blobs that DCP's
  default planner loads with ``weights_only=False``; :class:`SafeLoadPlanner` loads them with
  ``weights_only=True`` (tensors already are).

:func:`verify` checks a checkpoint before any rank starts (metadata readable, every storage file
present and long enough) and :func:`newest_usable` picks the newest one that passes; :func:`load`
turns DCP's per-rank ``CheckpointException`` into a ``ValueError`` that names the file and the fix.
"""

from __future__ import annotations

import collections
import io
import os
import pathlib
import pickle
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import metadata as _md
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from .safe_io import read_regular

try:  # where every torch >= 2.1 keeps it; the reader itself needs it to read the shards
    from torch.distributed.checkpoint.filesystem import _StorageInfo
except ImportError:  # pragma: no cover
    _StorageInfo = None

_STEP_DIR = re.compile(r"step_(\d+)")
PARTIAL = ".partial"   # suffix of a checkpoint folder being written (see :func:`save`)
_PARTIAL_DIR = re.compile(r"step_(\d+)\.partial")
METADATA_LIMIT = 1 << 30      # bytes of a .metadata read: DCP's for a 70B model is a few MB


def _metadata_classes() -> list[type]:
    """The classes a DCP ``.metadata`` pickle instantiates: what ``pickletools`` shows in this trainer's
    checkpoints (DDP and FSDP2, torch 2.13). Older torch versions lack some; those are skipped."""
    names = ("Metadata", "TensorStorageMetadata", "ChunkStorageMetadata", "BytesStorageMetadata",
             "TensorProperties", "MetadataIndex", "StorageMeta")
    classes = [getattr(_md, n) for n in names if hasattr(_md, n)]
    return classes + ([_StorageInfo] if _StorageInfo is not None else [])


def _allowed_globals() -> dict[tuple[str, str], Any]:
    allowed: dict[tuple[str, str], Any] = {}
    callables: list[Any] = [*_metadata_classes(), torch.Size, collections.OrderedDict]
    if hasattr(_md, "_MEM_FORMAT_ENCODING"):  # TensorProperties pickles its memory format as this enum
        callables.append(_md._MEM_FORMAT_ENCODING)
    for obj in callables:
        allowed[(obj.__module__, obj.__qualname__)] = obj
    # StorageMeta.checkpoint_id may be a path; Python 3.13 moved the classes to pathlib._local
    for cls in (pathlib.PosixPath, pathlib.WindowsPath, pathlib.PurePosixPath, pathlib.PureWindowsPath):
        allowed[("pathlib", cls.__name__)] = allowed[(cls.__module__, cls.__name__)] = cls
    # torch.layout pickles as _get_layout("torch.strided"), a lookup in a dict of layouts
    allowed[("torch.serialization", "_get_layout")] = torch.serialization._get_layout
    for name, value in vars(torch).items():  # constants, not callables
        if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
            allowed[("torch", name)] = value
    return allowed


_ALLOWED = _allowed_globals()
_BUILDABLE = frozenset(_metadata_classes())


class _Refused(pickle.UnpicklingError):
    """The pickle asks for something DCP metadata never holds (as opposed to being cut short)."""


class _MetadataUnpickler(pickle._Unpickler):
    """The pure-Python unpickler, so BUILD can be checked too: the C one lets a pickle BUILD on a class
    object (``setattr`` on an allowed class), which would change the class for the whole process."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise _Refused(f"it refers to {module}.{name}, which is not allowed in DCP metadata") \
                from None

    def persistent_load(self, pid: Any) -> Any:
        raise _Refused("it uses a persistent id, which DCP metadata never contains")

    def _load_build(self) -> None:
        inst, state = self.stack[-2], self.stack[-1]
        if type(inst) not in _BUILDABLE:
            raise _Refused(f"it sets the state of a {type(inst).__name__}, which DCP metadata "
                                         f"never does")
        if (isinstance(state, tuple) and len(state) == 2 and state[1] is not None
                and not hasattr(type(inst), "__setstate__")):
            raise _Refused("it sets attributes through slot state, which DCP metadata never does")
        pickle._Unpickler.load_build(self)

    dispatch[pickle.BUILD[0]] = _load_build


def _unpickle_metadata(data: bytes, path: Path) -> Any:
    """Unpickle DCP metadata bytes read from ``path``; ``ValueError`` naming ``path`` for anything else."""
    try:
        metadata = _MetadataUnpickler(io.BytesIO(data)).load()
    except _Refused as exc:
        raise ValueError(f"{path} is not a DCP checkpoint's metadata: {exc}; it was not loaded (nothing in it "
                         f"ran). Use a checkpoint this trainer saved, or delete {path.parent} to resume from an "
                         f"older one") from None
    except Exception as exc:  # truncated or garbled: EOFError, struct.error, TypeError from a bad REDUCE...
        raise ValueError(f"{path} cannot be read ({type(exc).__name__}: {exc}): the checkpoint's metadata is "
                         f"damaged or truncated; delete {path.parent} to resume from an older one") from None
    if not isinstance(metadata, _md.Metadata):
        raise ValueError(f"{path} holds a {type(metadata).__name__}, not DCP metadata; delete {path.parent} "
                         f"to resume from an older one")
    return metadata


def read_metadata(path: Path) -> Any:
    """The ``Metadata`` in the file ``path`` (a checkpoint's ``.metadata``), read safely."""
    path = Path(path)
    try:
        data = read_regular(path, METADATA_LIMIT, "checkpoint metadata")
    except FileNotFoundError:
        raise ValueError(f"{path} is missing: the save of {path.parent.name} did not finish; delete "
                         f"{path.parent} to resume from an older one") from None
    return _unpickle_metadata(data, path)


def check_storage(directory: Path, metadata: Any) -> None:
    """``ValueError`` unless every storage file ``metadata`` refers to is a plain file inside ``directory``
    that is long enough for the items the metadata places in it."""
    directory = Path(directory)
    storage = getattr(metadata, "storage_data", None)
    if not isinstance(storage, dict):
        raise ValueError(f"{directory / '.metadata'} lists no storage files; delete {directory} to resume from "
                         f"an older one")
    need: dict[str, int] = {}
    for index, info in storage.items():
        rel, offset, length = (getattr(info, "relative_path", None), getattr(info, "offset", None),
                               getattr(info, "length", None))
        fqn = getattr(index, "fqn", index)
        if not (isinstance(rel, str) and rel and rel == Path(rel).name and rel not in (".", "..")
                and "\\" not in rel):
            raise ValueError(f"{directory / '.metadata'} places {fqn} in {rel!r}, which is not a file of "
                             f"{directory}; refusing to read it")
        if not (type(offset) is int and type(length) is int and offset >= 0 and length >= 0):
            raise ValueError(f"{directory / '.metadata'} gives {fqn} the byte range offset={offset!r} "
                             f"length={length!r}; the metadata is damaged, delete {directory}")
        need[rel] = max(need.get(rel, 0), offset + length)
    for rel, end in sorted(need.items()):
        path = directory / rel
        if not path.is_file():
            raise ValueError(f"{path} is missing but the metadata needs {end:,} bytes of it: the checkpoint is "
                             f"incomplete; delete {directory} to resume from an older one")
        size = path.stat().st_size
        if size < end:
            raise ValueError(f"{path} is {size:,} bytes but the metadata needs {end:,}: the checkpoint is "
                             f"truncated; delete {directory} to resume from an older one")


def verify(directory: Path) -> None:
    """Check a checkpoint without loading it (for the launching process, before any rank starts):
    its metadata unpickles safely and every storage file is there and long enough. ``ValueError``
    naming the file and the fix otherwise."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"checkpoint {directory} does not exist or is not a folder")
    check_storage(directory, read_metadata(directory / ".metadata"))


def _step(path: Path) -> int:
    return int(_STEP_DIR.fullmatch(path.name).group(1))


def newest_usable(ckpt_root: Path, say: Callable[[str], Any] | None = None) -> Path | None:
    """The newest ``step_N`` checkpoint under ``ckpt_root`` that :func:`verify` accepts.

    None when there is no checkpoint at all. Newer ones that fail (an unfinished save, a truncated
    shard) are skipped and, with ``say``, reported along with the one used; ``ValueError`` listing
    the reasons when checkpoints exist but none verifies."""
    ckpt_root = Path(ckpt_root)
    found = sorted((p for p in ckpt_root.glob("step_*") if p.is_dir() and _STEP_DIR.fullmatch(p.name)),
                   key=_step, reverse=True) if ckpt_root.is_dir() else []
    partial = {int(m.group(1)): p.name for p in (ckpt_root.glob(f"step_*{PARTIAL}") if ckpt_root.is_dir() else ())
               if p.is_dir() and (m := _PARTIAL_DIR.fullmatch(p.name))}
    newest = _step(found[0]) if found else -1
    skipped = [f"{name}: a save that did not finish (the run stopped while writing it)"
               for step, name in sorted(partial.items(), reverse=True) if step > newest]
    if skipped and not found:
        raise ValueError(f"no usable checkpoint under {ckpt_root}: " + "; ".join(skipped)
                         + "; delete them (or --overwrite) to start over")
    for path in found:
        try:
            verify(path)
        except ValueError as exc:
            skipped.append(f"{path.name}: {exc}")
            continue
        if skipped and say is not None:
            say(f"resuming from {path.name}, the newest checkpoint that verifies; skipped "
                + "; ".join(skipped))
        return path
    if skipped:
        raise ValueError(f"no usable checkpoint under {ckpt_root}: " + "; ".join(skipped)
                         + "; delete them (or --overwrite) to start over")
    return None


class SafeReader(FileSystemReader):
    """DCP reader whose metadata unpickling is restricted to DCP's metadata classes and whose storage
    files are checked (inside the folder, long enough) before any tensor is read."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        rank = kwargs.get("rank")  # DCP's fallback to per-rank metadata files
        metadata = read_metadata(Path(self.path) / (".metadata" if rank is None else f"__{rank}.metadata"))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = _md.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def set_up_storage_reader(self, metadata: Any, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        check_storage(Path(self.path), metadata)
        super().set_up_storage_reader(metadata, is_coordinator, *args, **kwargs)


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default planner, but non-tensor values are unpickled with ``weights_only=True``."""

    def __init__(self, directory: Path, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.directory = Path(directory)

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as exc:
            # torch's message advises weights_only=False, the one thing not to do with this file
            reason = next((line for line in str(exc).splitlines() if "GLOBAL" in line), "not plain data")
            raise ValueError(f"checkpoint {self.directory}: the value "
                             f"{read_item.dest_index.fqn} is not plain data ({reason.strip()}); it was not loaded "
                             f"and nothing in it ran. Use a checkpoint this trainer saved") from None
        # the parent stores the value where it belongs; the blob it unpickles is now one we wrote
        clean = io.BytesIO()
        torch.save(obj, clean)
        clean.seek(0)
        super().load_bytes(read_item, clean)


def _explain(directory: Path, exc: CheckpointException) -> ValueError:
    """One line for a failed load: what :func:`verify` finds, else the first rank's own error."""
    try:
        verify(directory)
    except ValueError as found:
        return found
    failures = sorted(exc.failures.items())
    ours = [error for _, (error, _trace) in failures if isinstance(error, ValueError)]
    if ours:
        return ValueError(str(ours[0]))
    if not failures:
        return ValueError(f"checkpoint {directory} could not be loaded: {exc}")
    rank, (error, _trace) = failures[0]
    first = (str(error).strip().splitlines() or [""])[0]
    return ValueError(f"checkpoint {directory} could not be loaded on rank {rank}: {type(error).__name__}: {first}. "
                      f"If the model or parallel layout changed since it was saved, resume with the config it was "
                      f"saved with; else delete {directory} to resume from an older one")


def save(directory: Path, model, optimizer, step: int, data_state: list[int]) -> None:
    """Save into ``directory`` atomically: every rank writes into ``directory.partial``, and rank 0
    renames it once DCP's metadata (written last, after every rank's data) is there. A run killed
    while saving leaves only a ``.partial`` folder, which :func:`newest_usable` names and skips."""
    directory = Path(directory)
    partial = directory.with_name(directory.name + PARTIAL)
    first = not dist.is_initialized() or dist.get_rank() == 0
    if first:   # what an earlier run left of this step: a partial save, or one that does not verify
        for stale in (partial, directory):
            if stale.exists():
                shutil.rmtree(stale)
    if dist.is_initialized():
        dist.barrier()   # no rank writes into the folder before it is cleared
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd,
             "train": {"step": torch.tensor(step), "data": torch.tensor(data_state, dtype=torch.int64),
                       "rng": torch.get_rng_state()}}
    dcp.save(state, checkpoint_id=str(partial))
    if first:   # DCP's coordinator returns after writing the metadata, so every rank's data is there
        os.replace(partial, directory)


def load(directory: Path, model, optimizer) -> tuple[int, list[int]]:
    """Load a checkpoint into ``model`` and ``optimizer``; returns (step, data state). ``ValueError``
    naming the file and the fix when the checkpoint cannot be read."""
    # every rank fails here with the same one-line reason, before DCP's collectives and their tracebacks
    verify(Path(directory))
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd,
             "train": {"step": torch.tensor(0), "data": torch.zeros(3, dtype=torch.int64),
                       "rng": torch.get_rng_state()}}
    try:
        dcp.load(state, storage_reader=SafeReader(str(directory)), planner=SafeLoadPlanner(directory))
    except CheckpointException as exc:  # a BaseException: one per rank, its str a traceback per rank
        raise _explain(Path(directory), exc) from exc
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    torch.set_rng_state(state["train"]["rng"])
    return int(state["train"]["step"]), [int(x) for x in state["train"]["data"]]


def latest(ckpt_root: Path) -> Path | None:
    """The newest complete checkpoint under ``ckpt_root`` (``step_N`` folders with DCP metadata), unchecked;
    :func:`newest_usable` also verifies it."""
    done = [p for p in Path(ckpt_root).glob("step_*") if _STEP_DIR.fullmatch(p.name) and (p / ".metadata").exists()]
    return max(done, key=_step) if done else None
