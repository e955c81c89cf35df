"""``hiermoe export`` (the command): a Hugging Face model trained on several ranks (full or sharded checkpoint) comes out as a
directory that ``AutoModelForCausalLM.from_pretrained`` loads with the trained model's logits."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

pytest.importorskip("transformers")

from hiermoe_lightning import HierMoEStrategy  # noqa: E402
from hiermoe_lightning.cli.main import main  # noqa: E402
from hiermoe_lightning.hf import HFCausalLM  # noqa: E402
from tests.hf.test_causal_lm import TINY  # noqa: E402
from tests.lightning_harness import FixedOrderData, SaveAtEnd  # noqa: E402

DEEPSEEK = dict(model_type="deepseek_v3", vocab_size=256, hidden_size=32, intermediate_size=64,
                moe_intermediate_size=16, num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=2,
                num_key_value_heads=2, q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
                v_head_dim=8, n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1, n_shared_experts=1,
                routed_scaling_factor=2.5, max_position_embeddings=64)


def _train(tmp_path, config: dict, checkpoint_format: str):
    module = HFCausalLM(config=config, lr=1e-2, seed=4)
    path = str(tmp_path / ("model.ckpt" if checkpoint_format == "full" else "sharded"))
    strategy = HierMoEStrategy(topology="2", dispatch="hd1", start_method="fork", timeout=60,
                               checkpoint_format=checkpoint_format)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=3, logger=False,
                         callbacks=[SaveAtEnd(path)], enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, use_distributed_sampler=False, limit_val_batches=0,
                         num_sanity_val_steps=0, default_root_dir=str(tmp_path))
    trainer.fit(module, datamodule=FixedOrderData(2, 24))
    return module, path  # the parent's module holds the trained (unsharded) weights


@pytest.mark.parametrize("config, checkpoint_format", [(TINY, "full"), (TINY, "sharded"), (DEEPSEEK, "sharded")],
                         ids=["qwen3-full", "qwen3-sharded", "deepseek-v3-sharded"])
def test_export_loads_in_transformers_with_the_trained_logits(tmp_path, capsys, config, checkpoint_format):
    from transformers import AutoModelForCausalLM

    trained, ckpt = _train(tmp_path, config, checkpoint_format)
    untrained = HFCausalLM(config=config, lr=1e-2, seed=4)
    out = str(tmp_path / "hf")
    assert main(["export", "--ckpt", ckpt, "--out", out]) == 0
    assert "exported" in capsys.readouterr().out
    loaded = AutoModelForCausalLM.from_pretrained(out)
    inputs = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = trained(inputs)
        torch.testing.assert_close(loaded(input_ids=inputs, use_cache=False).logits, expected, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(untrained(inputs), expected, atol=1e-3)  # training moved the logits


def test_export_names_a_checkpoint_that_is_not_a_hugging_face_model(tmp_path, capsys):
    bogus = tmp_path / "other.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {}}, bogus)
    assert main(["export", "--ckpt", str(bogus), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "other.ckpt" in err and "HFCausalLM" in err and err.count("\n") == 1
