"""Reading a DCP checkpoint without running code from its files.

A checkpoint folder is not trusted input: a resume may read one that someone else wrote or edited
(its manifest, :mod:`.manifest`, proves the files are the ones saved, not that whoever saved them
meant well). Two places in DCP unpickle from it, and both are closed here:

* ``.metadata`` is a pickle. :class:`SafeReader` reads it with an unpickler that resolves exactly the
  ``(module, name)`` pairs DCP's metadata holds (its dataclasses, ``torch.Size``, dtypes, layouts) --
  no dotted names, no other callables -- and lets BUILD set state only on instances of those classes.
* non-tensor values (the optimizer's ``param_groups``) are stored as ``torch.save`` blobs that DCP's
  default planner loads with ``weights_only=False``; :class:`SafeLoadPlanner` loads them with
  ``weights_only=True`` (tensors already are).

:func:`check_storage` checks, before any tensor is read, that every storage file the metadata names
is a plain file of the folder and long enough.
"""

from __future__ import annotations

import collections
import io
import pathlib
import pickle
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import metadata as _md
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

from ..safe_io import read_regular

try:  # where every torch >= 2.1 keeps it; the reader itself needs it to read the shards
    from torch.distributed.checkpoint.filesystem import _StorageInfo
except ImportError:  # pragma: no cover
    _StorageInfo = None

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
