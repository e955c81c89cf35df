"""`hiermoe fit --config ...`: LightningCLI with the strategy by registry name and by class_path."""

import os

import yaml

from hiermoe_lightning.cli.lightning_cli import run_lightning_cli

MODEL = {"class_path": "hiermoe_lightning.models.MoEGPT",
         "init_args": {"seq_len": 16, "num_layers": 1, "hidden_size": 16, "num_heads": 2, "ffn_hidden_size": 16,
                       "num_experts": 4, "top_k": 2}}
DATA = {"class_path": "hiermoe_lightning.data.ByteTextDataModule",
        "init_args": {"seq_len": "${model.init_args.seq_len}", "batch_size": 2, "max_train_samples": 16}}


def _config(tmp_path, strategy, devices):
    cfg = {"trainer": {"accelerator": "cpu", "devices": devices, "strategy": strategy, "max_steps": 2,
                       "limit_val_batches": 1, "num_sanity_val_steps": 0, "logger": False,
                       "enable_checkpointing": False, "enable_progress_bar": False,
                       "default_root_dir": str(tmp_path)},
           "model": MODEL, "data": DATA}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_strategy_by_registry_name_and_second_run_in_same_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = _config(tmp_path, "hiermoe", 1)
    assert run_lightning_cli("fit", ["--config", cfg]) == 0
    assert run_lightning_cli("fit", ["--config", cfg]) == 0  # saving the config again must not crash
    assert any(f.endswith("config.yaml") for _, _, files in os.walk(tmp_path) for f in files)


def test_strategy_by_class_path_on_two_forked_ranks(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    strategy = {"class_path": "hiermoe_lightning.HierMoEStrategy",
                "init_args": {"topology": "2x1", "dispatch": "hd2", "start_method": "fork", "timeout": 60}}
    assert run_lightning_cli("fit", ["--config", _config(tmp_path, strategy, 2)]) == 0
