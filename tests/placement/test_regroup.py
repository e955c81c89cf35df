"""Regrouping co-activated experts: the co-activation matrix, balanced groups that recover planted clusters, a
placement that gathers them with few moves, and the hiermoe planner taking it where greedy swaps stall."""

from __future__ import annotations

import pytest
import torch

from hiermoe_lightning.cost.link_costs import LinkCosts
from hiermoe_lightning.placement import Placement, plan_swaps
from hiermoe_lightning.placement.planners import (PlanRequest, hiermoe_planner, plan_net_gain_ms, regroup_plan,
                                                  swaps_between)
from hiermoe_lightning.placement.baselines import rank_loads
from hiermoe_lightning.placement.payoff import realised_saving_ms
from hiermoe_lightning.placement.regroup import balanced_groups, coactivation, rebalanced, regrouped_placement

COSTS = LinkCosts({"a2a": (0.1, 1e-4), "inter1": (0.1, 1e-4), "intra1": (0.01, 1e-7)})


def _clustered_ids(E: int = 16, C: int = 4, K: int = 4, tokens: int = 64, seed: int = 0) -> torch.Tensor:
    """``[4, tokens, K]``: every token picks K distinct experts of one cluster ``{e : e % C == c}`` (interleaved,
    so the contiguous placement spreads every cluster over every rank)."""
    g = torch.Generator().manual_seed(seed)
    cluster = torch.randint(0, C, (4, tokens), generator=g)
    members = torch.rand(4, tokens, E // C, generator=g).argsort(-1)[..., :K]  # K distinct members
    return members * C + cluster[..., None]


def test_coactivation_counts_weighted_pairs_and_loads():
    ids = torch.tensor([[[0, 1], [1, 2], [0, -1]]])  # [1, 3, 2]; -1 dropped
    A = coactivation(ids, torch.tensor([[1.0, 2.0, 0.5]]), 3)
    want = torch.tensor([[1.5, 1.0, 0.0], [1.0, 3.0, 2.0], [0.0, 2.0, 2.0]], dtype=torch.float64)
    assert torch.equal(A, want)
    assert torch.equal(coactivation(ids, None, 3).diagonal(), torch.tensor([2.0, 2.0, 1.0], dtype=torch.float64))


def test_balanced_groups_recover_planted_clusters():
    A = coactivation(_clustered_ids(), None, 16)
    groups = balanced_groups(A, list(range(16)), 4)
    assert sorted(groups) == [[c + 4 * i for i in range(4)] for c in range(4)]
    with pytest.raises(ValueError, match="cannot split 16 experts into 3 equal groups"):
        balanced_groups(A, list(range(16)), 3)


def test_regrouped_placement_gathers_each_cluster_on_one_rank_with_few_moves():
    start = Placement.contiguous(16, 4)
    target = regrouped_placement(coactivation(_clustered_ids(), None, 16), start, "2x2")
    for c in range(4):
        assert len({int(target.expert_to_rank[e]) for e in range(c, 16, 4)}) == 1
    stay = target.expert_to_rank == start.expert_to_rank
    assert int(stay.sum()) >= 4 and torch.equal(target.expert_to_slot[stay], start.expert_to_slot[stay])
    with pytest.raises(ValueError, match="topology 2x4 has 8 ranks, the placement 4"):
        regrouped_placement(torch.eye(16), start, "2x4")


def _request(ids, **kw) -> PlanRequest:
    args = dict(max_swaps=16, compute_balance_tolerance=None)
    args.update(kw)
    return PlanRequest(ids, None, Placement.contiguous(16, 4), "2x2", COSTS, 64, 4, **args)


def test_the_planner_takes_the_regrouping_where_greedy_swaps_stall():
    ids = _clustered_ids()
    request = _request(ids)
    greedy = plan_swaps(ids, request.placement, "2x2", COSTS, 64, 4, max_swaps=16, compute_balance_tolerance=None)
    best = hiermoe_planner(request)
    regrouped = regroup_plan(request)
    assert regrouped is not None and regrouped.predicted_ms_after < greedy.predicted_ms_after
    assert best.placement_after == regrouped.placement_after
    assert plan_net_gain_ms(best, request) >= plan_net_gain_ms(greedy, request)
    assert best.predicted_ms_after < 0.8 * best.predicted_ms_before  # the clusters' tokens stop crossing


def test_a_regrouping_beyond_the_swap_budget_is_not_proposed_and_the_balance_guard_rebalances_it():
    ids = _clustered_ids()
    needed = len(regroup_plan(_request(ids)).swaps)
    assert regroup_plan(_request(ids, max_swaps=needed - 1)) is None
    assert regroup_plan(_request(ids, max_swaps=0)) is None
    skewed = ids.clone()
    skewed[:, :40] = torch.tensor([0, 4, 8, 12])  # cluster 0 carries most of the load: one rank would get it all
    free = regroup_plan(_request(skewed))
    guarded = regroup_plan(_request(skewed, compute_balance_tolerance=1.1))
    load = coactivation(skewed, None, 16).diagonal()
    start = rank_loads(load, Placement.contiguous(16, 4))
    limit = max(float(start.max()), 1.1 * float(start.mean()))
    assert float(rank_loads(load, free.placement_after).max()) > limit  # gathering cluster 0 overloads its rank
    assert float(rank_loads(load, guarded.placement_after).max()) <= limit
    assert guarded.predicted_ms_after < guarded.predicted_ms_before  # still a gain, smaller than unguarded
    assert free.predicted_ms_after <= guarded.predicted_ms_after


def test_rebalanced_moves_load_off_the_busiest_rank_until_the_limit_holds():
    ids = _clustered_ids()
    ids[:, :40] = torch.tensor([0, 4, 8, 12])
    A = coactivation(ids, None, 16)
    gathered = regrouped_placement(A, Placement.contiguous(16, 4), "2x2")
    load = A.diagonal()
    before = rank_loads(load, gathered)
    limit = float(before.mean()) * 1.2
    after = rebalanced(gathered, A, limit)
    assert float(before.max()) > limit >= float(rank_loads(load, after).max())
    assert rebalanced(gathered, A, float(before.max())) == gathered  # already within: unchanged


def _skewed_cluster_ids(tokens: int = 200, seed: int = 0) -> torch.Tensor:
    """``[4, tokens, 4]``: 16 experts in 4 interleaved clusters ``{e : e % 4 == c}``; a token takes all 4 experts of
    its cluster, and the clusters carry 40 / 30 / 20 / 10 % of the tokens. No cluster fits on one rank under a 1.1x
    balance guard, but two clusters fit on a node: {0, 3} and {1, 2} carry half the load each."""
    g = torch.Generator().manual_seed(seed)
    cluster = torch.multinomial(torch.tensor([0.4, 0.3, 0.2, 0.1]), 4 * tokens, replacement=True, generator=g)
    return (torch.arange(4) * 4 + cluster.view(4, tokens, 1))


def test_capped_groups_keep_every_group_within_the_cap():
    A = coactivation(_skewed_cluster_ids(), None, 16)
    cap = 0.55 * float(A.diagonal().sum())
    free = balanced_groups(A, list(range(16)), 2)
    capped = balanced_groups(A, list(range(16)), 2, cap=cap)
    load = A.diagonal()
    assert max(float(load[g].sum()) for g in free) > cap  # the two heaviest clusters grow together
    assert max(float(load[g].sum()) for g in capped) <= cap
    assert sorted(len(g) for g in capped) == [8, 8] and sorted(e for g in capped for e in g) == list(range(16))
    for g in capped:  # whole clusters still: two per group
        assert len({e % 4 for e in g}) == 2


def test_regrouping_within_the_guard_gains_more_than_regrouping_then_rebalancing():
    """Regrouping against the guard (gather, then undo the overload) loses the node-level gathering; regrouping
    within it keeps two whole clusters per node and is faster by the cost model, and the guard holds."""
    ids = _skewed_cluster_ids()
    start = Placement.contiguous(16, 4)
    A = coactivation(ids, None, 16)
    load = A.diagonal()
    limit = 1.1 * float(rank_loads(load, start).mean())
    old = rebalanced(regrouped_placement(A, start, "2x2"), A, limit)
    new = rebalanced(regrouped_placement(A, start, "2x2", rank_load_limit=limit), A, limit)
    for p in (old, new):
        assert float(rank_loads(load, p).max()) <= limit * (1 + 1e-12)
    t0, t_old = realised_saving_ms(ids, None, start, old, "2x2", COSTS, 1024)
    _, t_new = realised_saving_ms(ids, None, start, new, "2x2", COSTS, 1024)
    assert t_new < t_old < t0
    nodes = [{int(e) % 4 for e in torch.nonzero(new.expert_to_rank // 2 == n).flatten()} for n in range(2)]
    assert sorted(map(sorted, nodes)) == [[0, 3], [1, 2]]
    plan = regroup_plan(PlanRequest(ids, None, start, "2x2", COSTS, 256, 4, max_swaps=16,
                                    compute_balance_tolerance=1.1))
    assert plan is not None and plan.placement_after == new
