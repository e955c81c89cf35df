"""Run MoEGPT with Lightning on N forked CPU ranks (HierMoEStrategy) or on one process, recording global losses."""

from __future__ import annotations

import json
import os

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler

from hiermoe_lightning import HierMoEStrategy
from hiermoe_lightning.data import ByteTextDataModule
from hiermoe_lightning.models import MoEGPT

MODEL = dict(seq_len=16, num_layers=2, hidden_size=32, num_heads=2, ffn_hidden_size=32, num_experts=8, top_k=2,
             aux_loss_coef=0.0, lr=1e-2, seed=5)
GLOBAL_BATCH = 8


def forked_strategy(world: int, *, topology=None, **kwargs):
    """Lightning's default strategy for one process, else HierMoEStrategy on ``world`` forked CPU ranks (topology
    ``str(world)`` unless given, a 60 s process-group timeout, ``kwargs`` as its other arguments)."""
    if world == 1:
        return "auto"
    return HierMoEStrategy(topology=topology or str(world), start_method="fork", timeout=60, **kwargs)


class FixedOrderData(pl.LightningDataModule):
    """The first ``samples`` windows of the default corpus, no shuffling; each rank gets ``rank::world`` (so the
    union of the ranks' step-s batches is exactly the single-process step-s batch)."""

    def __init__(self, world: int, samples: int = 40):
        super().__init__()
        self.world = world
        base = ByteTextDataModule(seq_len=MODEL["seq_len"], batch_size=1)
        self.dataset = torch.utils.data.Subset(base.train_dataset, range(samples))

    def train_dataloader(self):
        per_rank = GLOBAL_BATCH // self.world
        if self.world == 1:
            return DataLoader(self.dataset, batch_size=per_rank, shuffle=False)
        sampler = DistributedSampler(self.dataset, num_replicas=self.world, rank=dist.get_rank(), shuffle=False)
        return DataLoader(self.dataset, batch_size=per_rank, sampler=sampler)


class RecordLosses(pl.Callback):
    """Global (all-rank mean) training loss of every optimizer step, written by rank 0 to ``path`` as JSON."""

    def __init__(self, path: str):
        self.path, self.losses = path, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs["loss"].detach().clone()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(loss)
            loss /= dist.get_world_size()
        self.losses.append(float(loss))

    def on_train_end(self, trainer, pl_module):
        if trainer.global_rank == 0:
            old = json.load(open(self.path)) if os.path.exists(self.path) else []
            json.dump(old + self.losses, open(self.path, "w"))


class SaveAtEnd(pl.Callback):
    def __init__(self, path: str):
        self.path = path

    def on_train_end(self, trainer, pl_module):
        trainer.save_checkpoint(self.path)


def fit(tmp, world: int, *, dispatch="flat", topology=None, max_epochs=1, optimizer="adamw", clip=None,
        accumulate=1, ckpt_path=None, save_path=None, tag="run", samples=40, model_kwargs=None, check_replicas=False,
        checkpoint_format="full", extra_callbacks=(), link_costs="paper-a6000", logger=False, pipeline_chunks=1,
        shared_memory=True, accelerator="cpu", strategy_kwargs=None):
    """Train; return the recorded global losses. ``accelerator="gpu"``: ``world`` GPUs under HierMoEStrategy (even
    one), started with spawn (CUDA may already be initialised in this process). ``strategy_kwargs``: more
    HierMoEStrategy arguments (e.g. ``expert_parallel_size``)."""
    losses_path = os.path.join(tmp, f"{tag}.json")
    callbacks = [RecordLosses(losses_path)] + ([SaveAtEnd(save_path)] if save_path else [])
    callbacks += list(extra_callbacks)
    if check_replicas:
        callbacks.append(CheckReplicas(os.path.join(tmp, f"{tag}.replicas.json")))
    model = MoEGPT(**{**MODEL, **(model_kwargs or {})}, optimizer=optimizer, momentum=0.9 if optimizer == "sgd" else 0.0)
    if world == 1 and accelerator == "cpu":
        strategy, devices = "auto", 1
    else:
        start_method = "spawn" if accelerator == "gpu" else "fork"
        if topology is None and "expert_parallel_size" not in (strategy_kwargs or {}):
            topology = str(world)
        strategy = HierMoEStrategy(topology=topology, dispatch=dispatch, start_method=start_method,
                                   timeout=60,
                                   checkpoint_format=checkpoint_format, link_costs=link_costs,
                                   pipeline_chunks=pipeline_chunks, shared_memory=shared_memory,
                                   **(strategy_kwargs or {}))
        devices = world
    trainer = pl.Trainer(
        accelerator=accelerator, devices=devices, strategy=strategy, max_epochs=max_epochs, logger=logger, callbacks=callbacks,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        use_distributed_sampler=False, gradient_clip_val=clip, gradient_clip_algorithm="norm",
        accumulate_grad_batches=accumulate, default_root_dir=tmp, num_sanity_val_steps=0, limit_val_batches=0,
    )
    trainer.fit(model, datamodule=FixedOrderData(world, samples), ckpt_path=ckpt_path)
    return json.load(open(losses_path)), model


