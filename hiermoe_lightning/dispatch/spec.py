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

Phases are :class:`Phase` values: ``str`` subclasses (``Phase("inter", 1) == "inter1"``) with a parsed ``kind`` and
``level``, so no caller re-parses a phase name. Per-link-level byte counts are keyed ``"level{L}"``
(:func:`level_key`, :func:`parse_level_key`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..topology import Topology

__all__ = ["Phase", "DispatchSpec", "parse_dispatch", "dispatch_names", "phase_groups", "phase_next_rank",
           "phase_peer_index", "all_phases", "level_key", "parse_level_key"]

_HD_RE = re.compile(r"^hd([1-9]\d*)$")
_PHASE_RE = re.compile(r"^(inter|intra)([1-9]\d*)$")
_LEVEL_KEY_RE = re.compile(r"^level([1-9]\d*)$")
_PHASE_KINDS = ("a2a", "inter", "intra")
_PHASE_FORMS = "'a2a', 'inter<i>', 'intra<i>' (i >= 1)"


class Phase(str):
    """One phase of a dispatch: a ``str`` (``"a2a"``, ``"inter<i>"``, ``"intra<i>"``) with its ``kind`` and ``level``.

    ``Phase("inter", 1) == "inter1"`` and hashes as ``"inter1"``, so phases stay valid dict keys and compare equal to
    their names; :meth:`parse` turns a name back into a ``Phase``. Immutable (no instance attributes).
    """

    __slots__ = ()

    def __new__(cls, kind: str, level: int = 0) -> "Phase":
        if kind not in _PHASE_KINDS:
            raise ValueError(f"phase kind must be one of {', '.join(map(repr, _PHASE_KINDS))}, got {kind!r} "
                             f"(use Phase.parse for a phase name such as 'inter1')")
        if isinstance(level, bool) or not isinstance(level, int):
            raise TypeError(f"phase level must be an int, got {level!r}")
        if kind == "a2a" and level != 0:
            raise ValueError(f"phase 'a2a' has level 0, got {level}")
        if kind != "a2a" and level < 1:
            raise ValueError(f"phase {kind!r} needs a level >= 1, got {level}")
        return super().__new__(cls, "a2a" if kind == "a2a" else f"{kind}{level}")

    def __getnewargs__(self) -> tuple[str, int]:  # pickle / copy rebuild through __new__(kind, level)
        return (self.kind, self.level)

    @classmethod
    def parse(cls, phase: "str | Phase") -> "Phase":
        """``"intra1"`` -> ``Phase("intra", 1)``; a ``Phase`` is returned as is; other names raise ``ValueError``."""
        if isinstance(phase, Phase):
            return phase
        if isinstance(phase, str):
            if phase == "a2a":
                return cls("a2a")
            m = _PHASE_RE.match(phase)
            if m:
                return cls(m.group(1), int(m.group(2)))
        raise ValueError(f"unknown phase {phase!r}; allowed: {_PHASE_FORMS}")

    @property
    def kind(self) -> str:
        """``"a2a"``, ``"inter"`` or ``"intra"``."""
        return "a2a" if self == "a2a" else self[:5]

    @property
    def level(self) -> int:
        """``i`` for ``inter{i}`` / ``intra{i}``, 0 for ``a2a``."""
        return 0 if self == "a2a" else int(self[5:])

    def expert_group_level(self, num_levels: int) -> int:
        """The level of the expert's group that decides a pair's next rank here: ``i`` for ``inter{i}``, else ``D``."""
        return self.level if self.kind == "inter" else num_levels

    @property
    def sort_key(self) -> tuple[int, int]:
        """Canonical order: ``a2a``, then ``inter1, inter2, ..``, then ``intra1, intra2, ..``."""
        return (_PHASE_KINDS.index(self.kind), self.level)


def all_phases(num_levels: int) -> tuple[Phase, ...]:
    """Every phase of a ``num_levels``-level topology in :attr:`Phase.sort_key` order: a2a, inter1.., intra1.."""
    return (Phase("a2a"),) + tuple(Phase(k, i) for k in ("inter", "intra") for i in range(1, num_levels))


def level_key(level: int) -> str:
    """The key of link level ``level`` in a ``bytes_by_level`` dict: ``1`` -> ``"level1"``."""
    if isinstance(level, bool) or not isinstance(level, int) or level < 1:
        raise ValueError(f"link level must be an int >= 1, got {level!r}")
    return f"level{level}"


def parse_level_key(key: str) -> int:
    """Inverse of :func:`level_key`: ``"level2"`` -> ``2``; anything else raises ``ValueError``."""
    m = _LEVEL_KEY_RE.match(key) if isinstance(key, str) else None
    if m is None:
        raise ValueError(f"unknown link-level key {key!r}; allowed: 'level<L>' (L >= 1)")
    return int(m.group(1))


@dataclass(frozen=True)
class DispatchSpec:
    """A concrete dispatch: its ``name``, ordered ``phases`` and whether rows are deduplicated."""

    name: str
    phases: tuple[Phase, ...]
    dedup: bool

    def __post_init__(self) -> None:
        object.__setattr__(self, "phases", tuple(Phase.parse(p) for p in self.phases))

    @property
    def depth(self) -> int:
        return len(self.phases)

    def expert_group_level(self, index: int, num_levels: int) -> int:
        """The deepest expert-group level phases ``0 .. index`` read: a pair's hop there depends on that group only."""
        return max(p.expert_group_level(num_levels) for p in self.phases[: index + 1])


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
        return DispatchSpec("flat", (Phase("a2a"),), False)
    if value == "2dh":
        if num_levels == 1:
            return DispatchSpec("2dh", (Phase("a2a"),), False)
        return DispatchSpec("2dh", _hd_phases(num_levels), False)
    m = _HD_RE.match(value)
    if m and 1 <= int(m.group(1)) <= num_levels:
        d = int(m.group(1))
        return DispatchSpec(value, (Phase("a2a"),) if d == 1 else _hd_phases(d), True)
    if value == "auto":
        raise ValueError("dispatch 'auto' must be resolved to a concrete hd<d> by the cost model before it is parsed")
    raise ValueError(f"dispatch {value!r} is not valid for a {num_levels}-level topology; allowed: {_allowed(num_levels)}")


def validate_dispatch(value: str, num_levels: int) -> str:
    """Check a dispatch value, ``auto`` included; return it."""
    if value == "auto":
        return value
    parse_dispatch(value, num_levels)
    return value


def _hd_phases(d: int) -> tuple[Phase, ...]:
    return tuple(Phase("inter", i) for i in range(1, d)) + (Phase("intra", d - 1),)


def phase_groups(topology: Topology, phase: str | Phase) -> list[list[int]]:
    """The partition of ranks into the process groups of ``phase`` (each list ordered by peer index)."""
    phase = Phase.parse(phase)
    kind, level = phase.kind, phase.level
    if kind == "a2a":
        return topology.prefix_partition(0)
    if kind == "inter":
        return topology.sibling_partition(level)
    return topology.prefix_partition(level)


def phase_next_rank(
    topology: Topology, phase: str | Phase, current_rank: torch.Tensor, expert_rank: torch.Tensor
) -> torch.Tensor:
    """Vectorised: the rank each pair moves to in ``phase`` (any shape; int64)."""
    phase = Phase.parse(phase)
    kind, level = phase.kind, phase.level
    if kind != "inter":
        return expert_rank
    stride, size = topology.strides[level - 1], topology.sizes[level - 1]
    cur_c = (current_rank // stride) % size
    exp_c = (expert_rank // stride) % size
    return current_rank + (exp_c - cur_c) * stride


def phase_peer_index(topology: Topology, phase: str | Phase, rank: torch.Tensor) -> torch.Tensor:
    """Vectorised: the position of ``rank`` inside its group of ``phase`` (the index used for all-to-all splits)."""
    phase = Phase.parse(phase)
    kind, level = phase.kind, phase.level
    if kind == "a2a":
        return rank
    if kind == "inter":
        return (rank // topology.strides[level - 1]) % topology.sizes[level - 1]
    return rank % (topology.world_size // topology.num_groups(level))
