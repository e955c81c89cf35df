"""The pay-off arithmetic and the back-off schedule (pure functions), checked against hand-computed values."""

from __future__ import annotations

import pytest
import torch

from hiermoe_lightning.cost.link_costs import LinkCosts
from hiermoe_lightning.placement import Placement
from hiermoe_lightning.placement.payoff import (BackOff, a2as_per_step, net_gain_ms, plan_migration_ms,
                                                realised_saving_ms)
from hiermoe_lightning.placement.planner import migration_ms_table

COSTS = LinkCosts({"a2a": (0.1, 1e-4), "inter1": (0.5, 1e-3), "intra1": (0.01, 1e-6)})


def test_migration_of_a_plan_prices_each_swap_on_the_link_its_ranks_share_in_order():
    start = Placement.contiguous(8, 4)  # 2x2: ranks 0,1 on node 0; experts 2r, 2r+1 on rank r
    table = migration_ms_table("2x2", COSTS, 1000.0)  # [same rank, across nodes, inside a node]
    assert plan_migration_ms([], start, "2x2", COSTS, 1000.0) == 0.0
    # (0, 2): ranks 0 and 1, one node; then (0, 4): expert 0 now sits on rank 1, expert 4 on rank 2 -> across nodes
    got = plan_migration_ms([(0, 2), (0, 4)], start, "2x2", COSTS, 1000.0)
    assert got == pytest.approx(float(table[2] + table[1]))
    assert float(table[1]) == pytest.approx(0.5 + 1e-3 * 2000.0) and float(table[2]) == pytest.approx(0.01 + 2e-3)
    assert plan_migration_ms([(0, 1)], start, "2x2", COSTS, 1000.0) == 0.0  # same rank: nothing moves


def test_net_gain_and_all_to_alls_per_step():
    assert a2as_per_step(1.0) == 4.0 and a2as_per_step(2.5) == 10.0
    assert net_gain_ms(0.5, 40.0, 12.0, 3.0) == pytest.approx(5.0)
    assert net_gain_ms(0.0, 1e6, 0.0, 0.0) == 0.0  # nothing saved: never positive


def test_realised_saving_prices_both_placements_on_the_routing_given():
    # the tokens of node 0 (ranks 0, 1) pick experts 0 and 4: on different nodes under the contiguous placement,
    # together on rank 0 after swapping 4 with 1; node 1's ranks route nothing (-1: dropped)
    ids = torch.tensor([[[0, 4]] * 6] * 2 + [[[-1, -1]] * 6] * 2)
    before = Placement.contiguous(8, 4)
    after = before.swapped(1, 4)
    t_before, t_after = realised_saving_ms(ids, None, before, after, "2x2", COSTS, 64)
    assert t_after < t_before
    same = realised_saving_ms(ids, None, before, before, "2x2", COSTS, 64)
    assert same[0] == same[1] == t_before


def test_back_off_doubles_and_halves_within_bounds():
    rule = BackOff(base_interval=5, max_interval=20, max_swaps=4)
    assert rule.after(5, 4, None) == (5, 4)
    assert rule.after(5, 4, False) == (10, 2)
    assert rule.after(10, 2, False) == (20, 1)
    assert rule.after(20, 1, False) == (20, 1)  # capped; at least one swap stays allowed
    assert rule.after(20, 1, True) == (10, 2)
    assert rule.after(10, 2, True) == (5, 4)
    assert rule.after(5, 4, True) == (5, 4)  # never below the configured interval or above the budget
    assert BackOff(1, 1, 0).after(1, 0, False) == (1, 0)  # no swaps configured: none appear


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(base_interval=5, max_interval=4, max_swaps=1), ValueError, r"max_plan_interval must be an int >= 5, got 4"),
    (dict(base_interval=5, max_interval=6.0, max_swaps=1), TypeError, "max_plan_interval must be an int >= 5"),
    (dict(base_interval=0, max_interval=6, max_swaps=1), ValueError, "plan_every_n_steps must be an int >= 1"),
])
def test_back_off_rejects_bad_bounds_naming_the_parameter(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        BackOff(**kwargs)
