"""hiermoe -> Hugging Face: the state dict of the original HF class from a converted, unsharded model."""

from __future__ import annotations

import torch
from torch import nn

from .block import HFMoEBlock
from .families import family

__all__ = ["to_hf_state_dict"]


def to_hf_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The HF state dict of a converted, unsharded ``model``: every :class:`HFMoEBlock` back under the original HF
    class's keys and shapes (experts in expert order), every other tensor as ``model.state_dict()`` has it, in the
    model's key order. ``HFModelClass(config).load_state_dict(sd, strict=True)`` then gives the same logits.

    Raises ``ValueError`` for a sharded model (each rank holds only its experts: export a full checkpoint instead).
    """
    blocks = {name: m for name, m in model.named_modules() if isinstance(m, HFMoEBlock)}
    sharded = [name for name, block in blocks.items() if block.moe.is_sharded]
    if sharded:
        raise ValueError(f"to_hf_state_dict needs an unsharded model; sharded MoE blocks: {sharded[:4]}"
                         f"{' ...' if len(sharded) > 4 else ''}")
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        name = next((name for name in blocks if key.startswith(name + ".")), None)
        if name is None:
            out[key] = value
        elif blocks.get(name) is not None:  # the block's HF keys where its first key stood
            out.update((f"{name}.{hf_key}", tensor) for hf_key, tensor in _block_state(blocks[name]).items())
            blocks[name] = None
    return out


def _block_state(block: HFMoEBlock) -> dict[str, torch.Tensor]:
    """The HF block's state dict, in the HF block's key order when the conversion recorded it."""
    state = family(block.family).hf_state(block.moe)
    order = [key for key in block.hf_keys if key in state]
    return {key: state[key] for key in order + [key for key in state if key not in order]}
