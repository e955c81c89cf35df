"""A broken checkpoint is one line naming the path and what is wrong, raised on every rank before any collective."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from hiermoe_lightning.faults import CheckpointError
from hiermoe_lightning.faults.checkpoint_checks import (check_sharded_checkpoint, explain_state_dict_mismatch,
                                                        hparam_differences, load_full_checkpoint)
from tests.lightning_harness import fit

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A full and a sharded checkpoint of a short 2-rank run."""
    root = str(tmp_path_factory.mktemp("ckpts"))
    full, sharded = os.path.join(root, "full.ckpt"), os.path.join(root, "sharded.ckpt")
    fit(root, 2, dispatch="flat", save_path=full, tag="full", samples=16)
    fit(root, 2, dispatch="flat", save_path=sharded, tag="sharded", samples=16, checkpoint_format="sharded")
    return {"root": root, "full": full, "sharded": sharded}


def _resume(root, path, **kwargs):
    return fit(root, 2, dispatch="flat", ckpt_path=path, tag="resume", samples=16, max_epochs=2, **kwargs)


def test_truncated_file(checkpoints, tmp_path):
    data = open(checkpoints["full"], "rb").read()
    path = str(tmp_path / "truncated.ckpt")
    open(path, "wb").write(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"^checkpoint .*truncated\.ckpt: truncated: the file \(\d+ bytes\)"):
        _resume(checkpoints["root"], path)


def test_not_a_checkpoint(checkpoints, tmp_path):
    path = str(tmp_path / "notes.ckpt")
    open(path, "w").write("these are not the weights you are looking for\n")
    with pytest.raises(ValueError, match=r"notes\.ckpt: not a readable checkpoint"):
        _resume(checkpoints["root"], path)
    plain = str(tmp_path / "plain.pt")
    torch.save({"weights": torch.zeros(2)}, plain)
    with pytest.raises(CheckpointError, match=r"plain\.pt: not a Lightning checkpoint \(no 'state_dict'"):
        load_full_checkpoint(plain)


def test_missing_shard_file_is_named(checkpoints, tmp_path):
    import shutil

    broken = str(tmp_path / "broken.ckpt")
    shutil.copytree(checkpoints["sharded"], broken)
    shard = sorted(f for f in os.listdir(broken) if f.endswith(".distcp"))[-1]
    os.remove(os.path.join(broken, shard))
    with pytest.raises(ValueError, match=rf"broken\.ckpt: missing shard file {shard}"):
        _resume(checkpoints["root"], broken)
    # and a shard cut short
    shutil.rmtree(broken)
    shutil.copytree(checkpoints["sharded"], broken)
    with open(os.path.join(broken, shard), "r+b") as f:
        f.truncate(8)
    with pytest.raises(CheckpointError, match=rf"truncated shard file {shard} \(8 bytes"):
        check_sharded_checkpoint(broken, "hiermoe_meta.pt")


def test_other_experts_or_shapes(checkpoints):
    with pytest.raises(ValueError, match=r"full\.ckpt: the model was built with other arguments than the "
                                         r"checkpoint's: num_experts=16 \(checkpoint: 8\)"):
        _resume(checkpoints["root"], checkpoints["full"], model_kwargs={"num_experts": 16})
    # the shape check behind it, for checkpoints without hyper-parameters: the first mismatch and a count
    try:
        torch.nn.Linear(3, 4).load_state_dict({"weight": torch.zeros(5, 3), "bias": torch.zeros(5)})
    except RuntimeError as e:
        text = explain_state_dict_mismatch(e)
    assert text == "the model does not match: weight has shape [5, 3] in the checkpoint but [4, 3] in the model " \
                   "(and 1 more)"
    assert hparam_differences({"a": 1, "b": (1, 2), "_x": 0}, {"a": 1.0, "b": [1, 3], "_x": 1}) == \
        ["b=[1, 3] (checkpoint: (1, 2))"]


def test_cli_prints_one_line_and_exits_2(checkpoints, tmp_path):
    path = str(tmp_path / "cut.ckpt")
    data = open(checkpoints["full"], "rb").read()
    open(path, "wb").write(data[:1000])
    config = tmp_path / "c.yaml"
    config.write_text("trainer: {accelerator: cpu, devices: 1, logger: false, max_steps: 1}\n"
                      "model: {class_path: hiermoe_lightning.models.MoEGPT, init_args: {seq_len: 16, hidden_size: 32}}\n"
                      "data: {class_path: hiermoe_lightning.data.ByteTextDataModule, init_args: {seq_len: 16}}\n")
    proc = subprocess.run([sys.executable, "-m", "hiermoe_lightning", "fit", "--config", str(config),
                           "--ckpt_path", path], capture_output=True, text=True, timeout=120, cwd=str(tmp_path))
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("hiermoe:")]
    assert lines == [f"hiermoe: error: checkpoint {path}: truncated: the file (1000 bytes) ends before its zip "
                     f"directory; it was not written or copied completely"]
    assert "Traceback" not in proc.stderr
