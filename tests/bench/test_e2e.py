"""``hiermoe bench e2e``: Lightning training of MoEGPT on forked ranks (plain and on the emulated network).

The emulated-network test creates real network namespaces: it needs root (CI runs the tests as root) and is not
skipped without it: it fails.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess

import pytest

from hiermoe_lightning.bench import e2e, netem
from hiermoe_lightning.cli.main import CLIError

TINY = ["--topology", "2x2", "--hidden-size", "32", "--num-heads", "2", "--num-experts", "8", "--top-k", "2",
        "--num-layers", "2", "--seq-len", "16", "--batch-size", "2", "--steps", "2", "--warmup-steps", "1",
        "--timeout", "120"]


def parse(argv: list[str]) -> argparse.Namespace:
    return e2e.add_arguments(argparse.ArgumentParser()).parse_args(argv)


def check_result(r: dict, num_levels: int = 2) -> None:
    assert set(e2e.RESULT_KEYS) <= set(r)
    assert r["tokens_per_s"] > 0 and r["step_ms_median"] > 0 and r["elapsed_s"] > 0
    assert r["step_ms_p90"] >= r["step_ms_median"] - 1e-9
    assert len(r["step_ms"]) == 2  # the timed steps only
    assert set(r["bytes_by_level"]) == set(r["flat_bytes_by_level"]) == {f"level{i}" for i in range(1, num_levels + 1)}
    assert r["bytes_by_level"]["level1"] > 0 and r["flat_bytes_by_level"]["level1"] > 0
    assert r["swaps"] >= 0 and r["loss_last"] > 0


@pytest.fixture(scope="module")
def plain_report():
    return e2e.run(parse([*TINY, "--dispatch", "flat,auto,hd2:overlap=2", "--pipeline-chunks", "2"]))


def test_flat_and_auto_on_four_ranks(plain_report):
    r = plain_report
    assert r["world_size"] == 4 and r["topology"] == "2x2" and r["variants"] == ["flat", "auto", "hd2:overlap=2"]
    assert r["pipeline_chunks"] == 2 and r["shared_memory"] is True
    assert r["tokens_per_step"] == 4 * 2 * 16
    assert "emulation" not in r
    for name in ("flat", "auto"):
        check_result(r["results"][name])
    flat, auto = r["results"]["flat"], r["results"]["auto"]
    assert flat["speedup_vs_flat"] == pytest.approx(1.0)
    assert auto["speedup_vs_flat"] == pytest.approx(auto["tokens_per_s"] / flat["tokens_per_s"])
    assert flat["dispatch_resolved"] == ["flat", "flat"]
    assert set(auto["dispatch_resolved"]) <= {"hd1", "hd2"}
    assert flat["dedup_saving"] == pytest.approx(0.0)
    assert flat["bytes_by_level"] == flat["flat_bytes_by_level"]
    # same seed and same batches: the dispatch changes where rows go, not what is computed
    assert auto["loss_first"] == pytest.approx(flat["loss_first"], rel=1e-5)
    assert auto["flat_bytes_by_level"] == flat["flat_bytes_by_level"]
    overlapped = r["results"]["hd2:overlap=2"]  # hd2 with overlap_chunks=2: the same training, overlapped
    check_result(overlapped)
    assert overlapped["dispatch_resolved"] == ["hd2", "hd2"]
    assert overlapped["loss_last"] == pytest.approx(flat["loss_last"], rel=1e-4)
    json.dumps(r)
    text = e2e.format_report(r)
    assert "tokens/s" in text and "1.00x" in text


def test_emulated_network_runs_as_root(tmp_path, capsys):
    out = tmp_path / "e2e.json"
    status = e2e.main(parse([*TINY, "--dispatch", "hd2", "--swaps", "--plan-every-n-steps", "1",
                             "--emulate-inter-mbit", "1000", "--no-shared-memory", "--output", str(out)]))
    assert status == 0
    r = json.loads(out.read_text())
    assert r["emulation"]["inter_mbit"] == 1000 and r["emulation"]["ranks_per_node"] == 2
    assert r["shared_memory"] is False
    assert r["variants"] == ["hd2", e2e.SWAPS_VARIANT]
    for res in r["results"].values():
        check_result(res)
    assert r["results"]["hd2"]["speedup_vs_flat"] is None  # no flat variant to compare with
    assert r["results"][e2e.SWAPS_VARIANT]["plans"]["count"] >= 1  # the planner ran inside the timed steps
    assert "emulated network" in capsys.readouterr().out
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10).stdout
    assert not [ln for ln in listed.splitlines() if ln.startswith(f"hmoe-{os.getpid()}-")], "namespaces left behind"


def test_emulation_unavailable_exits_3(monkeypatch, capsys):
    monkeypatch.setattr(netem, "_is_root", lambda: False)
    args = parse([*TINY, "--dispatch", "flat", "--emulate-inter-mbit", "200"])
    with pytest.raises(CLIError) as info:
        e2e.run(args)
    assert info.value.status == e2e.EMULATION_EXIT_STATUS == 3
    assert e2e.main(args) == 3
    err = capsys.readouterr().err
    assert "--emulate-inter-mbit" in err and "root" in err


@pytest.mark.parametrize("argv, match", [
    (["--dispatch", "flat,hd3"], "--dispatch"),
    (["--num-experts", "6"], "divisible"),
    (["--top-k", "9"], "--top-k"),
    (["--steps", "0"], "--steps"),
    (["--emulate-latency-ms", "5"], "needs --emulate-inter-mbit"),
    (["--link-costs", "nope"], "--link-costs"),
    (["--hidden-size", "30"], "model"),
    (["--topology", "1"], "at least 2"),
    (["--pipeline-chunks", "0"], "--pipeline-chunks"),
    (["--overlap-chunks", "0"], "--overlap-chunks"),
    (["--dispatch", "auto:overlap=0"], "overlap count must be .auto. or an int in 1..64"),
    (["--dispatch", "hd9:overlap=2"], "--dispatch"),
])
def test_bad_input_fails_before_spawning(argv, match):
    with pytest.raises((ValueError, TypeError), match=match):
        e2e.run(parse([*TINY, *argv]))


def test_external_rank_environment():
    env = e2e.ExternalRankEnvironment(2, 4)
    assert env.creates_processes_externally and not env.detect()
    assert (env.global_rank(), env.local_rank(), env.node_rank(), env.world_size()) == (2, 2, 0, 4)
    env.set_global_rank(2)
    env.set_world_size(4)
    with pytest.raises(ValueError):
        env.set_world_size(8)
    with pytest.raises(ValueError):
        e2e.ExternalRankEnvironment(4, 4)


def test_repeats_report_the_median_repeat():
    def raw(elapsed, swaps):
        return {"elapsed_s": elapsed, "step_seconds": [elapsed / 2] * 2, "sent": [10.0, 5.0], "flat": [20.0, 5.0],
                "swaps": swaps, "plan_seconds": 0.0, "migration_seconds": 0.0, "plans": {"count": 0},
                "dispatch_resolved": ["hd2"], "losses": [3.0, 2.0]}

    r = e2e._summarise([raw(2.0, 1), raw(1.0, 2), raw(4.0, 3)], tokens_per_step=100, steps=2, num_levels=2)
    assert r["tokens_per_s_repeats"] == [100.0, 200.0, 50.0]
    assert r["tokens_per_s"] == 100.0 and r["swaps"] == 1 and r["elapsed_s"] == 2.0  # the median repeat
    assert len(r["step_ms"]) == 6 and r["step_ms_median"] == pytest.approx(1000.0)
    assert r["dedup_saving"] == pytest.approx(1 - 15 / 25)


def test_default_model_has_fine_grained_top8_experts():
    """Unless told otherwise, the model is shaped like Qwen3-30B-A3B: top-8 experts 3/8 as wide as the hidden size."""
    model = e2e._model_kwargs(parse([]))
    assert (model["hidden_size"], model["top_k"], model["ffn_hidden_size"]) == (256, 8, 96)
    assert e2e._model_kwargs(parse(["--hidden-size", "2048"]))["ffn_hidden_size"] == 768  # Qwen3-30B-A3B itself
    assert e2e._model_kwargs(parse(["--ffn-hidden-size", "256", "--top-k", "4"]))["ffn_hidden_size"] == 256
    assert e2e.default_ffn_hidden_size(2) == 1  # never 0


# ---------------------------------------------------------------------------------------------- --model
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HF_TINY = ["--topology", "2x2", "--seq-len", "16", "--batch-size", "2", "--steps", "2", "--warmup-steps", "1",
           "--timeout", "120"]


def test_default_model_is_moegpt_and_named_in_the_report(plain_report):
    assert parse([]).model == "moegpt"
    assert plain_report["model_name"] == "moegpt" and plain_report["model_class"].endswith("MoEGPT")
    assert plain_report["model"]["hidden_size"] == 32  # the MoEGPT keyword arguments, as before
    assert "MoEGPT hidden 32" in e2e.format_report(plain_report)


def test_hf_qwen3_tiny_is_the_shipped_config():
    import yaml

    with open(os.path.join(ROOT, "configs", "hf-qwen3-moe-tiny.yaml")) as f:
        shipped = yaml.safe_load(f)["model"]
    assert shipped["class_path"] == "hiermoe_lightning.hf.HFCausalLM"
    assert shipped["init_args"]["config"] == e2e.HF_QWEN3_MOE_TINY


def test_hf_qwen3_moe_tiny_trains_flat_and_auto():
    pytest.importorskip("transformers")
    r = e2e.run(parse([*HF_TINY, "--model", "hf-qwen3-moe-tiny", "--dispatch", "flat,auto"]))
    assert r["model_name"] == "hf-qwen3-moe-tiny" and r["model_class"] == "hiermoe_lightning.hf.HFCausalLM"
    assert r["model"]["config"] == e2e.HF_QWEN3_MOE_TINY and r["model"]["seed"] == 0
    for name in ("flat", "auto"):
        check_result(r["results"][name])
    flat, auto = r["results"]["flat"], r["results"]["auto"]
    assert flat["dispatch_resolved"] == ["flat", "flat"]  # both converted Qwen3-MoE blocks
    assert auto["loss_first"] == pytest.approx(flat["loss_first"], rel=1e-5)
    assert auto["flat_bytes_by_level"] == flat["flat_bytes_by_level"]
    text = e2e.format_report(r)
    assert "hf-qwen3-moe-tiny (qwen3_moe hidden 64, 2 layers, 16 experts top-4, expert FFN 32)" in text


@pytest.mark.parametrize("argv, match", [
    (["--model", "nope"], "--model must be one of moegpt, hf-qwen3-moe-tiny or a YAML file"),
    (["--model", "hf-qwen3-moe-tiny", "--optimizer", "sgd"], "AdamW only"),
])
def test_bad_model_fails_before_spawning(argv, match):
    with pytest.raises(ValueError, match=match):
        e2e.run(parse([*HF_TINY, *argv]))


def test_model_yaml_needs_a_model_section_with_moe_layers(tmp_path):
    pytest.importorskip("transformers")
    empty = tmp_path / "empty.yaml"
    empty.write_text("trainer: {}\n")
    with pytest.raises(ValueError, match="expected a 'model' section with a class_path"):
        e2e.run(parse([*HF_TINY, "--model", str(empty)]))
    odd = tmp_path / "odd.yaml"  # 6 experts do not divide over 4 ranks
    odd.write_text("model:\n  class_path: hiermoe_lightning.hf.HFCausalLM\n  init_args:\n    config: "
                   + json.dumps(dict(e2e.HF_QWEN3_MOE_TINY, num_experts=6)) + "\n")
    with pytest.raises(ValueError, match="6 experts, not divisible by the 4 ranks"):
        e2e.run(parse([*HF_TINY, "--model", str(odd)]))


# ---------------------------------------------------------------------------------------------- clustered routing
def test_router_cluster_flags_reach_moegpt():
    assert parse([]).router_clusters == 0 and parse([]).router_cluster_strength is None
    assert "router_clusters" not in e2e._model_kwargs(parse([]))  # off: MoEGPT's keyword arguments as before
    from hiermoe_lightning.models.clustered_routing import DEFAULT_STRENGTH

    kwargs = e2e._model_kwargs(parse(["--router-clusters", "2"]))
    assert (kwargs["router_clusters"], kwargs["router_cluster_strength"]) == (2, DEFAULT_STRENGTH)
    kwargs = e2e._model_kwargs(parse(["--router-clusters", "4", "--router-cluster-strength", "1.5"]))
    assert (kwargs["router_clusters"], kwargs["router_cluster_strength"]) == (4, 1.5)
    from hiermoe_lightning.models import MoEGPT

    model = MoEGPT(**{**kwargs, "num_layers": 1, "hidden_size": 32, "num_heads": 2})
    assert model.hparams.router_clusters == 4 and model.hparams.router_cluster_strength == 1.5


@pytest.mark.parametrize("argv, match", [
    (["--router-clusters", "3"], r"--router-clusters must be 0 \(off\) or a divisor of num_experts \(8\)"),
    (["--router-clusters", "-1"], "--router-clusters"),
    (["--router-cluster-strength", "2"], "--router-cluster-strength needs --router-clusters"),
    (["--router-clusters", "2", "--router-cluster-strength", "-1"], "--router-cluster-strength"),
    (["--router-clusters", "2", "--model", "hf-qwen3-moe-tiny"], "--router-clusters applies to --model moegpt only"),
])
def test_bad_router_cluster_flags_fail_before_spawning(argv, match):
    with pytest.raises((ValueError, TypeError), match=match):
        e2e._resolve(parse([*TINY, *argv]))


def _raw_run(flags: list[bool], **extra) -> dict:
    """One repeat's rank-0 result as the step timer returns it (a swaps variant: with the plan-step fields)."""
    return {"elapsed_s": 1.0, "step_seconds": [0.1 if f else 0.01 for f in flags], "sent": [1.0, 1.0],
            "flat": [2.0, 1.0], "swaps": 1, "plan_seconds": 0.0, "migration_seconds": 0.0, "plans": {"count": 1},
            "dispatch_resolved": ["hd2"], "losses": [3.0, 2.0], "plan_started_steps": [2], "plan_applied_steps": [3],
            "timed_global_steps": [2, 3, 4][:len(flags)], "timed_plan_flags": flags, **extra}


