"""HierMoECallback's planning off the critical path and its pay-off rules, on 4 gloo ranks with a stand-in Trainer:

* a plan searched on the planning thread is the plan the blocking path makes from the same statistics, and the step
  that starts it returns while the search still runs (the planner is held on an event, no clock involved);
* the pay-off gate refuses swaps whose saving does not cover the measured planning time, and the schedule backs off;
* a plan that moved experts is judged on the routing seen since: swaps that did not pay back off, swaps that paid
  bring the interval back; the realised saving reaches the loggers.
"""

from __future__ import annotations

import os
import threading
import time

import torch

from hiermoe_lightning import ExpertParallel, HierMoECallback, LinkCosts, MoELayer
from hiermoe_lightning.placement.planners import hiermoe_planner
from hiermoe_lightning.placement.window import RoutingWindow
from hiermoe_lightning.testing import run_ranks

COSTS = LinkCosts({"a2a": (0.1, 1e-4), "inter1": (0.1, 1e-4), "intra1": (0.01, 1e-7)})
PLAN_KWARGS = dict(plan_every_n_steps=2, max_swaps_per_plan=2, charge_migration=False, compute_balance_tolerance=None,
                   print_summary=False, save_plots=False)
TIMING_FIELDS = ("planning_seconds", "applied_step")


class _Logger:
    def __init__(self):
        self.logged: list[dict] = []

    def log_metrics(self, metrics, step):
        self.logged.append(dict(metrics))


class _Trainer:
    """Just what the callback's plan start and finish read from a Trainer."""

    def __init__(self, step: int):
        self.global_step, self.optimizers, self.loggers = step, [], [_Logger()]


def _skewed_ids(i: int, top_k: int) -> torch.Tensor:
    """``[4, 24, K]`` skewed routing with distinct experts per token, the same on every rank."""
    g = torch.Generator().manual_seed(i)
    return (torch.rand(4, 24, 8, generator=g) * torch.linspace(2.0, 0.5, 8)).topk(top_k, dim=-1).indices


def _layers(ep) -> dict:
    return {f"l{i}": ep.shard_(MoELayer(16, 16, 8, k, seed=i)) for i, k in enumerate((2, 1, 3))}


def _fill(cb: HierMoECallback, layers: dict) -> None:
    for i, (name, layer) in enumerate(layers.items()):
        cb.windows[name] = RoutingWindow(64, 0.9)
        cb.windows[name].ingest(_skewed_ids(i, layer.top_k))


def _plans(cb: HierMoECallback) -> list[dict]:
    return [{k: v for k, v in r.to_dict().items() if k not in TIMING_FIELDS} for r in cb.history]


