"""HierMoEStrategy: DDP for the dense parameters, expert parallelism (hierarchical dedup all-to-all) for the experts.

Registered as ``"hiermoe"`` in Lightning's StrategyRegistry when ``hiermoe_lightning`` is imported.

What it adds to DDPStrategy, so that N ranks train exactly like one process on the same global batch:

* shards every MoELayer of the LightningModule with ExpertParallel before DDP wraps the model, and makes DDP ignore
  expert parameters (they are not replicas);
* scales expert gradients by ``1 / world_size`` (each expert receives the sum of every rank's gradient, DDP averages
  the dense ones);
* clips gradients by the *global* norm (dense norm + every rank's expert norms), so dense replicas never drift;
* checkpoints hold the full, unsharded model and optimizer state keyed by expert id (portable: loadable into a
  plain single-process model, and resumable on another world size), plus each layer's placement;
* the fork/spawn launchers hand the parent an unsharded state dict it can load.
"""

from __future__ import annotations

import datetime
import logging
import os
import tempfile
from typing import Any, Literal, Mapping, Optional, Union

import torch
import torch.distributed as dist
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher, _WorkerOutput
from lightning.pytorch.trainer.states import TrainerFn
from torch.nn.parallel import DistributedDataParallel

from . import checkpoint as ckpt
from .cost.link_costs import LinkCosts
from .dispatch.engine import validate_pipeline_chunks
from .dispatch.spec import validate_dispatch
from .layer import MoELayer
from .parallel import ExpertParallel
from .topology import Topology
from .validation import check_flag, check_positive_int

__all__ = ["HierMoEStrategy", "register_strategy"]

log = logging.getLogger(__name__)


