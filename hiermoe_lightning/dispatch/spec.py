"""What each ``dispatch`` value means: its phases and whether rows are deduplicated.

This module is pure (no collectives) and is shared by the dispatchers and the cost model, so both agree on
where every row goes.

A dispatch is a sequence of phases. In each phase a rank holds rows (token copies) and, for each row, the
(token, expert) pairs it still serves. Every pair has a *next rank* in the phase; a row travels to each distinct
next rank of its pairs once (``dedup=True``) or once per pair (``dedup=False``):

=========  ====================================  ======
value      phases                                dedup
=========  ====================================  ======
flat       a2a                                   no
hd1        a2a                                   yes
hd<d>      inter1 .. inter{d-1}, intra{d-1}      yes
2dh        inter1 .. inter{D-1}, intra{D-1}      no
=========  ====================================  ======

Phase ``a2a`` and ``intra{i}``: the next rank is the expert's rank (``intra{i}`` runs inside the level-``i`` group,
which after the inter phases already owns the expert). Phase ``inter{i}``: the next rank keeps every coordinate of
the current rank except ``c_i``, which becomes the expert rank's ``c_i``. On a one-level topology ``2dh`` is ``flat``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..topology import Topology

__all__ = ["DispatchSpec", "parse_dispatch", "dispatch_names", "phase_groups", "phase_next_rank", "phase_peer_index"]

_HD_RE = re.compile(r"^hd([1-9]\d*)$")


@dataclass(frozen=True)
class DispatchSpec:
    """A concrete dispatch: its ``name``, ordered ``phases`` and whether rows are deduplicated."""

    name: str
    phases: tuple[str, ...]
    dedup: bool

    @property
    def depth(self) -> int:
        return len(self.phases)


def dispatch_names(num_levels: int) -> list[str]:
    """Every concrete dispatch value valid on a ``num_levels``-level topology (``auto`` excluded)."""
    return ["flat", "2dh"] + [f"hd{d}" for d in range(1, num_levels + 1)]


def _allowed(num_levels: int) -> str:
    hd = "hd1" if num_levels == 1 else f"hd1..hd{num_levels}"
    return f"'flat', '2dh', {hd}, 'auto'"


def parse_dispatch(value: str, num_levels: int) -> DispatchSpec:
    """``"hd2"`` on a 2-level topology -> ``DispatchSpec("hd2", ("inter1", "intra1"), True)``.

    ``auto`` is not concrete: callers resolve it to an ``hd<d>`` first.
    """
    if not isinstance(value, str):
        raise TypeError(f"dispatch must be a string ({_allowed(num_levels)}), got {value!r}")
    if value == "flat":
        return DispatchSpec("flat", ("a2a",), False)
    if value == "2dh":
        if num_levels == 1:
            return DispatchSpec("2dh", ("a2a",), False)
        return DispatchSpec("2dh", _hd_phases(num_levels), False)
    m = _HD_RE.match(value)
    if m and 1 <= int(m.group(1)) <= num_levels:
        d = int(m.group(1))
        return DispatchSpec(value, ("a2a",) if d == 1 else _hd_phases(d), True)
    if value == "auto":
        raise ValueError("dispatch 'auto' must be resolved to a concrete hd<d> by the cost model before it is parsed")
    raise ValueError(f"dispatch {value!r} is not valid for a {num_levels}-level topology; allowed: {_allowed(num_levels)}")


def validate_dispatch(value: str, num_levels: int) -> str:
    """Check a dispatch value, ``auto`` included; return it."""
    if value == "auto":
        return value
    parse_dispatch(value, num_levels)
    return value


def _hd_phases(d: int) -> tuple[str, ...]:
    return tuple(f"inter{i}" for i in range(1, d)) + (f"intra{d - 1}",)


def _phase_kind(phase: str) -> tuple[str, int]:
    if phase == "a2a":
        return "a2a", 0
    if phase.startswith("inter"):
        return "inter", int(phase[5:])
    if phase.startswith("intra"):
        return "intra", int(phase[5:])
    raise ValueError(f"unknown phase {phase!r}")


def phase_groups(topology: Topology, phase: str) -> list[list[int]]:
    """The partition of ranks into the process groups of ``phase`` (each list ordered by peer index)."""
    kind, level = _phase_kind(phase)
    if kind == "a2a":
        return topology.prefix_partition(0)
    if kind == "inter":
        return topology.sibling_partition(level)
    return topology.prefix_partition(level)


def phase_next_rank(topology: Topology, phase: str, current_rank: torch.Tensor, expert_rank: torch.Tensor) -> torch.Tensor:
    """Vectorised: the rank each pair moves to in ``phase`` (any shape; int64)."""
    kind, level = _phase_kind(phase)
    if kind != "inter":
        return expert_rank
    stride, size = topology.strides[level - 1], topology.sizes[level - 1]
    cur_c = (current_rank // stride) % size
    exp_c = (expert_rank // stride) % size
    return current_rank + (exp_c - cur_c) * stride


def phase_peer_index(topology: Topology, phase: str, rank: torch.Tensor) -> torch.Tensor:
    """Vectorised: the position of ``rank`` inside its group of ``phase`` (the index used for all-to-all splits)."""
    kind, level = _phase_kind(phase)
    if kind == "a2a":
        return rank
    if kind == "inter":
        return (rank // topology.strides[level - 1]) % topology.sizes[level - 1]
    return rank % (topology.world_size // topology.num_groups(level))
