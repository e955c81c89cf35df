"""Topology: parsing, coordinates, rank groups and link levels, against hand arithmetic."""

from __future__ import annotations

import itertools

import pytest
import torch

from hiermoe_lightning import Topology


# ---------------------------------------------------------------------------------------------- parse / str
@pytest.mark.parametrize(
    "text, sizes",
    [("4", (4,)), ("2x2", (2, 2)), ("4x2x2x2", (4, 2, 2, 2)), ("1", (1,)), ("1x8", (1, 8)), ("16x1", (16, 1))],
)
def test_parse_and_str_round_trip(text, sizes):
    topo = Topology.parse(text)
    assert topo.sizes == sizes
    assert str(topo) == text
    assert Topology.parse(str(topo)) == topo
    assert Topology(list(sizes)) == topo
    assert hash(Topology(list(sizes))) == hash(topo)


@pytest.mark.parametrize("text", [" 2x2", "2x2 ", "2 x 2", " 2 x  2 ", "\t2x2\n"])
def test_parse_tolerates_whitespace(text):
    topo = Topology.parse(text)
    assert topo.sizes == (2, 2)
    assert str(topo) == "2x2"


def test_parse_passes_through_topology_list_and_int():
    topo = Topology([2, 3])
    assert Topology.parse(topo) is topo
    assert Topology.parse([2, 3]) == topo
    assert Topology.parse((2, 3)) == topo
    assert Topology.parse(6) == Topology([6])


def test_repr_mentions_sizes():
    assert "2x3x2" in repr(Topology([2, 3, 2]))


def test_inequality():
    assert Topology([2, 2]) != Topology([4])
    assert Topology([2, 2]) != "2x2"


@pytest.mark.parametrize(
    "sizes, world, levels", [([4], 4, 1), ([2, 2], 4, 2), ([4, 2, 2, 2], 32, 4), ([2, 3, 2], 12, 3), ([1], 1, 1)]
)
def test_world_size_and_num_levels(sizes, world, levels):
    topo = Topology(sizes)
    assert topo.world_size == world
    assert topo.num_levels == levels


# ---------------------------------------------------------------------------------------------- coordinates
def _hand_coords(rank: int, sizes: list[int]) -> tuple[int, ...]:
    """Mixed radix, last coordinate fastest."""
    out = []
    for n in reversed(sizes):
        out.append(rank % n)
        rank //= n
    return tuple(reversed(out))


