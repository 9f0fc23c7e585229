"""Checkpoints with ``torch.distributed.checkpoint`` that load without unpickling arbitrary objects.

State: model and optimizer (``get_state_dict``, so DDP and FSDP2 both work),
the step, the data packer's cursor and the RNG state -- tensors only. DCP
stores its own metadata with pickle; :class:`SafeReader` reads it through an
unpickler that admits only DCP's metadata classes and plain containers.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

_SAFE_BUILTINS = {"dict", "list", "tuple", "set", "frozenset", "slice", "int", "float", "str", "bool", "bytes",
                  "complex", "NoneType", "getattr", "object"}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        allowed = (module.startswith("torch.distributed.checkpoint")
                   or (module == "collections" and name == "OrderedDict")
                   or (module == "builtins" and name in _SAFE_BUILTINS)
                   or (module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)))
                   or (module == "torch.serialization" and name == "_get_layout")
                   or (module == "pathlib" and name in ("PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"))
                   or (module == "copyreg" and name == "_reconstructor"))
        if not allowed:
            raise pickle.UnpicklingError(f"checkpoint metadata refers to {module}.{name}, which is not allowed")
        return super().find_class(module, name)


class SafeReader(FileSystemReader):
    """DCP reader whose metadata unpickling is restricted to known-safe classes."""

    def read_metadata(self, *args, **kwargs):
        path = Path(self.path) / ".metadata"
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(io.BytesIO(f.read())).load()
        if getattr(metadata, "storage_meta", None) is None:
            from torch.distributed.checkpoint.metadata import StorageMeta

            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def save(directory: Path, model, optimizer, step: int, data_state: list[int]) -> None:
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd,
             "train": {"step": torch.tensor(step), "data": torch.tensor(data_state, dtype=torch.int64),
                       "rng": torch.get_rng_state()}}
    dcp.save(state, checkpoint_id=str(directory))


def load(directory: Path, model, optimizer) -> tuple[int, list[int]]:
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd,
             "train": {"step": torch.tensor(0), "data": torch.zeros(3, dtype=torch.int64),
                       "rng": torch.get_rng_state()}}
    dcp.load(state, storage_reader=SafeReader(str(directory)))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    torch.set_rng_state(state["train"]["rng"])
    return int(state["train"]["step"]), [int(x) for x in state["train"]["data"]]


def latest(ckpt_root: Path) -> Path | None:
    """The newest complete checkpoint under ``ckpt_root`` (``step_N`` folders with DCP metadata)."""
    done = [p for p in ckpt_root.glob("step_*") if (p / ".metadata").exists()]
    return max(done, key=lambda p: int(p.name.split("_")[1])) if done else None
