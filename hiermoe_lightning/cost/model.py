"""Predicted all-to-all time of every dispatch and the choice of ``d*`` (pure; see ``docs/cost-model.md``).

For each phase, ``ms = alpha + beta * n`` with that phase's (alpha, beta) from :class:`LinkCosts`, keyed by the phase
name itself (``a2a``, ``inter<i>``, ``intra<i>``). By default ``n`` is the real unequal all_to_all_v load:
:func:`~hiermoe_lightning.cost.traffic.max_rank_bytes` (busiest rank, max of sent and received, diagonal excluded).
With ``padded=True`` it is the HierMoE paper's padded all-to-all: ``n = peers * max_pair_rows * row_bytes`` where
``peers`` is the size of the phase's process group (a padded all_to_all holds one equal chunk per group member) and
``max_pair_rows`` the most rows any rank sends to any other rank in that phase.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from math import comb
from typing import Sequence

import torch

from ..dispatch.spec import dispatch_names, parse_dispatch, phase_groups
from ..placement.placement import Placement
from ..topology import Topology
from .link_costs import LinkCosts
from .traffic import (
    PhaseTraffic,
    bytes_by_level,
    dispatch_rows,
    max_pair_rows,
    max_rank_bytes,
)

__all__ = [
    "PhasePrediction",
    "DispatchPrediction",
    "Prediction",
    "predict",
    "phase_predictions",
    "choose_hd",
    "duplication_rate",
    "expected_duplication_rate",
]


@dataclass(frozen=True)
class PhasePrediction:
    """One phase: real ``max_rank_bytes``, the ``n`` used for the cost (``cost_bytes``) and its ``ms``."""

    name: str
    max_rank_bytes: int
    ms: float
    cost_bytes: int

    def to_json_dict(self, padded: bool = False) -> dict:
        out = {"name": self.name, "max_rank_bytes": self.max_rank_bytes, "ms": self.ms}
        if padded:
            out["padded_bytes"] = self.cost_bytes
        return out


@dataclass(frozen=True)
class DispatchPrediction:
    """A dispatch's phases, predicted time and dispatch+combine bytes per link level (``level1 .. levelD``)."""

    name: str
    phases: tuple[PhasePrediction, ...]
    bytes_by_level: dict[str, int] = field(default_factory=dict)

    @property
    def predicted_ms(self) -> float:
        return sum(p.ms for p in self.phases)

    def to_json_dict(self, padded: bool = False) -> dict:
        return {"predicted_ms": self.predicted_ms, "phases": [p.to_json_dict(padded) for p in self.phases]}


@dataclass(frozen=True)
class Prediction:
    """``dispatch``: name -> :class:`DispatchPrediction` (in ``dispatch_names`` order); ``chosen``: fastest ``hd<d>``."""

    dispatch: dict[str, DispatchPrediction]
    chosen: str
    chosen_ms: float
    padded: bool = False

    def to_json_dict(self) -> dict:
        """The contract's ``dispatch`` object: ``{name: {"predicted_ms": .., "phases": [{name, max_rank_bytes, ms}]}}``.

        With ``padded`` each phase also has ``padded_bytes`` (the ``n`` its ``ms`` used).
        """
        return {name: d.to_json_dict(self.padded) for name, d in self.dispatch.items()}


def phase_predictions(
    topology: Topology,
    phases: Sequence[PhaseTraffic],
    row_bytes: int,
    link_costs: LinkCosts,
    padded: bool = False,
) -> tuple[PhasePrediction, ...]:
    """Cost each phase of one dispatch (rows ``[G, G]`` per phase) with ``link_costs[phase.name]``.

    A phase whose groups each hold a single rank moves nothing and the dispatcher skips it, so it costs 0 ms.
    """
    out = []
    for p in phases:
        cost = link_costs[p.name]  # ValueError naming the phase when missing
        real = max_rank_bytes(p.rows, row_bytes)
        if len(phase_groups(topology, p.name)[0]) == 1:
            out.append(PhasePrediction(p.name, real, 0.0, 0))
            continue
        if padded:
            peers = len(phase_groups(topology, p.name)[0])
            n = peers * max_pair_rows(p.rows) * int(row_bytes)
        else:
            n = real
        out.append(PhasePrediction(p.name, real, cost.ms(n), n))
    return tuple(out)


def choose_hd(times_ms: dict[str, float], num_levels: int) -> str:
    """The fastest ``hd<d>`` (d = 1..D) in ``times_ms``; ties go to the smaller ``d``."""
    best, best_ms = None, float("inf")
    for d in range(1, num_levels + 1):
        name = f"hd{d}"
        if name in times_ms and times_ms[name] < best_ms:
            best, best_ms = name, times_ms[name]
    if best is None:
        raise ValueError(f"no hd<d> dispatch (d = 1..{num_levels}) to choose from")
    return best


