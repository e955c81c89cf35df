"""What an exchange carries and what it hands back: payload rows (gathered or not), the pending handle, and the
split-agreement error. Shared by every transport (:mod:`~hiermoe_lightning.dispatch.transport`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Gathered", "num_rows", "PendingExchange", "SplitMismatchError", "source_of", "offsets", "copy_block"]


class SplitMismatchError(ValueError):
    """The split sizes a rank expects to receive differ from what its peers announce to send."""


@dataclass(frozen=True)
class Gathered:
    """Rows ``source[index]`` not copied yet (``source`` ``[N, ...]``, ``index`` ``[R]``): the exchange gathers them
    itself, the rank's own block straight into the receive buffer, one copy less than gathering first."""

    source: torch.Tensor
    index: torch.Tensor

    @property
    def num_rows(self) -> int:
        return self.index.shape[0]

    def materialize(self) -> torch.Tensor:
        return self.source.index_select(0, self.index)


def num_rows(x: "torch.Tensor | Gathered") -> int:
    """Rows of a payload, gathered or not."""
    return x.num_rows if isinstance(x, Gathered) else x.shape[0]


def source_of(x: "torch.Tensor | Gathered") -> torch.Tensor:
    """The tensor a payload's rows come from (its dtype, device and row shape are the payload's)."""
    return x.source if isinstance(x, Gathered) else x


def offsets(splits: list[int]) -> list[int]:
    """``[0, s0, s0 + s1, ...]``: where each peer's block starts (and the total, last)."""
    out = [0]
    for n in splits:
        out.append(out[-1] + n)
    return out


def copy_block(dst: torch.Tensor, x: "torch.Tensor | Gathered", start: int, end: int) -> None:
    """Rows ``start:end`` of a payload into ``dst`` (a gathered payload is gathered straight into it)."""
    if isinstance(x, Gathered):
        torch.index_select(x.source, 0, x.index[start:end], out=dst)
    else:
        dst.copy_(x[start:end])


class PendingExchange:
    """Payload exchanges in flight on one peer group; ``wait()`` returns the received tensors, in payload order."""

    def __init__(self, outputs: list[torch.Tensor], works: list):
        self._outputs, self._works = outputs, works

    def wait(self) -> list[torch.Tensor]:
        for work in self._works:
            work.wait()
        self._works = []
        return self._outputs
