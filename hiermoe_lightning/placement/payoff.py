"""Whether swaps pay for themselves: the price of a plan, the pay-off gate and the back-off schedule (pure functions).

A plan of one layer saves ``saving_ms`` on every one-way all-to-all (the cost model's ``t_{d*}`` before minus after)
for the ``a2as`` all-to-alls until the next plan, and costs its migration (:func:`plan_migration_ms`) plus the
planning itself (measured: the planner's CPU time when it runs in the background, its wall time when the step waits
for it). :func:`net_gain_ms` is that balance; ``HierMoECallback`` applies a layer's plan only when it is positive.

After a plan is applied, the routing that follows tells whether it paid: :func:`realised_saving_ms` prices the old and
the new placement on the routing seen *since* the plan (not the statistics it was planned on). :class:`BackOff` turns
the verdict into the next plan interval and swap budget: swaps that did not pay (or a plan that found none) double
the interval (up to a cap) and halve the budget; swaps that paid walk both back towards the configured values.
Everything here is deterministic, so every rank reaches the same schedule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..cost.link_costs import LinkCosts
from ..topology import Topology
from ..validation import check_int
from .placement import Placement
from .planner import _best, _choose_precision, migration_ms_table, predict_hd_ms

__all__ = ["plan_migration_ms", "net_gain_ms", "realised_saving_ms", "a2as_per_step", "BackOff"]

A2AS_PER_STEP = 4  # dispatch and combine, forward and backward


def a2as_per_step(tokens_scale: float) -> float:
    """One-way all-to-alls of a training step, in units of the routing window's per-rank sample: 4 (dispatch and
    combine, forward and backward) times the tokens per rank over the sampled tokens (``tokens_scale``)."""
    return A2AS_PER_STEP * float(tokens_scale)


def plan_migration_ms(swaps: Sequence[tuple[int, int]], placement_before: Placement, topology: "Topology | str",
                      link_costs: "LinkCosts | str", expert_bytes: float) -> float:
    """Predicted ms to carry out ``swaps`` in order from ``placement_before``: each swap moves ``expert_bytes`` each
    way over the link its two ranks share (:func:`~.planner.migration_ms_table`); a swap on one rank is free."""
    if not swaps:
        return 0.0
    topology = Topology.parse(topology)
    table = migration_ms_table(topology, LinkCosts.resolve(link_costs), expert_bytes)
    levels = topology.link_level_table
    placement, total = placement_before, 0.0
    for a, b in swaps:
        rank = placement.expert_to_rank
        total += float(table[levels[rank[a], rank[b]]])
        placement = placement.swapped(int(a), int(b))
    return total


def net_gain_ms(saving_ms: float, a2as: float, migration_ms: float, planning_ms: float) -> float:
    """``saving_ms x a2as - migration_ms - planning_ms``: what a plan gains over its horizon, net of its costs."""
    return float(saving_ms) * float(a2as) - float(migration_ms) - float(planning_ms)


def realised_saving_ms(expert_ids: torch.Tensor, token_weights: torch.Tensor | None, before: Placement,
                       after: Placement, topology: "Topology | str", link_costs: "LinkCosts | str",
                       row_bytes: int) -> tuple[float, float]:
    """``(t_before, t_after)``: the predicted one-way ms of the best ``hd<d>`` under ``before`` and under ``after``
    for the routing ``expert_ids [G, T, K]`` (``token_weights [G, T]`` or None), e.g. the routing seen since
    ``after`` was applied. Their difference is the saving the plan realised on the traffic that actually came."""
    topology = Topology.parse(topology)
    link_costs = LinkCosts.resolve(link_costs)
    times = []
    for placement in (before, after):
        counts = _choose_precision(expert_ids, placement, topology, token_weights)[0]
        times.append(_best(predict_hd_ms(counts, placement, topology, link_costs, row_bytes))[1])
    return float(times[0]), float(times[1])


@dataclass(frozen=True)
class BackOff:
    """The plan schedule's rule: intervals between ``base_interval`` and ``max_interval`` optimizer steps, swap budgets
    between 1 and ``max_swaps`` per layer and plan.

    :meth:`after` a verdict: ``paid=False`` (the last swaps did not pay, or the plan kept none) doubles the interval
    (capped) and halves the budget; ``paid=True`` halves the interval and doubles the budget back towards the
    configured values; ``None`` (nothing to judge) keeps both."""

    base_interval: int
    max_interval: int
    max_swaps: int

    def __post_init__(self):
        check_int(self.base_interval, "plan_every_n_steps", 1)
        check_int(self.max_swaps, "max_swaps_per_plan", 0)
        check_int(self.max_interval, "max_plan_interval", self.base_interval)  # at least plan_every_n_steps

    def after(self, interval: int, budget: int, paid: bool | None) -> tuple[int, int]:
        """``(interval, budget)`` for the next plan."""
        if paid is None:
            return interval, budget
        if paid:
            return max(self.base_interval, interval // 2), min(self.max_swaps, max(1, budget) * 2)
        return min(self.max_interval, interval * 2), max(min(1, self.max_swaps), budget // 2)
