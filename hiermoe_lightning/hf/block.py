"""The module a converted Hugging Face sparse-MoE block becomes: a :class:`~hiermoe_lightning.MoELayer` in HF's shoes.

It is called as the HF block was (``block(hidden_states)``) and returns what it returned (the hidden states, or
``(hidden_states, router_logits)`` for a block that returned a pair), so the HF decoder layer around it runs
unchanged. ``ExpertParallel.shard_`` and ``HierMoEStrategy`` find the ``MoELayer`` inside (``.moe``) like any other.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..layer import MoELayer

__all__ = ["HFMoEBlock"]


def _router_logits_collector() -> list | None:
    """The list HF's ``output_router_logits`` collects into during this forward (transformers 5.x records router
    outputs with forward hooks on its router class, which a converted block no longer has), or None."""
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # another transformers layout: output_router_logits gets no entries from converted blocks
        return None
    collected = _active_collector.get()
    return collected.get("router_logits") if collected is not None else None


class HFMoEBlock(nn.Module):
    """``moe`` (a :class:`MoELayer`) computing the function of the HF block ``hf_class`` of family ``family``.

    ``jitter_noise`` (Mixtral): in training, the input is multiplied by ``U(1 - j, 1 + j)`` noise before routing, as
    HF does. ``returns_router_logits``: the HF block returned ``(hidden_states, router_logits)``. ``hf_keys``: the
    HF block's state-dict keys in its order (the export writes them in that order).
    """

    def __init__(self, moe: MoELayer, *, family: str, hf_class: str, jitter_noise: float = 0.0,
                 returns_router_logits: bool = False, hf_keys: tuple[str, ...] = ()):
        super().__init__()
        if not isinstance(moe, MoELayer):
            raise TypeError(f"HFMoEBlock wraps a MoELayer, got {type(moe).__name__}")
        self.moe = moe
        self.family, self.hf_class = family, hf_class
        self.jitter_noise = float(jitter_noise)
        self.returns_router_logits = returns_router_logits
        self.hf_keys = tuple(hf_keys)

    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        """``[T, E]`` router logits of ``x`` ``[..., M]`` as HF's router returns them (in the router's dtype: the
        input's, or the fixed one the family's gate computes in)."""
        router = self.moe.router
        x2 = x.reshape(-1, self.moe.hidden_size)
        dtype = getattr(router, "router_dtype", None) or x2.dtype
        return F.linear(x2.to(dtype), router.weight.to(dtype))

    def forward(self, hidden_states: torch.Tensor):
        x = hidden_states
        if self.training and self.jitter_noise > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
        collector = _router_logits_collector()
        logits = self.router_logits(x) if collector is not None or self.returns_router_logits else None
        if collector is not None:  # in layer order, as HF's hook on the router would have appended it
            collector.append(logits)
        out = self.moe(x)
        return (out, logits) if self.returns_router_logits else out

    def extra_repr(self) -> str:
        return f"family={self.family!r}, hf_class={self.hf_class!r}"
