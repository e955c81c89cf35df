"""Validation/test metrics through torchmetrics: epoch perplexity and next-token accuracy, reduced over ranks."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from hiermoe_lightning import HierMoEStrategy
from hiermoe_lightning.data import ByteTextDataModule
from hiermoe_lightning.models import MoEGPT
from hiermoe_lightning.models.lm_metrics import TokenMetrics
from tests.lightning_harness import MODEL


def test_epoch_perplexity_and_accuracy_pool_every_token_not_batch_means():
    g = torch.Generator().manual_seed(0)
    metrics = TokenMetrics(vocab_size=7)
    batches = [(torch.randn(2, 5, 7, generator=g) * 3, torch.randint(0, 7, (2, 5), generator=g)),
               (torch.randn(1, 5, 7, generator=g) * 3, torch.randint(0, 7, (1, 5), generator=g))]
    for logits, targets in batches:
        metrics.update(logits, targets)
    logits = torch.cat([b[0].reshape(-1, 7) for b in batches])
    targets = torch.cat([b[1].reshape(-1) for b in batches])
    torch.testing.assert_close(metrics.perplexity.compute(), F.cross_entropy(logits, targets).exp())
    torch.testing.assert_close(metrics.accuracy.compute(), (logits.argmax(-1) == targets).float().mean())


def test_metric_states_are_never_built_on_meta():
    with torch.device("meta"):
        metrics = TokenMetrics(vocab_size=7)
    states = [metrics.perplexity.total_log_probs, metrics.perplexity.count, metrics.accuracy.tp]
    assert all(t.device.type == "cpu" for t in states)
    metrics.update(torch.randn(1, 3, 7), torch.tensor([[1, 2, 3]]))
    metrics.perplexity.reset()  # the defaults it resets to are real too
    assert metrics.perplexity.count.device.type == "cpu" and metrics.perplexity.count == 0
    with torch.device("meta"):  # the surrounding meta block is left as it was
        TokenMetrics(vocab_size=7)
        assert torch.empty(1).is_meta


def _validate(world: int, tmp: str, empty_init: bool = False) -> dict:
    """``empty_init``: the model is built by ``trainer.init_module(empty_init=True)`` (on meta; the strategy
    materialises it on each rank)."""
    data = Subset(ByteTextDataModule(seq_len=MODEL["seq_len"], batch_size=1).train_dataset, range(16))
    strategy = HierMoEStrategy(topology=str(world), dispatch="hd1", start_method="fork", timeout=60) if world > 1 \
        else "auto"
    trainer = pl.Trainer(accelerator="cpu", devices=world, strategy=strategy, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp)
    with trainer.init_module(empty_init=empty_init):
        model = MoEGPT(**MODEL)
    assert all(p.is_meta for p in model.parameters()) == empty_init
    return trainer.validate(model, dataloaders=DataLoader(data, batch_size=4, shuffle=False), verbose=False)[0]


def test_validation_logs_perplexity_and_accuracy_and_two_ranks_report_what_one_process_does(tmp_path):
    one = _validate(1, str(tmp_path))
    two = _validate(2, str(tmp_path))
    assert set(one) == {"val/loss", "val/perplexity", "val/accuracy"}
    assert 1.0 < one["val/perplexity"] < 1000.0 and 0.0 <= one["val/accuracy"] <= 1.0
    for key in ("val/perplexity", "val/accuracy"):
        assert abs(two[key] - one[key]) <= 1e-4 * max(1.0, abs(one[key])), (key, one[key], two[key])


def test_a_model_built_on_meta_validates_on_two_ranks_like_one_process(tmp_path):
    one = _validate(1, str(tmp_path))
    two = _validate(2, str(tmp_path), empty_init=True)
    for key in ("val/loss", "val/perplexity", "val/accuracy"):
        assert abs(two[key] - one[key]) <= 1e-4 * max(1.0, abs(one[key])), (key, one[key], two[key])
