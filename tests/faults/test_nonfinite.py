"""check_finite: a NaN in one rank's router logits raises on every rank, naming the layer, the rank and the step,
before the optimizer step applies it; without it training goes on silently (the old behaviour, for contrast)."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from hiermoe_lightning import HierMoEStrategy
from hiermoe_lightning.faults import NonFiniteError
from hiermoe_lightning.faults.consensus import agree, local_flags
from hiermoe_lightning.models import MoEGPT
from tests.lightning_harness import MODEL, FixedOrderData

pytestmark = pytest.mark.timeout(180)


class PoisonRouter(pl.Callback):
    """At global step ``step`` on rank ``rank``, put a NaN into the first MoE layer's router weight."""

    def __init__(self, step: int, rank: int):
        self.step, self.rank = step, rank

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step and trainer.global_rank == self.rank:
            layer = next(m for m in pl_module.modules() if type(m).__name__ == "MoELayer")
            with torch.no_grad():
                layer.router.weight[0, 0] = float("nan")


class Steps(pl.Callback):
    def __init__(self):
        self.count = 0

    def on_train_batch_end(self, *args):
        self.count += 1


def _fit(tmp_path, check_finite: bool):
    strategy = HierMoEStrategy(topology="2", dispatch="flat", start_method="fork", timeout=120,
                               check_finite=check_finite)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=4, logger=False,
                         callbacks=[PoisonRouter(step=2, rank=1)], enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                         default_root_dir=str(tmp_path), num_sanity_val_steps=0, limit_val_batches=0)
    model = MoEGPT(**MODEL)
    trainer.fit(model, datamodule=FixedOrderData(2))
    return trainer, model


def test_nan_router_raises_on_every_rank_with_layer_rank_and_step(tmp_path):
    with pytest.raises(NonFiniteError) as info:  # a FloatingPointError
        _fit(tmp_path, check_finite=True)
    assert isinstance(info.value, FloatingPointError)
    message = str(info.value)
    assert "at step 2" in message
    assert "the router logits of layer 'blocks.0.ffn' on rank 1" in message
    assert "optimizer step was not applied" in message


def test_without_check_finite_the_run_goes_on_and_nan_spreads(tmp_path):
    trainer, model = _fit(tmp_path, check_finite=False)
    assert trainer.state.finished
    # the parent holds rank 0's trained (unsharded) weights: the optimizer steps carried the NaN into them
    assert any(not torch.isfinite(p).all() for p in model.parameters())


def test_agree_reads_every_rank_flags_alone():
    flags = local_flags(15, True, [torch.tensor(False), torch.tensor(True)], torch.device("cpu"))
    verdict = agree(flags, ["a", "b"])
    assert verdict.stop_signal == 15
    assert verdict.nonfinite == {"loss": [0], "b": [0]}
    assert agree(local_flags(0, False, [], torch.device("cpu")), []).nonfinite == {}
