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
* the fork/spawn launchers hand the parent an unsharded state dict it can load;
* faults (docs/reliability.md): SIGTERM stops every rank at the same step boundary with a resumable checkpoint and
  exit status 143; one small all-reduce per optimizer step makes the ranks agree on that and on non-finite losses or
  router logits (``check_finite``); a rank that dies is named in one line (:mod:`.faults.supervisor`); a broken
  checkpoint is named in one line on every rank before any collective reads it.

Where it plugs into Lightning (public or protected seams; every one carries ``@override``):

* ``setup``: shard, tell DDP what to ignore, choose the clipping precision plugin, then ``DDPStrategy.setup``
  unchanged (outside fit its broadcast of rank 0's state skips what DDP ignores: the experts);
* ``Precision.clip_grad_by_norm``: overridden by :class:`GlobalNormClipping`, a subclass of the precision plugin's
  own class chosen once in ``setup`` (see there why not a delegator or the strategy);
* ``optimizer_step``, ``on_train_start``, ``on_train_batch_start``, ``on_exception``, ``teardown``: fault handling;
* ``lightning_module_state_dict``, ``optimizer_state``, ``save_checkpoint``, ``load_checkpoint``,
  ``load_model_state_dict``, ``load_optimizer_state_dict``, ``restore_checkpoint_after_setup``: checkpoints.

Lightning (and torch) internals we rely on -- check these first when Lightning changes (the pin is in
pyproject.toml; tested on the versions named there):

* ``DDPStrategy.setup``'s order: ``accelerator.setup`` (device flags only, not the model), layer sync,
  ``precision_plugin.convert_module``, ``model_to_device``, then ``configure_ddp`` + ``setup_optimizers`` when
  fitting, else ``lightning.pytorch.overrides.distributed._sync_module_states(model)``; both honour
  ``model._ddp_params_and_buffers_to_ignore``, which we set with torch's
  ``DistributedDataParallel._set_params_and_buffers_to_ignore_for_model`` (outside fit, without it, Lightning would
  broadcast rank 0's experts over every rank's own).
* ``Strategy._configure_launcher`` (overridden), ``self._launcher``, ``self._start_method``.
* ``_MultiProcessingLauncher`` (subclassed): ``launch``, ``_wrapping_function``, ``_collect_rank_zero_results``
  (a copy of Lightning's with the unsharded state dict), ``get_extra_results``, ``procs``, ``_WorkerOutput``'s
  fields; ``_SubprocessScriptLauncher`` (:mod:`.faults.launchers`): ``_call_children_scripts``, ``procs``,
  ``lightning.fabric.strategies.launchers.subprocess_script._set_num_threads_if_needed``.
* the checkpoint connector keys a precision plugin's state by ``type(plugin).__qualname__`` (so
  :class:`GlobalNormClipping` subclasses keep their base's qualname); ``LightningOptimizer._optimizer``;
  ``lightning.fabric.utilities.optimizer._optimizer_to_device``.
* ``LightningCLI._parse_ckpt_path`` (Lightning >= 2.6), made a no-op by :class:`~hiermoe_lightning.cli.lightning_cli.
  HierMoECLI` so a checkpoint's hyper-parameters never silently replace the configuration (checked instead in the
  public ``before_instantiate_classes``).
"""

from __future__ import annotations

import datetime
import functools
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator, Literal, Mapping, Optional, Union

import torch
import torch.distributed as dist
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher, _WorkerOutput
from lightning.pytorch.trainer.states import TrainerFn
from torch.nn.parallel import DistributedDataParallel
from typing_extensions import override

from . import checkpoint as ckpt
from .checkpoint_files import use_newest_for_last
from .faults import CheckpointError, NonFiniteError, Preempted
from .faults.checkpoint_checks import (check_sharded_checkpoint, explain_state_dict_mismatch, hparam_differences,
                                      load_full_checkpoint)
from .faults.consensus import agree, local_flags
from .faults.launchers import SupervisedScriptLauncher, adopt_supervisor, translate_process_failure
from .faults.supervisor import die_with_parent
from .faults.reports import report_dir_for, write_report
from .faults.signals import StopFlag
from .cost.link_costs import LinkCosts
from .dispatch.engine import validate_overlap_chunks, validate_pipeline_chunks
from .dispatch.spec import validate_dispatch
from .experts import derive_seed
from .balancing import update_routing_biases
from .layer import MoELayer
from .parallel import ExpertParallel
from .placement.migrate import settle_migrations
from .dense_sharding import check_dense_sharding, is_sharded_tensor, local_tensor, shard_dense_
from .replicas import (ReplicaLayout, Replicas, average_over_copies_, build_replicas, check_expert_parallel_size,
                       default_replica_topology)
from .topology import Topology
from .validation import check_flag, check_positive_int

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = ["GlobalNormClipping", "HierMoEStrategy", "materialize_dense_", "register_strategy"]

log = logging.getLogger(__name__)


class HierMoEStrategy(DDPStrategy):
    """Expert-parallel MoE training with hierarchical token deduplication.

    Args:
        topology: expert-parallel layout of one replica, e.g. ``"2x2"``; None = ``f"{num_nodes}x{devices}"`` (with
            ``expert_parallel_size``: :func:`~hiermoe_lightning.replicas.default_replica_topology`). It may differ
            from the physical layout (``"2x2"`` on ``devices=4`` emulates two nodes).
        expert_parallel_size: None = experts sharded over the whole world. Else the world is
            ``world_size // expert_parallel_size`` replicas of that many consecutive ranks (:mod:`.replicas`): experts
            sharded inside each replica, each expert's gradient averaged over its copies in the other replicas (one
            bucketed all-reduce per optimizer step), dense parameters data-parallel over all ranks.
        dense_sharding: ``"ddp"`` (dense parameters replicated, gradients all-reduced by DDP) or ``"fsdp"`` (dense
            parameters, gradients and optimizer state sharded over all ranks with FSDP2, one unit per block:
            :mod:`.dense_sharding`). The experts are expert-parallel either way (not sharded across replicas).
        fsdp_reshard_after_forward: with ``"fsdp"``, free each block's gathered parameters after its forward and
            gather them again for its backward (True: least memory) or keep them to the end of the backward (False:
            one all-gather per block per step instead of two).
        dispatch: ``"flat" | "2dh" | "hd1" .. "hd<D>" | "auto"``.
        link_costs: preset name or YAML path of the alpha-beta link costs (``auto`` uses them), or ``"calibrate"`` to
            fit them on the live process groups at setup.
        verify_splits: check split agreement before every all-to-all payload (debugging aid).
        auto_interval: with ``dispatch="auto"``, re-choose each layer's depth every this many training forwards.
        pipeline_chunks: run each dispatch as a pipeline of this many token chunks, overlapping one chunk's
            intra-node hop with the next chunk's inter-node transfer (1 = off; results are identical).
        overlap_chunks: run each MoE layer's dispatch, experts and combine as one pipeline of this many token chunks,
            so one chunk's experts compute while another's rows travel, forward and backward (1 = off; results
            equal; :mod:`.dispatch.overlap`). Takes the place of ``pipeline_chunks`` where both are set. ``"auto"``:
            chosen per layer by the cost model (:meth:`ExpertParallel.choose_overlap`).
        shared_memory: between ranks of one host (and network namespace), CPU payloads of gloo groups go through
            shared memory instead of the loopback socket (False = always the process group; results are identical).
        check_finite: raise :class:`~hiermoe_lightning.faults.NonFiniteError` on every rank, naming the layer and the
            step, when the loss or a router's logits hold a NaN/Inf, before the optimizer step applies it (one
            reduction per router forward and one small all-reduce per step, shared with the preemption flag).
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
        expert_parallel_size: Optional[int] = None,
        dense_sharding: str = "ddp",
        fsdp_reshard_after_forward: bool = True,
        link_costs: str = "paper-a6000",
        verify_splits: bool = False,
        auto_interval: int = 50,
        pipeline_chunks: int = 1,
        overlap_chunks: Union[int, str] = 1,
        shared_memory: bool = True,
        checkpoint_format: str = "full",
        check_finite: bool = True,
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
        self._expert_parallel_size = check_expert_parallel_size(expert_parallel_size)
        self.dense_sharding = check_dense_sharding(dense_sharding)
        self._fsdp_reshard_after_forward = check_flag(fsdp_reshard_after_forward, "fsdp_reshard_after_forward")
        if self._topology is not None and expert_parallel_size is not None \
                and self._topology.world_size != expert_parallel_size:
            raise ValueError(f"topology {self._topology} describes one replica of {self._topology.world_size} ranks, "
                             f"but expert_parallel_size={expert_parallel_size}: give a topology of "
                             f"{expert_parallel_size} ranks, or leave topology out")
        validate_dispatch(dispatch, self._topology.num_levels if self._topology is not None else 2)
        # "calibrate": fitted on the live process groups at setup (ExpertParallel does it)
        self._link_costs = link_costs if link_costs == "calibrate" else LinkCosts.resolve(link_costs)
        if start_method not in ("popen", "spawn", "fork", "forkserver"):
            raise ValueError(f"start_method must be one of 'popen', 'spawn', 'fork', 'forkserver', got {start_method!r}")
        timeout = _check_timeout(timeout)
        check_flag(verify_splits, "verify_splits")
        check_flag(find_unused_parameters, "find_unused_parameters")
        if process_group_backend is not None and process_group_backend not in ("gloo", "nccl", "mpi", "ucc", "xccl"):
            raise ValueError("process_group_backend must be None (chosen from the device), 'gloo', 'nccl', 'mpi', "
                             f"'ucc' or 'xccl', got {process_group_backend!r}")
        super().__init__(
            accelerator=accelerator, parallel_devices=parallel_devices, cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io, precision_plugin=precision_plugin, process_group_backend=process_group_backend,
            timeout=timeout, start_method=start_method, find_unused_parameters=find_unused_parameters,
        )
        self._dispatch = dispatch
        self._verify_splits = verify_splits
        self._auto_interval = check_positive_int(auto_interval, "auto_interval")
        self._pipeline_chunks = validate_pipeline_chunks(pipeline_chunks)
        self._overlap_chunks = validate_overlap_chunks(overlap_chunks)
        self._shared_memory = check_flag(shared_memory, "shared_memory")
        if checkpoint_format not in ("full", "sharded"):
            raise ValueError(f"checkpoint_format must be 'full' or 'sharded', got {checkpoint_format!r}")
        self.checkpoint_format = checkpoint_format
        self._check_finite = check_flag(check_finite, "check_finite")
        self.expert_parallel: ExpertParallel | None = None
        self.replicas: Replicas | None = None  # set at setup when expert_parallel_size makes replicas
        self._grad_hooks: list = []
        self._stop_flag = StopFlag()
        self._stop_agreed = 0  # the signal every rank agreed to stop for (0: none), set at an optimizer step
        self._checked_layers: dict[str, MoELayer] | None = None  # name -> layer, for the per-step agreement
        self._loading_path: str | None = None
        # failure reports: set by our launchers (fork/spawn: before the ranks start; popen children: from their
        # environment, and they then die with the launcher: adopt_supervisor)
        self._report_dir, self._supervised_child = adopt_supervisor()

    # ------------------------------------------------------------------ registry
    @classmethod
    @override
    def register_strategies(cls, strategy_registry) -> None:
        if "hiermoe" not in strategy_registry:
            strategy_registry.register("hiermoe", cls, description="Hierarchical dedup expert parallelism (HierMoE)")

    # ------------------------------------------------------------------ setup
    @property
    def topology(self) -> Topology:
        """The expert-parallel layout (of one replica when ``expert_parallel_size`` is set)."""
        if self._topology is not None:
            return self._topology
        devices = len(self.parallel_devices or [None])
        if self._expert_parallel_size is not None:
            return Topology.parse(default_replica_topology(self._expert_parallel_size, devices))
        return Topology([self.num_nodes, devices])

    @property
    def expert_parallel_size(self) -> int:
        """Ranks per expert-parallel replica (the world size unless ``expert_parallel_size`` was given)."""
        return self._expert_parallel_size if self._expert_parallel_size is not None else self.world_size

    @override
    def _get_process_group_backend(self) -> str:
        """NCCL (the default on GPUs) joined by gloo for CPU tensors: the host-side collectives -- routing gathers
        for ``auto`` and the swap planner, shared plans, checkpoint metadata -- hold CPU tensors, which NCCL alone
        cannot carry (``"cpu:gloo,cuda:nccl"``, torch's per-device backend string)."""
        backend = super()._get_process_group_backend()
        return "cpu:gloo,cuda:nccl" if backend == "nccl" else backend

    @property
    @override
    def restore_checkpoint_after_setup(self) -> bool:
        """Restore checkpoints into the *sharded* model: the saved placements then take effect before the weights
        and the optimizer state are sliced to this rank's experts (restored earlier, a placement was set on layers
        that were not sharded yet and came back contiguous)."""
        return True

    @override
    def _configure_launcher(self) -> None:
        super()._configure_launcher()
        if isinstance(self._launcher, _MultiProcessingLauncher):
            self._launcher = _UnshardedResultLauncher(self, start_method=self._start_method)
        elif self._start_method == "popen":
            self._launcher = SupervisedScriptLauncher(self, self.cluster_environment, self.num_processes,
                                                      self.num_nodes)

    @override
    def setup(self, trainer: pl.Trainer) -> None:
        """Shard the experts, tell DDP to ignore them, route norm clipping through the global norm, then Lightning's
        ``DDPStrategy.setup`` (precision, device, DDP wrapping and optimizers when fitting; outside fit a broadcast of
        rank 0's parameters and buffers that skips the ignored ones, so every rank keeps its own experts).

        Sharding comes before ``DDPStrategy.setup`` and so before ``accelerator.setup``, which only sets device flags
        and never touches the model; what matters is that it comes before precision conversion, the move to the
        device and DDP wrapping, which it does."""
        self._shard_model()
        self._ignore_experts_in_ddp()
        if self.dense_sharding == "fsdp":
            self._shard_dense()
        self.precision_plugin = GlobalNormClipping.adopt(self.precision_plugin, self)
        super().setup(trainer)

    def _shard_dense(self) -> None:
        """``dense_sharding="fsdp"``: every rank takes rank 0's dense values (as DDP's wrap would), then FSDP2 shards
        them over all ranks (:func:`~hiermoe_lightning.dense_sharding.shard_dense_`); the sharded parameters join
        the ignore list, so nothing broadcasts them outside fit. Once per module (a later validate keeps it)."""
        from torch.distributed.fsdp import FSDPModule
        from lightning.pytorch.overrides.distributed import _sync_module_states

        module = self.lightning_module
        if isinstance(module, FSDPModule):
            return
        if self.world_size > 1:
            _sync_module_states(module)  # dense only: the experts are on the ignore list
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(self.root_device.type, (self.world_size,))
        experts = [p for layer in ckpt.moe_layers(module).values() for p in layer.experts.slot_parameters()]
        shard_dense_(module, mesh, experts, skip=(MoELayer,), reshard_after_forward=self._fsdp_reshard_after_forward)
        ignore = list(getattr(module, "_ddp_params_and_buffers_to_ignore", []))
        ignore += [n for n, p in module.named_parameters() if is_sharded_tensor(p)]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, ignore)

    @override
    def configure_ddp(self) -> None:
        """DDP wraps the model unless ``dense_sharding="fsdp"`` (FSDP2 already owns the dense gradients; the strategy's
        ``training_step`` then calls the LightningModule directly, as Lightning's ModelParallelStrategy does)."""
        if self.dense_sharding == "fsdp":
            return
        super().configure_ddp()

    @override
    @contextmanager
    def tensor_init_context(self, empty_init: Optional[bool] = None) -> Iterator[None]:
        """``trainer.init_module(empty_init=True)`` builds on the meta device (nothing allocated, nothing drawn);
        :meth:`setup` then materialises only what each rank keeps (:meth:`_shard_model`). Otherwise DDP's context."""
        if not empty_init:
            with super().tensor_init_context(empty_init=empty_init):
                yield
            return
        with torch.device("meta"), self.precision_plugin.tensor_init_context():
            yield

    def _shard_model(self) -> None:
        """Shard every MoELayer; materialise what was built on meta (``configure_model`` or
        ``trainer.init_module(empty_init=True)``) on the root device: each MoE layer only this rank's experts, with
        the values of a normal build (:meth:`ExpertParallel.shard_`), then the dense modules
        (:func:`materialize_dense_`; DDP broadcasts rank 0's dense values when it wraps the model)."""
        module = self.lightning_module
        layers = [m for m in module.modules() if isinstance(m, MoELayer)]
        check_dense_materializable(module)  # before any collective: the same verdict on every rank
        if self.expert_parallel is None:
            # checked on every rank before the first collective (new_group): a bad size fails everywhere
            layout = ReplicaLayout.resolve(self._expert_parallel_size, self.world_size)
            if self._expert_parallel_size is None and self.topology.world_size != self.world_size:
                raise ValueError(f"topology {self.topology} has world size {self.topology.world_size} but there are "
                                 f"{self.world_size} ranks: give a topology of {self.world_size} ranks, or set "
                                 f"expert_parallel_size={self.topology.world_size} for "
                                 f"{self.world_size / self.topology.world_size:g} data-parallel replicas")
            self.replicas = build_replicas(layout, self.global_rank) if layout.num_replicas > 1 else None
            self.expert_parallel = ExpertParallel(self.topology, dispatch=self._dispatch, link_costs=self._link_costs,
                                                  verify_splits=self._verify_splits, auto_interval=self._auto_interval,
                                                  pipeline_chunks=self._pipeline_chunks,
                                                  overlap_chunks=self._overlap_chunks,
                                                  shared_memory=self._shared_memory, replicas=self.replicas)
        for layer in layers:
            layer.router.check_finite = self._check_finite
        if layers and not all(layer.is_sharded for layer in layers):
            self.expert_parallel.shard_(module, device=self.root_device)
            scale = 1.0 / self.expert_parallel.world_size
            for layer in layers:
                for p in layer.experts.slot_parameters():
                    self._grad_hooks.append(p.register_hook(lambda g, s=scale: g * s))
        materialize_dense_(module, self.root_device)
        after_shard = getattr(module, "on_after_shard", None)  # the module's seam: e.g. HFCausalLM loads each
        if callable(after_shard):  # rank's pretrained experts here, before the device move, DDP and the optimizers
            after_shard()

    def expert_parameter_names(self) -> list[str]:
        return list(ckpt.expert_parameter_names(self.lightning_module))

    def _ignore_experts_in_ddp(self) -> None:
        """Mark the expert parameters and the ``routed_tokens`` buffers as not replicated, the way DDP reads it
        (``model._ddp_params_and_buffers_to_ignore``): DDP neither averages nor broadcasts them, and outside fit
        Lightning's ``_sync_module_states`` skips them too. Set on the LightningModule before DDP wraps it."""
        model = self.model
        ignore = self.expert_parameter_names()
        ignore += [f"{n}.routed_tokens" if n else "routed_tokens" for n in ckpt.moe_layers(model)]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignore)

    # ------------------------------------------------------------------ preemption and non-finite values
    @override
    def on_train_start(self) -> None:
        super().on_train_start()
        # after Lightning registered its own SIGTERM handler (whose dist.broadcast inside the handler can mismatch
        # the ranks' collectives): ours only raises a flag, read at the next optimizer step
        self._stop_flag.requested = 0
        self._stop_agreed = 0
        self._checked_layers = None
        requeue = self._slurm_requeue_signal()
        if requeue is not None and requeue not in self._stop_flag.signals:
            # Lightning's SLURM handler saves a checkpoint inside the signal handler (collectives at a random point
            # on each rank); here the requeue signal stops at the next step boundary like SIGTERM, then requeues
            self._stop_flag.signals += (requeue,)
        self._stop_flag.install()

    @override
    def optimizer_step(self, optimizer, closure, model=None, **kwargs):
        """The optimizer step, with one agreement among the ranks after the closure (forward and backward) and before
        the parameters change: stop for a signal at the next step boundary; raise on a non-finite loss or router.
        After the step, the aux-loss-free bias update of every router with ``bias_update_rate > 0``
        (:meth:`_update_routing_biases`)."""
        model = model or self.lightning_module
        ran = []  # the closure's verdict: whether this rank's step goes ahead

        def closure_then_agree():
            result = closure()
            self._average_expert_grads_over_replicas()
            self._agree_after_closure(result)
            # automatic optimization: a None result means training_step returned None (backward skipped); in manual
            # optimization the closure returns nothing (as Lightning's MixedPrecision plugin reads it)
            ran.append(result is not None or not getattr(model, "automatic_optimization", True))
            return result

        scaler = getattr(self.precision_plugin, "scaler", None)
        scale = scaler.get_scale() if scaler is not None and self._balanced_layers() else None
        output = super().optimizer_step(optimizer, closure_then_agree, model=model, **kwargs)
        # fp16 with a GradScaler: the scale drops exactly when it found inf/NaN gradients and skipped the step
        taken = bool(ran) and all(ran) and (scale is None or scaler.get_scale() >= scale)
        self._update_routing_biases(taken)
        return output

    def _average_expert_grads_over_replicas(self) -> None:
        """With replicas: each expert's gradient (the sum over its replica's tokens, scaled by ``1 / E``) becomes the
        mean over its copies, i.e. the one-process gradient. After the whole backward (and every accumulated
        micro-batch), before clipping and the step; one bucketed all-reduce over this rank's copies."""
        if self.replicas is None:
            return
        params = [p for layer in self._moe_layers().values() for p in layer.experts.slot_parameters()]
        average_over_copies_(params, self.replicas.copies_group, self.replicas.num_replicas)

    def _balanced_layers(self) -> list[MoELayer]:
        """The MoE layers whose router learns its selection bias (``bias_update_rate > 0``), in model order."""
        return [layer for layer in self._moe_layers().values() if layer.router.bias_update_rate > 0]

    def _moe_layers(self) -> dict[str, MoELayer]:
        """The MoE layers in model order, found once per fit (not a module walk per step)."""
        if self._checked_layers is None:
            self._checked_layers = ckpt.moe_layers(self.lightning_module)
        return self._checked_layers

    def _update_routing_biases(self, step_taken: bool) -> None:
        """Aux-loss-free balancing done by the strategy, for any LightningModule: after every optimizer step, the
        global expert counts of every layer whose ``bias_update_rate > 0`` (its ``routed_tokens`` since the last
        update, summed over all ranks with one all-reduce for all layers together) update its bias identically on
        every rank, and the counts reset (:func:`~hiermoe_lightning.balancing.update_routing_biases`). The counts are
        of the tokens each rank routed, so the global count sums over every rank that trains on its own data: the
        whole world (today also the expert-parallel group). A step skipped on some rank changes no bias (its counts
        carry over to the next step). With gradient accumulation the counts cover every micro-batch of the step.
        ``MoEGPT``'s own per-batch hook stands down under this strategy, so no model is updated twice."""
        layers = self._balanced_layers()
        if not layers:  # the default (rate 0 everywhere): no collective, nothing to do
            return
        distributed = dist.is_available() and dist.is_initialized() and self.world_size > 1
        update_routing_biases(layers, dist.group.WORLD if distributed else None, step_taken=step_taken)

    def _agree_after_closure(self, loss) -> None:
        layers = self._moe_layers()
        routers = [layer.router.take_nonfinite() for layer in layers.values()] if self._check_finite else []
        # kept on the device: the all-reduce below is the step's only host sync
        loss_bad = (~torch.isfinite(loss.detach()).all() if self._check_finite and isinstance(loss, torch.Tensor)
                    else False)
        flags = local_flags(self._stop_flag.requested, loss_bad, routers, self.root_device)
        distributed = dist.is_available() and dist.is_initialized() and self.world_size > 1
        verdict = agree(flags, list(layers) if routers else [], self.global_rank,
                        self.world_size if distributed else 1)
        if verdict.stop_signal:
            self._stop_agreed = verdict.stop_signal
        if verdict.nonfinite:
            step = self.lightning_module.trainer.global_step if self.lightning_module._trainer else None
            where = "; ".join(("the loss" if name == "loss" else f"the router logits of layer '{name}'")
                              + f" on rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}"
                              for name, ranks in verdict.nonfinite.items())
            raise NonFiniteError(f"non-finite values (NaN/Inf) at step {step}: {where}; the optimizer step was not "
                                 f"applied (check_finite=True)")

    @override
    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        if self._stop_agreed:
            self._preempt(self._stop_agreed)

    def _preempt(self, signum: int) -> None:
        """Every rank is here at the same step boundary: write the resumable checkpoint (collective) and stop."""
        trainer = self.lightning_module.trainer
        path = _preemption_checkpoint_path(trainer)
        trainer.save_checkpoint(path)
        if self.is_global_zero:
            log.info("preempted by signal %d at step %d; checkpoint %s", signum, trainer.global_step, path)
            if signum == self._slurm_requeue_signal():
                from .faults.signals import requeue_slurm_job

                log.warning(requeue_slurm_job())
        raise Preempted(trainer.global_step, path, signum)

    def _slurm_requeue_signal(self):
        """SLURM's requeue signal when Lightning's SLURM environment has auto-requeue on, else None."""
        from lightning.fabric.plugins.environments import SLURMEnvironment

        env = self.cluster_environment
        if isinstance(env, SLURMEnvironment) and env.auto_requeue:
            return env.requeue_signal
        return None

    @override
    def on_exception(self, exception: BaseException) -> None:
        super().on_exception(exception)
        self._stop_flag.restore()
        if self._report_dir is None:
            return
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        step = trainer.global_step if trainer is not None else None
        try:
            write_report(self._report_dir, self.global_rank, exception, step)
        except OSError:
            pass  # a full disk must not hide the original error
        if self._supervised_child:
            # a rank the supervised launcher started: the launcher names the failure in one line; no traceback here
            from .faults.supervisor import exit_status_for

            import sys

            sys.stderr.flush()
            os._exit(exit_status_for(exception))

    # ------------------------------------------------------------------ gradient clipping by the global norm
    @torch.no_grad()
    def clip_by_global_norm(self, optimizer, max_norm: float) -> torch.Tensor:
        """Clip all gradients by the norm over dense parameters (replicated) and every rank's experts."""
        expert_ids = {id(p) for layer in self._moe_layers().values() for p in layer.experts.slot_parameters()}
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        grads = [local_tensor(p.grad) for p in params]  # FSDP: this rank's shard (a view: clipping reaches it)
        norms = torch._foreach_norm(grads) if grads else []
        squares = torch.stack([n.double() for n in norms]).pow(2) if norms else torch.zeros(0, dtype=torch.float64)
        is_expert = torch.tensor([id(p) in expert_ids for p in params], dtype=torch.bool, device=squares.device)
        expert_sq = squares[is_expert].sum()
        dense_sq = squares[~is_expert].sum()
        if dist.is_available() and dist.is_initialized() and self.world_size > 1:
            # one all-reduce over the world: FSDP dense shards add up; DDP dense replicas (identical) count 1/W each;
            # every expert lives once per replica (copies identical after the average), so each copy counts 1/R
            replicas = self.replicas.num_replicas if self.replicas is not None else 1
            dense_copies = 1 if self.dense_sharding == "fsdp" else self.world_size
            parts = torch.stack([dense_sq / dense_copies, expert_sq / replicas]).to(self.root_device)
            dist.all_reduce(parts)
            dense_sq, expert_sq = parts.cpu()
        total = (dense_sq + expert_sq).sqrt()
        coef = max_norm / (float(total) + 1e-6)
        if coef < 1.0:
            torch._foreach_mul_(grads, coef)
        return total

    # ------------------------------------------------------------------ checkpoints
    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        """The full unsharded state dict (collective: every rank calls it, as ``trainer.save_checkpoint`` does).

        With ``checkpoint_format="sharded"`` the tensors are written by ``save_checkpoint`` instead (empty here)."""
        settle_migrations(self.lightning_module)  # experts still moving: the checkpoint shows them moved
        if self.checkpoint_format == "sharded":
            return {}
        return ckpt.full_state_dict(self.lightning_module)

    @override
    def optimizer_state(self, optimizer) -> dict:
        settle_migrations(self.lightning_module)
        if self.checkpoint_format == "sharded":
            return {}
        inner = getattr(optimizer, "_optimizer", optimizer)
        return ckpt.full_optimizer_state(self.lightning_module, inner)

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Optional[Any] = None) -> None:
        settle_migrations(self.lightning_module)
        meta = {"format": self.checkpoint_format, "version": 1, "topology": str(self.topology),
                "expert_parallel_size": self.expert_parallel_size,
                "placements": ckpt.placement_metadata(self.lightning_module)}
        if self.checkpoint_format == "sharded":
            from .checkpoint_sharded import optimizer_structure, save_sharded

            meta["optimizer_structure"] = optimizer_structure(self.lightning_module, self.optimizers)
            rest = {k: v for k, v in checkpoint.items() if k not in ("state_dict", "optimizer_states")}
            rest["hiermoe"] = meta
            save_sharded(filepath, self.lightning_module, self.optimizers, rest, self.is_global_zero, self.barrier,
                         write_experts=self.replicas is None or self.replicas.index == 0)  # once per expert
            return
        checkpoint["hiermoe"] = meta
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    @override
    def load_checkpoint(self, checkpoint_path, weights_only: Optional[bool] = None) -> dict[str, Any]:
        from .checkpoint_sharded import META_FILE, is_sharded_checkpoint, load_meta

        self._loading_path = os.fspath(checkpoint_path)
        if is_sharded_checkpoint(checkpoint_path):
            check_sharded_checkpoint(checkpoint_path, META_FILE)  # same verdict on every rank, before any collective
            checkpoint = load_meta(checkpoint_path)
            checkpoint["hiermoe"]["path"] = os.fspath(checkpoint_path)
            checkpoint["state_dict"], checkpoint["optimizer_states"] = {}, []
        else:
            load = super().load_checkpoint
            if weights_only is not None:  # Lightning < 2.6 has no weights_only (and never passes it)
                load = functools.partial(load, weights_only=weights_only)
            checkpoint = load_full_checkpoint(checkpoint_path, load)
        self._check_hyperparameters(checkpoint)
        return checkpoint

    def _check_hyperparameters(self, checkpoint: Mapping[str, Any]) -> None:
        """A model built with other arguments than the checkpoint's is an error naming them (never silently
        trained with one or the other)."""
        saved = checkpoint.get("hyper_parameters") or {}
        current = getattr(self.lightning_module, "hparams", None) or {}
        differ = hparam_differences(dict(saved), dict(current))
        if differ:
            raise CheckpointError(self._loading_path, "the model was built with other arguments than the checkpoint's: "
                                  + ", ".join(differ) + "; resume with the checkpoint's values or start a new run")

    @override
    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        meta = checkpoint.get("hiermoe", {}) or {}
        path = meta.get("path") or self._loading_path or "<in memory>"
        try:
            ckpt.restore_placements(self.lightning_module, meta.get("placements"))
            if meta.get("format") == "sharded":
                from .checkpoint_sharded import load_sharded_model

                load_sharded_model(meta["path"], self.lightning_module, strict=strict)
                return
            local = ckpt.local_state_dict(self.lightning_module, checkpoint["state_dict"])
            self.lightning_module.load_state_dict(local, strict=strict)
        except CheckpointError:
            raise
        except (RuntimeError, ValueError, KeyError) as e:
            # the same on every rank (shapes and keys do not depend on the rank): one line naming what differs
            raise CheckpointError(path, explain_state_dict_mismatch(e)) from None

    @override
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

    @override
    def teardown(self) -> None:
        self._stop_flag.restore()
        for h in self._grad_hooks:
            h.remove()
        self._grad_hooks.clear()
        super().teardown()


