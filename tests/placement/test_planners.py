"""Pluggable planners: the registry, the adapters (hiermoe = plan_swaps; eplb / smartmoe = the baselines' placements
as plans), swaps_between, check_plan, and the properties every plan of plan_swaps' named steps keeps."""

from __future__ import annotations

import random

import pytest
import torch

from hiermoe_lightning.cost.link_costs import LinkCosts
from hiermoe_lightning.cost.model import predict
from hiermoe_lightning.placement.baselines import eplb_balanced_placement, smartmoe_greedy_placement
from hiermoe_lightning.placement.placement import Placement
from hiermoe_lightning.placement.planner import GroupCounts, SwapPlan, plan_swaps, predict_hd_ms
from hiermoe_lightning.placement.planners import (PLANNERS, Planner, PlanRequest, check_plan, plan_from_placement,
                                                  resolve_planner, swaps_between)
from hiermoe_lightning.topology import Topology
from hiermoe_lightning.traces import generate_routing

SLOW_NODES = LinkCosts({"a2a": (0.01, 1e-3), "inter1": (0.01, 1e-3), "intra1": (0.01, 1e-5)})


def _random_placement(E: int, G: int, seed: int) -> Placement:
    gen = torch.Generator().manual_seed(seed)
    return Placement.from_ranks(Placement.contiguous(E, G).expert_to_rank[torch.randperm(E, generator=gen)], G)


