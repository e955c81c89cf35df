"""The expert-swap planner (HierMoE's placement idea, plus migration cost, windowed statistics and compute balance).

Pure functions: no collectives, and deterministic (the same inputs give the same plan on every rank).

What a swap changes
-------------------
Every phase of every ``hd<d>`` dispatch moves, from source rank ``s`` via level-``L`` group ``g``, as many rows as
``s`` has tokens that chose at least one expert in ``g`` (``hits[L][s, g]``; see
:mod:`hiermoe_lightning.cost.traffic`). :class:`GroupCounts` keeps, per (token, level-``L`` group), how many of the
token's experts the group owns, for every level ``1..D``. Swapping experts ``a`` and ``b`` (on different ranks) only
changes tokens that chose exactly one of them: at each level where their groups differ the group losing its expert
drops by one, the gaining group rises by one (:meth:`GroupCounts.apply_swap`).

Evaluating every pair at once (``O(D*T*K*E)`` statistics plus ``O(P*E^2*G)`` arithmetic for ``P`` phases)
----------------------------------------------------------------------------------------------------------
For a level ``L`` at which ``a`` and ``b`` sit in different groups ``g_a`` and ``g_b``, the hit change at ``g_a`` is

    dH[s, g_a] = - lose[a][s] + both[a, b][s] + gain[b][s, g_a]

* ``lose[a][s]``: weight of the tokens of ``s`` that chose ``a`` and have no other expert in ``g_a``,
* ``both[a, b][s]``: the part of those tokens that also chose ``b`` (they keep a hit in ``g_a`` after the swap),
* ``gain[b][s, g]``: weight of the tokens of ``s`` that chose ``b`` and have no expert in ``g`` (they start hitting
  ``g_a`` when ``b`` moves there),

and symmetrically at ``g_b``. Those statistics are sums over tokens (``O(T*K*(K + U))`` per level), are kept
incrementally (after a swap only the tokens that chose ``a`` or ``b`` are touched, and of their (token, expert) pairs
only those whose count or "alone in its group" status changes; see :class:`_PairStats`) and are mapped through each
phase's (current rank, next rank) table to per-rank send/receive changes, giving every pair's per-rank loads in every
phase as ``[E, E, G]`` tensors (in scratch tensors reused across the rounds).

Determinism: token weights are turned into fixed-point integers (unweighted tokens count exactly 1; weights get
``2**16`` units by default, fewer when the pair search runs in float32) and every count, hit and load is an integer
held in float32 / float64 below the exact-integer limit, so sums are exact whatever their order or thread count: every
rank computes the same plan. Only the smooth-max, used to rank candidates, is rounded floating point; remaining ties
go to the lowest ``(a, b)``. The pair search uses float32 (about twice as fast) when every number it forms stays
below ``2**24`` and the lightest token keeps >= 16 units, else float64.

Search rules (see :func:`plan_swaps`): candidates never raise plain ``t_{d*}``; a swap is taken when it pays for its
migration or, as a plateau move, lowers the smooth-max objective; the kept plan is the prefix with the largest net
gain.

Costs (one way, ms): ``alpha + beta * busiest_rank_bytes`` per phase as in :mod:`hiermoe_lightning.cost.model`
(a phase whose groups are single ranks costs 0), ``t_d`` the sum over the phases of ``hd<d>``, ``d*`` = argmin.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Iterable, Sequence

import torch

from ..cost.link_costs import LinkCosts
from ..cost.traffic import check_expert_ids
from ..dispatch.spec import Phase, parse_dispatch, phase_groups, phase_next_rank
from ..topology import Topology
from ..validation import check_int
from .placement import Placement

__all__ = [
    "GroupCounts",
    "SwapPlan",
    "predict_hd_ms",
    "plan_swaps",
    "smooth_max",
    "migration_ms_table",
]

_FIXED_POINT_BITS = 16  # token weights are kept as integer multiples of 2**-16 by default (coarser when needed)
_EXACT_LIMIT = 2.0 ** 50  # keep every fixed-point sum below this (float64 holds integers exactly below 2**53)
_FLOAT32_EXACT = 2.0 ** 24  # float32 holds integers exactly below this
_TOKEN_CHUNK = 8192  # tokens per block when (re)counting statistics: bounds [chunk, K, U] and [chunk, K, K] blocks
_SAVING_EPS_MS = 1e-9  # a "positive" net gain must exceed this (guards against float noise between equal loads)
_OBJECTIVE_RTOL = 1e-9  # a swap must lower the ranking objective by more than this share of it


# ---------------------------------------------------------------------------------------------------------------- utils
def smooth_max(x: torch.Tensor, gamma: float | None, dim: int = -1) -> torch.Tensor:
    """``max(x) * (sum_i (x_i / max(x)) ** gamma) ** (1 / gamma)`` along ``dim`` (0 where ``max(x) == 0``).

    ``gamma=None`` is the plain max. ``x`` must be non-negative. Always ``>= max(x)``; tends to ``max(x)`` as
    ``gamma`` grows and rewards lowering the second-busiest entries too.
    """
    peak = x.amax(dim=dim)
    if gamma is None:
        return peak
    safe = torch.where(peak > 0, peak, torch.ones_like(peak))
    ratio = x / safe.unsqueeze(dim)
    return peak * _power(ratio, gamma).sum(dim=dim).pow(1.0 / gamma)


def _power(x: torch.Tensor, gamma: float) -> torch.Tensor:
    """``x ** gamma``; by repeated squaring for integer ``gamma`` (several times faster than ``pow`` on CPU)."""
    if gamma != int(gamma) or not 1 <= gamma <= 64:
        return x.pow(gamma)
    n, out, base = int(gamma), None, x
    while n:
        if n & 1:
            out = base.clone() if out is None else out.mul_(base)
        n >>= 1
        if n:
            base = base * base
    return out


def _check_gamma(gamma: object) -> float | None:
    if gamma is None:
        return None
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)):
        raise TypeError(f"gamma must be a number > 0 or None (plain max), got {gamma!r}")
    gamma = float(gamma)
    if not math.isfinite(gamma) or gamma <= 0:
        raise ValueError(f"gamma must be a finite number > 0 or None (plain max), got {gamma}")
    return gamma


def _quantize_weights(token_weights: torch.Tensor | None, G: int, T: int,
                      scale: float | None = None) -> tuple[torch.Tensor, float]:
    """``[G, T]`` weights (default 1) -> (``[G*T]`` float64 integer fixed-point weights, scale = units per token).

    ``scale``: fixed-point units per token weight (default ``2**16``, less when the total would not stay exact in
    float64). Without weights every token counts 1 (scale 1).
    """
    if token_weights is None:
        return torch.ones(G * T, dtype=torch.float64), 1.0
    if not isinstance(token_weights, torch.Tensor):
        raise TypeError(f"token_weights must be a float tensor [world_size, tokens_per_rank], got "
                        f"{type(token_weights).__name__}")
    if tuple(token_weights.shape) != (G, T):
        raise ValueError(f"token_weights must have shape [world_size={G}, tokens_per_rank={T}] like expert_ids, got "
                         f"{list(token_weights.shape)}")
    w = token_weights.detach().to(torch.float64).reshape(-1)
    if w.numel() and (not bool(torch.isfinite(w).all()) or float(w.min()) < 0):
        raise ValueError("token_weights must be finite and >= 0")
    total = float(w.sum()) if w.numel() else 0.0
    scale = float(2 ** _FIXED_POINT_BITS) if scale is None else float(scale)
    while scale > 1 and (total * scale + w.numel()) * 4 >= _EXACT_LIMIT:
        scale /= 2
    wq = torch.round(w * scale)
    if (float(wq.sum()) + w.numel()) * 4 >= _EXACT_LIMIT:
        raise ValueError(f"token_weights sum to {total:g}: too large to count exactly; rescale them")
    return wq, scale


# ------------------------------------------------------------------------------------------------------- phase tables
@dataclass(frozen=True)
class _Phase:
    """One phase kind of the ``hd<d>`` dispatches: the level ``L`` whose group decides a row's hop, and the 0/1 tables
    ``send[s, g, r]`` / ``recv[s, g, r]``: the row from source ``s`` via level-``L`` group ``g`` leaves / reaches rank
    ``r`` in this phase (zero when it stays on its rank). ``single``: its groups are single ranks (costs 0)."""

    name: str
    level: int
    send: torch.Tensor
    recv: torch.Tensor
    single: bool
    recv_at_group: bool = False  # level D and rows land on the group's (= the expert's) rank only


@lru_cache(maxsize=32)
def _phase_tables(sizes: tuple[int, ...]) -> tuple[dict[str, _Phase], dict[int, tuple[str, ...]]]:
    """Every distinct phase of hd1..hdD on this topology, and the phases of each ``hd<d>``."""
    topology = Topology(list(sizes))
    G, D = topology.world_size, topology.num_levels
    phases: dict[str, _Phase] = {}
    by_d: dict[int, tuple[str, ...]] = {}
    for d in range(1, D + 1):
        spec = parse_dispatch(f"hd{d}", D)
        by_d[d] = spec.phases
        for index, name in enumerate(spec.phases):
            if name in phases:
                continue
            L = max(Phase.parse(p).expert_group_level(D) for p in spec.phases[: index + 1])
            U = topology.num_groups(L)
            rep = (torch.arange(U) * (G // U))[None, :].expand(G, U)
            cur = torch.arange(G)[:, None].expand(G, U)
            for p in spec.phases[:index]:
                cur = phase_next_rank(topology, p, cur, rep)
            nxt = phase_next_rank(topology, name, cur, rep)
            moving = (cur != nxt).to(torch.float64)  # [G, U]
            eye = torch.eye(G, dtype=torch.float64)
            send = eye[cur] * moving[..., None]  # [G, U, G]
            recv = eye[nxt] * moving[..., None]
            single = len(phase_groups(topology, name)[0]) == 1
            at_group = L == D and bool((nxt == torch.arange(G)[None, :]).all())
            phases[name] = _Phase(name, L, send.contiguous(), recv.contiguous(), single, at_group)
    return phases, by_d


# -------------------------------------------------------------------------------------------------------- GroupCounts
class GroupCounts:
    """Per-(token, level-``L`` group) counts of each token's chosen experts, for every level ``1..D``.

    ``expert_ids``: int ``[G, T, K]`` (``-1`` = dropped pair); ``token_weights``: optional ``[G, T]`` non-negative
    float (windowed / EMA statistics; default 1 per token). ``counts[L-1]`` is int32 ``[G*T, U[L]]``. Mutable:
    :meth:`apply_swap` updates counts and :attr:`placement` incrementally; :meth:`recomputed` counts from scratch.
    """

    def __init__(self, expert_ids: torch.Tensor, placement: Placement, topology: "Topology | str",
                 token_weights: torch.Tensor | None = None, fixed_point_scale: float | None = None):
        topology = Topology.parse(topology)
        if not isinstance(placement, Placement):
            raise TypeError(f"placement must be a Placement, got {type(placement).__name__}")
        ids = check_expert_ids(topology, placement, expert_ids)
        G, T, K = ids.shape
        if K == 0 or T == 0:
            raise ValueError(f"expert_ids must hold at least one token and one expert slot, got {list(ids.shape)}")
        s = ids.sort(dim=2).values
        if bool(((s[..., 1:] == s[..., :-1]) & (s[..., 1:] >= 0)).any()):
            raise ValueError("expert_ids has a token that lists the same expert twice; top-k experts must be distinct")
        self._raw_ids = ids
        self._raw_weights = token_weights
        self._scale_arg = fixed_point_scale
        self.topology = topology
        self.placement = placement
        self.tokens_per_rank = T
        self.top_k = K
        self.ids = ids.reshape(G * T, K).contiguous()
        self.source = torch.arange(G).repeat_interleave(T)
        self.weights, self.scale = _quantize_weights(token_weights, G, T, fixed_point_scale)
        self.counts: list[torch.Tensor] = [
            self._count(L, torch.arange(G * T)) for L in range(1, topology.num_levels + 1)
        ]
        self._hits = [self._hits_from_counts(L) for L in range(1, topology.num_levels + 1)]

    # ------------------------------------------------------------------ facts
    @property
    def num_experts(self) -> int:
        return self.placement.num_experts

    @property
    def num_tokens(self) -> int:
        return self.ids.shape[0]

    def group_size(self, level: int) -> int:
        return self.topology.world_size // self.topology.num_groups(level)

    def expert_group(self, level: int) -> torch.Tensor:
        """``[E + 1]`` int64: level-``level`` group of each expert's rank; the last entry (id ``-1``) is
        ``U[level]``."""
        U = self.topology.num_groups(level)
        return torch.cat([self.placement.expert_to_rank // self.group_size(level), torch.tensor([U])])

    def _count(self, level: int, rows: torch.Tensor) -> torch.Tensor:
        U = self.topology.num_groups(level)
        grp = self.expert_group(level)[self.ids[rows]]  # [n, K], dropped -> U
        out = torch.zeros(rows.numel(), U + 1, dtype=torch.int32)
        out.scatter_add_(1, grp, torch.ones_like(grp, dtype=torch.int32))
        return out[:, :U].contiguous()

    def _hits_from_counts(self, level: int) -> torch.Tensor:
        G, T = self.topology.world_size, self.tokens_per_rank
        hit = (self.counts[level - 1] > 0).to(torch.float64) * self.weights[:, None]
        return hit.reshape(G, T, -1).sum(dim=1)

    def hits_fixed(self, level: int) -> torch.Tensor:
        """``[G, U[level]]`` float64: fixed-point weight of the tokens of each source hitting each group (a copy;
        kept incrementally by :meth:`apply_swap`, exact because the fixed-point weights are integers)."""
        return self._hits[level - 1].clone()

    def hits(self, level: int) -> torch.Tensor:
        """``[G, U[level]]`` float64: weighted tokens of source ``s`` with at least one expert in group ``g``."""
        return self.hits_fixed(level) / self.scale

    def expert_load_fixed(self) -> torch.Tensor:
        valid = self.ids >= 0
        w = (self.weights[:, None] * valid).reshape(-1)
        return torch.zeros(self.num_experts, dtype=torch.float64).index_add_(0, self.ids.clamp_min(0).reshape(-1), w)

    def expert_load(self) -> torch.Tensor:
        """``[E]`` float64: weighted (token, expert) pairs of each expert (its compute load)."""
        return self.expert_load_fixed() / self.scale

    def rank_load(self) -> torch.Tensor:
        """``[G]`` float64: weighted (token, expert) pairs processed by each rank under :attr:`placement`."""
        return torch.zeros(self.topology.world_size, dtype=torch.float64).index_add_(
            0, self.placement.expert_to_rank, self.expert_load())

    # ------------------------------------------------------------------ swaps
    def tokens_with(self, *experts: int) -> torch.Tensor:
        """``[N]`` bool: tokens that chose any of ``experts``."""
        mask = torch.zeros(self.num_tokens, dtype=torch.bool)
        for e in experts:
            mask |= (self.ids == e).any(dim=1)
        return mask

    def apply_swap(self, a: int, b: int, has_a: torch.Tensor | None = None, has_b: torch.Tensor | None = None) -> None:
        """Swap experts ``a`` and ``b`` in :attr:`placement` and update the counts incrementally.

        Only tokens that chose exactly one of them change: at each level where the two experts' groups differ, the
        group losing its expert drops by one and the gaining group rises by one. ``has_a`` / ``has_b``: optional
        ``[N]`` bool, the tokens that chose ``a`` / ``b`` (the caller may know them).
        """
        if has_a is None or has_b is None:
            has_a, has_b = (self.ids == a).any(dim=1), (self.ids == b).any(dim=1)
        rows = (has_a ^ has_b).nonzero().flatten()
        self._move(a, b, rows, has_a[rows])

    def _move(self, a: int, b: int, rows: torch.Tensor,
              chose_a: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Swap ``a`` and ``b`` in :attr:`placement`, counts and hits; ``rows`` ``[n]``: the tokens that chose exactly
        one of them (``chose_a`` ``[n]`` bool: that one is ``a``).

        Returns, per level where the two experts' groups differ, ``(lose [n], gain [n], count_lose [n],
        count_gain [n])``: the group each token's expert leaves / joins and the token's counts there before the swap.
        """
        a, b = int(a), int(b)
        new_placement = self.placement.swapped(a, b)  # validates ids
        ra, rb = int(self.placement.expert_to_rank[a]), int(self.placement.expert_to_rank[b])
        moved = {}
        w, src = self.weights.index_select(0, rows), self.source.index_select(0, rows)
        for L in range(1, self.topology.num_levels + 1):
            size = self.group_size(L)
            ga, gb = ra // size, rb // size
            if ga == gb:
                continue
            c, h = self.counts[L - 1].view(-1), self._hits[L - 1].view(-1)
            U = self.counts[L - 1].shape[1]
            lose = torch.where(chose_a, ga, gb)
            gain = ga + gb - lose
            at_lose, at_gain = rows * U + lose, rows * U + gain
            count_lose, count_gain = c.index_select(0, at_lose), c.index_select(0, at_gain)
            h.index_add_(0, src * U + lose, -w * (count_lose == 1))  # its last expert there leaves
            h.index_add_(0, src * U + gain, w * (count_gain == 0))  # its first expert there arrives
            c.index_copy_(0, at_lose, count_lose - 1)
            c.index_copy_(0, at_gain, count_gain + 1)
            moved[L] = (lose, gain, count_lose, count_gain)
        self.placement = new_placement
        return moved

    def recomputed(self) -> "GroupCounts":
        """Fresh counts of the same routing on the current placement (the reference for the incremental update)."""
        return GroupCounts(self._raw_ids, self.placement, self.topology, self._raw_weights, self._scale_arg)

    def copy(self) -> "GroupCounts":
        out = object.__new__(GroupCounts)
        out.__dict__.update(self.__dict__)
        out.counts = [c.clone() for c in self.counts]
        out._hits = [h.clone() for h in self._hits]
        return out


