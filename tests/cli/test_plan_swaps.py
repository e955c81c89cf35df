"""`hiermoe plan --swaps N`: the JSON keys the contract adds, their lengths, and the swaps replaying to the result."""

from __future__ import annotations

import argparse
import json

import pytest

from hiermoe_lightning.cli import plan
from hiermoe_lightning.cli.main import main
from hiermoe_lightning.cost.model import predict
from hiermoe_lightning.placement.placement import Placement
from hiermoe_lightning.traces import generate_routing

BASE = ["--topology", "2x2x2", "--num-experts", "32", "--top-k", "8", "--hidden-size", "256",
        "--tokens-per-rank", "128", "--routing", "zipf:1.2", "--seed", "0"]
SWAP_KEYS = ["placement_before", "placement_after", "swaps", "chosen_after", "predicted_ms_after"]


def run_json(argv: list[str], capsys) -> dict:
    args = plan.add_arguments(argparse.ArgumentParser()).parse_args([*argv, "--json"])
    assert plan.run(args) == 0
    return json.loads(capsys.readouterr().out)


def test_swaps_json(capsys):
    report = run_json([*BASE, "--swaps", "4"], capsys)
    for key in SWAP_KEYS:
        assert key in report
    E = report["num_experts"]
    assert len(report["placement_before"]) == len(report["placement_after"]) == E
    assert report["placement_before"] == Placement.contiguous(E, 8).to_list()
    assert 1 <= len(report["swaps"]) <= 4 and all(len(s) == 2 for s in report["swaps"])
    # the swaps, applied in order to the contiguous placement, give placement_after
    p = Placement.contiguous(E, 8)
    for a, b in report["swaps"]:
        p = p.swapped(a, b)
    assert p.to_list() == report["placement_after"]
    # chosen_after / predicted_ms_after are the cost model's on placement_after
    ids = generate_routing("zipf:1.2", 8, 128, E, 8, 0)
    after = predict("2x2x2", p, ids, 256, 2, "paper-a6000")
    assert report["chosen_after"] == after.chosen
    assert report["predicted_ms_after"] == pytest.approx(after.chosen_ms)
    assert report["predicted_ms_after"] <= report["dispatch"][report["chosen"]]["predicted_ms"]
    # everything else is unchanged by --swaps
    plain = run_json(BASE, capsys)
    assert not set(SWAP_KEYS) & set(plain)
    assert {k: v for k, v in report.items() if k in plain} == plain
    # deterministic
    assert run_json([*BASE, "--swaps", "4"], capsys) == report


def test_migration_and_gamma_flags(capsys):
    free = run_json([*BASE, "--swaps", "3", "--gamma", "none"], capsys)
    assert free["swaps"]
    blocked = run_json([*BASE, "--swaps", "3", "--expert-bytes", "1e12", "--horizon-steps", "1"], capsys)
    assert blocked["swaps"] == [] and blocked["placement_after"] == blocked["placement_before"]
    cheap = run_json([*BASE, "--swaps", "3", "--expert-bytes", "1", "--horizon-steps", "1000000"], capsys)
    assert cheap["swaps"]


def test_text_output_has_a_swap_section(capsys):
    args = plan.add_arguments(argparse.ArgumentParser()).parse_args([*BASE, "--swaps", "2"])
    assert plan.run(args) == 0
    out = capsys.readouterr().out
    assert "swaps: " in out and "after swaps: hd" in out


@pytest.mark.parametrize("argv,match", [
    (["--swaps", "-1"], "--swaps"),
    (["--swaps", "2", "--expert-bytes", "100"], "--horizon-steps"),
    (["--swaps", "2", "--horizon-steps", "3"], "--expert-bytes"),
    (["--swaps", "2", "--expert-bytes", "-5", "--horizon-steps", "3"], "--expert-bytes"),
    (["--swaps", "2", "--gamma", "0"], "--gamma"),
    (["--swaps", "2", "--gamma", "abc"], "--gamma"),
])
def test_bad_swap_flags_exit_2_naming_the_flag(argv, match, capsys):
    assert main(["plan", *BASE, *argv]) == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err