class GlobalNormClipping(Precision):
    """A precision plugin whose *norm* clipping uses the global norm (:meth:`HierMoEStrategy.clip_by_global_norm`:
    the dense replicas' norm and every rank's expert norms); value clipping and everything else are the plugin's own.

    Why the precision plugin: in Lightning's Trainer it owns gradient clipping. ``Precision._after_closure`` calls
    the LightningModule's ``configure_gradient_clipping`` hook, whose default (like any override that calls
    ``self.clip_gradients``) calls ``trainer.precision_plugin.clip_gradients``, which hands norm clipping to
    ``clip_grad_by_norm``. The Trainer's strategy has no clipping hook of its own (Fabric's has, the Trainer's has
    not), so ``clip_grad_by_norm`` -- public, and overridden by Lightning's own plugins for the same reason (FSDP,
    DeepSpeed) -- is the one seam that sees every norm clip and nothing else.

    Why a subclass of the plugin's own class, not a delegator around it: the plugin's methods call
    ``self.clip_grad_by_norm`` (``MixedPrecision.clip_gradients`` first refuses fused optimizers, and its
    ``optimizer_step`` unscales before clipping); Lightning tests ``isinstance(precision_plugin, MixedPrecision)``;
    and it keys the plugin's checkpoint state by ``type(plugin).__qualname__``. A delegator would lose all three.
    :meth:`adopt`, called once in :meth:`HierMoEStrategy.setup`, moves the user's plugin instance (its state, e.g. an
    AMP scaler, stays where it is) to a subclass made once per plugin class, with the base's ``__qualname__``.
    """

    _hiermoe_base: type[Precision] = Precision  # the plugin class this one was made from
    _hiermoe_strategy: HierMoEStrategy

    @classmethod
    def adopt(cls, plugin: Precision, strategy: HierMoEStrategy) -> Precision:
        """``plugin``, now clipping by ``strategy``'s global norm (idempotent)."""
        if not isinstance(plugin, GlobalNormClipping):
            plugin.__class__ = _global_norm_clipping_class(type(plugin))
        plugin._hiermoe_strategy = strategy
        return plugin

    @override
    def clip_grad_by_norm(self, optimizer, clip_val: Union[int, float]) -> None:
        self._hiermoe_strategy.clip_by_global_norm(optimizer, float(clip_val))

    def __reduce__(self):
        # the class is made at run time, so pickle (spawn, deepcopy) names the base class and rebuilds it from that
        return _new_global_norm_clipping, (self._hiermoe_base,), self.__dict__


