"""``Phase``: a str with a parsed kind and level; its helpers against hand values on 2x2 and 2x2x2."""

from __future__ import annotations

import copy
import json
import pickle

import pytest
import torch

from hiermoe_lightning.dispatch.spec import (
    DispatchSpec,
    Phase,
    all_phases,
    level_key,
    parse_dispatch,
    parse_level_key,
    phase_groups,
    phase_next_rank,
    phase_peer_index,
)
from hiermoe_lightning.topology import Topology

ALLOWED = "'a2a', 'inter<i>', 'intra<i>' (i >= 1)"


@pytest.mark.parametrize("kind, level, name", [("a2a", 0, "a2a"), ("inter", 1, "inter1"), ("intra", 1, "intra1"),
                                                ("inter", 12, "inter12")])
def test_construction_and_parse_round_trip(kind, level, name):
    p = Phase(kind, level) if kind != "a2a" else Phase("a2a")
    assert (p.kind, p.level) == (kind, level)
    assert isinstance(p, str) and p == name and str(p) == name and type(str(p)) is str
    assert f"{p}" == name and repr(p) == repr(name)
    q = Phase.parse(name)
    assert type(q) is Phase and q == p and (q.kind, q.level) == (kind, level)
    assert Phase.parse(p) is p
    assert Phase.parse(str(p)) == p


def test_equal_and_hash_as_the_string():
    p = Phase("inter", 1)
    assert p == "inter1" and "inter1" == p and p != "inter2" and p != Phase("intra", 1)
    assert hash(p) == hash("inter1")
    assert {"inter1": 3}[p] == 3 and {p: 4}["inter1"] == 4
    assert ("inter1", "intra1") == (Phase("inter", 1), Phase("intra", 1))
    assert json.dumps({p: p}) == '{"inter1": "inter1"}'


def test_immutable_and_copyable():
    p = Phase("intra", 2)
    with pytest.raises(AttributeError):
        p.kind = "inter"
    with pytest.raises(AttributeError):
        p.level = 3
    with pytest.raises(AttributeError):
        p.extra = 1
    for q in (pickle.loads(pickle.dumps(p)), copy.copy(p), copy.deepcopy(p)):
        assert type(q) is Phase and q == p and (q.kind, q.level) == ("intra", 2)


@pytest.mark.parametrize("bad", ["inter0", "intra", "inter", "a2a1", "Inter1", "inter01", "x", "", " inter1",
                                 "level1", None, 1])
def test_parse_bad_names_the_phase_and_the_allowed_forms(bad):
    with pytest.raises(ValueError) as e:
        Phase.parse(bad)
    assert repr(bad) in str(e.value) and ALLOWED in str(e.value)


def test_constructor_checks():
    with pytest.raises(ValueError, match="Phase.parse"):
        Phase("inter1")
    with pytest.raises(ValueError, match="level >= 1"):
        Phase("inter", 0)
    with pytest.raises(ValueError, match="level >= 1"):
        Phase("intra")
    with pytest.raises(ValueError, match="level 0"):
        Phase("a2a", 1)
    with pytest.raises(TypeError):
        Phase("inter", True)
    with pytest.raises(TypeError):
        Phase("inter", 1.0)


def test_parse_dispatch_builds_phases():
    for D in (1, 2, 3):
        for name in ("flat", "2dh", *[f"hd{d}" for d in range(1, D + 1)]):
            assert all(type(p) is Phase for p in parse_dispatch(name, D).phases)
    assert parse_dispatch("hd2", 2).phases == ("inter1", "intra1")
    assert parse_dispatch("hd3", 3).phases == ("inter1", "inter2", "intra2")
    # a spec built from plain names holds Phases too; a bad name is refused
    spec = DispatchSpec("x", ("inter1", "intra1"), True)
    assert [(p.kind, p.level) for p in spec.phases] == [("inter", 1), ("intra", 1)]
    with pytest.raises(ValueError, match="inter0"):
        DispatchSpec("x", ("inter0",), True)


def test_sort_key():
    names = ["intra2", "a2a", "inter2", "intra1", "inter1", "inter10"]
    assert sorted(names, key=lambda n: Phase.parse(n).sort_key) == ["a2a", "inter1", "inter2", "inter10",
                                                                    "intra1", "intra2"]
    assert Phase("a2a").sort_key == (0, 0) and Phase("inter", 3).sort_key == (1, 3)
    assert Phase("intra", 1).sort_key == (2, 1)


