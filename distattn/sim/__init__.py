"""The cluster simulator (``distattn simulate``): schedules replayed on a cost model of a cluster
(:mod:`distattn.cost`, the core's, which CAD's planner plans with too)."""
