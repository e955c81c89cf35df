"""Placement baselines (EPLB balanced packing, SmartMoE greedy) and the planner against them on skewed traces."""

from __future__ import annotations

import pytest
import torch

from hiermoe_lightning.cost.model import predict
from hiermoe_lightning.placement.baselines import (
    eplb_balanced_placement,
    moved_experts,
    rank_loads,
    smartmoe_greedy_placement,
)
from hiermoe_lightning.placement.placement import Placement
from hiermoe_lightning.placement.planner import GroupCounts, plan_swaps
from hiermoe_lightning.topology import Topology
from hiermoe_lightning.traces import generate_routing


def test_eplb_by_hand_and_ignores_the_old_placement():
    load = torch.tensor([10.0, 1, 1, 1, 5, 5, 1, 1])
    p = eplb_balanced_placement(load, 2)
    # heaviest first to the least-loaded rank with a free slot, lower rank on ties
    assert p.to_list() == [0, 0, 1, 0, 1, 1, 1, 0]
    assert rank_loads(load, p).tolist() == [13.0, 12.0]
    assert p.experts_per_rank == 4


def test_eplb_balances_load():
    G, E = 8, 64
    ids = generate_routing("zipf:1.2", G, 512, E, 8, 0)
    load = torch.bincount(ids.reshape(-1), minlength=E).double()
    contiguous = Placement.contiguous(E, G)
    p = eplb_balanced_placement(load, G)
    loads = rank_loads(load, p)
    assert torch.bincount(p.expert_to_rank, minlength=G).tolist() == [E // G] * G
    assert float(loads.max()) <= float(load.sum()) / G + float(load.max())  # the greedy packing bound
    assert float(loads.max()) < 0.5 * float(rank_loads(load, contiguous).max())
    assert moved_experts(contiguous, p) > E // 2  # it ignores where experts were


def test_smartmoe_keeps_a_balanced_placement():
    current = Placement.contiguous(16, 4)
    load = torch.ones(16)
    assert smartmoe_greedy_placement(load, current) == current
    # a permuted but balanced placement is kept too
    shuffled = Placement.from_ranks([3, 1, 0, 2, 2, 0, 1, 3, 0, 1, 2, 3, 3, 2, 1, 0], 4)
    assert smartmoe_greedy_placement(load, shuffled) == shuffled


def test_smartmoe_rebalances_and_prefers_the_current_rank():
    current = Placement.contiguous(8, 4)  # rank r: 2r, 2r+1
    load = torch.tensor([9.0, 8, 1, 1, 1, 1, 1, 1])
    p = smartmoe_greedy_placement(load, current)
    assert float(rank_loads(load, p).max()) < float(rank_loads(load, current).max())
    assert p.expert_to_rank[0] == 0  # the heaviest expert stays where it was (all ranks empty: a tie)
    assert p.expert_to_rank[1] != 0
    assert torch.bincount(p.expert_to_rank, minlength=4).tolist() == [2, 2, 2, 2]
    # experts that stay keep their slot
    stay = p.expert_to_rank == current.expert_to_rank
    assert torch.equal(p.expert_to_slot[stay], current.expert_to_slot[stay])


def test_moved_experts_and_errors():
    a = Placement.contiguous(8, 4)
    assert moved_experts(a, a) == 0
    assert moved_experts(a, a.swapped(0, 7)) == 2
    assert moved_experts(a, a.swapped(0, 1)) == 0  # same rank, other slot
    with pytest.raises(ValueError):
        moved_experts(a, Placement.contiguous(8, 2))
    with pytest.raises(ValueError):
        eplb_balanced_placement(torch.ones(8), 3)
    with pytest.raises(ValueError):
        eplb_balanced_placement(-torch.ones(8), 4)
    with pytest.raises(TypeError):
        smartmoe_greedy_placement([1.0] * 8, a)


def _cluster_trace(G: int, T: int, E: int, K: int, n_clusters: int, in_cluster: int, seed: int) -> torch.Tensor:
    """Co-activation clusters: cluster c = {c, c + n, c + 2n, ...} (spread over every rank of the contiguous
    placement); each token picks a cluster, ``in_cluster`` experts from it and ``K - in_cluster`` others."""
    gen = torch.Generator().manual_seed(seed)
    size = E // n_clusters
    members = torch.arange(E).reshape(size, n_clusters).T
    N = G * T
    cluster = torch.randint(0, n_clusters, (N,), generator=gen)
    pick = torch.rand(N, size, generator=gen).argsort(dim=1)[:, :in_cluster]
    chosen = members[cluster[:, None], pick]
    weights = torch.ones(N, E)
    weights.scatter_(1, chosen, 0.0)
    rest = torch.multinomial(weights, K - in_cluster, replacement=False, generator=gen)
    return torch.cat([chosen, rest], dim=1).reshape(G, T, K)


@pytest.mark.parametrize("trace", ["zipf:1.2", "clusters"])
def test_planner_beats_eplb_and_smartmoe_on_skewed_traces(trace):
    topo = Topology.parse("4x2")
    G, E, T, K = 8, 32, 256, 8
    ids = generate_routing(trace, G, T, E, K, 0) if trace != "clusters" else _cluster_trace(G, T, E, K, 4, 6, 0)
    start = Placement.contiguous(E, G)
    load = GroupCounts(ids, start, topo).expert_load()
    plan = plan_swaps(ids, start, topo, "paper-a6000", 2048, 2, max_swaps=8)
    ours = predict(topo, plan.placement_after, ids, 2048, 2, "paper-a6000").chosen_ms
    none = predict(topo, start, ids, 2048, 2, "paper-a6000").chosen_ms
    assert ours == pytest.approx(plan.predicted_ms_after, rel=1e-12)
    assert ours < none
    for baseline in (eplb_balanced_placement(load, G), smartmoe_greedy_placement(load, start)):
        theirs = predict(topo, baseline, ids, 2048, 2, "paper-a6000").chosen_ms
        assert ours < theirs, (trace, ours, theirs)
        assert plan.moved_experts < moved_experts(start, baseline)