def test_plan_steps_split_the_step_times():
    r = e2e._summarise([_raw_run([True, True, False]), _raw_run([True, True, False])], tokens_per_step=10, steps=3,
                       num_levels=2)
    assert r["step_ran_plan"] == [True, True, False] * 2 and len(r["step_ms"]) == 6
    assert r["step_ms_median_plan_steps"] == pytest.approx(100.0)
    assert r["step_ms_median_other_steps"] == pytest.approx(10.0)
    assert r["plan_started_steps"] == [2] and r["plan_applied_steps"] == [3]
    assert "100.0 ms on the 4 timed steps that started or applied a plan, 10.0 ms on the other 2" in \
        e2e._plan_step_line(r)
    empty = e2e._summarise([_raw_run([False, False, False])], 10, 3, 2)  # a callback that keeps no plan steps
    assert empty["step_ms_median_plan_steps"] is None and empty["step_ms_median_other_steps"] == pytest.approx(10.0)
    assert "no timed step started or applied a plan" in e2e._plan_step_line(empty)
    no_swaps = {k: v for k, v in _raw_run([False]).items() if not k.startswith(("timed_", "plan_started",
                                                                                 "plan_applied"))}
    assert not {"step_ran_plan", "step_ms_median_plan_steps"} & set(e2e._summarise([no_swaps], 10, 1, 2))


