"""``HFCausalLM``: a LightningModule over a Hugging Face causal LM whose sparse-MoE blocks run as ``MoELayer``s.

Built from a config dict (tiny random models, e.g. ``configs/hf-qwen3-moe-tiny.yaml``) or a local pretrained
directory, then converted in place (:func:`~hiermoe_lightning.hf.convert_`), so ``HierMoEStrategy`` shards its experts
and deduplicates its all-to-alls like the bundled model's. Batches are ``(inputs [B, S], targets [B, S])`` int64 (the
targets already shifted, as :class:`~hiermoe_lightning.data.ByteTextDataModule` gives them); the loss is the mean
token cross-entropy plus the MoE layers' aux losses; validation and test log loss, perplexity and accuracy.
"""

from __future__ import annotations

import json
import os
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from typing_extensions import override

from ..checkpoint import moe_layers
from ..models.lm_metrics import TokenMetrics
from ..validation import check_int, check_number

__all__ = ["HFCausalLM"]


class HFCausalLM(pl.LightningModule):
    """A Hugging Face causal LM, its MoE blocks converted, as a LightningModule.

    Args:
        config: the model's config as a dict with its ``model_type`` (``AutoConfig.for_model(**config)``): a new
            model, every rank drawing the same weights from ``seed``. Exactly one of ``config`` and ``pretrained``.
        pretrained: a local directory ``AutoModelForCausalLM.from_pretrained`` reads (config + safetensors).
        lr / weight_decay / betas: AdamW.
        seed: the seed of a new model's weights.
    """

    def __init__(self, config: dict | None = None, pretrained: str | None = None, *, lr: float = 3e-4,
                 weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.95), seed: int = 0):
        super().__init__()
        if (config is None) == (pretrained is None):
            raise ValueError("HFCausalLM needs exactly one of config (a dict with model_type) and pretrained "
                             f"(a local directory), got config={config!r} and pretrained={pretrained!r}")
        if config is not None and (not isinstance(config, dict) or "model_type" not in config):
            raise ValueError(f"config must be a dict with a 'model_type' key (e.g. 'qwen3_moe'), got {config!r}")
        if pretrained is not None and not os.path.isdir(str(pretrained)):
            raise ValueError(f"pretrained must be a local directory of a Hugging Face model (config.json + "
                             f"safetensors), got {pretrained!r}: no such directory")
        check_number(lr, "lr", low=0.0, low_open=True)
        check_number(weight_decay, "weight_decay", low=0.0)
        check_int(seed, "seed", 0)
        self.save_hyperparameters()
        self.model = _build(config, pretrained, seed)
        from . import convert_

        self.converted = convert_(self.model)
        vocab = self.model.config.vocab_size
        self.val_metrics, self.test_metrics = TokenMetrics(vocab), TokenMetrics(vocab)

    @override
    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """``inputs`` ``[B, S]`` int64 -> logits ``[B, S, V]``."""
        return self.model(input_ids=inputs, use_cache=False).logits

    def aux_loss(self) -> torch.Tensor:
        """0-dim sum of the converted MoE layers' ``aux_loss`` from the last forward."""
        layers = moe_layers(self.model).values()
        return sum((layer.aux_loss for layer in layers), torch.zeros((), device=self.device))

    def _loss(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, targets = batch
        logits = self(inputs)
        return logits, F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))

    @override
    def training_step(self, batch, batch_idx: int = 0) -> torch.Tensor:
        _, lm_loss = self._loss(batch)
        aux = self.aux_loss()
        self.log("train/loss", lm_loss, prog_bar=True)
        self.log("train/aux_loss", aux)
        return lm_loss + aux

    def _evaluate(self, batch, metrics: TokenMetrics, prefix: str) -> torch.Tensor:
        logits, lm_loss = self._loss(batch)
        metrics.update(logits, batch[1])
        self.log(f"{prefix}/loss", lm_loss, prog_bar=prefix == "val", sync_dist=True)
        metrics.log(self, prefix)
        return lm_loss

    @override
    def validation_step(self, batch, batch_idx: int = 0) -> torch.Tensor:
        return self._evaluate(batch, self.val_metrics, "val")

    @override
    def test_step(self, batch, batch_idx: int = 0) -> torch.Tensor:
        return self._evaluate(batch, self.test_metrics, "test")

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the model's Hugging Face config in every checkpoint (``hiermoe export`` rebuilds the model from it,
        also when it came from a ``pretrained`` directory that is gone by then)."""
        from .checkpoint_export import HF_CONFIG_KEY

        checkpoint[HF_CONFIG_KEY] = json.loads(self.model.config.to_json_string())

    @override
    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, betas=tuple(self.hparams.betas),
                                 weight_decay=self.hparams.weight_decay)


def _build(config: dict | None, pretrained: str | None, seed: int):
    from transformers import AutoConfig, AutoModelForCausalLM

    if pretrained is not None:
        return AutoModelForCausalLM.from_pretrained(pretrained)
    cfg = dict(config)
    hf_config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # every rank draws the same weights
        return AutoModelForCausalLM.from_config(hf_config)
