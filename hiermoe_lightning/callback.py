"""HierMoECallback: routing statistics, the dedup-aware swap planner, in-place migration, and the savings in the logs.

Every training batch it samples each sharded MoELayer's routing on every rank and posts one fixed-size asynchronous
gather of it (no count exchange, no wait in that step); the next batch end completes it and adds it to an
exponentially decayed window, so every rank holds the same statistics. After every ``plan_every_n_steps``-th
optimizer step (never per micro-batch) it completes the gather of that step and plans each layer with its planner
(``planner=``: the dedup-aware swap planner by default, or EPLB, SmartMoE, a custom callable), each layer on one rank
(round robin; deterministic functions, so the owner's plan is everyone's plan), shares the plans, migrates the
experts with their gradients and optimizer state, and lets ``dispatch="auto"`` re-choose its depth.
Metrics go to every logger (see :class:`~hiermoe_lightning.metrics.DedupMonitor` plus ``hiermoe/swaps``); at the end
of fit a heatmap of expert load per rank over time and the placement history are written to the log directory.
"""

from __future__ import annotations

import functools
import json
import os
import time
from dataclasses import dataclass

import torch
from typing_extensions import override

from .checkpoint import moe_layers
from .metrics import DedupMonitor
from .validation import check_bool_arg, check_int, check_number_arg
from .parallel import PendingRoutings
from .placement import Placement
from .placement.background import PlanningJob
from .placement.migrate import MigrationInFlight, expert_state_bytes, migrate_, settle_migrations, start_migration
from .placement.payoff import BackOff, a2as_per_step, net_gain_ms, plan_migration_ms, realised_saving_ms
from .placement.planners import PlannerArg, PlanRequest, check_plan, resolve_planner
from .placement.records import LayerPlan, PlanRecord
from .placement.window import RoutingWindow

__all__ = ["HierMoECallback"]


def _by_expert_parallel(layers: dict) -> list[tuple]:
    """``name -> layer`` grouped by the ExpertParallel that shards them, in first-seen order:
    ``[(expert_parallel, [(layer index, name, layer), ...])]`` (one collective per group serves all its layers)."""
    groups: dict[int, tuple] = {}
    for i, (name, layer) in enumerate(layers.items()):
        groups.setdefault(id(layer.expert_parallel), (layer.expert_parallel, []))[1].append((i, name, layer))
    return list(groups.values())


@dataclass
class _InFlight:
    """A plan started after optimizer step ``step`` from ``inputs`` (name -> :meth:`HierMoECallback._layer_inputs`),
    to be applied after step ``apply_step``; ``interval`` / ``tokens_scale``: the schedule when it started; ``jobs``:
    this rank's running :class:`PlanningJob` by layer index (not checkpointed: a resume starts them again)."""

    step: int
    apply_step: int
    interval: int
    tokens_scale: float
    inputs: dict
    jobs: dict

    def state_dict(self) -> dict:
        return {"step": self.step, "apply_step": self.apply_step, "interval": self.interval,
                "tokens_scale": self.tokens_scale, "inputs": self.inputs}


def _plan_layer_job(planner, request: PlanRequest, inputs: dict) -> LayerPlan:
    """One layer's plan (runs on the owner's planning thread; pure): the planner's checked plan, its migration ms
    (priced with the expert's real bytes whether or not the planner was charged), the ``[G]`` load per rank and, when
    the inputs carry the routing seen since the layer's previous plan, that plan's realised before/after ms."""
    plan = check_plan(planner(request), request)
    migration = plan_migration_ms(plan.swaps, request.placement, request.topology, request.link_costs,
                                  inputs["expert_bytes"])
    realised = None
    if "recent_ids" in inputs:
        before = Placement(inputs["before_rank"], inputs["before_slot"], request.placement.world_size)
        realised = realised_saving_ms(inputs["recent_ids"], inputs["recent_weights"], before, request.placement,
                                      request.topology, request.link_costs,
                                      request.hidden_size * request.bytes_per_elem)
    load = HierMoECallback._rank_load(request.expert_ids, request.token_weights, request.placement)
    return LayerPlan.of(plan, load, migration, realised)


