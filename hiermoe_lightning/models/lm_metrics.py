"""Validation and test metrics of a causal language model, as torchmetrics objects.

Perplexity and next-token accuracy are accumulated over the whole epoch and reduced over every rank when Lightning
computes them (torchmetrics' own synchronisation), so a sharded run reports the same numbers as one process on the
same data, not a mean of per-batch or per-rank values. Shared by the bundled :class:`~hiermoe_lightning.models.
MoEGPT` and any other LightningModule over a causal LM.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy
from torchmetrics.text import Perplexity

__all__ = ["TokenMetrics"]


class TokenMetrics(nn.Module):
    """Epoch perplexity (``exp`` of the mean token cross-entropy) and top-1 next-token accuracy.

    ``update(logits [B, S, V], targets [B, S])`` each batch, then :meth:`log` from the step: Lightning logs the
    epoch value under ``{prefix}/perplexity`` and ``{prefix}/accuracy``. Targets equal to ``ignore_index`` (e.g.
    padding) count in neither.

    Never built on the meta device: inside ``with torch.device("meta")`` (e.g. a model built by
    ``trainer.init_module(empty_init=True)``) the states are made on the CPU instead, since nothing would ever
    materialise them (they are neither parameters nor buffers) and they are tiny; Lightning moves them with the model.
    Under any other default device they are made there, as before."""

    def __init__(self, vocab_size: int, ignore_index: int | None = None):
        super().__init__()
        on_meta = torch.get_default_device().type == "meta"
        with torch.device("cpu") if on_meta else contextlib.nullcontext():
            self.perplexity = Perplexity(ignore_index=ignore_index)
            self.accuracy = MulticlassAccuracy(num_classes=vocab_size, average="micro",
                                               ignore_index=ignore_index)

    @torch.no_grad()
    def update(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        logits = logits.detach().float()
        self.perplexity.update(logits, targets)
        self.accuracy.update(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

    def log(self, module, prefix: str, **kwargs) -> None:
        """Log both metric objects from ``module`` (a LightningModule), reduced at the end of the epoch."""
        module.log(f"{prefix}/perplexity", self.perplexity, on_step=False, on_epoch=True, **kwargs)
        module.log(f"{prefix}/accuracy", self.accuracy, on_step=False, on_epoch=True, **kwargs)
