"""The cluster simulator (``distattn simulate``): schedules replayed on a cost model of a cluster
(:mod:`distattn.costmodel.cost`, the core's, which CAD's planner plans with too), and what a job holds per
rank (:mod:`.memory_model`, :mod:`.dp_memory`), which the trainer's preflight and the adapters read."""