def test_all_phases():
    assert all_phases(1) == ("a2a",)
    assert all_phases(2) == ("a2a", "inter1", "intra1")
    assert all_phases(3) == ("a2a", "inter1", "inter2", "intra1", "intra2")
    assert all(type(p) is Phase for p in all_phases(3))
    assert list(all_phases(4)) == sorted(all_phases(4), key=lambda p: p.sort_key)
    # every phase of every dispatch on the topology is one of them
    for D in (1, 2, 3):
        for name in ("flat", "2dh", *[f"hd{d}" for d in range(1, D + 1)]):
            assert set(parse_dispatch(name, D).phases) <= set(all_phases(D))


def test_expert_group_level_by_hand():
    # the level of the expert's group that decides a pair's next rank: i for inter{i}, D for a2a and intra{i}
    assert Phase("a2a").expert_group_level(2) == 2
    assert Phase("inter", 1).expert_group_level(2) == 1
    assert Phase("intra", 1).expert_group_level(2) == 2
    assert Phase("inter", 2).expert_group_level(3) == 2
    assert Phase("intra", 1).expert_group_level(3) == 3
    # a spec's: the deepest level phases 0 .. index read
    # 2x2: hd2 = inter1, intra1
    assert [parse_dispatch("hd2", 2).expert_group_level(i, 2) for i in range(2)] == [1, 2]
    assert parse_dispatch("flat", 2).expert_group_level(0, 2) == 2
    # 2x2x2: hd3 = inter1, inter2, intra2; hd2 = inter1, intra1
    assert [parse_dispatch("hd3", 3).expert_group_level(i, 3) for i in range(3)] == [1, 2, 3]
    assert [parse_dispatch("2dh", 3).expert_group_level(i, 3) for i in range(3)] == [1, 2, 3]
    assert [parse_dispatch("hd2", 3).expert_group_level(i, 3) for i in range(2)] == [1, 3]


def test_level_key_round_trip():
    assert [level_key(i) for i in (1, 2, 10)] == ["level1", "level2", "level10"]
    assert [parse_level_key(level_key(i)) for i in (1, 2, 10)] == [1, 2, 10]
    assert sorted(["level10", "level2", "level1"], key=parse_level_key) == ["level1", "level2", "level10"]
    for bad in ("level0", "level", "Level1", "inter1", "level1 ", None):
        with pytest.raises(ValueError, match="level<L>"):
            parse_level_key(bad)
    for bad in (0, -1, True, 1.0, "1"):
        with pytest.raises(ValueError, match=">= 1"):
            level_key(bad)


# 2x2: rank = 2 * c1 + c2.  2x2x2: rank = 4 * c1 + 2 * c2 + c3.
@pytest.mark.parametrize("sizes, phase, groups", [
    ([2, 2], "a2a", [[0, 1, 2, 3]]),
    ([2, 2], "inter1", [[0, 2], [1, 3]]),
    ([2, 2], "intra1", [[0, 1], [2, 3]]),
    ([2, 2, 2], "inter1", [[0, 4], [1, 5], [2, 6], [3, 7]]),
    ([2, 2, 2], "inter2", [[0, 2], [1, 3], [4, 6], [5, 7]]),
    ([2, 2, 2], "intra1", [[0, 1, 2, 3], [4, 5, 6, 7]]),
    ([2, 2, 2], "intra2", [[0, 1], [2, 3], [4, 5], [6, 7]]),
])
def test_phase_groups_str_or_phase(sizes, phase, groups):
    t = Topology(sizes)
    assert phase_groups(t, phase) == groups
    assert phase_groups(t, Phase.parse(phase)) == groups


def test_next_rank_and_peer_index_by_hand():
    t = Topology([2, 2, 2])
    cur = torch.tensor([1, 6, 3])  # (0,0,1) (1,1,0) (0,1,1)
    exp = torch.tensor([6, 1, 4])  # (1,1,0) (0,0,1) (1,0,0)
    for phase, want in [("inter1", [5, 2, 7]), ("inter2", [3, 4, 1]), ("intra2", [6, 1, 4]), ("a2a", [6, 1, 4])]:
        for p in (phase, Phase.parse(phase)):
            assert phase_next_rank(t, p, cur, exp).tolist() == want
    ranks = torch.arange(8)
    assert phase_peer_index(t, "inter1", ranks).tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert phase_peer_index(t, Phase("inter", 2), ranks).tolist() == [0, 0, 1, 1, 0, 0, 1, 1]
    assert phase_peer_index(t, Phase("intra", 1), ranks).tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    assert phase_peer_index(t, "intra2", ranks).tolist() == [0, 1, 0, 1, 0, 1, 0, 1]
    assert phase_peer_index(t, Phase("a2a"), ranks).tolist() == list(range(8))
    with pytest.raises(ValueError, match="inter0"):
        phase_groups(t, "inter0")
