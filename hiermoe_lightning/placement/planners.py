"""Pluggable placement planners: one protocol, the built-in ones by name, and the helpers a custom planner needs.

A planner is a callable ``planner(request: PlanRequest) -> SwapPlan`` (:class:`Planner`). The request holds one
layer's routing statistics and everything the cost model needs; the plan holds the new placement, a sequence of
swaps that leads to it, and the predicted one-way all-to-all time before and after.

Built in (:data:`PLANNERS`, :func:`resolve_planner`):

* ``"hiermoe"``: :func:`~hiermoe_lightning.placement.planner.plan_swaps`, the dedup-aware greedy swap planner,
  or, when it gains more, a regrouping of co-activated experts (:mod:`~hiermoe_lightning.placement.regroup`) that
  the greedy search cannot reach one paying swap at a time (``HierMoECallback``'s default; it honours every option
  of the request).
* ``"eplb"``: DeepSeek EPLB-style balanced packing of the experts' loads
  (:func:`~hiermoe_lightning.placement.baselines.eplb_balanced_placement`); it ignores the current placement (a plan
  may move most experts), deduplication and the swap options. Experts that stay on their rank keep their slot.
* ``"smartmoe"``: SmartMoE-style greedy packing from the current placement
  (:func:`~hiermoe_lightning.placement.baselines.smartmoe_greedy_placement`); it also ignores the swap options.
* ``"none"``: keep the current placement (the baseline of ``bench placement``).

The baselines produce a placement, not swaps; :func:`plan_from_placement` turns any target placement into a plan
(the fewest swaps that lead to it, :func:`swaps_between`, and the predictions). The migration executor
(:func:`~hiermoe_lightning.placement.migrate.migrate_`) moves the experts to ``placement_after`` in one step, whatever
the swaps. Expert loads are the window's weighted (token, expert) pairs in the fixed point of
:class:`~hiermoe_lightning.placement.planner.GroupCounts` (exact integers), so every planner here is a deterministic
function of the request. ``HierMoECallback`` still plans each layer on one rank and shares the plan, so a custom
planner need only be deterministic for a resumed run to plan like the uninterrupted one.
"""

from __future__ import annotations

import importlib
import inspect
import time
from dataclasses import dataclass, replace
from typing import Callable, Protocol, Union, runtime_checkable

import torch

from ..cost.link_costs import LinkCosts
from ..topology import Topology
from .baselines import _keep_slots, eplb_balanced_placement, rank_loads, smartmoe_greedy_placement
from .payoff import net_gain_ms, plan_migration_ms
from .placement import Placement
from .planner import GroupCounts, SwapPlan, _best, _choose_precision, plan_swaps, predict_hd_ms
from .regroup import coactivation, rebalanced, regrouped_placement

__all__ = ["PlanRequest", "Planner", "SwapPlan", "PLANNERS", "resolve_planner", "check_plan", "plan_from_placement",
           "swaps_between", "hiermoe_planner", "eplb_planner", "smartmoe_planner", "keep_planner", "regroup_plan",
           "plan_net_gain_ms"]


