"""The expert-swap planner: incremental counts, predictions equal to the cost model, smooth-max, hand-made swaps,
migration cost, the compute-balance guard and determinism."""

from __future__ import annotations

import math
import random

import pytest
import torch

from hiermoe_lightning.cost.link_costs import LinkCosts
from hiermoe_lightning.cost.model import predict
from hiermoe_lightning.placement import planner as P
from hiermoe_lightning.placement.placement import Placement
from hiermoe_lightning.placement.planner import GroupCounts, SwapPlan, plan_swaps, predict_hd_ms, smooth_max
from hiermoe_lightning.topology import Topology
from hiermoe_lightning.traces import generate_routing

# a slow level-1 link, so hd2 wins and bytes matter (alpha small)
SLOW_NODES = LinkCosts({"a2a": (0.01, 1e-3), "inter1": (0.01, 1e-3), "intra1": (0.01, 1e-5)})


def _routing(topology: str, E: int, T: int, K: int, seed: int, spec: str = "zipf:1.0", drop: bool = True):
    G = Topology.parse(topology).world_size
    ids = generate_routing(spec, G, T, E, K, seed)
    if drop:  # a few dropped pairs
        ids[0, : max(1, T // 4), 0] = -1
    return ids


def _random_placement(E: int, G: int, seed: int) -> Placement:
    gen = torch.Generator().manual_seed(seed)
    return Placement.from_ranks(Placement.contiguous(E, G).expert_to_rank[torch.randperm(E, generator=gen)], G)


# ---------------------------------------------------------------------------------------------------- GroupCounts
@pytest.mark.parametrize("weighted", [False, True])
def test_incremental_counts_equal_counts_from_scratch(weighted):
    topo = Topology.parse("2x2x2")
    E, T, K = 16, 40, 4
    ids = _routing("2x2x2", E, T, K, seed=3)
    w = torch.rand(8, T, generator=torch.Generator().manual_seed(0)) if weighted else None
    counts = GroupCounts(ids, Placement.contiguous(E, 8), topo, w)
    rnd = random.Random(0)
    for step in range(40):
        a, b = rnd.sample(range(E), 2)
        counts.apply_swap(a, b)
        fresh = counts.recomputed()
        assert fresh.placement == counts.placement
        for L in range(1, topo.num_levels + 1):
            assert torch.equal(counts.counts[L - 1], fresh.counts[L - 1]), (step, L)
            assert torch.equal(counts.hits_fixed(L), fresh.hits_fixed(L)), (step, L)


def test_counts_by_hand():
    # 2x2, E=8 (rank r holds 2r, 2r+1); one token choosing experts 0, 1 and 5
    topo = Topology.parse("2x2")
    ids = torch.full((4, 1, 3), -1)
    ids[0, 0] = torch.tensor([0, 1, 5])
    c = GroupCounts(ids, Placement.contiguous(8, 4), topo)
    assert c.counts[0][0].tolist() == [2, 1]  # node 0 owns 0 and 1, node 1 owns 5
    assert c.counts[1][0].tolist() == [2, 0, 1, 0]
    c.apply_swap(1, 5)  # now rank 0: {0, 5}, rank 2: {4, 1}
    assert c.counts[0][0].tolist() == [2, 1] and c.counts[1][0].tolist() == [2, 0, 1, 0]
    c.apply_swap(0, 2)  # rank 0: {2, 5}, rank 1: {0, 3}
    assert c.counts[0][0].tolist() == [2, 1] and c.counts[1][0].tolist() == [1, 1, 1, 0]
    assert c.expert_load().tolist() == [1, 1, 0, 0, 0, 1, 0, 0]


def test_pair_statistics_incremental_and_every_pair_exact():
    """The all-pairs evaluation equals the loads recomputed after each swap, and the statistics kept across swaps
    equal statistics counted from scratch."""
    topo = Topology.parse("2x2x2")
    E, T, K = 16, 24, 4
    ids = _routing("2x2x2", E, T, K, seed=5)
    w = torch.rand(8, T, generator=torch.Generator().manual_seed(1))
    tables, _ = P._phase_tables(topo.sizes)
    for weights, dtype in ((None, torch.float32), (w, torch.float64)):
        counts = GroupCounts(ids, _random_placement(E, 8, 2), topo, weights)
        stats = P._PairStats(counts, dtype)
        for a, b in [(0, 9), (3, 4), (1, 15)]:
            stats.swap(counts, a, b)
        fresh_counts = counts.recomputed()
        fresh = P._PairStats(fresh_counts, dtype)
        assert torch.equal(stats.alone, fresh.alone)
        assert torch.equal(stats.lose, fresh.lose) and torch.equal(stats.both, fresh.both)
        assert all(torch.equal(stats.gain[L], fresh.gain[L]) for L in stats.levels)
        x = P._pair_phase_x(counts, stats, tables, P._phase_loads(counts, tables))
        rank = counts.placement.expert_to_rank
        for a in range(E):
            for b in range(a + 1, E):
                if rank[a] == rank[b]:
                    continue
                after = GroupCounts(ids, counts.placement.swapped(a, b), topo, weights)
                for name, (send, recv) in P._phase_loads(after, tables).items():
                    assert torch.equal(x[name][a, b].to(torch.float64), torch.maximum(send, recv)), (a, b, name)


@pytest.mark.parametrize("topology", ["2x2x2", "2x1x2"])
def test_pair_statistics_after_many_swaps_equal_a_recount(topology):
    """Swaps at every level, of co-chosen experts and on one rank: the statistics kept across them equal statistics
    counted from scratch after each swap."""
    topo = Topology.parse(topology)
    G = topo.world_size
    E, T, K = 4 * G, 40, 4
    ids = _routing(topology, E, T, K, seed=7, spec="zipf:1.2")
    w = torch.rand(G, T, generator=torch.Generator().manual_seed(3))
    counts = GroupCounts(ids, _random_placement(E, G, 4), topo, w)
    stats = P._PairStats(counts, torch.float64)
    rnd = random.Random(1)
    for step in range(24):
        a, b = (0, 1) if step % 6 == 0 else rnd.sample(range(E), 2)  # 0 and 1: the most co-chosen pair
        stats.swap(counts, a, b)
        fresh = P._PairStats(counts.recomputed(), torch.float64)
        assert torch.equal(stats.alone, fresh.alone), step
        assert torch.equal(stats.both, fresh.both), step
        assert all(torch.equal(stats.gain[L], fresh.gain[L]) for L in stats.levels), step


def test_bad_inputs():
    topo = Topology.parse("2x2")
    pl = Placement.contiguous(8, 4)
    ids = torch.zeros(4, 3, 2, dtype=torch.long)
    ids[..., 1] = 1
    with pytest.raises(ValueError, match="token_weights"):
        GroupCounts(ids, pl, topo, torch.ones(4, 2))
    with pytest.raises(ValueError, match="token_weights"):
        GroupCounts(ids, pl, topo, -torch.ones(4, 3))
    with pytest.raises(ValueError, match="twice"):
        GroupCounts(torch.zeros(4, 3, 2, dtype=torch.long), pl, topo)
    with pytest.raises(ValueError, match="world_size"):
        GroupCounts(ids[:2], pl, topo)
    with pytest.raises(ValueError, match="together"):
        plan_swaps(ids, pl, topo, SLOW_NODES, 4, 1, max_swaps=1, expert_bytes=10.0)
    with pytest.raises(ValueError, match="gamma"):
        plan_swaps(ids, pl, topo, SLOW_NODES, 4, 1, max_swaps=1, gamma=0)
    with pytest.raises(ValueError, match="ranking"):
        plan_swaps(ids, pl, topo, SLOW_NODES, 4, 1, max_swaps=1, ranking="best")
    with pytest.raises(ValueError, match="max_swaps"):
        plan_swaps(ids, pl, topo, SLOW_NODES, 4, 1, max_swaps=-1)
    with pytest.raises(ValueError, match="phase 'inter1'"):
        plan_swaps(ids, pl, topo, LinkCosts({"a2a": (0.0, 1.0)}), 4, 1, max_swaps=1)


# ---------------------------------------------------------------------------------------------------- predictions
@pytest.mark.parametrize("topology,E,K", [("4", 8, 2), ("2x2", 8, 3), ("2x2x2", 16, 4), ("4x2x2x2", 64, 8),
                                          ("2x1x2", 8, 3)])
def test_predict_hd_ms_equals_cost_model(topology, E, K):
    topo = Topology.parse(topology)
    G = topo.world_size
    sizes = dict(PRESET_LIKE)
    costs = LinkCosts({k: v for k, v in sizes.items()})
    for seed, placement in enumerate([Placement.contiguous(E, G), _random_placement(E, G, 7)]):
        ids = _routing(topology, E, 32, K, seed=seed)
        counts = GroupCounts(ids, placement, topo)
        ours = predict_hd_ms(counts, placement, topo, costs, 24)
        ref = predict(topo, placement, ids, 12, 2, costs)
        assert set(ours) == set(range(1, topo.num_levels + 1))
        for d, ms in ours.items():
            assert ms == pytest.approx(ref.dispatch[f"hd{d}"].predicted_ms, rel=1e-12, abs=1e-12), d
        smooth = predict_hd_ms(counts, placement, topo, costs, 24, gamma=10.0)
        assert all(smooth[d] >= ours[d] - 1e-12 for d in ours)


PRESET_LIKE = {"a2a": (0.7, 5.7e-4), "inter1": (0.5, 5.3e-4), "inter2": (0.3, 1.2e-4), "inter3": (0.15, 2e-5),
               "intra1": (0.57, 1.3e-4), "intra2": (0.11, 2.6e-5), "intra3": (0.2, 1.6e-5)}


def test_predict_hd_ms_weights_scale_counts():
    topo = Topology.parse("2x2")
    ids = _routing("2x2", 8, 16, 2, seed=1, drop=False)
    pl = Placement.contiguous(8, 4)
    zero_alpha = LinkCosts({k: (0.0, b) for k, (_, b) in PRESET_LIKE.items() if k in ("a2a", "inter1", "intra1")})
    one = predict_hd_ms(GroupCounts(ids, pl, topo), pl, topo, zero_alpha, 8)
    half = predict_hd_ms(GroupCounts(ids, pl, topo, torch.full((4, 16), 0.5)), pl, topo, zero_alpha, 8)
    assert all(half[d] == pytest.approx(one[d] / 2, rel=1e-12) for d in one)
    with pytest.raises(ValueError, match="placement"):
        predict_hd_ms(GroupCounts(ids, pl, topo), pl.swapped(0, 7), topo, zero_alpha, 8)


def test_smooth_max_formula():
    x = torch.tensor([3.0, 4.0, 1.0], dtype=torch.float64)
    assert float(smooth_max(x, None)) == 4.0
    g = 10.0
    expected = 4.0 * ((3 / 4) ** g + 1 + (1 / 4) ** g) ** (1 / g)
    assert float(smooth_max(x, g)) == pytest.approx(expected, rel=1e-12)
    assert float(smooth_max(x, 2.5)) == pytest.approx(4.0 * ((3 / 4) ** 2.5 + 1 + (1 / 4) ** 2.5) ** (1 / 2.5))
    assert float(smooth_max(torch.zeros(3), g)) == 0.0
    big = float(smooth_max(x, 400.0))
    assert 4.0 <= big < 4.0 * 1.01  # tends to the max as gamma grows
    rows = torch.tensor([[1.0, 1.0, 1.0, 1.0], [2.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    assert smooth_max(rows, g).tolist() == pytest.approx([4 ** (1 / g), 2.0])  # equal maxima, more busy ranks: more


# ---------------------------------------------------------------------------------------------------- the planner
def _cluster_ids(T: int = 8) -> torch.Tensor:
    """2x2, E=8 (rank r holds 2r, 2r+1; node 0 = ranks 0, 1): half the tokens choose {0, 5}, half {1, 4}; experts 0
    and 5 co-occur in every token that has either, but sit on different nodes."""
    return torch.tensor([[0, 5], [1, 4]]).repeat(T // 2, 1).expand(4, T, 2).clone()


def test_planner_co_locates_co_occurring_experts():
    topo = Topology.parse("2x2")
    ids = _cluster_ids()
    pl = Placement.contiguous(8, 4)
    plan = plan_swaps(ids, pl, topo, SLOW_NODES, 4, 1, max_swaps=4)
    assert isinstance(plan, SwapPlan) and plan.swaps
    node = plan.placement_after.expert_to_rank // 2
    assert node[0] == node[5] and node[1] == node[4]
    assert plan.predicted_ms_after < plan.predicted_ms_before
    assert plan.chosen_before == plan.chosen_after == "hd2"
    # the inter-node phase halves: each rank now sends only the tokens of the other cluster across
    before = predict(topo, pl, ids, 4, 1, SLOW_NODES).dispatch["hd2"].phases[0].max_rank_bytes
    after = predict(topo, plan.placement_after, ids, 4, 1, SLOW_NODES).dispatch["hd2"].phases[0].max_rank_bytes
    assert after * 2 == before


def test_plan_fields_are_consistent():
    topo = Topology.parse("2x2x2")
    ids = _routing("2x2x2", 16, 64, 4, seed=11, spec="zipf:1.2")
    pl = Placement.contiguous(16, 8)
    plan = plan_swaps(ids, pl, topo, "paper-a6000", 512, 2, max_swaps=6)
    replay = pl
    for a, b in plan.swaps:
        assert replay.expert_to_rank[a] != replay.expert_to_rank[b]
        replay = replay.swapped(a, b)
    assert replay == plan.placement_after and plan.placement_before == pl
    assert plan.moved_experts == int((pl.expert_to_rank != plan.placement_after.expert_to_rank).sum())
    ref_before = predict(topo, pl, ids, 512, 2, "paper-a6000")
    ref_after = predict(topo, plan.placement_after, ids, 512, 2, "paper-a6000")
    assert (plan.chosen_before, plan.chosen_after) == (ref_before.chosen, ref_after.chosen)
    assert plan.predicted_ms_before == pytest.approx(ref_before.chosen_ms, rel=1e-12)
    assert plan.predicted_ms_after == pytest.approx(ref_after.chosen_ms, rel=1e-12)
    assert plan.predicted_ms_after <= plan.predicted_ms_before
    assert plan.seconds > 0 and len(plan.swaps) <= 6
    # no swaps asked: nothing changes
    none = plan_swaps(ids, pl, topo, "paper-a6000", 512, 2, max_swaps=0)
    assert none.swaps == [] and none.placement_after == pl and none.moved_experts == 0
    assert none.predicted_ms_after == none.predicted_ms_before


def test_migration_cost_blocks_a_swap_that_pays_too_little():
    topo = Topology.parse("2x2")
    ids = _cluster_ids()
    pl = Placement.contiguous(8, 4)
    free = plan_swaps(ids, pl, topo, SLOW_NODES, 4, 1, max_swaps=1)
    saving = free.predicted_ms_before - free.predicted_ms_after
    assert len(free.swaps) == 1 and saving > 0
    bw = 1e6  # bytes per ms: migration ms = 2 * expert_bytes / bw
    horizon = 3
    too_dear = saving * horizon * 1.5 * bw / 2
    cheap = saving * horizon * 0.5 * bw / 2
    blocked = plan_swaps(ids, pl, topo, SLOW_NODES, 4, 1, max_swaps=1, expert_bytes=too_dear, horizon_steps=horizon,
                         link_bandwidth_bytes_per_ms=bw)
    assert blocked.swaps == [] and blocked.placement_after == pl
    allowed = plan_swaps(ids, pl, topo, SLOW_NODES, 4, 1, max_swaps=1, expert_bytes=cheap, horizon_steps=horizon,
                         link_bandwidth_bytes_per_ms=bw)
    assert allowed.swaps == free.swaps
    # with the link costs: alpha + beta * 2 * bytes of the phase on the link (inter1 between nodes)
    table = P.migration_ms_table(topo, SLOW_NODES, 1000.0)
    assert table.tolist() == pytest.approx([0.0, 0.01 + 1e-3 * 2000, 0.01 + 1e-5 * 2000])
    assert P.migration_ms_table(topo, SLOW_NODES, 1000.0, 500.0).tolist() == pytest.approx([0.0, 4.0, 4.0])


def test_compute_balance_guard_blocks_a_straggler():
    """Rank 0's tokens all choose experts 4 (rank 1) and 8 (rank 2): moving 8 next to 4 halves rank 0's sends but
    gives rank 1 twice the busiest load; the guard refuses it."""
    topo = Topology.parse("2x2")
    ids = torch.full((4, 8, 2), -1)
    ids[0] = torch.tensor([4, 8])
    pl = Placement.contiguous(16, 4)  # rank r holds 4r .. 4r+3
    only = [(5, 8)]
    unguarded = plan_swaps(ids, pl, topo, SLOW_NODES, 4, 1, max_swaps=2, compute_balance_tolerance=None,
                           candidate_pairs=only)
    assert unguarded.swaps == [(5, 8)] and unguarded.predicted_ms_after < unguarded.predicted_ms_before
    load = GroupCounts(ids, unguarded.placement_after, topo).rank_load()
    assert float(load.max()) == 16.0  # twice the busiest rank before
    guarded = plan_swaps(ids, pl, topo, SLOW_NODES, 4, 1, max_swaps=2, candidate_pairs=only)
    assert guarded.swaps == [] and guarded.placement_after == pl
    # without the restriction the guarded planner finds a swap that helps without a straggler
    free = plan_swaps(ids, pl, topo, SLOW_NODES, 4, 1, max_swaps=2)
    assert free.swaps and free.predicted_ms_after < free.predicted_ms_before
    before = GroupCounts(ids, pl, topo).rank_load()
    after = GroupCounts(ids, free.placement_after, topo).rank_load()
    assert float(after.max()) <= max(float(before.max()), 1.1 * float(before.mean()))


def test_guard_holds_on_every_plan():
    topo = Topology.parse("2x2x2")
    for seed in range(3):
        ids = _routing("2x2x2", 16, 48, 4, seed=seed, spec="zipf:0.8")
        pl = _random_placement(16, 8, seed)
        plan = plan_swaps(ids, pl, topo, "paper-a6000", 256, 2, max_swaps=5)
        before = GroupCounts(ids, pl, topo).rank_load()
        after = GroupCounts(ids, plan.placement_after, topo).rank_load()
        assert float(after.max()) <= max(float(before.max()), 1.1 * float(before.mean())) + 1e-9


def test_deterministic_and_weights_of_one_change_nothing():
    topo = Topology.parse("2x2x2")
    ids = _routing("2x2x2", 32, 64, 4, seed=21, spec="zipf:1.2")
    pl = Placement.contiguous(32, 8)
    kw = dict(max_swaps=5)
    first = plan_swaps(ids, pl, topo, "paper-a6000", 256, 2, **kw)
    again = plan_swaps(ids.clone(), pl, topo, "paper-a6000", 256, 2, **kw)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        parallel = plan_swaps(ids, pl, topo, "paper-a6000", 256, 2, **kw)
    finally:
        torch.set_num_threads(threads)
    ones = plan_swaps(ids, pl, topo, "paper-a6000", 256, 2, token_weights=torch.ones(8, 64), **kw)
    for other in (again, parallel, ones):
        assert other.swaps == first.swaps
        assert other.placement_after == first.placement_after
        assert other.predicted_ms_after == pytest.approx(first.predicted_ms_after, rel=1e-12)


def test_token_weights_steer_the_plan():
    """Two halves of the tokens want opposite swaps; the weights decide which half counts."""
    topo = Topology.parse("2x2")
    T = 8
    ids = torch.empty(4, T, 2, dtype=torch.long)
    ids[:, : T // 2] = torch.tensor([[0, 5], [1, 4]]).repeat(T // 4, 1)  # old tokens: 0 with 5, 1 with 4
    ids[:, T // 2:] = torch.tensor([[0, 7], [1, 6]]).repeat(T // 4, 1)  # new tokens: 0 with 7, 1 with 6
    pl = Placement.contiguous(8, 4)
    w = torch.ones(4, T)
    w[:, : T // 2] = 0.01
    plan = plan_swaps(ids, pl, topo, SLOW_NODES, 4, 1, max_swaps=1, token_weights=w)
    node = plan.placement_after.expert_to_rank // 2
    assert plan.swaps and node[0] == node[7]
    w2 = torch.flip(w, dims=[1])
    plan2 = plan_swaps(ids, pl, topo, SLOW_NODES, 4, 1, max_swaps=1, token_weights=w2)
    node2 = plan2.placement_after.expert_to_rank // 2
    assert plan2.swaps and node2[0] == node2[5]


def test_one_rank_and_candidate_pairs():
    ids = torch.tensor([[[0, 1], [1, 2]]])
    plan = plan_swaps(ids, Placement.contiguous(4, 1), Topology.parse("1"),
                      LinkCosts({"a2a": (0.1, 1.0)}), 4, 1, max_swaps=3)
    assert plan.swaps == [] and math.isclose(plan.predicted_ms_before, 0.0)
    topo = Topology.parse("2x2")
    plan = plan_swaps(_cluster_ids(), Placement.contiguous(8, 4), topo, SLOW_NODES, 4, 1, max_swaps=4,
                      candidate_pairs=[(2, 3)])  # same rank: never a swap
    assert plan.swaps == []


def test_search_precision():
    assert P._search_precision(None) == (1.0, torch.float32)
    scale, dtype = P._search_precision(torch.full((4, 10), 0.25))
    assert dtype == torch.float32 and scale == 2 ** 16
    scale, dtype = P._search_precision(torch.full((32, 4096), 0.25))  # 131072 tokens: a coarser integer scale
    assert dtype == torch.float32 and 64 <= scale < 2 ** 16 and scale == int(scale)
    assert 4 * (0.25 * 32 * 4096 * scale + 32 * 4096) < 2 ** 24
    w = torch.ones(32, 4096)
    w[0, 0] = 1e-3  # too light to keep >= 16 units in float32
    assert P._search_precision(w) == (None, torch.float64)