class CheckReplicas(pl.Callback):
    """At the end of training every rank compares its dense parameters with rank 0's; rank 0 writes the verdict."""

    def __init__(self, path: str):
        self.path = path

    def on_train_end(self, trainer, pl_module):
        from hiermoe_lightning.checkpoint import expert_parameter_names

        from hiermoe_lightning.dense_sharding import full_tensor

        experts = set(expert_parameter_names(pl_module))
        dense = torch.cat([full_tensor(p.detach()).flatten() for n, p in pl_module.named_parameters()
                           if n not in experts])
        ref = dense.clone()
        dist.broadcast(ref, src=0)
        same = torch.tensor([int(torch.equal(ref, dense))])
        dist.all_reduce(same, op=dist.ReduceOp.MIN)
        local = torch.cat([p.detach().flatten() for n, p in pl_module.named_parameters() if n in experts])
        from hiermoe_lightning.dense_sharding import local_tensor

        held = torch.tensor([sum(local_tensor(p.detach()).numel() for n, p in pl_module.named_parameters()
                                 if n not in experts)])
        dist.all_reduce(held, op=dist.ReduceOp.MAX)
        verdict = {"dense_identical": bool(same), "expert_numel_per_rank": local.numel(),
                   "dense_numel": dense.numel(), "dense_numel_held_per_rank_max": int(held)}
        replicas = getattr(trainer.strategy, "replicas", None)
        if replicas is not None:  # every copy of an expert (one per replica) equals the first replica's
            first = local.clone()
            # this rank's copy in the first replica has global rank (global rank mod E)
            dist.broadcast(first, src=trainer.global_rank % replicas.layout.expert_parallel_size,
                           group=replicas.copies_group)
            copies = torch.tensor([int(torch.equal(first, local))])
            dist.all_reduce(copies, op=dist.ReduceOp.MIN)
            verdict["experts_identical_across_replicas"] = bool(copies)
        if trainer.global_rank == 0:
            json.dump(verdict, open(self.path, "w"))


# ------------------------------------------------------------------ resumable fits on the bundled text data
def _next_placement(layer):
    """The placement the layer's next forward uses: the target of a migration still in flight (read without
    settling it, so a checkpoint after this callback still finds it in flight), else its own."""
    flight = layer.expert_parallel.migration_in_flight if layer.expert_parallel is not None else None
    return flight.placement_after(layer) if flight is not None else layer.placement


class RecordSteps(pl.Callback):
    """After every training batch (and after the callbacks listed before it, e.g. a HierMoECallback's plan and
    migration): the global loss, each MoE layer's placement (``expert_to_rank`` and ``expert_to_slot``) and, on rank
    0, the first token of every sample of the global batch. At the end of training rank 0 writes, to ``path`` (a
    torch file, appended to by a resumed run): those records by step, the full (unsharded) parameters and every
    other callback's ``state_dict()``."""

    def __init__(self, path: str):
        self.path, self.steps = path, {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        from hiermoe_lightning.checkpoint import moe_layers

        loss = outputs["loss"].detach().clone()
        first = batch[0][:, 0].contiguous()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(loss)
            loss /= dist.get_world_size()
            parts = [torch.empty_like(first) for _ in range(dist.get_world_size())]
            dist.all_gather(parts, first)
            first = torch.stack(parts)
        placements = {n: (p.expert_to_rank.clone(), p.expert_to_slot.clone())
                      for n, p in ((n, _next_placement(m)) for n, m in moe_layers(pl_module).items())
                      if p is not None}
        self.steps[trainer.global_step] = {"loss": float(loss), "placements": placements, "tokens": first.tolist(),
                                           "epoch": trainer.current_epoch, "batch_idx": batch_idx}

    def on_train_end(self, trainer, pl_module):
        from hiermoe_lightning.checkpoint import full_state_dict

        params = full_state_dict(pl_module)  # collective
        states = {type(cb).__name__: cb.state_dict() for cb in trainer.callbacks
                  if cb is not self and not isinstance(cb, pl.callbacks.Checkpoint)}
        if trainer.global_rank == 0:
            old = torch.load(self.path, weights_only=False) if os.path.exists(self.path) else {"steps": {}}
            torch.save({"steps": {**old["steps"], **self.steps}, "params": params, "callbacks": states}, self.path)


class SaveAtBatchStart(pl.Callback):
    """``trainer.save_checkpoint(path)`` in ``on_train_batch_start`` when ``global_step == step`` (the batch of the
    next step is fetched and not run: where a preemption saves)."""

    def __init__(self, step: int, path: str):
        self.step, self.path = step, path

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)


