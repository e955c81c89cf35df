"""Hugging Face ``transformers`` MoE models in and out (extra ``[hf]``).

``convert_(model)`` turns every supported sparse-MoE block into an :class:`HFMoEBlock` around a
:class:`~hiermoe_lightning.MoELayer` (same logits; shard it with ``ExpertParallel`` or ``HierMoEStrategy``);
``to_hf_state_dict(model)`` gives the original HF class's state dict back. Families: :mod:`.families`.
``load_pretrained_(model, DIR)`` fills a meta-built (:func:`build_meta_model`), possibly sharded model from a local
safetensors directory, each rank reading only its experts. :class:`HFCausalLM` is a LightningModule over such a model (LightningCLI: ``configs/hf-*.yaml``).
"""

from .block import HFMoEBlock
from .causal_lm import HFCausalLM
from .convert import convert_, find_moe_blocks
from .export import to_hf_state_dict
from .families import FAMILIES, FamilyAdapter, FusedSwiGLUAdapter, Refusal, register_family, supported_block_classes
from .loading import SafetensorsCheckpoint, build_meta_model, load_pretrained_

__all__ = ["convert_", "to_hf_state_dict", "HFCausalLM", "HFMoEBlock", "FamilyAdapter", "FusedSwiGLUAdapter", "Refusal",
           "register_family", "supported_block_classes", "find_moe_blocks", "FAMILIES", "load_pretrained_",
           "build_meta_model", "SafetensorsCheckpoint"]
