"""HierMoECallback: swaps mid-training change nothing but where experts live; metrics reach the loggers; resume works;
the asynchronous routing gather and the distributed planning give what a synchronous, local computation gives."""

import csv
import glob
import json
import os

import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from hiermoe_lightning import ExpertParallel, HierMoECallback, LinkCosts, MoELayer
from hiermoe_lightning import callback as callback_module
from hiermoe_lightning.checkpoint import moe_layers
from hiermoe_lightning.placement import Placement
from hiermoe_lightning.placement.planner import plan_swaps
from hiermoe_lightning.placement.window import RoutingWindow
from hiermoe_lightning.testing import run_ranks
from tests.lightning_harness import MODEL, fit

TOL = dict(atol=2e-5, rtol=2e-5)
# a slow level-1 link makes co-locating co-activated experts worth a swap even on this tiny model
COSTS = LinkCosts({"a2a": (0.1, 1e-4), "inter1": (0.1, 1e-4), "intra1": (0.01, 1e-7)})


PLAN_KWARGS = dict(plan_every_n_steps=2, max_swaps_per_plan=2, charge_migration=False, compute_balance_tolerance=None)


def _callback():
    return HierMoECallback(**PLAN_KWARGS, print_summary=False)


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


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"plan_every_n_steps": 0}, ValueError, "plan_every_n_steps must be an int >= 1"),
    ({"plan_every_n_steps": 2.0}, TypeError, "plan_every_n_steps must be an int >= 1"),
    ({"plan_every_n_steps": True}, TypeError, "plan_every_n_steps"),
    ({"swap": "yes"}, TypeError, "swap must be True or False"),
    ({"swap": 1}, TypeError, "swap must be True or False"),
    ({"max_swaps_per_plan": -1}, ValueError, "max_swaps_per_plan must be an int >= 0"),
    ({"max_swaps_per_plan": None}, TypeError, "max_swaps_per_plan must be an int >= 0"),
    ({"gamma": 0.5}, ValueError, r"gamma must be a number in \[1, inf\) or None \(plain max\)"),
    ({"gamma": float("inf")}, ValueError, "gamma"),
    ({"gamma": "10"}, TypeError, "gamma"),
    ({"window_tokens_per_rank": 0}, ValueError, "window_tokens_per_rank must be an int >= 1"),
    ({"window_tokens_per_rank": 1.5}, TypeError, "window_tokens_per_rank"),
    ({"window_decay": 1.5}, ValueError, r"window_decay must be a number in \(0, 1\]"),
    ({"window_decay": 0}, ValueError, "window_decay"),
    ({"window_decay": float("nan")}, ValueError, "window_decay"),
    ({"window_decay": None}, TypeError, "window_decay"),
    ({"sample_tokens_per_rank": 0}, ValueError, "sample_tokens_per_rank must be an int >= 1"),
    ({"sample_tokens_per_rank": "512"}, TypeError, "sample_tokens_per_rank"),
    ({"charge_migration": "no"}, TypeError, "charge_migration must be True or False"),
    ({"charge_migration": 0}, TypeError, "charge_migration must be True or False"),
    ({"compute_balance_tolerance": 0.9}, ValueError, r"compute_balance_tolerance must be .* or None \(no guard\)"),
    ({"compute_balance_tolerance": float("nan")}, ValueError, "compute_balance_tolerance"),
    ({"compute_balance_tolerance": True}, TypeError, "compute_balance_tolerance"),
    ({"log_every_n_steps": 0}, ValueError, "log_every_n_steps must be an int >= 1"),
    ({"log_every_n_steps": 1.0}, TypeError, "log_every_n_steps must be an int >= 1"),
    ({"print_summary": "false"}, TypeError, "print_summary must be True or False"),
    ({"print_summary": None}, TypeError, "print_summary must be True or False"),
    ({"save_plots": 1}, TypeError, "save_plots must be True or False"),
    ({"planner": "greedy"}, ValueError, "planner must be one of 'hiermoe', 'eplb', 'smartmoe', 'none' or a callable"),
    ({"plan_in_background": 1}, TypeError, "plan_in_background must be True or False"),
    ({"plan_lag_steps": 0}, ValueError, "plan_lag_steps must be an int >= 1"),
    ({"plan_lag_steps": 1.0}, TypeError, "plan_lag_steps must be an int >= 1"),
    ({"charge_planning": "yes"}, TypeError, "charge_planning must be True or False"),
    ({"back_off": None}, TypeError, "back_off must be True or False"),
    ({"max_plan_interval": 10}, ValueError, r"max_plan_interval must be an int >= 50, got 10"),
    ({"max_plan_interval": 100.0}, TypeError, "max_plan_interval must be an int >= 50"),
    ({"overlap_migration": "yes"}, TypeError, "overlap_migration must be True or False"),
])
def test_bad_arguments_name_the_parameter(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        HierMoECallback(**kwargs)


def test_every_argument_is_checked_and_the_edges_are_accepted():
    """Each constructor argument has a bad-value case above; the allowed edges construct."""
    import inspect

    checked = {"plan_every_n_steps", "swap", "max_swaps_per_plan", "gamma", "window_tokens_per_rank", "window_decay",
               "sample_tokens_per_rank", "charge_migration", "compute_balance_tolerance", "log_every_n_steps",
               "print_summary", "save_plots", "planner", "plan_in_background", "plan_lag_steps", "charge_planning",
               "back_off", "max_plan_interval", "overlap_migration"}
    assert set(inspect.signature(HierMoECallback).parameters) == checked
    cb = HierMoECallback(plan_every_n_steps=1, swap=False, max_swaps_per_plan=0, gamma=None, window_tokens_per_rank=1,
                         window_decay=1, sample_tokens_per_rank=1, charge_migration=False,
                         compute_balance_tolerance=None, log_every_n_steps=1, print_summary=False, save_plots=False,
                         plan_in_background=False, plan_lag_steps=1, charge_planning=None, back_off=False,
                         max_plan_interval=1, overlap_migration=False)
    assert cb.charge_planning is False and cb.max_plan_interval == 1  # charge_planning None follows charge_migration
    assert cb.window_decay == 1.0 and cb.gamma is None and cb.compute_balance_tolerance is None
    assert HierMoECallback(gamma=1, compute_balance_tolerance=1).gamma == 1.0


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"log_every_n_steps": 0}, ValueError, "log_every_n_steps"),
    ({"log_every_n_steps": "1"}, TypeError, "log_every_n_steps"),
    ({"print_summary": "yes"}, TypeError, "print_summary"),
])
def test_dedup_monitor_bad_arguments(kwargs, exc, match):
    from hiermoe_lightning.metrics import DedupMonitor

    with pytest.raises(exc, match=match):
        DedupMonitor(**kwargs)


