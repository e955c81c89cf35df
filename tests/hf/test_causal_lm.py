"""HFCausalLM: a converted Hugging Face causal LM as a LightningModule, from a config dict or a local directory,
and from LightningCLI with the shipped config."""

from __future__ import annotations

import pathlib

import pytest
import torch

pytest.importorskip("transformers")

from hiermoe_lightning.cli.lightning_cli import run_lightning_cli  # noqa: E402
from hiermoe_lightning.hf import HFCausalLM  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]
TINY = dict(model_type="qwen3_moe", vocab_size=256, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_experts=8,
            num_experts_per_tok=2, max_position_embeddings=64)


def test_a_new_model_is_the_hf_model_of_its_seed_converted():
    from transformers import AutoConfig, AutoModelForCausalLM

    module = HFCausalLM(config=TINY, seed=3)
    assert len(module.converted) == 2
    cfg = dict(TINY)
    torch.manual_seed(3)
    reference = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg))
    inputs = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(module(inputs), reference(input_ids=inputs, use_cache=False).logits,
                                   rtol=1e-5, atol=1e-5)
    assert torch.equal(HFCausalLM(config=TINY, seed=3)(inputs), module(inputs))  # every rank draws the same


def test_a_pretrained_directory_loads_with_its_weights(tmp_path):
    module = HFCausalLM(config=TINY, seed=1)
    from transformers import AutoConfig, AutoModelForCausalLM

    from hiermoe_lightning.hf import to_hf_state_dict

    cfg = dict(TINY)
    hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg))
    hf.load_state_dict(to_hf_state_dict(module.model), strict=True)
    hf.save_pretrained(tmp_path / "model")
    loaded = HFCausalLM(pretrained=str(tmp_path / "model"))
    inputs = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(loaded(inputs), module(inputs), rtol=1e-5, atol=1e-5)


def test_bad_arguments_name_what_is_wrong(tmp_path):
    with pytest.raises(ValueError, match="exactly one of config"):
        HFCausalLM()
    with pytest.raises(ValueError, match="exactly one of config"):
        HFCausalLM(config=TINY, pretrained=str(tmp_path))
    missing = str(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="nowhere.*no such directory"):
        HFCausalLM(pretrained=missing)
    with pytest.raises(ValueError, match="model_type"):
        HFCausalLM(config={"hidden_size": 8})


def test_the_shipped_config_trains_on_two_forked_ranks(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["--config", str(ROOT / "configs" / "hf-qwen3-moe-tiny.yaml"), "--trainer.devices", "2",
            "--trainer.strategy.init_args.topology", "2", "--trainer.strategy.init_args.start_method", "fork",
            "--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
            "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path),
            "--data.init_args.max_train_samples", "32", "--data.init_args.batch_size", "2"]
    assert run_lightning_cli("fit", args) == 0


def test_the_shipped_deepseek_config_builds_a_converted_model():
    import yaml

    cfg = yaml.safe_load((ROOT / "configs" / "hf-deepseek-v3-tiny.yaml").read_text())
    module = HFCausalLM(**cfg["model"]["init_args"])
    assert module.converted == ["model.layers.1.mlp", "model.layers.2.mlp"]  # layer 0 stays dense
    logits = module(torch.randint(0, 256, (1, 8)))
    assert logits.shape == (1, 8, 256) and torch.isfinite(logits).all()


def test_the_optimizer_is_chosen_by_name():
    sgd = HFCausalLM(config=TINY, optimizer="sgd", momentum=0.9, lr=0.1).configure_optimizers()
    assert type(sgd) is torch.optim.SGD and sgd.defaults["momentum"] == 0.9 and sgd.defaults["lr"] == 0.1
    adamw = HFCausalLM(config=TINY, betas=(0.8, 0.9)).configure_optimizers()
    assert type(adamw) is torch.optim.AdamW and adamw.defaults["betas"] == (0.8, 0.9)
    with pytest.raises(ValueError, match="optimizer"):
        HFCausalLM(config=TINY, optimizer="lion")
