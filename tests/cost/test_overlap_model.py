"""cost.overlap: the pipelined-time formula and the chunk choice, against hand computations."""

import pytest

from hiermoe_lightning.cost.link_costs import LinkCosts
from hiermoe_lightning.cost.overlap import choose_overlap_chunks, chunk_overhead_ms, predict_overlapped_ms


def test_predicted_time_of_a_pipeline_by_hand():
    assert predict_overlapped_ms(100.0, 60.0, 1, 5.0) == 160.0  # nothing overlaps
    assert predict_overlapped_ms(100.0, 60.0, 2, 5.0) == 100.0 + 30.0 + 5.0
    assert predict_overlapped_ms(40.0, 120.0, 4, 2.0) == 120.0 + 10.0 + 6.0  # compute-bound: comm hides
    with pytest.raises(ValueError, match="chunks must be >= 1"):
        predict_overlapped_ms(1.0, 1.0, 0, 0.0)


def test_choice_balances_the_hidden_share_against_the_fixed_cost_per_chunk():
    # T(C) = 100 + 60 / C + (C - 1) * 2: 160, 132, 124, 121, 120, 121.5 for C = 1, 2, 3, 4, 6, 8
    assert choose_overlap_chunks(100.0, 60.0, 2.0) == 6
    # with 5 ms per chunk: 160, 135, 130, 130, 135, 142.5: 3 and 4 tie, the smaller wins
    assert choose_overlap_chunks(100.0, 60.0, 5.0) == 3
    assert choose_overlap_chunks(100.0, 60.0, 100.0) == 1  # every extra chunk costs more than it hides
    assert choose_overlap_chunks(100.0, 0.0, 0.0) == 1  # nothing to hide: the smallest count on ties
    assert choose_overlap_chunks(100.0, 60.0, 5.0, candidates=[2, 3]) == 3
    with pytest.raises(ValueError, match="at least one"):
        choose_overlap_chunks(1.0, 1.0, 0.0, candidates=[])


def test_chunk_overhead_is_two_exchanges_per_phase_four_times():
    costs = LinkCosts({"a2a": (0.5, 1e-6), "inter1": (2.0, 1e-6), "intra1": (0.25, 1e-7)})
    assert chunk_overhead_ms(costs, ["inter1", "intra1"]) == 8 * (2.0 + 0.25)
    assert chunk_overhead_ms(costs, ["a2a"]) == 4.0