@dataclass(frozen=True)
class PlanRequest:
    """What a planner is given for one layer.

    Args:
        expert_ids: int ``[G, T, K]``, the routing window's tokens (``-1`` = dropped pair).
        token_weights: ``[G, T]`` non-negative weights of those tokens (the window's decay), or None (each counts 1).
        placement: the layer's current placement.
        topology / link_costs: the expert-parallel topology and the link costs the cost model prices phases with
            (a string is parsed / resolved).
        hidden_size / bytes_per_elem: a token row is ``hidden_size x bytes_per_elem`` bytes.
        max_swaps: swaps per plan, at most (``plan_swaps`` honours it; the baselines do not).
        gamma: smooth-max exponent (None: plain max).
        expert_bytes / horizon_steps: the bytes one expert's migration moves and the all-to-alls until the next plan
            (both None: migration is free).
        compute_balance_tolerance: the compute-balance guard (None: no guard).
    """

    expert_ids: torch.Tensor
    token_weights: torch.Tensor | None
    placement: Placement
    topology: Topology
    link_costs: LinkCosts
    hidden_size: int
    bytes_per_elem: int
    max_swaps: int = 0
    gamma: float | None = 10.0
    expert_bytes: float | None = None
    horizon_steps: int | None = None
    compute_balance_tolerance: float | None = 1.10

    def __post_init__(self):
        if not isinstance(self.placement, Placement):
            raise TypeError(f"placement must be a Placement, got {type(self.placement).__name__}")
        object.__setattr__(self, "topology", Topology.parse(self.topology))
        object.__setattr__(self, "link_costs", LinkCosts.resolve(self.link_costs))

    def counts(self) -> GroupCounts:
        """The routing's :class:`GroupCounts` on the current placement, in the fixed point ``plan_swaps`` uses (so
        every planner predicts the same ``predicted_ms_before``)."""
        return _choose_precision(self.expert_ids, self.placement, self.topology, self.token_weights)[0]


@runtime_checkable
class Planner(Protocol):
    """``planner(request) -> SwapPlan``: a deterministic function of the request (no collectives).

    The plan's ``placement_before`` is ``request.placement``, and its ``swaps`` applied in order
    (:meth:`Placement.swapped`) give its ``placement_after`` (:func:`check_plan`); :func:`plan_from_placement`
    builds such a plan from any target placement."""

    def __call__(self, request: PlanRequest) -> SwapPlan: ...


# ---------------------------------------------------------------------------------------------------- helpers
def swaps_between(before: Placement, after: Placement) -> list[tuple[int, int]]:
    """The fewest swaps (``(a, b)``, ``a < b``) that, applied in order to ``before``, give ``after`` exactly (ranks
    and slots): position by position in (rank, slot) order, the expert ``after`` puts there trades places with the
    one there now. Deterministic; ``E`` minus the number of cycles of the permutation, so none when they are equal."""
    if not isinstance(before, Placement) or not isinstance(after, Placement):
        raise TypeError("swaps_between takes two Placements")
    if before.num_experts != after.num_experts or before.world_size != after.world_size:
        raise ValueError(f"placements differ in size: {before.num_experts} experts on {before.world_size} ranks vs "
                         f"{after.num_experts} on {after.world_size}")
    per = before.experts_per_rank
    position = (before.expert_to_rank * per + before.expert_to_slot).tolist()  # expert -> position now
    holder = [0] * len(position)  # position -> expert now
    for e, p in enumerate(position):
        holder[p] = e
    wanted = [0] * len(position)  # position -> expert after
    for e, p in enumerate((after.expert_to_rank * per + after.expert_to_slot).tolist()):
        wanted[p] = e
    swaps = []
    for p, w in enumerate(wanted):
        here = holder[p]
        if here != w:
            q = position[w]
            swaps.append((min(here, w), max(here, w)))
            holder[p], holder[q], position[w], position[here] = w, here, p, q
    return swaps


def _priced_plan(request: PlanRequest, counts: GroupCounts, target: Placement, seconds: float) -> SwapPlan:
    """The plan that moves to ``target``: :func:`swaps_between`, applied to ``counts`` (on the current placement;
    left on ``target``), and the predictions before and after."""
    if not isinstance(target, Placement):
        raise TypeError(f"the planner's target must be a Placement, got {type(target).__name__}")
    row_bytes = request.hidden_size * request.bytes_per_elem
    d_before, ms_before = _best(predict_hd_ms(counts, counts.placement, request.topology, request.link_costs,
                                              row_bytes))
    swaps = swaps_between(request.placement, target)
    for a, b in swaps:
        counts.apply_swap(a, b)
    d_after, ms_after = _best(predict_hd_ms(counts, counts.placement, request.topology, request.link_costs,
                                            row_bytes))
    return SwapPlan(swaps=swaps, placement_before=request.placement, placement_after=counts.placement,
                    predicted_ms_before=ms_before, predicted_ms_after=ms_after, chosen_before=f"hd{d_before}",
                    chosen_after=f"hd{d_after}",
                    moved_experts=int((request.placement.expert_to_rank != target.expert_to_rank).sum()),
                    seconds=seconds)