def test_coords_and_rank_of_every_rank_2x3x2():
    sizes = [2, 3, 2]
    topo = Topology(sizes)
    assert topo.strides == (6, 2, 1)
    seen = set()
    for r in range(12):
        c = topo.coords(r)
        assert c == _hand_coords(r, sizes)
        assert c == (r // 6, (r // 2) % 3, r % 2)
        assert topo.rank_of(c) == r
        assert topo.rank_of(list(c)) == r
        seen.add(c)
    assert seen == set(itertools.product(range(2), range(3), range(2)))
    table = topo.coord_table
    assert table.shape == (12, 3) and table.dtype == torch.int64
    assert [tuple(row) for row in table.tolist()] == [_hand_coords(r, sizes) for r in range(12)]


def test_coords_hand_examples():
    topo = Topology([2, 3, 2])
    assert topo.coords(0) == (0, 0, 0)
    assert topo.coords(7) == (1, 0, 1)
    assert topo.coords(11) == (1, 2, 1)
    assert topo.rank_of((0, 2, 1)) == 5


@pytest.mark.parametrize("rank", [-1, 12, 100])
def test_coords_bad_rank(rank):
    with pytest.raises(ValueError, match="rank"):
        Topology([2, 3, 2]).coords(rank)


@pytest.mark.parametrize("coords", [(0, 0), (2, 0, 0), (0, 3, 0), (0, 0, -1), (0, 0, 0, 0)])
def test_rank_of_bad_coords(coords):
    with pytest.raises(ValueError, match="coords"):
        Topology([2, 3, 2]).rank_of(coords)


# ---------------------------------------------------------------------------------------------- groups
def test_siblings_hand_examples():
    topo = Topology([2, 3, 2])
    assert topo.siblings(7, 1) == [1, 7]
    assert topo.siblings(7, 2) == [7, 9, 11]
    assert topo.siblings(7, 3) == [6, 7]
    assert topo.siblings(0, 2) == [0, 2, 4]
    assert topo.siblings(11, 2) == [7, 9, 11]


def test_siblings_definition_every_rank():
    topo = Topology([2, 3, 2])
    for r in range(12):
        c = topo.coords(r)
        for level in (1, 2, 3):
            sib = topo.siblings(r, level)
            assert r in sib
            assert len(sib) == topo.sizes[level - 1]
            # ordered by c_level, all other coords equal to r's
            assert [topo.coords(s)[level - 1] for s in sib] == list(range(topo.sizes[level - 1]))
            for s in sib:
                cs = topo.coords(s)
                assert all(cs[i] == c[i] for i in range(3) if i != level - 1)


def test_prefix_group_hand_examples():
    topo = Topology([2, 3, 2])
    assert topo.prefix_group(7, 0) == list(range(12))
    assert topo.prefix_group(7, 1) == [6, 7, 8, 9, 10, 11]
    assert topo.prefix_group(7, 2) == [6, 7]
    assert topo.prefix_group(7, 3) == [7]
    assert topo.prefix_group(4, 2) == [4, 5]


def test_prefix_group_definition_every_rank():
    topo = Topology([2, 3, 2])
    for r in range(12):
        for level in range(4):
            group = topo.prefix_group(r, level)
            expected = [s for s in range(12) if topo.coords(s)[:level] == topo.coords(r)[:level]]
            assert group == expected


@pytest.mark.parametrize("sizes", [[4], [2, 2], [2, 3, 2], [4, 2, 2, 2], [1, 3], [3, 1, 2]])
def test_partitions_cover_every_rank_once(sizes):
    topo = Topology(sizes)
    G = topo.world_size
    for level in range(1, topo.num_levels + 1):
        part = topo.sibling_partition(level)
        flat = [r for g in part for r in g]
        assert sorted(flat) == list(range(G))
        assert len(part) == G // sizes[level - 1]
        for g in part:
            assert all(topo.siblings(r, level) == g for r in g)
    for level in range(0, topo.num_levels + 1):
        part = topo.prefix_partition(level)
        flat = [r for g in part for r in g]
        assert sorted(flat) == list(range(G))
        assert len(part) == topo.num_groups(level)
        for g in part:
            assert all(topo.prefix_group(r, level) == g for r in g)
        idx = topo.group_index(level)
        for gi, g in enumerate(part):
            assert idx[g].tolist() == [gi] * len(g)


def test_partitions_hand_examples():
    topo = Topology([2, 2])
    assert topo.sibling_partition(1) == [[0, 2], [1, 3]]
    assert topo.sibling_partition(2) == [[0, 1], [2, 3]]
    assert topo.prefix_partition(0) == [[0, 1, 2, 3]]
    assert topo.prefix_partition(1) == [[0, 1], [2, 3]]
    assert topo.prefix_partition(2) == [[0], [1], [2], [3]]
    topo = Topology([2, 3, 2])
    assert topo.sibling_partition(2) == [[0, 2, 4], [1, 3, 5], [6, 8, 10], [7, 9, 11]]
    assert topo.group_index(2).tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]


@pytest.mark.parametrize("sizes, expected", [([2, 3, 2], [1, 2, 6, 12]), ([4, 2, 2, 2], [1, 4, 8, 16, 32]), ([5], [1, 5])])
def test_num_groups(sizes, expected):
    topo = Topology(sizes)
    assert [topo.num_groups(level) for level in range(topo.num_levels + 1)] == expected


@pytest.mark.parametrize("level", [-1, 4])
def test_num_groups_bad_level(level):
    with pytest.raises(ValueError, match="level"):
        Topology([2, 3, 2]).num_groups(level)


def test_group_methods_bad_level_and_rank():
    topo = Topology([2, 3, 2])
    with pytest.raises(ValueError, match="level"):
        topo.siblings(0, 0)
    with pytest.raises(ValueError, match="level"):
        topo.siblings(0, 4)
    with pytest.raises(ValueError, match="level"):
        topo.prefix_group(0, 4)
    with pytest.raises(ValueError, match="rank"):
        topo.prefix_group(12, 1)
    with pytest.raises(ValueError, match="rank"):
        topo.siblings(-1, 1)
    with pytest.raises(ValueError, match="level"):
        topo.sibling_partition(0)


