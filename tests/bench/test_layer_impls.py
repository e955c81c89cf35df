"""``hiermoe bench layer --impl``: one command compares our layer with its peers (documented keys, skipped and failed
peers as one line each, interleaved repeats), bad flags fail before any rank starts, and without ``--impl`` the
command reports what it always did."""

import contextlib
import io
import json

import pytest

from hiermoe_lightning.bench import layer, peers
from hiermoe_lightning.cli import main as cli

SMALL = ["--topology", "2x2", "--num-experts", "8", "--top-k", "2", "--hidden-size", "32", "--ffn-hidden-size", "16",
         "--tokens-per-rank", "16", "--iters", "1", "--warmup", "0"]
MEASURED_KEYS = {"version", "settings", "step_ms", "step_ms_repeats", "comm_ms", "bytes_per_step",
                 "speedup_vs_hiermoe_flat"}
REPORT_KEYS = {"topology", "world_size", "num_experts", "top_k", "hidden_size", "ffn_hidden_size", "tokens_per_rank",
               "dtype", "device", "seed", "iters", "warmup", "repeats", "impls", "order", "results", "bytes_note",
               "timing_note", "torch_version", "cpu_count"}


@pytest.fixture(scope="module")
def impl_report(tmp_path_factory):
    """One run: hiermoe:flat and megatron-style measured twice (interleaved), torchtitan 'not installed', deepspeed
    'installed' but failing to build on every rank (as Megatron-Core does without CUDA)."""
    mp = pytest.MonkeyPatch()
    mp.setattr(peers.TorchTitanImpl, "dist_name", "hiermoe-test-absent-distribution")
    mp.setattr(peers.DeepSpeedImpl, "dist_name", "hiermoe-lightning")  # "installed" whether or not it is

    def no_cuda(self, *args):
        raise RuntimeError("torch.cuda.Stream requires CUDA support")

    mp.setattr(peers.DeepSpeedImpl, "build", no_cuda)
    output = tmp_path_factory.mktemp("impls") / "report.json"
    stdout = io.StringIO()
    try:
        with contextlib.redirect_stdout(stdout):
            status = cli.main(["bench", "layer", *SMALL, "--impl", "hiermoe:flat,megatron-style,torchtitan,deepspeed",
                               "--repeats", "2", "--json", "--output", str(output)])
    finally:
        mp.undo()
    assert status == 0
    report = json.loads(stdout.getvalue())
    assert json.loads(output.read_text()) == report
    return report


def test_every_impl_has_the_documented_keys(impl_report):
    assert REPORT_KEYS <= set(impl_report)
    assert impl_report["impls"] == ["hiermoe:flat", "megatron-style", "torchtitan", "deepspeed"]
    results = impl_report["results"]
    for name in ("hiermoe:flat", "megatron-style"):
        r = results[name]
        assert MEASURED_KEYS <= set(r), name
        assert len(r["step_ms_repeats"]) == 2 and r["step_ms"] > 0 and r["comm_ms"] > 0
        assert set(r["bytes_per_step"]) == {"inter", "intra"}
        for key in ("capacity_factor", "expert_dtype", "gate"):
            assert key in r["settings"], (name, key)
        assert r["settings"]["expert_dtype"] == "fp32" and r["settings"]["capacity_factor"] is None
    assert results["hiermoe:flat"]["speedup_vs_hiermoe_flat"] == 1.0
    assert results["hiermoe:flat"]["version"].startswith("hiermoe-lightning ")


def test_flat_and_megatron_style_move_the_same_rows(impl_report):
    """The same gate weights and inputs route every pair alike; both send one row per (token, expert) pair."""
    flat, mega = (impl_report["results"][n]["bytes_per_step"] for n in ("hiermoe:flat", "megatron-style"))
    assert flat == mega
    row_bytes, pairs = 32 * 4, 4 * 16 * 2
    assert 0 < flat["inter"] + flat["intra"] <= 2 * pairs * row_bytes


