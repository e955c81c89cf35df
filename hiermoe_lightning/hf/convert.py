"""Hugging Face -> hiermoe: every supported sparse-MoE block of a model becomes an :class:`HFMoEBlock` (in place)."""

from __future__ import annotations

from typing import Any, Iterator

import torch
from torch import nn

from ..layer import MoELayer
from .block import HFMoEBlock
from .families import BLOCK_CLASSES, FamilyAdapter, adapter_for_class, supported_block_classes

__all__ = ["convert_", "find_moe_blocks"]


def _looks_like_moe(module: nn.Module) -> bool:
    """A sparse-MoE block of a family no adapter names: experts next to a router."""
    children = dict(module.named_children())
    return "experts" in children and ("gate" in children or "router" in children)


def find_moe_blocks(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, nn.Module]]:
    """``(name, parent, attribute, block)`` of every HF sparse-MoE block not converted yet (outermost ones only:
    an adapter's block class, or any module holding ``experts`` beside a ``gate``/``router``)."""

    def walk(parent: nn.Module, prefix: str):
        for attr, child in parent.named_children():
            name = f"{prefix}.{attr}" if prefix else attr
            if isinstance(child, (HFMoEBlock, MoELayer)):
                continue
            if type(child).__name__ in BLOCK_CLASSES or _looks_like_moe(child):
                yield name, parent, attr, child
            else:
                yield from walk(child, name)

    yield from walk(model, "")


def _config_of(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    return getattr(config, "get_text_config", lambda: config)() if config is not None else None


def _returns_pair(block: nn.Module, adapter: FamilyAdapter) -> bool:
    """Whether the HF block returns ``(hidden_states, router_logits)`` (some transformers versions) rather than the
    hidden states alone: asked of the block itself, on one zero token (not possible on the meta device: then no)."""
    param = next(block.parameters(), None)
    if param is None or param.device.type == "meta":
        return False
    x = torch.zeros(1, 1, adapter.hidden_size(block), dtype=param.dtype, device=param.device)
    was_training = block.training
    try:
        block.eval()
        with torch.no_grad():
            return isinstance(block(x), tuple)
    finally:
        block.train(was_training)


def _convert_block(block: nn.Module, adapter: FamilyAdapter, config: Any, seed: int) -> HFMoEBlock:
    param = next(block.parameters())
    if param.device.type == "meta":  # a block built on meta: a meta MoELayer, nothing to copy (load it later:
        moe = MoELayer(**adapter.layer_kwargs(block, config), seed=seed, device="meta")  # hf.load_pretrained_)
    else:
        moe = MoELayer(**adapter.layer_kwargs(block, config), seed=seed).to(param.device)
        adapter.load_(moe, block)
    for p in moe.parameters():
        p.requires_grad_(param.requires_grad)
    new = HFMoEBlock(moe, family=adapter.name, hf_class=type(block).__name__,
                     jitter_noise=adapter.jitter_noise(block), returns_router_logits=_returns_pair(block, adapter),
                     hf_keys=tuple(block.state_dict().keys()))
    return new.train(block.training)


def convert_(model: nn.Module) -> list[str]:
    """In place: every supported HF sparse-MoE block of ``model`` becomes an :class:`HFMoEBlock` (a ``MoELayer``
    computing the same function, called and returning as the HF block was). Returns the converted module names.

    A block on the meta device (the HF model built under ``torch.device("meta")``) becomes a ``MoELayer`` built on
    meta, with nothing copied: shard it, then fill it from the checkpoint with
    :func:`~hiermoe_lightning.hf.load_pretrained_` (each rank reads only its experts).

    Blocks converted before are left alone (converting twice is a no-op). Every block is checked before any is
    changed: a block of an unknown class, or of a family ``MoELayer`` cannot express yet, raises ``TypeError``
    naming its class (and what is missing).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert_ takes an nn.Module (a Hugging Face model), got {type(model).__name__}")
    config = _config_of(model)
    plans = []
    for name, parent, attr, block in find_moe_blocks(model):
        cls = type(block).__name__
        adapter = adapter_for_class(cls)
        if adapter is None:
            raise TypeError(f"{cls} (at {name!r}) is a sparse-MoE block hiermoe has no adapter for; "
                            f"supported block classes: {supported_block_classes()}")
        missing = adapter.missing(block, config)
        if missing is not None:
            raise TypeError(f"{cls} (at {name!r}, family {adapter.name}) cannot be converted: {missing}")
        plans.append((name, parent, attr, block, adapter))
    for index, (name, parent, attr, block, adapter) in enumerate(plans):
        setattr(parent, attr, _convert_block(block, adapter, config, seed=index))
    return [name for name, *_ in plans]
