"""Cost model and (later) the cluster simulator: attention time from a roofline or a profile table."""

from .cost import ProfileCost, Roofline, causal_area

__all__ = ["Roofline", "ProfileCost", "causal_area"]
