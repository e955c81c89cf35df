"""Expert placement: the data (expert -> rank, slot), the swap planner, baselines, the pluggable planners, the typed
plan records, the routing window and the migration executor."""

from .baselines import eplb_balanced_placement, moved_experts, smartmoe_greedy_placement
from .migrate import MigrationStats, migrate_
from .placement import Placement
from .planner import GroupCounts, SwapPlan, plan_swaps, predict_hd_ms
from .planners import PLANNERS, Planner, PlanRequest, plan_from_placement, resolve_planner
from .records import LayerPlan, PlanRecord
from .window import RoutingWindow

__all__ = ["Placement", "plan_swaps", "SwapPlan", "GroupCounts", "predict_hd_ms", "RoutingWindow", "migrate_",
           "MigrationStats", "eplb_balanced_placement", "smartmoe_greedy_placement", "moved_experts", "Planner",
           "PlanRequest", "PLANNERS", "resolve_planner", "plan_from_placement", "PlanRecord", "LayerPlan"]
