"""A simulated step as a Chrome trace: what ``distattn simulate --timeline t.json`` writes.

The same format a profiled training step writes (``train.profile_steps``, :mod:`distattn.train.profile`):
``{"traceEvents": [...]}`` of complete events (``"ph": "X"``, ``ts``/``dur`` in microseconds from
the step's start), with :mod:`distattn.distributed.trace`'s phase names, so the predicted and the measured step
open side by side in Perfetto (ui.perfetto.dev) or ``chrome://tracing``. Each replayed operation
(:mod:`.replay`) of a rank becomes one event:

* ``pid``: the rank (a second row's ranks follow the first's; each process is named
  ``"<scheduler> rank r (simulated)"``);
* ``tid`` ``compute``: its compute -- ``distattn.attention`` (the kernel calls, merges included),
  ``distattn.forward``/``distattn.backward`` (the pass's linear pieces and the output layer) -- and
  ``distattn.wait``, the time it stood at a wait;
* one ``tid`` per link a transfer queues on (``nvlink``, ``nic``, ``net``): each transfer from the
  moment it could begin to its end -- ``distattn.transfer.<op>`` (attention's), ``distattn.dp.<op>``
  (the data-parallel ones), ``distattn.tp``;
* ``tid`` ``plan``: ``distattn.plan``, the step's planning (``args.hidden``: made behind the step
  before).

Zero-length events are left out; only the first :data:`TRACED_RANKS` ranks of a row are traced (the
others' steps are alike; the per-rank summary, ``.csv``, has every rank).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..planning.program import RUN, WAIT as WAIT_OP
from ..distributed.trace import PLAN, WAIT

TRACED_RANKS = 64
LANES = ("compute", "plan", "net", "nvlink", "nic")


def row_events(events: list, scheduler: str, ranks: int, pid0: int, planning_s: float = 0.0,
               hidden: bool = True) -> list[dict]:
    """Chrome trace events of one row's replayed step: ``events`` as :func:`.replay.replay` records
    them (``(op, start, end)``, seconds per traced rank), its first rank numbered ``pid0``."""
    out = []
    traced = min(ranks, TRACED_RANKS)
    for r in range(traced):
        out.append({"ph": "M", "name": "process_name", "pid": pid0 + r,
                    "args": {"name": f"{scheduler} rank {r} (simulated)"}})
        out += [{"ph": "M", "name": "thread_name", "pid": pid0 + r, "tid": tid, "args": {"name": lane}}
                for tid, lane in enumerate(LANES)]
        if planning_s > 0:
            out.append({"ph": "X", "name": PLAN, "pid": pid0 + r, "tid": LANES.index("plan"), "ts": 0.0,
                        "dur": planning_s * 1e6, "args": {"hidden": hidden}})
    for op, start, end in events:
        if op.op in (RUN, WAIT_OP):
            name, tid = (WAIT if op.op == WAIT_OP else op.name or "distattn.compute"), 0
        else:
            name, tid = op.name, LANES.index(op.link) if op.link in LANES else len(LANES)
        for r in range(traced):
            dur = float(end[r] - start[r])
            if dur > 0:
                out.append({"ph": "X", "name": name, "pid": pid0 + r, "tid": tid, "ts": float(start[r]) * 1e6,
                            "dur": dur * 1e6})
    return out


def next_pid(trace: list[dict]) -> int:
    """The first rank number free in ``trace`` (each row's ranks follow the ones before)."""
    return max((e["pid"] for e in trace), default=-1) + 1


def write_trace(trace: list[dict], path: str | Path) -> None:
    """``{"traceEvents": trace}`` to ``path`` (JSON)."""
    Path(path).write_text(json.dumps({"traceEvents": trace, "displayTimeUnit": "ms"}, allow_nan=False))


__all__ = ["TRACED_RANKS", "LANES", "row_events", "next_pid", "write_trace"]