def _background_equals_blocking(rank, world):
    ep = ExpertParallel("2x2", dispatch="flat", link_costs=COSTS)
    release = threading.Event()
    threads_seen = []

    def held(request):  # the search waits until the test has seen the step return
        threads_seen.append((torch.get_num_threads(), os.getpriority(os.PRIO_PROCESS, threading.get_native_id())))
        assert release.wait(60), "never released"
        return hiermoe_planner(request)

    out = {}
    for background in (True, False):
        layers = _layers(ep)
        module = torch.nn.ModuleDict(layers)
        cb = HierMoECallback(**PLAN_KWARGS, plan_in_background=background, plan_lag_steps=1,
                             planner=held if background else "hiermoe")
        _fill(cb, layers)
        main_threads = torch.get_num_threads()
        cb._start_plan(_Trainer(2), layers)
        if background:
            out["running"] = [not job.done for job in cb._inflight.jobs.values()]
            out["apply_step"] = cb._inflight.apply_step
            out["placements_untouched"] = all(torch.equal(m.placement.expert_to_rank, torch.arange(8) // 2)
                                              for m in layers.values())
            release.set()
        cb._finish_plan(_Trainer(3 if background else 2), module, layers)
        out[background] = {"plans": _plans(cb), "applied": [r.applied_step for r in cb.history],
                           "placements": [m.placement.expert_to_rank.tolist() for m in layers.values()]}
        out["main_threads_kept"] = torch.get_num_threads() == main_threads
    out["threads_seen"] = threads_seen
    return out


def test_a_background_plan_equals_the_blocking_plan_and_the_step_does_not_wait_for_it():
    results = run_ranks(_background_equals_blocking, 4, timeout=90)
    for rank, out in enumerate(results):
        assert out["running"] == ([True] if rank < 3 else []), "a job finished before its planner was released"
        assert out["apply_step"] == 3 and out["placements_untouched"]
        assert out[True]["plans"] == out[False]["plans"] == results[0][True]["plans"]
        assert out[True]["placements"] == out[False]["placements"]
        assert out[True]["applied"] == [3, 3, 3] and out[False]["applied"] == [2, 2, 2]
        # one intra-op thread on the planning thread, at the lowest priority (it runs when training leaves a core idle)
        assert out["threads_seen"] == ([(1, 19)] if rank < 3 else [])
        assert out["main_threads_kept"]
    assert any(p["swaps"] for p in results[0][True]["plans"]), "nothing swapped: the comparison would prove little"


def _slow_planning_is_refused(rank, world):
    ep = ExpertParallel("2x2", dispatch="flat", link_costs=COSTS)
    layers = _layers(ep)

    def slow(request):  # 50 ms of planning, against a saving of well under a millisecond over the horizon
        time.sleep(0.05)
        return hiermoe_planner(request)

    cb = HierMoECallback(**PLAN_KWARGS, charge_planning=True, plan_in_background=False, planner=slow)
    _fill(cb, layers)
    trainer = _Trainer(2)
    cb._start_plan(trainer, layers)
    cb._finish_plan(trainer, torch.nn.ModuleDict(layers), layers)
    free = HierMoECallback(**PLAN_KWARGS, plan_in_background=False)  # the same plans, nothing charged
    _fill(free, layers)
    proposed = sum(len(p.swaps) for p in free._plan_layers(layers, None).values())
    logged = trainer.loggers[0].logged[-1]
    return {"swaps": cb.swaps_total, "refused": sum(r.refused_swaps for r in cb.history), "proposed": proposed,
            "placements": [m.placement.expert_to_rank.tolist() for m in layers.values()],
            "schedule": (cb._interval, cb._swap_budget, cb._next_plan_step), "logged_refused": logged["hiermoe/swap/refused"],
            "planning_s": [r.planning_seconds for r in cb.history]}


def test_swaps_that_do_not_cover_the_planning_time_are_refused_and_the_schedule_backs_off():
    for out in run_ranks(_slow_planning_is_refused, 4, timeout=90):
        assert out["proposed"] > 0, "the planner proposed nothing: the gate would prove nothing"
        assert out["swaps"] == 0 and out["refused"] == out["proposed"] == out["logged_refused"]
        assert out["placements"] == [(torch.arange(8) // 2).tolist()] * 3  # nothing moved
        assert out["schedule"] == (4, 1, 6)  # interval 2 -> 4, budget 2 -> 1, next plan after step 2 + 4
        assert all(s >= 0.05 for s in out["planning_s"][:3])


def _judged(rank, world, recent_kind):
    ep = ExpertParallel("2x2", dispatch="flat", link_costs=COSTS)
    layers = _layers(ep)
    module = torch.nn.ModuleDict(layers)
    cb = HierMoECallback(**PLAN_KWARGS, plan_in_background=False)
    _fill(cb, layers)
    cb._interval = 4  # as if backed off once already
    cb._start_plan(_Trainer(4), layers)
    cb._finish_plan(_Trainer(4), module, layers)
    moved = cb.swaps_total
    for i, (name, layer) in enumerate(layers.items()):  # the routing seen since the swaps
        if name in cb._last_change["before"]:
            cb.recent[name] = RoutingWindow(64, 1.0)
            ids = _skewed_ids(i, layer.top_k)
            if recent_kind == "idle":  # no pair at all came (every pair dropped): the swaps saved nothing
                ids = torch.full_like(ids, -1)
            cb.recent[name].ingest(ids)
    trainer = _Trainer(8)
    cb._start_plan(trainer, layers)
    cb._finish_plan(trainer, module, layers)
    logged = {k: v for d in trainer.loggers[0].logged for k, v in d.items()}
    return {"moved": moved, "realised": cb.realised, "interval": cb._interval,
            "logged": logged.get("hiermoe/swap/realised_saving_ms")}


def test_a_plan_that_moved_experts_is_judged_on_the_routing_that_followed():
    for kind in ("same", "idle"):
        for out in run_ranks(_judged, 4, kind, timeout=90):
            assert out["moved"] > 0, "the first plan moved nothing: nothing to judge"
            (entry,) = out["realised"]
            assert entry["applied_step"] == 4 and entry["judged_at"] == 8
            assert out["logged"] == entry["realised_saving_ms"]
            if kind == "same":  # the routing it was planned for came: it saved what it predicted, and paid
                assert entry["realised_saving_ms"] > 0
                assert entry["realised_saving_ms"] == entry["predicted_saving_ms"]
                assert entry["realised_net_ms"] > 0
                assert out["interval"] == 2  # paid: back to plan_every_n_steps
            else:  # saved nothing: did not pay, the schedule backs off
                assert entry["realised_saving_ms"] == 0.0 < entry["predicted_saving_ms"]
                assert entry["realised_net_ms"] <= 0 and out["interval"] == 8


def test_only_the_batches_that_can_reach_the_next_plan_are_gathered_and_the_window_is_the_same():
    cb = HierMoECallback(plan_every_n_steps=10, window_tokens_per_rank=1024, sample_tokens_per_rank=512)
    # the plan after step 10 uses the batches of steps 8 and 9 (the window holds 2); step 10's is still in flight
    assert [s for s in range(1, 11) if cb._sample_needed(s)] == [8, 9, 10]
    cb._next_plan_step = 30  # after a back-off
    assert [s for s in range(11, 31) if cb._sample_needed(s)] == [28, 29, 30]
    cb._inflight = object()  # a plan in flight may shorten the interval: gather everything meanwhile
    assert cb._sample_needed(12)
    assert all(HierMoECallback(swap=False)._sample_needed(s) for s in range(1, 60))
    every, needed = RoutingWindow(1024, 0.9), RoutingWindow(1024, 0.9)
    for s in range(1, 10):  # what the plan after step 10 sees
        ids = _skewed_ids(s, 2)[:, :24].repeat(1, 22, 1)[:, :512]  # [4, 512, 2]
        every.ingest(ids)
        if s in (8, 9):
            needed.ingest(ids)
    for a, b in zip(every.trace(), needed.trace()):
        assert torch.equal(a, b)
