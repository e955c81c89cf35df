"""How many payload rows each dispatch moves, phase by phase: pure, vectorised torch (no collectives).

Semantics follow :mod:`hiermoe_lightning.dispatch.spec` exactly. At the start token ``t`` of source rank ``s`` is one
row on ``s`` that serves its ``K`` (token, expert) pairs. In each phase every pair has a next rank
(:func:`~hiermoe_lightning.dispatch.spec.phase_next_rank` of its current rank and its expert's rank). With
``dedup=True`` a row travels once to each *distinct* next rank of its pairs; with ``dedup=False`` once per pair.
Pairs whose next rank is the current rank stay: they form the diagonal of the row matrix and never count as traffic.

Why counting distinct ``(current, next)`` per token is exact for deduplicated dispatches: a token's copies always sit
on distinct ranks (phase ``inter{i}`` changes only coordinate ``c_i`` while earlier phases fixed ``c_1 .. c_{i-1}``
per copy; ``intra{d-1}`` stays inside the level-``(d-1)`` group each copy already belongs to), so the row identity
``(token, current rank)`` is determined by the pair's current rank, and a row's hops are its distinct next ranks.

Expert ids equal to ``-1`` are dropped pairs: they travel nowhere and do not count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..dispatch.spec import DispatchSpec, phase_next_rank
from ..placement.placement import Placement
from ..topology import Topology

__all__ = [
    "PhaseTraffic",
    "phase_rows",
    "dispatch_rows",
    "max_rank_bytes",
    "max_pair_rows",
    "bytes_by_level",
    "lower_bound_level1_bytes",
    "check_expert_ids",
]


@dataclass(frozen=True)
class PhaseTraffic:
    """One phase of a dispatch: ``rows[a, b]`` (int64 ``[G, G]``) payload rows rank ``a`` sends to rank ``b``.

    The diagonal holds rows that stay on their rank (kept for bookkeeping, never traffic).
    """

    name: str
    rows: torch.Tensor

    def off_diagonal(self) -> torch.Tensor:
        """``[G, G]`` int64: ``rows`` with the diagonal zeroed (the rows that actually move)."""
        return _off_diagonal(self.rows)


def _off_diagonal(rows: torch.Tensor) -> torch.Tensor:
    """``[G, G]`` -> ``[G, G]`` copy with a zero diagonal."""
    out = rows.clone()
    out.fill_diagonal_(0)
    return out


def check_expert_ids(topology: Topology, placement: Placement, expert_ids: torch.Tensor) -> torch.Tensor:
    """Validate ``expert_ids`` (int ``[G, T, K]``, ids in ``-1 .. E-1``) against topology and placement; return int64."""
    if not isinstance(expert_ids, torch.Tensor):
        raise TypeError(f"expert_ids must be a tensor [world_size, tokens_per_rank, top_k], got {type(expert_ids).__name__}")
    if expert_ids.dtype == torch.bool or expert_ids.is_floating_point() or expert_ids.is_complex():
        raise TypeError(f"expert_ids must be an integer tensor, got dtype {expert_ids.dtype}")
    G = topology.world_size
    if expert_ids.dim() != 3 or expert_ids.shape[0] != G:
        raise ValueError(
            f"expert_ids must have shape [world_size={G}, tokens_per_rank, top_k] for topology {topology}, "
            f"got {list(expert_ids.shape)}"
        )
    if placement.world_size != G:
        raise ValueError(f"placement is for world size {placement.world_size}, topology {topology} has {G} ranks")
    ids = expert_ids.to(torch.long)
    if ids.numel() and (int(ids.min()) < -1 or int(ids.max()) >= placement.num_experts):
        raise ValueError(
            f"expert_ids must be in -1 .. {placement.num_experts - 1} (-1 = dropped pair), "
            f"got min {int(ids.min())}, max {int(ids.max())}"
        )
    return ids


def _pair_state(topology: Topology, placement: Placement, ids: torch.Tensor):
    """From ids ``[G, T, K]``: ``source [N, K]`` (rank of each pair's token), ``expert_rank [N, K]``, ``valid [N, K]``.

    ``N = G * T`` tokens; invalid (dropped, ``-1``) pairs get expert rank 0 and ``valid = False``.
    """
    G, T, K = ids.shape
    flat = ids.reshape(G * T, K)
    valid = flat >= 0
    expert_rank = placement.expert_to_rank[flat.clamp(min=0)]
    source = torch.arange(G, dtype=torch.long).repeat_interleave(T)[:, None].expand(G * T, K)
    return source, expert_rank, valid


def _count_hops(cur: torch.Tensor, nxt: torch.Tensor, valid: torch.Tensor, G: int, dedup: bool) -> torch.Tensor:
    """Rows per (current, next) rank: ``[G, G]`` int64 from pair tensors ``cur, nxt, valid`` of shape ``[N, K]``.

    ``dedup``: one row per distinct (token, current, next), found by sorting each token's ``K`` keys.
    """
    sentinel = G * G
    key = torch.where(valid, cur * G + nxt, torch.full_like(cur, sentinel))
    if dedup:
        key = key.sort(dim=1).values
        first = torch.ones_like(key, dtype=torch.bool)
        first[:, 1:] = key[:, 1:] != key[:, :-1]
        key = key[first]
    counts = torch.bincount(key.reshape(-1), minlength=sentinel + 1)[:sentinel]
    return counts.reshape(G, G)


def phase_rows(
    topology: Topology, placement: Placement, expert_ids: torch.Tensor, spec: DispatchSpec
) -> list[PhaseTraffic]:
    """The rows of every phase of ``spec``: a list of :class:`PhaseTraffic` (``rows`` int64 ``[G, G]``), in order.

    ``expert_ids``: int ``[G, T, K]`` expert chosen by each (source rank, token, slot); ``-1`` = dropped pair.
    Cost ``O(phases * G * T * K * log K)``.
    """
    return dispatch_rows(topology, placement, expert_ids, [spec])[spec.name]


def dispatch_rows(
    topology: Topology, placement: Placement, expert_ids: torch.Tensor, specs: Sequence[DispatchSpec]
) -> dict[str, list[PhaseTraffic]]:
    """:func:`phase_rows` of several dispatches at once, ``{spec.name: [PhaseTraffic, ...]}``.

    Dispatches that share a prefix of phases with the same ``dedup`` (``hd2 .. hdD`` share ``inter1, inter2, ...``)
    count that prefix once.
    """
    ids = check_expert_ids(topology, placement, expert_ids)
    G = topology.world_size
    source, expert_rank, valid = _pair_state(topology, placement, ids)
    # (dedup, phases so far) -> (current rank of every pair [N, K], rows of the last phase)
    memo: dict[tuple[bool, tuple[str, ...]], tuple[torch.Tensor, torch.Tensor]] = {}
    out: dict[str, list[PhaseTraffic]] = {}
    for spec in specs:
        cur = source
        traffic = []
        for i, phase in enumerate(spec.phases):
            key = (spec.dedup, spec.phases[: i + 1])
            if key not in memo:
                nxt = phase_next_rank(topology, phase, cur, expert_rank)
                memo[key] = (nxt, _count_hops(cur, nxt, valid, G, spec.dedup))
            cur, rows = memo[key]
            traffic.append(PhaseTraffic(phase, rows))
        out[spec.name] = traffic
    return out


def max_rank_bytes(rows: torch.Tensor, row_bytes: int) -> int:
    """Max over ranks of max(bytes sent, bytes received), diagonal excluded; ``rows`` is ``[G, G]``."""
    off = _off_diagonal(rows)
    busiest = torch.maximum(off.sum(dim=1), off.sum(dim=0)).max()
    return int(busiest) * int(row_bytes)


def max_pair_rows(rows: torch.Tensor) -> int:
    """Largest off-diagonal entry of ``rows`` ``[G, G]``: the biggest chunk one rank sends to one other rank."""
    return int(_off_diagonal(rows).max())


def bytes_by_level(topology: Topology, phases: Sequence[PhaseTraffic], row_bytes: int) -> dict[str, int]:
    """``{"level1": .., "levelD": ..}``: dispatch plus combine bytes (2 x dispatch rows x ``row_bytes``) by link level.

    A row from ``a`` to ``b`` counts at the first level where their coordinates differ
    (``topology.link_level_table``); rows that stay on their rank count nowhere.
    """
    level = topology.link_level_table
    total = torch.zeros(topology.world_size, topology.world_size, dtype=torch.long)
    for p in phases:
        total += p.rows
    return {
        f"level{L}": 2 * int(row_bytes) * int(total[level == L].sum())
        for L in range(1, topology.num_levels + 1)
    }


def lower_bound_level1_bytes(
    topology: Topology, placement: Placement, expert_ids: torch.Tensor, row_bytes: int
) -> int:
    """Fewest level-1 bytes any correct dispatch+combine moves: 2 x ``row_bytes`` per distinct
    (token, destination top-level group other than the token's own); ``expert_ids`` int ``[G, T, K]``."""
    ids = check_expert_ids(topology, placement, expert_ids)
    group = topology.group_index(1)  # [G]
    source, expert_rank, valid = _pair_state(topology, placement, ids)
    dest, home = group[expert_rank], group[source]
    sentinel = topology.num_groups(1)
    key = torch.where(valid & (dest != home), dest, torch.full_like(dest, sentinel)).sort(dim=1).values
    first = torch.ones_like(key, dtype=torch.bool)
    first[:, 1:] = key[:, 1:] != key[:, :-1]
    distinct = int((first & (key != sentinel)).sum())
    return 2 * int(row_bytes) * distinct