def test_state_holds_everything_later_plans_and_metrics_read():
    """The last optimizer step (no second plan of a step inside a gradient-accumulation cycle), the migration
    horizon's token scale, each layer's placement and auto-dispatch state (to put back once the strategy sharded the
    model), the training seconds and the loss count survive a round trip."""
    cb = HierMoECallback(**PLAN_KWARGS, print_summary=False)
    cb.windows["l0"] = RoutingWindow(64, 0.9)
    cb.windows["l0"].ingest(_window_ids(0, 2))
    cb._last_step, cb._tokens_scale, cb.swaps_total, cb.tokens = 6, 2.5, 3, 100
    cb._restore = {"l0": {"expert_to_rank": torch.tensor([1, 0]), "expert_to_slot": torch.tensor([0, 0]),
                          "world_size": 2, "num_experts": 2, "dispatch": "hd2", "auto_calls": 7,
                          "auto_predictions": "{}"}}
    cb.losses, cb._first_loss, cb._seconds_before = [5.0, 4.0], 5.0, 10.0
    state = cb.state_dict()
    other = HierMoECallback(**PLAN_KWARGS, print_summary=False)
    other.load_state_dict(state)
    assert (other._last_step, other._tokens_scale, other.swaps_total, other.tokens) == (6, 2.5, 3, 100)
    assert other._restore["l0"]["auto_calls"] == 7 and torch.equal(other._restore["l0"]["expert_to_rank"],
                                                                   torch.tensor([1, 0]))
    assert torch.equal(other.windows["l0"].trace()[0], cb.windows["l0"].trace()[0])
    assert other.state_dict()["layers"] == state["layers"]  # not applied yet: carried on as loaded
    assert other.train_seconds() == pytest.approx(10.0) and other.state_dict()["loss_count"] == 2
    assert other._first_loss == 5.0


