"""Predicted times, the choice of d*, the padded form and the duplication rate, against hand arithmetic."""

from __future__ import annotations

import pytest
import torch

from hiermoe_lightning.cost.link_costs import LinkCosts
from hiermoe_lightning.cost.model import duplication_rate, expected_duplication_rate, predict
from hiermoe_lightning.placement.placement import Placement
from hiermoe_lightning.topology import Topology

# 2x2x2, expert e on rank e (rank = 4*c1 + 2*c2 + c3); only ranks 0 and 5 route a token (-1 = dropped pair).
# Busiest-rank rows per phase, counted by hand (see tests/cost/test_traffic.py for the full matrices):
#   flat a2a 4 | hd1 a2a 4 | 2dh inter1 3, inter2 2, intra2 1 | hd2 inter1 1, intra1 3 | hd3 inter1 1, inter2 1, intra2 1
TOPO = Topology([2, 2, 2])
PLACE = Placement.contiguous(8, 8)
IDS = torch.full((8, 1, 4), -1, dtype=torch.long)
IDS[0, 0] = torch.tensor([3, 5, 6, 7])
IDS[5, 0] = torch.tensor([0, 1, 4, -1])
HIDDEN, BPE = 5, 2  # 10 bytes per row
HAND_ROWS = {
    "flat": [("a2a", 4)],
    "2dh": [("inter1", 3), ("inter2", 2), ("intra2", 1)],
    "hd1": [("a2a", 4)],
    "hd2": [("inter1", 1), ("intra1", 3)],
    "hd3": [("inter1", 1), ("inter2", 1), ("intra2", 1)],
}
# level 1 slowest (1 ms/byte), level 2 0.1, level 3 0.01: a phase pays its slowest link.
BETAS = {"a2a": 1.0, "inter1": 1.0, "inter2": 0.1, "intra1": 0.1, "intra2": 0.01}


def costs(alphas: dict[str, float] | None = None, betas: dict[str, float] | None = None) -> LinkCosts:
    alphas, betas = alphas or {}, betas or BETAS
    return LinkCosts({k: (alphas.get(k, 0.0), betas.get(k, 0.0)) for k in BETAS}, name="test")


def test_phases_bytes_and_ms_by_hand():
    pred = predict(TOPO, PLACE, IDS, HIDDEN, BPE, costs())
    assert list(pred.dispatch) == ["flat", "2dh", "hd1", "hd2", "hd3"]
    for name, phases in HAND_ROWS.items():
        got = pred.dispatch[name]
        assert [(p.name, p.max_rank_bytes) for p in got.phases] == [(n, r * 10) for n, r in phases]
        for p, (n, r) in zip(got.phases, phases):
            assert p.ms == pytest.approx(BETAS[n] * r * 10)
    # hd1 40, hd2 10 + 3, hd3 10 + 1 + 0.1, flat 40, 2dh 30 + 2 + 0.1
    want = {"flat": 40.0, "2dh": 32.1, "hd1": 40.0, "hd2": 13.0, "hd3": 11.1}
    for name, ms in want.items():
        assert pred.dispatch[name].predicted_ms == pytest.approx(ms)
    assert pred.chosen == "hd3"  # slow level 1: the deepest wins


def test_choice_switches_where_the_arithmetic_says():
    # a huge start-up cost on every inter phase: hd1 (no inter phase) wins
    assert predict(TOPO, PLACE, IDS, HIDDEN, BPE, costs({"inter1": 1000.0, "inter2": 1000.0})).chosen == "hd1"
    # inter2 start-up 5 ms: hd3 = 16.1 > hd2 = 13
    assert predict(TOPO, PLACE, IDS, HIDDEN, BPE, costs({"inter2": 5.0})).chosen == "hd2"
    # ... and 1.8 ms: hd3 = 12.9 < 13
    assert predict(TOPO, PLACE, IDS, HIDDEN, BPE, costs({"inter2": 1.8})).chosen == "hd3"
    # a fast level 1 (a2a as cheap as a level-3 link): hd1 = 4 rows x 0.01 = 0.4 beats hd3 = 11.1
    cheap = dict(BETAS, a2a=0.01)
    assert predict(TOPO, PLACE, IDS, HIDDEN, BPE, costs(betas=cheap)).chosen == "hd1"


def test_auto_repeats_the_chosen():
    pred = predict(TOPO, PLACE, IDS, HIDDEN, BPE, costs(), dispatches=["flat", "auto"])
    assert list(pred.dispatch) == ["flat", "auto"] and pred.chosen == "hd3"
    assert pred.dispatch["auto"].predicted_ms == pytest.approx(11.1)
    assert [p.name for p in pred.dispatch["auto"].phases] == ["inter1", "inter2", "intra2"]


def test_ties_go_to_the_smaller_d():
    zero = LinkCosts({k: (0.0, 0.0) for k in BETAS})
    pred = predict(TOPO, PLACE, IDS, HIDDEN, BPE, zero)
    assert pred.chosen == "hd1"
    same = LinkCosts({k: (1.0, 0.0) for k in BETAS})  # hd1: 1 phase, others more
    assert predict(TOPO, PLACE, IDS, HIDDEN, BPE, same).chosen == "hd1"


