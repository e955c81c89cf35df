"""``hiermoe bench build``: both paths on small shapes; the meta path keeps only the rank's share and leaves nothing on
meta; the JSON names what the issue's targets compare."""

import json

from hiermoe_lightning.cli import main as cli

SMALL = ["--topology", "2", "--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "32",
         "--num-experts", "8", "--top-k", "2"]


def test_bench_build_json(capsys):
    assert cli.main(["bench", "build", *SMALL, "--paths", "today", "meta", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    share = 2 * 4 * 3 * 64 * 32 * 2 / 2**20  # layers x E/G x 3 x M x F x bf16 bytes
    assert res["world_size"] == 2 and abs(res["expert_share_per_rank_mib"] - share) < 1e-9
    for path in ("today", "meta"):
        for r in res["paths"][path]["per_rank"]:
            assert abs(r["kept_expert_mib"] - share) < 1e-9 and r["left_on_meta"] == 0
            assert r["total_s"] >= r["construct_s"] >= 0
    assert set(res["meta_vs_today"]) == {"time_ratio", "peak_ratio"}


def test_bench_build_table_and_one_path(capsys):
    assert cli.main(["bench", "build", *SMALL, "--paths", "meta"]) == 0
    out = capsys.readouterr().out
    assert "meta" in out and "today " not in out and "x share" in out


def test_bench_build_load_path_reads_only_each_ranks_experts(capsys):
    """The third path: a generated local HF checkpoint (per-expert keys, an index), each rank reading its experts."""
    import pytest

    pytest.importorskip("transformers")
    assert cli.main(["bench", "build", *SMALL, "--paths", "load", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    share = 2 * 4 * 3 * 64 * 32 * 2 / 2**20
    assert res["checkpoint"]["expert_layout"] == "per expert" and res["checkpoint"]["mib"] > 0
    for r in res["paths"]["load"]["per_rank"]:
        assert abs(r["kept_expert_mib"] - share) < 1e-9 and r["left_on_meta"] == 0
        # it read the dense weights and its own experts (half of them), not the whole checkpoint
        assert abs(r["read_mib"] - (r["dense_mib"] + share)) < 0.05 * r["read_mib"]
        assert r["read_mib"] < res["checkpoint"]["mib"]
        assert r["total_s"] >= r["construct_s"] + r["shard_s"] >= 0
    assert "peak_minus_dense_over_share" in res["paths"]["load"]["max"] and "load_vs_today" not in res
