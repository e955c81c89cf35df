"""Row counts per phase of every dispatch: hand counts on tiny routings and a naive per-token reference."""

from __future__ import annotations

import pytest
import torch

from hiermoe_lightning.cost.traffic import (
    bytes_by_level,
    lower_bound_level1_bytes,
    max_pair_rows,
    max_rank_bytes,
    phase_rows,
)
from hiermoe_lightning.dispatch.spec import dispatch_names, parse_dispatch
from hiermoe_lightning.placement.placement import Placement
from hiermoe_lightning.topology import Topology

RB = 10  # bytes per row in the hand cases


def matrix(G: int, entries: dict[tuple[int, int], int]) -> torch.Tensor:
    """A ``[G, G]`` int64 matrix from ``{(a, b): rows}``."""
    m = torch.zeros(G, G, dtype=torch.long)
    for (a, b), v in entries.items():
        m[a, b] = v
    return m


def rows_of(topology: Topology, placement: Placement, ids: torch.Tensor, name: str) -> dict[str, torch.Tensor]:
    spec = parse_dispatch(name, topology.num_levels)
    phases = phase_rows(topology, placement, ids, spec)
    assert [p.name for p in phases] == list(spec.phases)
    return {p.name: p.rows for p in phases}


# --------------------------------------------------------------------------- hand case 1: 2x2, E=8, K=4
# rank r holds experts 2r, 2r+1; rank = 2*c1 + c2. -1 = dropped pair (a token of only -1 sends nothing).
IDS_2X2 = torch.tensor(
    [
        [[0, 1, 2, 6], [4, 5, 7, -1]],  # rank 0: expert ranks [0,0,1,3] and [2,2,3]
        [[0, 3, 5, 6], [-1, -1, -1, -1]],  # rank 1: expert ranks [0,1,2,3]
        [[2, 3, -1, -1], [-1, -1, -1, -1]],  # rank 2: expert ranks [1,1]
        [[6, 7, 4, 0], [-1, -1, -1, -1]],  # rank 3: expert ranks [3,3,2,0]
    ]
)
T22 = Topology([2, 2])
P22 = Placement.contiguous(8, 4)

HAND_2X2 = {
    "flat": {"a2a": [[2, 1, 2, 2], [1, 1, 1, 1], [0, 2, 0, 0], [1, 0, 1, 2]]},
    "hd1": {"a2a": [[1, 1, 1, 2], [1, 1, 1, 1], [0, 1, 0, 0], [1, 0, 1, 1]]},
    "2dh": {
        "inter1": [[3, 0, 4, 0], [0, 2, 0, 2], [2, 0, 0, 0], [0, 1, 0, 3]],
        "intra1": [[2, 3, 0, 0], [2, 1, 0, 0], [0, 0, 2, 2], [0, 0, 2, 3]],
    },
    "hd2": {
        "inter1": [[1, 0, 2, 0], [0, 1, 0, 1], [1, 0, 0, 0], [0, 1, 0, 1]],
        "intra1": [[1, 2, 0, 0], [2, 1, 0, 0], [0, 0, 1, 2], [0, 0, 2, 2]],
    },
}


@pytest.mark.parametrize("name", ["flat", "hd1", "2dh", "hd2"])
def test_hand_counts_2x2(name):
    got = rows_of(T22, P22, IDS_2X2, name)
    assert set(got) == set(HAND_2X2[name])
    for phase, want in HAND_2X2[name].items():
        assert torch.equal(got[phase], torch.tensor(want)), (name, phase, got[phase])


