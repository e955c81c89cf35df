"""What one rank holds of a model's training state: parameters, gradients and optimizer state, dense and expert.

Counted from the tensors themselves (a sharded tensor counts its local part only), so the number is exact and the
same on every run, unlike a process's resident memory. Activations and communication buffers are not included.
"""

from __future__ import annotations

import torch
from torch import nn

from ..checkpoint import moe_layers
from ..dense_sharding import local_tensor

__all__ = ["STATE_KINDS", "state_bytes"]

STATE_KINDS = ("params", "grads", "optimizer")


def _nbytes(t: torch.Tensor) -> int:
    t = local_tensor(t)
    return t.numel() * t.element_size()


def state_bytes(module: nn.Module, optimizers=()) -> dict[str, dict[str, int]]:
    """``{"dense": {"params", "grads", "optimizer"}, "expert": {...}}``: bytes this rank holds of ``module``'s
    parameters, their gradients and the state ``optimizers`` keep for them (e.g. AdamW's two moments)."""
    experts = {id(p) for layer in moe_layers(module).values() for p in layer.experts.slot_parameters()}
    out = {part: dict.fromkeys(STATE_KINDS, 0) for part in ("dense", "expert")}
    for p in module.parameters():
        part = out["expert" if id(p) in experts else "dense"]
        part["params"] += _nbytes(p)
        if p.grad is not None:
            part["grads"] += _nbytes(p.grad)
    for opt in optimizers:
        inner = getattr(opt, "_optimizer", opt)
        for p, state in inner.state.items():
            part = out["expert" if id(p) in experts else "dense"]
            part["optimizer"] += sum(_nbytes(v) for v in state.values() if isinstance(v, torch.Tensor))
    return out
