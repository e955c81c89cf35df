"""HierMoECallback(planner=...): every built-in planner and a custom callable plan through the callback on several
ranks (one owner rank per layer, the plan shared), the function computed stays one process's, a custom planner gets
the documented request and its plan is applied, and a bad planner fails at construction, before any collective."""

from __future__ import annotations

import glob
import json
import os

import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.loggers import CSVLogger

from hiermoe_lightning import ExpertParallel, LinkCosts, MoELayer
from hiermoe_lightning.placement import Placement
from hiermoe_lightning.placement.migrate import expert_state_bytes
from hiermoe_lightning.placement.payoff import plan_migration_ms
from hiermoe_lightning.placement.planners import PLANNERS, swaps_between
from hiermoe_lightning.placement.records import LayerPlan
from hiermoe_lightning.placement.window import RoutingWindow
from hiermoe_lightning.testing import run_ranks
from tests.lightning_harness import MODEL, fit

# ------------------------------------------------------------------ the example of docs/design.md, verbatim
from hiermoe_lightning import HierMoECallback
from hiermoe_lightning.placement.planners import PlanRequest, SwapPlan, plan_from_placement, resolve_planner

swap_planner = resolve_planner("hiermoe")

def cautious(request: PlanRequest) -> SwapPlan:
    """HierMoE's swaps, but only when they save at least 5 % of the predicted all-to-all."""
    plan = swap_planner(request)
    if plan.predicted_ms_after > 0.95 * plan.predicted_ms_before:
        return plan_from_placement(request, request.placement)  # keep the placement
    return plan

callback = HierMoECallback(planner=cautious)
# ------------------------------------------------------------------ end of the example

TOL = dict(atol=2e-5, rtol=2e-5)
COSTS = LinkCosts({"a2a": (0.1, 1e-4), "inter1": (0.1, 1e-4), "intra1": (0.01, 1e-7)})
PLAN_KWARGS = dict(plan_every_n_steps=2, max_swaps_per_plan=2, charge_migration=False, compute_balance_tolerance=None)


def _window_ids(i: int, top_k: int) -> torch.Tensor:
    """``[4, 24, K]`` skewed routing with distinct experts per token (-1 = dropped), the same on every rank."""
    g = torch.Generator().manual_seed(i)
    ids = (torch.rand(4, 24, 8, generator=g) * torch.linspace(2.0, 0.5, 8)).topk(top_k, dim=-1).indices
    ids[torch.rand(4, 24, top_k, generator=g) < 0.1] = -1
    return ids


def _window(i: int, top_k: int) -> RoutingWindow:
    window = RoutingWindow(64, 0.9)
    window.ingest(_window_ids(i, top_k))
    return window


def _broken(request):
    return {"swaps": []}


def _plan_on_ranks(rank, world, planner):
    ep = ExpertParallel("2x2", dispatch="flat", link_costs=COSTS)
    layers = {f"l{i}": ep.shard_(MoELayer(16, 16, 8, k, seed=i)) for i, k in enumerate((2, 1, 3))}
    cb = HierMoECallback(**PLAN_KWARGS, planner=planner)
    for i, (name, layer) in enumerate(layers.items()):
        cb.windows[name] = _window(i, layer.top_k)
    try:
        return cb._plan_layers(layers, None)
    except RuntimeError as e:
        return str(e)


@pytest.mark.parametrize("planner", list(PLANNERS))
def test_every_planner_name_plans_once_per_layer_and_every_rank_gets_the_owners_plan(planner):
    results = run_ranks(_plan_on_ranks, 4, planner, timeout=60)
    for outcomes in results:
        assert outcomes == results[0]
    for i, k in enumerate((2, 1, 3)):
        ids, weights = _window(i, k).trace()
        start = Placement.contiguous(8, 4)
        request = PlanRequest(ids, weights, start, "2x2", COSTS, 16, 4, max_swaps=2, gamma=10.0,
                              compute_balance_tolerance=None)
        plan = PLANNERS[planner](request)
        expert_bytes = expert_state_bytes(MoELayer(16, 16, 8, k, seed=i))
        want = LayerPlan.of(plan, HierMoECallback._rank_load(ids, weights, start),
                            plan_migration_ms(plan.swaps, start, "2x2", COSTS, expert_bytes))
        assert results[0][i] == want
    if planner == "eplb":
        assert any(results[0][i].swaps for i in range(3)), "eplb moved nothing: the comparison would prove little"


