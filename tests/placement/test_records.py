"""Typed plan records: frozen, read-only Mapping access in the JSON form; the JSON the string-keyed dicts they
replace wrote still loads, and is written back with the same values plus the fields added since (when a plan was
applied, its migration and planning cost, the swaps the pay-off gate refused), which default to "applied at once,
free, nothing refused"."""

from __future__ import annotations

import dataclasses
import json
import pickle

import pytest
import torch

from hiermoe_lightning.placement.placement import Placement
from hiermoe_lightning.placement.planner import SwapPlan
from hiermoe_lightning.placement.records import LayerPlan, PlanRecord

# an entry as HierMoECallback wrote it before the records were typed (dict literal order = the JSON key order)
OLD_ENTRY = {"step": 4, "layer": 1, "name": "blocks.1.moe", "swaps": [[0, 5], [2, 7]],
             "predicted_ms_before": 0.7360083199999999, "predicted_ms_after": 0.734768,
             "chosen_before": "hd1", "chosen_after": "hd2", "placement_after": [2, 0, 3, 1, 2, 0, 3, 1]}
ADDED = {"applied_step": 4, "migration_ms": 0.0, "planning_seconds": 0.0, "refused_swaps": 0}  # OLD_ENTRY's defaults
NEW_ENTRY = {**OLD_ENTRY, **ADDED}


def _plan() -> SwapPlan:
    before = Placement.contiguous(8, 4)
    after = before.swapped(0, 5).swapped(2, 7)
    return SwapPlan([(0, 5), (2, 7)], before, after, 0.7360083199999999, 0.734768, "hd1", "hd2", 4, 0.01)


def test_plan_record_json_form_equals_the_old_dicts():
    record = PlanRecord.from_dict(OLD_ENTRY)
    assert record.swaps == ((0, 5), (2, 7)) and record.placement_after == (2, 0, 3, 1, 2, 0, 3, 1)
    assert json.dumps(record.to_dict()) == json.dumps(NEW_ENTRY)  # the old keys first, in their order
    assert json.dumps([PlanRecord.from_dict(e).to_dict() for e in json.loads(json.dumps([NEW_ENTRY] * 2))]) == \
        json.dumps([NEW_ENTRY] * 2)
    later = PlanRecord.from_dict({**OLD_ENTRY, "applied_step": 6, "migration_ms": 1.5, "planning_seconds": 0.25,
                                  "refused_swaps": 3})
    assert (later.applied_step, later.migration_ms, later.planning_seconds, later.refused_swaps) == (6, 1.5, 0.25, 3)


def test_plan_record_reads_like_the_old_dict_and_is_frozen():
    record = PlanRecord.from_dict(OLD_ENTRY)
    assert record["swaps"] == [[0, 5], [2, 7]] and record["step"] == 4 and record.get("name") == "blocks.1.moe"
    assert list(record.keys()) == list(NEW_ENTRY) and dict(record) == NEW_ENTRY and len(record) == 13
    assert "swaps" in record and "seconds" not in record and record.get("seconds") is None
    with pytest.raises(KeyError):
        record["seconds"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.step = 5
    assert hash(record) == hash(PlanRecord.from_dict(OLD_ENTRY)) and record == PlanRecord.from_dict(OLD_ENTRY)
    assert pickle.loads(pickle.dumps(record)) == record


def test_layer_plan_from_a_swap_plan_and_its_record():
    plan = _plan()
    shared = LayerPlan.of(plan, torch.tensor([1.0, 2.0, 3.0, 4.5], dtype=torch.float64))
    assert shared["swaps"] == [[0, 5], [2, 7]] and shared["load"] == [1.0, 2.0, 3.0, 4.5]
    assert shared["expert_to_rank"] == plan.placement_after.expert_to_rank.tolist()
    assert shared.placement(4) == plan.placement_after  # slots too
    assert pickle.loads(pickle.dumps(shared)) == shared
    assert shared.migration_ms == 0.0 and shared.realised_ms_before is None
    record = shared.record(4, 1, "blocks.1.moe")
    assert record.to_dict() == NEW_ENTRY
    priced = LayerPlan.of(plan, torch.zeros(4), migration_ms=2.5, realised=(1.0, 0.75))
    assert (priced.migration_ms, priced.realised_ms_before, priced.realised_ms_after) == (2.5, 1.0, 0.75)
    late = priced.record(4, 1, "blocks.1.moe", applied_step=6, planning_seconds=0.5, refused_swaps=1)
    assert (late.applied_step, late.migration_ms, late.planning_seconds, late.refused_swaps) == (6, 2.5, 0.5, 1)
    refused = priced.kept_nothing(plan.placement_before)
    assert refused.swaps == () and refused.placement(4) == plan.placement_before
    assert refused.predicted_ms_after == refused.predicted_ms_before and refused.migration_ms == 0.0
