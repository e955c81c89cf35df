"""Typed records of the swap plans ``HierMoECallback`` makes: what it shares between ranks and what it keeps.

* :class:`LayerPlan`: one layer's plan as plain values (small and picklable): what the layer's owner rank sends to
  the others with ``all_gather_object``.
* :class:`PlanRecord`: one entry of ``HierMoECallback.history`` (one per plan and layer); ``bench e2e`` reads them
  too. Written to the callback's checkpoint state and to ``hiermoe_placement_history.json`` as :meth:`to_dict`.

Both are frozen dataclasses with tuples where the JSON has lists. They are also read-only mappings: ``record["swaps"]``,
``record.keys()``, ``dict(record)`` read the JSON form (:meth:`to_dict`, lists instead of tuples), so code written
for the string-keyed dicts these records replace keeps working; new code should read the attributes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any, Iterator

import torch

from .placement import Placement
from .planner import SwapPlan

__all__ = ["LayerPlan", "PlanRecord"]


def _json_form(value: Any) -> Any:
    """Tuples (nested too) as lists: the value as ``json.loads(json.dumps(value))`` gives it back."""
    if isinstance(value, tuple):
        return [_json_form(v) for v in value]
    return value


class _RecordMapping(Mapping):
    """Read-only ``Mapping`` access to a dataclass's fields, in their JSON form (see the module docstring)."""

    def to_dict(self) -> dict[str, Any]:
        """The fields in declaration order, tuples as lists: what ``json.dumps`` writes."""
        return {f.name: _json_form(getattr(self, f.name)) for f in fields(self)}

    def __getitem__(self, key: str) -> Any:
        if not isinstance(key, str) or key not in self._names():
            raise KeyError(key)
        return _json_form(getattr(self, key))

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())

    def _names(self) -> tuple[str, ...]:
        return tuple(f.name for f in fields(self))


@dataclass(frozen=True, eq=True)
class LayerPlan(_RecordMapping):
    """One layer's plan, as its owner rank shares it: the swaps, the predicted one-way all-to-all ms and chosen
    ``hd<d>`` before and after, the placement after (``expert_to_rank`` / ``expert_to_slot``, ``E`` each) and the
    ``G`` weighted (token, expert) pairs each rank's experts process under the placement the plan started from;
    the predicted ms its migration takes; and, when the layer's previous plan moved experts, the one-way ms of the
    placement before and after that plan on the routing seen since (``realised_ms_before`` / ``_after``, else None)."""

    swaps: tuple[tuple[int, int], ...]
    predicted_ms_before: float
    predicted_ms_after: float
    chosen_before: str
    chosen_after: str
    expert_to_rank: tuple[int, ...]
    expert_to_slot: tuple[int, ...]
    load: tuple[float, ...]
    migration_ms: float = 0.0
    realised_ms_before: float | None = None
    realised_ms_after: float | None = None

    @classmethod
    def of(cls, plan: SwapPlan, load: torch.Tensor, migration_ms: float = 0.0,
           realised: tuple[float, float] | None = None) -> "LayerPlan":
        """From a planner's :class:`SwapPlan`, the ``[G]`` load per rank, the plan's migration ms and the previous
        plan's realised ``(ms before, ms after)``."""
        after = plan.placement_after
        return cls(swaps=tuple((int(a), int(b)) for a, b in plan.swaps),
                   predicted_ms_before=float(plan.predicted_ms_before),
                   predicted_ms_after=float(plan.predicted_ms_after),
                   chosen_before=str(plan.chosen_before), chosen_after=str(plan.chosen_after),
                   expert_to_rank=tuple(after.expert_to_rank.tolist()),
                   expert_to_slot=tuple(after.expert_to_slot.tolist()), load=tuple(load.tolist()),
                   migration_ms=float(migration_ms),
                   realised_ms_before=None if realised is None else float(realised[0]),
                   realised_ms_after=None if realised is None else float(realised[1]))

    def kept_nothing(self, current: Placement) -> "LayerPlan":
        """This plan with its swaps dropped (the pay-off gate refused them): it stays on ``current``, the placement
        it started from."""
        return replace(self, swaps=(), predicted_ms_after=self.predicted_ms_before, chosen_after=self.chosen_before,
                       migration_ms=0.0, expert_to_rank=tuple(current.expert_to_rank.tolist()),
                       expert_to_slot=tuple(current.expert_to_slot.tolist()))

    def placement(self, world_size: int) -> Placement:
        """The placement after the plan."""
        return Placement(torch.tensor(self.expert_to_rank, dtype=torch.long),
                         torch.tensor(self.expert_to_slot, dtype=torch.long), world_size)

    def record(self, step: int, layer: int, name: str, *, applied_step: int | None = None,
               planning_seconds: float = 0.0, refused_swaps: int = 0) -> "PlanRecord":
        """The history entry of this plan, made at optimizer step ``step`` for layer ``layer`` (``name``) and applied
        after step ``applied_step`` (default ``step``)."""
        return PlanRecord(step=step, layer=layer, name=name, swaps=self.swaps,
                          predicted_ms_before=self.predicted_ms_before, predicted_ms_after=self.predicted_ms_after,
                          chosen_before=self.chosen_before, chosen_after=self.chosen_after,
                          placement_after=self.expert_to_rank,
                          applied_step=step if applied_step is None else int(applied_step),
                          migration_ms=self.migration_ms, planning_seconds=float(planning_seconds),
                          refused_swaps=int(refused_swaps))


@dataclass(frozen=True, eq=True)
class PlanRecord(_RecordMapping):
    """One plan of one layer in ``HierMoECallback.history``: the optimizer step, the layer's index and name, the
    swaps, the predicted one-way all-to-all ms and chosen ``hd<d>`` before and after, the rank of each expert
    after the plan, the optimizer step after which it was applied (later than ``step`` when planned in the
    background), its predicted migration ms, the seconds its planning cost (CPU time in the background, wall time
    when the step waited), and how many swaps the planner proposed that the pay-off gate refused.
    :meth:`to_dict` / :meth:`from_dict` are the JSON form (checkpoints, the placement history file); ``record["swaps"]``
    reads it too."""

    step: int
    layer: int
    name: str
    swaps: tuple[tuple[int, int], ...]
    predicted_ms_before: float
    predicted_ms_after: float
    chosen_before: str
    chosen_after: str
    placement_after: tuple[int, ...]
    applied_step: int = -1
    migration_ms: float = 0.0
    planning_seconds: float = 0.0
    refused_swaps: int = 0

    @classmethod
    def from_dict(cls, entry: Mapping[str, Any]) -> "PlanRecord":
        """From :meth:`to_dict`'s form (a checkpoint's history, also one written before records were typed)."""
        return cls(step=entry["step"], layer=entry["layer"], name=entry["name"],
                   swaps=tuple(tuple(s) for s in entry["swaps"]),
                   predicted_ms_before=entry["predicted_ms_before"], predicted_ms_after=entry["predicted_ms_after"],
                   chosen_before=entry["chosen_before"], chosen_after=entry["chosen_after"],
                   placement_after=tuple(entry["placement_after"]),
                   applied_step=int(entry.get("applied_step", entry["step"])),
                   migration_ms=float(entry.get("migration_ms", 0.0)),
                   planning_seconds=float(entry.get("planning_seconds", 0.0)),
                   refused_swaps=int(entry.get("refused_swaps", 0)))