def plan_from_placement(request: PlanRequest, target: Placement) -> SwapPlan:
    """A plan that moves the layer from ``request.placement`` to ``target`` (the fewest swaps), priced with the cost
    model like :func:`plan_swaps`' plans; ``seconds`` is this call's time."""
    start = time.perf_counter()
    counts = request.counts()
    plan = _priced_plan(request, counts, target, 0.0)
    return replace(plan, seconds=time.perf_counter() - start)


def _packing_plan(request: PlanRequest, place: Callable[[torch.Tensor, Placement], Placement]) -> SwapPlan:
    """A baseline's plan: ``place(expert_load [E], current)`` -> target; ``seconds`` is ``place``'s time only (the
    time to compute the placement, as ``bench placement`` reports it)."""
    counts = request.counts()
    load = counts.expert_load()
    start = time.perf_counter()
    target = place(load, request.placement)
    return _priced_plan(request, counts, target, time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------------- planners
def hiermoe_planner(request: PlanRequest) -> SwapPlan:
    """:func:`plan_swaps` with every option of the request, or the :func:`regroup_plan` when its net gain
    (:func:`plan_net_gain_ms`) is larger and positive; ``seconds`` covers both."""
    start = time.perf_counter()
    greedy = plan_swaps(request.expert_ids, request.placement, request.topology, request.link_costs,
                        request.hidden_size, request.bytes_per_elem, max_swaps=request.max_swaps,
                        token_weights=request.token_weights, gamma=request.gamma, expert_bytes=request.expert_bytes,
                        horizon_steps=request.horizon_steps,
                        compute_balance_tolerance=request.compute_balance_tolerance)
    regrouped = regroup_plan(request)
    best = greedy
    if regrouped is not None and plan_net_gain_ms(regrouped, request) > max(plan_net_gain_ms(greedy, request), 0.0):
        best = regrouped
    return replace(best, seconds=time.perf_counter() - start)


def plan_net_gain_ms(plan: SwapPlan, request: PlanRequest) -> float:
    """``(t_before - t_after) x horizon - migration``: the predicted gain of ``plan`` until the next plan, with the
    request's migration charge (none without ``expert_bytes``; horizon 1 without ``horizon_steps``)."""
    migration = 0.0
    if request.expert_bytes is not None:
        migration = plan_migration_ms(plan.swaps, request.placement, request.topology, request.link_costs,
                                      request.expert_bytes)
    return net_gain_ms(plan.predicted_ms_before - plan.predicted_ms_after, request.horizon_steps or 1, migration, 0.0)


def regroup_plan(request: PlanRequest) -> SwapPlan | None:
    """The plan that moves to :func:`~.regroup.regrouped_placement` of the window's co-activation, brought within
    the compute-balance guard (the busiest rank's load at most max(current busiest, tolerance x mean)) by
    :func:`~.regroup.rebalanced`, priced like the swaps; None when it needs more than ``max_swaps`` swaps or still
    breaks the guard."""
    if request.max_swaps == 0 or request.topology.world_size == 1:
        return None
    start = time.perf_counter()
    counts = request.counts()
    A = coactivation(request.expert_ids, request.token_weights, request.placement.num_experts)
    limit = None
    if request.compute_balance_tolerance is not None:
        load = counts.expert_load()
        now = rank_loads(load, request.placement)
        limit = max(float(now.max()), request.compute_balance_tolerance * float(now.mean()))
    # gathered within the guard at every level (A's diagonal is the same load, before fixed-point rounding)
    target = regrouped_placement(A, request.placement, request.topology, limit)
    if limit is not None:
        target = rebalanced(target, A, limit)
        if float(rank_loads(load, target).max()) > limit * (1 + 1e-12):
            return None
    if len(swaps_between(request.placement, target)) > request.max_swaps:
        return None
    return _priced_plan(request, counts, target, time.perf_counter() - start)


def eplb_planner(request: PlanRequest) -> SwapPlan:
    """EPLB balanced packing of the window's expert loads; experts that stay on their rank keep their slot."""
    return _packing_plan(request, lambda load, current: _keep_slots(
        current, eplb_balanced_placement(load, current.world_size).expert_to_rank))


def smartmoe_planner(request: PlanRequest) -> SwapPlan:
    """SmartMoE greedy packing of the window's expert loads from the current placement."""
    return _packing_plan(request, smartmoe_greedy_placement)


def keep_planner(request: PlanRequest) -> SwapPlan:
    """No change: the current placement, priced."""
    return _packing_plan(request, lambda load, current: current)


PLANNERS: dict[str, Planner] = {"hiermoe": hiermoe_planner, "eplb": eplb_planner, "smartmoe": smartmoe_planner,
                                "none": keep_planner}
_ALLOWED = (f"one of {', '.join(repr(n) for n in PLANNERS)} or a callable (request: PlanRequest) -> SwapPlan "
            f"(or its import path, 'package.module.function')")

PlannerArg = Union[str, Callable[[PlanRequest], SwapPlan]]


def resolve_planner(planner: PlannerArg) -> Planner:
    """A planner name (:data:`PLANNERS`), a callable taking one :class:`PlanRequest`, or the import path of one
    (``"package.module.function"``, as a LightningCLI config gives it) -> the planner.

    ``ValueError`` for an unknown name or a path that does not import, ``TypeError`` for anything else (or a callable
    that cannot be called with one argument), each naming ``planner`` and what it allows. Run it before any
    collective."""
    if isinstance(planner, str):
        if planner in PLANNERS:
            return PLANNERS[planner]
        if "." not in planner.strip(". "):
            raise ValueError(f"planner must be {_ALLOWED}, got {planner!r}")
        planner = _import_path(planner)
    if not callable(planner):
        raise TypeError(f"planner must be {_ALLOWED}, got {type(planner).__name__} {planner!r}")
    try:
        signature = inspect.signature(planner)
    except (TypeError, ValueError):  # some builtins have none: accepted as they are
        return planner
    try:
        signature.bind(None)
    except TypeError:
        raise TypeError(f"planner must be {_ALLOWED}; {planner!r} cannot be called with one argument "
                        f"{signature}") from None
    return planner


def _import_path(path: str) -> object:
    """The object ``"package.module.name"`` names; ``ValueError`` naming ``planner`` when it does not import."""
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"planner must be {_ALLOWED}; {path!r} does not import: {e}") from None


