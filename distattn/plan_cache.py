"""One plan cache, for the trainer and every adapter.

A plan is a pure function of the batch's document lengths, the group, the layout and the options,
and making one costs host time (``cad``'s placement: milliseconds to seconds at scale), so the layers
of a step, recomputation and repeated batches share one::

    plans = PlanCache(size=16)
    p = plans.plan(doc_lens, group, scheduler="zigzag", causal=True)   # distattn.plan's arguments
    p is plans.plan(doc_lens, group, scheduler="zigzag", causal=True)   # True: the same object

A *pooled* plan (``cad`` with ``pool=group``) also depends on the other replicas' documents, and
making one is a collective over the pool. Such a plan is cached under the batch it was made for
(``batch=``, any object every replica passes at the same step, e.g. Megatron's ``packed_seq_params``):
it is made anew for every new batch -- on every replica alike, so none skips the collective the
others run -- and reused by the batch's other layers and by recomputation. Without ``batch=`` a
pooled plan is made on every call.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from typing import Callable, Hashable

from .api import plan as make_plan
from .plans import Plan

__all__ = ["PlanCache"]


class PlanCache:
    """The last ``size`` plans, least recently used dropped first (module docstring)."""

    def __init__(self, size: int = 16):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be a positive int (plans kept), got {size!r}")
        self.size = size
        # key -> (what keeps the key's objects alive, plan); a batch's plan: (key, serial) -> (weakref, plan)
        self._plans: OrderedDict = OrderedDict()
        self._serial = 0

    def __len__(self) -> int:
        return len(self._plans)

    def clear(self) -> None:
        self._plans.clear()

    def get(self, key: Hashable, make: Callable[[], Plan], batch: object = None) -> Plan:
        """The plan cached under ``key`` (for ``batch``, when given: only a plan made for that very
        object matches), or ``make()``'s, cached. ``key`` holds whatever the plan depends on."""
        if batch is None:
            found = key if key in self._plans else None
        else:
            found = next((k for k, (ref, _) in self._plans.items()
                          if isinstance(ref, weakref.ref) and k[0] == key and ref() is batch), None)
        if found is not None:
            self._plans.move_to_end(found)
            return self._plans[found][1]
        made = make()
        if batch is None:
            self._plans[key] = (None, made)
        else:
            self._serial += 1
            self._plans[key, self._serial] = (weakref.ref(batch), made)
        while len(self._plans) > self.size:
            self._plans.popitem(last=False)
        return made

    def plan(self, doc_lens, mesh, *, batch: object = None, **kwargs) -> Plan:
        """``distattn.plan(doc_lens, mesh, **kwargs)``, cached under the documents, the mesh (by
        identity, kept alive beside its plan) and the arguments (unhashable ones by identity).
        A pooled plan (``pool=``) is cached only under ``batch`` (module docstring)."""
        docs = _frozen(doc_lens)
        key = (docs, id(mesh), tuple(sorted((name, _hashable(value)) for name, value in kwargs.items())))
        if kwargs.get("pool") is not None and batch is None:
            return make_plan(doc_lens, mesh, **kwargs)
        keep = (mesh, kwargs)   # the objects whose ids are in the key live as long as the entry

        made = self.get(key, lambda: make_plan(doc_lens, mesh, **kwargs), batch)
        if batch is None:
            self._plans[key] = (keep, made)
        return made


def _frozen(doc_lens):
    """Document lengths as nested tuples of ints (a 1-D or 2-D list, tuple, array or tensor)."""
    if hasattr(doc_lens, "tolist"):
        doc_lens = doc_lens.tolist()
    return tuple(_frozen(x) if isinstance(x, (list, tuple)) else int(x) for x in doc_lens)


def _hashable(value):
    try:
        hash(value)
    except TypeError:
        return ("id", id(value))
    return value
