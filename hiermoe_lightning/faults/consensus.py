"""One small all-reduce per optimizer step, so that every rank takes the same decision at the same step boundary.

Each rank fills its own column of an ``int32 [F, W]`` tensor (``F`` flags, ``W`` ranks) and the group sums it: every
rank then knows every rank's flags, hence also *which* rank saw what (a ``MAX`` would lose that). The flags are:

* row 0: the signal a rank received since the last step (0: none) — stop at the next step boundary;
* row 1: this step's loss was NaN/Inf on that rank;
* row 2 + i: MoE layer ``i``'s router logits held a NaN/Inf on that rank (any forward since the last step).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

__all__ = ["StepVerdict", "agree", "local_flags"]


@dataclass
class StepVerdict:
    """What every rank agrees on after a step: ``stop_signal`` (0: keep going) and, per non-finite source
    (``"loss"`` or a layer name), the ranks that saw it."""

    stop_signal: int = 0
    nonfinite: dict[str, list[int]] = field(default_factory=dict)


def local_flags(stop_signal: int, loss_nonfinite: torch.Tensor | bool, layers_nonfinite: list[torch.Tensor | bool],
                device: torch.device) -> torch.Tensor:
    """This rank's flags ``int32 [2 + L]``; the non-finite flags may be 0-dim device tensors and stay on ``device``
    (no host sync before the all-reduce)."""
    bad = [torch.as_tensor(f, device=device).reshape(()) for f in (loss_nonfinite, *layers_nonfinite)]
    signal = torch.tensor([int(stop_signal)], dtype=torch.int32, device=device)
    return torch.cat([signal, torch.stack(bad).to(torch.int32)])


def agree(flags: torch.Tensor, layer_names: list[str], rank: int = 0, world_size: int = 1, group=None) -> StepVerdict:
    """Sum every rank's ``flags [2 + L]`` over ``group`` (collective: every rank calls it once per step) and read
    the verdict. With ``world_size == 1`` nothing is communicated."""
    table = torch.zeros(flags.numel(), world_size, dtype=torch.int32, device=flags.device)
    table[:, rank] = flags
    if world_size > 1:
        dist.all_reduce(table, group=group)
    table = table.cpu()
    signals = table[0]
    verdict = StepVerdict(stop_signal=int(signals[signals > 0][0]) if bool((signals > 0).any()) else 0)
    for row, name in enumerate(["loss", *layer_names], start=1):
        ranks = torch.nonzero(table[row] > 0).flatten().tolist()
        if ranks:
            verdict.nonfinite[name] = ranks
    return verdict
