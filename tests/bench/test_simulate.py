"""``bench simulate``: its numbers are the cost model's (cost.model.predict called directly), the paper's table is
carried verbatim, the CLI's JSON and markdown, and errors naming the flag. Small configurations only (fast)."""

from __future__ import annotations

import argparse
import json

import pytest

from hiermoe_lightning.bench import simulate as sim
from hiermoe_lightning.cost.model import predict
from hiermoe_lightning.placement import Placement
from hiermoe_lightning.topology import Topology
from hiermoe_lightning.traces import generate_routing

SMALL = dict(hidden_size=64, bytes_per_elem=2, tokens_per_rank=64, routing="uniform", seed=3)


def parse(argv: list[str]) -> argparse.Namespace:
    return sim.add_arguments(argparse.ArgumentParser()).parse_args(argv)


def direct(topology: str, E: int, K: int, padded: bool = False, **kw):
    cfg = {**SMALL, **kw}
    topo = Topology.parse(topology)
    ids = generate_routing(cfg["routing"], topo.world_size, cfg["tokens_per_rank"], E, K, cfg["seed"])
    return ids, predict(topo, Placement.contiguous(E, topo.world_size), ids, cfg["hidden_size"],
                        cfg["bytes_per_elem"], "paper-a6000", padded=padded)


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("topology,E,K", [("2x2", 8, 2), ("2x2x2", 16, 4), ("1x4", 8, 3)])
def test_numbers_equal_predict(topology, E, K, padded):
    r = sim.simulate(topology, E, K, max_swaps=0, padded=padded, **SMALL)
    _, pred = direct(topology, E, K, padded)
    D = Topology.parse(topology).num_levels
    assert set(r["predicted_ms"]) == {"flat", "2dh", *(f"hd{d}" for d in range(1, D + 1)), "auto", "auto+swaps"}
    for name, d in pred.dispatch.items():
        assert r["predicted_ms"][name] == d.predicted_ms, name
    assert r["chosen"] == pred.chosen and r["predicted_ms"]["auto"] == pred.chosen_ms
    # no swaps: auto+swaps is auto on the same placement
    assert r["predicted_ms"]["auto+swaps"] == pred.chosen_ms and r["chosen_after_swaps"] == pred.chosen
    assert r["swaps"] == [] and r["moved_experts"] == 0
    flat = pred.dispatch["flat"].predicted_ms
    for name, ms in r["predicted_ms"].items():
        assert r["speedup_over_flat"][name] == pytest.approx(flat / ms)
    assert (r["topology"], r["num_experts"], r["top_k"], r["tokens_per_rank"], r["padded"]) == (
        topology, E, K, 64, padded)


def test_zipf_and_given_routing():
    r = sim.simulate("2x2", 8, 2, max_swaps=0, **{**SMALL, "routing": "zipf:1.2"})
    _, pred = direct("2x2", 8, 2, routing="zipf:1.2")
    assert r["routing"] == "zipf:1.2" and r["predicted_ms"]["flat"] == pred.dispatch["flat"].predicted_ms
    ids, pred = direct("2x2", 8, 2)
    r = sim.simulate("2x2", 8, 2, max_swaps=0, expert_ids=ids, hidden_size=64, bytes_per_elem=2)
    assert r["routing"] == "given" and r["predicted_ms"]["auto"] == pred.chosen_ms


def test_swaps_priced_by_predict():
    """auto+swaps = the chosen hd<d> of predict on the planner's placement; the planner's own numbers agree."""
    ids = generate_routing("zipf:1.2", 8, 64, 16, 4, 0)
    r = sim.simulate("2x2x2", 16, 4, max_swaps=3, expert_ids=ids, hidden_size=64, bytes_per_elem=2)
    topo = Topology.parse("2x2x2")
    after = Placement.from_ranks(r["placement_after"], 8)
    pred_after = predict(topo, after, ids, 64, 2, "paper-a6000")
    assert r["predicted_ms"]["auto+swaps"] == pytest.approx(pred_after.chosen_ms)
    assert r["chosen_after_swaps"] == pred_after.chosen
    assert r["planner_predicted_ms_after"] == pytest.approx(r["predicted_ms"]["auto+swaps"])
    assert r["planner_predicted_ms_before"] == pytest.approx(r["predicted_ms"]["auto"])
    assert 1 <= len(r["swaps"]) <= 3 and r["num_swaps"] == len(r["swaps"])
    assert r["moved_experts"] <= len({e for pair in r["swaps"] for e in pair})
    assert r["predicted_ms"]["auto+swaps"] <= r["predicted_ms"]["auto"] + 1e-9