class _Recording(HierMoECallback):
    """HierMoECallback that records on its rank: each batch's own routing sample, for each plan the windows it saw and
    the placements before and after, the layers this rank planned itself; it saves a checkpoint right after batch
    ``save_at_batch`` and writes everything to ``<out_dir>/rank<r>.pt`` at the end of training."""

    def __init__(self, out_dir: str, save_at_batch: int):
        # in the background, applied one step after the statistics; no back-off: every 2 steps whatever they gain
        super().__init__(**PLAN_KWARGS, print_summary=False, save_plots=False, plan_lag_steps=1, back_off=False)
        self.out_dir, self.save_at_batch = out_dir, save_at_batch
        self.samples, self.plans, self.planned = [], [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        layers = {n: m for n, m in moe_layers(pl_module).items() if m.is_sharded}
        self.samples.append({n: self._sample(m.last_expert_ids).clone() for n, m in layers.items()})
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if batch_idx == self.save_at_batch:  # a non-plan step: its gather is still in flight here
            trainer.save_checkpoint(os.path.join(self.out_dir, "mid.ckpt"))

    @staticmethod
    def _placements(layers):
        """Each layer's placement, or where a migration in flight is taking it (read without settling it)."""
        out = {}
        for n, m in layers.items():
            flight = m.expert_parallel.migration_in_flight
            p = flight.placement_after(m) if flight is not None else m.placement
            out[n] = (p.expert_to_rank.clone(), p.expert_to_slot.clone())
        return out

    def _start_plan(self, trainer, layers):
        # the batch ending here is still being gathered: the plan's window holds the batches before it
        self._started = {"batches": len(self.samples) - 1, "before": self._placements(layers),
                         "traces": {n: self.windows[n].trace() for n in layers}}
        super()._start_plan(trainer, layers)

    def _finish_plan(self, trainer, pl_module, layers):
        super()._finish_plan(trainer, pl_module, layers)
        self.plans.append({**self._started, "after": self._placements(layers)})

    def _submit(self, layers, inputs):
        jobs = super()._submit(layers, inputs)
        self.planned.extend(name for i, name in enumerate(layers) if i in jobs)
        return jobs

    def on_train_end(self, trainer, pl_module):
        super().on_train_end(trainer, pl_module)
        torch.save({"samples": self.samples, "plans": self.plans, "planned": self.planned, "history": self.history,
                    "load_history": self.load_history, "swaps_total": self.swaps_total},
                   os.path.join(self.out_dir, f"rank{trainer.global_rank}.pt"))


def _reference_window(ranks: list[dict], name: str, batches: int) -> RoutingWindow:
    """The window a synchronous gather builds: batch by batch, every rank's sample -1 padded to ``[G, max T, K]``."""
    window = RoutingWindow(4096, 0.9)
    for b in range(batches):
        parts = [r["samples"][b][name] for r in ranks]
        gathered = torch.full((len(parts), max(p.shape[0] for p in parts), parts[0].shape[1]), -1, dtype=torch.long)
        for g, p in enumerate(parts):
            gathered[g, : p.shape[0]] = p
        window.ingest(gathered)
    return window


# flat: the all-to-alls share the gather's process group; accumulate: one sample per micro-batch, one plan per step
@pytest.mark.parametrize("dispatch, accumulate", [("hd2", 1), ("flat", 1), ("hd2", 2)])
def test_distributed_planning_and_async_gather_match_a_local_synchronous_reference(tmp_path, reference, dispatch,
                                                                                    accumulate):
    """Every rank ends with the same history and placements, each plan equals a local ``plan_swaps`` on a window
    rebuilt from the ranks' samples (so the asynchronous gather fed the windows like a synchronous one), each
    layer was planned by one rank only (round robin), a checkpoint saved right after a non-plan step holds that
    step's sample, and the losses stay those of one process."""
    save_at = 2
    losses, _ = fit(str(tmp_path), 4, topology="2x2", dispatch=dispatch, max_epochs=1, tag="rec", link_costs=COSTS,
                    accumulate=accumulate, extra_callbacks=[_Recording(str(tmp_path), save_at)])
    if accumulate == 1:
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference[:5]), **TOL)  # no corrupted exchange
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(4)]
    names = list(ranks[0]["samples"][0])
    assert len(names) == 2 and ranks[0]["swaps_total"] > 0, "no swap: the test would prove little"
    for r in ranks[1:]:
        assert r["history"] == ranks[0]["history"] and r["load_history"] == ranks[0]["load_history"]
    plans = len(ranks[0]["plans"])
    assert plans == (2 if accumulate == 1 else 1) and len(ranks[0]["samples"]) == 5
    assert [r["planned"] for r in ranks] == [[names[0]] * plans, [names[1]] * plans, [], []]
    for p, plan in enumerate(ranks[0]["plans"]):
        for i, name in enumerate(names):
            ids, weights = _reference_window(ranks, name, plan["batches"]).trace()
            for r in ranks:
                seen = r["plans"][p]
                assert torch.equal(seen["traces"][name][0], ids) and torch.equal(seen["traces"][name][1], weights)
                for key in ("before", "after"):
                    assert all(torch.equal(a, b) for a, b in zip(seen[key][name], plan[key][name])), (p, name, key)
            before = Placement(*plan["before"][name], 4)
            ref = plan_swaps(ids, before, "2x2", COSTS, MODEL["hidden_size"], 4, max_swaps=2, token_weights=weights,
                             gamma=10.0, compute_balance_tolerance=None)
            record = ranks[0]["history"][p * len(names) + i]
            assert record["name"] == name and record["swaps"] == [list(s) for s in ref.swaps]
            assert record["predicted_ms_before"] == ref.predicted_ms_before
            assert record["predicted_ms_after"] == ref.predicted_ms_after
            assert (record["chosen_before"], record["chosen_after"]) == (ref.chosen_before, ref.chosen_after)
            assert record["placement_after"] == ref.placement_after.to_list()
            assert Placement(*plan["after"][name], 4) == ref.placement_after  # slots too, not only ranks
            assert ranks[0]["load_history"][p][i] == HierMoECallback._rank_load(ids, weights, before).tolist()
    state = torch.load(tmp_path / "mid.ckpt", weights_only=True)
    windows = next(v["windows"] for v in state["callbacks"].values() if "windows" in v)
    for name in names:
        assert int(windows[name]["steps"]) == save_at + 1
        assert torch.equal(windows[name]["expert_ids"], _reference_window(ranks, name, save_at + 1).trace()[0])