def fit_text(tmp, world: int, *, max_steps: int, record: str, callbacks=(), ckpt_path=None, shuffle=True,
             samples=40, topology=None, dispatch="auto", link_costs="paper-a6000", checkpoint_format="full",
             checkpoint_callbacks=()):
    """Train MoEGPT (``MODEL``) on the first ``samples`` windows of ByteTextDataModule (its own resumable sampler:
    each rank its shard, shuffled by (seed, epoch)) for ``max_steps`` optimizer steps; :class:`RecordSteps` writes to
    ``record``. Returns the parent's model (rank 0's unsharded weights)."""
    model = MoEGPT(**MODEL, optimizer="adamw")
    data = ByteTextDataModule(seq_len=MODEL["seq_len"], batch_size=GLOBAL_BATCH // world, val_fraction=0.0,
                              shuffle=shuffle, seed=3, max_train_samples=samples)
    strategy = forked_strategy(world, topology=topology, dispatch=dispatch, link_costs=link_costs,
                               checkpoint_format=checkpoint_format)
    trainer = pl.Trainer(
        accelerator="cpu", devices=world, strategy=strategy, max_steps=max_steps, logger=False,
        callbacks=[*callbacks, RecordSteps(record), *checkpoint_callbacks],
        enable_checkpointing=bool(checkpoint_callbacks), enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp, num_sanity_val_steps=0, limit_val_batches=0,
    )
    trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
    return model


# ------------------------------------------------------------------ any LightningModule (e.g. a converted HF model)
class RecordSwaps(pl.Callback):
    """At the end of training rank 0 writes, to ``path`` as JSON, every ``HierMoECallback``'s ``swaps_total`` and
    the number of plan records, and whether any MoE layer's placement differs from the contiguous one. Put it after
    the HierMoECallback."""

    def __init__(self, path: str):
        self.path = path

    def on_train_end(self, trainer, pl_module):
        from hiermoe_lightning import HierMoECallback
        from hiermoe_lightning.checkpoint import moe_layers

        planners = [cb for cb in trainer.callbacks if isinstance(cb, HierMoECallback)]
        moved = []
        for name, layer in moe_layers(pl_module).items():
            p = layer.placement
            if p is not None:
                contiguous = torch.arange(p.expert_to_rank.numel()) // (p.expert_to_rank.numel() // trainer.world_size)
                moved.append(not torch.equal(p.expert_to_rank.cpu(), contiguous))
        if trainer.global_rank == 0:
            json.dump({"swaps_total": sum(cb.swaps_total for cb in planners),
                       "plan_records": sum(len(cb.history) for cb in planners), "placement_moved": any(moved)},
                      open(self.path, "w"))


def fit_module(tmp, world: int, make_module, *, dispatch="auto", topology=None, max_epochs=1, tag="run", samples=40,
               extra_callbacks=(), link_costs="paper-a6000", check_replicas=False, pipeline_chunks=1):
    """Like :func:`fit` for any LightningModule: ``make_module()`` builds it (in the parent, before the ranks fork;
    every call must give the same weights), trained on :class:`FixedOrderData` (``GLOBAL_BATCH`` samples of
    ``MODEL["seq_len"]`` bytes per step, batches ``(inputs, targets)``), one process (``world == 1``, Lightning's
    default strategy) or ``world`` forked CPU ranks under HierMoEStrategy. Returns (global losses, the module)."""
    losses_path = os.path.join(tmp, f"{tag}.json")
    callbacks = [RecordLosses(losses_path), *extra_callbacks]
    if check_replicas:
        callbacks.append(CheckReplicas(os.path.join(tmp, f"{tag}.replicas.json")))
    module = make_module()
    strategy = forked_strategy(world, topology=topology, dispatch=dispatch, link_costs=link_costs,
                               pipeline_chunks=pipeline_chunks)
    trainer = pl.Trainer(
        accelerator="cpu", devices=world, strategy=strategy, max_epochs=max_epochs, logger=False, callbacks=callbacks,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        use_distributed_sampler=False, default_root_dir=tmp, num_sanity_val_steps=0, limit_val_batches=0,
    )
    trainer.fit(module, datamodule=FixedOrderData(world, samples))
    return json.load(open(losses_path)), module