def test_padded_form_by_hand():
    pred = predict(TOPO, PLACE, IDS, HIDDEN, BPE, costs(), padded=True)
    # n = group size x largest chunk (rows any rank sends to one other rank) x 10 bytes
    want = {
        "flat": [("a2a", 8 * 1)],
        "2dh": [("inter1", 2 * 3), ("inter2", 2 * 2), ("intra2", 2 * 1)],
        "hd2": [("inter1", 2 * 1), ("intra1", 4 * 1)],
        "hd3": [("inter1", 2 * 1), ("inter2", 2 * 1), ("intra2", 2 * 1)],
    }
    for name, phases in want.items():
        got = pred.dispatch[name].phases
        assert [(p.name, p.cost_bytes) for p in got] == [(n, r * 10) for n, r in phases]
        for p, (n, r) in zip(got, phases):
            assert p.ms == pytest.approx(BETAS[n] * r * 10)
    # the real busiest-rank bytes are still reported
    assert [p.max_rank_bytes for p in pred.dispatch["hd2"].phases] == [10, 30]
    js = pred.to_json_dict()
    assert js["hd2"]["phases"][1] == {"name": "intra1", "max_rank_bytes": 30, "ms": pytest.approx(4.0),
                                      "padded_bytes": 40}


def test_json_dict_keys_and_phase_names():
    pred = predict(Topology([4, 2, 2, 2]), Placement.contiguous(64, 32), torch.randint(0, 64, (32, 8, 1)), 16, 2,
                   "paper-a6000")
    js = pred.to_json_dict()
    assert list(js) == ["flat", "2dh", "hd1", "hd2", "hd3", "hd4"]
    names = {n: [p["name"] for p in d["phases"]] for n, d in js.items()}
    assert names == {
        "flat": ["a2a"],
        "2dh": ["inter1", "inter2", "inter3", "intra3"],
        "hd1": ["a2a"],
        "hd2": ["inter1", "intra1"],
        "hd3": ["inter1", "inter2", "intra2"],
        "hd4": ["inter1", "inter2", "inter3", "intra3"],
    }
    for d in js.values():
        assert set(d) == {"predicted_ms", "phases"}
        assert d["predicted_ms"] == pytest.approx(sum(p["ms"] for p in d["phases"]))
        for p in d["phases"]:
            assert set(p) == {"name", "max_rank_bytes", "ms"}
            assert isinstance(p["max_rank_bytes"], int)
    assert pred.chosen in {"hd1", "hd2", "hd3", "hd4"}
    assert pred.chosen == min(("hd1", "hd2", "hd3", "hd4"), key=lambda n: js[n]["predicted_ms"])


def test_one_level_topology_2dh_is_flat():
    topo = Topology([4])
    ids = torch.tensor([[[0, 1]], [[2, 3]], [[0, 3]], [[1, 2]]])
    pred = predict(topo, Placement.contiguous(4, 4), ids, 8, 4, "paper-a6000")
    js = pred.to_json_dict()
    assert list(js) == ["flat", "2dh", "hd1"] and js["2dh"] == js["flat"]
    # off-rank pairs: rank0 ->1; rank1 ->2,->3; rank2 ->0,->3; rank3 ->1,->2: busiest sends 2, receives 2
    assert js["flat"]["phases"][0]["max_rank_bytes"] == 2 * 32
    assert pred.chosen == "hd1"


def test_missing_phase_names_it():
    topo = Topology([2, 2, 2, 2, 2])  # needs inter4 / intra4, paper-a6000 covers 4 levels
    ids = torch.randint(0, 32, (32, 2, 1))
    with pytest.raises(ValueError, match="inter4"):
        predict(topo, Placement.contiguous(32, 32), ids, 8, 2, "paper-a6000")
    # only a few dispatches asked: the choice still needs every hd<d>
    with pytest.raises(ValueError, match="intra4|inter4"):
        predict(topo, Placement.contiguous(32, 32), ids, 8, 2, "paper-a6000", dispatches=["flat"])


def test_bad_arguments():
    with pytest.raises(ValueError, match="hidden_size"):
        predict(TOPO, PLACE, IDS, 0, 2, costs())
    with pytest.raises(ValueError, match="dispatch"):
        predict(TOPO, PLACE, IDS, 4, 2, costs(), dispatches=["hd9"])
    with pytest.raises(ValueError, match="preset"):
        predict(TOPO, PLACE, IDS, 4, 2, "no-such-preset")


# --------------------------------------------------------------------------- duplication rate
PAPER_TABLE = {  # R groups -> {K: measured duplication rate in %}, E = 128, uniform routing
    32: {2: 2, 4: 4, 6: 7, 8: 9},
    16: {2: 3, 4: 9, 6: 14, 8: 18},
    8: {2: 6, 4: 17, 6: 27, 8: 34},
    4: {2: 12, 4: 32, 6: 46, 8: 55},
}


def test_duplication_rate_by_hand():
    assert duplication_rate(torch.tensor([[0, 1, 2, 3]]), 8, 2) == pytest.approx(0.75)  # 4 rows, 1 group
    assert duplication_rate(torch.tensor([[0, 4, -1]]), 8, 2) == pytest.approx(0.0)  # 2 rows, 2 groups
    assert duplication_rate(torch.tensor([[0, 1, 4], [5, 6, 7]]), 8, 2) == pytest.approx(1 - 3 / 6)


@pytest.mark.parametrize("R", sorted(PAPER_TABLE))
def test_paper_duplication_table(R):
    g = torch.Generator().manual_seed(R)
    for K, pct in PAPER_TABLE[R].items():
        ids = torch.rand(20000, 128, generator=g).topk(K, dim=1).indices  # uniform K-subsets of 128 experts
        assert abs(100 * duplication_rate(ids, 128, R) - pct) <= 2.0, (R, K)
        assert abs(100 * expected_duplication_rate(128, R, K) - pct) <= 2.0, (R, K)
