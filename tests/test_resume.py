"""Exact resume: a 4-rank fit with expert swaps, checkpointed mid-epoch at a step that is not a plan step and resumed
in a new fit, continues the uninterrupted run (same samples, same placements at every step and plan, the callback's
whole state, losses and parameters to float rounding); ``ckpt_path="last"`` is the newest complete checkpoint."""

import json
import os
import shutil
import time

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from hiermoe_lightning import HierMoECallback, LinkCosts
from hiermoe_lightning.checkpoint_files import (ResumableCheckpoint, complete_checkpoints, is_complete_checkpoint,
                                                newest_checkpoint, resolve_last, use_newest_for_last)
from hiermoe_lightning.data import ByteTextDataModule
from tests.lightning_harness import SaveAtBatchStart, fit_text

# a slow level-1 link makes co-locating co-activated experts worth a swap even on this tiny model
COSTS = LinkCosts({"a2a": (0.1, 1e-4), "inter1": (0.1, 1e-4), "intra1": (0.01, 1e-7)})
# 40 samples, 4 ranks x 2 per batch: 5 steps per epoch; plans start after steps 3, 6, 9, 12 (in the background) and
# are applied 2 steps later (5, 8, 11): the checkpoint after step 7 holds a plan in flight
MAX_STEPS = 12
TIMINGS = {"plan_seconds", "migration_seconds", "migration_wall_seconds", "train_seconds", "blocked_seconds",
           "stats_seconds", "planning_seconds"}  # wall-clock, never equal across runs


def _callback():
    return HierMoECallback(plan_every_n_steps=3, max_swaps_per_plan=2, charge_migration=False,
                           compute_balance_tolerance=None, print_summary=False, save_plots=False)


class _InFlightAt(pl.Callback):
    """Rank 0 writes to ``path`` whether a migration was in flight at the end of step ``step`` (after the
    HierMoECallback, before the ModelCheckpoints, which Lightning runs last)."""

    def __init__(self, step: int, path: str):
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        from hiermoe_lightning.checkpoint import moe_layers

        if trainer.global_step == self.step and trainer.global_rank == 0:
            flying = any(m.expert_parallel.migration_in_flight is not None for m in moe_layers(pl_module).values())
            with open(self.path, "w") as f:
                json.dump({"in_flight": flying}, f)


def _fit(tmp, record, **kwargs):
    return fit_text(str(tmp), 4, max_steps=MAX_STEPS, record=str(record), topology="2x2", dispatch="auto",
                    link_costs=COSTS, **kwargs)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The uninterrupted run; it writes a checkpoint after step 7 (ModelCheckpoint, ``on_train_batch_end``) and one
    at the start of step 9's batch (``on_train_batch_start``, where a preemption saves): both mid-epoch (epoch 1),
    neither a plan step."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    _fit(tmp, tmp / "full.pt", callbacks=[_callback(), SaveAtBatchStart(8, str(tmp / "start8.ckpt")),
                                          _InFlightAt(8, str(tmp / "in_flight8.json"))],
         checkpoint_callbacks=[ModelCheckpoint(dirpath=str(tmp / "ck"), every_n_train_steps=7, save_top_k=-1),
                               ModelCheckpoint(dirpath=str(tmp / "ck8"), every_n_train_steps=8, save_top_k=-1)])
    full = torch.load(tmp / "full.pt", weights_only=False)
    assert json.load(open(tmp / "in_flight8.json"))["in_flight"], "no migration in flight at the step-8 checkpoint"
    return tmp, full, {"batch_end_7": tmp / "ck" / "epoch=1-step=7.ckpt", "batch_start_8": tmp / "start8.ckpt",
                       "batch_end_8": tmp / "ck8" / "epoch=1-step=8.ckpt"}


def _placements_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(x, y) for n in a for x, y in zip(a[n], b[n]))


def _assert_same_state(a, b, path=""):
    """Callback states equal: integers, tensors and strings exactly, floats to rounding, timings skipped."""
    if isinstance(a, str) and a.startswith("[{"):  # a JSON list of records (history): compare without timings
        a, b = json.loads(a), json.loads(b)
    if isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_state(x, y, f"{path}[{i}]")
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            if k not in TIMINGS:
                _assert_same_state(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, torch.Tensor):
        if a.is_floating_point():
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6, msg=path)
        else:
            assert torch.equal(a, b), path
    elif isinstance(a, float):
        assert b == pytest.approx(a, rel=1e-6, abs=1e-9), path
    else:
        assert a == b, path