def test_max_rank_bytes_2x2_by_hand():
    # busiest rank, max(sent, received), diagonal excluded
    want = {("flat", "a2a"): 5, ("hd1", "a2a"): 4, ("2dh", "inter1"): 4, ("2dh", "intra1"): 3,
            ("hd2", "inter1"): 2, ("hd2", "intra1"): 2}
    for (name, phase), rows in want.items():
        assert max_rank_bytes(torch.tensor(HAND_2X2[name][phase]), RB) == rows * RB
    # receiving can be the busiest side: rank 2 receives 3, sends 1
    m = matrix(4, {(0, 2): 1, (1, 2): 1, (3, 2): 1, (2, 0): 1, (2, 2): 7})
    assert max_rank_bytes(m, 1) == 3
    assert max_pair_rows(torch.tensor(HAND_2X2["flat"]["a2a"])) == 2


def test_bytes_by_level_and_lower_bound_2x2_by_hand():
    hd2 = phase_rows(T22, P22, IDS_2X2, parse_dispatch("hd2", 2))
    # inter1 crosses nodes: 0->2 (2 rows), 1->3, 2->0, 3->1; intra1 off-rank rows: 2+2+2+2
    assert bytes_by_level(T22, hd2, RB) == {"level1": 2 * 5 * RB, "level2": 2 * 8 * RB}
    # every token reaches exactly one other node
    assert lower_bound_level1_bytes(T22, P22, IDS_2X2, RB) == 2 * 5 * RB
    flat = phase_rows(T22, P22, IDS_2X2, parse_dispatch("flat", 2))
    # flat: 12 off-rank (token, expert) pairs: level1 = 0->2 x2, 0->3 x2, 1->2, 1->3, 2->1 x2, 3->0 = 9
    assert bytes_by_level(T22, flat, RB) == {"level1": 2 * 9 * RB, "level2": 2 * 3 * RB}


# --------------------------------------------------------------------------- hand case 2: 2x2x2, E=8 (expert e on rank e)
# rank = 4*c1 + 2*c2 + c3; only ranks 0 and 5 route a token.
IDS_222 = torch.full((8, 1, 4), -1, dtype=torch.long)
IDS_222[0, 0] = torch.tensor([3, 5, 6, 7])
IDS_222[5, 0] = torch.tensor([0, 1, 4, -1])
T222 = Topology([2, 2, 2])
P222 = Placement.contiguous(8, 8)

HAND_222 = {
    "flat": {"a2a": {(0, 3): 1, (0, 5): 1, (0, 6): 1, (0, 7): 1, (5, 0): 1, (5, 1): 1, (5, 4): 1}},
    "hd1": {"a2a": {(0, 3): 1, (0, 5): 1, (0, 6): 1, (0, 7): 1, (5, 0): 1, (5, 1): 1, (5, 4): 1}},
    "2dh": {
        "inter1": {(0, 0): 1, (0, 4): 3, (5, 1): 2, (5, 5): 1},
        "inter2": {(0, 2): 1, (4, 4): 1, (4, 6): 2, (1, 1): 2, (5, 5): 1},
        "intra2": {(2, 3): 1, (4, 5): 1, (6, 6): 1, (6, 7): 1, (1, 0): 1, (1, 1): 1, (5, 4): 1},
    },
    "hd2": {
        "inter1": {(0, 0): 1, (0, 4): 1, (5, 1): 1, (5, 5): 1},
        "intra1": {(0, 3): 1, (4, 5): 1, (4, 6): 1, (4, 7): 1, (1, 0): 1, (1, 1): 1, (5, 4): 1},
    },
    "hd3": {
        "inter1": {(0, 0): 1, (0, 4): 1, (5, 1): 1, (5, 5): 1},
        "inter2": {(0, 2): 1, (4, 4): 1, (4, 6): 1, (1, 1): 1, (5, 5): 1},
        "intra2": {(2, 3): 1, (4, 5): 1, (6, 6): 1, (6, 7): 1, (1, 0): 1, (1, 1): 1, (5, 4): 1},
    },
}


@pytest.mark.parametrize("name", ["flat", "hd1", "2dh", "hd2", "hd3"])
def test_hand_counts_2x2x2(name):
    got = rows_of(T222, P222, IDS_222, name)
    assert set(got) == set(HAND_222[name])
    for phase, want in HAND_222[name].items():
        assert torch.equal(got[phase], matrix(8, want)), (name, phase, got[phase])


