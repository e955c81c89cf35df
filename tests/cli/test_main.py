"""The ``hiermoe`` entry point: subcommands, ``python -m hiermoe_lightning``, one-line errors, ``--debug``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from hiermoe_lightning.cli import main as cli

ROOT = Path(__file__).resolve().parents[2]
PLAN_ARGS = ["plan", "--topology", "2x2", "--num-experts", "8", "--top-k", "2", "--hidden-size", "16",
             "--tokens-per-rank", "8", "--routing", "uniform", "--seed", "0"]


# a fresh interpreter imports torch and lightning: ~10 s on an idle 2-core machine, ~55 s beside a CPU hog and other
# jobs (make test-under-load); the bound is for a hang, pytest-timeout is the hard stop
SUBPROCESS_TIMEOUT_S = 240


def run_module(*argv: str, timeout: float = SUBPROCESS_TIMEOUT_S) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "hiermoe_lightning", *argv], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env)


def assert_one_line_error(proc: subprocess.CompletedProcess, status: int = 2, contains: str = "") -> str:
    assert proc.returncode == status, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("hiermoe: error: "), lines[0]
    assert "Traceback" not in proc.stderr
    assert contains in lines[0], lines[0]
    assert proc.stdout == ""
    return lines[0]


# ---------------------------------------------------------------------------- subprocess: python -m hiermoe_lightning
def test_module_plan_json():
    proc = run_module(*PLAN_ARGS, "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["topology"] == "2x2" and report["num_experts"] == 8 and report["top_k"] == 2
    assert set(report["dispatch"]) == {"flat", "2dh", "hd1", "hd2"}
    assert report["chosen"] in {"hd1", "hd2"}


def test_bad_input_in_a_subprocess_is_one_line_and_status_2():
    assert_one_line_error(run_module("plan", "--num-experts", "x"), 2, "--num-experts")  # argparse error
    assert_one_line_error(run_module("plan", "--topology", "2x0"), 2, "--topology")  # ValueError


def test_debug_shows_the_traceback():
    proc = run_module("--debug", "plan", "--topology", "2x0")
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "ValueError" in proc.stderr


def test_version():
    proc = run_module("--version")
    assert proc.returncode == 0 and proc.stdout.startswith("hiermoe ")


def test_console_script_runs_plan():
    script = Path(sys.executable).parent / "hiermoe"
    if not script.exists():
        pytest.skip("console script not installed (pip install -e . --no-deps)")
    proc = subprocess.run([str(script), *PLAN_ARGS, "--json"], capture_output=True, text=True,
                          timeout=SUBPROCESS_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["topology"] == "2x2"


# ---------------------------------------------------------------------------- in process
@pytest.mark.parametrize("argv, contains", [
    (["plan", "--num-experts", "x"], "--num-experts"),
    (["plan", "--topology", "2x0"], "--topology"),
    (["plan", "--routing", "zipf:-1"], "--routing"),
    (["plan", "--link-costs", "no-such-preset"], "paper-a6000"),
    (["bench", "comm", "--dispatch", "flat,hd3"], "allowed"),
    (["bench", "comm", "--no-such-flag"], "--no-such-flag"),
    (["bench", "layer", "--iters", "x"], "--iters"),
    (["bench"], "comm"),
    (["nonsense"], "nonsense"),
    ([], "required"),
])
def test_bad_input_is_one_line_and_status_2(argv, contains, capsys):
    assert cli.main(argv) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert out == "" and len(lines) == 1, err
    assert lines[0].startswith("hiermoe: error: ") and contains in lines[0], lines[0]


def test_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name in ("fit", "validate", "test", "plan", "bench"):
        assert name in out
    with pytest.raises(SystemExit):
        cli.main(["bench", "comm", "--help"])
    out = capsys.readouterr().out
    for flag in ("--topology", "--num-experts", "--top-k", "--hidden-size", "--tokens-per-rank", "--dtype",
                 "--routing", "--seed", "--dispatch", "--iters", "--warmup", "--link-costs", "--emulate-inter-mbit",
                 "--json"):
        assert flag in out, flag


def test_plan_in_process_json(capsys):
    assert cli.main([*PLAN_ARGS, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["num_experts"] == 8


def test_main_returns_2_on_value_error(capsys):
    assert cli.main(["plan", "--num-experts", "6"]) == 2  # 6 experts on 4x2x2x2 ranks
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hiermoe: error: --num-experts")


def test_main_debug_reraises():
    with pytest.raises(ValueError, match="--topology"):
        cli.main(["--debug", "plan", "--topology", "0"])
    with pytest.raises(ValueError, match="--topology"):  # also after the subcommand
        cli.main(["plan", "--topology", "0", "--debug"])


def test_fit_forwards_remaining_argv(monkeypatch):
    calls = []
    fake = types.ModuleType("hiermoe_lightning.cli.lightning_cli")

    def run_lightning_cli(subcommand, argv):
        calls.append((subcommand, argv))
        return 0

    fake.run_lightning_cli = run_lightning_cli
    monkeypatch.setitem(sys.modules, "hiermoe_lightning.cli.lightning_cli", fake)
    for sub in ("fit", "validate", "test"):
        assert cli.main([sub, "--config", "a.yaml", "--trainer.max_steps=3", "-h"]) == 0
    assert cli.main(["--debug", "fit", "--debug", "x"]) == 0
    assert calls == [
        ("fit", ["--config", "a.yaml", "--trainer.max_steps=3", "-h"]),
        ("validate", ["--config", "a.yaml", "--trainer.max_steps=3", "-h"]),
        ("test", ["--config", "a.yaml", "--trainer.max_steps=3", "-h"]),
        ("fit", ["--debug", "x"]),
    ]


def test_fit_value_error_is_one_line(monkeypatch, capsys):
    fake = types.ModuleType("hiermoe_lightning.cli.lightning_cli")

    def run_lightning_cli(subcommand, argv):
        raise ValueError("--config: file 'x.yaml' does not exist")

    fake.run_lightning_cli = run_lightning_cli
    monkeypatch.setitem(sys.modules, "hiermoe_lightning.cli.lightning_cli", fake)
    assert cli.main(["fit", "--config", "x.yaml"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["hiermoe: error: --config: file 'x.yaml' does not exist"]
    with pytest.raises(ValueError):
        cli.main(["--debug", "fit", "--config", "x.yaml"])


def test_fit_without_lightning_cli_module(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "hiermoe_lightning.cli.lightning_cli", None)  # import raises ImportError
    assert cli.main(["fit", "--config", "x.yaml"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hiermoe: error: 'hiermoe fit' is not available")
