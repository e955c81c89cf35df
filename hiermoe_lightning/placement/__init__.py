"""Expert placement: the data (expert -> rank, slot), the swap planner and the migration executor."""

from .placement import Placement

__all__ = ["Placement"]