@functools.lru_cache(maxsize=None)
def _global_norm_clipping_class(base: type[Precision]) -> type[GlobalNormClipping]:
    """One subclass per precision plugin class; its ``__qualname__`` is the base's, under which Lightning saves and
    restores the plugin's state in checkpoints (so checkpoints stay interchangeable with plain runs)."""
    return type(base.__name__, (GlobalNormClipping, base),
                {"__qualname__": base.__qualname__, "__module__": __name__, "_hiermoe_base": base,
                 "__doc__": f"{base.__qualname__} with clipping by the global norm (:class:`GlobalNormClipping`)."})


def _new_global_norm_clipping(base: type[Precision]) -> GlobalNormClipping:
    return object.__new__(_global_norm_clipping_class(base))


class _UnshardedResultLauncher(_MultiProcessingLauncher):
    """fork/spawn: rank 0 returns the *unsharded* state dict, which the parent's unsharded model can load; a rank
    that fails is named in one line (:func:`~hiermoe_lightning.faults.launchers.translate_process_failure`)."""

    @override
    def launch(self, function, *args: Any, trainer=None, **kwargs: Any) -> Any:
        from torch.multiprocessing import ProcessExitedException, ProcessRaisedException

        if trainer is not None:
            use_newest_for_last(trainer)  # ckpt_path="last": the newest complete checkpoint
        report_dir = report_dir_for(os.getpid())
        self._strategy._report_dir = report_dir  # the forked (or pickled) ranks inherit it
        # Lightning writes the rendezvous port into this process's environment for good: the next launch from this
        # process (another fit, a test) would meet at the same port, where a store of this launch may still linger
        master_port = os.environ.get("MASTER_PORT")
        failed = False
        try:
            return super().launch(function, *args, trainer=trainer, **kwargs)
        except (ProcessRaisedException, ProcessExitedException) as e:
            error = translate_process_failure(e, report_dir)
            failed = not isinstance(error, Preempted)  # a failure keeps its reports and logs; a preemption does not
            raise error from None
        finally:
            self._strategy._report_dir = None
            if not failed:
                shutil.rmtree(report_dir, ignore_errors=True)
            # whatever ended the launch (a rank's failure, Ctrl-C, a test's timeout raised in this process), no rank
            # may outlive it: a leftover rank would keep computing and hold its rendezvous port
            for proc in getattr(self, "procs", []):
                if proc.is_alive():
                    proc.kill()
                proc.join(5)
            if master_port is None:
                os.environ.pop("MASTER_PORT", None)

    @override
    def _wrapping_function(self, process_idx: int, trainer, *args: Any, **kwargs: Any) -> None:
        # in the rank process: Lightning's exception handling (and so Strategy.on_exception) runs in the parent
        # only, so the rank writes its failure report here; and it dies with its launcher
        die_with_parent()
        if self._start_method == "fork":
            # libgomp is not fork-safe: if the parent ever ran an OpenMP parallel region, the child's first one hangs
            # (its thread pool was not forked with it). One intra-op thread never enters one.
            torch.set_num_threads(1)
        try:
            return super()._wrapping_function(process_idx, trainer, *args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - reported, then re-raised unchanged
            if self._strategy._report_dir is not None and not isinstance(e, KeyboardInterrupt):
                step = trainer.global_step if trainer is not None else None
                try:
                    write_report(self._strategy._report_dir, self._strategy.global_rank, e, step)
                except OSError:
                    pass
            raise

    @override
    def _recover_results_in_main_process(self, worker_output: _WorkerOutput, trainer) -> None:
        module = trainer.lightning_module
        if worker_output.weights_path is not None and any(t.is_meta for t in (*module.parameters(), *module.buffers())):
            # built on meta in this process (trainer.init_module(empty_init=True)): copying into a meta tensor is a
            # no-op, so the ranks' unsharded tensors replace them; then Lightning's bookkeeping, with nothing to load
            state = self._strategy.checkpoint_io.load_checkpoint(worker_output.weights_path)
            module.load_state_dict(state, strict=False, assign=True)
            self._strategy.checkpoint_io.remove_checkpoint(worker_output.weights_path)
            worker_output = worker_output._replace(weights_path=None)
        super()._recover_results_in_main_process(worker_output, trainer)

    @override
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


def _outside_moe(module: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """``(name, module)`` of every module that is neither a MoELayer nor inside one."""
    moe = [name for name, m in module.named_modules() if isinstance(m, MoELayer)]
    return [(name, m) for name, m in module.named_modules()
            if not any(p == "" or name == p or name.startswith(p + ".") for p in moe)]


def _dense_meta_modules(module: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """``(name, module)`` of every module outside the MoE layers that itself holds a parameter or buffer on meta."""
    out = []
    for name, m in _outside_moe(module):
        tensors = (*m._parameters.values(), *m._buffers.values())
        if any(t is not None and t.is_meta for t in tensors):
            out.append((name, m))
    return out


def check_dense_materializable(module: torch.nn.Module) -> None:
    """TypeError naming every module outside the MoE layers that holds tensors on meta and has no
    ``reset_parameters()`` (:func:`materialize_dense_` could not give them values)."""
    bad = [name or type(module).__name__ for name, m in _dense_meta_modules(module)
           if not callable(getattr(m, "reset_parameters", None))]
    if bad:
        raise TypeError(
            f"these modules hold parameters or buffers on the meta device and have no reset_parameters() to "
            f"materialise them: {', '.join(bad)}. Give each a reset_parameters() that initialises its own tensors "
            f"(torch's convention), or build them on a real device: only the MoE layers need meta "
            f"(MoELayer(..., device=\"meta\")).")
    other = [f"{name or type(module).__name__}.{key}" for name, m in _outside_moe(module)
             for key, value in vars(m).items() if isinstance(value, torch.Tensor) and value.is_meta]
    if other:
        raise TypeError(
            f"these tensors are on the meta device and are neither parameters nor buffers, so nothing can "
            f"materialise them (e.g. torchmetrics states): {', '.join(other)}. Build their modules on a real device "
            f"(inside `with torch.device(\"cpu\")`).")


@torch.no_grad()
def materialize_dense_(module: torch.nn.Module, device: "torch.device | str" = "cpu", *, seed: int = 0) -> list[str]:
    """Materialise what is left on meta outside the MoE layers (which ``ExpertParallel.shard_`` or
    ``MoELayer.materialize_`` handle): every module that itself holds a meta parameter or buffer gets storage on
    ``device`` (``to_empty(recurse=False)``) and then its ``reset_parameters()``, run with the random generators
    seeded from ``(seed, the module's name)`` and restored afterwards. So the values are the same on every rank and
    in every run, and the caller's random state is untouched; they are those of the module's ``reset_parameters``,
    not those of a normal build (a module seeded in its constructor is not reproduced; under HierMoEStrategy, DDP
    broadcasts rank 0's dense values anyway). A module without ``reset_parameters`` is a TypeError naming it, raised
    before anything changes. Returns the names of the modules materialised."""
    check_dense_materializable(module)
    device = torch.device(device)
    done = []
    for name, m in _dense_meta_modules(module):
        m.to_empty(device=device, recurse=False)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(derive_seed(seed, "dense", name))
            m.reset_parameters()
        done.append(name)
    return done


def _check_timeout(timeout) -> datetime.timedelta:
    """The process-group timeout as a timedelta; a number of seconds or a timedelta, > 0."""
    if isinstance(timeout, datetime.timedelta):
        seconds = timeout.total_seconds()
    elif isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"timeout must be a number of seconds > 0 or a datetime.timedelta, got {timeout!r}")
    else:
        seconds = float(timeout)
    if not seconds > 0 or seconds != seconds or seconds == float("inf"):
        raise ValueError(f"timeout must be a finite number of seconds > 0, got {timeout!r}")
    return datetime.timedelta(seconds=seconds)


def _preemption_checkpoint_path(trainer) -> str:
    """Where a preemption writes: ``last.ckpt`` of the first ModelCheckpoint (so ``--ckpt_path last`` finds it), else
    ``<default_root_dir>/checkpoints/last.ckpt``."""
    callback = trainer.checkpoint_callback
    if callback is not None and getattr(callback, "dirpath", None):
        return os.path.join(callback.dirpath, callback.CHECKPOINT_NAME_LAST + callback.FILE_EXTENSION)
    return os.path.join(trainer.default_root_dir, "checkpoints", "last.ckpt")


def register_strategy() -> None:
    """Register ``"hiermoe"`` (idempotent; runs on ``import hiermoe_lightning``)."""
    HierMoEStrategy.register_strategies(StrategyRegistry)
