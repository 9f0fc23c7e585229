"""The cluster simulator (``distattn simulate``): schedules replayed on a cost model of a cluster.
The attention cost models it reads are the core's (:mod:`distattn.cost`), re-exported here (on first
use: ``distattn --help`` reads this package's presets and must not import numpy)."""

__all__ = ["Roofline", "ProfileCost", "causal_area"]


def __getattr__(name: str):
    if name in __all__:
        from .. import cost

        return getattr(cost, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
