"""The bundled MoE language model used by ``hiermoe fit``."""

from .moe_gpt import OPTIMIZERS, PRESETS, MoEGPT

__all__ = ["MoEGPT", "PRESETS", "OPTIMIZERS"]
