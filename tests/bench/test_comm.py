"""``hiermoe bench comm``: contract keys, measured bytes equal the cost model's count, errors before spawning."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from hiermoe_lightning.bench import comm
from hiermoe_lightning.cli import main as cli
from hiermoe_lightning.cli.main import CLIError
from hiermoe_lightning.cost.traffic import bytes_by_level, lower_bound_level1_bytes, phase_rows
from hiermoe_lightning.dispatch.spec import parse_dispatch
from hiermoe_lightning.placement import Placement
from hiermoe_lightning.topology import Topology
from hiermoe_lightning.traces import generate_routing

SMALL = ["--topology", "2x2", "--num-experts", "8", "--top-k", "2", "--hidden-size", "32", "--tokens-per-rank", "64",
         "--iters", "2", "--warmup", "1", "--timeout", "60"]
NAMES = ["flat", "2dh", "hd1", "hd2", "auto"]
RESULT_KEYS = {"median_ms", "p90_ms", "predicted_ms", "bytes_by_level", "plan_ms", "comm_ms"}


def parse(argv: list[str]) -> argparse.Namespace:
    return comm.add_arguments(argparse.ArgumentParser()).parse_args(argv)


def independent_bytes(name: str, ids: torch.Tensor, hidden: int, elem: int, E: int) -> dict[str, int]:
    topo = Topology.parse("2x2")
    rows = phase_rows(topo, Placement.contiguous(E, topo.world_size), ids, parse_dispatch(name, topo.num_levels))
    return bytes_by_level(topo, rows, hidden * elem)


@pytest.fixture(scope="module")
def small_report():
    return comm.run(parse([*SMALL, "--json"]))


def test_contract_keys(small_report):
    r = small_report
    for key in ("topology", "world_size", "num_experts", "top_k", "hidden_size", "tokens_per_rank", "dtype", "routing",
                "results", "chosen", "lower_bound"):
        assert key in r, key
    assert (r["topology"], r["world_size"], r["num_experts"], r["top_k"], r["hidden_size"], r["tokens_per_rank"],
            r["dtype"], r["routing"]) == ("2x2", 4, 8, 2, 32, 64, "fp32", "uniform")
    assert list(r["results"]) == NAMES
    for name, res in r["results"].items():
        assert RESULT_KEYS <= set(res), name
        assert set(res["bytes_by_level"]) == {"level1", "level2"}
        assert res["median_ms"] > 0 and res["p90_ms"] >= res["median_ms"] - 1e-9
        assert res["plan_ms"] >= 0 and res["comm_ms"] > 0
        assert res["max_abs_err"] < 1e-4, name  # identity experts: combine returns x * sum of weights
    assert r["chosen"] in {"hd1", "hd2"} and r["results"]["auto"]["resolved"] == r["chosen"]
    assert set(r["lower_bound"]) == {"bytes_by_level"} and set(r["lower_bound"]["bytes_by_level"]) == {"level1"}
    assert "predicted_note" in r and "combine window" in r["predicted_note"]
    assert r["pipeline_chunks"] == 1 and r["shared_memory"] is True
    json.dumps(r)  # serialisable


def test_bytes_equal_cost_model_count(small_report):
    ids = generate_routing("uniform", 4, 64, 8, 2, seed=0)
    for name, res in small_report["results"].items():
        concrete = small_report["chosen"] if name == "auto" else name
        assert res["bytes_by_level"] == independent_bytes(concrete, ids, 32, 4, 8), name
    lb = lower_bound_level1_bytes(Topology.parse("2x2"), Placement.contiguous(8, 4), ids, 32 * 4)
    assert small_report["lower_bound"]["bytes_by_level"]["level1"] == lb
    res = small_report["results"]
    assert res["hd2"]["bytes_by_level"]["level1"] == lb
    assert res["flat"]["bytes_by_level"]["level1"] == res["2dh"]["bytes_by_level"]["level1"] > lb


def test_predicted_is_twice_the_one_way_model(small_report):
    from hiermoe_lightning.cost.model import predict

    ids = generate_routing("uniform", 4, 64, 8, 2, seed=0)
    pred = predict("2x2", Placement.contiguous(8, 4), ids, 32, 4, "paper-a6000")
    assert pred.chosen == small_report["chosen"]
    for name, res in small_report["results"].items():
        concrete = pred.chosen if name == "auto" else name
        assert res["predicted_ms"] == pytest.approx(2 * pred.dispatch[concrete].predicted_ms)


def test_engine_terms_and_pipeline_chunks(tmp_path):
    """A calibrated-style YAML (sync, copies, faults, node links) and --pipeline-chunks reach the prediction, and the
    pipelined engine still returns the right combine."""
    from hiermoe_lightning.cost.link_costs import LinkCosts, PhaseCost
    from hiermoe_lightning.cost.model import predict

    costs = LinkCosts({"a2a": PhaseCost(1.0, 2e-6, None, 0.5), "inter1": PhaseCost(0.5, 3e-6, None, 0.25),
                       "intra1": PhaseCost(0.2, 1e-6, None, 0.1)}, name="engine-terms", copy_beta=1e-6,
                      pair_bytes=24, duplex="half", level1_link="node", fault_beta=2e-6, fault_threshold=4096)
    path = tmp_path / "costs.yaml"
    costs.to_yaml(path)
    r = comm.run(parse([*SMALL, "--link-costs", str(path), "--pipeline-chunks", "2", "--dispatch", "flat,hd2,auto"]))
    assert r["pipeline_chunks"] == 2 and r["link_costs"] == "engine-terms"
    ids = generate_routing("uniform", 4, 64, 8, 2, seed=0)
    pred = predict("2x2", Placement.contiguous(8, 4), ids, 32, 4, costs, pipeline_chunks=2)
    assert r["chosen"] == pred.chosen
    for name, res in r["results"].items():
        concrete = pred.chosen if name == "auto" else name
        assert res["predicted_ms"] == pytest.approx(2 * pred.dispatch[concrete].predicted_ms)
        assert res["max_abs_err"] < 1e-4, name
        assert res["bytes_by_level"] == independent_bytes(concrete, ids, 32, 4, 8), name
    assert "2 pipeline chunks" in comm.format_report(r)


def test_no_shared_memory_moves_the_same_rows_through_the_process_group():
    r = comm.run(parse([*SMALL, "--pipeline-chunks", "2", "--dispatch", "hd2", "--no-shared-memory"]))
    assert r["shared_memory"] is False and "no shared memory" in comm.format_report(r)
    ids = generate_routing("uniform", 4, 64, 8, 2, seed=0)
    assert r["results"]["hd2"]["max_abs_err"] < 1e-4
    assert r["results"]["hd2"]["bytes_by_level"] == independent_bytes("hd2", ids, 32, 4, 8)


def test_text_table(small_report):
    text = comm.format_report(small_report)
    for name in NAMES:
        assert name in text
    assert "L1 MiB" in text and "vs flat" in text and "plan %" in text and "pred/meas" in text


def test_bf16_zipf_trace_like_run():
    r = comm.run(parse(["--topology", "2x2", "--num-experts", "8", "--top-k", "3", "--hidden-size", "16",
                        "--tokens-per-rank", "32", "--dtype", "bf16", "--routing", "zipf:1.2", "--seed", "3",
                        "--dispatch", "hd2,flat", "--iters", "1", "--warmup", "0", "--timeout", "60"]))
    assert list(r["results"]) == ["hd2", "flat"] and r["routing"] == "zipf:1.2" and r["dtype"] == "bf16"
    ids = generate_routing("zipf:1.2", 4, 32, 8, 3, seed=3)
    for name in ("hd2", "flat"):
        assert r["results"][name]["bytes_by_level"] == independent_bytes(name, ids, 16, 2, 8)
        assert r["results"][name]["max_abs_err"] < 0.1


def test_emulation_unavailable_exits_3(capsys, monkeypatch):
    """Without root (simulated) ``--emulate-inter-mbit`` is one line naming the flag and exit status 3, no spawn.

    (The first version of this command always refused emulation with "network emulation is not available yet in
    this version"; bench/netem.py has since implemented it, so refusal now only happens where it cannot run.)"""
    from hiermoe_lightning.bench import netem

    monkeypatch.setattr(netem, "_is_root", lambda: False)
    monkeypatch.setattr(comm, "run_ranks", lambda *a, **k: pytest.fail("spawned ranks without emulation"))
    with pytest.raises(CLIError) as e:
        comm.run(parse([*SMALL, "--emulate-inter-mbit", "100"]))
    assert e.value.status == 3
    assert cli.main(["bench", "comm", *SMALL, "--emulate-inter-mbit", "100", "--json"]) == 3
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert captured.out == "" and len(err) == 1, captured.err
    assert err[0].startswith("hiermoe: error: --emulate-inter-mbit") and "Traceback" not in captured.err


@pytest.mark.parametrize("dispatch", ["flat,hd3", "bogus", "flat,,hd2", "HD2"])
def test_unknown_dispatch_exits_2_before_spawning(dispatch, capsys, monkeypatch):
    monkeypatch.setattr(comm, "run_ranks", lambda *a, **k: pytest.fail("spawned ranks for a bad --dispatch"))
    assert cli.main(["bench", "comm", *SMALL, "--dispatch", dispatch]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hiermoe: error: --dispatch")
    with pytest.raises(ValueError, match="allowed|empty"):
        comm.run(parse([*SMALL, "--dispatch", dispatch]))


@pytest.mark.parametrize("argv, flag", [
    (["--dtype", "fp16"], "--dtype"), (["--iters", "0"], "--iters"), (["--num-experts", "6"], "--num-experts"),
    (["--topology", "2x"], "--topology"), (["--routing", "zipf"], "--routing"),
    (["--emulate-inter-mbit", "0"], "--emulate-inter-mbit"), (["--pipeline-chunks", "0"], "--pipeline-chunks"),
    (["--pipeline-chunks", "65"], "--pipeline-chunks"),
])
def test_bad_flags_name_the_flag(argv, flag, capsys, monkeypatch):
    monkeypatch.setattr(comm, "run_ranks", lambda *a, **k: pytest.fail("spawned ranks for a bad flag"))
    assert cli.main(["bench", "comm", *SMALL, *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and flag in err[0], err


def test_parse_dispatch_list():
    assert comm.parse_dispatch_list(" flat, hd2 ,flat,auto", 2) == ["flat", "hd2", "auto"]
    assert comm.parse_dispatch_list("hd3", 3) == ["hd3"]
