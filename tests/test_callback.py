"""HierMoECallback: swaps mid-training change nothing but where experts live; metrics reach the loggers; resume works."""

import csv
import glob
import json
import os

import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from hiermoe_lightning import HierMoECallback, LinkCosts
from tests.lightning_harness import fit

TOL = dict(atol=2e-5, rtol=2e-5)
# a slow level-1 link makes co-locating co-activated experts worth a swap even on this tiny model
COSTS = LinkCosts({"a2a": (0.1, 1e-4), "inter1": (0.1, 1e-4), "intra1": (0.01, 1e-7)})


def _callback():
    return HierMoECallback(plan_every_n_steps=2, max_swaps_per_plan=2, charge_migration=False,
                           compute_balance_tolerance=None, print_summary=False)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return fit(str(tmp_path_factory.mktemp("ref")), 1, max_epochs=2, tag="ref")[0]


def test_swaps_mid_training_keep_losses_equal_to_one_process(tmp_path, reference):
    logger = CSVLogger(str(tmp_path), name="csv")
    losses, parent = fit(str(tmp_path), 4, topology="2x2", dispatch="hd2", max_epochs=2, tag="swap",
                         extra_callbacks=[_callback()], link_costs=COSTS, logger=logger, check_replicas=True)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference), **TOL)
    history = json.load(open(glob.glob(str(tmp_path / "csv" / "*" / "hiermoe_placement_history.json"))[0]))
    assert history["swaps_total"] > 0, "the planner found nothing to swap: the test would prove nothing"
    assert os.path.exists(glob.glob(str(tmp_path / "csv" / "*"))[0] + "/hiermoe_expert_load.png")
    rows = list(csv.DictReader(open(glob.glob(str(tmp_path / "csv" / "*" / "metrics.csv"))[0])))
    columns = set(rows[0])
    for name in ("hiermoe/dispatch_bytes_level1", "hiermoe/dispatch_bytes_level2", "hiermoe/dedup_saving",
                 "hiermoe/load_imbalance", "hiermoe/swaps", "hiermoe/chosen_dims/layer0", "hiermoe/dedup_saving_level1"):
        assert name in columns, name
    assert json.load(open(tmp_path / "swap.replicas.json"))["dense_identical"]


@pytest.mark.parametrize("resume_world", [4, 2])
def test_resume_after_swaps_continues_exactly(tmp_path, reference, resume_world):
    ckpt = str(tmp_path / "after_swaps.ckpt")
    first, _ = fit(str(tmp_path), 4, topology="2x2", dispatch="hd2", max_epochs=1, save_path=ckpt, tag="first",
                   extra_callbacks=[_callback()], link_costs=COSTS)
    state = torch.load(ckpt, weights_only=True)
    placements = state["hiermoe"]["placements"]
    moved = any(not torch.equal(p["expert_to_rank"], torch.arange(8) // 2) for p in placements.values())
    assert moved, "no swap happened before the checkpoint"
    topo = "2x2" if resume_world == 4 else "2x1"
    second, _ = fit(str(tmp_path), resume_world, topology=topo, dispatch="hd2", max_epochs=2, ckpt_path=ckpt,
                    tag="second", extra_callbacks=[_callback()], link_costs=COSTS)
    torch.testing.assert_close(torch.tensor(first + second), torch.tensor(reference), **TOL)


@pytest.mark.parametrize("kwargs, match", [
    ({"plan_every_n_steps": 0}, "plan_every_n_steps"),
    ({"gamma": 0.5}, "gamma"),
    ({"window_decay": 1.5}, "window_decay"),
    ({"swap": "yes"}, "swap"),
])
def test_bad_arguments_name_the_parameter(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        HierMoECallback(**kwargs)
