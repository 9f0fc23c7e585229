"""The cluster simulator (``distattn simulate``): schedules replayed on a cost model of a cluster.
The attention cost models it reads are the core's (:mod:`distattn.cost`), re-exported here."""

from ..cost import ProfileCost, Roofline, causal_area

__all__ = ["Roofline", "ProfileCost", "causal_area"]