class _MigrationProbe(HierMoECallback):
    """HierMoECallback noting, at the end of every optimizer step, whether the experts of a plan applied there are
    still travelling (the commit waits for the next forward); rank 0 writes the steps and the placements to
    ``<out_dir>/<tag>.probe.pt``."""

    def __init__(self, out_dir: str, tag: str, overlap: bool):
        super().__init__(**PLAN_KWARGS, print_summary=False, save_plots=False, plan_lag_steps=1, back_off=False,
                         overlap_migration=overlap)
        self.path = os.path.join(out_dir, f"{tag}.probe.pt")
        self.in_flight_steps: list[int] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if any(m.expert_parallel.migration_in_flight is not None for m in moe_layers(pl_module).values()):
            self.in_flight_steps.append(trainer.global_step)

    def on_train_end(self, trainer, pl_module):
        super().on_train_end(trainer, pl_module)
        if trainer.global_rank == 0:
            torch.save({"in_flight": self.in_flight_steps, "applied": self.plan_applied_steps,
                        "history": [{k: v for k, v in r.to_dict().items() if k != "planning_seconds"}
                                    for r in self.history],
                        "placements": {n: m.placement.to_list() for n, m in moe_layers(pl_module).items()},
                        "seconds": (self.migration_seconds, self.migration_wall_seconds)}, self.path)