def predict(
    topology: Topology,
    placement: Placement,
    expert_ids: torch.Tensor,
    hidden_size: int,
    bytes_per_elem: int,
    link_costs: "LinkCosts | str",
    dispatches: Sequence[str] | None = None,
    padded: bool = False,
) -> Prediction:
    """Predict every dispatch's all-to-all time for a routing ``expert_ids`` (int ``[G, T, K]``, ``-1`` = dropped).

    ``dispatches`` defaults to ``dispatch_names(D)`` (flat, 2dh, hd1..hdD); ``auto`` may be listed and repeats the
    chosen ``hd<d>``. ``chosen`` is always taken over all of hd1..hdD, so the link costs must cover their phases (a
    missing one raises ``ValueError`` naming it). Counting is ``O(G * T * (K + G))``, once for all dispatches.
    """
    topology = Topology.parse(topology)
    link_costs = LinkCosts.resolve(link_costs)
    for value, what in ((hidden_size, "hidden_size"), (bytes_per_elem, "bytes_per_elem")):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{what} must be an int, got {value!r}")
        if value <= 0:
            raise ValueError(f"{what} must be >= 1, got {value}")
    D = topology.num_levels
    names = list(dispatch_names(D)) if dispatches is None else list(dispatches)
    hd_names = [f"hd{d}" for d in range(1, D + 1)]
    specs = {n: parse_dispatch(n, D) for n in dict.fromkeys(names + hd_names) if n != "auto"}
    for spec in specs.values():  # fail on a missing phase before counting anything
        link_costs.require(spec.phases)
    row_bytes = hidden_size * bytes_per_elem
    rows = dispatch_rows(topology, placement, expert_ids, list(specs.values()))  # validates expert_ids
    preds = {
        n: DispatchPrediction(
            n, phase_predictions(topology, rows[n], row_bytes, link_costs, padded), bytes_by_level(topology, rows[n], row_bytes)
        )
        for n in specs
    }
    chosen = choose_hd({n: preds[n].predicted_ms for n in hd_names}, D)
    preds["auto"] = DispatchPrediction("auto", preds[chosen].phases, preds[chosen].bytes_by_level)
    return Prediction({n: preds[n] for n in names}, chosen, preds[chosen].predicted_ms, padded)


def duplication_rate(expert_ids: torch.Tensor, num_experts: int, num_groups: int) -> float:
    """Share of flat-dispatch rows that are duplicates when experts form ``num_groups`` contiguous groups.

    ``expert_ids``: int ``[..., K]`` (one row per token; ``-1`` = dropped). Definition (the one that reproduces the
    HierMoE paper's "measured duplication rate" table for uniform routing, E = 128, to within 1.6 percentage points;
    the largest gap is R = 8, K = 6: 25.5% vs 27%)::

        1 - #distinct (token, group) pairs / #(token, expert) pairs

    i.e. the share of the flat dispatch's rows that a per-group deduplicated dispatch would not send. Group of
    expert ``e`` = ``e // (num_experts / num_groups)``.
    """
    if num_groups <= 0 or num_experts % num_groups != 0:
        raise ValueError(f"num_groups ({num_groups}) must divide num_experts ({num_experts})")
    ids = expert_ids.reshape(-1, expert_ids.shape[-1]).to(torch.long)
    valid = ids >= 0
    pairs = int(valid.sum())
    if pairs == 0:
        return 0.0
    group = torch.where(valid, ids // (num_experts // num_groups), torch.full_like(ids, num_groups)).sort(dim=1).values
    first = torch.ones_like(group, dtype=torch.bool)
    first[:, 1:] = group[:, 1:] != group[:, :-1]
    distinct = int((first & (group != num_groups)).sum())
    return 1.0 - distinct / pairs


def expected_duplication_rate(num_experts: int, num_groups: int, top_k: int) -> float:
    """:func:`duplication_rate` in expectation under uniform routing: ``1 - R * (1 - C(E-m, K) / C(E, K)) / K``.

    A token hits a group of ``m = E / R`` experts with probability ``1 - C(E-m, K) / C(E, K)``, so it reaches
    ``R`` times that many distinct groups on average, out of ``K`` rows.
    """
    if num_groups <= 0 or num_experts % num_groups != 0:
        raise ValueError(f"num_groups ({num_groups}) must divide num_experts ({num_experts})")
    m = num_experts // num_groups
    hit = 1.0 - comb(num_experts - m, top_k) / comb(num_experts, top_k)
    return 1.0 - num_groups * hit / top_k