def test_report_says_the_routing_is_clustered():
    shares = {"auto": {"first": 0.80, "last": 0.90}, e2e.SWAPS_VARIANT: {"first": 0.82, "last": 0.86}}
    results = {name: e2e._summarise([_raw_run([True, False], within_cluster_share=share)], 10, 2, 2)
               for name, share in shares.items()}
    model = e2e._model_kwargs(parse(["--router-clusters", "2", "--router-cluster-strength", "4"]))
    rc = e2e._router_clustering(model, results)
    assert rc["clusters"] == 2 and rc["strength"] == 4.0 and rc["chance_share"] == pytest.approx(0.5952, abs=1e-4)
    assert rc["within_cluster_share_first"] == pytest.approx(0.81)
    assert rc["within_cluster_share_last"] == pytest.approx(0.88)
    report = {"topology": "2x2", "world_size": 4, "model": model, "model_name": "moegpt", "seq_len": 128,
              "batch_size_per_rank": 8, "tokens_per_step": 4096, "steps": 2, "warmup_steps": 1, "results": results,
              "link_costs": "paper-a6000", "auto_interval": 50, "router_clustering": rc,
              "swaps": {"plan_every_n_steps": 1, "max_swaps_per_plan": 4, "charge_migration": True}}
    text = e2e.format_report(report)
    assert ("routing clustered: 2 interleaved expert clusters, strength 4; within-cluster share 81.0% at the first "
            "step, 88.0% at the last") in text
    assert "auto+swaps: median step 100.0 ms on the 1 timed steps that started or applied a plan, 10.0 ms on the " \
           "other 1" in text
    json.dumps(report)