def test_levels_2x2x2_by_hand():
    hd3 = phase_rows(T222, P222, IDS_222, parse_dispatch("hd3", 3))
    # level1: 0->4, 5->1; level2: 0->2, 4->6; level3: 2->3, 4->5, 6->7, 1->0, 5->4
    assert bytes_by_level(T222, hd3, RB) == {"level1": 2 * 2 * RB, "level2": 2 * 2 * RB, "level3": 2 * 5 * RB}
    assert lower_bound_level1_bytes(T222, P222, IDS_222, RB) == 2 * 2 * RB
    none = phase_rows(T222, P222, torch.full((8, 2, 3), -1), parse_dispatch("hd3", 3))
    assert bytes_by_level(T222, none, RB) == {"level1": 0, "level2": 0, "level3": 0}


# --------------------------------------------------------------------------- naive reference, random routings
def naive_next(topology: Topology, phase: str, cur: int, expert_rank: int) -> int:
    """Next rank of a pair, written from the docs with Topology.coords/rank_of only."""
    if phase == "a2a" or phase.startswith("intra"):
        return expert_rank
    level = int(phase[len("inter"):])
    c = list(topology.coords(cur))
    c[level - 1] = topology.coords(expert_rank)[level - 1]
    return topology.rank_of(c)


def naive_rows(topology: Topology, expert_to_rank: list[int], ids: list, phases, dedup: bool) -> list[list[list[int]]]:
    """Per-token loop: a copy = (rank, experts it serves); it travels once per distinct next rank (dedup) or per pair."""
    G = topology.world_size
    mats = [[[0] * G for _ in range(G)] for _ in phases]
    for s, tokens in enumerate(ids):
        for experts in tokens:
            experts = [e for e in experts if e >= 0]
            if not experts:
                continue
            if dedup:
                copies = {s: experts}
                for i, phase in enumerate(phases):
                    moved: dict[int, list[int]] = {}
                    for rank, served in copies.items():
                        dests: dict[int, list[int]] = {}
                        for e in served:
                            dests.setdefault(naive_next(topology, phase, rank, expert_to_rank[e]), []).append(e)
                        for d, es in dests.items():
                            mats[i][rank][d] += 1
                            assert d not in moved  # copies of one token never meet
                            moved[d] = es
                    copies = moved
            else:
                for e in experts:
                    rank = s
                    for i, phase in enumerate(phases):
                        d = naive_next(topology, phase, rank, expert_to_rank[e])
                        mats[i][rank][d] += 1
                        rank = d
    return mats


def naive_level(topology: Topology, a: int, b: int) -> int:
    ca, cb = topology.coords(a), topology.coords(b)
    return next((i + 1 for i, (x, y) in enumerate(zip(ca, cb)) if x != y), 0)


def random_case(sizes, experts_per_rank, tokens, top_k, seed):
    g = torch.Generator().manual_seed(seed)
    topology = Topology(sizes)
    G = topology.world_size
    E = G * experts_per_rank
    placement = Placement.from_ranks(torch.randperm(E, generator=g) % G, G)
    ids = torch.stack([torch.randperm(E, generator=g)[:top_k] for _ in range(G * tokens)]).reshape(G, tokens, top_k)
    drop = torch.rand(ids.shape, generator=g) < 0.15
    ids = torch.where(drop, torch.full_like(ids, -1), ids)
    return topology, placement, ids


CASES = [([4], 2, 5, 3, 0), ([2, 2], 2, 6, 4, 1), ([2, 3], 1, 5, 4, 2), ([2, 2, 2], 2, 4, 5, 3),
         ([3, 2, 2], 1, 3, 6, 4), ([2, 1, 2, 2], 2, 3, 4, 5)]


