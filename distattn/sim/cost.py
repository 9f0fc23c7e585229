"""The attention cost models live in the core now (:mod:`distattn.cost`: the CAD planner uses them);
these names keep working."""

from ..cost import ProfileCost, Roofline, causal_area

__all__ = ["ProfileCost", "Roofline", "causal_area"]