def _request(seed: int = 0, weighted: bool = False, topology: str = "2x2", E: int = 16, K: int = 4, T: int = 64,
             placement: Placement | None = None, **options) -> PlanRequest:
    G = Topology.parse(topology).world_size
    ids = generate_routing("zipf:1.2", G, T, E, K, seed)
    ids[0, : T // 8, 0] = -1  # a few dropped pairs
    weights = torch.rand(G, T, generator=torch.Generator().manual_seed(seed)) if weighted else None
    options = {"max_swaps": 4, **options}
    return PlanRequest(ids, weights, placement or Placement.contiguous(E, G), topology, SLOW_NODES, 64, 2, **options)


def _applied(before: Placement, swaps) -> Placement:
    for a, b in swaps:
        before = before.swapped(a, b)
    return before


# ---------------------------------------------------------------------------------------------------- registry
def test_registry_names_and_protocol():
    assert list(PLANNERS) == ["hiermoe", "eplb", "smartmoe", "none"]
    for name, planner in PLANNERS.items():
        assert resolve_planner(name) is planner and isinstance(planner, Planner)

    def mine(request):
        return plan_from_placement(request, request.placement)

    assert resolve_planner(mine) is mine
    # a LightningCLI config names a function by its import path
    assert resolve_planner("hiermoe_lightning.placement.planners.eplb_planner") is PLANNERS["eplb"]


@pytest.mark.parametrize("planner, exc, match", [
    ("greedy", ValueError, r"planner must be one of 'hiermoe', 'eplb', 'smartmoe', 'none' or a callable .*'greedy'"),
    ("", ValueError, "planner must be one of"),
    ("EPLB", ValueError, "planner must be one of"),
    (None, TypeError, r"planner must be one of 'hiermoe', .* got NoneType None"),
    (3, TypeError, "planner must be one of"),
    (lambda: None, TypeError, "cannot be called with one argument"),
    (lambda ids, placement: None, TypeError, "planner must be .* cannot be called with one argument"),
    ("no_such_module.planner", ValueError, "'no_such_module.planner' does not import"),
    ("hiermoe_lightning.placement.planners.nothing", ValueError, "planner must be .* does not import"),
    ("hiermoe_lightning.placement.planners.PLANNERS", TypeError, "planner must be one of .* got dict"),
])
def test_bad_planner_names_the_parameter_and_the_allowed_values(planner, exc, match):
    with pytest.raises(exc, match=match):
        resolve_planner(planner)


# ---------------------------------------------------------------------------------------------------- swaps_between
@pytest.mark.parametrize("seed", range(6))
def test_swaps_between_leads_exactly_to_the_target_in_the_fewest_swaps(seed):
    E, G = 24, 4
    before, after = _random_placement(E, G, seed), _random_placement(E, G, seed + 100)
    # shuffle the slots of ``after`` too: the swaps must reproduce slots, not only ranks
    gen = torch.Generator().manual_seed(seed)
    after = Placement(after.expert_to_rank, after.expert_to_slot, G)
    for r in range(G):
        mine = (after.expert_to_rank == r).nonzero().flatten()
        slots = after.expert_to_slot.clone()
        slots[mine] = slots[mine][torch.randperm(mine.numel(), generator=gen)]
        after = Placement(after.expert_to_rank, slots, G)
    swaps = swaps_between(before, after)
    assert _applied(before, swaps) == after
    assert all(a < b for a, b in swaps)
    # fewest: E minus the cycles of the position permutation
    per = E // G
    pos_before = (before.expert_to_rank * per + before.expert_to_slot).tolist()
    pos_after = (after.expert_to_rank * per + after.expert_to_slot).tolist()
    perm = {pos_before[e]: pos_after[e] for e in range(E)}
    seen, cycles = set(), 0
    for p in range(E):
        if p not in seen:
            cycles += 1
            while p not in seen:
                seen.add(p)
                p = perm[p]
    assert len(swaps) == E - cycles
    assert swaps_between(before, before) == []


def test_swaps_between_rejects_other_sizes():
    with pytest.raises(ValueError, match="placements differ in size"):
        swaps_between(Placement.contiguous(8, 4), Placement.contiguous(8, 2))
    with pytest.raises(TypeError, match="two Placements"):
        swaps_between(Placement.contiguous(8, 4), [0] * 8)


# ---------------------------------------------------------------------------------------------------- adapters
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("name", list(PLANNERS))
def test_every_planner_gives_a_checked_priced_deterministic_plan(name, weighted):
    start = _random_placement(16, 4, 7)
    request = _request(seed=3, weighted=weighted, placement=start)
    plan = resolve_planner(name)(request)
    assert check_plan(plan, request) is plan
    assert plan.placement_before == start and _applied(start, plan.swaps) == plan.placement_after
    assert plan.moved_experts == int((start.expert_to_rank != plan.placement_after.expert_to_rank).sum())
    # every planner prices "before" like plan_swaps, and "after" is the cost model on its placement
    reference = plan_swaps(request.expert_ids, start, "2x2", SLOW_NODES, 64, 2, max_swaps=0,
                           token_weights=request.token_weights)
    assert (plan.predicted_ms_before, plan.chosen_before) == (reference.predicted_ms_before, reference.chosen_before)
    counts = request.counts()
    for a, b in plan.swaps:
        counts.apply_swap(a, b)
    after = predict_hd_ms(counts, plan.placement_after, "2x2", SLOW_NODES, 128)
    assert plan.predicted_ms_after == min(after.values()) and plan.chosen_after == f"hd{min(after, key=after.get)}"
    again = resolve_planner(name)(request)
    assert (again.swaps, again.placement_after, again.predicted_ms_after) == (plan.swaps, plan.placement_after,
                                                                              plan.predicted_ms_after)


def test_hiermoe_adapter_is_plan_swaps_with_the_request_options():
    request = _request(seed=1, weighted=True, max_swaps=3, gamma=5.0, expert_bytes=1e4, horizon_steps=20,
                       compute_balance_tolerance=1.3)
    plan = resolve_planner("hiermoe")(request)
    ref = plan_swaps(request.expert_ids, request.placement, "2x2", SLOW_NODES, 64, 2, max_swaps=3,
                     token_weights=request.token_weights, gamma=5.0, expert_bytes=1e4, horizon_steps=20,
                     compute_balance_tolerance=1.3)
    assert (plan.swaps, plan.placement_after, plan.predicted_ms_before, plan.predicted_ms_after) == \
        (ref.swaps, ref.placement_after, ref.predicted_ms_before, ref.predicted_ms_after)


@pytest.mark.parametrize("weighted", [False, True])
def test_baseline_adapters_pack_the_window_load(weighted):
    start = _random_placement(16, 4, 2)
    request = _request(seed=5, weighted=weighted, placement=start)
    load = GroupCounts(request.expert_ids, start, "2x2", request.token_weights).expert_load()
    eplb = resolve_planner("eplb")(request).placement_after
    assert torch.equal(eplb.expert_to_rank, eplb_balanced_placement(load, 4).expert_to_rank)
    stay = eplb.expert_to_rank == start.expert_to_rank
    assert torch.equal(eplb.expert_to_slot[stay], start.expert_to_slot[stay])  # no needless slot shuffle
    assert resolve_planner("smartmoe")(request).placement_after == smartmoe_greedy_placement(load, start)
    assert resolve_planner("none")(request).placement_after == start
    assert resolve_planner("none")(request).swaps == []


def test_eplb_on_an_eplb_placement_moves_nothing():
    request = _request(seed=4)
    first = resolve_planner("eplb")(request)
    again = resolve_planner("eplb")(PlanRequest(request.expert_ids, None, first.placement_after, "2x2", SLOW_NODES,
                                                64, 2))
    assert again.swaps == [] and again.placement_after == first.placement_after


def test_check_plan_rejects_what_the_callback_could_not_apply():
    request = _request()
    good = resolve_planner("hiermoe")(request)
    with pytest.raises(TypeError, match="planner must return a SwapPlan, got dict"):
        check_plan({"swaps": []}, request)
    moved = Placement.contiguous(16, 4).swapped(0, 15)
    with pytest.raises(ValueError, match="do not lead from placement_before to placement_after"):
        check_plan(SwapPlan([], request.placement, moved, 1.0, 1.0, "hd1", "hd1", 2, 0.0), request)
    with pytest.raises(ValueError, match="not a Placement of 16 experts on 4 ranks"):
        check_plan(SwapPlan([], request.placement, Placement.contiguous(16, 2), 1.0, 1.0, "hd1", "hd1", 0, 0.0),
                   request)
    with pytest.raises(ValueError, match="placement_before is not the request's placement"):
        check_plan(SwapPlan([(0, 15)], moved, Placement.contiguous(16, 4), 1.0, 1.0, "hd1", "hd1", 2, 0.0), request)
    with pytest.raises(ValueError, match="not \\(a, b\\) expert pairs"):
        check_plan(SwapPlan([(0, 99)], request.placement, moved, 1.0, 1.0, "hd1", "hd1", 2, 0.0), request)
    assert check_plan(good, request) is good


def test_plan_request_checks_and_normalises():
    request = _request()
    assert isinstance(request.topology, Topology) and request.link_costs is SLOW_NODES
    assert PlanRequest(request.expert_ids, None, request.placement, Topology.parse("2x2"), "paper-a6000", 64,
                       2).link_costs.name == LinkCosts.preset("paper-a6000").name
    with pytest.raises(TypeError, match="placement must be a Placement"):
        PlanRequest(request.expert_ids, None, [0, 1], "2x2", SLOW_NODES, 64, 2)


# ---------------------------------------------------------------------------------------------------- plan_swaps
@pytest.mark.parametrize("seed", range(10))
def test_plan_swaps_properties_on_random_cases(seed):
    """What plan_swaps' named steps (checks, precision, search, best prefix) promise, on random inputs: the swaps
    lead to placement_after, pair experts on different ranks, stay within max_swaps, never slow the dispatch down, pay
    for their migration together, and the predictions are the cost model's."""
    rnd = random.Random(seed)
    topology = rnd.choice(["2x2", "4", "2x2x2"])
    costs = SLOW_NODES if topology == "2x2" else "paper-a6000"
    G = Topology.parse(topology).world_size
    E, K, T = G * rnd.choice([2, 4]), rnd.choice([1, 2, 4]), rnd.choice([16, 64])
    ids = generate_routing("zipf:1.2", G, T, E, K, seed)
    weights = torch.rand(G, T, generator=torch.Generator().manual_seed(seed)) if rnd.random() < 0.5 else None
    start = _random_placement(E, G, seed)
    max_swaps = rnd.choice([0, 2, 6]) if seed % 2 == 0 else 6
    migration = dict(expert_bytes=rnd.choice([10.0, 1e3]), horizon_steps=rnd.choice([10, 100])) if seed % 2 else {}
    plan = plan_swaps(ids, start, topology, costs, 64, 2, max_swaps=max_swaps, token_weights=weights,
                      gamma=rnd.choice([None, 10.0]), ranking=rnd.choice(["plain_first", "smooth"]), **migration)
    assert len(plan.swaps) <= max_swaps and _applied(start, plan.swaps) == plan.placement_after
    ranks = start.expert_to_rank
    placement = start
    for a, b in plan.swaps:
        assert placement.expert_to_rank[a] != placement.expert_to_rank[b]
        placement = placement.swapped(a, b)
    assert plan.predicted_ms_after <= plan.predicted_ms_before
    if plan.swaps and migration:
        from hiermoe_lightning.placement.planner import migration_ms_table

        table = migration_ms_table(topology, costs, migration["expert_bytes"])
        placement, paid = start, 0.0
        for a, b in plan.swaps:
            paid += float(table[Topology.parse(topology).link_level_table[placement.expert_to_rank[a],
                                                                           placement.expert_to_rank[b]]])
            placement = placement.swapped(a, b)
        assert (plan.predicted_ms_before - plan.predicted_ms_after) * migration["horizon_steps"] > paid
    if weights is None:
        names = [f"hd{d}" for d in range(1, Topology.parse(topology).num_levels + 1)]
        for placement, ms in ((start, plan.predicted_ms_before), (plan.placement_after, plan.predicted_ms_after)):
            pred = predict(topology, placement, ids, 64, 2, costs, dispatches=names)
            assert ms == pytest.approx(pred.chosen_ms, rel=1e-9)
    assert ranks is start.expert_to_rank  # the input placement is left alone