@pytest.mark.parametrize("where", ["batch_end_7", "batch_start_8", "batch_end_8"])
def test_mid_epoch_resume_reproduces_the_uninterrupted_run(tmp_path, uninterrupted, where):
    """Resumed from a checkpoint written after step 7 (``on_train_batch_end``), before step 9's batch ran
    (``on_train_batch_start``), or after step 8 while the experts of the plan applied there were migrating (the
    checkpoint commits the move first): every later step sees the same global batch (each rank its shard of a shuffled,
    resumed epoch) and the same expert placement, the plan in flight at step 7 (started after step 6 in the
    background) is started again from the checkpoint's inputs and applied after step 8 as before, the plans after it
    are the same, the callback ends with the same state (windows, history, swap count, schedule, per-layer dispatch
    state, byte totals), and losses and parameters agree to float rounding."""
    _, full, checkpoints = uninterrupted
    steps = full["steps"]
    assert sorted(steps) == list(range(1, MAX_STEPS + 1))
    history = full["callbacks"]["HierMoECallback"]["history"]
    assert full["callbacks"]["HierMoECallback"]["swaps_total"] > 0, "no swap: the placements would prove nothing"
    first = 8 if where == "batch_end_7" else 9
    if where == "batch_end_8":  # written while the experts of the plan applied after step 8 were still travelling
        assert not _placements_equal(steps[7]["placements"], steps[8]["placements"]), "the step-8 plan moved nothing"
    else:
        assert any(not _placements_equal(steps[first - 1]["placements"], steps[s]["placements"])
                   for s in range(first, MAX_STEPS + 1)), "no swap after the checkpoint: a later plan proves nothing"
    starts = {(p["step"], p["applied_step"]) for p in json.loads(history)}
    assert starts == {(3, 5), (6, 8), (9, 11)}, starts  # the plan of step 6 is in flight at the step-7 checkpoint

    _fit(tmp_path, tmp_path / "resumed.pt", callbacks=[_callback()], ckpt_path=str(checkpoints[where]))
    resumed = torch.load(tmp_path / "resumed.pt", weights_only=False)
    assert sorted(resumed["steps"]) == list(range(first, MAX_STEPS + 1))
    for s, got in resumed["steps"].items():
        want = steps[s]
        assert (got["epoch"], got["batch_idx"]) == (want["epoch"], want["batch_idx"]), s
        assert got["tokens"] == want["tokens"], f"step {s}: another global batch than the uninterrupted run's"
        assert _placements_equal(got["placements"], want["placements"]), f"step {s}: placements differ"
        assert got["loss"] == pytest.approx(want["loss"], abs=1e-5), s
    for name, want in full["params"].items():
        torch.testing.assert_close(resumed["params"][name], want, atol=1e-5, rtol=1e-5, msg=name)
    # HierMoECallback's state holds DedupMonitor's too (byte totals, tokens, losses counted)
    _assert_same_state(full["callbacks"]["HierMoECallback"], resumed["callbacks"]["HierMoECallback"], "callback")


# ---------------------------------------------------------------------------------------------- "last"
class _Tiny(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 1)

    def training_step(self, batch, batch_idx):
        return self.lin(batch[0].float()).mean()

    def validation_step(self, batch, batch_idx):
        return None

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3)


def _tiny_fit(root, callback, max_steps, ckpt_path=None):
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, val_check_interval=6, limit_val_batches=1,
                         num_sanity_val_steps=0, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[callback], default_root_dir=str(root))
    data = ByteTextDataModule(seq_len=8, batch_size=2, max_train_samples=40, val_fraction=0.05)
    trainer.fit(_Tiny(), datamodule=data, ckpt_path=ckpt_path)
    return trainer


def _step(path) -> int:
    return torch.load(path, weights_only=False, map_location="cpu")["global_step"]


