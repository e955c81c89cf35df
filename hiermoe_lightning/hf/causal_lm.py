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
from .loading import build_meta_model, load_pretrained_
from ..models.lm_metrics import TokenMetrics
from ..models.optim import OPTIMIZERS, make_optimizer
from ..validation import check_choice, check_int, check_number

__all__ = ["HFCausalLM", "AUX_LOSSES", "IGNORE_INDEX"]

AUX_LOSSES = ("hf", "layers", "none")
IGNORE_INDEX = -100  # targets that count nowhere (padding), as in Hugging Face


class HFCausalLM(pl.LightningModule):
    """A Hugging Face causal LM, its MoE blocks converted, as a LightningModule.

    Args:
        config: the model's config as a dict with its ``model_type`` (``AutoConfig.for_model(**config)``): a new
            model, every rank drawing the same weights from ``seed``. Exactly one of ``config`` and ``pretrained``.
        pretrained: a local Hugging Face directory (config + safetensors): built on meta and filled by
            :func:`~hiermoe_lightning.hf.load_pretrained_` (the weights ``from_pretrained`` gives). Built under
            ``trainer.init_module(empty_init=True)`` with ``HierMoEStrategy``, only the dense weights are read at
            construction; each rank reads its own experts after sharding (:meth:`configure_model`), also when
            LightningCLI builds it. Called directly, outside a trainer, the first forward reads every expert.
        lr / weight_decay: the optimizer's; betas: Adam's and AdamW's; momentum: SGD's.
        optimizer: ``"adamw"`` (default), ``"adam"`` or ``"sgd"``.
        seed: the seed of a new model's weights.
        aux_loss: ``"hf"`` (default): Hugging Face's load-balancing loss, pooled over every MoE layer as HF pools it,
            padding excluded through the batch's attention mask, times the config's ``router_aux_loss_coef`` (the
            converted blocks report their router logits to HF: ``output_router_logits``); ``"layers"``: the sum of
            the MoE layers' own per-layer losses (``MoELayer.aux_loss``, no mask); ``"none"``.

    Batches are ``(inputs, targets)`` or ``(inputs, targets, attention_mask)`` (``[B, S]`` each; targets already
    shifted); with a mask, padded positions count neither in the loss nor in the metrics.
    """

    def __init__(self, config: dict | None = None, pretrained: str | None = None, *, lr: float = 3e-4,
                 weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.95), seed: int = 0,
                 aux_loss: str = "hf", optimizer: str = "adamw", momentum: float = 0.0):
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
        check_choice(aux_loss, "aux_loss", AUX_LOSSES)
        check_choice(optimizer, "optimizer", OPTIMIZERS)
        check_number(momentum, "momentum", low=0.0)
        self.save_hyperparameters()
        self.model = _build(config, pretrained, seed)
        from . import convert_

        self.converted = convert_(self.model)
        self._load_after_shard = False  # set by configure_model under HierMoEStrategy: on_after_shard loads
        self._experts_unchecked = pretrained is not None  # until a forward has seen them real (a cheap test per step)
        if pretrained is not None:  # built on meta: every weight from the checkpoint, none drawn first. The dense
            # weights now; the MoE layers wait on meta for the trainer's setup (configure_model), so under
            # HierMoEStrategy each rank reads only its own experts, however the module was built (Python,
            # init_module, LightningCLI); used without a trainer, the first forward reads them all
            default = torch.get_default_device()
            load_pretrained_(self.model, pretrained, parts="dense", device="cpu" if default.type == "meta" else default)
        vocab = self.model.config.vocab_size
        self.val_metrics = TokenMetrics(vocab, ignore_index=IGNORE_INDEX)
        self.test_metrics = TokenMetrics(vocab, ignore_index=IGNORE_INDEX)
        self._hf_aux: torch.Tensor | None = None  # HF's pooled loss of the last forward (aux_loss="hf")

    def _moe_pending(self) -> bool:
        """Whether MoE layers of a ``pretrained`` model still wait on meta for their weights."""
        return self.hparams.pretrained is not None and any(layer.is_meta for layer in moe_layers(self.model).values())

    @override
    def configure_model(self) -> None:
        """A ``pretrained`` model built on meta (``trainer.init_module(empty_init=True)`` under HierMoEStrategy) has
        its dense weights; its MoE layers wait on meta. Under ``HierMoEStrategy`` they stay there: the strategy
        shards them (allocating only this rank's experts, drawing nothing) and then calls :meth:`on_after_shard`,
        which reads this rank's experts. Under any other strategy they are loaded here, every expert."""
        if not self._moe_pending():
            return
        from ..strategy import HierMoEStrategy

        if isinstance(getattr(self._trainer, "strategy", None), HierMoEStrategy):
            for layer in moe_layers(self.model).values():
                layer.skip_expert_init = True
            self._load_after_shard = True
        else:
            self.load_pretrained_weights()

    def on_after_shard(self) -> None:
        """Called by ``HierMoEStrategy`` right after sharding (before the move to the device, DDP and the
        optimizers): loads what :meth:`configure_model` left for it."""
        if self._load_after_shard:
            self.load_pretrained_weights()

    def load_pretrained_weights(self) -> dict:
        """Fill the MoE layers from ``pretrained`` now: every expert of an unsharded layer (materialised from meta),
        this rank's experts of a sharded one; the rest of the model was loaded at construction. Returns
        :func:`~hiermoe_lightning.hf.load_pretrained_`'s report."""
        if self.hparams.pretrained is None:
            raise ValueError("load_pretrained_weights needs a model built with pretrained=DIR")
        report = load_pretrained_(self.model, self.hparams.pretrained, parts="moe")
        for layer in moe_layers(self.model).values():
            layer.skip_expert_init = False
        self._load_after_shard = False
        return report

    def _ensure_experts(self) -> None:
        """Outside a trainer's setup (the module called directly), read every pending expert before computing. Once
        the experts are real (loaded here, after sharding, or trained tensors a launcher handed back) nothing is
        checked again: the module walk happens at most until then, not every step."""
        if not self._experts_unchecked or self._load_after_shard:
            return
        if self._moe_pending():
            self.load_pretrained_weights()
        self._experts_unchecked = False

    @override
    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """``inputs`` ``[B, S]`` int64 -> logits ``[B, S, V]``."""
        self._ensure_experts()
        return self.model(input_ids=inputs, use_cache=False).logits

    def aux_loss(self) -> torch.Tensor:
        """0-dim auxiliary loss of the last forward, as ``aux_loss`` chose (already times its coefficient)."""
        zero = torch.zeros((), device=self.device)
        if self.hparams.aux_loss == "layers":
            return sum((layer.aux_loss for layer in moe_layers(self.model).values()), zero)
        if self.hparams.aux_loss == "hf" and self._hf_aux is not None:
            return self._router_aux_coef() * self._hf_aux
        return zero

    def _router_aux_coef(self) -> float:
        return float(getattr(self.model.config, "router_aux_loss_coef", 0.0) or 0.0)

    def _loss(self, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(logits [B, S, V], mean token cross-entropy, targets with padding as IGNORE_INDEX)``; with
        ``aux_loss="hf"`` also keeps HF's pooled load-balancing loss of this forward (mask applied)."""
        inputs, targets, mask = _unpack(batch)
        self._ensure_experts()
        want_router = self.hparams.aux_loss == "hf" and self._router_aux_coef() > 0
        out = self.model(input_ids=inputs, attention_mask=mask, use_cache=False, output_router_logits=want_router)
        self._hf_aux = getattr(out, "aux_loss", None) if want_router else None
        if mask is not None:
            targets = targets.masked_fill(mask == 0, IGNORE_INDEX)
        logits = out.logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                               ignore_index=IGNORE_INDEX)
        return logits, loss, targets

    @override
    def training_step(self, batch, batch_idx: int = 0) -> torch.Tensor:
        _, lm_loss, _ = self._loss(batch)
        aux = self.aux_loss()
        self.log("train/loss", lm_loss, prog_bar=True)
        self.log("train/aux_loss", aux)
        return lm_loss + aux

    def _evaluate(self, batch, metrics: TokenMetrics, prefix: str) -> torch.Tensor:
        logits, lm_loss, targets = self._loss(batch)
        metrics.update(logits, targets)
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
        hp = self.hparams
        return make_optimizer(self.parameters(), hp.optimizer, lr=hp.lr, weight_decay=hp.weight_decay,
                              momentum=hp.momentum, betas=hp.betas)


def _unpack(batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(inputs, targets)`` or ``(inputs, targets, attention_mask)`` -> the three (mask None when absent)."""
    if not isinstance(batch, (tuple, list)) or len(batch) not in (2, 3):
        raise ValueError("an HFCausalLM batch must be (inputs, targets) or (inputs, targets, attention_mask), got "
                         f"{type(batch).__name__} of {len(batch) if isinstance(batch, (tuple, list)) else '?'} items")
    return batch[0], batch[1], batch[2] if len(batch) == 3 else None


def _build(config: dict | None, pretrained: str | None, seed: int):
    from transformers import AutoConfig, AutoModelForCausalLM

    if pretrained is not None:  # on meta, filled by load_pretrained_ (the same weights as from_pretrained)
        return build_meta_model(pretrained, convert=False)
    cfg = dict(config)
    hf_config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # every rank draws the same weights
        return AutoModelForCausalLM.from_config(hf_config)
