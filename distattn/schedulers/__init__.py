"""Scheduler registry: one file per scheduler, each adding a planner and a Plan subclass.

A planner is ``build(doc_lens, mesh: MeshInfo, *, causal, window, backend, **options) -> Plan``:
a pure function of the document lengths, the mesh shape and the options.
"""

from __future__ import annotations

from typing import Callable

from ..plans import Plan
from . import allgather, cad, local, ring, ulysses, usp, zigzag

# Every name the public contract accepts; those without a planner yet are
# refused at world size > 1 (at world size 1 every scheduler is local attention).
KNOWN = ("ring", "zigzag", "allgather", "ulysses", "usp", "cad", "local")

PLANNERS: dict[str, Callable[..., Plan]] = {
    "local": local.build,
    "ring": ring.build,
    "zigzag": zigzag.build,
    "allgather": allgather.build,
    "ulysses": ulysses.build,
    "usp": usp.build,
    "cad": cad.build,
}


def implemented() -> list[str]:
    """Scheduler names that run at world sizes > 1 (plus ``local``)."""
    return [name for name in KNOWN if name in PLANNERS]
