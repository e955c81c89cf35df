"""Placement baselines, implemented from their published descriptions (pure, deterministic).

* :func:`eplb_balanced_placement`: DeepSeek EPLB's balanced packing, in the setting "as many slots as experts, no
  replication": experts sorted by load (descending), each to the least-loaded rank that still has a free slot. It
  balances token counts per rank, ignores the previous placement (a rebalance may move nearly every expert) and
  ignores deduplication.
* :func:`smartmoe_greedy_placement`: SmartMoE-style greedy packing: longest-processing-time first with a fixed number
  of experts per rank, keeping an expert on its current rank on ties, and keeping the current placement altogether
  when the packing would not lower the busiest rank's load.
* :func:`moved_experts`: how many experts change rank between two placements (the migration volume).

Ties are broken deterministically: equal loads by expert id, equally loaded ranks by rank id.
"""

from __future__ import annotations

import torch

from .placement import Placement

__all__ = ["eplb_balanced_placement", "smartmoe_greedy_placement", "moved_experts", "rank_loads"]


def _check_load(expert_load: object) -> torch.Tensor:
    if not isinstance(expert_load, torch.Tensor):
        raise TypeError(f"expert_load must be a tensor [num_experts], got {type(expert_load).__name__}")
    if expert_load.dim() != 1 or expert_load.numel() == 0:
        raise ValueError(f"expert_load must be a non-empty 1-D tensor [num_experts], got shape "
                         f"{list(expert_load.shape)}")
    load = expert_load.detach().to(torch.float64)
    if not bool(torch.isfinite(load).all()) or float(load.min()) < 0:
        raise ValueError("expert_load must be finite and >= 0")
    return load


def _check_world(world_size: object, num_experts: int) -> int:
    if isinstance(world_size, bool) or not isinstance(world_size, int):
        raise TypeError(f"world_size must be an int, got {world_size!r}")
    if world_size < 1 or num_experts % world_size != 0:
        raise ValueError(f"world_size must be >= 1 and divide num_experts ({num_experts}), got {world_size}")
    return world_size


def _descending(load: torch.Tensor) -> list[int]:
    """Expert ids by load, heaviest first; equal loads in id order."""
    return torch.sort(load, descending=True, stable=True).indices.tolist()


def rank_loads(expert_load: torch.Tensor, placement: Placement) -> torch.Tensor:
    """``[G]`` float64: summed load of the experts on each rank."""
    load = _check_load(expert_load)
    if load.numel() != placement.num_experts:
        raise ValueError(f"expert_load has {load.numel()} entries, the placement {placement.num_experts} experts")
    return torch.zeros(placement.world_size, dtype=torch.float64).index_add_(0, placement.expert_to_rank, load)


def eplb_balanced_placement(expert_load: torch.Tensor, world_size: int) -> Placement:
    """EPLB balanced packing (one slot per expert, no replication): heaviest expert first, each to the least-loaded
    rank with a free slot (lowest rank id on ties). The previous placement plays no part."""
    load = _check_load(expert_load)
    E = load.numel()
    G = _check_world(world_size, E)
    per = E // G
    rank_load = [0.0] * G
    free = [per] * G
    out = [0] * E
    for e in _descending(load):
        r = min((r for r in range(G) if free[r] > 0), key=lambda r: (rank_load[r], r))
        out[e] = r
        rank_load[r] += float(load[e])
        free[r] -= 1
    return Placement.from_ranks(out, G)


def smartmoe_greedy_placement(expert_load: torch.Tensor, current: Placement) -> Placement:
    """SmartMoE-style LPT greedy with ``E / G`` experts per rank.

    Heaviest expert first, each to the least-loaded rank with a free slot; among equally loaded ranks the expert's
    current rank wins (then the lowest rank id). If the result does not lower the busiest rank's load, the current
    placement is kept (no migration without a gain). Experts that stay keep their slot when possible.
    """
    if not isinstance(current, Placement):
        raise TypeError(f"current must be a Placement, got {type(current).__name__}")
    load = _check_load(expert_load)
    E, G = current.num_experts, current.world_size
    if load.numel() != E:
        raise ValueError(f"expert_load has {load.numel()} entries, the placement {E} experts")
    per = E // G
    cur_rank = current.expert_to_rank.tolist()
    rank_load = [0.0] * G
    free = [per] * G
    out = [0] * E
    for e in _descending(load):
        r = min((r for r in range(G) if free[r] > 0), key=lambda r: (rank_load[r], r != cur_rank[e], r))
        out[e] = r
        rank_load[r] += float(load[e])
        free[r] -= 1
    if max(rank_load) >= float(rank_loads(load, current).max()):
        return current
    return _keep_slots(current, torch.tensor(out, dtype=torch.long))


def _keep_slots(current: Placement, new_rank: torch.Tensor) -> Placement:
    """A placement with ``new_rank``; experts that stay on their rank keep their slot, arrivals take free slots."""
    E, G = current.num_experts, current.world_size
    per = E // G
    slot = torch.full((E,), -1, dtype=torch.long)
    stay = new_rank == current.expert_to_rank
    slot[stay] = current.expert_to_slot[stay]
    for r in range(G):
        used = set(slot[(new_rank == r) & stay].tolist())
        free = iter(s for s in range(per) if s not in used)
        for e in ((new_rank == r) & ~stay).nonzero().flatten().tolist():
            slot[e] = next(free)
    return Placement(new_rank, slot, G)


def moved_experts(before: Placement, after: Placement) -> int:
    """Number of experts whose rank differs between ``before`` and ``after``."""
    if not isinstance(before, Placement) or not isinstance(after, Placement):
        raise TypeError("moved_experts takes two Placements")
    if before.num_experts != after.num_experts or before.world_size != after.world_size:
        raise ValueError(f"placements differ in size: {before.num_experts} experts on {before.world_size} ranks vs "
                         f"{after.num_experts} on {after.world_size}")
    return int((before.expert_to_rank != after.expert_to_rank).sum())
