"""Cost model: link costs (alpha-beta per phase kind) and the byte counts of each dispatch."""

from .link_costs import PRESETS, LinkCosts, PhaseCost

__all__ = ["LinkCosts", "PhaseCost", "PRESETS"]