def test_a_planner_that_returns_no_plan_fails_on_every_rank_naming_the_layer():
    for message in run_ranks(_plan_on_ranks, 4, _broken, timeout=60):
        assert isinstance(message, str) and "planning failed for layer 0 (l0) on expert-parallel rank 0" in message
        assert "planner must return a SwapPlan, got dict" in message


def _bad_planner_on_rank_zero(rank, world):
    message = None
    if rank == 0:  # one rank alone: a collective inside the constructor would hang the barrier below
        try:
            HierMoECallback(planner="round-robin")
        except ValueError as e:
            message = str(e)
    dist.barrier()
    return message


def test_the_documented_example_constructs():
    assert callback._planner is cautious and callback.planner is cautious


def test_bad_planner_raises_at_construction_before_any_collective():
    messages = run_ranks(_bad_planner_on_rank_zero, 2, timeout=60)
    assert messages[1] is None
    assert "planner must be one of 'hiermoe', 'eplb', 'smartmoe', 'none' or a callable" in messages[0]
    assert "'round-robin'" in messages[0]
    with pytest.raises(TypeError, match="planner must be one of .* got int 7"):
        HierMoECallback(planner=7)


# ------------------------------------------------------------------ Lightning fits on 4 ranks
@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return fit(str(tmp_path_factory.mktemp("ref")), 1, max_epochs=2, tag="ref")[0]


def _history(root) -> dict:
    return json.load(open(glob.glob(os.path.join(str(root), "csv", "*", "hiermoe_placement_history.json"))[0]))


@pytest.mark.parametrize("planner", ["eplb", "smartmoe", "cautious"])
def test_fit_with_a_planner_keeps_losses_equal_to_one_process(tmp_path, reference, planner):
    cb = HierMoECallback(**PLAN_KWARGS, planner=cautious if planner == "cautious" else planner, print_summary=False,
                         save_plots=False, plan_lag_steps=1, back_off=False)
    losses, _ = fit(str(tmp_path), 4, topology="2x2", dispatch="hd2", max_epochs=2, tag=planner,
                    extra_callbacks=[cb], link_costs=COSTS, logger=CSVLogger(str(tmp_path), name="csv"),
                    check_replicas=True)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference), **TOL)
    history = _history(tmp_path)
    # 2 layers, plans started after steps 2, 4, 6, 8, 10 (in the background), applied a step later: the last one never
    assert len(history["plans"]) == 2 * 4 and [p["applied_step"] for p in history["plans"][::2]] == [3, 5, 7, 9]
    if planner == "eplb":
        assert history["swaps_total"] > 0, "eplb moved nothing: the loss comparison would prove little"
    assert json.load(open(tmp_path / f"{planner}.replicas.json"))["dense_identical"]


class _Rotate:
    """A custom planner: each expert takes the (rank, slot) of the expert before it. Writes every request it gets
    (what the planner is documented to receive) and its target to ``<out_dir>/requests.rank<r>.json``."""

    def __init__(self, out_dir: str):
        self.out_dir, self.seen = out_dir, []

    def __call__(self, request: PlanRequest):
        before = request.placement
        target = Placement(before.expert_to_rank.roll(1), before.expert_to_slot.roll(1), before.world_size)
        self.seen.append({
            "ids": list(request.expert_ids.shape), "ids_dtype": str(request.expert_ids.dtype),
            "weights": list(request.token_weights.shape), "before": before.to_list(), "after": target.to_list(),
            "topology": str(request.topology), "link_costs": {k: [p.alpha, p.beta]
                                                              for k, p in request.link_costs.phases.items()},
            "hidden_size": request.hidden_size, "bytes_per_elem": request.bytes_per_elem,
            "max_swaps": request.max_swaps, "gamma": request.gamma, "expert_bytes": request.expert_bytes,
            "horizon_steps": request.horizon_steps, "tolerance": request.compute_balance_tolerance})
        with open(os.path.join(self.out_dir, f"requests.rank{dist.get_rank()}.json"), "w") as f:
            json.dump(self.seen, f)
        return plan_from_placement(request, target)


