"""Where each expert lives: ``expert -> (rank, slot)``, kept as data so swaps can change it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Placement"]


@dataclass(frozen=True)
class Placement:
    """``expert_to_rank[e]`` and ``expert_to_slot[e]`` (int64, ``[E]``); every rank holds ``E / G`` slots.

    Immutable: ``swapped(a, b)`` returns a new placement, so a failed migration can keep the old one.
    """

    expert_to_rank: torch.Tensor
    expert_to_slot: torch.Tensor
    world_size: int

    def __post_init__(self):
        r, s = self.expert_to_rank, self.expert_to_slot
        if r.dtype != torch.long or s.dtype != torch.long or r.dim() != 1 or r.shape != s.shape:
            raise TypeError("placement expert_to_rank and expert_to_slot must be int64 tensors of shape [num_experts]")
        E, G = r.numel(), self.world_size
        if E == 0:
            raise ValueError("placement needs num_experts >= 1")
        if G <= 0 or E % G != 0:
            raise ValueError(f"placement needs num_experts ({E}) divisible by world_size ({G})")
        if r.min() < 0 or r.max() >= G:
            raise ValueError(f"placement expert_to_rank values must be in 0..{G - 1}")
        per = E // G
        key = r * per + s
        if s.min() < 0 or s.max() >= per or torch.unique(key).numel() != E:
            raise ValueError(f"placement must give every rank exactly {per} distinct slots 0..{per - 1}")

    @classmethod
    def contiguous(cls, num_experts: int, world_size: int) -> "Placement":
        """Rank ``r`` holds experts ``r*E/G .. (r+1)*E/G - 1`` in slot order."""
        if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
            raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
        if world_size <= 0 or num_experts % world_size != 0:
            raise ValueError(
                f"num_experts ({num_experts}) must be divisible by the expert-parallel world size ({world_size})"
            )
        per = num_experts // world_size
        e = torch.arange(num_experts)
        return cls(e // per, e % per, world_size)

    @classmethod
    def from_ranks(cls, expert_to_rank, world_size: int) -> "Placement":
        """Slots assigned in expert-id order on each rank."""
        r = torch.as_tensor(expert_to_rank, dtype=torch.long)
        if r.dim() != 1 or r.numel() == 0 or world_size <= 0 or int(r.min()) < 0 or int(r.max()) >= world_size:
            raise ValueError(f"placement expert_to_rank values must be in 0..{world_size - 1}, got {r.tolist()}")
        order = torch.argsort(r * r.numel() + torch.arange(r.numel()))
        slot = torch.empty_like(r)
        counts = torch.bincount(r, minlength=world_size)
        starts = torch.cumsum(counts, 0) - counts
        slot[order] = torch.arange(r.numel()) - starts[r[order]]
        return cls(r, slot, world_size)

    @property
    def num_experts(self) -> int:
        return self.expert_to_rank.numel()

    @property
    def experts_per_rank(self) -> int:
        return self.num_experts // self.world_size

    def experts_of(self, rank: int) -> torch.Tensor:
        """``[E/G]`` expert ids held by ``rank``, indexed by slot."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank must be in 0..{self.world_size - 1}, got {rank}")
        out = torch.empty(self.experts_per_rank, dtype=torch.long)
        mine = (self.expert_to_rank == rank).nonzero().flatten()
        out[self.expert_to_slot[mine]] = mine
        return out

    def swapped(self, a: int, b: int) -> "Placement":
        """A new placement where experts ``a`` and ``b`` trade (rank, slot)."""
        for e in (a, b):
            if not 0 <= e < self.num_experts:
                raise ValueError(f"expert ids must be in 0..{self.num_experts - 1}, got {e}")
        r, s = self.expert_to_rank.clone(), self.expert_to_slot.clone()
        r[[a, b]], s[[a, b]] = r[[b, a]], s[[b, a]]
        return Placement(r, s, self.world_size)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Placement)
            and self.world_size == other.world_size
            and torch.equal(self.expert_to_rank, other.expert_to_rank)
            and torch.equal(self.expert_to_slot, other.expert_to_slot)
        )

    def to_list(self) -> list[int]:
        return self.expert_to_rank.tolist()
