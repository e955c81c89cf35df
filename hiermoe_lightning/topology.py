"""The hierarchical layout of expert-parallel ranks.

A topology of ``D`` levels has sizes ``n_1 x n_2 x ... x n_D``, outermost first: ``Topology([2, 2])`` is
2 nodes of 2 ranks. Rank ``r`` has coordinates ``(c_1, ..., c_D)`` in mixed radix (``c_D`` varies fastest),
so the ranks that share the first ``i`` coordinates form a contiguous block.

Two kinds of rank groups drive the hierarchical all-to-all (see ``docs/design.md``):

* ``siblings(rank, level)``: the ``n_level`` ranks that share every coordinate except ``c_level``
  (the peers of phase ``inter{level}``), ordered by ``c_level``.
* ``prefix_group(rank, level)``: the ``G / U[level]`` ranks that share ``c_1 .. c_level``
  (the peers of phase ``intra{level}``), ordered by rank. ``level = 0`` is the whole world.
"""

from __future__ import annotations

import math
import re
from functools import cached_property
from typing import Sequence

import torch

from .validation import check_int

__all__ = ["Topology"]

_TOPOLOGY_RE = re.compile(r"^\s*\d+(\s*x\s*\d+)*\s*$", re.IGNORECASE)


class Topology:
    """Sizes of the levels of the expert-parallel world, outermost first."""

    def __init__(self, sizes: Sequence[int]):
        if isinstance(sizes, (str, bytes)) or not isinstance(sizes, Sequence):
            raise TypeError(
                f"topology sizes must be a sequence of ints such as [2, 2], got {type(sizes).__name__}; "
                "use Topology.parse('2x2') for strings"
            )
        sizes = list(sizes)
        if not sizes:
            raise ValueError("topology sizes must name at least one level, e.g. [4] or [2, 2]")
        for s in sizes:
            if isinstance(s, bool) or not isinstance(s, int):
                raise TypeError(f"topology sizes must be ints, got {s!r} in {sizes!r}")
            if s <= 0:
                raise ValueError(f"topology sizes must be positive, got {s} in {sizes!r}")
        self.sizes: tuple[int, ...] = tuple(sizes)

    @classmethod
    def parse(cls, text: "str | Topology | Sequence[int] | int") -> "Topology":
        """``"4x2x2x2"`` -> ``Topology([4, 2, 2, 2])``; a Topology, a list of ints or an int pass through."""
        if isinstance(text, Topology):
            return text
        if isinstance(text, int) and not isinstance(text, bool):
            return cls([text])
        if isinstance(text, (list, tuple)):
            return cls(text)
        if not isinstance(text, str):
            raise TypeError(f"topology must be a string like '2x2', a list of ints or a Topology, got {text!r}")
        if not _TOPOLOGY_RE.match(text):
            raise ValueError(
                f"topology {text!r} is not valid: expected positive sizes joined by 'x', outermost first, "
                "e.g. '4', '2x2' or '4x2x2x2'"
            )
        return cls([int(part) for part in text.lower().split("x")])

    # ------------------------------------------------------------------ basic facts
    def __str__(self) -> str:
        return "x".join(str(s) for s in self.sizes)

    def __repr__(self) -> str:
        return f"Topology({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Topology) and other.sizes == self.sizes

    def __hash__(self) -> int:
        return hash(self.sizes)

    @property
    def world_size(self) -> int:
        return math.prod(self.sizes)

    @property
    def num_levels(self) -> int:
        return len(self.sizes)

    def num_groups(self, level: int) -> int:
        """``U[level]``: how many level-``level`` groups there are (``U[0] = 1``, ``U[1]`` = nodes)."""
        self._check_level(level, 0)
        return math.prod(self.sizes[:level])

    # the fast test first: the message (which formats the topology) is built only for a bad argument
    def _check_level(self, level: int, low: int = 1) -> None:
        if type(level) is not int or not low <= level <= self.num_levels:
            check_int(level, f"level (topology {self})", low, self.num_levels)

    def _check_rank(self, rank: int) -> None:
        if type(rank) is not int or not 0 <= rank < self.world_size:
            check_int(rank, f"rank (topology {self})", 0, self.world_size - 1)

    # ------------------------------------------------------------------ coordinates
    @cached_property
    def strides(self) -> tuple[int, ...]:
        """Rank stride of each level: ``rank = sum(c_i * strides[i])``."""
        out, acc = [], 1
        for s in reversed(self.sizes):
            out.append(acc)
            acc *= s
        return tuple(reversed(out))

    def coords(self, rank: int) -> tuple[int, ...]:
        """Coordinates ``(c_1, ..., c_D)`` of ``rank``, outermost first."""
        self._check_rank(rank)
        return tuple((rank // st) % n for st, n in zip(self.strides, self.sizes))

    def rank_of(self, coords: Sequence[int]) -> int:
        if len(coords) != self.num_levels or any(not 0 <= c < n for c, n in zip(coords, self.sizes)):
            raise ValueError(f"coords {tuple(coords)} do not fit topology {self}")
        return sum(c * st for c, st in zip(coords, self.strides))

    @cached_property
    def coord_table(self) -> torch.Tensor:
        """``[G, D]`` int64: the coordinates of every rank."""
        ranks = torch.arange(self.world_size)
        return torch.stack([(ranks // st) % n for st, n in zip(self.strides, self.sizes)], dim=1)

    @cached_property
    def link_level_table(self) -> torch.Tensor:
        """``[G, G]`` int64: the first level (1-based) at which two ranks' coordinates differ; 0 on the diagonal."""
        c = self.coord_table
        differs = c[:, None, :] != c[None, :, :]  # [G, G, D]
        first = differs.int().argmax(dim=2) + 1
        return torch.where(differs.any(dim=2), first, torch.zeros_like(first))

    def link_level(self, a: int, b: int) -> int:
        """Level (1..D) of the link between ranks ``a`` and ``b``; 0 when ``a == b``."""
        self._check_rank(a)
        self._check_rank(b)
        return int(self.link_level_table[a, b])

    # ------------------------------------------------------------------ groups
    def siblings(self, rank: int, level: int) -> list[int]:
        """Ranks that share every coordinate of ``rank`` except ``c_level``, ordered by ``c_level``."""
        self._check_level(level)
        c = list(self.coords(rank))
        out = []
        for v in range(self.sizes[level - 1]):
            c[level - 1] = v
            out.append(self.rank_of(c))
        return out

    def prefix_group(self, rank: int, level: int) -> list[int]:
        """Ranks that share ``c_1 .. c_level`` with ``rank`` (a contiguous block); level 0 = every rank."""
        self._check_level(level, 0)
        self._check_rank(rank)
        size = self.world_size // self.num_groups(level)
        start = (rank // size) * size
        return list(range(start, start + size))

    def sibling_partition(self, level: int) -> list[list[int]]:
        """All sibling sets of ``level``: a partition of the ranks (the groups of phase ``inter{level}``)."""
        self._check_level(level)
        seen, out = set(), []
        for r in range(self.world_size):
            if r not in seen:
                group = self.siblings(r, level)
                seen.update(group)
                out.append(group)
        return out

    def prefix_partition(self, level: int) -> list[list[int]]:
        """All level-``level`` groups: a partition of the ranks (the groups of phase ``intra{level}``)."""
        self._check_level(level, 0)
        size = self.world_size // self.num_groups(level)
        return [list(range(s, s + size)) for s in range(0, self.world_size, size)]

    def group_index(self, level: int) -> torch.Tensor:
        """``[G]`` int64: index of each rank's level-``level`` group (0 .. U[level]-1)."""
        self._check_level(level, 0)
        size = self.world_size // self.num_groups(level)
        return torch.arange(self.world_size) // size
