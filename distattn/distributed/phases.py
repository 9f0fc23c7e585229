"""Which phase of its work this process is in, told to whoever launched it.

A rank of :func:`distattn.distributed.spawn.run_distributed` sets :data:`channel` to its pipe to the launching
process; :func:`distattn.distributed.comm.peer_phase` calls :func:`note_phase` on entering and leaving a phase
(start-up, a save, the checkpoint agreement), so that a rank that dies without a word is reported
with the phase it was in. Elsewhere the channel is None and noting costs nothing. It lives apart
from both so that neither imports the other."""

from __future__ import annotations

from typing import Callable

# per process, not a process group: a rank's own pipe to its launcher (None outside a spawned rank)
channel: Callable[[str | None, str], None] | None = None
_open: list[tuple[str, str]] = []   # the phases this process is in, innermost last


def note_phase(phase: str | None, path: str = "") -> None:
    """Tell the launcher that this process enters ``phase`` of its work, or (None) leaves the innermost
    one; nothing when no launcher listens."""
    if channel is None:
        return
    if phase is not None:
        _open.append((phase, path))
    elif _open:
        _open.pop()
    channel(*(_open[-1] if _open else (None, "")))
