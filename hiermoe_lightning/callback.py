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

import json
import os
import time

import torch
from typing_extensions import override

from .checkpoint import moe_layers
from .metrics import DedupMonitor
from .validation import check_bool_arg, check_int, check_number_arg
from .parallel import PendingRoutings
from .placement import Placement
from .placement.migrate import expert_state_bytes, migrate_
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
        self.windows: dict[str, RoutingWindow] = {}
        self.swaps_total = 0
        self.history: list[PlanRecord] = []  # one entry per (plan, layer)
        self.load_history: list[list[list[float]]] = []  # per plan/log point: per layer, per rank expert pairs
        self.plan_seconds = 0.0
        self.migration_seconds = 0.0
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
            "last_step": self._last_step, "tokens_scale": self._tokens_scale,
            "layers": self._layer_states(),
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
        self._last_step = int(state.get("last_step", -1))
        self._tokens_scale = float(state.get("tokens_scale", 1.0))
        self._restore = state.get("layers") or None

    def _layer_states(self) -> dict[str, dict]:
        """Each sharded MoE layer's placement and ``auto`` dispatch state (plain tensors, ints and strings); those
        restored but not applied yet, if a checkpoint is written before training starts."""
        if self._restore:  # loaded, not applied yet: still the state to carry on
            return dict(self._restore)
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
            window = self.windows.get(name)
            if window is not None and not window.empty and window.trace(normalize=False)[0].shape[0] != trace.shape[0]:
                window = None  # resumed on another world size: per-rank statistics start afresh
            if window is None:
                window = self.windows[name] = RoutingWindow(self.window_tokens_per_rank, self.window_decay)
            window.ingest(trace)

    @override
    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        layers = {n: m for n, m in moe_layers(pl_module).items() if m.is_sharded and m.last_expert_ids is not None}
        self._complete_pending()  # the previous batch's sample, ingested before this batch's
        if layers:
            self._post_samples(layers)  # completed at the next batch end (or below, before a plan)
        step = trainer.global_step
        if step == self._last_step:  # still inside a gradient-accumulation cycle
            return
        self._last_step = step
        if self.swap and layers and step > 0 and step % self.plan_every_n_steps == 0:
            self._complete_pending()  # the plan sees this batch's sample too
            self._plan_and_migrate(trainer, pl_module, layers)
        pl_module.log("swaps", float(self.swaps_total), prog_bar=True, logger=False, rank_zero_only=True)
        for logger in trainer.loggers:
            logger.log_metrics({"hiermoe/swaps": float(self.swaps_total)}, step=step)

    def _plan_and_migrate(self, trainer, pl_module, layers) -> None:
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        start = time.perf_counter()
        outcomes = self._plan_layers(layers, optimizer)  # identical on every rank
        targets, records, loads = [], [], []
        for i, (name, layer) in enumerate(layers.items()):
            out = outcomes[i]
            targets.append(out.placement(layer.placement.world_size))
            loads.append(list(out.load))
            records.append(out.record(trainer.global_step, i, name))
        self.plan_seconds += time.perf_counter() - start
        changed = [(layer, target) for layer, target in zip(layers.values(), targets) if target != layer.placement]
        if changed:
            stats = migrate_([c[0] for c in changed], [c[1] for c in changed], optimizer)
            self.migration_seconds += stats.seconds
            ep = changed[0][0].expert_parallel
            ep.refresh_auto(pl_module)
        self.swaps_total += sum(len(r.swaps) for r in records)
        self.history.extend(records)
        self.load_history.append(loads)
        metrics = {}
        for r in records:
            metrics[f"hiermoe/plan/layer{r.layer}/predicted_ms_before"] = r.predicted_ms_before
            metrics[f"hiermoe/plan/layer{r.layer}/predicted_ms_after"] = r.predicted_ms_after
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    def _plan_layers(self, layers: dict, optimizer) -> dict[int, LayerPlan]:
        """Every layer's :meth:`_plan_layer` outcome by layer index, the same on every rank: the ``j``-th layer of an
        ExpertParallel is planned by its rank ``j % world_size`` only, then one ``all_gather_object`` per
        ExpertParallel shares the outcomes. A planning error is shared too and raised on every rank (no hang)."""
        outcomes: dict[int, tuple[bool, object]] = {}
        owners: dict[int, int] = {}
        for ep, members in _by_expert_parallel(layers):
            mine = {}
            for j, (i, name, layer) in enumerate(members):
                owners[i] = j % ep.world_size
                if owners[i] == ep.rank and ep.replica_index == 0:  # other replicas get the first one's plans
                    try:
                        mine[i] = (True, self._plan_layer(name, layer, optimizer))
                    except Exception as e:  # noqa: BLE001 - shared, then raised on every rank below
                        mine[i] = (False, f"{type(e).__name__}: {e}")
            for shared in ep.all_gather_object(mine):
                outcomes.update(shared)
        names = list(layers)
        failed = [f"layer {i} ({names[i]}) on expert-parallel rank {owners[i]}: {msg}"
                  for i, (ok, msg) in sorted(outcomes.items()) if not ok]
        if failed:
            raise RuntimeError("HierMoECallback: planning failed for " + "; ".join(failed))
        return {i: payload for i, (_, payload) in outcomes.items()}

    def _plan_request(self, name: str, layer, optimizer) -> PlanRequest:
        """What the planner sees for one layer: its window (tokens and weights), placement, topology, link costs and
        row size, and the callback's options (with ``charge_migration``: the bytes one expert's migration moves and
        the horizon over which a saving counts)."""
        ep = layer.expert_parallel
        ids, weights = self.windows[name].trace()
        return PlanRequest(
            ids, weights, layer.placement, ep.topology, ep.link_costs, layer.hidden_size,
            layer.experts.w_gate.element_size(), max_swaps=self.max_swaps_per_plan, gamma=self.gamma,
            expert_bytes=expert_state_bytes(layer, optimizer) if self.charge_migration else None,
            horizon_steps=self._horizon() if self.charge_migration else None,
            compute_balance_tolerance=self.compute_balance_tolerance,
        )

    def _plan_layer(self, name: str, layer, optimizer) -> LayerPlan:
        """One layer's plan by the planner on its window (:meth:`_plan_request`), checked (:func:`check_plan`), as
        plain values (small, picklable): swaps, predicted times, chosen dispatches, the placement after and the
        ``[G]`` load per rank under the current placement."""
        request = self._plan_request(name, layer, optimizer)
        plan = check_plan(self._planner(request), request)
        return LayerPlan.of(plan, self._rank_load(request.expert_ids, request.token_weights, layer.placement))

    def _horizon(self) -> int:
        """All-to-alls until the next plan, in units of the window's one-way step: every training step runs four
        (dispatch and combine, forward and backward) on all tokens, while the window holds a per-rank sample."""
        return max(1, round(self.plan_every_n_steps * 4 * self._tokens_scale))

    @staticmethod
    def _rank_load(ids: torch.Tensor, weights: torch.Tensor, placement) -> torch.Tensor:
        """``[G]`` weighted (token, expert) pairs each rank's experts would process."""
        w = weights.unsqueeze(-1).expand_as(ids)
        valid = ids >= 0
        ranks = placement.expert_to_rank[ids[valid]]
        return torch.zeros(placement.world_size, dtype=torch.float64).index_add_(0, ranks, w[valid].double())

    # ------------------------------------------------------------------ end of fit
    @override
    def on_train_end(self, trainer, pl_module):
        self._complete_pending()  # no collective left in flight once training ends; the windows hold every batch

    @override
    def on_exception(self, trainer, pl_module, exception):
        self._pending = None  # another rank may be gone: drop the gather rather than wait (gloo finishes or fails it)

    @override
    def teardown(self, trainer, pl_module, stage):
        self._pending = None
        self._restore = None  # restored by a validate/test: no later fit without a checkpoint may apply it

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
                       "load_per_rank": self.load_history,
                       "plan_seconds": self.plan_seconds, "migration_seconds": self.migration_seconds}, f, indent=1)
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
            text += (f"\nexpert swaps                {self.swaps_total} in {len({h.step for h in self.history})} plans "
                     f"(planning {self.plan_seconds:.2f} s, migration {self.migration_seconds:.2f} s)")
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
            if self._start:
                share = (self.plan_seconds + self.migration_seconds) / max(time.perf_counter() - self._start, 1e-9)
                text += f"\nswap overhead               {100 * share:.2f}% of training time"
        return text
