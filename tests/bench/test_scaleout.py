"""``hiermoe bench scaleout``: every variant trains the same model to the same loss (they all equal one process),
FSDP holds a quarter of the dense state per rank, the memory count is exact, and bad variants fail naming the flag."""

import json

import pytest
import torch

from hiermoe_lightning.bench.memory import state_bytes
from hiermoe_lightning.bench.scaleout import parse_variant
from hiermoe_lightning.cli import main as cli
from hiermoe_lightning.models import MoEGPT


def test_bench_scaleout_variants_agree_and_fsdp_holds_a_quarter(capsys):
    assert cli.main(["bench", "scaleout", "--variants", "ep4-ddp,ep4-fsdp,ep2-ddp", "--batch-size", "1",
                     "--steps", "1", "--warmup-steps", "0", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    results = res["results"]
    assert set(results) == {"ep4-ddp", "ep4-fsdp", "ep2-ddp"}
    losses = torch.tensor([r["loss_last"] for r in results.values()])
    torch.testing.assert_close(losses, losses[:1].expand(3), atol=1e-5, rtol=1e-5)
    assert results["ep4-fsdp"]["dense_share_vs_ddp"] <= res["fsdp_dense_share_target"]
    assert results["ep2-ddp"]["replicas"] == 2
    # two replicas hold every expert twice: each rank has twice the experts of EP=4
    for kind in ("params", "grads"):
        assert results["ep2-ddp"]["state_bytes_per_rank"]["expert"][kind] == \
            2 * results["ep4-ddp"]["state_bytes_per_rank"]["expert"][kind]
    assert res["variant_options"]["ep2-ddp"] == {"expert_parallel_size": 2, "topology": "1x2", "dense_sharding": "ddp"}


@pytest.mark.parametrize("name, match", [("ep3-ddp", "must divide the world size"), ("ep4-zero", "is not ep<E>"),
                                         ("fsdp", "is not ep<E>")])
def test_bad_variants_name_the_flag(name, match, capsys):
    assert cli.main(["bench", "scaleout", "--variants", name]) == 2
    err = capsys.readouterr().err
    assert "--variants" in err and match in err


def test_parse_variant_gives_the_strategy_arguments():
    assert parse_variant("ep4-fsdp-keep", 4, 2) == (4, {"expert_parallel_size": 4, "topology": "2x2",
                                                         "dense_sharding": "fsdp",
                                                         "fsdp_reshard_after_forward": False})


def test_state_bytes_counts_params_grads_and_adam_moments():
    model = MoEGPT(vocab_size=256, seq_len=8, num_layers=1, hidden_size=16, num_heads=2, ffn_hidden_size=8,
                   num_experts=4, top_k=2)
    opt = torch.optim.AdamW(model.parameters())
    x = torch.randint(0, 256, (2, 8))
    model(x).sum().backward()
    opt.step()
    out = state_bytes(model, [opt])
    expert = 3 * 4 * 16 * 8 * 4  # w_gate, w_up, w_down: [4, 16, 8] float32
    total = sum(p.numel() for p in model.parameters()) * 4
    assert out["expert"]["params"] == out["expert"]["grads"] == expert
    assert out["dense"]["params"] == total - expert
    # AdamW: exp_avg and exp_avg_sq per parameter, plus a 0-dim float32 step each
    assert out["dense"]["optimizer"] + out["expert"]["optimizer"] == 2 * total + 4 * len(list(model.parameters()))
