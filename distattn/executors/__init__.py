"""Executors: one per communication pattern, each running one rank's part of a schedule.

==============================  ===============================================  =====================
executor                        pattern                                          runs
==============================  ===============================================  =====================
``ring_p2p.RingExecutor``       K/V passed around a ring of P2P transfers        ring, zigzag
``gather.GatherExecutor``       K/V all-gathered, dK/dV reduce-scattered         allgather
``head_a2a.HeadExecutor``       heads all-to-all around an inner executor        ulysses, usp
``task_a2a.TaskExecutor``       rows all-to-all to the ranks computing tasks     cad
``local.LocalExecutor``         none: one kernel call                            world size 1
==============================  ===============================================  =====================

The scheduler's registry entry names its executor (:data:`EXECUTORS`); :func:`distattn.plan` hands
the entry it looked up to :func:`executor_for`, so a name is looked up once.
Executors take their groups from the mesh the plan was given; the only groups they make are
``usp``'s Ulysses and ring groups of a 1-D mesh, once per parent group (:func:`distattn.distributed.comm.subgroups`).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

import torch.distributed as dist

from ..distributed.comm import Comm, subgroups
from ..planning.layout import Shards
from ..distributed.mesh import MeshInfo
from ..planning.schedule import Schedule
from ..schedulers import SchedulerSpec
from ..schedulers.allgather import GatherSchedule
from ..schedulers.cad import TaskSchedule
from ..schedulers.local import LocalSchedule
from ..schedulers.ring import RingSchedule
from ..schedulers.ulysses import UlyssesSchedule
from ..schedulers.usp import USPSchedule
from .base import ExecOptions, Executor
from .gather import GatherExecutor
from .head_a2a import HeadAllToAll, HeadExecutor
from .local import LocalExecutor
from .ring_p2p import RingExecutor
from .task_a2a import TaskExecutor, gather_pool, local_pool


def resolve_options(doc_lens, shards: Shards, mesh: MeshInfo, options: dict, pool_doc_lens=None,
                    shards_of: Callable[[tuple[int, ...]], Shards] | None = None) -> tuple[dict, dict]:
    """``(planner options, executor options)`` of a live plan: live objects among the options become
    data for the planner and go to the executor as they are. ``pool=group`` (``cad``; the planner
    accepted the option): the pool's token space and the group -- a collective over the pool (every
    pool rank sends its documents and the tokens it holds), or, given ``pool_doc_lens`` (every CP
    group's documents, :func:`distattn.plan`'s), made here with ``shards_of`` (a group's documents ->
    its layout)."""
    pool = options.get("pool")
    if pool is None:
        return options, {}
    if pool_doc_lens is None:
        made = gather_pool(doc_lens, shards, mesh, pool)
    else:
        made = local_pool(doc_lens, shards, pool_doc_lens, shards_of, mesh, pool)
    return dict(options, pool=made), {"pool_group": pool}


def _usp_groups(schedule: USPSchedule, mesh: MeshInfo):
    """(Ulysses group, ring group) of this rank: the 2-D mesh's axes, or sub-groups of a 1-D group."""
    dm = mesh.device_mesh
    if dm is not None and dm.ndim == 2:
        return dm["ulysses"].get_group(), dm["ring"].get_group()
    u_deg, (u, r) = schedule.ulysses_degree, schedule.coords[mesh.rank]
    ulysses_ranks = [r * u_deg + j for j in range(u_deg)]
    ring_ranks = [j * u_deg + u for j in range(schedule.ring.world_size)]
    return tuple(subgroups(mesh.group, [ulysses_ranks, ring_ranks], f"ulysses_degree={u_deg}",
                           "usp's process groups"))


def _inner(options: ExecOptions) -> ExecOptions:
    """An inner executor's options: dK/dV in fp32 (its heads all-to-all sums them further), dsinks
    shares left to the outer executor."""
    return replace(options, inner=True)


def _ring(schedule: RingSchedule, mesh: MeshInfo, backend: str, options: ExecOptions, pool_group) -> Executor:
    return RingExecutor(schedule, mesh.rank, Comm(mesh.group), backend, options)


def _gather(schedule: GatherSchedule, mesh: MeshInfo, backend: str, options: ExecOptions, pool_group) -> Executor:
    return GatherExecutor(schedule, mesh.rank, Comm(mesh.group), backend, options)


def _heads(schedule: UlyssesSchedule, mesh: MeshInfo, backend: str, options: ExecOptions, pool_group) -> Executor:
    comm, rank = Comm(mesh.group), mesh.rank
    tokens = tuple(schedule.num_tokens(r) for r in range(schedule.world_size))
    return HeadExecutor(schedule, rank, comm, backend, HeadAllToAll(comm, rank, tokens),
                        LocalExecutor(schedule, rank, comm, backend, _inner(options)), schedule.gather_order(), options)


def _usp(schedule: USPSchedule, mesh: MeshInfo, backend: str, options: ExecOptions, pool_group) -> Executor:
    ulysses, ring = _usp_groups(schedule, mesh)
    u, r = schedule.coords[mesh.rank]
    inner = RingExecutor(schedule.ring, r, Comm(ring), backend, _inner(options))
    return HeadExecutor(schedule, mesh.rank, Comm(mesh.group), backend,
                        HeadAllToAll(Comm(ulysses), u, schedule.members(r)), inner, schedule.gather_order(r), options)


def _tasks(schedule: TaskSchedule, mesh: MeshInfo, backend: str, options: ExecOptions, pool_group) -> Executor:
    comm = Comm(mesh.group)
    if pool_group is None:
        return TaskExecutor(schedule, mesh.rank, comm, backend, comm, options)
    return TaskExecutor(schedule, schedule.slot_ranks.index(dist.get_rank(pool_group)), comm, backend,
                        Comm(pool_group), options)


def _local(schedule: LocalSchedule, mesh: MeshInfo, backend: str, options: ExecOptions, pool_group) -> Executor:
    return LocalExecutor(schedule, mesh.rank, Comm(mesh.group), backend, options)


# what a registry entry's ``executor`` names (distattn.schedulers.SchedulerSpec.executor)
EXECUTORS: dict[str, Callable[..., Executor]] = {"ring_p2p": _ring, "gather": _gather, "heads": _heads, "usp": _usp,
                                                 "tasks": _tasks, "local": _local}


def executor_for(entry: SchedulerSpec, schedule: Schedule, mesh: MeshInfo, backend: str, pool_group=None,
                  options: ExecOptions = ExecOptions()) -> Executor:
    """This rank's executor of ``schedule`` on ``mesh``'s groups: the one named by ``entry``, the registry
    entry whose planner made ``schedule`` (``LOCAL`` for a one-rank schedule, whatever scheduler was
    asked for) -- the caller's, so the name is looked up once."""
    return EXECUTORS[entry.executor](schedule, mesh, backend, options, pool_group)


__all__ = ["EXECUTORS", "ExecOptions", "Executor", "executor_for", "resolve_options"]
