"""`hiermoe plan`: flags, JSON keys and phase names per the contract, traces, and errors naming the flag."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

from hiermoe_lightning.cli import plan

CONTRACT_KEYS = ["topology", "num_experts", "top_k", "hidden_size", "bytes_per_elem", "tokens_per_rank", "dispatch",
                 "chosen"]

# The 2x2 hand case of tests/cost/test_traffic.py: rank r holds experts 2r, 2r+1. Busiest-rank rows by hand:
# flat a2a 5 | hd1 a2a 4 | 2dh inter1 4, intra1 3 | hd2 inter1 2, intra1 2
HAND_IDS = torch.tensor([
    [[0, 1, 2, 6], [4, 5, 7, -1]],
    [[0, 3, 5, 6], [-1, -1, -1, -1]],
    [[2, 3, -1, -1], [-1, -1, -1, -1]],
    [[6, 7, 4, 0], [-1, -1, -1, -1]],
])
HAND_ROWS = {"flat": [("a2a", 5)], "2dh": [("inter1", 4), ("intra1", 3)], "hd1": [("a2a", 4)],
             "hd2": [("inter1", 2), ("intra1", 2)]}


def run_plan(argv: list[str], capsys) -> str:
    args = plan.add_arguments(argparse.ArgumentParser()).parse_args(argv)
    assert plan.run(args) == 0
    return capsys.readouterr().out


def run_json(argv: list[str], capsys) -> dict:
    out = run_plan([*argv, "--json"], capsys)
    return json.loads(out)


def test_contract_example_json(capsys):
    argv = ["--topology", "4x2x2x2", "--num-experts", "128", "--top-k", "8", "--hidden-size", "64",
            "--tokens-per-rank", "32", "--dtype", "bf16", "--link-costs", "paper-a6000", "--routing", "uniform",
            "--seed", "0"]
    report = run_json(argv, capsys)
    assert list(report)[: len(CONTRACT_KEYS)] == CONTRACT_KEYS
    assert (report["topology"], report["num_experts"], report["top_k"], report["hidden_size"],
            report["bytes_per_elem"], report["tokens_per_rank"]) == ("4x2x2x2", 128, 8, 64, 2, 32)
    phases = {n: [p["name"] for p in d["phases"]] for n, d in report["dispatch"].items()}
    assert phases == {
        "flat": ["a2a"], "2dh": ["inter1", "inter2", "inter3", "intra3"], "hd1": ["a2a"],
        "hd2": ["inter1", "intra1"], "hd3": ["inter1", "inter2", "intra2"],
        "hd4": ["inter1", "inter2", "inter3", "intra3"],
    }
    for d in report["dispatch"].values():
        assert set(d) == {"predicted_ms", "phases"}
        for p in d["phases"]:
            assert set(p) == {"name", "max_rank_bytes", "ms"}
    hd = {n: report["dispatch"][n]["predicted_ms"] for n in ("hd1", "hd2", "hd3", "hd4")}
    assert report["chosen"] == min(hd, key=hd.get)
    # the same seed gives the same report
    assert run_json(argv, capsys) == report


def _yaml_costs(tmp_path) -> str:
    path = tmp_path / "costs.yaml"
    path.write_text("phases:\n  a2a: {alpha: 0.0, beta: 1.0}\n  inter1: {alpha: 0.0, beta: 1.0}\n"
                    "  intra1: {alpha: 0.0, beta: 0.1}\n")
    return str(path)


@pytest.mark.parametrize("ext", ["pt", "npy"])
def test_trace_files_give_the_hand_counts(tmp_path, capsys, ext):
    path = tmp_path / f"trace.{ext}"
    if ext == "pt":
        torch.save(HAND_IDS, path)
    else:
        np.save(path, HAND_IDS.numpy())
    report = run_json(["--topology", "2x2", "--num-experts", "8", "--hidden-size", "5", "--dtype", "fp16",
                       "--link-costs", _yaml_costs(tmp_path), "--routing", f"trace:{path}"], capsys)
    assert (report["top_k"], report["tokens_per_rank"], report["bytes_per_elem"]) == (4, 2, 2)
    for name, phases in HAND_ROWS.items():
        got = report["dispatch"][name]["phases"]
        assert [(p["name"], p["max_rank_bytes"]) for p in got] == [(n, r * 10) for n, r in phases]
    # hd1 = 40 x 1.0; hd2 = 20 x 1.0 + 20 x 0.1 = 22
    assert report["dispatch"]["hd1"]["predicted_ms"] == pytest.approx(40.0)
    assert report["dispatch"]["hd2"]["predicted_ms"] == pytest.approx(22.0)
    assert report["chosen"] == "hd2"
    # the trace's own top-k and tokens may be repeated
    again = run_json(["--topology", "2x2", "--num-experts", "8", "--hidden-size", "5", "--dtype", "fp16",
                      "--top-k", "4", "--tokens-per-rank", "2", "--link-costs", _yaml_costs(tmp_path),
                      "--routing", f"trace:{path}"], capsys)
    assert again["dispatch"] == report["dispatch"]


def test_trace_mismatches_are_clear_errors(tmp_path, capsys):
    path = tmp_path / "trace.pt"
    torch.save(HAND_IDS, path)
    base = ["--topology", "2x2", "--num-experts", "8", "--routing", f"trace:{path}"]
    with pytest.raises(ValueError, match=r"--top-k 2 .*top_k 4"):
        run_plan([*base, "--top-k", "2"], capsys)
    with pytest.raises(ValueError, match=r"--tokens-per-rank 7 .*2 tokens"):
        run_plan([*base, "--tokens-per-rank", "7"], capsys)
    with pytest.raises(ValueError, match=r"world size 4.*8 ranks"):
        run_plan(["--topology", "2x4", "--num-experts", "8", "--routing", f"trace:{path}"], capsys)
    with pytest.raises(ValueError, match=r"--routing.*out of range"):
        run_plan(["--topology", "2x2", "--num-experts", "4", "--routing", f"trace:{path}"], capsys)
    with pytest.raises(ValueError, match=r"--routing.*missing.pt.*does not exist"):
        run_plan(["--topology", "2x2", "--num-experts", "8", "--routing", f"trace:{tmp_path / 'missing.pt'}"], capsys)


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--dtype", "fp64"], r"--dtype.*fp32.*bf16.*fp16"),
        (["--topology", "2by2"], r"--topology"),
        (["--num-experts", "100"], r"--num-experts.*divisible"),
        (["--num-experts", "0"], r"--num-experts"),
        (["--top-k", "0"], r"--top-k"),
        (["--top-k", "200"], r"--top-k"),
        (["--hidden-size", "-1"], r"--hidden-size"),
        (["--tokens-per-rank", "0"], r"--tokens-per-rank"),
        (["--routing", "normal"], r"--routing.*uniform.*zipf:S.*trace:PATH"),
        (["--link-costs", "nope"], r"--link-costs.*paper-a6000"),
        (["--link-costs", "/no/such/costs.yaml"], r"--link-costs.*does not exist"),
        (["--topology", "2x2x2x2x2"], r"inter4"),
    ],
)
def test_bad_flags_name_the_flag(argv, match, capsys):
    with pytest.raises((ValueError, TypeError), match=match):
        run_plan(["--tokens-per-rank", "4", "--hidden-size", "8", *argv], capsys)


def test_text_table(capsys):
    out = run_plan(["--topology", "2x2", "--num-experts", "16", "--top-k", "4", "--tokens-per-rank", "16",
                    "--hidden-size", "32", "--routing", "zipf:1.1"], capsys)
    for word in ("flat", "2dh", "hd1", "hd2", "inter1", "intra1", "a2a", "max_rank_bytes", "vs flat", "chosen: hd"):
        assert word in out
    assert "1.00x" in out  # flat against itself


def test_padded_adds_padded_bytes(capsys):
    report = run_json(["--topology", "2x2", "--num-experts", "8", "--top-k", "2", "--tokens-per-rank", "8",
                       "--hidden-size", "4", "--padded"], capsys)
    assert report["padded"] is True
    for d in report["dispatch"].values():
        for p in d["phases"]:
            assert set(p) == {"name", "max_rank_bytes", "ms", "padded_bytes"}
            assert p["padded_bytes"] >= p["max_rank_bytes"]  # a padded chunk per peer covers every real split
