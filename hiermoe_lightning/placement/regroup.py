"""Regrouping: a whole new placement that gathers co-activated experts, for when pairwise swaps stall.

The greedy swap search (:func:`~.planner.plan_swaps`) takes one swap at a time, each of which must lower the
predicted all-to-all time. On clustered routing that is a cliff: a token stops crossing the node link only once
*all* of its experts on the far node have come home, so the first swaps of a good regrouping save almost nothing and
the search stops near its start (measured: 1-16 % saved where gathering the clusters saves 12-31 %,
docs/benchmarks.md section 13). This module proposes the far end directly:

1. :func:`coactivation`: ``A[a, b]`` = weighted tokens that chose both ``a`` and ``b`` (``A[a, a]``: the load of
   ``a``), one matrix product;
2. :func:`balanced_groups`: split experts into equal-size groups with much co-activation inside each: seeded greedy
   growth, then Kernighan-Lin pair exchanges while one raises the co-activation inside groups;
3. :func:`regrouped_placement`: level by level (nodes, then the groups inside a node, ... down to ranks), each group
   assigned to the position that already holds most of its experts (fewest moves); experts that stay on their rank
   keep their slot.

Pure and deterministic (ties: lowest expert id). The planner prices the result with the same cost model as its
swaps and keeps whichever plan gains more (:func:`~.planners.hiermoe_planner`).
"""

from __future__ import annotations

import torch

from ..topology import Topology
from .baselines import _keep_slots
from .placement import Placement

__all__ = ["coactivation", "balanced_groups", "regrouped_placement", "rebalanced"]


def coactivation(expert_ids: torch.Tensor, token_weights: torch.Tensor | None, num_experts: int) -> torch.Tensor:
    """``[E, E]`` float64: ``A[a, b]`` = the summed weight of the tokens that chose both ``a`` and ``b`` (the
    diagonal: each expert's weighted load). ``expert_ids`` int ``[..., K]`` (``-1`` = dropped; a token's ids are
    distinct), ``token_weights`` ``[...]`` or None (each token counts 1)."""
    ids = expert_ids.reshape(-1, expert_ids.shape[-1]).long()
    n = ids.shape[0]
    member = torch.zeros(n, num_experts + 1, dtype=torch.float64)  # column E: the dropped pairs, then cut off
    member.scatter_(1, torch.where(ids >= 0, ids, num_experts), 1.0)
    member = member[:, :num_experts]
    w = torch.ones(n, dtype=torch.float64) if token_weights is None else token_weights.reshape(-1).double()
    return (member * w[:, None]).T @ member


def _grow(A: torch.Tensor, pool: list[int], num_groups: int, cap: float | None = None) -> list[list[int]]:
    """Equal-size groups by seeded growth: each group starts from the heaviest expert left and takes, one by one,
    the expert left with the most co-activation with its members (ties: heavier, then lower id).

    With ``cap``, a group takes only an expert after which it can still be filled within ``cap`` (its load, plus the
    expert's, plus the lightest experts left for its remaining places); when none fits, the lightest expert."""
    size = len(pool) // num_groups
    left = torch.zeros(A.shape[0], dtype=torch.bool)
    left[pool] = True
    load = A.diagonal()
    minus_inf = torch.tensor(float("-inf"), dtype=A.dtype)
    groups = []
    for _ in range(num_groups):
        seed = int(torch.where(left, load, minus_inf).argmax())
        group, left[seed] = [seed], False
        pull = A[seed].clone()
        group_load = float(load[seed])
        while len(group) < size:
            score = torch.where(left, pull * (1 + 1e-9) + load * 1e-12, minus_inf)
            if cap is not None:
                places = size - len(group) - 1  # still to fill after this pick
                lightest = torch.sort(load[left]).values
                # the pick plus the lightest fill of the places after it: max(its load + the `places` lightest,
                # the `places + 1` lightest), exact whether or not the pick is one of the lightest itself
                least = torch.maximum(load + lightest[:places].sum(), lightest[:places + 1].sum())
                fits = left & (group_load + least <= cap)
                score = torch.where(fits, score, minus_inf) if bool(fits.any()) else \
                    torch.where(left, -load, minus_inf)
            pick = int(score.argmax())
            group.append(pick)
            left[pick] = False
            pull += A[pick]
            group_load += float(load[pick])
        groups.append(sorted(group))
    return groups