def test_missing_and_failing_peers_are_one_line_each(impl_report):
    results = impl_report["results"]
    assert results["torchtitan"] == {"skipped": f"torchtitan is not installed ({peers.PEERS_INSTALL})",
                                     "version": None}
    assert results["deepspeed"]["error"] == "RuntimeError: torch.cuda.Stream requires CUDA support"
    assert "step_ms" not in results["deepspeed"] and results["deepspeed"]["settings"]["capacity_factor"] == 1.0
    table = layer.format_impls(impl_report)
    lines = {line.split()[0]: line for line in table.splitlines() if line.split()}
    assert "skipped: torchtitan is not installed" in lines["torchtitan"]
    assert "error: RuntimeError: torch.cuda.Stream requires CUDA support" in lines["deepspeed"]
    assert "1.00x" in lines["hiermoe:flat"]


@pytest.mark.parametrize("argv, match", [
    (["--impl", "hiermoe:flat,fairscale"], "--impl"),
    (["--impl", "hiermoe"], "needs a dispatch"),
    (["--impl", "hiermoe:flat", "--device", "cuda"], "--device cpu"),
    (["--impl", "hiermoe:flat", "--num-experts", "6"], "divisible"),
    (["--impl", "hiermoe:flat", "--repeats", "0"], "--repeats"),
    (["--impl", "hiermoe:flat", "--emulate-latency-ms", "5"], "needs --emulate-inter-mbit"),
    (["--repeats", "2"], "--repeats needs --impl"),
    (["--emulate-inter-mbit", "100"], "--emulate-inter-mbit needs --impl"),
])
def test_bad_flags_fail_before_any_rank(argv, match, capsys, monkeypatch):
    monkeypatch.setattr(layer, "run_ranks", lambda *a, **k: pytest.fail("started ranks for bad flags"))
    assert cli.main(["bench", "layer", *SMALL, *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hiermoe: error: ") and match in err[0], err


def test_emulation_unavailable_exits_3(capsys, monkeypatch):
    from hiermoe_lightning.bench import netem

    monkeypatch.setattr(netem, "_is_root", lambda: False)
    monkeypatch.setattr(layer, "run_ranks", lambda *a, **k: pytest.fail("started ranks without emulation"))
    assert cli.main(["bench", "layer", *SMALL, "--impl", "hiermoe:flat", "--emulate-inter-mbit", "100"]) == 3
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("hiermoe: error: --emulate-inter-mbit")


def test_summary_takes_the_slowest_rank_of_each_iteration():
    def rank(steps, comms, inter, kept=None):
        extra = {} if kept is None else {"capacity": 4, "pairs": 10, "kept_pairs": kept}
        return {"step_seconds": steps, "comm_seconds": comms, "bytes": {"inter": inter, "intra": 1}, "extra": extra}

    repeat1 = [rank([0.010, 0.030], [0.001, 0.002], 5, kept=9), rank([0.020, 0.010], [0.004, 0.008], 7, kept=6)]
    repeat2 = [rank([0.050, 0.040], [0.005, 0.003], 5, kept=9), rank([0.001, 0.001], [0.0, 0.0], 7, kept=6)]
    out = layer.summarise_launches([repeat1, repeat2])
    # slowest per iteration: 20 ms (rank 1, comm 4), 30 (rank 0, comm 2), 50 (rank 0, comm 5), 40 (rank 0, comm 3)
    assert out["step_ms"] == pytest.approx(35.0) and out["comm_ms"] == pytest.approx(3.5)
    assert out["step_ms_repeats"] == pytest.approx([25.0, 45.0])
    assert out["bytes_per_step"] == {"inter": 12, "intra": 2}
    assert out["drop_rate"] == pytest.approx(1 - 15 / 20) and out["capacity_per_expert"] == 4


def test_without_impl_the_report_is_what_it_was(capsys):
    assert cli.main(["bench", "layer", *SMALL, "--dispatch", "hd2", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert set(res) == {"topology", "dispatch", "num_experts", "top_k", "hidden_size", "ffn_hidden_size",
                        "tokens_per_rank", "dtype", "device", "step_ms", "split_ms", "split_share", "peak_rss_mib"}
    assert set(res["split_ms"]) == {"a2a", "experts", "other", "of_which_planning"}
    assert res["dispatch"] == "hd2" and res["step_ms"] > 0