class HierMoECallback(DedupMonitor):
    """Plan and execute expert swaps every ``plan_every_n_steps`` optimizer steps, and log the savings.

    Args:
        plan_every_n_steps: optimizer steps between plans (an int >= 1).
        swap: run the planner and migrate (False: statistics and metrics only).
        max_swaps_per_plan: greedy swaps per layer and plan, at most (an int >= 0).
        gamma: smooth-max exponent used to rank candidates, a number >= 1 (None: plain max).
        window_tokens_per_rank / window_decay: the routing window (EMA over recent batches): an int >= 1 / a number
            in (0, 1].
        sample_tokens_per_rank: tokens per rank and batch added to the window (evenly strided; an int >= 1).
        charge_migration: weigh each swap's saving over the next plan interval against its migration time.
        compute_balance_tolerance: a swap may not push the busiest rank's expert load above this times the mean (a
            number >= 1; None: no guard).
        log_every_n_steps / print_summary / save_plots: reporting (an int >= 1 / True or False / True or False).
        planner: who plans each layer: ``"hiermoe"`` (the dedup-aware swap planner, ``plan_swaps``), ``"eplb"``,
            ``"smartmoe"`` (load-balancing baselines), ``"none"`` (keep the placement), or a callable
            ``planner(request: PlanRequest) -> SwapPlan`` (:mod:`hiermoe_lightning.placement.planners`), called on
            one rank per layer with the layer's window, placement, topology, link costs and the options above; it
            must be deterministic and, with a spawn launcher, picklable.
        plan_in_background: run the search on a planning thread of the owner rank while training goes on (one
            torch intra-op thread, so it never takes the compute threads' pool); the plan made from the statistics of
            step ``S`` is applied after step ``S + plan_lag_steps``, on every rank alike (the step waits there only
            if the search has not finished). False: the step that plans waits for the search.
        plan_lag_steps: steps between a background plan's statistics and its application (an int >= 1; at most the
            plan interval).
        charge_planning: the pay-off gate: a layer's plan is applied only if its predicted saving over the horizon
            exceeds its migration (with ``charge_migration``) plus the measured time training spent on its planning
            (the wall time of an inline search; in the background the time the step waited for it, as the thread runs
            at the lowest priority in time training leaves idle), whatever the planner; None: the same as
            ``charge_migration``. Pass False with a load-balancing planner (``"eplb"``, ``"smartmoe"``) whose plans
            aim at a compute balance the all-to-all cost model does not price.
        back_off: judge every plan that moved experts on the routing that followed it; when swaps did not pay (or a
            plan kept none) double the interval between plans (up to ``max_plan_interval``) and halve the swap budget,
            when they paid walk both back to ``plan_every_n_steps`` and ``max_swaps_per_plan``.
        max_plan_interval: the longest interval back-off may reach (an int >= plan_every_n_steps; None: 8 x
            ``plan_every_n_steps``).
        overlap_migration: the experts a plan moves leave at the step boundary, and the move is committed only when
            something needs them (the first forward of a migrating layer, a checkpoint, the next plan), so loading
            the next batch and the layers before it run while they travel. False: the step that applies a plan waits
            for the whole migration. The same training either way.

    Every argument is checked at construction: a ``TypeError`` (wrong type; flags must be real bools) or
    ``ValueError`` (out of range) names it and what it allows. The state Lightning checkpoints is complete
    (:meth:`state_dict`): a fit resumed from any checkpoint plans, migrates and logs exactly like the uninterrupted one.
    """

    def __init__(
        self,
        plan_every_n_steps: int = 50,
        swap: bool = True,
        max_swaps_per_plan: int = 4,
        gamma: float | None = 10.0,
        window_tokens_per_rank: int = 4096,
        window_decay: float = 0.9,
        sample_tokens_per_rank: int = 512,
        charge_migration: bool = True,
        compute_balance_tolerance: float | None = 1.10,
        log_every_n_steps: int = 1,
        print_summary: bool = True,
        save_plots: bool = True,
        planner: PlannerArg = "hiermoe",
        plan_in_background: bool = True,
        plan_lag_steps: int = 2,
        charge_planning: bool | None = None,
        back_off: bool = True,
        max_plan_interval: int | None = None,
        overlap_migration: bool = True,
    ):
        super().__init__(log_every_n_steps=log_every_n_steps, print_summary=print_summary)
        self.plan_every_n_steps = check_int(plan_every_n_steps, "plan_every_n_steps", 1)
        self.swap = check_bool_arg("swap", swap)
        self.max_swaps_per_plan = check_int(max_swaps_per_plan, "max_swaps_per_plan", 0)
        self.gamma = check_number_arg("gamma", gamma, low=1.0, allow_none="plain max")
        self.window_tokens_per_rank = check_int(window_tokens_per_rank, "window_tokens_per_rank", 1)
        self.window_decay = check_number_arg("window_decay", window_decay, low=0.0, low_open=True, high=1.0)
        self.sample_tokens_per_rank = check_int(sample_tokens_per_rank, "sample_tokens_per_rank", 1)
        self.charge_migration = check_bool_arg("charge_migration", charge_migration)
        self.compute_balance_tolerance = check_number_arg("compute_balance_tolerance", compute_balance_tolerance,
                                                          low=1.0, allow_none="no guard")
        self.save_plots = check_bool_arg("save_plots", save_plots)
        self.planner = planner
        self._planner = resolve_planner(planner)  # a bad name or type raises here, before any collective
        self.plan_in_background = check_bool_arg("plan_in_background", plan_in_background)
        self.plan_lag_steps = check_int(plan_lag_steps, "plan_lag_steps", 1)
        self.charge_planning = self.charge_migration if charge_planning is None else check_bool_arg(
            "charge_planning", charge_planning)
        self.back_off = check_bool_arg("back_off", back_off)
        self._backoff = BackOff(self.plan_every_n_steps,
                                8 * self.plan_every_n_steps if max_plan_interval is None else max_plan_interval,
                                self.max_swaps_per_plan)
        self.max_plan_interval = self._backoff.max_interval
        self.overlap_migration = check_bool_arg("overlap_migration", overlap_migration)
        self._migrating: MigrationInFlight | None = None  # the last plan's migration, until its stats are counted
        self._interval = self.plan_every_n_steps  # optimizer steps between plans now (back-off changes it)
        self._swap_budget = self.max_swaps_per_plan  # swaps per layer and plan now (back-off changes it)
        self._next_plan_step = self.plan_every_n_steps
        self._inflight: _InFlight | None = None
        self._restore_inflight: dict | None = None  # a checkpoint's plan in flight, restarted at on_train_start
        self._last_change: dict | None = None  # the last plan that moved experts, until the next plan judges it
        self.recent: dict[str, RoutingWindow] = {}  # routing since the last plan that moved experts
        self.realised: list[dict] = []  # one entry per judged plan: predicted vs realised saving and net gain
        self.blocked_seconds = 0.0  # time training steps waited for planning, sharing plans and applying them
        self.stats_seconds = 0.0  # time training steps spent sampling, gathering and ingesting routing statistics
        self.plan_started_steps: list[int] = []
        self.plan_applied_steps: list[int] = []
        self.windows: dict[str, RoutingWindow] = {}
        self.swaps_total = 0
        self.history: list[PlanRecord] = []  # one entry per (plan, layer)
        self.load_history: list[list[list[float]]] = []  # per plan/log point: per layer, per rank expert pairs
        self.plan_seconds = 0.0
        self.migration_seconds = 0.0  # time training steps spent on migrations (posting, waiting, committing)
        self.migration_wall_seconds = 0.0  # start to commit of every migration (training ran in between)
        self._last_step = -1  # the optimizer step of the last batch end (gradient accumulation: plan once per step)
        self._tokens_scale = 1.0  # tokens per rank / sampled tokens of the last batch (the migration horizon)
        # the gather in flight: (layer names in order, [(names of one ExpertParallel, its handle)]); _complete_pending
        self._pending: tuple[list[str], list[tuple[list[str], PendingRoutings]]] | None = None
        self._module = None  # the LightningModule (setup), whose layers state_dict() reads
        # restored by load_state_dict, applied to the sharded layers at on_train_start: {name: layer state}
        self._restore: dict[str, dict] | None = None

    # ------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict:
        """Everything a later plan, migration or metric reads: the windows (with every batch seen so far), the swap
        count, the history, the timings, the last optimizer step seen (a resume inside a gradient-accumulation cycle
        must not plan that step again), the migration horizon's token scale, and each sharded layer's placement and
        ``dispatch="auto"`` state (its chosen depth, the forwards since it chose, its predictions).

        Completes the gather still in flight first, so a checkpoint saved right after a step holds that step's
        sample. Lightning calls this on every rank when it saves a checkpoint; even on one rank alone it would only
        wait for a gather that every rank has already posted (it needs nothing more from the others).
        """
        self._complete_pending()
        state = super().state_dict()
        state.update({
            "windows": {name: w.state_dict() for name, w in self.windows.items()},
            "swaps_total": self.swaps_total, "history": json.dumps([r.to_dict() for r in self.history]),
            "load_history": json.dumps(self.load_history),
            "plan_seconds": self.plan_seconds, "migration_seconds": self.migration_seconds,
            "migration_wall_seconds": self.migration_wall_seconds,
            "last_step": self._last_step, "tokens_scale": self._tokens_scale,
            "layers": self._layer_states(),
            "schedule": {"interval": self._interval, "swap_budget": self._swap_budget,
                         "next_plan_step": self._next_plan_step},
            "inflight": self._inflight.state_dict() if self._inflight is not None else self._restore_inflight,
            "last_change": self._last_change,
            "recent": {name: w.state_dict() for name, w in self.recent.items()},
            "realised": json.dumps(self.realised), "blocked_seconds": self.blocked_seconds,
            "stats_seconds": self.stats_seconds,
            "plan_started_steps": list(self.plan_started_steps), "plan_applied_steps": list(self.plan_applied_steps),
        })
        return state

    @override
    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self._pending = None  # a gather of the pre-load run must not reach the restored windows
        self.windows = {}
        for name, ws in state.get("windows", {}).items():
            w = RoutingWindow(self.window_tokens_per_rank, self.window_decay)
            w.load_state_dict(ws)
            self.windows[name] = w
        self.swaps_total = int(state.get("swaps_total", 0))
        self.history = [PlanRecord.from_dict(r) for r in json.loads(state.get("history", "[]"))]
        self.load_history = json.loads(state.get("load_history", "[]"))
        self.plan_seconds = float(state.get("plan_seconds", 0.0))
        self.migration_seconds = float(state.get("migration_seconds", 0.0))
        self.migration_wall_seconds = float(state.get("migration_wall_seconds", 0.0))
        self._last_step = int(state.get("last_step", -1))
        self._tokens_scale = float(state.get("tokens_scale", 1.0))
        self._restore = state.get("layers") or None
        schedule = state.get("schedule")
        if schedule is None:  # a checkpoint of a version without back-off: plans at multiples of the interval
            self._interval, self._swap_budget = self.plan_every_n_steps, self.max_swaps_per_plan
            self._next_plan_step = (max(self._last_step, 0) // self.plan_every_n_steps + 1) * self.plan_every_n_steps
        else:
            self._interval, self._swap_budget = int(schedule["interval"]), int(schedule["swap_budget"])
            self._next_plan_step = int(schedule["next_plan_step"])
        self._inflight = None
        self._restore_inflight = state.get("inflight") or None
        self._last_change = state.get("last_change") or None
        self.recent = {}
        for name, ws in (state.get("recent") or {}).items():
            w = RoutingWindow(self.window_tokens_per_rank, 1.0)
            w.load_state_dict(ws)
            self.recent[name] = w
        self.realised = json.loads(state.get("realised", "[]"))
        self.blocked_seconds = float(state.get("blocked_seconds", 0.0))
        self.stats_seconds = float(state.get("stats_seconds", 0.0))
        self.plan_started_steps = [int(s) for s in state.get("plan_started_steps", [])]
        self.plan_applied_steps = [int(s) for s in state.get("plan_applied_steps", [])]

    def _layer_states(self) -> dict[str, dict]:
        """Each sharded MoE layer's placement and ``auto`` dispatch state (plain tensors, ints and strings); those
        restored but not applied yet, if a checkpoint is written before training starts."""
        if self._restore:  # loaded, not applied yet: still the state to carry on
            return dict(self._restore)
        if self._module is not None:
            settle_migrations(self._module)  # the placements a checkpoint holds are those the experts have
        layers = {n: m for n, m in moe_layers(self._module).items() if m.is_sharded} if self._module is not None else {}
        return {name: {"expert_to_rank": m.placement.expert_to_rank.clone(),
                       "expert_to_slot": m.placement.expert_to_slot.clone(),
                       "world_size": m.placement.world_size, "num_experts": m.num_experts,
                       "dispatch": m.dispatch, "auto_calls": m.auto_calls,
                       "auto_predictions": json.dumps(m.auto_predictions)}
                for name, m in layers.items()}

    @override
    def setup(self, trainer, pl_module, stage):
        self._module = pl_module

    @override
    def on_train_start(self, trainer, pl_module):
        super().on_train_start(trainer, pl_module)
        self._module = pl_module
        restore, self._restore = self._restore, None
        if restore:
            self._restore_layers(trainer, pl_module, restore)
        inflight, self._restore_inflight = self._restore_inflight, None
        if inflight:
            self._restart_plan(pl_module, inflight)

    def _restart_plan(self, pl_module, saved: dict) -> None:
        """Start again the plan a checkpoint had in flight, from its saved inputs (planners are deterministic, so
        it gives the plan the uninterrupted run applied, at the same step). Dropped when the sharded layers or their
        placements differ from the saved ones (a resume on another world size or model)."""
        layers = {n: m for n, m in moe_layers(pl_module).items() if m.is_sharded}
        inputs = saved["inputs"]
        if list(inputs) != list(layers):
            return
        for name, layer in layers.items():
            rank = torch.as_tensor(inputs[name]["expert_to_rank"]).long()
            if rank.numel() != layer.num_experts or int(torch.as_tensor(inputs[name]["expert_ids"]).shape[0]) != \
                    layer.placement.world_size:
                return
            if Placement(rank, torch.as_tensor(inputs[name]["expert_to_slot"]).long(),
                         layer.placement.world_size) != layer.placement:
                return
        self._inflight = _InFlight(step=int(saved["step"]), apply_step=int(saved["apply_step"]),
                                   interval=int(saved["interval"]), tokens_scale=float(saved["tokens_scale"]),
                                   inputs=inputs, jobs=self._submit(layers, inputs))

    @torch.no_grad()
    def _restore_layers(self, trainer, pl_module, restore: dict) -> None:
        """Put every sharded layer back where the checkpoint's run had it: migrate (weights and the optimizer state
        loaded under another placement move with their experts) to the saved placement, then set the saved ``auto``
        state, so the next forwards dispatch and the next plans start from exactly the uninterrupted run's state.

        Lightning restores a DDP-style strategy's checkpoint *before* the strategy shards the model, so a placement
        restored there is lost and the experts come back contiguous. Skipped for a layer resumed on another world
        size or expert count (its windows start afresh too). Collective: every rank runs it (``on_train_start``)."""
        layers = {n: m for n, m in moe_layers(pl_module).items() if m.is_sharded}
        fits = {n: s for n, s in restore.items()
                if n in layers and int(s["world_size"]) == layers[n].placement.world_size
                and int(s["num_experts"]) == layers[n].num_experts}
        changed = []
        for name, saved in fits.items():
            layer = layers[name]
            target = Placement(torch.as_tensor(saved["expert_to_rank"]).long(),
                               torch.as_tensor(saved["expert_to_slot"]).long(), layer.placement.world_size)
            if target != layer.placement:
                changed.append((layer, target))
        if changed:
            optimizer = trainer.optimizers[0] if trainer.optimizers else None
            migrate_([c[0] for c in changed], [c[1] for c in changed], optimizer)
        for name, saved in fits.items():
            layer = layers[name]
            ep = layer.expert_parallel
            names = {"auto"} | {f"hd{d}" for d in range(1, ep.topology.num_levels + 1)}
            if ep.dispatch == "auto" and saved.get("dispatch") in names:
                layer.dispatch = saved["dispatch"]
                layer.auto_calls = int(saved["auto_calls"])
                layer.auto_predictions = json.loads(saved.get("auto_predictions") or "{}")

    # ------------------------------------------------------------------ per batch
    def _sample(self, ids: torch.Tensor) -> torch.Tensor:
        T = ids.shape[0]
        if T <= self.sample_tokens_per_rank:
            return ids
        idx = torch.linspace(0, T - 1, self.sample_tokens_per_rank).round().long()
        return ids[idx]

    def _post_samples(self, layers: dict) -> None:
        """Post this batch's gather: each layer's sample (``[<= sample_tokens_per_rank, K]``) from every rank, one
        fixed-size asynchronous ``all_gather`` per ExpertParallel for all its layers; :meth:`_complete_pending`
        finishes it. Any earlier gather must have been completed (windows are fed in step order)."""
        assert self._pending is None, "the previous routing gather was not completed"
        handles = []
        for ep, members in _by_expert_parallel(layers):
            names = [name for _, name, _ in members]
            samples = [self._sample(layers[n].last_expert_ids) for n in names]
            for n, sample in zip(names, samples):
                self._tokens_scale = layers[n].last_expert_ids.shape[0] / max(sample.shape[0], 1)
            handles.append((names, ep.start_gather_routings(samples, self.sample_tokens_per_rank)))
        self._pending = (list(layers), handles)

    def _complete_pending(self) -> None:
        """Wait for the posted gather, if any, and ingest each layer's ``[G, T, K]`` into its window (in the order the
        layers were posted). Runs at the next batch end before the next post, before planning, in
        :meth:`state_dict` and at the end of training, so the windows see every batch in step order."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        order, handles = pending
        traces = {}
        for names, handle in handles:
            traces.update(zip(names, handle.wait()))
        for name in order:
            trace = traces[name]
            self._window(self.windows, name, trace.shape[0], self.window_decay).ingest(trace)
            if self._last_change is not None and name in self._last_change["before"]:  # to judge that plan later
                self._window(self.recent, name, trace.shape[0], 1.0).ingest(trace)

    def _window(self, windows: dict, name: str, world_size: int, decay: float) -> RoutingWindow:
        """``windows[name]``, made afresh when missing or holding another world size's routing (a resume on another
        world size: per-rank statistics start afresh)."""
        window = windows.get(name)
        if window is None or window.world_size not in (None, world_size):
            window = windows[name] = RoutingWindow(self.window_tokens_per_rank, decay)
        return window

    @override
    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self._count_migration()  # the last plan's migration: committed by this batch's forward
        start = time.perf_counter()
        layers = {n: m for n, m in moe_layers(pl_module).items() if m.is_sharded and m.last_expert_ids is not None}
        self._complete_pending()  # the previous batch's sample, ingested before this batch's
        step = trainer.global_step
        if layers and self._sample_needed(step):
            self._post_samples(layers)  # completed at the next batch end (or below, before a plan)
        self.stats_seconds += time.perf_counter() - start
        if step == self._last_step:  # still inside a gradient-accumulation cycle
            return
        self._last_step = step
        if self._inflight is not None and step >= self._inflight.apply_step:
            self._finish_plan(trainer, pl_module, layers)
        if (self.swap and layers and step > 0 and self._inflight is None and step >= self._next_plan_step
                and self.max_swaps_per_plan > 0 and self._windows_ready(layers)):
            # this batch's sample stays in flight (the next batch end ingests it): waiting for it here would put a
            # synchronous gather on the step; the plan sees every batch up to the previous one
            self._start_plan(trainer, layers)
            if not self.plan_in_background:
                self._finish_plan(trainer, pl_module, layers)
        pl_module.log("swaps", float(self.swaps_total), prog_bar=True, logger=False, rank_zero_only=True)
        for logger in trainer.loggers:
            logger.log_metrics({"hiermoe/swaps": float(self.swaps_total)}, step=step)

    def _windows_ready(self, layers: dict) -> bool:
        """Every layer has routing statistics of the current world size (after a resume on another world size the
        restored windows are stale until this world's first samples arrive; the plan then waits a step)."""
        for name, layer in layers.items():
            window = self.windows.get(name)
            if window is None or window.world_size != layer.placement.world_size:
                return False
        return True

    def _sample_needed(self, step: int) -> bool:
        """Whether the batch ending optimizer step ``step`` can still be in the window at the next plan. The window
        keeps the newest ``window_tokens_per_rank`` tokens per rank and every batch adds ``sample_tokens_per_rank``
        (when a rank has that many), so only the ``ceil(window / sample)`` steps before a plan's own reach it (the
        plan step's sample is still in flight when it plans, and is gathered too): the earlier ones are not gathered
        (the same window, exactly; after a back-off most steps gather nothing).
        A rule of the options and the schedule alone, so every rank posts the same gathers. Without swaps, and while
        a plan is in flight (its verdict may shorten the interval): every batch."""
        if not self.swap or self._inflight is not None:  # in flight: the next plan step is not known yet
            return True
        reach = -(-self.window_tokens_per_rank // self.sample_tokens_per_rank)
        return step >= self._next_plan_step - reach  # a plan uses the batches before its own (still in flight)

    # ------------------------------------------------------------------ planning: start, beside training, finish
    def _lag(self) -> int:
        """Optimizer steps between a plan's statistics and its migration: ``plan_lag_steps`` (at most the interval),
        0 when planning blocks the step."""
        return min(self.plan_lag_steps, self._interval) if self.plan_in_background else 0

    def _start_plan(self, trainer, layers: dict) -> None:
        """Snapshot every layer's plan inputs (on every rank: they go into checkpoints), start the jobs this rank
        owns, and schedule their application ``_lag()`` steps later."""
        self._count_migration()  # the plan reads the placements: the last migration must have landed
        start = time.perf_counter()
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        step = trainer.global_step
        inputs = {name: self._layer_inputs(name, layer, optimizer) for name, layer in layers.items()}
        jobs = self._submit(layers, inputs)
        self._inflight = _InFlight(step=step, apply_step=step + self._lag(), interval=self._interval,
                                   tokens_scale=self._tokens_scale, inputs=inputs, jobs=jobs)
        self._next_plan_step = step + self._interval
        self.plan_started_steps.append(step)
        inline = 0.0 if self.plan_in_background else sum(job.wall_seconds for job in jobs.values())
        self.blocked_seconds += time.perf_counter() - start - inline  # snapshots (an inline search counts on wait)

    def _layer_inputs(self, name: str, layer, optimizer) -> dict:
        """One layer's plan inputs as plain tensors and numbers (a checkpoint holds them while a plan is in flight):
        its window, placement, the swap budget, migration bytes and horizon, and, when its last plan moved experts,
        the placement before that plan and the routing seen since (to judge whether it paid)."""
        ids, weights = self.windows[name].trace()
        placement = layer.placement
        out = {"expert_ids": ids, "token_weights": weights, "expert_to_rank": placement.expert_to_rank.clone(),
               "expert_to_slot": placement.expert_to_slot.clone(), "max_swaps": self._swap_budget,
               "expert_bytes": float(expert_state_bytes(layer, optimizer)),
               "horizon_steps": max(1, round(self._interval * a2as_per_step(self._tokens_scale)))}
        before = (self._last_change or {}).get("before", {}).get(name)
        recent = self.recent.get(name)
        if before is not None and recent is not None and recent.world_size == placement.world_size:
            before_rank = torch.as_tensor(before[0]).long()
            if before_rank.numel() == layer.num_experts and int(before_rank.max()) < placement.world_size:
                # (not after a resume on another world size)
                out["recent_ids"], out["recent_weights"] = recent.trace()
                out["before_rank"], out["before_slot"] = before_rank, torch.as_tensor(before[1]).long()
        return out

    def _request(self, inputs: dict, layer) -> PlanRequest:
        """The planner's :class:`PlanRequest` for one layer from its :meth:`_layer_inputs`."""
        ep = layer.expert_parallel
        charge = self.charge_migration
        return PlanRequest(
            inputs["expert_ids"], inputs["token_weights"],
            Placement(inputs["expert_to_rank"], inputs["expert_to_slot"], layer.placement.world_size),
            ep.topology, ep.link_costs, layer.hidden_size, layer.experts.w_gate.element_size(),
            max_swaps=int(inputs["max_swaps"]), gamma=self.gamma,
            expert_bytes=inputs["expert_bytes"] if charge else None,
            horizon_steps=int(inputs["horizon_steps"]) if charge else None,
            compute_balance_tolerance=self.compute_balance_tolerance)

    def _submit(self, layers: dict, inputs: dict) -> dict[int, PlanningJob]:
        """Start the jobs this rank owns: the ``j``-th layer of an ExpertParallel is planned by its rank
        ``j % world_size`` of the first replica (deterministic functions, so the owner's plan is everyone's)."""
        jobs = {}
        for ep, members in _by_expert_parallel(layers):
            for j, (i, name, layer) in enumerate(members):
                if j % ep.world_size == ep.rank and ep.replica_index == 0:
                    job = functools.partial(_plan_layer_job, self._planner, self._request(inputs[name], layer),
                                            inputs[name])
                    jobs[i] = PlanningJob(job, background=self.plan_in_background)
        return jobs

    def _collect(self, layers: dict, jobs: dict[int, PlanningJob]) -> dict[int, tuple[LayerPlan, float]]:
        """Every layer's ``(plan, planning seconds, seconds the step waited for it)``, the same on every rank: the
        owners wait for their jobs, then one ``all_gather_object`` per ExpertParallel shares them. A planning error
        is shared and raised on every rank (no hang). Planning seconds: the job's CPU time in the background, its
        wall time inline; the wait: what the training step spent on the search (inline: all of it)."""
        outcomes: dict[int, tuple[bool, object, float, float]] = {}
        owners: dict[int, int] = {}
        for ep, members in _by_expert_parallel(layers):
            mine = {}
            for j, (i, name, layer) in enumerate(members):
                owners[i] = j % ep.world_size
                if i in jobs:
                    ok, payload = jobs[i].wait()
                    self.blocked_seconds += jobs[i].waited_seconds
                    seconds = jobs[i].cpu_seconds if self.plan_in_background else jobs[i].wall_seconds
                    mine[i] = (ok, payload, seconds, jobs[i].waited_seconds)
            for shared in ep.all_gather_object(mine):
                outcomes.update(shared)
        names = list(layers)
        failed = [f"layer {i} ({names[i]}) on expert-parallel rank {owners[i]}: {msg}"
                  for i, (ok, msg, _, _) in sorted(outcomes.items()) if not ok]
        if failed:
            raise RuntimeError("HierMoECallback: planning failed for " + "; ".join(failed))
        return {i: (payload, seconds, waited) for i, (_, payload, seconds, waited) in outcomes.items()}

    def _plan_layers(self, layers: dict, optimizer) -> dict[int, LayerPlan]:
        """Plan every layer now (blocking) and return the plans by layer index, the same on every rank."""
        inputs = {name: self._layer_inputs(name, layer, optimizer) for name, layer in layers.items()}
        return {i: plan for i, (plan, _, _) in self._collect(layers, self._submit(layers, inputs)).items()}

    def _finish_plan(self, trainer, pl_module, layers: dict) -> None:
        """Apply the plan in flight after its step: collect the plans, refuse those that do not pay (their saving
        over the horizon must exceed migration plus planning), migrate the rest, judge the previous plan on the
        routing seen since it was applied, set the next interval and budget, log it all."""
        inflight, self._inflight = self._inflight, None
        if set(inflight.inputs) != set(layers):  # the model's sharded layers changed under the plan: drop it
            return
        start = time.perf_counter()
        outcomes = self._collect(layers, inflight.jobs)
        step = trainer.global_step
        horizon = inflight.interval * a2as_per_step(inflight.tokens_scale)
        targets, records, loads, kept = [], [], [], {}
        for i, (name, layer) in enumerate(layers.items()):
            plan, seconds, waited = outcomes[i]
            self.plan_seconds += seconds
            planning_ms = 1000.0 * waited if self.charge_planning else 0.0  # what the steps spent on it
            migration_ms = plan.migration_ms if self.charge_migration else 0.0
            net = net_gain_ms(plan.predicted_ms_before - plan.predicted_ms_after, horizon, migration_ms, planning_ms)
            refused = 0
            if self.charge_planning and plan.swaps and net <= 0.0:  # the pay-off gate
                refused, plan = len(plan.swaps), plan.kept_nothing(layer.placement)
            if plan.swaps:
                kept[name] = (plan, planning_ms, migration_ms, layer.placement)
            targets.append(plan.placement(layer.placement.world_size))
            loads.append(list(plan.load))
            records.append(plan.record(inflight.step, i, name, applied_step=step, planning_seconds=seconds,
                                       refused_swaps=refused))
        verdict = self._judge(outcomes, layers, inflight.step)
        changed = [(layer, target) for layer, target in zip(layers.values(), targets) if target != layer.placement]
        migration_seconds = 0.0  # of this step: posting the migration (its commit is counted when it lands)
        if changed:
            optimizer = trainer.optimizers[0] if trainer.optimizers else None
            self._migrating = start_migration([c[0] for c in changed], [c[1] for c in changed], optimizer)
            migration_seconds = self._migrating.start_seconds
            if not self.overlap_migration:
                migration_seconds += self._count_migration()
            changed[0][0].expert_parallel.refresh_auto(pl_module)  # auto re-chooses at the (settled) next forward
        self._remember_change(kept, step, horizon)
        if self.back_off:
            paid = False if not kept else verdict
            self._interval, self._swap_budget = self._backoff.after(self._interval, self._swap_budget, paid)
        self._next_plan_step = max(inflight.step + self._interval, step)
        self.swaps_total += sum(len(r.swaps) for r in records)
        self.history.extend(records)
        self.load_history.append(loads)
        self.plan_applied_steps.append(step)
        self.blocked_seconds += time.perf_counter() - start - migration_seconds - sum(
            job.waited_seconds for job in inflight.jobs.values())  # sharing and bookkeeping (waits counted already)
        metrics = {f"hiermoe/plan/layer{r.layer}/predicted_ms_{k}": getattr(r, f"predicted_ms_{k}")
                   for r in records for k in ("before", "after")}
        metrics.update({"hiermoe/swap/refused": float(sum(r.refused_swaps for r in records)),
                        "hiermoe/swap/planning_ms": 1000.0 * sum(r.planning_seconds for r in records),
                        "hiermoe/swap/predicted_saving_ms": sum(p.predicted_ms_before - p.predicted_ms_after
                                                                for p, *_ in kept.values()),
                        "hiermoe/swap/plan_interval": float(self._interval),
                        "hiermoe/swap/budget": float(self._swap_budget)})
        if self.realised and self.realised[-1]["judged_at"] == inflight.step:
            last = self.realised[-1]
            metrics.update({"hiermoe/swap/realised_saving_ms": last["realised_saving_ms"],
                            "hiermoe/swap/realised_net_ms": last["realised_net_ms"]})
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    def _judge(self, outcomes: dict, layers: dict, step: int) -> bool | None:
        """Whether the previous plan that moved experts paid: its realised saving per all-to-all (the owners priced
        the placement before and after it on the routing seen since) times the all-to-alls since, against its
        migration and planning charge. None when there is nothing to judge. Recorded in :attr:`realised`."""
        last, self._last_change = self._last_change, None
        if last is None:
            return None
        saving, judged = 0.0, False
        for i, name in enumerate(layers):
            plan = outcomes[i][0]
            if name in last["before"] and plan.realised_ms_before is not None:
                saving += plan.realised_ms_before - plan.realised_ms_after
                judged = True
        if not judged:
            return None
        a2as = max(0, step - last["applied_step"]) * a2as_per_step(self._tokens_scale)
        net = net_gain_ms(saving, a2as, last["migration_ms"], last["planning_ms"])
        self.realised.append({"applied_step": last["applied_step"], "judged_at": step,
                              "predicted_saving_ms": last["predicted_saving_ms"], "realised_saving_ms": saving,
                              "predicted_net_ms": last["predicted_net_ms"], "realised_net_ms": net})
        return net > 0.0

    def _remember_change(self, kept: dict, step: int, horizon: float) -> None:
        """What the next plan needs to judge this one (``kept``: name -> (plan, planning ms, migration ms, placement
        before)): the placement before it of every layer it moved, its predicted saving per all-to-all, migration and
        planning charge; and a fresh record of the routing from now on."""
        self.recent = {}
        if not kept:
            return
        saving = sum(p.predicted_ms_before - p.predicted_ms_after for p, *_ in kept.values())
        planning = sum(c for _, c, _, _ in kept.values())
        migration = sum(m for _, _, m, _ in kept.values())
        self._last_change = {
            "applied_step": step, "predicted_saving_ms": saving, "migration_ms": migration, "planning_ms": planning,
            "predicted_net_ms": net_gain_ms(saving, horizon, migration, planning),
            "before": {name: (before.expert_to_rank.clone(), before.expert_to_slot.clone())
                       for name, (_, _, _, before) in kept.items()}}

    @staticmethod
    def _rank_load(ids: torch.Tensor, weights: torch.Tensor, placement) -> torch.Tensor:
        """``[G]`` weighted (token, expert) pairs each rank's experts would process."""
        w = weights.unsqueeze(-1).expand_as(ids)
        valid = ids >= 0
        ranks = placement.expert_to_rank[ids[valid]]
        return torch.zeros(placement.world_size, dtype=torch.float64).index_add_(0, ranks, w[valid].double())

    def _count_migration(self) -> float:
        """Settle the last plan's migration (a no-op when a forward or checkpoint did already; collective
        otherwise) and count its time: what steps spent on it in :attr:`migration_seconds`, start to commit in
        :attr:`migration_wall_seconds`. Returns the seconds this call itself waited."""
        flight, self._migrating = self._migrating, None
        if flight is None:
            return 0.0
        start = time.perf_counter()
        stats = flight.settle()
        self.migration_seconds += stats.exposed_seconds
        self.migration_wall_seconds += stats.seconds
        return time.perf_counter() - start

    # ------------------------------------------------------------------ end of fit
    @override
    def on_train_end(self, trainer, pl_module):
        self._count_migration()  # a plan applied after the last step: its experts land before training ends
        self._complete_pending()  # no collective left in flight once training ends; the windows hold every batch

    @override
    def on_exception(self, trainer, pl_module, exception):
        self._pending = None  # another rank may be gone: drop the gather rather than wait (gloo finishes or fails it)
        self._inflight = None  # planning threads are daemons: they finish on their own, nobody waits for them
        flight, self._migrating = self._migrating, None
        if flight is not None:  # never wait for a peer that may be gone: the old placement stays, whole
            flight.abandon()

    @override
    def teardown(self, trainer, pl_module, stage):
        self._pending = None
        self._count_migration()  # normally counted at on_train_end already
        self._restore = None  # restored by a validate/test: no later fit without a checkpoint may apply it
        self._inflight = self._restore_inflight = None  # a later fit without a checkpoint starts its own plans

    @override
    def on_fit_end(self, trainer, pl_module):
        self._complete_pending()
        log_dir = trainer.log_dir  # collective under DDP
        super().on_fit_end(trainer, pl_module)
        if trainer.global_rank != 0 or not log_dir:
            return
        os.makedirs(log_dir, exist_ok=True)
        with open(os.path.join(log_dir, "hiermoe_placement_history.json"), "w") as f:
            json.dump({"swaps_total": self.swaps_total, "plans": [r.to_dict() for r in self.history],
                       "load_per_rank": self.load_history, "realised": self.realised,
                       "plan_seconds": self.plan_seconds, "migration_seconds": self.migration_seconds,
                       "migration_wall_seconds": self.migration_wall_seconds,
                       "blocked_seconds": self.blocked_seconds, "stats_seconds": self.stats_seconds,
                       "plan_in_background": self.plan_in_background},
                      f, indent=1)
        if self.save_plots and self.load_history:
            self._heatmap(os.path.join(log_dir, "hiermoe_expert_load.png"))

    def _heatmap(self, path: str) -> None:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:  # plots are optional (pip install hiermoe-lightning[plots])
            return
        world = len(self.load_history[-1][0])  # after a resume on another world size, plot the current one only
        load = torch.tensor([h for h in self.load_history if len(h[0]) == world], dtype=torch.float64)  # [plans, L, G]
        share = load / load.sum(-1, keepdim=True).clamp_min(1e-9)
        layers = share.shape[1]
        fig, axes = plt.subplots(1, layers, figsize=(4 * layers, 3), squeeze=False)
        for i in range(layers):
            ax = axes[0][i]
            im = ax.imshow(share[:, i, :].T.numpy(), aspect="auto", cmap="viridis", origin="lower")
            ax.set_title(f"layer {i}: expert load share per rank")
            ax.set_xlabel("plan")
            ax.set_ylabel("rank")
            fig.colorbar(im, ax=ax)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)

    def summary(self, trainer, log_dir: str | None = None) -> str:
        text = super().summary(trainer, log_dir)
        if self.swap:
            where = "CPU s in the background" if self.plan_in_background else "s"
            text += (f"\nexpert swaps                {self.swaps_total} in {len({h.step for h in self.history})} plans "
                     f"(planning {self.plan_seconds:.2f} {where}, migration {self.migration_seconds:.2f} s; "
                     f"plan interval now {self._interval} steps)")
            if self.history:
                first = [h for h in self.history if h.step == self.history[0].step]
                last = [h for h in self.history if h.step == self.history[-1].step]
                before = sum(h.predicted_ms_before for h in first)
                after = sum(h.predicted_ms_after for h in last)
                text += f"\npredicted a2a ms (all layers) {before:.3f} at the first plan -> {after:.3f} after the last"
            if self.load_history:
                def imbalance(loads):  # mean over layers of max/mean expert load per rank
                    t = torch.tensor(loads, dtype=torch.float64)
                    return float((t.max(-1).values / t.mean(-1).clamp_min(1e-9)).mean())

                text += (f"\nexpert load imbalance        {imbalance(self.load_history[0]):.3f} at the first plan -> "
                         f"{imbalance(self.load_history[-1]):.3f} at the last (max/mean over ranks)")
            if self.realised:
                paid = sum(r["realised_net_ms"] > 0 for r in self.realised)
                text += (f"\nswaps that paid             {paid} of {len(self.realised)} judged plans (realised saving "
                         f"{sum(r['realised_saving_ms'] for r in self.realised):.3f} ms per all-to-all in all, "
                         f"predicted {sum(r['predicted_saving_ms'] for r in self.realised):.3f})")
            if self._start:
                elapsed = max(time.perf_counter() - self._start, 1e-9)
                share = (self.stats_seconds + self.blocked_seconds + self.migration_seconds) / elapsed
                text += (f"\nswap overhead               {100 * share:.2f}% of training time on the critical path "
                         f"(statistics {self.stats_seconds:.2f} s, waiting and sharing {self.blocked_seconds:.2f} s, "
                         f"migration {self.migration_seconds:.2f} s"
                         + (f" of {self.migration_wall_seconds:.2f} s start to commit"
                            if self.overlap_migration else "") + ")")
                if self.plan_in_background:
                    text += f" (+ {100 * self.plan_seconds / elapsed:.2f}% CPU in the background)"
        return text
