"""``python examples/train_hf_moe.py``: a real two-rank run (Lightning's script launcher re-runs the script as rank 1)
that trains a converted Hugging Face model, saves a checkpoint *after* fit (a collective the other rank must still
join: the launcher must not wait for it to exit at the end of fit) and exports it for transformers."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

from hiermoe_lightning.testing.fit_process import user_environment  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_the_example_trains_on_two_ranks_and_exports_a_model_transformers_loads(tmp_path):
    from transformers import AutoModelForCausalLM

    env = user_environment()
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "train_hf_moe.py"), "--devices", "2",
                           "--topology", "2", "--steps", "2", "--out", str(out)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=240, start_new_session=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Hugging Face model in" in proc.stdout
    model = AutoModelForCausalLM.from_pretrained(out / "hf")
    logits = model(input_ids=torch.randint(0, 256, (1, 8)), use_cache=False).logits
    assert logits.shape == (1, 8, 256) and torch.isfinite(logits).all()