def test_plain_model_checkpoint_lags_and_resumable_checkpoint_does_not(tmp_path):
    """configs/demo.yaml's pattern (save_last with val_check_interval): a plain ModelCheckpoint leaves the last
    steps in no checkpoint (last.ckpt = step 12 of 14); ResumableCheckpoint writes them at the end of training."""
    _tiny_fit(tmp_path / "plain", ModelCheckpoint(dirpath=str(tmp_path / "plain"), save_last=True), 14)
    assert _step(tmp_path / "plain" / "last.ckpt") == 12
    _tiny_fit(tmp_path / "ours", ResumableCheckpoint(dirpath=str(tmp_path / "ours"), save_last=True), 14)
    assert _step(tmp_path / "ours" / "last.ckpt") == 14
    assert _step(tmp_path / "ours" / "epoch=0-step=12.ckpt") == 12
    # written at step 14's batch end, not at on_train_end: a longer fit resumed from it continues epoch 0 at batch 14
    state = torch.load(tmp_path / "ours" / "last.ckpt", weights_only=False)
    assert state["epoch"] == 0 and state["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["batches"] == 14
    _tiny_fit(tmp_path / "ours", ResumableCheckpoint(dirpath=str(tmp_path / "ours"), save_last=True), 16,
              ckpt_path="last")
    state = torch.load(tmp_path / "ours" / "last.ckpt", weights_only=False)
    assert (state["global_step"], state["epoch"]) == (16, 0)
    assert state["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["batches"] == 16
    # the final step is a validation step: its regular checkpoint is written too
    _tiny_fit(tmp_path / "val", ResumableCheckpoint(dirpath=str(tmp_path / "val"), save_last=True), 12)
    assert _step(tmp_path / "val" / "epoch=0-step=12.ckpt") == 12 and _step(tmp_path / "val" / "last.ckpt") == 12


def _age(path, seconds_ago):
    t = time.time() - seconds_ago
    os.utime(path, (t, t))


@pytest.mark.parametrize("kind", ["resumable", "plain_adopted"])
def test_last_is_the_newest_complete_checkpoint(tmp_path, kind):
    """``ckpt_path="last"`` resumes from the newest complete checkpoint whatever its name: a step checkpoint newer
    than last.ckpt wins; a newer truncated file, a temporary name and a hidden file are never chosen."""
    d = tmp_path / "ck"
    _tiny_fit(tmp_path, ModelCheckpoint(dirpath=str(d), every_n_train_steps=4, save_top_k=-1, save_last=True), 8)
    shutil.copy(d / "epoch=0-step=4.ckpt", d / "last.ckpt")  # last.ckpt one interval behind the newest
    _age(d / "epoch=0-step=4.ckpt", 40)
    _age(d / "last.ckpt", 30)
    _age(d / "epoch=0-step=8.ckpt", 20)
    shutil.copy(d / "epoch=0-step=8.ckpt", d / "torn.ckpt")
    with open(d / "torn.ckpt", "r+b") as f:
        f.truncate(os.path.getsize(d / "torn.ckpt") // 2)  # the write a kill interrupted: newest, incomplete
    shutil.copy(d / "epoch=0-step=4.ckpt", d / ".last.ckpt.tmp")
    shutil.copy(d / "epoch=0-step=4.ckpt", d / "last.ckpt.partial")
    assert not is_complete_checkpoint(d / "torn.ckpt")
    assert not is_complete_checkpoint(d / ".last.ckpt.tmp") and not is_complete_checkpoint(d / "last.ckpt.partial")
    assert [os.path.basename(p) for p in complete_checkpoints(d)] == [
        "epoch=0-step=4.ckpt", "last.ckpt", "epoch=0-step=8.ckpt"]
    assert newest_checkpoint([d, tmp_path / "missing"]) == str(d / "epoch=0-step=8.ckpt")

    if kind == "resumable":
        callback = ResumableCheckpoint(dirpath=str(d), save_last=True)
        trainer = _tiny_fit(tmp_path, callback, 10, ckpt_path="last")
    else:  # a plain ModelCheckpoint, given the rule before fit (what the CLI and the launchers do)
        callback = ModelCheckpoint(dirpath=str(d), save_last=True)
        trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=10, logger=False, enable_progress_bar=False,
                             enable_model_summary=False, callbacks=[callback], default_root_dir=str(tmp_path),
                             limit_val_batches=0)
        assert resolve_last(trainer) == str(d / "epoch=0-step=8.ckpt")
        use_newest_for_last(trainer)
        trainer.fit(_Tiny(), datamodule=ByteTextDataModule(seq_len=8, batch_size=2, max_train_samples=40),
                    ckpt_path="last")
    assert os.path.samefile(trainer.ckpt_path, d / "epoch=0-step=8.ckpt")
    assert trainer.global_step == 10


def test_sharded_checkpoint_directories_count_when_complete(tmp_path):
    from hiermoe_lightning.checkpoint_sharded import META_FILE

    good, partial = tmp_path / "epoch=0-step=3.ckpt", tmp_path / "epoch=0-step=5.ckpt"
    for d in (good, partial):
        d.mkdir()
        (d / "__0_0.distcp").write_bytes(b"x")
    torch.save({"global_step": 3}, good / META_FILE)
    (good / ".metadata").write_bytes(b"m")
    torch.save({"global_step": 5}, partial / META_FILE)  # DCP's .metadata missing: the write did not finish
    _age(good, 10)
    assert is_complete_checkpoint(good) and not is_complete_checkpoint(partial)
    assert newest_checkpoint([tmp_path]) == str(good)
