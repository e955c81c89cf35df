"""The optimizers the bundled LightningModules offer, built in one place (``MoEGPT``, ``HFCausalLM``)."""

from __future__ import annotations

from typing import Iterable

import torch

__all__ = ["OPTIMIZERS", "make_optimizer"]

OPTIMIZERS = ("adamw", "adam", "sgd")


def make_optimizer(params: Iterable[torch.nn.Parameter], name: str, *, lr: float, weight_decay: float = 0.0,
                   momentum: float = 0.0, betas: tuple[float, float] | None = None) -> torch.optim.Optimizer:
    """``name`` in :data:`OPTIMIZERS` (checked by the caller's constructor); ``momentum`` is SGD's, ``betas`` Adam's
    (None: torch's defaults). SGD is there because it exposes a wrong gradient scale that Adam's normalisation hides."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    adam_kwargs = {} if betas is None else {"betas": tuple(betas)}
    cls = torch.optim.Adam if name == "adam" else torch.optim.AdamW
    return cls(params, lr=lr, weight_decay=weight_decay, **adam_kwargs)