def check_plan(plan: object, request: PlanRequest) -> SwapPlan:
    """``plan`` if it is a :class:`SwapPlan` for ``request``: it starts from ``request.placement``, its
    ``placement_after`` has the same experts and ranks, and its ``swaps`` applied in order give ``placement_after``;
    else ``TypeError`` / ``ValueError`` naming ``planner``."""
    if not isinstance(plan, SwapPlan):
        raise TypeError(f"planner must return a SwapPlan, got {type(plan).__name__}")
    after, before = plan.placement_after, request.placement
    if not isinstance(after, Placement) or (after.num_experts, after.world_size) != (before.num_experts,
                                                                                     before.world_size):
        raise ValueError(f"planner returned a placement_after that is not a Placement of {before.num_experts} "
                         f"experts on {before.world_size} ranks")
    if plan.placement_before != before:
        raise ValueError("planner returned a plan whose placement_before is not the request's placement")
    reached = before
    try:
        for a, b in plan.swaps:
            reached = reached.swapped(int(a), int(b))
    except (TypeError, ValueError) as e:
        raise ValueError(f"planner returned swaps that are not (a, b) expert pairs: {e}") from None
    if reached != after:
        raise ValueError("planner returned swaps that do not lead from placement_before to placement_after (use "
                         "plan_from_placement to build a plan from a target placement)")
    return plan
