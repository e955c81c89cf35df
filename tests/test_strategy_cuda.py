"""HierMoEStrategy on GPUs (marked ``cuda``: skipped without one; ``scripts/gpu-check.sh`` runs it).

The reference is the same model trained in one CPU process: the GPU run (every available GPU up to 2, one rank
each, NCCL for CUDA tensors) must record the same global losses, within float noise of another device."""

from __future__ import annotations

import pytest
import torch

from tests.lightning_harness import fit

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("dispatch", ["flat", "hd1"])
def test_strategy_on_gpus_trains_like_one_cpu_process(tmp_path, dispatch):
    world = min(2, torch.cuda.device_count())
    reference, _ = fit(str(tmp_path), 1, tag="cpu", samples=24, clip=1.0)
    losses, _ = fit(str(tmp_path), world, dispatch=dispatch, tag="gpu", samples=24, clip=1.0, accelerator="gpu")
    assert len(losses) == len(reference) == 3
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference), atol=2e-3, rtol=2e-3)