# ----------------------------------------------------------------------------------------------------- predictions
def _check_row_bytes(row_bytes: object) -> int:
    if isinstance(row_bytes, bool) or not isinstance(row_bytes, int):
        raise TypeError(f"row_bytes must be an int, got {row_bytes!r}")
    if row_bytes <= 0:
        raise ValueError(f"row_bytes must be >= 1, got {row_bytes}")
    return row_bytes


def _hd_times(phase_x: dict[str, torch.Tensor], by_d: dict[int, tuple[str, ...]], tables: dict[str, _Phase],
              link_costs: LinkCosts, row_bytes: int, scale: float, gamma: float | None) -> dict[int, torch.Tensor]:
    """Per-rank loads ``x[..., G]`` (fixed point) of each phase -> ``{d: t_d[...]}`` in ms (max or smooth-max)."""
    ms: dict[str, torch.Tensor] = {}
    for name, x in phase_x.items():
        peak = smooth_max(x, gamma).to(torch.float64)
        if tables[name].single:
            ms[name] = torch.zeros_like(peak)
        else:
            cost = link_costs[name]
            ms[name] = cost.alpha + cost.beta * ((peak / scale) * row_bytes)
    out = {}
    for d, names in by_d.items():
        total = torch.zeros_like(next(iter(ms.values())))
        for n in names:  # the same order as cost.model's sum over phases
            total = total + ms[n]
        out[d] = total
    return out