def test_a_custom_planner_gets_the_documented_request_and_its_plan_is_applied(tmp_path, reference):
    # charge_planning=False: the callback's pay-off gate would refuse rotations that save nothing; the planner itself
    # gets the migration charge (charge_migration) and may ignore it
    cb = HierMoECallback(plan_every_n_steps=2, max_swaps_per_plan=3, gamma=5.0, charge_migration=True,
                         compute_balance_tolerance=1.5, window_tokens_per_rank=48, planner=_Rotate(str(tmp_path)),
                         print_summary=False, save_plots=False, plan_in_background=False, charge_planning=False,
                         back_off=False)
    losses, _ = fit(str(tmp_path), 4, topology="2x2", dispatch="hd2", max_epochs=2, tag="rotate",
                    extra_callbacks=[cb], link_costs=COSTS, logger=CSVLogger(str(tmp_path), name="csv"))
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference), **TOL)
    assert not os.path.exists(tmp_path / "requests.rank2.json")  # 2 layers: ranks 0 and 1 own one each
    plans = _history(tmp_path)["plans"]
    for layer in (0, 1):
        seen = json.load(open(tmp_path / f"requests.rank{layer}.json"))
        mine = [p for p in plans if p["layer"] == layer]
        assert len(seen) == len(mine) == 5
        placement = Placement.contiguous(MODEL["num_experts"], 4)
        for request, record in zip(seen, mine):
            assert request["before"] == placement.to_list()  # the previous plan was applied
            T = request["ids"][1]
            assert request["ids"] == [4, T, MODEL["top_k"]] and request["weights"] == [4, T] and 0 < T <= 48
            assert request["ids_dtype"] == "torch.int64"
            assert request["topology"] == "2x2"
            assert request["link_costs"] == {k: [p.alpha, p.beta] for k, p in COSTS.phases.items()}
            assert (request["hidden_size"], request["bytes_per_elem"]) == (MODEL["hidden_size"], 4)
            assert (request["max_swaps"], request["gamma"], request["tolerance"]) == (3, 5.0, 1.5)
            assert request["expert_bytes"] > 0 and request["horizon_steps"] >= 1  # charge_migration
            target = Placement(placement.expert_to_rank.roll(1), placement.expert_to_slot.roll(1), 4)
            assert record["placement_after"] == request["after"] == target.to_list()
            assert record["swaps"] == [list(s) for s in swaps_between(placement, target)]
            placement = target


def test_history_of_a_checkpoint_written_before_typed_records_loads_and_saves_unchanged():
    """Callback state keeps the history as the JSON the string-keyed dicts gave: an old checkpoint's history loads
    into PlanRecords (which read like the dicts) and is written back with the same values (plus the newer fields'
    defaults)."""
    from hiermoe_lightning.placement.records import PlanRecord

    old = json.dumps([{"step": 2, "layer": i, "name": f"blocks.{i}.moe", "swaps": [[0, 5]] if i else [],
                       "predicted_ms_before": 0.25 + i, "predicted_ms_after": 0.125 + i, "chosen_before": "hd1",
                       "chosen_after": "hd2", "placement_after": [2, 0, 1, 1, 2, 0, 3, 3]} for i in (0, 1)])
    cb = HierMoECallback(**PLAN_KWARGS, print_summary=False)
    state = {**cb.state_dict(), "history": old, "swaps_total": 1}
    other = HierMoECallback(**PLAN_KWARGS, print_summary=False)
    other.load_state_dict(state)
    assert all(isinstance(r, PlanRecord) for r in other.history)
    assert other.history[1].swaps == ((0, 5),) and other.history[1]["swaps"] == [[0, 5]]
    written = json.loads(other.state_dict()["history"])
    assert [{k: e[k] for k in json.loads(old)[0]} for e in written] == json.loads(old)  # same values, same order
    assert all(e["applied_step"] == e["step"] and e["refused_swaps"] == 0 for e in written)
    assert "expert swaps                1 in 1 plans" in other.summary(_NoTrainer())


class _NoTrainer:
    """Just enough of a Trainer for DedupMonitor.summary."""

    checkpoint_callback = None
