"""Placement: construction, lookups, swaps (pure) and validation."""

from __future__ import annotations

import pytest
import torch

from hiermoe_lightning import Placement


def test_contiguous():
    p = Placement.contiguous(8, 4)
    assert p.expert_to_rank.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert p.expert_to_slot.tolist() == [0, 1, 0, 1, 0, 1, 0, 1]
    assert p.num_experts == 8 and p.world_size == 4 and p.experts_per_rank == 2
    assert p.expert_to_rank.dtype == torch.long and p.expert_to_slot.dtype == torch.long
    assert p.to_list() == [0, 0, 1, 1, 2, 2, 3, 3]
    for r in range(4):
        assert p.experts_of(r).tolist() == [2 * r, 2 * r + 1]


def test_contiguous_one_rank_and_one_per_rank():
    assert Placement.contiguous(5, 1).experts_of(0).tolist() == [0, 1, 2, 3, 4]
    p = Placement.contiguous(4, 4)
    assert p.expert_to_rank.tolist() == [0, 1, 2, 3] and p.expert_to_slot.tolist() == [0, 0, 0, 0]


def test_from_ranks_assigns_slots_in_expert_order():
    p = Placement.from_ranks([1, 0, 1, 0, 2, 2], 3)
    assert p.expert_to_rank.tolist() == [1, 0, 1, 0, 2, 2]
    assert p.expert_to_slot.tolist() == [0, 0, 1, 1, 0, 1]
    assert p.experts_of(0).tolist() == [1, 3]
    assert p.experts_of(1).tolist() == [0, 2]
    assert p.experts_of(2).tolist() == [4, 5]


def test_from_ranks_accepts_tensor_and_roundtrips_contiguous():
    c = Placement.contiguous(12, 3)
    assert Placement.from_ranks(c.expert_to_rank, 3) == c
    assert Placement.from_ranks(torch.tensor(c.to_list()), 3) == c


def test_experts_of_inverts_rank_and_slot():
    g = torch.Generator().manual_seed(0)
    ranks = torch.arange(16) // 4
    p = Placement.from_ranks(ranks[torch.randperm(16, generator=g)], 4)
    seen = []
    for r in range(4):
        ex = p.experts_of(r)
        assert ex.shape == (4,)
        for slot, e in enumerate(ex.tolist()):
            assert int(p.expert_to_rank[e]) == r and int(p.expert_to_slot[e]) == slot
        seen += ex.tolist()
    assert sorted(seen) == list(range(16))


def test_swapped_is_pure():
    p = Placement.contiguous(8, 4)
    rank_before, slot_before = p.expert_to_rank.clone(), p.expert_to_slot.clone()
    q = p.swapped(1, 6)
    # the original is unchanged
    assert torch.equal(p.expert_to_rank, rank_before) and torch.equal(p.expert_to_slot, slot_before)
    assert q is not p and q != p
    # expert 1 was (rank 0, slot 1), expert 6 was (rank 3, slot 0): they trade both
    assert q.expert_to_rank.tolist() == [0, 3, 1, 1, 2, 2, 0, 3]
    assert q.expert_to_slot.tolist() == [0, 0, 0, 1, 0, 1, 1, 1]
    assert q.experts_of(0).tolist() == [0, 6]
    assert q.experts_of(3).tolist() == [1, 7]
    assert q.swapped(1, 6) == p
    assert q.swapped(6, 1) == p


def test_swapped_trades_slots_too():
    p = Placement.contiguous(6, 2)
    q = p.swapped(0, 5)  # expert 0 = (rank 0, slot 0), expert 5 = (rank 1, slot 2)
    assert (int(q.expert_to_rank[0]), int(q.expert_to_slot[0])) == (1, 2)
    assert (int(q.expert_to_rank[5]), int(q.expert_to_slot[5])) == (0, 0)
    assert q.experts_of(0).tolist() == [5, 1, 2]


def test_swapped_same_rank_and_self():
    p = Placement.contiguous(4, 2)
    q = p.swapped(0, 1)
    assert q.expert_to_rank.tolist() == [0, 0, 1, 1]
    assert q.experts_of(0).tolist() == [1, 0]
    assert p.swapped(2, 2) == p


def test_equality():
    assert Placement.contiguous(4, 2) == Placement.contiguous(4, 2)
    assert Placement.contiguous(4, 2) != Placement.contiguous(4, 4)
    assert Placement.contiguous(4, 2) != [0, 0, 1, 1]


# ---------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("E, G", [(7, 2), (4, 0), (4, -2), (3, 4)])
def test_contiguous_not_divisible(E, G):
    with pytest.raises(ValueError) as ei:
        Placement.contiguous(E, G)
    assert "num_experts" in str(ei.value) and str(G) in str(ei.value)


@pytest.mark.parametrize("E", [0, -4])
def test_contiguous_non_positive_experts(E):
    """num_experts <= 0 is bad input: a ValueError naming num_experts, not an error from inside torch."""
    with pytest.raises(ValueError, match="num_experts"):
        Placement.contiguous(E, 2)


def test_from_ranks_unbalanced():
    with pytest.raises(ValueError, match="slots"):
        Placement.from_ranks([0, 0, 0, 1], 2)


def test_from_ranks_rank_too_large():
    with pytest.raises(ValueError, match="0..1"):
        Placement.from_ranks([0, 1, 2, 1], 2)


def test_from_ranks_negative_rank():
    """A negative rank must be a ValueError naming the allowed range, not torch.bincount's RuntimeError."""
    with pytest.raises(ValueError, match="0..1"):
        Placement.from_ranks([-1, 0, 1, 1], 2)


def test_direct_construction_errors():
    r = torch.tensor([0, 0, 1, 1])
    s = torch.tensor([0, 1, 0, 1])
    assert Placement(r, s, 2) == Placement.contiguous(4, 2)
    with pytest.raises(TypeError, match="int64"):
        Placement(r.int(), s, 2)
    with pytest.raises(TypeError, match="int64"):
        Placement(r, s[:3], 2)
    with pytest.raises(TypeError, match="int64"):
        Placement(r.view(2, 2), s.view(2, 2), 2)
    with pytest.raises(ValueError, match="divisible"):
        Placement(r, s, 3)
    with pytest.raises(ValueError, match="slots"):
        Placement(r, torch.tensor([0, 0, 0, 1]), 2)  # duplicate (rank 0, slot 0)
    with pytest.raises(ValueError, match="slots"):
        Placement(r, torch.tensor([0, 2, 0, 1]), 2)  # slot out of range
    with pytest.raises(ValueError, match="slots"):
        Placement(r, torch.tensor([-1, 0, 0, 1]), 2)
    with pytest.raises(ValueError, match="0..1"):
        Placement(torch.tensor([0, 0, 1, 2]), s, 2)


def test_frozen():
    p = Placement.contiguous(4, 2)
    with pytest.raises(Exception):
        p.world_size = 4


@pytest.mark.parametrize("rank", [-1, 2, 5])
def test_experts_of_bad_rank(rank):
    """An out-of-range rank must raise, not return uninitialised memory."""
    with pytest.raises(ValueError, match="rank"):
        Placement.contiguous(4, 2).experts_of(rank)


@pytest.mark.parametrize("a, b", [(0, 4), (9, 1), (-1, 0)])
def test_swapped_bad_expert(a, b):
    """An out-of-range expert id must be a ValueError naming the valid range, not torch's IndexError."""
    p = Placement.contiguous(4, 2)
    with pytest.raises(ValueError, match="expert"):
        p.swapped(a, b)
    assert p == Placement.contiguous(4, 2)
