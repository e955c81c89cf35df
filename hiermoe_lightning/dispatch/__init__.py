"""Dispatch and combine: the spec of each dispatch value, the pure hop planner, the engine and its collectives."""

from .engine import DispatchHandle, Route, apply_experts, combine, dispatch, plan_hop
from .spec import DispatchSpec, dispatch_names, parse_dispatch

__all__ = ["DispatchHandle", "DispatchSpec", "Route", "apply_experts", "combine", "dispatch", "dispatch_names",
           "parse_dispatch", "plan_hop"]