class HierMoEStrategy(DDPStrategy):
    """Expert-parallel MoE training with hierarchical token deduplication.

    Args:
        topology: expert-parallel layout, e.g. ``"2x2"``; None = ``f"{num_nodes}x{devices}"``. It may differ from the
            physical layout (``"2x2"`` on ``devices=4`` emulates two nodes).
        dispatch: ``"flat" | "2dh" | "hd1" .. "hd<D>" | "auto"``.
        link_costs: preset name or YAML path of the alpha-beta link costs (``auto`` uses them), or ``"calibrate"`` to
            fit them on the live process groups at setup.
        verify_splits: check split agreement before every all-to-all payload (debugging aid).
        auto_interval: with ``dispatch="auto"``, re-choose each layer's depth every this many training forwards.
        pipeline_chunks: run each dispatch as a pipeline of this many token chunks, overlapping one chunk's
            intra-node hop with the next chunk's inter-node transfer (1 = off; results are identical).
        shared_memory: between ranks of one host (and network namespace), CPU payloads of gloo groups go through
            shared memory instead of the loopback socket (False = always the process group; results are identical).
        checkpoint_format: ``"full"`` (one portable file: the unsharded model and optimizer state, loadable into a
            plain single-process model) or ``"sharded"`` (a directory written with torch.distributed.checkpoint:
            every rank writes only its experts; for large models). Both resume on any world size.
        start_method, timeout, process_group_backend, find_unused_parameters, ...: as in DDPStrategy.
    """

    strategy_name = "hiermoe"

    def __init__(
        self,
        topology: Optional[str] = None,
        dispatch: str = "auto",
        link_costs: str = "paper-a6000",
        verify_splits: bool = False,
        auto_interval: int = 50,
        pipeline_chunks: int = 1,
        shared_memory: bool = True,
        checkpoint_format: str = "full",
        accelerator: Optional[Any] = None,
        parallel_devices: Optional[list[torch.device]] = None,
        cluster_environment: Optional[ClusterEnvironment] = None,
        checkpoint_io: Optional[CheckpointIO] = None,
        precision_plugin: Optional[Precision] = None,
        process_group_backend: Optional[str] = None,
        timeout: Optional[Union[float, datetime.timedelta]] = 1800.0,
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
        find_unused_parameters: bool = False,
    ):
        # validate everything that needs no process group now, identically on every rank
        self._topology = Topology.parse(topology) if topology is not None else None
        validate_dispatch(dispatch, self._topology.num_levels if self._topology is not None else 2)
        # "calibrate": fitted on the live process groups at setup (ExpertParallel does it)
        self._link_costs = link_costs if link_costs == "calibrate" else LinkCosts.resolve(link_costs)
        if start_method not in ("popen", "spawn", "fork", "forkserver"):
            raise ValueError(f"start_method must be one of 'popen', 'spawn', 'fork', 'forkserver', got {start_method!r}")
        if isinstance(timeout, (int, float)):
            timeout = datetime.timedelta(seconds=float(timeout))
        super().__init__(
            accelerator=accelerator, parallel_devices=parallel_devices, cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io, precision_plugin=precision_plugin, process_group_backend=process_group_backend,
            timeout=timeout, start_method=start_method, find_unused_parameters=find_unused_parameters,
        )
        self._dispatch = dispatch
        self._verify_splits = verify_splits
        self._auto_interval = check_positive_int(auto_interval, "auto_interval")
        self._pipeline_chunks = validate_pipeline_chunks(pipeline_chunks)
        self._shared_memory = check_flag(shared_memory, "shared_memory")
        if checkpoint_format not in ("full", "sharded"):
            raise ValueError(f"checkpoint_format must be 'full' or 'sharded', got {checkpoint_format!r}")
        self.checkpoint_format = checkpoint_format
        self.expert_parallel: ExpertParallel | None = None
        self._grad_hooks: list = []

    # ------------------------------------------------------------------ registry
    @classmethod
    def register_strategies(cls, strategy_registry) -> None:
        if "hiermoe" not in strategy_registry:
            strategy_registry.register("hiermoe", cls, description="Hierarchical dedup expert parallelism (HierMoE)")

    # ------------------------------------------------------------------ setup
    @property
    def topology(self) -> Topology:
        if self._topology is not None:
            return self._topology
        return Topology([self.num_nodes, len(self.parallel_devices or [None])])

    def _configure_launcher(self) -> None:
        super()._configure_launcher()
        if isinstance(self._launcher, _MultiProcessingLauncher):
            self._launcher = _UnshardedResultLauncher(self, start_method=self._start_method)

    def setup(self, trainer) -> None:
        assert self.accelerator is not None and self.model is not None
        self.accelerator.setup(trainer)
        self._shard_model()
        if trainer.state.fn == TrainerFn.FITTING and self._layer_sync:
            self.model = self._layer_sync.apply(self.model)
        self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        if trainer.state.fn == TrainerFn.FITTING:
            self.configure_ddp()
            self.setup_optimizers(trainer)
        else:
            self._sync_dense_states()
        self.setup_precision_plugin()
        if trainer.state.fn == TrainerFn.FITTING:
            from lightning.fabric.utilities.optimizer import _optimizers_to_device

            _optimizers_to_device(self.optimizers, self.root_device)
        self._install_global_norm_clipping()

    def _shard_model(self) -> None:
        module = self.lightning_module
        layers = [m for m in module.modules() if isinstance(m, MoELayer)]
        if self.expert_parallel is None:
            self.expert_parallel = ExpertParallel(self.topology, dispatch=self._dispatch, link_costs=self._link_costs,
                                                  verify_splits=self._verify_splits, auto_interval=self._auto_interval,
                                                  pipeline_chunks=self._pipeline_chunks,
                                                  shared_memory=self._shared_memory)
        if not layers or all(layer.is_sharded for layer in layers):
            return
        self.expert_parallel.shard_(module)
        scale = 1.0 / self.expert_parallel.world_size
        for layer in layers:
            for p in layer.experts.slot_parameters():
                self._grad_hooks.append(p.register_hook(lambda g, s=scale: g * s))

    def expert_parameter_names(self) -> list[str]:
        return list(ckpt.expert_parameter_names(self.lightning_module))

    def _setup_model(self, model) -> DistributedDataParallel:
        ignore = self.expert_parameter_names()
        ignore += [f"{n}.routed_tokens" if n else "routed_tokens" for n in ckpt.moe_layers(model)]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignore)
        return super()._setup_model(model)

    def _sync_dense_states(self) -> None:
        """Broadcast rank 0's replicated parameters and buffers (never the experts: each rank holds others)."""
        skip = set(self.expert_parameter_names())
        for name, t in list(self.lightning_module.state_dict(keep_vars=True).items()):
            if name not in skip and isinstance(t, torch.Tensor):
                dist.broadcast(t.data, src=0)

    # ------------------------------------------------------------------ gradient clipping by the global norm
    def _install_global_norm_clipping(self) -> None:
        plugin = self.precision_plugin
        if getattr(plugin, "_hiermoe_clipping", False):
            return
        strategy = self

        def clip_grad_by_norm(optimizer, clip_val, norm_type: float = 2.0):
            strategy.clip_by_global_norm(optimizer, float(clip_val))

        # the precision plugin owns clipping in Lightning; route its norm clipping through the global norm
        plugin.clip_grad_by_norm = clip_grad_by_norm
        plugin._hiermoe_clipping = True

    @torch.no_grad()
    def clip_by_global_norm(self, optimizer, max_norm: float) -> torch.Tensor:
        """Clip all gradients by the norm over dense parameters (replicated) and every rank's experts."""
        expert_ids = {id(p) for layer in ckpt.moe_layers(self.lightning_module).values()
                      for p in layer.experts.slot_parameters()}
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        grads = [p.grad for p in params]
        norms = torch._foreach_norm(grads) if grads else []
        is_expert = torch.tensor([id(p) in expert_ids for p in params], dtype=torch.bool)
        squares = torch.stack([n.double() for n in norms]).pow(2) if norms else torch.zeros(0, dtype=torch.float64)
        expert_sq = squares[is_expert].sum()
        dense_sq = squares[~is_expert].sum()
        if self.expert_parallel is not None and self.expert_parallel.world_size > 1:
            dist.all_reduce(expert_sq, group=self.expert_parallel.peer_group("a2a").group)
        total = (dense_sq + expert_sq).sqrt()
        coef = max_norm / (float(total) + 1e-6)
        if coef < 1.0:
            torch._foreach_mul_(grads, coef)
        return total

    # ------------------------------------------------------------------ checkpoints
    def lightning_module_state_dict(self) -> dict[str, Any]:
        """The full unsharded state dict (collective: every rank calls it, as ``trainer.save_checkpoint`` does).

        With ``checkpoint_format="sharded"`` the tensors are written by ``save_checkpoint`` instead (empty here)."""
        if self.checkpoint_format == "sharded":
            return {}
        return ckpt.full_state_dict(self.lightning_module)

    def optimizer_state(self, optimizer) -> dict:
        if self.checkpoint_format == "sharded":
            return {}
        inner = getattr(optimizer, "_optimizer", optimizer)
        return ckpt.full_optimizer_state(self.lightning_module, inner)

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Optional[Any] = None) -> None:
        meta = {"format": self.checkpoint_format, "version": 1, "topology": str(self.topology),
                "placements": ckpt.placement_metadata(self.lightning_module)}
        if self.checkpoint_format == "sharded":
            from .checkpoint_sharded import optimizer_structure, save_sharded

            meta["optimizer_structure"] = optimizer_structure(self.lightning_module, self.optimizers)
            rest = {k: v for k, v in checkpoint.items() if k not in ("state_dict", "optimizer_states")}
            rest["hiermoe"] = meta
            save_sharded(filepath, self.lightning_module, self.optimizers, rest, self.is_global_zero)
            self.barrier("hiermoe_sharded_save")
            return
        checkpoint["hiermoe"] = meta
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    def load_checkpoint(self, checkpoint_path, weights_only: Optional[bool] = None) -> dict[str, Any]:
        from .checkpoint_sharded import is_sharded_checkpoint, load_meta

        if is_sharded_checkpoint(checkpoint_path):
            checkpoint = load_meta(checkpoint_path)
            checkpoint["hiermoe"]["path"] = os.fspath(checkpoint_path)
            checkpoint["state_dict"], checkpoint["optimizer_states"] = {}, []
            return checkpoint
        return super().load_checkpoint(checkpoint_path, weights_only=weights_only)

    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        meta = checkpoint.get("hiermoe", {}) or {}
        ckpt.restore_placements(self.lightning_module, meta.get("placements"))
        if meta.get("format") == "sharded":
            from .checkpoint_sharded import load_sharded_model

            load_sharded_model(meta["path"], self.lightning_module, strict=strict)
            return
        local = ckpt.local_state_dict(self.lightning_module, checkpoint["state_dict"])
        self.lightning_module.load_state_dict(local, strict=strict)

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        from lightning.fabric.utilities.optimizer import _optimizer_to_device

        meta = checkpoint.get("hiermoe", {}) or {}
        if meta.get("format") == "sharded":
            from .checkpoint_sharded import load_sharded_optimizer

            load_sharded_optimizer(meta["path"], self.lightning_module, self.optimizers, meta["optimizer_structure"])
            return
        for optimizer, state in zip(self.optimizers, checkpoint["optimizer_states"]):
            inner = getattr(optimizer, "_optimizer", optimizer)
            inner.load_state_dict(ckpt.local_optimizer_state(self.lightning_module, inner, state))
            _optimizer_to_device(inner, self.root_device)

    def teardown(self) -> None:
        for h in self._grad_hooks:
            h.remove()
        self._grad_hooks.clear()
        super().teardown()


class _UnshardedResultLauncher(_MultiProcessingLauncher):
    """fork/spawn: rank 0 returns the *unsharded* state dict, which the parent's unsharded model can load."""

    def _collect_rank_zero_results(self, trainer, results: Any) -> Optional[_WorkerOutput]:
        checkpoint_callback = trainer.checkpoint_callback
        best_model_path = getattr(checkpoint_callback, "best_model_path", None) if checkpoint_callback else None
        # always the full unsharded state (whatever the checkpoint format): collective, every rank takes part
        state_dict = ckpt.full_state_dict(self._strategy.lightning_module)
        if self._strategy.local_rank != 0:
            return None
        weights_path = None
        if trainer.state.fn == TrainerFn.FITTING:
            weights_path = os.path.join(tempfile.mkdtemp(), ".temp.ckpt")
            self._strategy.checkpoint_io.save_checkpoint(state_dict, weights_path)
        return _WorkerOutput(best_model_path, weights_path, trainer.state, results, self.get_extra_results(trainer))


def register_strategy() -> None:
    """Register ``"hiermoe"`` (idempotent; runs on ``import hiermoe_lightning``)."""
    HierMoEStrategy.register_strategies(StrategyRegistry)