def test_paper_table_verbatim():
    pts = sim.paper_points()
    assert [p["label"] for p in pts] == ["K=6", "K=8", "K=10", "E=64", "E=128", "E=256", "G=8", "G=16", "G=32"]
    assert {p["topology"] for p in pts if p["sweep"] == "G"} == {"1x8", "2x8", "4x2x2x2"}
    assert all((p["topology"], p["num_experts"], p["top_k"]) == ("4x2x2x2", 128, 8)
               for p in pts if p["label"] in ("K=8", "E=128", "G=32"))
    assert sim.PAPER_SPEEDUP["HD2"]["K=6"] == 0.95 and sim.PAPER_SPEEDUP["HD2"]["G=16"] == 1.71
    assert sim.PAPER_SPEEDUP["HD-auto (no swap)"]["G=8"] == 2.36
    assert sim.PAPER_SPEEDUP["HierMoE (with swap)"]["K=10"] == 2.10
    assert [p["label"] for p in sim.paper_points(["G"])] == ["G=8", "G=16", "G=32"]


def test_points_repeated_config_computed_once(monkeypatch):
    calls = []
    real = sim.simulate

    def counting(*a, **kw):
        calls.append(a)
        return real(*a, **kw)

    monkeypatch.setattr(sim, "simulate", counting)
    pts = [dict(sweep="K", label="K=8", topology="2x2", num_experts=8, top_k=2),
           dict(sweep="E", label="E=128", topology="2x2", num_experts=8, top_k=2)]
    rows = sim.simulate_points(pts, max_swaps=0, **SMALL)
    assert len(calls) == 1 and rows[0]["predicted_ms"] == rows[1]["predicted_ms"]
    assert rows[0]["paper"]["HD-auto (no swap)"] == 1.72 and rows[1]["label"] == "E=128"


def test_cli_json_paper_sweep(capsys):
    args = parse(["--sweep", "G", "--tokens-per-rank", "8", "--hidden-size", "64", "--max-swaps", "0", "--json"])
    assert sim.main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["config"]["link_costs"] == "paper-a6000" and report["config"]["routing"] == "uniform"
    assert [p["label"] for p in report["points"]] == ["G=8", "G=16", "G=32"]
    g8 = report["points"][0]
    ids = generate_routing("uniform", 8, 8, 128, 8, 0)
    pred = predict(Topology.parse("1x8"), Placement.contiguous(128, 8), ids, 64, 2, "paper-a6000")
    assert g8["predicted_ms"]["hd2"] == pytest.approx(pred.dispatch["hd2"].predicted_ms)
    assert g8["paper"] == {"HD2": 1.24, "HD-auto (no swap)": 2.36, "HierMoE (with swap)": 2.86}


def test_cli_markdown_and_custom_point(capsys):
    args = parse(["--point", "2x2:8:2", "--point", "2x2x2:16:4", "--tokens-per-rank", "16", "--max-swaps", "0",
                  "--padded", "--routing", "zipf:1"])
    assert sim.main(args) == 0
    out = capsys.readouterr().out
    assert "padded form" in out and "| HD2, ours (hd2, predicted) |" in out
    assert "paper (measured)" not in out  # custom points have no paper column
    assert "2x2x2:E=16:K=4" in out
    args = parse(["--sweep", "K", "--tokens-per-rank", "4", "--max-swaps", "0"])
    sim.main(args)
    out = capsys.readouterr().out
    assert "| HD-auto (no swap), paper (measured) | 1.37 | 1.72 | 1.82 |" in out


@pytest.mark.parametrize("argv,flag", [
    (["--routing", "trace:x.pt"], "--routing"),
    (["--routing", "normal"], "--routing"),
    (["--sweep", "K,X"], "--sweep"),
    (["--point", "2x2:8"], "--point"),
    (["--point", "2x2:7:2"], "point"),
    (["--dtype", "int8"], "--dtype"),
    (["--max-swaps", "-1"], "--max-swaps"),
    (["--tokens-per-rank", "0"], "--tokens-per-rank"),
    (["--link-costs", "nope"], "--link-costs"),
])
def test_errors_name_the_flag(argv, flag):
    with pytest.raises((ValueError, TypeError), match=flag):
        sim.build_report(parse([*argv, "--max-swaps", "0"] if "--max-swaps" not in argv else argv))
