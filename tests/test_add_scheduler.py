"""The recipe of ``distattn/schedulers/__init__.py``'s "Adding a scheduler" is complete: a toy scheduler
made by following it alone plans and runs exactly.

The toy, ``revgather``, is ``allgather`` with the ranks in reverse order: rank ``r`` holds the zigzag
chunks that ``allgather`` gives rank ``P-1-r`` (its own layout, ``own_shards``), and the gather
executor runs it. Following the recipe it touches **two files** of a copy of ``distattn/schedulers/``
(the real package stays as it is): it writes one, ``revgather.py``, and adds one line, its
``SchedulerSpec``, to ``REGISTRY`` in ``__init__.py``. Each rank loads that copy as
``distattn.schedulers`` before anything imports the real one, plans through ``distattn.plan`` and
compares ``distattn.attention``'s output and gradients with ``distattn.reference_attention`` in
fp64. Without the registry line the same copy refuses the name: the second step is needed.
"""

import importlib.util
import os
import shutil
import sys
from pathlib import Path

import pytest

from distattn.distributed.spawn import run_distributed

NAME = "revgather"
PACKAGE = Path(__file__).resolve().parents[1] / "distattn" / "schedulers"

# step 1 of the recipe: the planner's file
TOY = '''"""``revgather``: ``allgather`` with the ranks in reverse order (a toy: tests/test_add_scheduler.py)."""

from dataclasses import replace

from ..layout import Layout, Shards
from .allgather import GatherSchedule, build as gather_build


def own_shards(doc_lens, mesh, **_) -> Shards:
    """Rank ``r`` holds zigzag's chunks of rank ``P-1-r``."""
    p = mesh.world_size
    zigzag = Layout("zigzag").shards(doc_lens, p)
    return Shards.from_bounds(zigzag.bounds, p - 1 - zigzag.owner, p, zigzag.slot)


def build(doc_lens, mesh, *, causal, window, mask, shards=None, heads_per_step=None) -> GatherSchedule:
    shards = own_shards(doc_lens, mesh) if shards is None else shards
    schedule = gather_build(doc_lens, mesh, causal=causal, window=window, mask=mask, shards=shards,
                            heads_per_step=heads_per_step)
    return replace(schedule, scheduler="revgather")
'''
# step 2 of the recipe: its registry entry (layout None: its own; the gather executor runs it)
ENTRY = ('    SchedulerSpec("revgather", "allgather with the ranks in reverse order", None, executor="gather", '
         'moves_kv_only=True),\n')
REGISTRY_END = "\n)}\nNAMES"

DOCS = [[3, 50, 2, 1, 4], [1, 2, 1, 3, 1, 1, 2, 5, 1, 4, 1, 2, 3, 1], [37]]


def _copy(folder: Path, register: bool) -> str:
    """A copy of ``distattn/schedulers/`` with the recipe applied (``register``: both steps, else step 1)."""
    copy = folder / "schedulers"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / f"{NAME}.py").write_text(TOY)
    if register:
        init = copy / "__init__.py"
        text = init.read_text()
        assert text.count(REGISTRY_END) == 1, "REGISTRY's closing line moved: update this test's anchor"
        init.write_text(text.replace(REGISTRY_END, "\n" + ENTRY.rstrip("\n") + REGISTRY_END))
    return str(copy)


def _load(copy: str):
    """Import ``copy`` as ``distattn.schedulers`` (in a fresh rank, before anything imports the real one)."""
    assert "distattn.schedulers" not in sys.modules, "the real registry was imported first"
    spec = importlib.util.spec_from_file_location("distattn.schedulers", os.path.join(copy, "__init__.py"),
                                                  submodule_search_locations=[copy])
    module = importlib.util.module_from_spec(spec)
    sys.modules["distattn.schedulers"] = module
    spec.loader.exec_module(module)
    import distattn

    distattn.schedulers = module
    return module


def _exact_worker(copy: str) -> list[float]:
    """This rank's worst error over ``DOCS`` (causal, document masks; GQA 4:2), after checking that the
    toy's plan is its own: its tokens are allgather's of the mirrored rank."""
    import torch
    import torch.distributed as dist

    from conftest import case_error

    schedulers = _load(copy)
    import distattn

    p, rank = dist.get_world_size(), dist.get_rank()
    assert NAME in schedulers.NAMES and schedulers.spec(NAME).executor == "gather"
    errors = []
    for docs in DOCS:
        ours = distattn.plan(docs, p, scheduler=NAME)
        theirs = distattn.plan(docs, p, scheduler="allgather")
        for r in range(p):
            assert ours.schedule.shards.compute_tokens(r).tolist() == \
                theirs.schedule.shards.compute_tokens(p - 1 - r).tolist(), (docs, r)
        if p > 1:
            live = distattn.plan(docs, dist.group.WORLD, scheduler=NAME)
            assert live.scheduler == NAME and live.schedule.shards.owner.tolist() != \
                theirs.schedule.shards.owner.tolist()
            assert live.shard(torch.arange(sum(docs))).tolist() == \
                theirs.schedule.shards.compute_tokens(p - 1 - rank).tolist()
        errors.append(case_error(NAME, docs, True, None, 4, 2))
    return errors


def _refused_worker(copy: str) -> str:
    _load(copy)
    import distattn

    try:
        distattn.plan([8, 8], 2, scheduler=NAME)
    except ValueError as exc:
        return str(exc)
    return "planned"


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_a_scheduler_added_by_the_recipe_is_exact(tmp_path, world_size):
    copy = _copy(tmp_path, register=True)
    for errors in run_distributed(_exact_worker, world_size, copy, timeout=120):
        assert max(errors) <= 1e-10, errors


def test_the_registry_entry_is_needed(tmp_path):
    copy = _copy(tmp_path, register=False)
    (message,) = run_distributed(_refused_worker, 1, copy, timeout=120)
    assert f"scheduler={NAME!r} is unknown" in message
