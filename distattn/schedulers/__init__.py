"""The scheduler registry: one entry per scheduler, read by everything that names one.

``distattn.plan``, the CLI's choices, the bench, the simulator and the adapters' allowed lists all
read :data:`REGISTRY` (importing this module imports neither torch nor numpy, so ``--help`` stays
fast). Each scheduler is one file here whose ``build(doc_lens, mesh, *, causal, window, **options)``
returns a :class:`~distattn.schedule.Schedule`: a pure function of the document lengths, the mesh
shape and the options.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module
from typing import Callable


@dataclass(frozen=True)
class SchedulerSpec:
    name: str
    summary: str
    layouts: tuple[str, ...] = ("sequence",)   # the token layouts it runs (``distattn.plan(layout=)``)
    contiguous: bool = False   # each rank holds one contiguous run of ~S/P tokens (DeepSpeed's split)
    moves_kv_only: bool = False  # only K/V (and dK/dV) travel; queries stay on their rank

    def planner(self) -> Callable:
        return import_module(f"{__name__}.{self.name}").build


REGISTRY: dict[str, SchedulerSpec] = {spec.name: spec for spec in (
    SchedulerSpec("ring", "contiguous shards, K/V passed around the ring", contiguous=True, moves_kv_only=True),
    SchedulerSpec("zigzag", "chunks r and 2P-1-r, K/V passed around the ring", ("sequence", "document"),
                  moves_kv_only=True),
    SchedulerSpec("allgather", "zigzag chunks, K/V all-gathered", ("sequence", "document"), moves_kv_only=True),
    SchedulerSpec("ulysses", "contiguous shards, heads all-to-all", contiguous=True),
    SchedulerSpec("usp", "Ulysses all-to-all inside groups, zigzag ring across them"),
    SchedulerSpec("cad", "contiguous shards, attention tasks balanced over all ranks", contiguous=True),
)}
NAMES: tuple[str, ...] = tuple(REGISTRY)
# world size 1: every scheduler is this one (``scheduler="local"`` asks for it by name)
LOCAL = SchedulerSpec("local", "one rank: one kernel call over the whole sequence", ("sequence", "document"),
                      contiguous=True)
LAYOUTS = ("sequence", "document")


def spec(name: str) -> SchedulerSpec:
    """The registry entry of ``name`` (``"local"`` included); ``ValueError`` naming the choices."""
    if name == LOCAL.name:
        return LOCAL
    if name not in REGISTRY:
        raise ValueError(f"scheduler={name!r} is unknown; choose one of {[*NAMES, LOCAL.name]}")
    return REGISTRY[name]


def supporting(layout: str) -> tuple[str, ...]:
    """The schedulers that run ``layout``."""
    return tuple(name for name, s in REGISTRY.items() if layout in s.layouts)
