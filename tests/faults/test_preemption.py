"""SIGTERM to a rank of a 4-rank fit: every rank stops at one step boundary, a resumable checkpoint is written, the
launch ends with status 143 (Preempted), and resuming from it reproduces the uninterrupted run."""

from __future__ import annotations

import json
import os
import signal

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist

from hiermoe_lightning import HierMoECallback, HierMoEStrategy, MoELayer
from hiermoe_lightning.data import ByteTextDataModule
from hiermoe_lightning.faults import Preempted
from hiermoe_lightning.models import MoEGPT
from tests.lightning_harness import MODEL, FixedOrderData

pytestmark = pytest.mark.timeout(600)


class StepLosses(pl.Callback):
    """Rank 0 appends ``[global_step, all-rank mean loss, placements]`` after every step to a JSON-lines file (it
    survives a stop); placements are each MoE layer's ``expert_to_rank`` after the step's callbacks ran."""

    def __init__(self, path: str):
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs["loss"].detach().clone()
        dist.all_reduce(loss)
        if trainer.global_rank == 0:
            placements = [m.placement.expert_to_rank.tolist() for m in pl_module.modules() if isinstance(m, MoELayer)]
            with open(self.path, "a") as f:
                f.write(json.dumps([trainer.global_step, float(loss) / dist.get_world_size(), placements]) + "\n")


class SignalAt(pl.Callback):
    """Send ``signum`` to this rank's own process at the start of the batch that makes global step ``step``."""

    def __init__(self, step: int, rank: int, signum: int = signal.SIGTERM):
        self.step, self.rank, self.signum = step, rank, signum

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step and trainer.global_rank == self.rank:
            os.kill(os.getpid(), self.signum)


def _fit(root, *, max_epochs=None, max_steps=-1, callbacks=(), ckpt_path=None, tag="run", checkpoint_format="full",
         data=None):
    model = MoEGPT(**MODEL, optimizer="sgd", momentum=0.9)
    strategy = HierMoEStrategy(topology="2x2", dispatch="auto", start_method="fork", timeout=120,
                               checkpoint_format=checkpoint_format)
    trainer = pl.Trainer(
        accelerator="cpu", devices=4, strategy=strategy, max_epochs=max_epochs, max_steps=max_steps, logger=False,
        callbacks=[StepLosses(os.path.join(root, f"{tag}.jsonl")), *callbacks], enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=data is not None,
        default_root_dir=root, num_sanity_val_steps=0, limit_val_batches=0,
    )
    trainer.fit(model, datamodule=data or FixedOrderData(4), ckpt_path=ckpt_path)
    return model


def _records(root, tag):
    with open(os.path.join(root, f"{tag}.jsonl")) as f:
        return {step: (loss, placements) for step, loss, placements in map(json.loads, f)}


def _losses(root, tag):
    return {step: loss for step, (loss, _) in _records(root, tag).items()}


@pytest.mark.parametrize("checkpoint_format", ["full", "sharded"])
def test_sigterm_to_one_rank_checkpoints_and_resumes_like_the_uninterrupted_run(tmp_path, checkpoint_format):
    root = str(tmp_path)
    reference = _fit(root, max_epochs=3, tag="reference", checkpoint_format=checkpoint_format)

    # 5 steps per epoch; SIGTERM reaches rank 2 during step 5, the last of epoch 0: every rank stops at the next
    # step boundary, before step 6
    with pytest.raises(Preempted) as info:
        _fit(root, max_epochs=3, callbacks=[SignalAt(4, rank=2)], tag="first", checkpoint_format=checkpoint_format)
    stop = info.value
    assert stop.code == 143
    assert stop.step == 5
    assert stop.checkpoint == os.path.join(root, "checkpoints", "last.ckpt") and os.path.exists(stop.checkpoint)
    assert sorted(_losses(root, "first")) == [1, 2, 3, 4, 5]  # nothing ran past the boundary
    assert not os.path.exists(stop.checkpoint + ".partial")

    resumed = _fit(root, max_epochs=3, ckpt_path=stop.checkpoint, tag="second", checkpoint_format=checkpoint_format)
    expected = _losses(root, "reference")
    got = {**_losses(root, "first"), **_losses(root, "second")}
    assert sorted(got) == sorted(expected) == list(range(1, 16))
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), step
    for (name, a), (_, b) in zip(reference.state_dict().items(), resumed.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_a_stop_requested_on_every_rank_is_one_stop(tmp_path):
    """Every rank receiving SIGTERM (a scheduler signals the whole job) still gives one checkpoint and one stop."""
    root = str(tmp_path)
    with pytest.raises(Preempted) as info:
        _fit(root, max_epochs=1, callbacks=[SignalAt(2, rank=r) for r in range(4)], tag="all")
    assert info.value.step == 3
    assert sorted(_losses(root, "all")) == [1, 2, 3]


def test_preemption_mid_epoch_with_swaps_resumes_losses_parameters_and_placements(tmp_path):
    """The bundled data resumes at the exact sample and the swap planner plans exactly as without the stop: a
    SIGTERM at step 7 of a 10-step epoch (not a plan step), resumed to step 14, equals the uninterrupted run."""
    root = str(tmp_path)

    def data():
        return ByteTextDataModule(seq_len=MODEL["seq_len"], batch_size=2, shuffle=True, max_train_samples=80)

    def planner():
        return HierMoECallback(plan_every_n_steps=3, max_swaps_per_plan=2, charge_migration=False,
                               compute_balance_tolerance=None, print_summary=False, save_plots=False)

    reference = _fit(root, max_steps=14, callbacks=[planner()], tag="reference", data=data())
    with pytest.raises(Preempted) as info:
        _fit(root, max_steps=14, callbacks=[planner(), SignalAt(6, rank=1)], tag="first", data=data())
    assert info.value.step == 7
    resumed = _fit(root, max_steps=14, callbacks=[planner()], ckpt_path=info.value.checkpoint, tag="second",
                   data=data())
    expected = _records(root, "reference")
    got = {**_records(root, "first"), **_records(root, "second")}
    assert sorted(got) == sorted(expected) == list(range(1, 15))
    swapped = [step for step in expected if expected[step][1] != expected[1][1]]
    assert swapped, "the planner never swapped: the placement check would be vacuous"
    for step, (loss, placements) in expected.items():
        assert got[step][0] == pytest.approx(loss, rel=1e-5, abs=1e-6), step
        assert got[step][1] == placements, f"placements differ after step {step}"
    for (name, a), (_, b) in zip(reference.state_dict().items(), resumed.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
