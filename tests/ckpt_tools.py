"""Helpers for tests that damage checkpoints the way disks and people do."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from distattn.train.checkpoint import dcp as checkpoint, manifest


def tiny_state(width: int = 4):
    """A ``Linear(width, 3)`` and its AdamW after one step: a checkpoint's worth of state in one process."""
    torch.manual_seed(0)
    model = torch.nn.Linear(width, 3)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, width)).sum().backward()
    optimizer.step()
    return model, optimizer


def save_tiny(directory: Path, step: int | None = None, width: int = 4, run: dict | None = None) -> Path:
    """:func:`tiny_state` saved as checkpoint ``directory`` (data state ``[1, 2, 3]``); ``step``: the N of
    a ``step_N`` folder (its manifest must say so), else 5; ``run``: what the manifest records of its run
    (none: no run can resume it, and ``ckpt verify`` says so)."""
    if step is None:
        name = Path(directory).name
        step = int(name[5:]) if name.startswith("step_") and name[5:].isdigit() else 5
    with warnings.catch_warnings():  # no process group here: DCP says it saves from one process
        warnings.simplefilter("ignore")
        checkpoint.save(directory, *tiny_state(width), step, [1, 2, 3], run)
    return directory


def reseal(ckpt: Path) -> None:
    """Rewrite ``ckpt``'s manifest to match its files as they are now: what someone who edits a
    checkpoint on purpose can do, so the checks behind the manifest still have to hold."""
    old = manifest.read(ckpt)
    files = {p.name: manifest.digest(p) for p in sorted(Path(ckpt).iterdir()) if p.name != manifest.NAME}
    manifest.write(ckpt, old.step, files, old.run)


def flip(path: Path, offset: int, count: int = 1) -> None:
    """Invert ``count`` bytes of ``path`` from ``offset`` (a disk's bit rot, in place, same size)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        data = f.read(count)
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in data))