# ---------------------------------------------------------------------------------------------- link levels
def test_link_level_table_hand_2x2():
    table = Topology([2, 2]).link_level_table
    assert table.dtype == torch.int64
    assert table.tolist() == [
        [0, 2, 1, 1],
        [2, 0, 1, 1],
        [1, 1, 0, 2],
        [1, 1, 2, 0],
    ]


def test_link_level_table_hand_2x3x2():
    topo = Topology([2, 3, 2])
    assert topo.link_level(0, 1) == 3
    assert topo.link_level(0, 2) == 2
    assert topo.link_level(0, 3) == 2
    assert topo.link_level(0, 6) == 1
    assert topo.link_level(5, 11) == 1
    assert topo.link_level(10, 11) == 3
    assert topo.link_level(8, 8) == 0


@pytest.mark.parametrize("sizes", [[4], [2, 2], [2, 3, 2], [4, 2, 2, 2]])
def test_link_level_table_symmetric_zero_diagonal_matches_coords(sizes):
    topo = Topology(sizes)
    t = topo.link_level_table
    G = topo.world_size
    assert t.shape == (G, G)
    assert torch.equal(t, t.t())
    assert torch.all(t.diagonal() == 0)
    for a in range(G):
        for b in range(G):
            ca, cb = _hand_coords(a, sizes), _hand_coords(b, sizes)
            diff = [i + 1 for i in range(len(sizes)) if ca[i] != cb[i]]
            assert int(t[a, b]) == (diff[0] if diff else 0)
            assert topo.link_level(a, b) == int(t[a, b])


def test_link_level_one_level():
    assert Topology([4]).link_level_table.tolist() == [[0, 1, 1, 1], [1, 0, 1, 1], [1, 1, 0, 1], [1, 1, 1, 0]]


def test_link_level_bad_rank():
    with pytest.raises(ValueError, match="rank"):
        Topology([2, 2]).link_level(0, 4)


# ---------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("text", ["2xx2", "", "   ", "abc", "-1", "2x-2", "x2", "2x", "2*2", "2.0x2", "2,2"])
def test_parse_bad_strings(text):
    with pytest.raises(ValueError) as ei:
        Topology.parse(text)
    msg = str(ei.value)
    assert repr(text) in msg or text in msg
    assert "x" in msg and ("2x2" in msg or "e.g." in msg)  # says what is allowed


@pytest.mark.parametrize("text, bad", [("0x4", "0"), ("4x0", "0"), ("0", "0")])
def test_parse_zero_size(text, bad):
    with pytest.raises(ValueError, match="positive") as ei:
        Topology.parse(text)
    assert bad in str(ei.value)


@pytest.mark.parametrize("sizes", [[0], [2, 0], [-1], [2, -3]])
def test_sizes_not_positive(sizes):
    with pytest.raises(ValueError, match="positive") as ei:
        Topology(sizes)
    assert str([s for s in sizes if s <= 0][0]) in str(ei.value)


def test_empty_sizes():
    with pytest.raises(ValueError, match="at least one"):
        Topology([])


@pytest.mark.parametrize("sizes, bad", [([2.0, 2], "2.0"), ([2, "2"], "'2'"), ([True, 2], "True"), ([2, False], "False"),
                                        ([None], "None")])
def test_sizes_non_int(sizes, bad):
    with pytest.raises(TypeError, match="int") as ei:
        Topology(sizes)
    assert bad in str(ei.value)


@pytest.mark.parametrize("sizes", ["2x2", 4, 2.5, None, {2: 2}, b"2x2"])
def test_sizes_wrong_container(sizes):
    with pytest.raises(TypeError, match="sequence"):
        Topology(sizes)


@pytest.mark.parametrize("value", [2.5, None, True, {"a": 1}, b"2x2"])
def test_parse_wrong_type(value):
    with pytest.raises(TypeError) as ei:
        Topology.parse(value)
    assert "topology" in str(ei.value)
