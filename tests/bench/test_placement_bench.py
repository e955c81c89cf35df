"""``bench placement``: the clusters routing, the measures, traces, and the comparison of the swap planner with no swap,
EPLB-style packing and SmartMoE-style greedy (priced by cost.model.predict). Small configurations only (fast)."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

from hiermoe_lightning.bench import placement as pb
from hiermoe_lightning.cost.model import predict
from hiermoe_lightning.placement import Placement
from hiermoe_lightning.topology import Topology
from hiermoe_lightning.traces import check_trace, generate_routing

SMALL = ["--topology", "2x2x2", "--num-experts", "16", "--top-k", "4", "--hidden-size", "64",
         "--tokens-per-rank", "64", "--max-swaps", "4"]


def parse(argv: list[str]) -> argparse.Namespace:
    return pb.add_arguments(argparse.ArgumentParser()).parse_args(argv)


# ------------------------------------------------------------------------------------------------ clusters routing
def test_clusters_shape_distinct_deterministic():
    ids = pb.generate_clusters(4, 8, 128, 32, 8, seed=1)
    assert ids.shape == (8, 128, 8) and ids.dtype == torch.long
    check_trace(ids, 32)  # in range, no expert twice in a token
    assert torch.equal(ids, pb.generate_clusters(4, 8, 128, 32, 8, seed=1))
    assert not torch.equal(ids, pb.generate_clusters(4, 8, 128, 32, 8, seed=2))


@pytest.mark.parametrize("C,F,K", [(4, 0.75, 8), (8, 1.0, 4), (2, 0.5, 6)])
def test_clusters_most_experts_from_one_cluster(C, F, K):
    E = 32
    ids = pb.generate_clusters(C, 4, 256, E, K, seed=0, in_cluster=F)
    cluster_of = pb.cluster_assignment(E, C, seed=0)
    assert torch.bincount(cluster_of, minlength=C).tolist() == [E // C] * C
    per_cluster = torch.zeros(ids.shape[0] * ids.shape[1], C, dtype=torch.long)
    per_cluster.scatter_add_(1, cluster_of[ids.reshape(-1, K)], torch.ones(ids.shape[0] * ids.shape[1], K,
                                                                          dtype=torch.long))
    k_in = min(max(1, round(F * K)), E // C)
    assert bool((per_cluster.max(dim=1).values >= k_in).all())
    # clusters are not contiguous id blocks (the contiguous placement must not already group them)
    assert not torch.equal(cluster_of, torch.arange(E) // (E // C))


def test_clusters_errors_and_parse():
    assert pb.parse_clusters("clusters:8") == (8, 0.75) and pb.parse_clusters("clusters:4:0.9") == (4, 0.9)
    for bad in ("clusters:", "clusters:x", "clusters:0", "clusters:4:0", "clusters:4:1.5", "clusters:4:0.5:1"):
        with pytest.raises(ValueError, match="clusters"):
            pb.parse_clusters(bad)
    with pytest.raises(ValueError, match="clusters"):
        pb.generate_clusters(64, 1, 4, 32, 2)  # more clusters than experts
    with pytest.raises(ValueError, match="outside"):
        pb.generate_clusters(1, 1, 4, 8, 8, in_cluster=0.5)  # one cluster = all experts, nothing outside


# ------------------------------------------------------------------------------------------------ measures, routings
def test_expert_load_and_imbalance():
    ids = torch.tensor([[[0, 1], [0, 2]], [[0, -1], [3, 1]]])  # G=2, T=2, K=2
    assert pb.expert_load(ids, 4).tolist() == [3, 2, 1, 1]
    assert pb.load_imbalance(ids, Placement.contiguous(4, 2)) == pytest.approx(5 / 3.5)
    assert pb.load_imbalance(ids, Placement.from_ranks([0, 1, 1, 0], 2)) == pytest.approx(4 / 3.5)


@pytest.mark.parametrize("ext", ["pt", "npy"])
def test_trace_routing(tmp_path, ext):
    ids = generate_routing("zipf:1", 4, 16, 8, 2, 5)
    path = tmp_path / f"t.{ext}"
    torch.save(ids, path) if ext == "pt" else np.save(path, ids.numpy())
    topo = Topology.parse("2x2")
    got = pb.resolve_routing(f"trace:{path}", topo, 8, None, None)
    assert torch.equal(got, ids)
    with pytest.raises(ValueError, match="--top-k"):
        pb.resolve_routing(f"trace:{path}", topo, 8, 3, None)
    with pytest.raises(ValueError, match="world size"):
        pb.resolve_routing(f"trace:{path}", Topology.parse("2x4"), 8, None, None)
    with pytest.raises(ValueError, match="--routing"):
        pb.resolve_routing("trace:/nonexistent.pt", topo, 8, None, None)
    with pytest.raises(ValueError, match="--routing"):
        pb.resolve_routing("gauss", topo, 8, None, None)


def test_generated_routings_match_traces_module():
    topo = Topology.parse("2x2")
    assert torch.equal(pb.resolve_routing("zipf:1.2", topo, 8, 2, 16, seed=4), generate_routing("zipf:1.2", 4, 16, 8, 2, 4))
    assert torch.equal(pb.resolve_routing("clusters:2", topo, 8, 2, 16, seed=4), pb.generate_clusters(2, 4, 16, 8, 2, 4))


# ------------------------------------------------------------------------------------------------ comparison
def test_no_swap_equals_predict():
    topo = Topology.parse("2x2x2")
    ids = generate_routing("zipf:1.2", 8, 64, 16, 4, 0)
    r = pb.compare_placements(ids, topo, 16, "paper-a6000", 64, 2, methods=["none"])["none"]
    pred = predict(topo, Placement.contiguous(16, 8), ids, 64, 2, "paper-a6000")
    assert r["predicted_ms"] == pred.chosen_ms and r["chosen"] == pred.chosen
    assert r["flat_ms"] == pred.dispatch["flat"].predicted_ms
    assert r["predicted_ms_by_hd"] == {n: pred.dispatch[n].predicted_ms for n in ("hd1", "hd2", "hd3")}
    assert r["moved_experts"] == 0 and r["speedup_vs_none"] == 1.0
    assert r["placement"] == Placement.contiguous(16, 8).to_list()


@pytest.fixture(scope="module")
def clusters_report():
    return pb.build_report(parse([*SMALL, "--routing", "clusters:4", "--json"]))


def test_planner_not_worse_than_no_swap(clusters_report):
    m = clusters_report["methods"]
    assert list(m) == list(pb.METHODS)
    assert m["hiermoe"]["predicted_ms"] <= m["none"]["predicted_ms"] + 1e-9
    assert 0 < len(m["hiermoe"]["swaps"]) <= 4
    assert m["hiermoe"]["moved_experts"] <= 2 * len(m["hiermoe"]["swaps"])


@pytest.mark.parametrize("routing", ["zipf:1.2", "uniform"])
def test_planner_not_worse_on_generated(routing):
    ids = generate_routing(routing, 4, 64, 8, 2, 1)
    r = pb.compare_placements(ids, "2x2", 8, "paper-a6000", 64, 2, max_swaps=3, methods=["none", "hiermoe"])
    assert r["hiermoe"]["predicted_ms"] <= r["none"]["predicted_ms"] + 1e-9


def test_baselines_valid_placements(clusters_report):
    E, G = 16, 8
    for name in ("eplb", "smartmoe", "hiermoe"):
        ranks = clusters_report["methods"][name]["placement"]
        Placement.from_ranks(ranks, G)  # validates: every rank holds exactly E / G experts
        assert sorted(torch.bincount(torch.tensor(ranks), minlength=G).tolist()) == [E // G] * G, name


def test_eplb_balances_zipf_load():
    ids = generate_routing("zipf:1.2", 8, 64, 16, 4, 0)
    r = pb.compare_placements(ids, "2x2x2", 16, "paper-a6000", 64, 2, methods=["none", "eplb", "smartmoe"])
    assert r["eplb"]["load_imbalance"] < r["none"]["load_imbalance"]
    assert r["smartmoe"]["load_imbalance"] <= r["none"]["load_imbalance"]
    for name, res in r.items():
        pred = predict(Topology.parse("2x2x2"), Placement.from_ranks(res["placement"], 8), ids, 64, 2, "paper-a6000")
        assert res["predicted_ms"] == pytest.approx(pred.chosen_ms), name


def test_cli_json_and_table(capsys, clusters_report):
    r = clusters_report
    for key in ("topology", "world_size", "num_experts", "top_k", "hidden_size", "tokens_per_rank", "routing",
                "methods", "link_costs"):
        assert key in r, key
    assert (r["topology"], r["num_experts"], r["top_k"], r["tokens_per_rank"], r["routing"]) == (
        "2x2x2", 16, 4, 64, "clusters:4")
    json.dumps(r)
    assert pb.main(parse([*SMALL, "--routing", "uniform", "--methods", "none,eplb"])) == 0
    out = capsys.readouterr().out
    assert "| none |" in out and "| eplb |" in out and "load imbalance" in out


@pytest.mark.parametrize("argv,flag", [
    (["--methods", "none,magic"], "--methods"),
    (["--num-experts", "12"], "--num-experts"),
    (["--dtype", "int4"], "--dtype"),
    (["--routing", "clusters:0"], "clusters"),
    (["--expert-bytes", "100"], "--horizon-steps"),
    (["--max-swaps", "-2"], "--max-swaps"),
    (["--topology", "2y2"], "--topology"),
])
def test_errors_name_the_flag(argv, flag):
    with pytest.raises((ValueError, TypeError), match=flag):
        pb.build_report(parse([*SMALL, *argv, "--methods", "none"] if "--methods" not in argv else [*SMALL, *argv]))