def _unload(A: torch.Tensor, label: torch.Tensor, num_groups: int, cap: float,
            max_rounds: int) -> list[tuple[int, int]]:
    """Swaps that bring the heaviest group's load (``A``'s diagonal summed over its members) to ``<= cap``, each
    lowering the heaviest group's load and, among those, losing the least co-activation inside groups: the swap of
    ``a`` in the heaviest group with a lighter ``b`` elsewhere. ``label [n]`` (each row's group) is updated in place;
    returns the swaps ``(a, b)`` (row indices), at most ``max_rounds``. Stops early when no swap helps: the heaviest
    group may stay above ``cap``."""
    load = A.diagonal()
    off = A.clone()
    off.fill_diagonal_(0.0)
    swaps: list[tuple[int, int]] = []
    for _ in range(max_rounds):
        group_load = torch.zeros(num_groups, dtype=load.dtype).index_add_(0, label, load)
        heaviest = int(group_load.argmax())
        if float(group_load[heaviest]) <= cap:
            break
        onehot = torch.nn.functional.one_hot(label, num_groups).to(A.dtype)
        pull = off @ onehot  # [n, U]: co-activation of each row with each group
        own = pull.gather(1, label[:, None])[:, 0]
        d = load[:, None] - load[None, :]  # [a, b]: load moved off a's group
        new_heavy = group_load[heaviest] - d
        new_other = group_load[label][None, :] + d
        ok = (label[:, None] == heaviest) & (label[None, :] != heaviest) & (d > 0) & \
            (torch.maximum(new_heavy, new_other) < group_load[heaviest])
        if not bool(ok.any()):
            break
        loss = (own[:, None] - pull[:, label]) + (own[None, :] - pull[torch.arange(len(label))[None, :], heaviest]) \
            + 2 * off
        loss = torch.where(ok, loss, torch.tensor(float("inf"), dtype=loss.dtype))
        a, b = divmod(int(loss.argmin()), loss.shape[1])
        label[a], label[b] = label[b].clone(), label[a].clone()
        swaps.append((a, b))
    return swaps


def _refine(A: torch.Tensor, groups: list[list[int]], max_rounds: int, cap: float | None = None) -> list[list[int]]:
    """Kernighan-Lin exchanges: swap the pair (``a`` in one group, ``b`` in another) that most raises the
    co-activation inside groups, while one does (at most ``max_rounds``). Vectorised over all pairs per round.

    With ``cap``, the groups' loads (``A``'s diagonal summed) are first brought under it (:func:`_unload`), and no
    exchange then takes a group above ``max(cap, its load)``: co-activation is gathered within the compute-balance
    guard instead of against it."""
    experts = [e for g in groups for e in g]
    idx = torch.tensor(experts)
    sub = A[idx][:, idx].clone()
    load = sub.diagonal().clone()
    label = torch.tensor([gi for gi, g in enumerate(groups) for _ in g])
    if cap is not None:
        _unload(sub, label, len(groups), cap, len(experts))
    sub.fill_diagonal_(0.0)
    onehot = torch.nn.functional.one_hot(label, len(groups)).to(sub.dtype)  # [n, U]
    for _ in range(max_rounds):
        pull = sub @ onehot  # [n, U]: co-activation of each expert with each group
        own = pull.gather(1, label[:, None])[:, 0]
        to_b = pull[:, label]  # [a, b]: a's pull towards b's group
        gain = (to_b - own[:, None]) + (to_b.T - own[None, :]) - 2 * sub
        gain[label[:, None] == label[None, :]] = float("-inf")
        if cap is not None:  # neither group may go above max(cap, its load now)
            group_load = torch.zeros(len(groups), dtype=load.dtype).index_add_(0, label, load)
            bound = group_load.clamp_min(cap)
            d = load[None, :] - load[:, None]  # [a, b]: load a's group gains
            over = (group_load[label][:, None] + d > bound[label][:, None] * (1 + 1e-12)) | \
                (group_load[label][None, :] - d > bound[label][None, :] * (1 + 1e-12))
            gain[over] = float("-inf")
        best = int(gain.argmax())  # first maximum: lowest (a, b)
        a, b = divmod(best, gain.shape[1])
        if not float(gain[a, b]) > 1e-9 * float(sub.sum().clamp_min(1.0)):
            break
        label[a], label[b] = label[b].clone(), label[a].clone()
        onehot = torch.nn.functional.one_hot(label, len(groups)).to(sub.dtype)
    out = [[] for _ in groups]
    for e, g in zip(experts, label.tolist()):
        out[g].append(e)
    return [sorted(g) for g in out]