def _phase_loads(counts: GroupCounts, tables: dict[str, _Phase]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{phase: (send [G], recv [G])}`` fixed-point rows each rank sends / receives in each phase."""
    hits = {L: counts.hits_fixed(L) for L in {p.level for p in tables.values()}}
    return {
        name: (hits[p.level].reshape(-1) @ p.send.reshape(-1, p.send.shape[2]),
               hits[p.level].reshape(-1) @ p.recv.reshape(-1, p.recv.shape[2]))
        for name, p in tables.items()
    }


def predict_hd_ms(counts: GroupCounts, placement: Placement, topology: "Topology | str",
                  link_costs: "LinkCosts | str", row_bytes: int, gamma: float | None = None) -> dict[int, float]:
    """Predicted one-way time (ms) of every ``hd<d>``, ``{d: ms}`` for ``d = 1..D``, from weighted counts.

    ``gamma=None``: each phase costs ``alpha + beta * busiest-rank bytes`` (equal to
    :func:`hiermoe_lightning.cost.model.predict` on the same unweighted routing); otherwise the busiest rank is
    replaced by ``smooth_max`` over ranks of max(sent, received) with exponent ``gamma`` (for ranking only).
    """
    topology = Topology.parse(topology)
    link_costs = LinkCosts.resolve(link_costs)
    row_bytes = _check_row_bytes(row_bytes)
    gamma = _check_gamma(gamma)
    if not isinstance(counts, GroupCounts):
        raise TypeError(f"counts must be a GroupCounts, got {type(counts).__name__}")
    if counts.topology != topology:
        raise ValueError(f"counts are for topology {counts.topology}, not {topology}")
    if counts.placement != placement:
        raise ValueError("counts were built for (or swapped to) a different placement than the one given")
    tables, by_d = _phase_tables(topology.sizes)
    link_costs.require(tables)
    loads = _phase_loads(counts, tables)
    x = {name: torch.maximum(s, r) for name, (s, r) in loads.items()}
    times = _hd_times(x, by_d, tables, link_costs, row_bytes, counts.scale, gamma)
    return {d: float(t) for d, t in times.items()}


def _current(counts: GroupCounts, tables: dict[str, _Phase], by_d: dict[int, tuple[str, ...]],
             link_costs: LinkCosts, row_bytes: int, gamma: float | None) -> tuple[float, float]:
    """(plain ``t_{d*}``, objective = the smooth-max time of that ``hd<d*>``) of the current placement, computed the
    way the pair search computes them (so equal loads give equal numbers)."""
    x = {name: torch.maximum(s, r)[None] for name, (s, r) in _phase_loads(counts, tables).items()}  # [1, G]
    plain = _hd_times(x, by_d, tables, link_costs, row_bytes, counts.scale, None)
    d = min(sorted(plain), key=lambda k: float(plain[k][0]))
    if gamma is None:
        return float(plain[d][0]), float(plain[d][0])
    smooth = _hd_times(x, by_d, tables, link_costs, row_bytes, counts.scale, gamma)
    return float(plain[d][0]), float(smooth[d][0])


def _best(times: dict[int, float]) -> tuple[int, float]:
    best, best_ms = 1, float("inf")
    for d in sorted(times):
        if times[d] < best_ms:
            best, best_ms = d, times[d]
    return best, best_ms


# ---------------------------------------------------------------------------------------------------- pair statistics
class _PairStats:
    """Token sums behind every pair's effect, per level ``L`` (fixed point; integers held in ``dtype``):

    * ``both[L-1]`` ``[E, E, G]``: tokens of source ``s`` that chose ``a`` and ``b`` with no other expert in ``a``'s
      level-``L`` group (``both`` is one ``[D, E, E, G]`` tensor),
    * ``lose[L-1]`` ``[E, G]``: its diagonal ``a == b``: tokens of ``s`` that chose ``e`` with no other expert in
      ``e``'s group (a view of ``both``),
    * ``gain[L][u, e, s]`` ``[U, E, G]``: tokens of ``s`` that chose ``e`` and have no expert in group ``u``.

    Kept across swaps, per (token, slot): ``alone`` ``[N, K]`` uint8, at how many levels the slot's expert is the only
    one of the token's experts in its group (0 for dropped slots). An expert alone in its level-``L`` group is alone in
    its finer groups too, so it is alone at the finest ``alone`` levels, and each (token, a, b) triple counts in
    ``both`` at those levels: a swap only re-counts the slots whose ``alone`` changes.
    """

    def __init__(self, counts: GroupCounts, dtype: torch.dtype):
        topo = counts.topology
        E, G, D = counts.num_experts, topo.world_size, topo.num_levels
        self.dtype = dtype
        self.levels = list(range(1, D + 1))
        self._valid = counts.ids >= 0  # [N, K]
        link = topo.link_level_table  # [G, G]: the first level at which two ranks' groups differ (0: same rank)
        self._depth = torch.where(link == 0, D, link - 1).to(torch.uint8)  # [G, G]: levels at which they share groups
        self._pair = counts.ids.clamp_min(0) * G + counts.source[:, None]  # [N, K]: (expert, source) index
        self._weight = counts.weights.to(dtype)[:, None] * self._valid  # [N, K]: token weight, 0 for dropped slots
        self.alone = torch.cat([_alone_levels(counts, rows, self.levels)
                                for rows in torch.arange(counts.num_tokens).split(_TOKEN_CHUNK)])
        first = torch.zeros(D + 1, E, E, G, dtype=dtype)  # index D: never alone (discarded)
        self.gain = self._count(counts, first)
        self.both = first[:-1].cumsum(dim=0)
        del first

    @property
    def lose(self) -> torch.Tensor:
        """``[D, E, G]`` view: the diagonal ``a == b`` of ``both``."""
        return self.both.diagonal(dim1=1, dim2=2).transpose(1, 2)

    def _count(self, counts: GroupCounts, first: torch.Tensor) -> dict[int, torch.Tensor]:
        """Count ``first`` from scratch (``first[l]`` ``[E, E, G]`` holds the triples whose ``a`` is alone from level
        ``l + 1`` on; its cumulative sum over levels is ``both``) and return ``gain``."""
        E, G, K, D = counts.num_experts, counts.topology.world_size, counts.top_k, counts.topology.num_levels
        first = first.view(-1)
        # gain rows are (expert, source) pairs plus one last row that collects dropped pairs
        gain = {L: torch.zeros(E * G + 1, counts.topology.num_groups(L), dtype=self.dtype) for L in self.levels}
        for r in torch.arange(counts.num_tokens).split(_TOKEN_CHUNK):
            n = r.numel()
            valid, pair = self._valid[r], self._pair[r]
            w = counts.weights[r].to(self.dtype)
            gain_idx = torch.where(valid, pair, E * G)  # dropped pairs go to the last row
            for L in self.levels:
                z = (counts.counts[L - 1][r] == 0).to(self.dtype).mul_(w[:, None])  # [n, U]
                for k in range(K):
                    gain[L].index_add_(0, gain_idx[:, k], z)
            # (a, b, s) triples (b == a included) land at the coarsest level where a is alone, the rest at level D
            level = torch.where(valid[:, None, :], D - self.alone[r].long()[:, :, None], D)  # [n, K_a, K_b]
            pair_idx = (level * E + counts.ids[r].clamp_min(0)[:, :, None]) * (E * G) + pair[:, None, :]
            first.scatter_add_(0, pair_idx.reshape(-1), w[:, None, None].expand(n, K, K).reshape(-1))
        return {L: g[:-1].T.contiguous().view(-1, E, G) for L, g in gain.items()}

    def swap(self, counts: GroupCounts, a: int, b: int) -> None:
        """``counts.apply_swap(a, b)`` and update the statistics for the tokens it touches.

        Tokens that chose exactly one of ``a``, ``b`` change counts at the levels where the two groups differ:
        ``gain`` changes at the two groups involved and ``alone`` there (:meth:`_alone_after_move`). Tokens that
        chose both keep their counts; ``a`` and ``b`` trade ``alone``. ``both`` (and ``lose``) change where ``alone``
        does.
        """
        ra, rb = int(counts.placement.expert_to_rank[a]), int(counts.placement.expert_to_rank[b])
        at_a, at_b = counts.ids == a, counts.ids == b  # [N, K]
        has_a, has_b = at_a.any(dim=1), at_b.any(dim=1)
        one = (has_a ^ has_b).nonzero().flatten()
        two = (has_a & has_b).nonzero().flatten()
        chose_a = has_a.index_select(0, one)
        moved = counts._move(a, b, one, chose_a)
        if not moved:  # same rank: nothing changes
            return
        self._update_gain(one, moved)
        old_one = self.alone.index_select(0, one)
        moving = at_a.index_select(0, one) | at_b.index_select(0, one)
        new_one = self._alone_after_move(counts, one, old_one, chose_a, moving, moved, ra, rb)
        old_two = self.alone.index_select(0, two)
        two_a, two_b = at_a.index_select(0, two), at_b.index_select(0, two)
        va = (old_two * two_a).sum(dim=1, keepdim=True, dtype=torch.uint8)  # [m, 1]: alone of a's slot
        vb = (old_two * two_b).sum(dim=1, keepdim=True, dtype=torch.uint8)
        new_two = torch.where(two_a, vb, torch.where(two_b, va, old_two))
        rows = torch.cat([one, two])
        self._update_both(counts, rows, torch.cat([old_one, old_two]), torch.cat([new_one, new_two]))

    def _alone_after_move(self, counts: GroupCounts, rows: torch.Tensor, old: torch.Tensor, chose_a: torch.Tensor,
                          moving: torch.Tensor, moved: dict[int, tuple[torch.Tensor, ...]], ra: int,
                          rb: int) -> torch.Tensor:
        """``[n, K]`` ``alone`` of tokens ``rows`` ``[n]`` that chose exactly one of the swapped experts (``chose_a``
        ``[n]``: that one is ``a``, which moves from rank ``ra`` to ``rb``), after :meth:`GroupCounts._move`
        (``moved``: its counts before the swap; ``old`` ``[n, K]``: ``alone`` before; ``moving`` ``[n, K]``: the
        moving expert's slot).

        At each level where the two groups differ: the moving expert is alone when no other expert of the token is in
        the group it joins; an expert of the group it leaves is alone when the two of them were the only ones there;
        an expert of the group it joins is not alone; any other keeps its status.
        """
        D = counts.topology.num_levels
        rank = counts.placement.expert_to_rank  # after the swap; only the moving experts' ranks changed
        depth = torch.cat([self._depth[[ra, rb]][:, rank], torch.zeros(2, 1, dtype=torch.uint8)], dim=1)  # [2, E+1]
        ids = counts.ids.index_select(0, rows)
        d_ra, d_rb = depth[0][ids], depth[1][ids]  # [n, K]: levels at which each expert shares ra's / rb's group
        from_a = chose_a[:, None]
        d_lose, d_gain = torch.where(from_a, d_ra, d_rb), torch.where(from_a, d_rb, d_ra)
        staying = ~moving & (ids >= 0)
        new = old - old.clamp(max=len(moved))  # the coarser levels keep their status
        for L, (_, _, count_lose, count_gain) in moved.items():
            was = old >= D - L + 1  # alone at level L before (alone at the finest ``old`` levels)
            in_lose, in_gain = d_lose >= L, d_gain >= L  # (exclusive: the groups differ at level L)
            now = (in_lose & (count_lose == 2)[:, None]) | (was & ~in_lose & ~in_gain)
            new += (now & staying) | (moving & (count_gain == 0)[:, None])
        return new

    def _update_gain(self, rows: torch.Tensor,
                     moved: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
        """``gain`` after :meth:`GroupCounts._move` (``rows`` ``[n]`` and ``moved`` as there): a token whose expert
        was the last in the losing group now misses it; one that had none in the gaining group now hits it."""
        for L, (lose, gain, count_lose, count_gain) in moved.items():
            flat = self.gain[L].view(-1)
            block = self.gain[L][0].numel()  # one group's [E, G] block
            for groups, sel, sign in ((lose, count_lose == 1, 1), (gain, count_gain == 0, -1)):
                sel = sel.nonzero().flatten()
                self._add_tokens(flat, groups.index_select(0, sel) * block, rows.index_select(0, sel), sign)

    def _update_both(self, counts: GroupCounts, rows: torch.Tensor, old: torch.Tensor, new: torch.Tensor) -> None:
        """Move the triples of the slots whose ``alone`` changes from ``old`` to ``new`` (``[n, K]``; tokens ``rows``
        ``[n]``) between levels, and store ``new``."""
        E, G, K, D = counts.num_experts, counts.topology.world_size, counts.top_k, counts.topology.num_levels
        self.alone.index_copy_(0, rows, new)
        slot = (new != old).view(-1).nonzero().flatten()  # changed (token, slot) pairs, flat over [n, K]
        if slot.numel() == 0:
            return
        o, n = old.view(-1).index_select(0, slot).long(), new.view(-1).index_select(0, slot).long()
        low, high = D - torch.maximum(o, n), D - torch.minimum(o, n)  # the levels low .. high-1 change
        t = rows.index_select(0, torch.div(slot, K, rounding_mode="floor"))
        a_idx = counts.ids.view(-1).index_select(0, t * K + slot % K)
        sign = torch.where(n > o, 1, -1).to(self.dtype)  # alone at more levels: the triples count at more
        flat = self.both.view(-1)
        for j in range(D):
            sel = ((low <= j) & (j < high)).nonzero().flatten()
            if sel.numel():
                block = (j * E + a_idx.index_select(0, sel)) * (E * G)  # [m]: the (j, a) block of both
                self._add_tokens(flat, block, t.index_select(0, sel), sign.index_select(0, sel))

    def _add_tokens(self, flat: torch.Tensor, offset: torch.Tensor, tokens: torch.Tensor,
                    sign: "torch.Tensor | int") -> None:
        """``flat[offset[i] + pair[tokens[i], k]] += sign[i] * weight[tokens[i], k]`` for every slot ``k``
        (``offset``, ``tokens``, ``sign``: ``[m]``; in blocks of tokens, which bounds the scratch memory)."""
        for part in torch.arange(tokens.numel()).split(_TOKEN_CHUNK):
            t = tokens.index_select(0, part)
            idx = torch.add(offset.index_select(0, part)[:, None], self._pair.index_select(0, t))  # [m, K]
            val = self._weight.index_select(0, t)
            val.mul_(sign if isinstance(sign, int) else sign.index_select(0, part)[:, None])
            flat.scatter_add_(0, idx.view(-1), val.view(-1))


def _alone_levels(counts: GroupCounts, rows: torch.Tensor, levels: Sequence[int]) -> torch.Tensor:
    """``[n, K]`` uint8: at how many of ``levels`` the k-th chosen expert of each token in ``rows`` ``[n]`` is the
    only one of the token's experts in its group (0 for dropped slots)."""
    ids = counts.ids[rows]
    out = torch.zeros(ids.shape, dtype=torch.uint8)
    for L in levels:
        c = counts.counts[L - 1]
        U = c.shape[1]
        group = torch.cat([counts.placement.expert_to_rank // counts.group_size(L), torch.zeros(1, dtype=torch.long)])
        out += c.view(-1)[(rows * U)[:, None] + group[ids]] == 1  # dropped slots read column 0; masked below
    return out.mul_(ids >= 0)


class _Scratch:
    """Scratch tensors reused across the rounds of a pair search: fresh tensors of several MiB come back from the
    allocator as new pages each round, and their page faults cost a large share of the search's time."""

    def __init__(self):
        self._tensors: dict[object, torch.Tensor] = {}

    def __call__(self, key: object, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        t = self._tensors.get(key)
        if t is None or tuple(t.shape) != shape or t.dtype != dtype:
            t = self._tensors[key] = torch.empty(shape, dtype=dtype)
        return t


def _pair_change(stats: _PairStats, level: int, g: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``S[a, b, s]`` ``[E, E, G]`` (written to ``out``): the change of source ``s``'s hits at ``a``'s
    level-``level`` group when ``a`` and ``b`` swap, ``both[a, b, s] + gain[g(a), b, s] - lose[a, s]``, and 0 where
    they share the group (``g``: ``[E]`` group of each expert)."""
    S = torch.index_select(stats.gain[level], 0, g, out=out)  # gain[g(a), b, s]
    S += stats.both[level - 1]
    S -= stats.lose[level - 1][:, None, :]
    same = (g[:, None] == g[None, :]).view(-1).nonzero().flatten()
    S.view(-1, S.shape[2]).index_fill_(0, same, 0)
    return S


def _phase_table(table: torch.Tensor, current: torch.Tensor, g: torch.Tensor,
                 dt: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A phase's send or receive table ``[G_s, U, G_r]`` at ``a``'s group and half its current loads ``[G_r]``:
    ``([E, G_s, G_r], [1, 1, G_r])``."""
    return table.to(dt).permute(1, 0, 2).index_select(0, g), (current.to(dt) * 0.5).view(1, 1, -1)


def _pair_phase_x(counts: GroupCounts, stats: _PairStats, tables: dict[str, _Phase],
                  base: dict[str, tuple[torch.Tensor, torch.Tensor]],
                  scratch: _Scratch | None = None) -> dict[str, torch.Tensor]:
    """``{phase: x[a, b, r]}``: max(sent, received) fixed-point rows of rank ``r`` in the phase after swapping
    ``a`` and ``b`` (``[E, E, G]`` in ``stats.dtype``; meaningful for ``a``, ``b`` on different ranks). With
    ``scratch`` the tensors are reused by the next call.

    Per level ``L``, :func:`_pair_change` gives the change of hits at ``a``'s group as a function of the source rank,
    and :func:`_phase_x` maps it through each phase's tables.
    """
    scratch = _Scratch() if scratch is None else scratch
    out = {}
    dt = stats.dtype
    E, G = counts.num_experts, counts.topology.world_size
    for L in sorted({p.level for p in tables.values()}):
        g = counts.expert_group(L)[:-1]  # [E]
        S = _pair_change(stats, L, g, scratch("S", (E, E, G), dt))
        for name, p in tables.items():
            if p.level == L:
                out[name] = _phase_x(p, S, g, base[name], scratch(("x", name), (E, E, G), dt), scratch)
    return out


def _phase_x(p: _Phase, S: torch.Tensor, g: torch.Tensor, current: tuple[torch.Tensor, torch.Tensor],
             x: torch.Tensor, scratch: _Scratch) -> torch.Tensor:
    """One phase's ``x[a, b, r]`` ``[E, E, G]`` (written to ``x``) from the change ``S`` of its level (``g``: ``[E]``
    group of each expert; ``current``: the ``[G]`` rows each rank sends / receives now).

    One ``baddbmm`` maps ``S`` through the table at ``a``'s group (half the current loads plus the change on ``a``'s
    side); adding the transpose adds the mirror term of ``b``.
    """
    E, G, dt = S.shape[0], S.shape[2], S.dtype
    send_cur, recv_cur = current
    tab, cur = _phase_table(p.send, send_cur, g, dt)
    if p.recv_at_group:  # one more column: the rows received at a's rank (= a's group)
        tab = torch.cat([tab, p.recv.to(dt)[:, g, g].T[:, :, None]], dim=2)  # [E, G_s, G + 1]
        cur = torch.cat([cur.expand(E, 1, G), recv_cur.to(dt)[g].view(E, 1, 1)], dim=2)
    y = torch.baddbmm(cur, S, tab, out=scratch(("y", tab.shape[2]), (E, E, tab.shape[2]), dt))
    torch.add(y[..., :G], y[..., :G].transpose(0, 1), out=x)
    if p.recv_at_group:
        _receive_at_group(x, y[..., G], recv_cur.to(dt), g)
    else:
        tab, cur = _phase_table(p.recv, recv_cur, g, dt)
        y = torch.baddbmm(cur, S, tab, out=y)
        torch.maximum(x, torch.add(y, y.transpose(0, 1), out=scratch("recv", (E, E, G), dt)), out=x)
    return x


def _receive_at_group(x: torch.Tensor, got: torch.Tensor, recv_cur: torch.Tensor, rank: torch.Tensor) -> None:
    """Take the maximum of sent rows ``x`` ``[E, E, G]`` and received rows in place, for a phase whose rows land on
    the expert's rank only: ``a``'s rank receives ``got[a, b]``, ``b``'s rank ``got[b, a]``, every other rank
    ``recv_cur`` ``[G]`` (``rank``: ``[E]`` rank of each expert)."""
    E, G = rank.numel(), x.shape[2]
    pair = torch.arange(E * E) * G  # [E * E]: start of each pair's row in x
    at_a = pair + rank.repeat_interleave(E)  # x[a, b, rank(a)], flat
    at_b = pair + rank.repeat(E)  # x[a, b, rank(b)], flat
    flat = x.view(-1)
    sent_a, sent_b = flat.index_select(0, at_a), flat.index_select(0, at_b)
    torch.maximum(x, recv_cur, out=x)
    flat.index_copy_(0, at_a, torch.maximum(sent_a, got.reshape(-1)))
    flat.index_copy_(0, at_b, torch.maximum(sent_b, got.T.reshape(-1)))


# ---------------------------------------------------------------------------------------------------------- planner
@dataclass(frozen=True)
class SwapPlan:
    """The result of :func:`plan_swaps`, and of every planner (:mod:`hiermoe_lightning.placement.planners`).
    ``swaps`` applied in order to ``placement_before`` (:meth:`Placement.swapped`) give ``placement_after``; times
    are one-way plain-max predictions of ``chosen_before`` / ``chosen_after`` (``hd<d>``); ``seconds``: the time the
    plan took."""

    swaps: list[tuple[int, int]]
    placement_before: Placement
    placement_after: Placement
    predicted_ms_before: float
    predicted_ms_after: float
    chosen_before: str
    chosen_after: str
    moved_experts: int
    seconds: float
    round_seconds: list[float] = field(default_factory=list)

    @property
    def saving_ms(self) -> float:
        return self.predicted_ms_before - self.predicted_ms_after


def migration_ms_table(topology: "Topology | str", link_costs: "LinkCosts | str", expert_bytes: float,
                       link_bandwidth_bytes_per_ms: float | None = None) -> torch.Tensor:
    """``[D + 1]`` float64: time (ms) to swap two experts whose ranks first differ at level ``L`` (index ``L``).

    A swap moves ``expert_bytes`` each way, counted as ``2 * expert_bytes`` over one link. With
    ``link_bandwidth_bytes_per_ms``: ``2 * expert_bytes / bandwidth``. Otherwise ``alpha + beta * 2 * expert_bytes``
    of the phase kind that runs over that link: ``inter{L}`` for ``L < D``, ``intra{D-1}`` for ``L = D``
    (``a2a`` on a one-level topology). Index 0 (same rank) is 0.
    """
    topology = Topology.parse(topology)
    link_costs = LinkCosts.resolve(link_costs)
    D = topology.num_levels
    out = torch.zeros(D + 1, dtype=torch.float64)
    moved = 2.0 * float(expert_bytes)
    for L in range(1, D + 1):
        if link_bandwidth_bytes_per_ms is not None:
            out[L] = moved / float(link_bandwidth_bytes_per_ms)
        else:
            phase = f"inter{L}" if L < D else (f"intra{D - 1}" if D >= 2 else "a2a")
            out[L] = link_costs[phase].ms(moved)
    return out


def _search_precision(token_weights: torch.Tensor | None) -> tuple[float | None, torch.dtype]:
    """Fixed-point scale (units per token weight) and dtype of the pair search.

    float32 holds integers exactly below 2**24 and runs about twice as fast as float64; no number the search forms
    exceeds 3x the total fixed-point weight (each rank's loads and their changes are bounded by it). So float32 is
    used with the largest integer scale that keeps 4x the total below 2**24, provided the lightest token keeps >= 16
    units (quantisation error <= 3%); otherwise float64 with ``2**16`` units per token weight. Without weights every
    token counts 1 (float32 up to about four million tokens; the caller checks).
    """
    if token_weights is None:
        return 1.0, torch.float32
    if not isinstance(token_weights, torch.Tensor):
        return None, torch.float64  # GroupCounts raises the clear error
    w = token_weights.detach().to(torch.float64).reshape(-1)
    if w.numel() == 0 or not bool(torch.isfinite(w).all()) or float(w.min()) < 0:
        return None, torch.float64
    total = float(w.sum())
    positive = w[w > 0]
    if total <= 0 or positive.numel() == 0:
        return None, torch.float64
    # rounding adds at most half a unit per token: (sum + tokens) * 4 stays below 2**24 (the caller checks)
    scale = min(float(2 ** _FIXED_POINT_BITS), math.floor((_FLOAT32_EXACT / 4 - 2 * w.numel()) / total))
    if scale >= 1 and float(positive.min()) * scale >= 16:
        return float(scale), torch.float32
    return None, torch.float64


def _check_positive_number(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{what} must be a finite number > 0, got {value}")
    return value


def _candidate_mask(candidate_pairs: Iterable[Sequence[int]] | None, E: int) -> torch.Tensor | None:
    if candidate_pairs is None:
        return None
    mask = torch.zeros(E, E, dtype=torch.bool)
    for pair in candidate_pairs:
        if len(pair) != 2:
            raise ValueError(f"candidate_pairs must hold (a, b) expert pairs, got {pair!r}")
        a, b = (int(v) for v in pair)
        if not (0 <= a < E and 0 <= b < E):
            raise ValueError(f"candidate_pairs: expert ids must be in 0..{E - 1}, got {(a, b)}")
        mask[a, b] = mask[b, a] = True
    return mask


def _balance_ok(rank_load: torch.Tensor, expert_load: torch.Tensor, expert_rank: torch.Tensor,
                tolerance: float) -> torch.Tensor:
    """``[E, E]`` bool: swapping ``a`` and ``b`` keeps the busiest rank's load <= max(current busiest, tol * mean)."""
    G = rank_load.numel()
    limit = max(float(rank_load.max()), tolerance * float(rank_load.sum()) / G)
    ra, rb = expert_rank[:, None], expert_rank[None, :]
    diff = expert_load[None, :] - expert_load[:, None]  # [a, b]: load[b] - load[a]
    new_ra = rank_load[ra] + diff
    new_rb = rank_load[rb] - diff
    k = min(3, G)
    top_v, top_i = rank_load.topk(k)  # the busiest ranks other than ra, rb are among the top 3
    other = torch.full_like(new_ra, float("-inf"))
    for j in reversed(range(k)):  # the first top entry not equal to ra or rb wins
        usable = (top_i[j] != ra) & (top_i[j] != rb)
        other = torch.where(usable, top_v[j], other)
    new_max = torch.maximum(torch.maximum(new_ra, new_rb), other)
    return new_max <= limit


@dataclass(frozen=True)
class _PlanArgs:
    """:func:`plan_swaps`' options, checked and normalised by :func:`_check_plan_args`."""

    topology: Topology
    link_costs: LinkCosts
    row_bytes: int  # hidden_size x bytes_per_elem: the bytes of one token row
    max_swaps: int
    gamma: float | None
    expert_bytes: float | None
    horizon_steps: int | None
    link_bandwidth_bytes_per_ms: float | None
    compute_balance_tolerance: float | None
    ranking: str

    @property
    def horizon(self) -> int:
        """The steps a saving counts for: ``horizon_steps``, or 1 without a migration charge."""
        return self.horizon_steps or 1


def _check_plan_args(topology: "Topology | str", link_costs: "LinkCosts | str", hidden_size: int,
                     bytes_per_elem: int, *, max_swaps: int, gamma: float | None, expert_bytes: float | None,
                     horizon_steps: int | None, link_bandwidth_bytes_per_ms: float | None,
                     compute_balance_tolerance: float | None, ranking: str) -> _PlanArgs:
    """Check every option of :func:`plan_swaps` except the routing, the placement and ``candidate_pairs`` (checked
    with the counts they belong to); ``TypeError`` / ``ValueError`` naming the first bad one."""
    topology = Topology.parse(topology)
    link_costs = LinkCosts.resolve(link_costs)
    hidden_size = check_int(hidden_size, "hidden_size", 1)
    bytes_per_elem = check_int(bytes_per_elem, "bytes_per_elem", 1)
    max_swaps = check_int(max_swaps, "max_swaps", 0)
    gamma = _check_gamma(gamma)
    if (expert_bytes is None) != (horizon_steps is None):
        raise ValueError("expert_bytes and horizon_steps must be given together (migration cost needs both) or "
                         f"not at all; got expert_bytes={expert_bytes!r}, horizon_steps={horizon_steps!r}")
    if expert_bytes is not None:
        expert_bytes = _check_positive_number(expert_bytes, "expert_bytes")
        horizon_steps = check_int(horizon_steps, "horizon_steps", 1)
    if link_bandwidth_bytes_per_ms is not None:
        link_bandwidth_bytes_per_ms = _check_positive_number(link_bandwidth_bytes_per_ms, "link_bandwidth_bytes_per_ms")
    if compute_balance_tolerance is not None:
        compute_balance_tolerance = _check_positive_number(compute_balance_tolerance, "compute_balance_tolerance")
    if ranking not in ("plain_first", "smooth"):
        raise ValueError(f"ranking must be 'plain_first' or 'smooth', got {ranking!r}")
    return _PlanArgs(topology, link_costs, hidden_size * bytes_per_elem, max_swaps, gamma, expert_bytes,
                     horizon_steps, link_bandwidth_bytes_per_ms, compute_balance_tolerance, ranking)


def _choose_precision(expert_ids: torch.Tensor, placement: Placement, topology: Topology,
                      token_weights: torch.Tensor | None) -> tuple[GroupCounts, torch.dtype]:
    """The routing's :class:`GroupCounts`, at the fixed-point scale of :func:`_search_precision`, and the dtype of
    the pair search: float32 when every number it forms stays an exact float32 integer, else float64."""
    scale, dtype = _search_precision(token_weights)
    counts = GroupCounts(expert_ids, placement, topology, token_weights, fixed_point_scale=scale)
    if (float(counts.weights.sum()) + counts.num_tokens) * 4 >= _FLOAT32_EXACT:
        dtype = torch.float64
    return counts, dtype


@dataclass(frozen=True)
class _SearchSpace:
    """What every round of the pair search reads and no swap changes: the phase tables, the pairs allowed, the
    migration price of each link level, and each expert's compute load (fixed point)."""

    tables: dict[str, _Phase]
    by_d: dict[int, tuple[str, ...]]  # the phases of each hd<d>
    allowed: torch.Tensor  # [E, E] bool: a < b, and in candidate_pairs when given
    migration_ms: torch.Tensor | None  # [D + 1]: migration_ms_table, or None when migration is free
    link_level: torch.Tensor  # [G, G]: the level at which two ranks first differ
    expert_load: torch.Tensor  # [E] float64, fixed point


def _search_space(counts: GroupCounts, args: _PlanArgs,
                  candidate_pairs: Iterable[Sequence[int]] | None) -> _SearchSpace:
    """The :class:`_SearchSpace` of a plan (checks that the link costs cover every phase and ``candidate_pairs``)."""
    E = counts.num_experts
    tables, by_d = _phase_tables(args.topology.sizes)
    args.link_costs.require(tables)
    allowed = torch.ones(E, E, dtype=torch.bool).triu(1)
    cand = _candidate_mask(candidate_pairs, E)
    if cand is not None:
        allowed &= cand
    mig = None
    if args.expert_bytes is not None:
        mig = migration_ms_table(args.topology, args.link_costs, args.expert_bytes, args.link_bandwidth_bytes_per_ms)
    return _SearchSpace(tables, by_d, allowed, mig, args.topology.link_level_table, counts.expert_load_fixed())


@dataclass(frozen=True)
class _Move:
    """One round's chosen swap: the experts, plain ``t_{d*}`` and the smooth-max objective (without migration) after
    it, and its migration ms."""

    a: int
    b: int
    plain_ms: float
    objective: float
    migration_ms: float


def _candidates(counts: GroupCounts, best_plain: torch.Tensor, current_ms: float, space: _SearchSpace,
                args: _PlanArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ia, ib)`` ``[C]`` each: the candidate pairs, ``a < b`` in increasing order: on different ranks, allowed,
    plain ``t_{d*}`` not above ``current_ms`` (never a slower dispatch) and, with a tolerance, the balance guard."""
    rank = counts.placement.expert_to_rank
    ok = space.allowed & (rank[:, None] != rank[None, :]) & (best_plain <= current_ms)
    if args.compute_balance_tolerance is not None:
        rank_load = torch.zeros(counts.topology.world_size, dtype=torch.float64).index_add_(0, rank, space.expert_load)
        ok &= _balance_ok(rank_load, space.expert_load, rank, args.compute_balance_tolerance)
    return ok.nonzero(as_tuple=True)


def _rank_candidates(plain_ab: torch.Tensor, pair_mig: torch.Tensor, current_ms: float, current_obj: float,
                     smooth_of, args: _PlanArgs) -> tuple[int, float] | None:
    """The index of the candidate to apply and its smooth-max objective, or None when no candidate pays or is a
    plateau move (``plain_ab`` / ``pair_mig`` ``[C]``: plain ``t_{d*}`` after each and its migration ms;
    ``smooth_of(sel)``: the smooth-max objectives of the candidates ``sel``).

    ``plain_first``: among the paying candidates the lowest plain cost (plus amortised migration) wins and the
    smooth-max objective breaks its ties; without one, the plateau moves by plain cost, then objective. ``smooth``:
    the lowest smooth-max objective among paying and plateau moves. Remaining ties: the lowest ``(a, b)``."""
    h = args.horizon
    plain_cost = plain_ab + pair_mig / h
    pays = (current_ms - plain_ab) * h - pair_mig > _SAVING_EPS_MS  # faster, by more than migration
    if args.ranking == "plain_first" and bool(pays.any()):
        tied = (pays & (plain_cost == plain_cost[pays].min())).nonzero().flatten()
        smooth_t = smooth_of(tied)
        j = int(torch.argmin(smooth_t + pair_mig[tied] / h))  # first minimum: lowest (a, b)
        return int(tied[j]), float(smooth_t[j])
    smooth_ab = smooth_of(torch.arange(plain_ab.numel()))
    smooth_cost = smooth_ab + pair_mig / h
    smoother = smooth_cost < current_obj - _OBJECTIVE_RTOL * abs(current_obj)  # a plateau move
    better = (pays | smoother).nonzero().flatten()
    if not better.numel():
        return None
    if args.ranking == "smooth":  # the paper: the lowest smooth-max objective
        j = int(torch.argmin(smooth_cost[better]))
    else:  # plateau moves only: the lowest plain cost, then the lowest smooth-max objective
        tied = (plain_cost[better] == plain_cost[better].min()).nonzero().flatten()
        j = int(tied[torch.argmin(smooth_cost[better][tied])])
    return int(better[j]), float(smooth_ab[better[j]])


def _search_round(counts: GroupCounts, stats: _PairStats, scratch: _Scratch, space: _SearchSpace, args: _PlanArgs,
                  current_ms: float, current_obj: float) -> _Move | None:
    """One greedy round: every pair's loads after its swap (:func:`_pair_phase_x`), their plain ``t_d`` and best
    ``d``, the :func:`_candidates`, and the one :func:`_rank_candidates` picks (None: no candidate)."""
    x = _pair_phase_x(counts, stats, space.tables, _phase_loads(counts, space.tables), scratch)
    plain = _hd_times(x, space.by_d, space.tables, args.link_costs, args.row_bytes, counts.scale, None)
    best_plain, d_idx = torch.stack([plain[d] for d in sorted(plain)]).min(dim=0)  # ties -> smaller d, like choose_hd
    ia, ib = _candidates(counts, best_plain, current_ms, space, args)
    if not ia.numel():
        return None

    def smooth_of(sel: torch.Tensor) -> torch.Tensor:
        """Smooth-max objective (without migration) of the candidates ``sel``, in float64."""
        if args.gamma is None:
            return best_plain[ia[sel], ib[sel]]
        xs = {name: xp[ia[sel], ib[sel]].to(torch.float64) for name, xp in x.items()}  # [P, G]
        smooth = _hd_times(xs, space.by_d, space.tables, args.link_costs, args.row_bytes, counts.scale, args.gamma)
        return torch.stack([smooth[d] for d in sorted(smooth)]).gather(0, d_idx[ia[sel], ib[sel]][None])[0]

    rank = counts.placement.expert_to_rank
    pair_mig = (space.migration_ms[space.link_level[rank[ia], rank[ib]]] if space.migration_ms is not None
                else torch.zeros(ia.numel(), dtype=torch.float64))
    picked = _rank_candidates(best_plain[ia, ib], pair_mig, current_ms, current_obj, smooth_of, args)
    if picked is None:
        return None
    best, objective = picked
    a, b = int(ia[best]), int(ib[best])
    return _Move(a, b, float(best_plain[a, b]), objective, float(pair_mig[best]))


@dataclass
class _SearchPath:
    """The swaps the greedy search applied, in order, with plain ``t_{d*}`` and the cumulative migration ms after
    each, and each round's seconds (the last round may have found nothing)."""

    swaps: list[tuple[int, int]] = field(default_factory=list)
    ms: list[float] = field(default_factory=list)
    migration_ms: list[float] = field(default_factory=list)
    round_seconds: list[float] = field(default_factory=list)


def _greedy_search(counts: GroupCounts, dtype: torch.dtype, space: _SearchSpace, args: _PlanArgs) -> _SearchPath:
    """Apply the best move of each :func:`_search_round` to ``counts`` (which ends at the last swap) until
    ``max_swaps`` swaps or no candidate; return the path taken. One rank (or ``max_swaps=0``): no search."""
    path = _SearchPath()
    if args.max_swaps == 0 or args.topology.world_size == 1:
        return path
    stats = _PairStats(counts, dtype)
    scratch = _Scratch()
    current_ms, current_obj = _current(counts, space.tables, space.by_d, args.link_costs, args.row_bytes, args.gamma)
    while len(path.swaps) < args.max_swaps:
        r0 = time.perf_counter()
        move = _search_round(counts, stats, scratch, space, args, current_ms, current_obj)
        path.round_seconds.append(time.perf_counter() - r0)
        if move is None:
            break
        stats.swap(counts, move.a, move.b)  # also applies the swap to counts
        path.swaps.append((move.a, move.b))
        current_ms, current_obj = move.plain_ms, move.objective
        path.ms.append(current_ms)
        path.migration_ms.append((path.migration_ms[-1] if path.migration_ms else 0.0) + move.migration_ms)
    return path


def _best_prefix(path: _SearchPath, ms_before: float, horizon: int) -> int:
    """How many of the path's swaps to keep: the prefix with the largest net gain ``(t_before - t_k) x horizon -
    migration``, 0 unless some prefix gains more than float noise (plateau moves that led nowhere are dropped)."""
    keep, best_net = 0, 0.0
    for k in range(1, len(path.swaps) + 1):
        net = (ms_before - path.ms[k - 1]) * horizon - path.migration_ms[k - 1]
        if net > best_net + _SAVING_EPS_MS:
            keep, best_net = k, net
    return keep


def plan_swaps(
    expert_ids: torch.Tensor,
    placement: Placement,
    topology: "Topology | str",
    link_costs: "LinkCosts | str",
    hidden_size: int,
    bytes_per_elem: int,
    *,
    max_swaps: int,
    token_weights: torch.Tensor | None = None,
    gamma: float | None = 10.0,
    expert_bytes: float | None = None,
    horizon_steps: int | None = None,
    link_bandwidth_bytes_per_ms: float | None = None,
    compute_balance_tolerance: float | None = 1.10,
    candidate_pairs: Iterable[Sequence[int]] | None = None,
    ranking: str = "plain_first",
) -> SwapPlan:
    """Greedy expert swaps that lower the predicted all-to-all time ``t_{d*}`` (one way, plain max).

    Each round evaluates every pair ``(a, b)`` of experts on different ranks (or only ``candidate_pairs``). A pair is
    a *candidate* when, after swapping it:

    * ``t_{d*}`` (plain max) does not rise, and with ``compute_balance_tolerance`` (``None`` disables the guard) the
      busiest rank's weighted (token, expert) load stays <= max(current busiest, tolerance * mean), and
    * either it *pays*: ``(t_{d*} now - after) * horizon_steps > migration_ms`` (with ``expert_bytes`` and
      ``horizon_steps``; see :func:`migration_ms_table`; otherwise any saving > 0), or it is a *plateau move*: it
      lowers the smooth-max objective (``t_{d*}`` with each phase's busiest rank replaced by
      ``smooth_max(., gamma)``, plus the amortised ``migration_ms / horizon_steps``) without lowering plain ``t_{d*}``
      enough; it unloads the second-busiest ranks so a later swap can lower the max (``gamma=None``: no plateau moves).

    ``ranking="plain_first"`` (default) applies the candidate with the lowest plain ``t_{d*}`` after the swap (plus
    amortised migration), ties and plateau moves broken by the lowest smooth-max objective; ``ranking="smooth"``
    applies the lowest smooth-max objective (the paper's rule; on our zipf test traces it stalls early, well above
    ``plain_first``). Remaining ties go to the lowest ``(a, b)``. The rounds stop after
    ``max_swaps`` swaps or when no pair is a candidate; the plan is then the prefix of the swaps with the largest net
    gain ``(t_before - t_k) * horizon_steps - sum of migration_ms`` (> 0), so plateau moves that led nowhere are dropped
    and the kept swaps pay for their migration together. The saving counts once per step (one-way dispatch): scale
    ``horizon_steps`` to count dispatch plus combine, forward plus backward.

    ``expert_ids`` int ``[G, T, K]`` (``-1`` = dropped); ``token_weights`` optional ``[G, T]`` (e.g.
    :meth:`RoutingWindow.trace`; quantised to fixed point, see :class:`GroupCounts`). Pure and deterministic.

    The steps: :func:`_check_plan_args`, :func:`_choose_precision` (the counts and the search dtype),
    :func:`_search_space`, :func:`_greedy_search` (rounds of :func:`_search_round`), :func:`_best_prefix`.
    """
    t0 = time.perf_counter()
    args = _check_plan_args(topology, link_costs, hidden_size, bytes_per_elem, max_swaps=max_swaps, gamma=gamma,
                            expert_bytes=expert_bytes, horizon_steps=horizon_steps,
                            link_bandwidth_bytes_per_ms=link_bandwidth_bytes_per_ms,
                            compute_balance_tolerance=compute_balance_tolerance, ranking=ranking)
    counts, dtype = _choose_precision(expert_ids, placement, args.topology, token_weights)
    space = _search_space(counts, args, candidate_pairs)
    d_before, ms_before = _best(predict_hd_ms(counts, placement, args.topology, args.link_costs, args.row_bytes))
    path = _greedy_search(counts, dtype, space, args)
    keep = _best_prefix(path, ms_before, args.horizon)
    for a, b in reversed(path.swaps[keep:]):
        counts.apply_swap(a, b)  # undo the swaps that did not pay
    d_after, ms_after = _best(predict_hd_ms(counts, counts.placement, args.topology, args.link_costs, args.row_bytes))
    return SwapPlan(
        swaps=path.swaps[:keep],
        placement_before=placement,
        placement_after=counts.placement,
        predicted_ms_before=ms_before,
        predicted_ms_after=ms_after,
        chosen_before=f"hd{d_before}",
        chosen_after=f"hd{d_after}",
        moved_experts=int((placement.expert_to_rank != counts.placement.expert_to_rank).sum()),
        seconds=time.perf_counter() - t0,
        round_seconds=path.round_seconds,
    )
