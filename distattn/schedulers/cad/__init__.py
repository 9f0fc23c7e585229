"""``cad``: core-attention disaggregation -- attention tasks balanced by FLOPs over all ranks, in place.

The scheduler is this package; ``distattn.plan(..., scheduler="cad")`` calls :func:`build`. A plan
flows through its files in this order (what the scheduler is and does: :mod:`.scheduler`'s docstring):

==================  ==========================================================================
file                holds
==================  ==========================================================================
``scheduler.py``    the entry: :func:`build` and :func:`derive` (options from a ``PlanContext``:
                    the cost model, the network), the pool's token space (:class:`Pool`); and at
                    the end the result, :class:`TaskSchedule` -- the task table as a schedule:
                    per slot its routes and kernel calls (:class:`TaskRoutes`), the phases the
                    simulator replays, the program the executor runs
                    (:mod:`distattn.executors.task_a2a`)
``planner.py``      the task table (:class:`~.planner.TaskTable`, :class:`Segments`): each
                    document's query rows cut at the runs the ranks hold, every task on its
                    owner; the edits placement makes to it
``placement.py``    :func:`place_tasks`: which rank computes each task (export between nodes,
                    moves inside nodes, then cheapest moves per second of attention saved)
``ledger.py``       placement's books: per rank its load and the bytes and network seconds in
                    and out (:class:`LinkCost`, :class:`RowBytes`, :class:`~.ledger.Ledger`)
``export.py``       placement's first pass on several nodes: the rows each over-loaded node
                    sheds and the nodes that take them
``bound.py``        the lower bound on a node's inter-node bytes that the export follows
                    (and ``python -m distattn.bench.cad_balance`` reports rho against)
``cast.py``         how the placed rows travel: K/V group-cast down a tree of nodes, dK/dV
                    group-reduced up it, Q over the rails (:class:`Nodes`, :class:`Legs`);
                    :class:`TaskSchedule` turns the legs into routes and phases
==================  ==========================================================================

MagiAttention splits the same work into ``meta/solver`` (the problem: a mask and a dispatch in,
per-rank work and communication meta out) and ``meta/algorithms`` (interchangeable balancing
heuristics). Here ``scheduler.py`` and ``planner.py`` are the solver's part (the task table in,
the schedule out), ``placement.py`` with ``ledger.py``, ``export.py`` and ``bound.py`` the
algorithm, and ``cast.py`` the communication meta. Dependencies point one way: ``scheduler`` ->
``placement`` -> ``export`` -> ``bound``; ``placement`` -> ``ledger`` -> ``cast``, ``planner``;
this ``__init__`` only re-exports, and no submodule imports it.
"""

from .cast import Legs, Nodes, index_runs, key_legs, merge_intervals, query_legs
from .ledger import LinkCost, RowBytes
from .placement import place_tasks
from .planner import Segments
from .scheduler import (BACKWARDS, Hop, Pool, Route, TaskRoutes, TaskSchedule, Traffic, WorkerCall, build, derive,
                        planner_options)

__all__ = ["BACKWARDS", "Hop", "Legs", "LinkCost", "Nodes", "Pool", "Route", "RowBytes", "Segments", "TaskRoutes", "TaskSchedule",
           "Traffic", "WorkerCall", "build", "derive", "index_runs", "key_legs", "merge_intervals", "place_tasks",
           "planner_options", "query_legs"]
