"""One plan cache, for the trainer and every adapter.

A plan is a pure function of the batch's document lengths, the group, the layout and the options,
and making one costs host time (``cad``'s placement: milliseconds to seconds at scale), so the layers
of a step, recomputation and repeated batches share one::

    plans = PlanCache(size=16)
    p = plans.plan(doc_lens, group, scheduler="zigzag", causal=True)   # distattn.plan's arguments
    p is plans.plan(doc_lens, group, scheduler="zigzag", causal=True)   # True: the same object

Callers with a cheaper key of their own (flash_attn's mask arguments, Megatron's batch of a layer)
use :meth:`PlanCache.get` with it and a function making the plan on a miss.

A *pooled* plan (``cad`` with ``pool=group``) also depends on the other replicas' documents, and
making one is a collective over the pool. Such a plan is cached under the batch it was made for
(``batch=``, any object every replica passes at the same step, e.g. Megatron's ``packed_seq_params``):
it is made anew for every new batch -- on every replica alike, so none skips the collective the
others run -- and reused by the batch's other layers and by recomputation. A batch's plan is an entry
of its own, never replacing another batch's (replicas' keys differ, the batches they see at a step do
not), so every replica keeps and drops the same batches' plans. Through :meth:`PlanCache.plan`, a
pooled plan without ``batch=`` is made on every call, and a plan that is not pooled is found by its
arguments whatever ``batch`` is given. A pooled plan given every group's documents (``pool_doc_lens=``)
is no collective: it is found by its arguments, those lists included, like any other.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from typing import Callable, Hashable, Iterator, TypeVar

from .api import plan as make_plan
from .plans import Plan

__all__ = ["PlanCache"]

_T = TypeVar("_T")   # what get() caches: a plan, or what else a key makes (a nano-batch cut)


class PlanCache:
    """The last ``size`` plans, least recently used dropped first (module docstring). ``made``
    counts the plans made (the misses), for tests and logs."""

    def __init__(self, size: int = 16):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be a positive int (plans kept), got {size!r}")
        self.size = size
        self.made = 0
        # key -> (weakref to the batch or None, what keeps the key's objects alive, plan); a batch's plan
        # is under (key, serial): one entry per batch
        self._plans: OrderedDict = OrderedDict()
        self._serial = 0

    def __len__(self) -> int:
        return len(self._plans)

    def clear(self) -> None:
        self._plans.clear()

    def __iter__(self) -> Iterator:
        """The cached plans, least recently used first."""
        return iter([entry[2] for entry in self._plans.values()])

    def get(self, key: Hashable, make: Callable[[], _T], batch: object = None, *, keep: object = None) -> _T:
        """The plan cached under ``key`` (for ``batch``, when given: only a plan made for that very
        object matches), or ``make()``'s, cached. ``key`` holds whatever the plan depends on;
        ``keep``: the objects whose ``id`` it holds, kept alive beside the plan so that no other
        object takes their id while the entry lives."""
        if batch is None:
            found = key if key in self._plans else None
        else:
            found = next((k for k, (ref, _, _) in self._plans.items()
                          if ref is not None and k[0] == key and ref() is batch), None)
        if found is not None:
            self._plans.move_to_end(found)
            return self._plans[found][2]
        made = make()
        self.made += 1
        if batch is None:
            self._plans[key] = (None, keep, made)
        else:
            self._serial += 1
            self._plans[key, self._serial] = (weakref.ref(batch), keep, made)
        while len(self._plans) > self.size:
            self._plans.popitem(last=False)
        return made

    def plan(self, doc_lens, mesh, *, batch: object = None, **kwargs) -> Plan:
        """``distattn.plan(doc_lens, mesh, **kwargs)``, cached under the documents, the mesh (by
        identity) and the arguments (unhashable ones by identity). A pooled plan (``pool=``) is
        cached only under ``batch``; any other plan under its arguments alone, whatever the batch
        (module docstring); with ``pool_doc_lens``, under its arguments too."""
        if kwargs.get("pool") is None:
            batch = None
        elif batch is None and kwargs.get("pool_doc_lens") is None:
            self.made += 1
            return make_plan(doc_lens, mesh, **kwargs)
        args = tuple(sorted((name, _frozen(value) if name == "pool_doc_lens" and value is not None
                             else _hashable(value)) for name, value in kwargs.items()))
        key = (_frozen(doc_lens), id(mesh), args)
        return self.get(key, lambda: make_plan(doc_lens, mesh, **kwargs), batch, keep=(mesh, kwargs))


def _frozen(doc_lens):
    """Document lengths as nested tuples of ints (a 1-D or 2-D list, tuple, array or tensor)."""
    if hasattr(doc_lens, "tolist"):
        doc_lens = doc_lens.tolist()
    return tuple(_frozen(x) if isinstance(x, (list, tuple)) else int(x) for x in doc_lens)


def _hashable(value):
    """``value`` if it hashes, else its identity (the caller keeps it alive)."""
    try:
        hash(value)
    except TypeError:
        return ("id", id(value))
    return value