def test_overlapped_migration_trains_exactly_like_the_blocking_one_and_one_process(tmp_path, reference):
    """``overlap_migration=True`` (the default) leaves a plan's experts travelling past the step that applies it and
    commits them at the next forward; the run equals ``overlap_migration=False`` (plans, placements, losses) and
    the one-process reference."""
    runs = {}
    for overlap in (True, False):
        tag = f"overlap{int(overlap)}"
        losses, _ = fit(str(tmp_path), 4, topology="2x2", dispatch="hd2", max_epochs=1, tag=tag, link_costs=COSTS,
                        extra_callbacks=[_MigrationProbe(str(tmp_path), tag, overlap)])
        runs[overlap] = (losses, torch.load(tmp_path / f"{tag}.probe.pt", weights_only=False))
    (losses_on, on), (losses_off, off) = runs[True], runs[False]
    assert sum(len(r["swaps"]) for r in on["history"]) > 0, "no swap: the test would prove little"
    assert on["applied"] and on["in_flight"] == on["applied"], "a migration should be in flight after its step"
    assert off["in_flight"] == []
    assert on["history"] == off["history"] and on["placements"] == off["placements"]
    torch.testing.assert_close(torch.tensor(losses_on), torch.tensor(losses_off), **TOL)
    torch.testing.assert_close(torch.tensor(losses_on), torch.tensor(reference[:5]), **TOL)
    exposed, wall = on["seconds"]
    assert 0.0 < exposed <= wall


def _plan_on_ranks(rank, world, fail):
    ep = ExpertParallel("2x2", dispatch="flat", link_costs=COSTS)
    layers = {f"l{i}": ep.shard_(MoELayer(16, 16, 8, k, seed=i)) for i, k in enumerate((2, 1, 3))}
    callback = HierMoECallback(**PLAN_KWARGS)
    for i, (name, layer) in enumerate(layers.items()):
        callback.windows[name] = RoutingWindow(64, 0.9)
        callback.windows[name].ingest(_window_ids(i, layer.top_k))
    planned = []
    job = callback_module._plan_layer_job

    def plan_layer_job(planner, request, inputs):  # on the owner's planning thread (this forked rank only)
        name = {2: "l0", 1: "l1", 3: "l2"}[request.expert_ids.shape[-1]]
        planned.append(name)
        if name == fail:
            raise ValueError("injected")
        return job(planner, request, inputs)

    callback_module._plan_layer_job = plan_layer_job
    try:
        return callback._plan_layers(layers, None), planned
    except RuntimeError as e:
        return str(e), planned


def _window_ids(i: int, top_k: int) -> torch.Tensor:
    """``[4, 24, K]`` skewed routing with distinct experts per token (-1 = dropped), the same on every rank."""
    g = torch.Generator().manual_seed(i)
    ids = (torch.rand(4, 24, 8, generator=g) * torch.linspace(2.0, 0.5, 8)).topk(top_k, dim=-1).indices
    ids[torch.rand(4, 24, top_k, generator=g) < 0.1] = -1
    return ids


@pytest.mark.parametrize("fail", [None, "l1"])
def test_planning_round_robin_shares_local_plans_and_a_failure_raises_on_every_rank(fail):
    results = run_ranks(_plan_on_ranks, 4, fail, timeout=30)
    assert [planned for _, planned in results] == [["l0"], ["l1"], ["l2"], []]
    if fail is not None:
        for message, _ in results:
            assert isinstance(message, str) and "layer 1 (l1)" in message and "rank 1" in message
            assert "ValueError: injected" in message
        return
    for outcomes, _ in results:
        assert outcomes == results[0][0]
    for i, k in enumerate((2, 1, 3)):
        window = RoutingWindow(64, 0.9)
        window.ingest(_window_ids(i, k))
        ids, weights = window.trace()
        ref = plan_swaps(ids, Placement.contiguous(8, 4), "2x2", COSTS, 16, 4, max_swaps=2, token_weights=weights,
                         gamma=10.0, compute_balance_tolerance=None)
        out = results[0][0][i]
        assert out["swaps"] == [list(s) for s in ref.swaps] and out["predicted_ms_after"] == ref.predicted_ms_after
        assert out["expert_to_rank"] == ref.placement_after.expert_to_rank.tolist()
        assert out["expert_to_slot"] == ref.placement_after.expert_to_slot.tolist()
    assert any(results[0][0][i]["swaps"] for i in range(3)), "no swap planned: the comparison would prove little"