def balanced_groups(A: torch.Tensor, pool: list[int], num_groups: int,
                    max_rounds: int | None = None, cap: float | None = None) -> list[list[int]]:
    """``pool`` split into ``num_groups`` groups of ``len(pool) / num_groups`` experts with much co-activation
    (``A [E, E]``) inside each: :func:`_grow`, then :func:`_refine` (``max_rounds``: default ``len(pool)``). With
    ``cap``, each group's load (``A``'s diagonal summed) is kept at most ``cap`` where swaps can get it there."""
    if num_groups < 1 or len(pool) % num_groups:
        raise ValueError(f"cannot split {len(pool)} experts into {num_groups} equal groups")
    groups = _grow(A, sorted(pool), num_groups, cap)
    if num_groups == 1:
        return groups
    return _refine(A, groups, len(pool) if max_rounds is None else max_rounds, cap)


def _assign(groups: list[list[int]], slots: list[list[int]], where: torch.Tensor) -> list[list[int]]:
    """Match groups to positions (``slots[j]``: the ranks of position ``j``), most experts already there first:
    ``where [E]`` is each expert's current rank. Returns the groups in position order."""
    overlap = torch.tensor([[sum(int(where[e]) in set(s) for e in g) for s in slots] for g in groups],
                           dtype=torch.long)
    order: list[list[int] | None] = [None] * len(slots)
    free_g, free_s = set(range(len(groups))), set(range(len(slots)))
    while free_g:
        best = max(((int(overlap[g, s]), -g, -s) for g in free_g for s in free_s))
        g, s = -best[1], -best[2]
        order[s] = groups[g]
        free_g.remove(g)
        free_s.remove(s)
    return order  # type: ignore[return-value]


def regrouped_placement(A: torch.Tensor, current: Placement, topology: "Topology | str",
                        rank_load_limit: float | None = None) -> Placement:
    """A placement whose level-``L`` groups (nodes, ..., ranks) hold experts with much co-activation ``A [E, E]``,
    found level by level and matched to the current placement so that as few experts as possible move.

    ``rank_load_limit``: the most expert load (``A``'s diagonal) a rank should carry (the compute-balance guard); a
    group of ``r`` ranks is then kept at ``r x rank_load_limit`` at most, at every level, where swaps can get it
    there. Without it, clusters of unequal load can end on one node and the guard undoes the regrouping."""
    topology = Topology.parse(topology)
    E, G = current.num_experts, current.world_size
    if topology.world_size != G:
        raise ValueError(f"topology {topology} has {topology.world_size} ranks, the placement {G}")
    where = current.expert_to_rank
    # (experts, ranks) blocks to split, outermost level first
    blocks: list[tuple[list[int], list[int]]] = [(list(range(E)), list(range(G)))]
    for size in topology.sizes:
        nxt = []
        for experts, ranks in blocks:
            if size == 1:
                nxt.append((experts, ranks))
                continue
            span = len(ranks) // size
            parts = [ranks[j * span:(j + 1) * span] for j in range(size)]
            groups = balanced_groups(A, experts, size,
                                     cap=None if rank_load_limit is None else rank_load_limit * span)
            nxt.extend(zip(_assign(groups, parts, where), parts))
        blocks = nxt
    new_rank = torch.empty(E, dtype=torch.long)
    for experts, ranks in blocks:
        new_rank[experts] = ranks[0]
    return _keep_slots(current, new_rank)


def rebalanced(placement: Placement, A: torch.Tensor, limit: float, max_rounds: int | None = None) -> Placement:
    """``placement`` with its busiest rank brought to an expert load (``A``'s diagonal) <= ``limit`` by swaps that
    each lower the busiest rank's load, cheapest first: the swap of an expert ``a`` on the busiest rank with a
    lighter one ``b`` elsewhere that loses the least co-activation inside ranks (:func:`_unload`). Stops when the
    limit holds, no swap helps, or after ``max_rounds`` (default ``E``) swaps; may return a placement still above
    the limit."""
    label = placement.expert_to_rank.clone()
    rounds = placement.num_experts if max_rounds is None else max_rounds
    for a, b in _unload(A, label, placement.world_size, limit, rounds):
        placement = placement.swapped(a, b)
    return placement
