"""How many payload rows each dispatch moves, phase by phase: pure, vectorised torch (no collectives).

Semantics follow :mod:`hiermoe_lightning.dispatch.spec` exactly. At the start token ``t`` of source rank ``s`` is one
row on ``s`` that serves its ``K`` (token, expert) pairs. In each phase every pair has a next rank
(:func:`~hiermoe_lightning.dispatch.spec.phase_next_rank` of its current rank and its expert's rank). With
``dedup=True`` a row travels once to each *distinct* next rank of its pairs; with ``dedup=False`` once per pair.
Pairs whose next rank is the current rank stay: they form the diagonal of the row matrix and never count as traffic.

How it counts without a loop over tokens: in phase ``p`` a pair's current and next rank depend only on its source
rank ``s`` and the level-``L`` group of its expert's rank, ``L`` being the deepest level the phases up to ``p`` read
(``inter{i}`` reads coordinate ``c_i`` of the expert's rank; ``a2a`` and ``intra{i}`` read the whole rank). Without
dedup each pair is a row, so the rows via (``s``, rank ``r``) are the pairs of ``s`` whose expert is on ``r``. With
dedup the rows via (``s``, group ``g``) are the tokens of ``s`` that hit ``g``, because distinct groups give distinct
(current, next) hops for a fixed ``s`` (checked on the grid), i.e. a token's copies never merge.

Expert ids equal to ``-1`` are dropped pairs: they travel nowhere and do not count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..dispatch.spec import DispatchSpec, Phase, level_key, phase_next_rank
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

    name: Phase
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


@dataclass(frozen=True)
class _RouteCounts:
    """What every phase count derives from: ``pairs [G, G]`` (pairs of source ``s`` whose expert is on rank ``r``) and
    ``hits[L]`` ``[G, U[L]]`` (tokens of source ``s`` with at least one expert in level-``L`` group ``g``) for the
    levels asked for."""

    pairs: torch.Tensor
    hits: dict[int, torch.Tensor]


# Bound on the elements of the [ranks, T, G + 1] uint8 "token hits rank" block built at once.
_BLOCK_ELEMENTS = 1 << 24


def _route_counts(topology: Topology, placement: Placement, ids: torch.Tensor, levels: Sequence[int]) -> _RouteCounts:
    """Count pairs per (source, expert rank) and distinct hits per (source, level-L group), L in ``levels``.

    ``ids``: int64 ``[G, T, K]`` (``-1`` = dropped). Time ``O(G * T * (K + G))``.
    """
    G, T, K = ids.shape
    # rank of each pair's expert, G for a dropped pair (id -1 picks the appended last entry)
    expert_rank = torch.cat([placement.expert_to_rank, torch.tensor([G])])[ids]  # [G, T, K]
    pair_keys = (torch.arange(G)[:, None, None] * (G + 1) + expert_rank).reshape(-1)
    pairs = torch.bincount(pair_keys, minlength=G * (G + 1)).reshape(G, G + 1)[:, :G]
    hits = {L: torch.zeros(G, topology.num_groups(L), dtype=torch.long) for L in sorted(set(levels))}
    block = max(1, _BLOCK_ELEMENTS // max(1, T * (G + 1)))
    for s0 in range(0, G if hits else 0, block):  # blocks of source ranks bound the memory of `hit`
        er = expert_rank[s0 : s0 + block]  # [b, T, K]
        b = er.shape[0]
        hit = torch.zeros(b, T, G + 1, dtype=torch.uint8)
        hit.scatter_(2, er, 1)  # token hits rank (column G collects dropped pairs)
        hit = hit[..., :G].contiguous()
        for L, out in hits.items():
            U = topology.num_groups(L)
            in_group = hit.reshape(b, T, U, G // U).amax(dim=3)  # [b, T, U] 0/1
            out[s0 : s0 + block] = in_group.sum(dim=1, dtype=torch.int64)
    return _RouteCounts(pairs, hits)


def _phase_matrix(
    topology: Topology, spec: DispatchSpec, index: int, counts: _RouteCounts
) -> torch.Tensor:
    """Rows ``[G, G]`` of phase ``spec.phases[index]``.

    A pair's current and next rank in this phase depend only on its source ``s`` and the level-``L`` group of its
    expert (``L`` = the deepest level any phase so far looks at; its coordinates ``c_1 .. c_L``), and are one-to-one
    in that group for a fixed ``s``. So with ``dedup`` the rows from ``s`` via group ``g`` number the tokens of ``s``
    hitting ``g`` (``hits[L]``), without it the pairs (``pairs``, ``L = D``). The path is walked with
    :func:`phase_next_rank` on a ``[G, U[L]]`` grid of (source, first rank of the group).
    """
    G = topology.world_size
    if spec.dedup:
        L = spec.expert_group_level(index, topology.num_levels)
        weight = counts.hits[L]
    else:
        L, weight = topology.num_levels, counts.pairs
    U = topology.num_groups(L)
    rep = (torch.arange(U) * (G // U))[None, :].expand(G, U)  # a rank of each level-L group
    cur = torch.arange(G)[:, None].expand(G, U)
    for phase in spec.phases[:index]:
        cur = phase_next_rank(topology, phase, cur, rep)
    nxt = phase_next_rank(topology, spec.phases[index], cur, rep)
    if spec.dedup:
        hop = (cur * G + nxt).sort(dim=1).values
        if bool((hop[:, 1:] == hop[:, :-1]).any()):  # two groups would share a row: counting by group is wrong
            raise RuntimeError(f"phase {spec.phases[index]!r} of dispatch {spec.name!r} merges copies of a token")
    rows = torch.zeros(G * G, dtype=torch.long).index_add_(0, (cur * G + nxt).reshape(-1), weight.reshape(-1))
    return rows.reshape(G, G)


def phase_rows(
    topology: Topology, placement: Placement, expert_ids: torch.Tensor, spec: DispatchSpec
) -> list[PhaseTraffic]:
    """The rows of every phase of ``spec``: a list of :class:`PhaseTraffic` (``rows`` int64 ``[G, G]``), in order.

    ``expert_ids``: int ``[G, T, K]`` expert chosen by each (source rank, token, slot); ``-1`` = dropped pair.
    Cost ``O(G * T * (K + G))`` time, whatever the dispatch.
    """
    return dispatch_rows(topology, placement, expert_ids, [spec])[spec.name]


def dispatch_rows(
    topology: Topology, placement: Placement, expert_ids: torch.Tensor, specs: Sequence[DispatchSpec]
) -> dict[str, list[PhaseTraffic]]:
    """:func:`phase_rows` of several dispatches at once, ``{spec.name: [PhaseTraffic, ...]}``; counts the routing once."""
    ids = check_expert_ids(topology, placement, expert_ids)
    D = topology.num_levels
    levels = [spec.expert_group_level(i, D) for spec in specs if spec.dedup for i in range(spec.depth)]
    counts = _route_counts(topology, placement, ids, levels)
    return {
        spec.name: [PhaseTraffic(p, _phase_matrix(topology, spec, i, counts)) for i, p in enumerate(spec.phases)]
        for spec in specs
    }


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
        level_key(L): 2 * int(row_bytes) * int(total[level == L].sum())
        for L in range(1, topology.num_levels + 1)
    }


def lower_bound_level1_bytes(
    topology: Topology, placement: Placement, expert_ids: torch.Tensor, row_bytes: int
) -> int:
    """Fewest level-1 bytes any correct dispatch+combine moves: 2 x ``row_bytes`` per distinct
    (token, destination top-level group other than the token's own); ``expert_ids`` int ``[G, T, K]``."""
    ids = check_expert_ids(topology, placement, expert_ids)
    hits = _route_counts(topology, placement, ids, [1]).hits[1]  # [G, U1]
    home = topology.group_index(1)  # [G]
    own = hits.gather(1, home[:, None]).sum()
    return 2 * int(row_bytes) * int(hits.sum() - own)
