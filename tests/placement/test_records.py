"""Typed plan records: frozen, read-only Mapping access in the JSON form, and the JSON the string-keyed dicts they
replace wrote (checkpoints and the placement history file stay byte for byte the same)."""

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


def _plan() -> SwapPlan:
    before = Placement.contiguous(8, 4)
    after = before.swapped(0, 5).swapped(2, 7)
    return SwapPlan([(0, 5), (2, 7)], before, after, 0.7360083199999999, 0.734768, "hd1", "hd2", 4, 0.01)


def test_plan_record_json_form_equals_the_old_dicts():
    record = PlanRecord.from_dict(OLD_ENTRY)
    assert record.swaps == ((0, 5), (2, 7)) and record.placement_after == (2, 0, 3, 1, 2, 0, 3, 1)
    assert json.dumps(record.to_dict()) == json.dumps(OLD_ENTRY)
    assert json.dumps([PlanRecord.from_dict(e).to_dict() for e in json.loads(json.dumps([OLD_ENTRY] * 2))]) == \
        json.dumps([OLD_ENTRY] * 2)


def test_plan_record_reads_like_the_old_dict_and_is_frozen():
    record = PlanRecord.from_dict(OLD_ENTRY)
    assert record["swaps"] == [[0, 5], [2, 7]] and record["step"] == 4 and record.get("name") == "blocks.1.moe"
    assert list(record.keys()) == list(OLD_ENTRY) and dict(record) == OLD_ENTRY and len(record) == 9
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
    record = shared.record(4, 1, "blocks.1.moe")
    assert record.to_dict() == OLD_ENTRY