@pytest.mark.parametrize("sizes,per,tokens,top_k,seed", CASES)
def test_matches_naive_reference(sizes, per, tokens, top_k, seed):
    topology, placement, ids = random_case(sizes, per, tokens, top_k, seed)
    e2r = placement.expert_to_rank.tolist()
    for name in dispatch_names(topology.num_levels):
        spec = parse_dispatch(name, topology.num_levels)
        got = phase_rows(topology, placement, ids, spec)
        want = naive_rows(topology, e2r, ids.tolist(), spec.phases, spec.dedup)
        for p, w in zip(got, want):
            assert torch.equal(p.rows, torch.tensor(w)), (sizes, name, p.name)


@pytest.mark.parametrize("sizes,per,tokens,top_k,seed", CASES)
def test_levels_flat_2dh_hd_against_naive_counts(sizes, per, tokens, top_k, seed):
    topology, placement, ids = random_case(sizes, per, tokens, top_k, seed)
    G, D, rb = topology.world_size, topology.num_levels, 6
    e2r = placement.expert_to_rank.tolist()
    group1 = [topology.coords(r)[0] for r in range(G)]
    # one row per off-rank (token, expert) pair, by link level; distinct (token, other node) for the bound
    pair_levels = {f"level{L}": 0 for L in range(1, D + 1)}
    bound = 0
    for s in range(G):
        for experts in ids[s].tolist():
            experts = [e for e in experts if e >= 0]
            for e in experts:
                if e2r[e] != s:
                    pair_levels[f"level{naive_level(topology, s, e2r[e])}"] += 2 * rb
            bound += len({group1[e2r[e]] for e in experts} - {group1[s]})
    assert lower_bound_level1_bytes(topology, placement, ids, rb) == 2 * rb * bound
    flat = bytes_by_level(topology, phase_rows(topology, placement, ids, parse_dispatch("flat", D)), rb)
    assert flat == pair_levels
    valid_pairs = int((ids >= 0).sum())
    tdh_phases = phase_rows(topology, placement, ids, parse_dispatch("2dh", D))
    assert all(int(p.rows.sum()) == valid_pairs for p in tdh_phases)  # one row per pair in every phase
    tdh = bytes_by_level(topology, tdh_phases, rb)
    if D == 1:
        assert tdh == pair_levels
    else:  # 2dh hops node-first, so every off-node pair crosses level 1 exactly once
        assert tdh["level1"] == pair_levels["level1"]
    hd1 = bytes_by_level(topology, phase_rows(topology, placement, ids, parse_dispatch("hd1", D)), rb)
    assert hd1["level1"] >= 2 * rb * bound
    for d in range(2, D + 1):
        hd = bytes_by_level(topology, phase_rows(topology, placement, ids, parse_dispatch(f"hd{d}", D)), rb)
        assert hd["level1"] == 2 * rb * bound, (sizes, d)


def test_bytes_by_level_against_naive_levels():
    topology, placement, ids = random_case([2, 2, 2], 2, 6, 4, 9)
    for name in dispatch_names(3):
        spec = parse_dispatch(name, 3)
        got = bytes_by_level(topology, phase_rows(topology, placement, ids, spec), 3)
        want = {f"level{L}": 0 for L in (1, 2, 3)}
        for m in naive_rows(topology, placement.expert_to_rank.tolist(), ids.tolist(), spec.phases, spec.dedup):
            for a in range(8):
                for b in range(8):
                    if a != b:
                        want[f"level{naive_level(topology, a, b)}"] += 2 * 3 * m[a][b]
        assert got == want, name


def test_bad_expert_ids_raise():
    with pytest.raises(ValueError, match="world_size=4"):
        phase_rows(T22, P22, torch.zeros(3, 2, 2, dtype=torch.long), parse_dispatch("flat", 2))
    with pytest.raises(ValueError, match="-1 .. 7"):
        phase_rows(T22, P22, torch.full((4, 2, 2), 8), parse_dispatch("flat", 2))
    with pytest.raises(TypeError, match="integer"):
        phase_rows(T22, P22, torch.zeros(4, 2, 2), parse_dispatch("flat", 2))
